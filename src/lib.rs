//! pgferry: PostgreSQL backup and restore for Kubernetes.
//!
//! The modules follow the data, grouped by stage: `config` → `source` (connections, pg_dump)
//! → `archive` (pg_dump's custom format: table stats) → `backup` (pipeline: zstd, sha256,
//! fan-out; the commit) → `storage` (targets, uploads, manifest, catalog). `restore` and
//! `verify` read it back; `retention` plans and prunes; `daemon` schedules it all (with its
//! `http` API); `cli` maps verbs onto them.
pub mod app;
pub mod archive;
pub mod backup;
pub mod check;
pub mod cli;
pub mod config;
pub mod conninfo;
pub mod daemon;
pub mod encryption;
pub mod files;
pub mod metrics;
pub mod notify;
pub mod repair;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod source;
pub mod storage;
pub mod verify;

/// Helpers shared by unit tests of several modules.
#[cfg(test)]
pub(crate) mod test_support {
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
}
