//! Raw file structs → typed [`Config`], one function per section (daemon, pipeline, source,
//! target, restore_target, verify), then the checks that span sections (`min_targets`).
//!
//! Each check fails with a [`Finding`] naming the key (`source[1].name`), or records one as a
//! warning when the config is valid but probably not what was meant; the caller adds the file
//! and line. Pure but for the files a section names (CA certificates, hooks), which are looked
//! at so that a missing one is a config error rather than a failure at 3 a.m.
//!
//! The bounds that catch operator mistakes the types let through (`stall_timeout = "0s"`,
//! `zstd_workers = 1000`) live in `rules.rs`, each a named constant with its reason.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::*;
use super::rules::{
    duration_at_least, finding, hook, no_placeholders, placeholders_among, placeholders_in,
    Finding, Names, Result, MAX_ZSTD_WORKERS, MIN_SHUTDOWN_GRACE, MIN_STALL_TIMEOUT,
    RESTORE_URL_PLACEHOLDERS,
};
use super::{
    parse_duration, Config, DaemonConfig, EncryptionConfig, PgUrl, PipelineConfig, RestoreConfig,
    RestoreTargetConfig, RetentionPolicy, Secret, SourceConfig, TargetConfig, TargetKind, Text,
    VerifyConfig,
};
use crate::encryption::Recipient;
use crate::files::FilesTemplate;
use crate::schedule::Schedule;

/// What validation needs besides the raw values: where relative paths resolve, and where
/// warnings go.
struct Ctx<'a> {
    base: &'a Path,
    warnings: Vec<Finding>,
}

impl Ctx<'_> {
    fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(finding(key, message));
    }

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

/// Validates every section of `raw`, read from `path`: the typed config and the warnings.
pub(super) fn validate(raw: RawConfig, path: &Path) -> Result<(Config, Vec<Finding>)> {
    let mut cx = Ctx {
        base: path.parent().unwrap_or(Path::new(".")),
        warnings: Vec::new(),
    };
    let daemon = daemon(raw.daemon, &cx)?;
    let pipeline = pipeline(raw.pipeline)?;
    let sources = sources(raw.source, &mut cx)?;
    let targets = targets(raw.target, &cx)?;
    min_targets(&pipeline, &targets)?;
    super::locations::check_target_overlap(&targets)
        .map_err(|(i, m)| finding(format!("target[{i}].url"), m))?;
    let restore_targets = restore_targets(raw.restore_target, &mut cx)?;
    let verify = verify(raw.verify, &cx)?;
    let encryption = encryption(raw.encryption, &mut cx)?;
    let config = Config {
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
        notify: super::ops::notify(raw.notify).map_err(|(k, m)| finding(k, m))?,
        repair: super::RepairConfig {
            schedule: crate::schedule::Schedule::parse(&raw.repair.schedule.0)
                .map_err(|e| finding("repair.schedule", e.to_string()))?,
            grace: parse_duration(&raw.repair.grace.0).map_err(|m| finding("repair.grace", m))?,
        },
        encryption,
        warnings: Vec::new(),
    };
    Ok((config, cx.warnings))
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
        read_token_file: raw.read_token_file.map(|f| cx.resolve(&f.0)),
        max_concurrent_backups: match raw.max_concurrent_backups {
            0 => {
                return Err(finding(
                    "daemon.max_concurrent_backups",
                    "must be at least 1",
                ))
            }
            n => n,
        },
        shutdown_grace: duration_at_least(
            "daemon.shutdown_grace",
            &raw.shutdown_grace,
            MIN_SHUTDOWN_GRACE,
            "running backups need a moment to finish or roll back on SIGTERM",
        )?,
    })
}

