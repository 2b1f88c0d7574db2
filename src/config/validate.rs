//! Raw file structs → typed [`Config`], one function per section (daemon, pipeline, source,
//! target, restore_target, verify), then the checks that span sections (`min_targets`).
//!
//! Each check fails with a [`Finding`] naming the key (`source[1].name`); the caller adds the
//! file and line. Pure but for the files a section names (CA certificates), which are read so
//! that a missing one is a config error rather than a failure at 3 a.m.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::raw::*;
use super::{
    parse_duration, Config, DaemonConfig, PgUrl, PipelineConfig, RestoreConfig,
    RestoreTargetConfig, Secret, SourceConfig, TargetConfig, TargetKind, Text, VerifyConfig,
};
use crate::schedule::Schedule;

/// Something wrong with one key: the dotted path of the key (`target[0].url`) and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Finding {
    pub(super) key: String,
    pub(super) message: String,
}

type Result<T> = std::result::Result<T, Finding>;

fn finding(key: impl Into<String>, message: impl Into<String>) -> Finding {
    Finding {
        key: key.into(),
        message: message.into(),
    }
}

/// What validation needs besides the raw values: where relative paths resolve.
struct Ctx<'a> {
    base: &'a Path,
}

impl Ctx<'_> {
    /// A path from the file, relative ones resolved against the config file's directory.
    fn resolve(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }
}

/// Validates every section of `raw`, read from `path`.
pub(super) fn validate(raw: RawConfig, path: &Path) -> Result<Config> {
    let cx = Ctx {
        base: path.parent().unwrap_or(Path::new(".")),
    };
    let daemon = daemon(raw.daemon, &cx)?;
    let pipeline = pipeline(raw.pipeline)?;
    let sources = sources(raw.source, &cx)?;
    let targets = targets(raw.target, &cx)?;
    min_targets(&pipeline, &targets)?;
    let restore_targets = restore_targets(raw.restore_target, &cx)?;
    let verify = verify(raw.verify, &cx)?;
    Ok(Config {
        path: path.to_path_buf(),
        daemon,
        pipeline,
        sources,
        targets,
        restore_targets,
        restore: RestoreConfig {
            spool_dir: cx.resolve(&raw.restore.spool_dir.0),
        },
        verify,
    })
}

fn daemon(raw: RawDaemon, cx: &Ctx) -> Result<DaemonConfig> {
    Ok(DaemonConfig {
        listen: raw.listen.0.parse().map_err(|_| {
            finding(
                "daemon.listen",
                format!("{:?} is not an address like \"0.0.0.0:9187\"", raw.listen.0),
            )
        })?,
        api_token_file: cx.resolve(&raw.api_token_file.0),
        max_concurrent_backups: match raw.max_concurrent_backups {
            0 => {
                return Err(finding(
                    "daemon.max_concurrent_backups",
                    "must be at least 1",
                ))
            }
            n => n,
        },
        shutdown_grace: parse_duration(&raw.shutdown_grace.0)
            .map_err(|m| finding("daemon.shutdown_grace", m))?,
    })
}

fn pipeline(raw: RawPipeline) -> Result<PipelineConfig> {
    if !(1..=22).contains(&raw.zstd_level) {
        return Err(finding(
            "pipeline.zstd_level",
            format!("{} is outside 1..=22", raw.zstd_level),
        ));
    }
    Ok(PipelineConfig {
        zstd_level: raw.zstd_level,
        zstd_workers: raw.zstd_workers,
        min_targets: raw.min_targets,
        stall_timeout: parse_duration(&raw.stall_timeout.0)
            .map_err(|m| finding("pipeline.stall_timeout", m))?,
        orphan_grace: parse_duration(&raw.orphan_grace.0)
            .map_err(|m| finding("pipeline.orphan_grace", m))?,
    })
}

fn sources(raw: Vec<RawSource>, cx: &Ctx) -> Result<Vec<SourceConfig>> {
    if raw.is_empty() {
        return Err(finding("source", "at least one [[source]] is required"));
    }
    let mut names = Names::new("source");
    raw.into_iter()
        .enumerate()
        .map(|(i, s)| {
            names.add(i, &s.name.0)?;
            source(i, s, cx)
        })
        .collect()
}

