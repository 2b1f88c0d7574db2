//! The configuration file: TOML → validated, typed values.
//!
//! Parsing happens in two steps (as garage's `util/config.rs` and ripgrep's low/high args do):
//! serde structs that mirror the file exactly (`deny_unknown_fields`, defaults in functions,
//! `${VAR}` expanded while deserializing so errors keep their line), then [`Config::validate`]
//! turns them into typed values (durations, cron schedules, globs, parsed URLs) and checks
//! what spans several entries (unique names, `min_targets`).
//!
//! This module owns secrets' redaction: [`Secret`] never prints its value, and
//! [`Config::redacted_toml`] is what `pgferry config check` shows. It does no I/O beyond
//! reading the file, the environment and the certificate files it names (so a missing CA is
//! a config error); connecting to anything is left to `source`/`target`.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::pgtls::PgTls;
use crate::schedule::Schedule;

/// Where the config is read from when neither `--config` nor `PGFERRY_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pgferry/pgferry.toml";

/// The S3 minimum for every part but the last; also our floor for the part size.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass --config PATH or set PGFERRY_CONFIG")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// A string that must never be printed: passwords, S3 secret keys, tokens.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for handing to a client library. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// A string value from the file with `${VAR}` expanded from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw, |name| std::env::var(name).ok())
            .map(Text)
            .map_err(serde::de::Error::custom)
    }
}

/// Expands `${NAME}` from `lookup`; `$$` is a literal `$`. A missing variable is an error.
pub fn expand_env(raw: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in {raw:?}"))?;
            let name = &body[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid environment variable name {name:?}"));
            }
            let value = lookup(name).ok_or_else(|| {
                format!("environment variable {name} is not set; set it or remove ${{{name}}}")
            })?;
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

mod raw;
#[cfg(test)]
mod tests;

pub use raw::RetentionPolicy;
use raw::*;

// ---------------------------------------------------------------------------------------------
// Validated values.
// ---------------------------------------------------------------------------------------------

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub pipeline: PipelineConfig,
    pub sources: Vec<SourceConfig>,
    pub targets: Vec<TargetConfig>,
    pub restore_targets: Vec<RestoreTargetConfig>,
    pub restore: RestoreConfig,
    pub verify: VerifyConfig,
    pub repair: RepairConfig,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub listen: SocketAddr,
    pub api_token_file: PathBuf,
    pub max_concurrent_backups: usize,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub zstd_level: i32,
    pub zstd_workers: u32,
    pub min_targets: usize,
    pub stall_timeout: Duration,
    /// How long a dump object or upload marker may sit without a manifest before `prune`
    /// treats it as left by a run that died (see `retention::orphan_dumps`).
    pub orphan_grace: Duration,
}

/// A PostgreSQL connection string, parsed, whose Display never shows the password.
#[derive(Clone)]
pub struct PgUrl {
    raw: Secret,
    /// Everything but the TLS settings (tokio-postgres' `sslmode` is set from `tls`).
    pub parsed: tokio_postgres::Config,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, with libpq's meaning.
    pub tls: PgTls,
}

