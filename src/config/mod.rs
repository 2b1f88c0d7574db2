//! The configuration file: TOML → validated, typed values.
//!
//! Parsing happens in two steps (as garage's `util/config.rs` and ripgrep's low/high args do):
//! serde structs that mirror the file exactly (`raw.rs`: `deny_unknown_fields`, defaults in
//! functions, `${VAR}` expanded while deserializing so errors keep their line), then
//! `validate.rs` turns them into typed values (durations, cron schedules, globs, parsed URLs),
//! one function per section, and checks what spans several entries (unique names,
//! `min_targets`); `rules.rs` holds the bounds and checks of single values. Errors and
//! warnings name the key, and `locate.rs` finds its line in the text.
//!
//! This module owns secrets' redaction: [`Secret`] never prints its value, and
//! [`Config::redacted_toml`] is what `pgferry config check` shows, serialized from the typed
//! values (`show.rs`). It does no I/O beyond reading the file, the environment and the files
//! it names (so a missing CA or hook is a config error); connecting to anything is left to
//! `source`/`target`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

pub use crate::conninfo::{redact_url, PgUrl};
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
    #[error("{}: {key}: {message}", at(path, *line))]
    Invalid {
        path: PathBuf,
        /// 1-based line of the key, or of the entry it belongs to when it took its default.
        line: Option<usize>,
        key: String,
        message: String,
    },
}

/// Something in a valid config that is probably not what the operator meant: printed by
/// `config check` and logged when any other command loads the config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {message}", at(path, *line))]
pub struct ConfigWarning {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

/// `file:line` for messages, or just `file` when the line is unknown.
fn at(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
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

/// A string value from the file kept as written: connection strings, whose `${VAR}` are
/// expanded only after parsing, into the part they were written in (see `conninfo`).
/// Its variables are checked while deserializing (a missing one is an error with its line),
/// but not substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawText(pub String);

impl<'de> Deserialize<'de> for RawText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw, |name| std::env::var(name).ok()).map_err(serde::de::Error::custom)?;
        Ok(RawText(raw))
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

pub mod hook_names;
mod locate;
mod locations;
mod ops;
mod raw;
mod rules;
mod show;
#[cfg(test)]
mod tests;
mod validate;

pub use locations::MIN_ORPHAN_GRACE;
pub use ops::{redact_http_url, NotifyConfig, S3Options, Sse};
use raw::RawConfig;
pub use raw::RetentionPolicy;

// ---------------------------------------------------------------------------------------------
// Validated values.
// ---------------------------------------------------------------------------------------------

/// The whole validated configuration. `Serialize` is `config check`'s output (see [`show`]):
/// field names are the file's keys, and a field that is not a key is `#[serde(skip)]` on
/// purpose.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    #[serde(skip)]
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub pipeline: PipelineConfig,
    #[serde(rename = "source")]
    pub sources: Vec<SourceConfig>,
    #[serde(rename = "target")]
    pub targets: Vec<TargetConfig>,
    #[serde(rename = "restore_target", skip_serializing_if = "Vec::is_empty")]
    pub restore_targets: Vec<RestoreTargetConfig>,
    pub restore: RestoreConfig,
    pub verify: VerifyConfig,
    /// What validation accepted but found suspicious (see [`ConfigWarning`]).
    #[serde(skip)]
    pub warnings: Vec<ConfigWarning>,
    pub notify: NotifyConfig,
    pub repair: RepairConfig,
    pub encryption: EncryptionConfig,
}

