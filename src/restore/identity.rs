//! The server-identity guard: restore and verify never write to a production server,
//! whatever host name, alias, address, port or `hostaddr` reaches it.
//!
//! A PostgreSQL cluster's `system_identifier` (`pg_control_system()`) is the same through
//! every address that reaches it and different for every other cluster (a physical replica
//! shares its primary's, and is read-only anyway). Every manifest records its source's; this
//! module reads the destination's over a real connection and refuses when it equals the
//! snapshot's or that of any configured source it can reach. Sources it cannot reach (a
//! staging cluster often cannot resolve production's names) are skipped with a warning: the
//! snapshot's own identifier still protects the server the data came from. It owns no
//! naming rules (see `guard`) and writes nothing.

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{Config, PgUrl};
use crate::source::{self, SourceError};

/// How long one configured source may take to answer before the guard goes on without it:
/// an unreachable production server must not hold a staging restore for long, and a
/// reachable one answers in milliseconds.
pub const SOURCE_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to run when a role cannot read `pg_control_system()`. PostgreSQL (15 included)
/// grants EXECUTE on it to PUBLIC, so any role can, unless an administrator revoked it
/// (checked with a minimal role in tests/it/security/roles.rs).
pub const GRANT_HINT: &str = "GRANT EXECUTE ON FUNCTION pg_control_system() TO <role>";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("refusing to write to {what}: its server is {matched} (system_identifier {system_identifier}), whatever name or address reaches it. Restore and verify never write to production; point {what} at a staging server")]
    IsProduction {
        what: String,
        matched: String,
        system_identifier: String,
    },
    #[error("cannot read the system_identifier of {what}, so it cannot be told apart from production: {source}. Run `{GRANT_HINT}` for the role of its URL (or use a superuser), see docs/security.md")]
    Unreadable { what: String, source: SourceError },
    #[error("cannot connect to {what} to check that it is not production: {source}")]
    Connect { what: String, source: SourceError },
}

impl IdentityError {
    /// A configuration mistake (exit 2): the destination is production, or the role cannot
    /// read the identifier. An unreachable destination is an operational failure.
    pub fn is_usage(&self) -> bool {
        !matches!(self, IdentityError::Connect { .. })
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, IdentityError::Connect { source, .. } if source.is_retryable())
    }
}

/// The pure rule: the destination's identifier against the snapshot's and the sources'.
/// Returns what it matched.
pub fn matches_production(
    destination: &str,
    snapshot: Option<(&str, &str)>,
    sources: &[(String, String)],
) -> Option<String> {
    if let Some((label, id)) = snapshot {
        if id == destination {
            return Some(label.to_string());
        }
    }
    sources
        .iter()
        .find(|(_, id)| id == destination)
        .map(|(name, _)| format!("source {name:?}"))
}

/// Reads the identifier of the server `client` is connected to.
pub async fn read(client: &Client, url: &PgUrl, what: &str) -> Result<String, IdentityError> {
    source::system_identifier(client, url)
        .await
        .map_err(|source| IdentityError::Unreadable {
            what: what.to_string(),
            source,
        })
}

/// The identifiers of every configured source that answers within
/// [`SOURCE_PROBE_TIMEOUT`], probed concurrently.
pub async fn source_identifiers(config: &Config) -> Vec<(String, String)> {
    let probes = config.sources.iter().map(|s| async move {
        let probe = async {
            let client = source::connect(&s.url, None).await?;
            source::system_identifier(&client, &s.url).await
        };
        match tokio::time::timeout(SOURCE_PROBE_TIMEOUT, probe).await {
            Ok(Ok(id)) => Some((s.name.clone(), id)),
            Ok(Err(error)) => {
                tracing::warn!(message = "Cannot read a source's system_identifier; the snapshot's own identifier still guards it.", source = %s.name, error = %error);
                None
            }
            Err(_) => {
                tracing::warn!(message = "A source did not answer in time; the snapshot's own identifier still guards it.", source = %s.name, seconds = SOURCE_PROBE_TIMEOUT.as_secs());
                None
            }
        }
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Refuses the server of `client` when it is the snapshot's source server or any
/// reachable configured source. `snapshot` is a label and the manifest's identifier.
pub async fn check(
    config: &Config,
    client: &Client,
    url: &PgUrl,
    what: &str,
    snapshot: Option<(&str, &str)>,
) -> Result<(), IdentityError> {
    let destination = read(client, url, what).await?;
    let sources = source_identifiers(config).await;
    match matches_production(&destination, snapshot, &sources) {
        Some(matched) => Err(IdentityError::IsProduction {
            what: what.to_string(),
            matched,
            system_identifier: destination,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_and_every_source_are_compared() {
        let sources = vec![
            ("prod".to_string(), "111".to_string()),
            ("eu".to_string(), "222".to_string()),
        ];
        let snap = Some(("the server snapshot X was taken from", "333"));
        assert_eq!(matches_production("444", snap, &sources), None);
        assert_eq!(
            matches_production("222", snap, &sources).as_deref(),
            Some("source \"eu\"")
        );
        assert_eq!(
            matches_production("333", snap, &sources).as_deref(),
            Some("the server snapshot X was taken from")
        );
        assert_eq!(matches_production("333", None, &[]), None);
    }
}
