//! Helpers shared by unit tests of several modules: fixtures and readings of what a store
//! holds. Test code only (`#[cfg(test)]` in `lib.rs`); nothing here runs in pgferry itself.

use crate::storage::target::Target;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use std::path::PathBuf;

/// Every file of the fuzz corpus of `target` (`fuzz/corpus/<target>/`: seeds and the
/// inputs that once crashed a parser), as (path, bytes). Panics when the corpus is missing
/// or empty, so a moved directory cannot turn the regression tests into no-ops.
pub(crate) fn fuzz_corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the fuzz corpus {}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.expect("corpus directory entry").path();
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "the fuzz corpus {} is empty",
        dir.display()
    );
    files
}

/// Every key in the store behind `t` (the whole store, not only `t`'s prefix), sorted.
pub(crate) async fn keys(t: &Target) -> Vec<String> {
    use futures::TryStreamExt;
    let mut v: Vec<String> = t
        .store
        .list(None)
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    v.sort();
    v
}

/// Writes `body` at `key` under `t`'s prefix.
pub(crate) async fn put_at(t: &Target, key: &Path, body: impl Into<PutPayload>) {
    t.store.put(&t.at(key), body.into()).await.unwrap();
}

/// The bytes of the object at `key` in `store` (the whole key: no target prefix is added).
pub(crate) async fn read(store: &dyn ObjectStore, key: &Path) -> Bytes {
    store.get(key).await.unwrap().bytes().await.unwrap()
}