fn pipeline(raw: RawPipeline) -> Result<PipelineConfig> {
    if !(1..=22).contains(&raw.zstd_level) {
        return Err(finding(
            "pipeline.zstd_level",
            format!("{} is outside 1..=22", raw.zstd_level),
        ));
    }
    if raw.zstd_workers > MAX_ZSTD_WORKERS {
        return Err(finding(
            "pipeline.zstd_workers",
            format!(
                "{} is more than {MAX_ZSTD_WORKERS}: zstd buffers about 4 MiB per worker for \
                 each backup, and threads beyond the cores only compete with PostgreSQL; use 0 \
                 (one per core, at most 4) or a number up to {MAX_ZSTD_WORKERS}",
                raw.zstd_workers
            ),
        ));
    }
    Ok(PipelineConfig {
        zstd_level: raw.zstd_level,
        zstd_workers: raw.zstd_workers,
        min_targets: raw.min_targets,
        stall_timeout: duration_at_least(
            "pipeline.stall_timeout",
            &raw.stall_timeout,
            MIN_STALL_TIMEOUT,
            "a healthy but briefly slow target would be dropped from the snapshot",
        )?,
        orphan_grace: parse_duration(&raw.orphan_grace.0)
            .and_then(|g| super::locations::check_orphan_grace(g).map(|()| g))
            .map_err(|m| finding("pipeline.orphan_grace", m))?,
        lock_wait_timeout: super::positive_duration(&raw.lock_wait_timeout.0)
            .map_err(|m| finding("pipeline.lock_wait_timeout", m))?,
        idle_timeout: super::positive_duration(&raw.idle_timeout.0)
            .map_err(|m| finding("pipeline.idle_timeout", m))?,
        memory_budget: super::parse_size(&raw.memory_budget.0)
            .and_then(|b| {
                if b < super::MIN_MEMORY_BUDGET {
                    Err(format!(
                        "{b} bytes is below the minimum of {} MiB (a few parts and raw buffers)",
                        super::MIN_MEMORY_BUDGET >> 20
                    ))
                } else {
                    Ok(b)
                }
            })
            .map_err(|m| finding("pipeline.memory_budget", m))?,
    })
}

fn sources(raw: Vec<RawSource>, cx: &mut Ctx) -> Result<Vec<SourceConfig>> {
    if raw.is_empty() {
        return Err(finding("source", "at least one [[source]] is required"));
    }
    let mut names = Names::new("source");
    let mut sources = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        names.add(i, &s.name.0)?;
        sources.push(source(i, s, cx)?);
    }
    Ok(sources)
}

fn source(i: usize, s: RawSource, cx: &mut Ctx) -> Result<SourceConfig> {
    let key = |k: &str| format!("source[{i}].{k}");
    no_placeholders(&key("url"), &s.url.0)?;
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
    if s.databases.is_empty() {
        return Err(finding(
            key("databases"),
            "selects no database; list names or globs, or leave it out for [\"*\"] (all)",
        ));
    }
    let databases = globs(&s.databases, "databases")?;
    let exclude = globs(&s.exclude, "exclude")?;
    for (j, name) in databases.iter().enumerate() {
        let literal = !name.as_str().contains(['*', '?', '[']);
        if let Some(by) = exclude.iter().find(|x| literal && x.matches(name.as_str())) {
            cx.warn(
                format!("source[{i}].databases[{j}]"),
                format!(
                    "{:?} is also excluded by {:?}, so it is never backed up; remove it from \
                     one of databases and exclude",
                    name.as_str(),
                    by.as_str()
                ),
            );
        }
    }
    Ok(SourceConfig {
        databases,
        exclude,
        retention: retention(&key("retention"), s.retention, cx),
        name: s.name.0,
        url,
        pg_bin_dir: s.pg_bin_dir.map(|d| cx.resolve(&d.0)),
        ping: super::ops::ping(s.ping).map_err(|m| finding(key("ping"), m))?,
        spread: s
            .spread
            .map(|raw| spread(&raw.0, &schedule))
            .transpose()
            .map_err(|m| finding(key("spread"), m))?,
        schedule,
        files: s
            .files
            .map(|raw| FilesTemplate::parse(&cx.resolve(&raw.0)))
            .transpose()
            .map_err(|m| finding(key("files"), m))?,
    })
}

/// `[[source]] spread`: at least a second, and shorter than the schedule's shortest slot, so
/// that every database of a slot starts inside it (the snapshot id is the slot's start).
fn spread(raw: &str, schedule: &Schedule) -> std::result::Result<Duration, String> {
    let d = parse_duration(raw)?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{raw:?} is shorter than a second; leave spread out to start every dump at the slot's start"
        ));
    }
    if let Some(slot) = schedule.shortest_slot() {
        if d >= slot {
            return Err(format!(
                "{raw:?} is not shorter than the schedule's slot ({} for \"{}\"); the dumps of \
                 a slot must all start inside it: use a spread under {}",
                humantime::format_duration(slot),
                schedule.expr(),
                humantime::format_duration(slot),
            ));
        }
    }
    Ok(d)
}