/// `[encryption]` (see `crate::encryption`): public keys only, but for the path of an
/// identity file, which is read only by restore and verify.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EncryptionConfig {
    /// Every recipient, from `recipients` and `recipients_file`; empty: backups are stored
    /// unencrypted.
    pub recipients: Vec<crate::encryption::Recipient>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DaemonConfig {
    pub listen: SocketAddr,
    pub api_token_file: PathBuf,
    /// When set, the read endpoints need `Authorization: Bearer` with this file's token (or
    /// the API token); `/metrics`, `/healthz` and `/readyz` stay open.
    pub read_token_file: Option<PathBuf>,
    pub max_concurrent_backups: usize,
    #[serde(serialize_with = "show::duration")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineConfig {
    pub zstd_level: i32,
    pub zstd_workers: u32,
    pub min_targets: usize,
    #[serde(serialize_with = "show::duration")]
    pub stall_timeout: Duration,
    /// How long a dump object or upload marker may sit without a manifest before `prune`
    /// treats it as left by a run that died (see `retention::orphan_dumps`).
    #[serde(serialize_with = "show::duration")]
    pub orphan_grace: Duration,
    /// pg_dump's `--lock-wait-timeout`.
    #[serde(serialize_with = "show::duration")]
    pub lock_wait_timeout: Duration,
    /// A pg_dump silent this long is killed.
    #[serde(serialize_with = "show::duration")]
    pub idle_timeout: Duration,
    /// Bytes the buffers of one backup's pipeline may hold.
    #[serde(serialize_with = "show::size")]
    pub memory_budget: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceConfig {
    pub name: String,
    pub url: PgUrl,
    #[serde(serialize_with = "show::globs")]
    pub databases: Vec<glob::Pattern>,
    #[serde(serialize_with = "show::globs")]
    pub exclude: Vec<glob::Pattern>,
    #[serde(serialize_with = "show::schedule")]
    pub schedule: Schedule,
    pub retention: RetentionPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_bin_dir: Option<PathBuf>,
    /// Dead-man's-switch URL (see `notify`).
    pub ping: Option<Secret>,
    /// Dumps of a slot start at a stable per-database offset in [0, spread) (see
    /// `daemon::scheduler::spread_offset`); always shorter than the schedule's shortest slot.
    #[serde(
        serialize_with = "show::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub spread: Option<Duration>,
    /// Companion files archived with each dump (see `crate::files`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<crate::files::FilesTemplate>,
}

impl SourceConfig {
    /// Whether a database name is selected by `databases` and not by `exclude`.
    pub fn selects(&self, database: &str) -> bool {
        self.databases.iter().any(|p| p.matches(database))
            && !self.exclude.iter().any(|p| p.matches(database))
    }
}

/// The kind-specific keys of a target (`bucket` and `root` are derived from its URL).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TargetKind {
    S3 {
        #[serde(skip)]
        bucket: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        region: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        access_key_id: Option<Secret>,
        #[serde(skip_serializing_if = "Option::is_none")]
        secret_access_key: Option<Secret>,
        /// PEM CA certificates trusted for the endpoint, added to the system's roots.
        #[serde(skip_serializing_if = "Option::is_none")]
        ca_file: Option<PathBuf>,
        #[serde(flatten)]
        options: S3Options,
    },
    File {
        #[serde(skip)]
        root: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetConfig {
    pub name: String,
    #[serde(serialize_with = "show::target_url")]
    pub url: String,
    #[serde(flatten)]
    pub kind: TargetKind,
    /// Key prefix inside the bucket or directory (no leading or trailing `/`): from `url`.
    #[serde(skip)]
    pub prefix: String,
    pub max_parts: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreTargetConfig {
    pub namespace: String,
    /// `namespace` compiled.
    #[serde(skip)]
    pub namespace_glob: glob::Pattern,
    /// URL template; `{namespace}` is replaced by the namespace given with `--to`.
    #[serde(serialize_with = "show::url_template")]
    pub url: Secret,
    pub owner: String,
    pub hooks: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_bin_dir: Option<PathBuf>,
    /// Identity file for encrypted snapshots (the path; the file is read at restore time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
    /// Hook variables (`:'base_url'`), values still holding `{namespace}` and `{database}`
    /// (see `restore::hookvars`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub variables: std::collections::BTreeMap<String, String>,
    /// Where a restore puts the snapshot's companion files (see `crate::files`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<crate::files::FilesTemplate>,
}

impl RestoreTargetConfig {
    /// The connection URL for one namespace this entry serves.
    pub fn url_for(&self, namespace: &str) -> Result<PgUrl, String> {
        PgUrl::parse(&self.url.expose().replace("{namespace}", namespace))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreConfig {
    pub spool_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyConfig {
    pub url: PgUrl,
    pub checks: Vec<String>,
    #[serde(
        serialize_with = "show::opt_schedule",
        skip_serializing_if = "Option::is_none"
    )]
    pub schedule: Option<Schedule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_bin_dir: Option<PathBuf>,
    /// Databases verified at once.
    pub concurrency: usize,
    /// No database is started after this long into a run; `None`: no limit.
    #[serde(
        serialize_with = "show::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub window: Option<Duration>,
    /// Older newest verify report (or none): overdue (`pgferry_verify_overdue_databases`).
    #[serde(serialize_with = "show::duration")]
    pub max_age: Duration,
    /// Identity file for encrypted snapshots (the path; the file is read at verify time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
}

/// `[repair]`: when the daemon checks and repairs, and how long prune holds copies for it.
#[derive(Debug, Clone, Serialize)]
pub struct RepairConfig {
    #[serde(serialize_with = "show::schedule")]
    pub schedule: Schedule,
    /// See `retention::held_for_repair`.
    #[serde(serialize_with = "show::duration")]
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
        let (mut config, warnings) =
            validate::validate(raw, path).map_err(|f| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: locate::line_of(text, &f.key),
                key: f.key,
                message: f.message,
            })?;
        config.warnings = warnings
            .into_iter()
            .map(|f| ConfigWarning {
                path: path.to_path_buf(),
                line: locate::line_of(text, &f.key),
                key: f.key,
                message: f.message,
            })
            .collect();
        Ok(config)
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The identity file restore uses for `target`: its own, else `[encryption]`'s.
    pub fn restore_identity_file<'a>(
        &'a self,
        target: &'a RestoreTargetConfig,
    ) -> Option<&'a Path> {
        target
            .identity_file
            .as_deref()
            .or(self.encryption.identity_file.as_deref())
    }

    /// The identity file verify uses: `[verify]`'s, else `[encryption]`'s.
    pub fn verify_identity_file(&self) -> Option<&Path> {
        self.verify
            .identity_file
            .as_deref()
            .or(self.encryption.identity_file.as_deref())
    }

    /// The effective configuration as TOML, every secret replaced by `<redacted>`: what
    /// `pgferry config check` prints (see [`show`]).
    pub fn redacted_toml(&self) -> String {
        show::render(self)
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

/// The smallest `pipeline.memory_budget`: the raw buffers (4 MiB), zstd's (14 MiB with two
/// workers), the rest (20 MiB, see `backup::pipeline`) and one part of the smallest size
/// (10 MiB). Measured: a backup with one 10 MiB part alive peaks 38 MiB above a tiny one.
pub const MIN_MEMORY_BUDGET: u64 = 48 * 1024 * 1024;

/// A duration above zero (a zero timeout would fail every run at once).
pub(crate) fn positive_duration(raw: &str) -> Result<Duration, String> {
    let d = parse_duration(raw)?;
    if d.is_zero() {
        return Err(format!("{raw:?} must be more than zero"));
    }
    Ok(d)
}

/// Parses a byte size: `67108864`, `64MiB`, `64MB` (both binary), `1GiB`, `512KiB`.
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let t = raw.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{raw:?} is not a size like \"64MiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{raw:?} is not a size like \"64MiB\"")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{raw:?} is too large"))
}

/// Parses `90s`, `5m`, `1h`, `250ms` (humantime syntax).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim())
        .map_err(|e| format!("{raw:?} is not a duration like \"60s\" or \"5m\" ({e})"))
}
