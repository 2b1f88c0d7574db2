//! Sharing the work between daemon replicas: a PostgreSQL advisory lock per database on its
//! source server while it is dumped, and the "this slot is already committed" check.
//!
//! The lock is session-level, taken with `pg_try_advisory_lock` on a connection of its own
//! that the caller holds for the whole backup: when the process dies, the server ends the
//! session and the lock goes with it. The key is derived with SHA-256 (stable across builds and
//! Rust versions, unlike `DefaultHasher`), so every replica computes the same one.

use object_store::ObjectStore;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::config::SourceConfig;
use crate::source::{self, SourceError};
use crate::storage::target::{Target, MANIFEST_SUFFIX};

/// The 64-bit advisory lock key of one database of one source.
pub fn lock_key(source: &str, database: &str) -> i64 {
    let digest = Sha256::digest(format!("pgferry:{source}/{database}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// A held advisory lock: dropping it closes the session, which releases the lock.
pub struct DumpLock {
    _client: Client,
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
    Ok(got.then_some(DumpLock { _client: client }))
}

/// Whether the snapshot's manifest exists on at least `min_targets` targets. A target that
/// cannot answer counts as not holding it (so the slot is dumped rather than lost).
pub async fn is_committed(
    targets: &[Target],
    source: &str,
    database: &str,
    snapshot_id: &str,
    min_targets: usize,
) -> bool {
    let heads = futures::future::join_all(targets.iter().map(|t| {
        let key = t.key(source, database, snapshot_id, MANIFEST_SUFFIX);
        async move { t.store.head(&key).await.is_ok() }
    }))
    .await;
    heads.into_iter().filter(|ok| *ok).count() >= min_targets.max(1)
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
    async fn committed_needs_min_targets_manifests() {
        let a = Target::new("a", Arc::new(InMemory::new()), "", 10_000);
        let b = Target::new("b", Arc::new(InMemory::new()), "pre", 10_000);
        let targets = [a.clone(), b.clone()];
        let id = "20261127T140000Z";
        assert!(!is_committed(&targets, "p", "d", id, 1).await);
        a.store
            .put(
                &a.key("p", "d", id, MANIFEST_SUFFIX),
                PutPayload::from_static(b"{}"),
            )
            .await
            .unwrap();
        assert!(is_committed(&targets, "p", "d", id, 1).await);
        assert!(!is_committed(&targets, "p", "d", id, 2).await);
        assert!(!is_committed(&targets, "p", "other", id, 1).await);
    }
}
