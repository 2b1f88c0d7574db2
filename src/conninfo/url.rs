//! [`PgUrl`]: a connection string parsed once, for connecting, for the tools and for messages.

use std::fmt;
use std::str::FromStr;

use super::tls::PgTls;
use super::{ConnInfo, Lookup};

/// A PostgreSQL connection string, parsed, whose Display never shows the password.
///
/// Parsed once by [`super::ConnInfo`] (URL with any number of hosts, or key/value), with
/// `${VAR}` expanded into the part it was written in; the same parse gives tokio-postgres its
/// config, the tools their `PG*` environment, and the redacted form every message shows.
#[derive(Clone)]
pub struct PgUrl {
    info: ConnInfo,
    /// Everything but the TLS settings (tokio-postgres' `sslmode` is set from `tls`).
    pub parsed: tokio_postgres::Config,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, with libpq's meaning.
    pub tls: PgTls,
}

impl PgUrl {
    /// Parses a URL or key/value connection string, `${VAR}` from the environment. Pure
    /// otherwise: certificate files are checked by [`PgTls::validate`].
    pub fn parse(raw: &str) -> Result<PgUrl, String> {
        PgUrl::parse_with(raw, &|name| std::env::var(name).ok())
    }

    /// [`PgUrl::parse`] with `${VAR}` looked up by `lookup`.
    pub fn parse_with(raw: &str, lookup: Lookup<'_>) -> Result<PgUrl, String> {
        if let Some((scheme, _)) = raw.split_once("://") {
            let is_scheme = scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            if is_scheme && !matches!(scheme, "postgres" | "postgresql") {
                return Err(format!(
                    "unknown URL scheme {scheme}; use postgres:// or postgresql://"
                ));
            }
        }
        let info = ConnInfo::parse(raw, lookup).map_err(|e| e.to_string())?;
        let mut rest = info.clone();
        let ssl: Vec<(String, String)> = ["sslmode", "sslrootcert", "sslcert", "sslkey"]
            .into_iter()
            .filter_map(|k| rest.take(k).map(|v| (k.to_string(), v)))
            .collect();
        let tls = PgTls::from_pairs(ssl)?;
        let mut parsed = tokio_postgres::Config::from_str(&rest.to_key_values())
            .map_err(|e| format!("not a valid PostgreSQL connection string ({e})"))?;
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
        Ok(PgUrl { info, parsed, tls })
    }

    /// The parsed parameters (the password among them: never log them).
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    /// The connection string with every secret replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        self.info.redacted()
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

/// Any connection string with its secrets replaced, by structure (see [`super::redact`]):
/// a string that does not parse is not shown at all.
pub fn redact_url(raw: &str) -> String {
    super::redact(raw)
}
