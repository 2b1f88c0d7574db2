//! pgferry: PostgreSQL backup and restore for Kubernetes.
//!
//! The modules follow the data: `config` → `source` (pg_dump) → `pipeline` (zstd, sha256,
//! fan-out) → `target` (object stores) → `manifest` (the commit) → `catalog` (what exists).
//! `backup` runs one database through all of them; `daemon` schedules it (with `http` for
//! the API and `prune` applying `retention`); `cli` maps verbs onto them.
pub mod app;
pub mod backup;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dumpstats;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod pipeline;
pub mod prune;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod source;
pub mod target;
pub mod verify;
