//! What `pgferry config check` prints: the effective configuration as TOML, derived from the
//! typed [`Config`] by its `Serialize` impls, so a key added to a typed struct is shown
//! without anyone remembering to add it here.
//!
//! Redaction is by type, not by pattern: a [`Secret`] serializes as `<redacted>` wherever it
//! sits, a [`PgUrl`] as [`PgUrl::redacted`], a target URL without any user or password, and a
//! restore URL template through [`redact_url`]. The helpers below are the `serialize_with`
//! functions of the values TOML has no type for (durations, globs, schedules).

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::{redact_url, Config, PgUrl, Secret};
use crate::schedule::Schedule;

/// What every secret value prints as.
pub(super) const REDACTED: &str = "<redacted>";

/// The effective configuration as TOML, every secret replaced by `<redacted>`.
pub(super) fn render(config: &Config) -> String {
    let header = format!("# effective configuration of {}\n", config.path.display());
    match toml::to_string(config) {
        Ok(body) => header + &body,
        // Every value above is a string, integer or table of them: this cannot happen, and
        // if it did the operator still gets a message rather than a panic.
        Err(e) => format!("{header}# cannot render the configuration: {e}\n"),
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl Serialize for PgUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// A duration in the config's own syntax, `300s`.
pub(super) fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs_f64()))
}

pub(super) fn opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => duration(d, s),
        None => s.serialize_none(),
    }
}

/// A byte count as `parse_size` reads it back: whole MiB where it is one, bytes otherwise.
pub(super) fn size<S: Serializer>(b: &u64, s: S) -> Result<S::Ok, S::Error> {
    if b % (1 << 20) == 0 {
        s.serialize_str(&format!("{}MiB", b >> 20))
    } else {
        s.serialize_str(&format!("{b}B"))
    }
}

pub(super) fn globs<S: Serializer>(v: &[glob::Pattern], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(glob::Pattern::as_str))
}

pub(super) fn schedule<S: Serializer>(v: &Schedule, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.expr())
}

pub(super) fn opt_schedule<S: Serializer>(v: &Option<Schedule>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => schedule(v, s),
        None => s.serialize_none(),
    }
}

/// A target URL without user or password (validation refuses them, but a URL that carried
/// one must still not be printed).
pub(super) fn target_url<S: Serializer>(raw: &str, s: S) -> Result<S::Ok, S::Error> {
    match url::Url::parse(raw) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            s.serialize_str(url.as_str())
        }
        Ok(_) => s.serialize_str(raw),
        Err(_) => s.serialize_str(REDACTED),
    }
}

/// A restore URL template (`{namespace}` kept) with its password redacted.
pub(super) fn url_template<S: Serializer>(v: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(v.expose()))
}
