//! TLS to PostgreSQL: libpq's `sslmode` family of URL parameters, and the rustls connector
//! every connection of pgferry goes through (`source::connect`).
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and no certificate files, so
//! `conninfo` takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of a
//! connection string ([`PgTls::from_pairs`]) before the rest is handed to
//! `tokio_postgres::Config`. [`PgTls`] keeps them: the
//! connector is built from it ([`PgTls::connector`]), and pg_dump/pg_restore receive the same
//! settings as `PGSSL*` variables ([`PgTls::libpq_env`]), so the tools and our own connections
//! agree on what is verified.
//!
//! The semantics are libpq's: `disable` never encrypts; `allow` and `prefer` (the default)
//! encrypt when the server offers it; `require` insists on encryption without verifying the
//! certificate, unless `sslrootcert` is given, when it verifies the chain like `verify-ca`;
//! `verify-ca` checks the chain against `sslrootcert`; `verify-full` also checks that the
//! certificate names the host of the URL. Unlike libpq, pgferry does not look for
//! `~/.postgresql/root.crt`: the CA is named with `sslrootcert`, and `verify-*` without it is a
//! configuration error. This module reads certificate files; it opens no socket (tokio-postgres
//! does, and hands the stream to the connector for the handshake).

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

mod connector;
pub use connector::{MakeRustls, RustlsConnect, RustlsStream};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // A typo of a mode is echoed; anything else (it may be a misplaced secret) is not.
            other => {
                let looks_like_a_mode = other.len() <= 16
                    && other
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'-' || b == b'_');
                let shown = if looks_like_a_mode {
                    format!("={other:?}")
                } else {
                    String::new()
                };
                return Err(format!(
                    "sslmode{shown} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS settings of one connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    /// PEM file of the CA certificate(s) the server's chain must lead to.
    pub root_cert: Option<PathBuf>,
    /// PEM client certificate and its key, for `clientcert` authentication.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// What the connector checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Encryption only (libpq's `require` without a CA).
    Nothing,
    /// The chain leads to `sslrootcert`.
    Chain,
    /// The chain, and the host name.
    ChainAndName,
}

impl PgTls {
    /// The tokio-postgres mode: it only decides whether TLS is tried and whether it is a must.
    pub fn tokio_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    fn check(&self) -> Check {
        match (self.mode, &self.root_cert) {
            (SslMode::VerifyFull, _) => Check::ChainAndName,
            (SslMode::VerifyCa, _) | (_, Some(_)) => Check::Chain,
            _ => Check::Nothing,
        }
    }

    /// Checks what can be checked without a server: `verify-*` names a CA, and every file
    /// named exists and holds what it should. `config check` reports these.
    pub fn validate(&self) -> Result<(), String> {
        if matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.root_cert.is_none()
        {
            return Err(self.needs_root_cert());
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err("sslcert and sslkey go together".into());
        }
        if let Some(path) = &self.root_cert {
            load_certs(path, "sslrootcert")?;
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            load_certs(cert, "sslcert")?;
            load_key(key)?;
        }
        Ok(())
    }

    fn needs_root_cert(&self) -> String {
        format!(
            "sslmode={} needs sslrootcert=/path/to/ca.pem (the PEM certificate of the CA that signed the server's certificate)",
            self.mode
        )
    }

    /// The same settings for libpq (pg_dump, pg_restore), as environment variables.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("PGSSLMODE", self.mode.as_str().to_string())];
        for (name, path) in [
            ("PGSSLROOTCERT", &self.root_cert),
            ("PGSSLCERT", &self.client_cert),
            ("PGSSLKEY", &self.client_key),
        ] {
            if let Some(p) = path {
                env.push((name, p.display().to_string()));
            }
        }
        env
    }
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("{what} {} cannot be read: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{what} {} is not a PEM certificate file: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("sslkey {} cannot be read: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("sslkey {} is not a PEM private key: {e}", path.display()))
}