impl PgUrl {
    /// Parses a URL or key/value connection string. Pure: certificate files are checked by
    /// [`PgTls::validate`].
    pub fn parse(raw: &str) -> Result<PgUrl, String> {
        let (rest, tls) = crate::pgtls::split_params(raw)?;
        let mut parsed = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| format!("not a valid PostgreSQL URL ({e})"))?;
        if parsed.get_hosts().is_empty() {
            return Err("the URL names no host".into());
        }
        // libpq never uses TLS over a Unix socket, whatever sslmode says.
        let only_sockets = parsed
            .get_hosts()
            .iter()
            .all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)));
        parsed.ssl_mode(if only_sockets {
            tokio_postgres::config::SslMode::Disable
        } else {
            tls.tokio_mode()
        });
        Ok(PgUrl {
            raw: Secret::new(raw),
            parsed,
            tls,
        })
    }

    /// The URL as written, for handing to a client; never log it.
    pub fn expose(&self) -> &str {
        self.raw.expose()
    }

    /// The URL with any password replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        redact_url(self.raw.expose())
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({})", self.redacted())
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of a `scheme://user:password@host` URL, and any `password=` key of a
/// key/value connection string, with `<redacted>`.
pub fn redact_url(raw: &str) -> String {
    if let Ok(mut url) = url::Url::parse(raw) {
        if url.password().is_some() {
            let _ = url.set_password(Some("<redacted>"));
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if pairs.iter().any(|(k, _)| k == "password") {
                redact_query(&mut url, &pairs);
            }
            return url.to_string().replacen("%3Credacted%3E", "<redacted>", 1);
        }
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if pairs.iter().any(|(k, _)| k == "password") {
            redact_query(&mut url, &pairs);
            return url.to_string();
        }
        return raw.to_string();
    }
    raw.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some(("password", _)) => "password=<redacted>".to_string(),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn redact_query(url: &mut url::Url, pairs: &[(String, String)]) {
    let mut q = url.query_pairs_mut();
    q.clear();
    for (k, v) in pairs {
        if k == "password" {
            q.append_pair(k, "<redacted>");
        } else {
            q.append_pair(k, v);
        }
    }
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub url: PgUrl,
    pub databases: Vec<glob::Pattern>,
    pub exclude: Vec<glob::Pattern>,
    pub schedule: Schedule,
    pub retention: RetentionPolicy,
    pub pg_bin_dir: Option<PathBuf>,
}

impl SourceConfig {
    /// Whether a database name is selected by `databases` and not by `exclude`.
    pub fn selects(&self, database: &str) -> bool {
        self.databases.iter().any(|p| p.matches(database))
            && !self.exclude.iter().any(|p| p.matches(database))
    }
}

#[derive(Debug, Clone)]
pub enum TargetKind {
    S3 {
        bucket: String,
        endpoint: Option<String>,
        region: String,
        access_key_id: Option<Secret>,
        secret_access_key: Option<Secret>,
        /// PEM CA certificates trusted for the endpoint, added to the system's roots.
        ca_file: Option<PathBuf>,
    },
    File {
        root: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    pub url: String,
    pub kind: TargetKind,
    /// Key prefix inside the bucket or directory (no leading or trailing `/`).
    pub prefix: String,
    pub max_parts: u32,
}

#[derive(Debug, Clone)]
pub struct RestoreTargetConfig {
    pub namespace: String,
    pub namespace_glob: glob::Pattern,
    /// URL template; `{namespace}` is replaced by the namespace given with `--to`.
    pub url: Secret,
    pub owner: String,
    pub hooks: Vec<PathBuf>,
    pub pg_bin_dir: Option<PathBuf>,
}

impl RestoreTargetConfig {
    /// The connection URL for one namespace this entry serves.
    pub fn url_for(&self, namespace: &str) -> Result<PgUrl, String> {
        PgUrl::parse(&self.url.expose().replace("{namespace}", namespace))
    }
}

#[derive(Debug, Clone)]
pub struct RestoreConfig {
    pub spool_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub url: PgUrl,
    pub checks: Vec<String>,
    pub schedule: Option<Schedule>,
    pub pg_bin_dir: Option<PathBuf>,
}

/// `[repair]`: when the daemon checks and repairs, and how long prune holds copies for it.
#[derive(Debug, Clone)]
pub struct RepairConfig {
    pub schedule: Schedule,
    /// See `retention::held_for_repair`.
    pub grace: Duration,
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_str_at(&text, path)
    }

    /// Parses and validates `text` as if read from `path` (relative paths resolve against its
    /// directory).
    pub fn from_str_at(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: scrub_toml_message(e.message()),
            }
        })?;
        validate(raw, path)
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The effective configuration as TOML, every secret replaced by `<redacted>`.
    pub fn redacted_toml(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        let list = |v: &[String]| {
            toml::Value::Array(v.iter().map(|x| toml::Value::String(x.clone())).collect())
                .to_string()
        };
        let d = &self.daemon;
        let _ = writeln!(s, "# effective configuration of {}", self.path.display());
        let _ = writeln!(s, "[daemon]");
        let _ = writeln!(s, "listen = {}", q(&d.listen.to_string()));
        let _ = writeln!(
            s,
            "api_token_file = {}",
            q(&d.api_token_file.display().to_string())
        );
        let _ = writeln!(s, "max_concurrent_backups = {}", d.max_concurrent_backups);
        let _ = writeln!(
            s,
            "shutdown_grace = {}",
            q(&format!("{}s", d.shutdown_grace.as_secs_f64()))
        );
        let p = &self.pipeline;
        let _ = writeln!(s, "\n[pipeline]");
        let _ = writeln!(s, "zstd_level = {}", p.zstd_level);
        let _ = writeln!(s, "zstd_workers = {}", p.zstd_workers);
        let _ = writeln!(s, "min_targets = {}", p.min_targets);
        let _ = writeln!(
            s,
            "stall_timeout = {}",
            q(&format!("{}s", p.stall_timeout.as_secs_f64()))
        );
        let _ = writeln!(
            s,
            "orphan_grace = {}",
            q(&format!("{}s", p.orphan_grace.as_secs_f64()))
        );
        for src in &self.sources {
            let pats = |v: &[glob::Pattern]| {
                list(&v.iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>())
            };
            let r = &src.retention;
            let _ = writeln!(s, "\n[[source]]");
            let _ = writeln!(s, "name = {}", q(&src.name));
            let _ = writeln!(s, "url = {}", q(&src.url.redacted()));
            let _ = writeln!(s, "databases = {}", pats(&src.databases));
            let _ = writeln!(s, "exclude = {}", pats(&src.exclude));
            let _ = writeln!(s, "schedule = {}", q(src.schedule.expr()));
            let _ = writeln!(
                s,
                "retention = {{ keep_last = {}, hourly = {}, daily = {}, weekly = {}, monthly = {} }}",
                r.keep_last, r.hourly, r.daily, r.weekly, r.monthly
            );
            if let Some(dir) = &src.pg_bin_dir {
                let _ = writeln!(s, "pg_bin_dir = {}", q(&dir.display().to_string()));
            }
        }
        for t in &self.targets {
            let _ = writeln!(s, "\n[[target]]");
            let _ = writeln!(s, "name = {}", q(&t.name));
            let _ = writeln!(s, "url = {}", q(&t.url));
            if let TargetKind::S3 {
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                ca_file,
                ..
            } = &t.kind
            {
                if let Some(e) = endpoint {
                    let _ = writeln!(s, "endpoint = {}", q(e));
                }
                if let Some(f) = ca_file {
                    let _ = writeln!(s, "ca_file = {}", q(&f.display().to_string()));
                }
                let _ = writeln!(s, "region = {}", q(region));
                if access_key_id.is_some() {
                    let _ = writeln!(s, "access_key_id = \"<redacted>\"");
                }
                if secret_access_key.is_some() {
                    let _ = writeln!(s, "secret_access_key = \"<redacted>\"");
                }
            }
            let _ = writeln!(s, "max_parts = {}", t.max_parts);
        }
        for r in &self.restore_targets {
            let _ = writeln!(s, "\n[[restore_target]]");
            let _ = writeln!(s, "namespace = {}", q(&r.namespace));
            let _ = writeln!(s, "url = {}", q(&redact_url(r.url.expose())));
            let _ = writeln!(s, "owner = {}", q(&r.owner));
            let hooks: Vec<String> = r.hooks.iter().map(|h| h.display().to_string()).collect();
            let _ = writeln!(s, "hooks = {}", list(&hooks));
        }
        let _ = writeln!(s, "\n[restore]");
        let _ = writeln!(
            s,
            "spool_dir = {}",
            q(&self.restore.spool_dir.display().to_string())
        );
        let v = &self.verify;
        let _ = writeln!(s, "\n[verify]");
        let _ = writeln!(s, "url = {}", q(&v.url.redacted()));
        let _ = writeln!(s, "checks = {}", list(&v.checks));
        if let Some(sched) = &v.schedule {
            let _ = writeln!(s, "schedule = {}", q(sched.expr()));
        }
        let _ = writeln!(s, "\n[repair]");
        let _ = writeln!(s, "schedule = {}", q(self.repair.schedule.expr()));
        let _ = writeln!(
            s,
            "grace = {}",
            q(&format!("{}s", self.repair.grace.as_secs_f64()))
        );
        s
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// toml's messages may quote the offending value ("invalid type: string \"…\""): a value may
/// be a secret written in the wrong place, so quoted strings are dropped.
fn scrub_toml_message(message: &str) -> String {
    let mut out = String::new();
    let mut in_quote = false;
    for c in message.chars() {
        match (c, in_quote) {
            ('"', false) => {
                in_quote = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                in_quote = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out.trim_end().to_string()
}

/// Parses `90s`, `5m`, `1h`, `250ms` (humantime syntax).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim())
        .map_err(|e| format!("{raw:?} is not a duration like \"60s\" or \"5m\" ({e})"))
}

fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        message,
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };

    let daemon = DaemonConfig {
        listen: raw.daemon.listen.0.parse().map_err(|_| {
            invalid(
                "daemon.listen".into(),
                format!(
                    "{:?} is not an address like \"0.0.0.0:9187\"",
                    raw.daemon.listen.0
                ),
            )
        })?,
        api_token_file: resolve(&raw.daemon.api_token_file.0),
        max_concurrent_backups: match raw.daemon.max_concurrent_backups {
            0 => {
                return Err(invalid(
                    "daemon.max_concurrent_backups".into(),
                    "must be at least 1".into(),
                ))
            }
            n => n,
        },
        shutdown_grace: parse_duration(&raw.daemon.shutdown_grace.0)
            .map_err(|m| invalid("daemon.shutdown_grace".into(), m))?,
    };

    if !(1..=22).contains(&raw.pipeline.zstd_level) {
        return Err(invalid(
            "pipeline.zstd_level".into(),
            format!("{} is outside 1..=22", raw.pipeline.zstd_level),
        ));
    }
    let pipeline = PipelineConfig {
        zstd_level: raw.pipeline.zstd_level,
        zstd_workers: raw.pipeline.zstd_workers,
        min_targets: raw.pipeline.min_targets,
        stall_timeout: parse_duration(&raw.pipeline.stall_timeout.0)
            .map_err(|m| invalid("pipeline.stall_timeout".into(), m))?,
        orphan_grace: parse_duration(&raw.pipeline.orphan_grace.0)
            .map_err(|m| invalid("pipeline.orphan_grace".into(), m))?,
    };

    if raw.source.is_empty() {
        return Err(invalid(
            "source".into(),
            "at least one [[source]] is required".into(),
        ));
    }
    let mut names = HashSet::new();
    let mut sources = Vec::new();
    for (i, s) in raw.source.into_iter().enumerate() {
        let key = |k: &str| format!("source[{i}].{k}");
        check_new_name(&mut names, &s.name.0, "source").map_err(|m| invalid(key("name"), m))?;
        let url = PgUrl::parse(&s.url.0).map_err(|m| invalid(key("url"), m))?;
        url.tls.validate().map_err(|m| invalid(key("url"), m))?;
        let globs = |v: &[Text], k: &str| -> Result<Vec<glob::Pattern>, ConfigError> {
            v.iter()
                .map(|p| {
                    glob::Pattern::new(&p.0).map_err(|e| {
                        invalid(key(k), format!("{:?} is not a valid glob ({e})", p.0))
                    })
                })
                .collect()
        };
        let schedule =
            Schedule::parse(&s.schedule.0).map_err(|e| invalid(key("schedule"), e.to_string()))?;
        sources.push(SourceConfig {
            databases: globs(&s.databases, "databases")?,
            exclude: globs(&s.exclude, "exclude")?,
            name: s.name.0,
            url,
            schedule,
            retention: s.retention,
            pg_bin_dir: s.pg_bin_dir.map(|d| resolve(&d.0)),
        });
    }

    if raw.target.is_empty() {
        return Err(invalid(
            "target".into(),
            "at least one [[target]] is required".into(),
        ));
    }
    let mut names = HashSet::new();
    let mut targets = Vec::new();
    for (i, t) in raw.target.into_iter().enumerate() {
        let key = |k: &str| format!("target[{i}].{k}");
        check_new_name(&mut names, &t.name.0, "target").map_err(|m| invalid(key("name"), m))?;
        let url = url::Url::parse(&t.url.0).map_err(|e| {
            invalid(
                key("url"),
                format!(
                    "{:?} is not a URL like s3://bucket/prefix or file:///dir ({e})",
                    t.url.0
                ),
            )
        })?;
        if !(1..=10_000).contains(&t.max_parts) {
            return Err(invalid(
                key("max_parts"),
                format!("{} is outside 1..=10000", t.max_parts),
            ));
        }
        let (kind, prefix) = match url.scheme() {
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| {
                        invalid(key("url"), "names no bucket: s3://bucket/prefix".into())
                    })?
                    .to_string();
                let endpoint = match t.endpoint {
                    Some(e) => {
                        let parsed = url::Url::parse(&e.0).map_err(|err| {
                            invalid(key("endpoint"), format!("{:?} is not a URL ({err})", e.0))
                        })?;
                        if !matches!(parsed.scheme(), "http" | "https") {
                            return Err(invalid(
                                key("endpoint"),
                                "must start with http:// or https://".into(),
                            ));
                        }
                        Some(e.0)
                    }
                    None => None,
                };
                let ca_file = match &t.ca_file {
                    Some(f) => {
                        if endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://"))
                        {
                            return Err(invalid(
                                key("ca_file"),
                                "only applies to an https:// endpoint".into(),
                            ));
                        }
                        let path = resolve(&f.0);
                        crate::pgtls::load_certs(&path, "ca_file")
                            .map_err(|m| invalid(key("ca_file"), m))?;
                        Some(path)
                    }
                    None => None,
                };
                if t.access_key_id.is_some() != t.secret_access_key.is_some() {
                    return Err(invalid(
                        key("secret_access_key"),
                        "access_key_id and secret_access_key go together".into(),
                    ));
                }
                (
                    TargetKind::S3 {
                        bucket,
                        endpoint,
                        region: t.region.map_or_else(|| "us-east-1".to_string(), |r| r.0),
                        access_key_id: t.access_key_id.map(|v| Secret(v.0)),
                        secret_access_key: t.secret_access_key.map(|v| Secret(v.0)),
                        ca_file,
                    },
                    url.path().trim_matches('/').to_string(),
                )
            }
            "file" => {
                for (present, k) in [
                    (t.endpoint.is_some(), "endpoint"),
                    (t.region.is_some(), "region"),
                    (t.access_key_id.is_some(), "access_key_id"),
                    (t.secret_access_key.is_some(), "secret_access_key"),
                    (t.ca_file.is_some(), "ca_file"),
                ] {
                    if present {
                        return Err(invalid(key(k), "only applies to s3:// targets".into()));
                    }
                }
                let root = url.to_file_path().map_err(|_| {
                    invalid(key("url"), "file:// URLs need an absolute path".into())
                })?;
                (TargetKind::File { root }, String::new())
            }
            other => {
                return Err(invalid(
                    key("url"),
                    format!("scheme {other:?} is not supported; use s3:// or file://"),
                ))
            }
        };
        targets.push(TargetConfig {
            name: t.name.0,
            url: t.url.0,
            kind,
            prefix,
            max_parts: t.max_parts,
        });
    }
    if pipeline.min_targets == 0 || pipeline.min_targets > targets.len() {
        return Err(invalid(
            "pipeline.min_targets".into(),
            format!(
                "{} must be between 1 and the number of targets ({})",
                pipeline.min_targets,
                targets.len()
            ),
        ));
    }

    let mut restore_targets = Vec::new();
    let mut namespaces = HashSet::new();
    for (i, r) in raw.restore_target.into_iter().enumerate() {
        let key = |k: &str| format!("restore_target[{i}].{k}");
        if !namespaces.insert(r.namespace.0.clone()) {
            return Err(invalid(
                key("namespace"),
                format!("duplicate namespace {:?}", r.namespace.0),
            ));
        }
        let namespace_glob = glob::Pattern::new(&r.namespace.0)
            .map_err(|e| invalid(key("namespace"), format!("not a valid glob ({e})")))?;
        let example = PgUrl::parse(&r.url.0.replace("{namespace}", "example"))
            .map_err(|m| invalid(key("url"), m))?;
        // Certificate paths that depend on the namespace can only be checked at restore time.
        let other = PgUrl::parse(&r.url.0.replace("{namespace}", "other"))
            .map_err(|m| invalid(key("url"), m))?;
        if example.tls == other.tls {
            example.tls.validate().map_err(|m| invalid(key("url"), m))?;
        }
        if r.owner.0.is_empty() {
            return Err(invalid(key("owner"), "must name a role".into()));
        }
        restore_targets.push(RestoreTargetConfig {
            namespace: r.namespace.0,
            namespace_glob,
            url: Secret(r.url.0),
            owner: r.owner.0,
            hooks: r.hooks.iter().map(|h| resolve(&h.0)).collect(),
            pg_bin_dir: r.pg_bin_dir.map(|d| resolve(&d.0)),
        });
    }

    let verify_url =
        PgUrl::parse(&raw.verify.url.0).map_err(|m| invalid("verify.url".into(), m))?;
    verify_url
        .tls
        .validate()
        .map_err(|m| invalid("verify.url".into(), m))?;
    let verify = VerifyConfig {
        url: verify_url,
        checks: raw.verify.checks.into_iter().map(|c| c.0).collect(),
        schedule: raw
            .verify
            .schedule
            .map(|s| Schedule::parse(&s.0))
            .transpose()
            .map_err(|e| invalid("verify.schedule".into(), e.to_string()))?,
        pg_bin_dir: raw.verify.pg_bin_dir.map(|d| resolve(&d.0)),
    };

    let repair = RepairConfig {
        schedule: Schedule::parse(&raw.repair.schedule.0)
            .map_err(|e| invalid("repair.schedule".into(), e.to_string()))?,
        grace: parse_duration(&raw.repair.grace.0)
            .map_err(|m| invalid("repair.grace".into(), m))?,
    };

    Ok(Config {
        path: path.to_path_buf(),
        daemon,
        pipeline,
        sources,
        targets,
        restore_targets,
        restore: RestoreConfig {
            spool_dir: resolve(&raw.restore.spool_dir.0),
        },
        verify,
        repair,
    })
}

/// Source and target names become object-key segments and metric labels: keep them plain.
/// A valid name (see [`check_name`]) that `seen` does not hold yet; then it does.
fn check_new_name(seen: &mut HashSet<String>, name: &str, kind: &str) -> Result<(), String> {
    check_name(name)?;
    if !seen.insert(name.to_owned()) {
        return Err(format!("duplicate {kind} name {name:?}"));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), String> {
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
