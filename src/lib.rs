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
pub(crate) mod test_support;
