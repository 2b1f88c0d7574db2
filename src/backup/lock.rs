//! Sharing the work between replicas (and manual runs): a PostgreSQL advisory lock per
//! database on its source server while it is dumped, watched for as long as it is held, and
//! the "this slot is already committed" check.
//!
//! The lock is session-level, taken with `pg_try_advisory_lock` on a connection of its own
//! that [`DumpLock`] holds for the whole backup: when the process dies, the server ends the
//! session and the lock goes with it. A session can also end under a live process
//! (`idle_session_timeout`, a proxy's idle timeout, `pg_terminate_backend`, a pooler in
//! transaction mode): a watcher asks the session every [`WATCH_INTERVAL`] whether it still
//! holds the lock, and cancels [`DumpLock::lost`] when it does not or cannot answer, so that
//! the run stops and commits nothing. The key is derived with SHA-256 (stable across builds and
//! Rust versions, unlike `DefaultHasher`), so every replica computes the same one.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::SourceConfig;
use crate::source::{self, SourceError};
use crate::storage::key::SnapshotKey;
use crate::storage::target::Target;

/// How often the lock's session is asked whether it still holds the lock: a lost lock is
/// noticed within this (plus [`WATCH_TIMEOUT`]), long before any dump can finish.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// A lock session that does not answer within this is taken as lost: a proxy that silently
/// dropped it would otherwise keep the run going unprotected.
const WATCH_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether this session holds the advisory lock `$1` (a bigint key is stored as classid =
/// high 32 bits, objid = low 32 bits, objsubid = 1).
const HOLDS_LOCK: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
     AND pid = pg_backend_pid() AND granted AND objsubid = 1 \
     AND ((classid::bigint << 32) | objid::bigint) = $1)";