/// A source's retention: the keys given, the defaults for the rest. A partial table is
/// legal but easy to misread (`{ keep_last = 2 }` still keeps 48 hourly snapshots and more),
/// so the defaults it falls back on are named in a warning.
fn retention(key: &str, raw: Option<RawRetention>, cx: &mut Ctx) -> RetentionPolicy {
    let d = RetentionPolicy::default();
    let Some(r) = raw else {
        return d;
    };
    let mut defaulted = Vec::new();
    let mut pick = |given: Option<u32>, name: &str, default: u32| {
        given.unwrap_or_else(|| {
            defaulted.push(format!("{name} = {default}"));
            default
        })
    };
    let policy = RetentionPolicy {
        keep_last: pick(r.keep_last, "keep_last", d.keep_last),
        hourly: pick(r.hourly, "hourly", d.hourly),
        daily: pick(r.daily, "daily", d.daily),
        weekly: pick(r.weekly, "weekly", d.weekly),
        monthly: pick(r.monthly, "monthly", d.monthly),
    };
    if !defaulted.is_empty() {
        cx.warn(
            key,
            format!(
                "keys left out take their defaults: {}; set them (0 keeps none) if that is not \
                 what you want",
                defaulted.join(", ")
            ),
        );
    }
    policy
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
    no_placeholders(&key("url"), &t.url.0)?;
    let url = url::Url::parse(&t.url.0).map_err(|e| {
        finding(
            key("url"),
            format!(
                "{:?} is not a URL like s3://bucket/prefix or file:///dir ({e})",
                t.url.0
            ),
        )
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(finding(
            key("url"),
            "a target URL carries no credentials; set access_key_id and secret_access_key",
        ));
    }
    if !(1..=10_000).contains(&t.max_parts) {
        return Err(finding(
            key("max_parts"),
            format!("{} is outside 1..=10000", t.max_parts),
        ));
    }
    let (kind, prefix) = match url.scheme() {
        "s3" => s3_target(&key, &url, &t, cx)?,
        "file" => {
            if let Some(k) = super::ops::s3_only_keys(&t) {
                return Err(finding(key(k), "only applies to s3:// targets"));
            }
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
            // `file:relative` and `file:/dir` parse as /relative and /dir: only the written
            // form says whether the operator meant that.
            if !t
                .url
                .0
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("file:///"))
            {
                return Err(finding(
                    key("url"),
                    format!(
                        "{:?} is not written as an absolute file URL (it would mean {}); write \
                         file:///absolute/dir, with three slashes",
                        t.url.0,
                        root.display()
                    ),
                ));
            }
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
            crate::conninfo::tls::load_certs(&path, "ca_file")
                .map_err(|m| finding(key("ca_file"), m))?;
            Some(path)
        }
        None => None,
    };
    let options = super::ops::s3_options(t).map_err(|(k, m)| finding(key(k), m))?;
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
            options,
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

fn restore_targets(raw: Vec<RawRestoreTarget>, cx: &mut Ctx) -> Result<Vec<RestoreTargetConfig>> {
    let mut namespaces = HashMap::new();
    let mut targets = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        if let Some(first) = namespaces.insert(r.namespace.0.clone(), i) {
            return Err(finding(
                format!("restore_target[{i}].namespace"),
                format!(
                    "duplicate namespace {:?}, already that of restore_target[{first}]",
                    r.namespace.0
                ),
            ));
        }
        targets.push(restore_target(i, r, cx)?);
    }
    Ok(targets)
}

fn restore_target(i: usize, r: RawRestoreTarget, cx: &mut Ctx) -> Result<RestoreTargetConfig> {
    let key = |k: &str| format!("restore_target[{i}].{k}");
    placeholders_among(&key("url"), &r.url.0, RESTORE_URL_PLACEHOLDERS)?;
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
    let mut hooks = Vec::with_capacity(r.hooks.len());
    for (j, h) in r.hooks.iter().enumerate() {
        let key = format!("restore_target[{i}].hooks[{j}]");
        let path = cx.resolve(&h.0);
        if let Some(problem) = hook(&key, &path)? {
            cx.warn(key, problem);
        }
        hooks.push(path);
    }
    let variables = hook_variables(i, r.variables)?;
    Ok(RestoreTargetConfig {
        namespace: r.namespace.0,
        namespace_glob,
        url: Secret::new(r.url.0),
        owner: r.owner.0,
        hooks,
        pg_bin_dir: r.pg_bin_dir.map(|d| cx.resolve(&d.0)),
        identity_file: r.identity_file.map(|f| cx.resolve(&f.0)),
        variables,
        files: r
            .files
            .map(|raw| FilesTemplate::parse(&cx.resolve(&raw.0)))
            .transpose()
            .map_err(|m| finding(key("files"), m))?,
    })
}