fn source(i: usize, s: RawSource, cx: &Ctx) -> Result<SourceConfig> {
    let key = |k: &str| format!("source[{i}].{k}");
    let url = PgUrl::parse(&s.url.0).map_err(|m| finding(key("url"), m))?;
    url.tls.validate().map_err(|m| finding(key("url"), m))?;
    let globs = |v: &[Text], k: &str| -> Result<Vec<glob::Pattern>> {
        v.iter()
            .map(|p| {
                glob::Pattern::new(&p.0)
                    .map_err(|e| finding(key(k), format!("{:?} is not a valid glob ({e})", p.0)))
            })
            .collect()
    };
    let schedule =
        Schedule::parse(&s.schedule.0).map_err(|e| finding(key("schedule"), e.to_string()))?;
    Ok(SourceConfig {
        databases: globs(&s.databases, "databases")?,
        exclude: globs(&s.exclude, "exclude")?,
        name: s.name.0,
        url,
        schedule,
        retention: s.retention,
        pg_bin_dir: s.pg_bin_dir.map(|d| cx.resolve(&d.0)),
    })
}

fn targets(raw: Vec<RawTarget>, cx: &Ctx) -> Result<Vec<TargetConfig>> {
    if raw.is_empty() {
        return Err(finding("target", "at least one [[target]] is required"));
    }
    let mut names = Names::new("target");
    raw.into_iter()
        .enumerate()
        .map(|(i, t)| {
            names.add(i, &t.name.0)?;
            target(i, t, cx)
        })
        .collect()
}

fn target(i: usize, t: RawTarget, cx: &Ctx) -> Result<TargetConfig> {
    let key = |k: &str| format!("target[{i}].{k}");
    let url = url::Url::parse(&t.url.0).map_err(|e| {
        finding(
            key("url"),
            format!(
                "{:?} is not a URL like s3://bucket/prefix or file:///dir ({e})",
                t.url.0
            ),
        )
    })?;
    if !(1..=10_000).contains(&t.max_parts) {
        return Err(finding(
            key("max_parts"),
            format!("{} is outside 1..=10000", t.max_parts),
        ));
    }
    let (kind, prefix) = match url.scheme() {
        "s3" => s3_target(&key, &url, &t, cx)?,
        "file" => {
            for (present, k) in [
                (t.endpoint.is_some(), "endpoint"),
                (t.region.is_some(), "region"),
                (t.access_key_id.is_some(), "access_key_id"),
                (t.secret_access_key.is_some(), "secret_access_key"),
                (t.ca_file.is_some(), "ca_file"),
            ] {
                if present {
                    return Err(finding(key(k), "only applies to s3:// targets"));
                }
            }
            let root = url
                .to_file_path()
                .map_err(|_| finding(key("url"), "file:// URLs need an absolute path"))?;
            (TargetKind::File { root }, String::new())
        }
        other => {
            return Err(finding(
                key("url"),
                format!("scheme {other:?} is not supported; use s3:// or file://"),
            ))
        }
    };
    Ok(TargetConfig {
        name: t.name.0,
        url: t.url.0,
        kind,
        prefix,
        max_parts: t.max_parts,
    })
}

/// The S3 half of [`target`]: bucket, endpoint, CA file and credentials.
fn s3_target(
    key: &dyn Fn(&str) -> String,
    url: &url::Url,
    t: &RawTarget,
    cx: &Ctx,
) -> Result<(TargetKind, String)> {
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| finding(key("url"), "names no bucket: s3://bucket/prefix"))?
        .to_string();
    let endpoint = match &t.endpoint {
        Some(e) => {
            let parsed = url::Url::parse(&e.0).map_err(|err| {
                finding(key("endpoint"), format!("{:?} is not a URL ({err})", e.0))
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(finding(
                    key("endpoint"),
                    "must start with http:// or https://",
                ));
            }
            Some(e.0.clone())
        }
        None => None,
    };
    let ca_file = match &t.ca_file {
        Some(f) => {
            if endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
            {
                return Err(finding(
                    key("ca_file"),
                    "only applies to an https:// endpoint",
                ));
            }
            let path = cx.resolve(&f.0);
            crate::pgtls::load_certs(&path, "ca_file").map_err(|m| finding(key("ca_file"), m))?;
            Some(path)
        }
        None => None,
    };
    if t.access_key_id.is_some() != t.secret_access_key.is_some() {
        return Err(finding(
            key("secret_access_key"),
            "access_key_id and secret_access_key go together",
        ));
    }
    Ok((
        TargetKind::S3 {
            bucket,
            endpoint,
            region: t
                .region
                .as_ref()
                .map_or_else(|| "us-east-1".to_string(), |r| r.0.clone()),
            access_key_id: t.access_key_id.as_ref().map(|v| Secret::new(&v.0)),
            secret_access_key: t.secret_access_key.as_ref().map(|v| Secret::new(&v.0)),
            ca_file,
        },
        url.path().trim_matches('/').to_string(),
    ))
}