/// The 64-bit advisory lock key of one database of one source.
pub fn lock_key(source: &str, database: &str) -> i64 {
    let digest = Sha256::digest(format!("pgferry:{source}/{database}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// A held advisory lock: dropping it stops the watcher and closes the session, which
/// releases the lock.
pub struct DumpLock {
    lost: CancellationToken,
    watcher: tokio::task::JoinHandle<()>,
    client: Arc<Client>,
    key: i64,
}

impl DumpLock {
    /// Cancelled once the lock's session is gone or no longer holds the lock.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Asks the session now whether it still holds the lock (the watcher asks only every
    /// [`WATCH_INTERVAL`]): called right before the commit, so that a run whose lock went
    /// away since the last watch commits nothing.
    pub async fn confirm(&self) -> bool {
        if self.is_lost() {
            return false;
        }
        let held = matches!(
            tokio::time::timeout(WATCH_TIMEOUT, self.client.query_one(HOLDS_LOCK, &[&self.key])).await,
            Ok(Ok(row)) if row.get::<_, bool>(0)
        );
        if !held {
            self.lost.cancel();
        }
        held
    }
}

impl Drop for DumpLock {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Takes the lock of `database`, or returns `None` when another session (another replica)
/// holds it.
pub async fn try_lock(
    source: &SourceConfig,
    database: &str,
) -> Result<Option<DumpLock>, SourceError> {
    let client = source::connect(&source.url, None).await?;
    let key = lock_key(&source.name, database);
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await
        .map_err(|e| SourceError::Query {
            url: source.url.redacted(),
            source: e,
        })?;
    let got: bool = row.get(0);
    if !got {
        return Ok(None);
    }
    let client = Arc::new(client);
    let lost = CancellationToken::new();
    let watcher = tokio::spawn(watch(
        client.clone(),
        key,
        lost.clone(),
        source.name.clone(),
        database.to_string(),
    ));
    Ok(Some(DumpLock {
        lost,
        watcher,
        client,
        key,
    }))
}

async fn watch(
    client: Arc<Client>,
    key: i64,
    lost: CancellationToken,
    source: String,
    database: String,
) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let asked =
            tokio::time::timeout(WATCH_TIMEOUT, client.query_one(HOLDS_LOCK, &[&key])).await;
        let why = match asked {
            Ok(Ok(row)) if row.get::<_, bool>(0) => continue,
            Ok(Ok(_)) => {
                "the session no longer holds the lock (a pooler in transaction mode?)".to_string()
            }
            Ok(Err(e)) => format!("the lock's session ended: {}", source::pg_message(&e)),
            Err(_) => format!("the lock's session did not answer within {WATCH_TIMEOUT:?}"),
        };
        tracing::warn!(
            message = "Lost the advisory lock: cancelling the run so that another replica can take the database.",
            source = %source, database = %database, reason = %why
        );
        lost.cancel();
        return;
    }
}

/// What the targets say about one snapshot's manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    /// Targets that hold the manifest.
    pub holding: Vec<String>,
    /// Targets that answered that they do not.
    pub missing: Vec<String>,
    /// Targets that could not answer (down, timing out, refusing).
    pub unknown: Vec<String>,
}

impl Presence {
    /// Committed: on every target that can answer, and on at least one. A target that cannot
    /// answer never makes a slot look uncommitted, so an outage never triggers a rewrite of
    /// what exists; a target that answers "missing" does (the next run puts the slot there).
    pub fn is_committed(&self) -> bool {
        !self.holding.is_empty() && self.missing.is_empty()
    }

    /// Committed, but on fewer targets than `min_targets` (the others cannot answer): nothing
    /// to dump again, yet not a success to report.
    pub fn is_degraded(&self, min_targets: usize) -> bool {
        self.holding.len() < min_targets
    }
}

/// Asks every target whether it holds the snapshot's manifest. A target that does not answer
/// within `timeout` (`pipeline.stall_timeout`: a stalled provider would otherwise hold the run
/// for the HTTP client's own timeout) counts as unknown.
pub async fn presence(targets: &[Target], snapshot: &SnapshotKey, timeout: Duration) -> Presence {
    let manifest = snapshot.manifest();
    let heads = futures::future::join_all(targets.iter().map(|t| {
        let key = t.at(&manifest);
        async move { tokio::time::timeout(timeout, t.store.head(&key)).await }
    }))
    .await;
    let mut p = Presence::default();
    for (t, head) in targets.iter().zip(heads) {
        let error = match head {
            Ok(Ok(_)) => {
                p.holding.push(t.name.clone());
                continue;
            }
            Ok(Err(object_store::Error::NotFound { .. })) => {
                p.missing.push(t.name.clone());
                continue;
            }
            Ok(Err(error)) => crate::storage::target::error_text(&error),
            Err(_) => format!("no answer within {timeout:?} (pipeline.stall_timeout)"),
        };
        tracing::warn!(message = "Cannot tell whether a target holds a snapshot; it will not make the slot be dumped again.", target = %t.name, key = %t.at(&manifest), error = %error);
        p.unknown.push(t.name.clone());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::PutPayload;
    use std::sync::Arc;

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        // Pinned: replicas built by different compilers must agree.
        assert_eq!(lock_key("prod", "acme"), lock_key("prod", "acme"));
        assert_ne!(lock_key("prod", "acme"), lock_key("prod", "acme2"));
        assert_ne!(lock_key("pro", "dacme"), lock_key("prod", "acme"));
        let digest = Sha256::digest(b"pgferry:prod/acme");
        assert_eq!(
            lock_key("prod", "acme"),
            i64::from_be_bytes(digest[..8].try_into().unwrap())
        );
    }

    #[tokio::test]
    async fn committed_means_on_every_target_that_answers() {
        use crate::storage::key::SnapshotId;
        let a = Target::new("a", Arc::new(InMemory::new()), "", 10_000);
        let b = Target::new("b", Arc::new(InMemory::new()), "pre", 10_000);
        let targets = [a.clone(), b.clone()];
        let snap = SnapshotKey::new("p", "d", SnapshotId::parse("20261127T140000Z").unwrap());
        let t = Duration::from_secs(5);
        assert!(!presence(&targets, &snap, t).await.is_committed());
        a.store
            .put(&a.at(&snap.manifest()), PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        let p = presence(&targets, &snap, t).await;
        assert_eq!(p.holding, ["a"]);
        assert_eq!(p.missing, ["b"]);
        assert!(!p.is_committed(), "b answered that it lacks it");
        b.store
            .put(&b.at(&snap.manifest()), PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        assert!(presence(&targets, &snap, t).await.is_committed());
        let other = SnapshotKey::new("p", "other", snap.id.clone());
        assert!(!presence(&targets, &other, t).await.is_committed());
        // A target that cannot answer does not make the slot uncommitted.
        let down = Presence {
            holding: vec!["a".into()],
            missing: vec![],
            unknown: vec!["b".into()],
        };
        assert!(down.is_committed());
        let nothing = Presence {
            holding: vec![],
            missing: vec![],
            unknown: vec!["a".into(), "b".into()],
        };
        assert!(!nothing.is_committed());
    }
}