impl PgTls {
    /// The TLS settings from libpq's `sslmode`, `sslrootcert`, `sslcert`, `sslkey` pairs (any
    /// other key is ignored): `conninfo` hands over what it parsed.
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Result<PgTls, String> {
        let mut tls = PgTls::default();
        for (key, value) in pairs {
            match key.as_str() {
            "sslmode" => tls.mode = SslMode::parse(&value)?,
            "sslrootcert" if value == "system" => {
                return Err(
                    "sslrootcert=system is not supported; name a PEM file of CAs, e.g. sslrootcert=/etc/ssl/certs/ca-certificates.crt"
                        .into(),
                )
            }
            "sslrootcert" => tls.root_cert = non_empty_path(value),
            "sslcert" => tls.client_cert = non_empty_path(value),
            "sslkey" => tls.client_key = non_empty_path(value),
            _ => {}
        }
        }
        Ok(tls)
    }
}

fn non_empty_path(value: String) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TLS settings of a connection string, parsed as pgferry parses every one.
    fn split(raw: &str) -> ((), PgTls) {
        let url = crate::config::PgUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
        ((), url.tls)
    }

    #[test]
    fn every_libpq_mode_parses_and_others_are_refused() {
        for m in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            assert_eq!(SslMode::parse(m).unwrap().as_str(), m);
        }
        let pair = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let e = PgTls::from_pairs(pair("sslmode", "verify_full")).unwrap_err();
        assert!(
            e.contains("verify_full") && e.contains("verify-full"),
            "{e}"
        );
        let e = PgTls::from_pairs(pair("sslrootcert", "system")).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn modes_map_to_libpq_checks() {
        let tls = |mode, ca: Option<&str>| PgTls {
            mode,
            root_cert: ca.map(PathBuf::from),
            ..PgTls::default()
        };
        assert_eq!(tls(SslMode::Require, None).check(), Check::Nothing);
        // libpq: require with a root certificate behaves as verify-ca.
        assert_eq!(tls(SslMode::Require, Some("/ca")).check(), Check::Chain);
        assert_eq!(tls(SslMode::Prefer, Some("/ca")).check(), Check::Chain);
        assert_eq!(tls(SslMode::VerifyCa, Some("/ca")).check(), Check::Chain);
        assert_eq!(
            tls(SslMode::VerifyFull, Some("/ca")).check(),
            Check::ChainAndName
        );
        use tokio_postgres::config::SslMode as T;
        assert_eq!(tls(SslMode::Disable, None).tokio_mode(), T::Disable);
        assert_eq!(tls(SslMode::Allow, None).tokio_mode(), T::Prefer);
        assert_eq!(tls(SslMode::VerifyCa, None).tokio_mode(), T::Require);
    }

    #[test]
    fn validation_names_the_problem() {
        let e = split("postgres://h/db?sslmode=verify-full")
            .1
            .validate()
            .unwrap_err();
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = split("postgres://h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem")
            .1
            .validate()
            .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem cannot be read"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let e = PgTls {
            mode: SslMode::VerifyCa,
            root_cert: Some(not_pem),
            ..PgTls::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = split("postgres://h/db?sslcert=/c.pem")
            .1
            .validate()
            .unwrap_err();
        assert!(e.contains("go together"), "{e}");
    }

    #[test]
    fn libpq_env_carries_every_setting() {
        let (_, tls) =
            split("postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c&sslkey=/k");
        assert_eq!(
            tls.libpq_env(),
            vec![
                ("PGSSLMODE", "verify-full".to_string()),
                ("PGSSLROOTCERT", "/ca.pem".to_string()),
                ("PGSSLCERT", "/c".to_string()),
                ("PGSSLKEY", "/k".to_string()),
            ]
        );
        assert_eq!(
            PgTls::default().libpq_env(),
            vec![("PGSSLMODE", "prefer".to_string())]
        );
    }
}
