//! Helpers shared by unit tests of several modules: fixtures and readings of what a store
//! holds. Test code only (`#[cfg(test)]` in `lib.rs`); nothing here runs in pgferry itself.

use crate::app::App;
use crate::config::Config;
use crate::storage::target::Target;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use std::path::PathBuf;
use std::sync::Arc;

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

/// An [`App`] over `targets` whose config has one source `prod` (never connected to; its
/// table gets `source_keys`, TOML lines) and one directory target `a` that `targets` stands
/// in for.
pub(crate) fn app_over(source_keys: &str, targets: Vec<Target>) -> App {
    let text = format!(
        r#"
[[source]]
name = "prod"
url = "postgres://pgferry@127.0.0.1:1/postgres"
{source_keys}

[[target]]
name = "a"
url = "file:///nonexistent/a"
"#
    );
    let config = Config::from_str_at(&text, std::path::Path::new("/etc/pgferry/x.toml")).unwrap();
    App {
        config: Arc::new(config),
        targets: Arc::new(targets),
        metrics: crate::metrics::Metrics::new(),
        notifier: Default::default(),
    }
}