/// `[[restore_target]] variables`: identifier names that are not pgferry's own, values whose
/// only placeholders are `{namespace}` and `{database}`.
fn hook_variables(
    i: usize,
    raw: std::collections::BTreeMap<String, Text>,
) -> Result<std::collections::BTreeMap<String, String>> {
    use super::hook_names as hookvars;
    let mut out = std::collections::BTreeMap::new();
    for (name, value) in raw {
        let key = format!("restore_target[{i}].variables.{name}");
        if hookvars::BUILTIN.contains(&name.as_str()) {
            return Err(finding(
                key,
                format!(
                    "{name:?} is set by pgferry itself (as are {}); choose another name",
                    hookvars::BUILTIN.join(", ")
                ),
            ));
        }
        if !hookvars::valid_name(&name) {
            return Err(finding(
                key,
                format!(
                    "{name:?} is not a variable name: use letters, digits and '_', not starting \
                     with a digit, at most {} bytes",
                    hookvars::MAX_NAME_BYTES
                ),
            ));
        }
        if let Some(p) = placeholders_in(&value.0)
            .into_iter()
            .find(|p| !hookvars::VALUE_PLACEHOLDERS.contains(&p.as_str()))
        {
            return Err(finding(
                key,
                format!(
                    "unknown placeholder {p}; the placeholders are {}",
                    hookvars::VALUE_PLACEHOLDERS.join(" and ")
                ),
            ));
        }
        if value.0.contains('\0') {
            return Err(finding(key, "holds a NUL character, which SQL text cannot"));
        }
        out.insert(name, value.0);
    }
    Ok(out)
}

fn verify(raw: RawVerify, cx: &Ctx) -> Result<VerifyConfig> {
    no_placeholders("verify.url", &raw.url.0)?;
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
        concurrency: match raw.concurrency {
            0 => return Err(finding("verify.concurrency", "must be at least 1")),
            n => n,
        },
        window: raw
            .window
            .map(|w| match parse_duration(&w.0)? {
                d if d.is_zero() => Err(format!(
                    "{:?} would start no verify at all; leave window out for no limit",
                    w.0
                )),
                d => Ok(d),
            })
            .transpose()
            .map_err(|m| finding("verify.window", m))?,
        max_age: parse_duration(&raw.max_age.0).map_err(|m| finding("verify.max_age", m))?,
        identity_file: raw.identity_file.map(|f| cx.resolve(&f.0)),
    })
}

/// `[encryption]`: every recipient parsed (a bad one names its entry, or its line in the
/// recipients file). The recipients file must be readable here: a backup must never find out
/// at 3 a.m. that it cannot encrypt. The identity file is only named, never read: production
/// has none, and restore and verify read it when they need it.
fn encryption(raw: RawEncryption, cx: &mut Ctx) -> Result<EncryptionConfig> {
    let mut recipients = Vec::new();
    for (i, r) in raw.recipients.iter().enumerate() {
        recipients.push(
            Recipient::parse(&r.0)
                .map_err(|m| finding(format!("encryption.recipients[{i}]"), m))?,
        );
    }
    let recipients_file = raw.recipients_file.map(|f| cx.resolve(&f.0));
    if let Some(file) = &recipients_file {
        let key = "encryption.recipients_file";
        let text = std::fs::read_to_string(file).map_err(|e| {
            finding(
                key,
                format!("cannot read recipients file {}: {e}", file.display()),
            )
        })?;
        let listed = crate::encryption::parse_recipients(&text)
            .map_err(|(line, m)| finding(key, format!("{}:{line}: {m}", file.display())))?;
        if listed.is_empty() {
            return Err(finding(
                key,
                format!(
                    "{} lists no recipient; add one \"age1…\" per line, or remove the key",
                    file.display()
                ),
            ));
        }
        recipients.extend(listed);
    }
    let mut seen = std::collections::HashSet::new();
    recipients.retain(|r| seen.insert(r.clone()));
    let identity_file = raw.identity_file.map(|f| cx.resolve(&f.0));
    if identity_file.is_some() && recipients.is_empty() {
        cx.warn(
            "encryption.identity_file",
            "an identity file but no recipients: encrypted snapshots can be restored, but new \
             backups are stored unencrypted",
        );
    }
    Ok(EncryptionConfig {
        recipients,
        recipients_file,
        identity_file,
    })
}
