//! The rules single values must follow, with their bounds: names, durations, worker counts,
//! URL placeholders, hook files. Each bound is a named constant saying why; each check
//! returns a [`Finding`] naming the key, which [`super::validate`] propagates and the loader
//! turns into an error with the file and line.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::{parse_duration, redact_url, Text};

/// The shortest `pipeline.stall_timeout`. `"0s"` drops every target of every backup; below a
/// second, ordinary scheduling and network jitter would drop healthy targets. (The fault
/// tests use 3 s to see a stall quickly; production wants minutes, the default is 300 s.)
pub(super) const MIN_STALL_TIMEOUT: Duration = Duration::from_secs(1);

/// The shortest `daemon.shutdown_grace`. `"0s"` cancels every running backup the instant
/// SIGTERM arrives, so each deploy throws away the work of backups about to commit; a grace
/// of at least a second is a choice, where zero is most likely a slip.
pub(super) const MIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The most `pipeline.zstd_workers`. One pg_dump stream feeds the compressor, and zstd
/// buffers about (workers + 3) jobs of 2 MiB input plus one output buffer per worker
/// (`backup::pipeline`'s `ZSTD_JOB_SIZE`), so 32 workers already hold ~140 MiB per running
/// backup; `1000` would ask for ~4 GiB and a thousand threads per backup, on a host whose
/// cores also serve PostgreSQL. (benches/RESULTS.md: level 1 with 2 workers compresses
/// ~384 MB/s of raw dump on this 2-core machine.) zstd itself silently clamps at 200.
pub(super) const MAX_ZSTD_WORKERS: u32 = 32;

/// The placeholders a `[[restore_target]]` URL may hold: `{namespace}` is replaced by the
/// namespace given with `--to` (see [`super::RestoreTargetConfig::url_for`]). No other URL
/// has any.
pub(super) const RESTORE_URL_PLACEHOLDERS: &[&str] = &["{namespace}"];

/// Something wrong with one key: the dotted path of the key (`target[0].url`) and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Finding {
    pub(super) key: String,
    pub(super) message: String,
}

pub(super) type Result<T> = std::result::Result<T, Finding>;

pub(super) fn finding(key: impl Into<String>, message: impl Into<String>) -> Finding {
    Finding {
        key: key.into(),
        message: message.into(),
    }
}

/// A duration key that must be at least `min`, `why` saying what a smaller one would break.
pub(super) fn duration_at_least(
    key: &str,
    raw: &Text,
    min: Duration,
    why: &str,
) -> Result<Duration> {
    let d = parse_duration(&raw.0).map_err(|m| finding(key, m))?;
    if d < min {
        return Err(finding(
            key,
            format!(
                "{:?} is below the minimum of {}: {why}",
                raw.0,
                humantime::format_duration(min)
            ),
        ));
    }
    Ok(d)
}

/// A hook file, looked at when the config loads rather than after a whole dump was restored.
/// A directory is an error (it is never a hook). A missing or unreadable file is `Ok(Some)`,
/// a warning: the config may be checked away from where it runs (hooks ship in the image, at
/// paths a workstation does not have), and restore reads the file again when it runs it.
pub(super) fn hook(key: &str, path: &Path) -> Result<Option<String>> {
    let unreadable = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "hook file {} does not exist here (relative paths resolve against the config \
                 file's directory); a restore to this target would fail after loading the dump",
                path.display()
            )
        } else {
            format!(
                "hook file {} cannot be read ({e}); a restore to this target would fail after \
                 loading the dump",
                path.display()
            )
        }
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(finding(
            key,
            format!(
                "{} is a directory; list each SQL file to run, in order",
                path.display()
            ),
        )),
        Ok(_) => Ok(std::fs::File::open(path).err().map(unreadable)),
        Err(e) => Ok(Some(unreadable(e))),
    }
}

/// Source and target names become object-key segments and metric labels: each is checked by
/// [`check_name`] and must be unique within its section.
pub(super) struct Names {
    kind: &'static str,
    /// Name → index of the entry that has it.
    seen: HashMap<String, usize>,
}

impl Names {
    pub(super) fn new(kind: &'static str) -> Self {
        Names {
            kind,
            seen: HashMap::new(),
        }
    }

    /// Checks the name of entry `i` and records it.
    pub(super) fn add(&mut self, i: usize, name: &str) -> Result<()> {
        let key = format!("{}[{i}].name", self.kind);
        check_name(name).map_err(|m| finding(&key, m))?;
        if let Some(first) = self.seen.insert(name.to_owned(), i) {
            return Err(finding(
                key,
                format!(
                    "duplicate {} name {name:?}, already the name of {}[{first}]; names must \
                     be unique",
                    self.kind, self.kind
                ),
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
    {
        return Err(format!(
            "{name:?} must be 1–64 characters of a-z, A-Z, 0-9, '-', '_', '.'"
        ));
    }
    if name.starts_with('.') {
        // "." and ".." would be path segments of every object key.
        return Err(format!(
            "{name:?} must not start with '.'; start it with a letter or digit"
        ));
    }
    Ok(())
}

/// `{word}` placeholders in a URL, the password left out (it may hold any character).
fn placeholders(url: &str) -> Vec<String> {
    // The redacted URL may percent-encode braces (in a path): decode them back.
    let shown = redact_url(url)
        .replace("%7B", "{")
        .replace("%7b", "{")
        .replace("%7D", "}")
        .replace("%7d", "}");
    placeholders_in(&shown)
}

/// `{word}` placeholders in a plain text.
pub(super) fn placeholders_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        rest = &rest[open..];
        let Some(close) = rest.find('}') else { break };
        let inner = &rest[1..close];
        if !inner.is_empty() && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            found.push(rest[..=close].to_string());
        }
        rest = &rest[1..];
    }
    found
}

/// A URL with no `{placeholder}`: only `[[restore_target]]` URLs are templates.
pub(super) fn no_placeholders(key: &str, url: &str) -> Result<()> {
    match placeholders(url).first() {
        Some(p) => Err(finding(
            key,
            format!("{p} is not replaced here: only [[restore_target]] URLs have placeholders"),
        )),
        None => Ok(()),
    }
}

/// A URL template whose placeholders are all in `allowed` (a typo such as `{namepsace}` would
/// otherwise reach the server as a host name).
pub(super) fn placeholders_among(key: &str, url: &str, allowed: &[&str]) -> Result<()> {
    match placeholders(url)
        .into_iter()
        .find(|p| !allowed.contains(&p.as_str()))
    {
        Some(p) => Err(finding(
            key,
            format!(
                "unknown placeholder {p}; the only one is {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}