/// `min_targets` is checked against the targets once both sections are valid.
fn min_targets(pipeline: &PipelineConfig, targets: &[TargetConfig]) -> Result<()> {
    if pipeline.min_targets == 0 || pipeline.min_targets > targets.len() {
        return Err(finding(
            "pipeline.min_targets",
            format!(
                "{} must be between 1 and the number of targets ({})",
                pipeline.min_targets,
                targets.len()
            ),
        ));
    }
    Ok(())
}

fn restore_targets(raw: Vec<RawRestoreTarget>, cx: &Ctx) -> Result<Vec<RestoreTargetConfig>> {
    let mut namespaces = HashMap::new();
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            if namespaces.insert(r.namespace.0.clone(), i).is_some() {
                return Err(finding(
                    format!("restore_target[{i}].namespace"),
                    format!("duplicate namespace {:?}", r.namespace.0),
                ));
            }
            restore_target(i, r, cx)
        })
        .collect()
}

fn restore_target(i: usize, r: RawRestoreTarget, cx: &Ctx) -> Result<RestoreTargetConfig> {
    let key = |k: &str| format!("restore_target[{i}].{k}");
    let namespace_glob = glob::Pattern::new(&r.namespace.0)
        .map_err(|e| finding(key("namespace"), format!("not a valid glob ({e})")))?;
    let example = PgUrl::parse(&r.url.0.replace("{namespace}", "example"))
        .map_err(|m| finding(key("url"), m))?;
    // Certificate paths that depend on the namespace can only be checked at restore time.
    let other = PgUrl::parse(&r.url.0.replace("{namespace}", "other"))
        .map_err(|m| finding(key("url"), m))?;
    if example.tls == other.tls {
        example.tls.validate().map_err(|m| finding(key("url"), m))?;
    }
    if r.owner.0.is_empty() {
        return Err(finding(key("owner"), "must name a role"));
    }
    Ok(RestoreTargetConfig {
        namespace: r.namespace.0,
        namespace_glob,
        url: Secret::new(r.url.0),
        owner: r.owner.0,
        hooks: r.hooks.iter().map(|h| cx.resolve(&h.0)).collect(),
        pg_bin_dir: r.pg_bin_dir.map(|d| cx.resolve(&d.0)),
    })
}

fn verify(raw: RawVerify, cx: &Ctx) -> Result<VerifyConfig> {
    let url = PgUrl::parse(&raw.url.0).map_err(|m| finding("verify.url", m))?;
    url.tls.validate().map_err(|m| finding("verify.url", m))?;
    Ok(VerifyConfig {
        url,
        checks: raw.checks.into_iter().map(|c| c.0).collect(),
        schedule: raw
            .schedule
            .map(|s| Schedule::parse(&s.0))
            .transpose()
            .map_err(|e| finding("verify.schedule", e.to_string()))?,
        pg_bin_dir: raw.pg_bin_dir.map(|d| cx.resolve(&d.0)),
    })
}

/// Source and target names become object-key segments and metric labels: each is checked by
/// [`check_name`] and must be unique within its section.
struct Names {
    kind: &'static str,
    /// Name → index of the entry that has it.
    seen: HashMap<String, usize>,
}

impl Names {
    fn new(kind: &'static str) -> Self {
        Names {
            kind,
            seen: HashMap::new(),
        }
    }

    /// Checks the name of entry `i` and records it.
    fn add(&mut self, i: usize, name: &str) -> Result<()> {
        let key = format!("{}[{i}].name", self.kind);
        check_name(name).map_err(|m| finding(&key, m))?;
        if self.seen.insert(name.to_owned(), i).is_some() {
            return Err(finding(
                key,
                format!("duplicate {} name {name:?}", self.kind),
            ));
        }
        Ok(())
    }
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || name.starts_with('.')
    {
        return Err(format!(
            "{name:?} must be 1–64 characters of a-z, A-Z, 0-9, '-', '_', '.'"
        ));
    }
    Ok(())
}
