//! The configuration file as written: serde structs that mirror it exactly, with
//! `deny_unknown_fields` and the documented defaults. `super::validate` turns them into typed
//! values; nothing else reads these.

use serde::{Deserialize, Serialize};

use super::{RawText, Text};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) daemon: RawDaemon,
    #[serde(default)]
    pub(super) pipeline: RawPipeline,
    #[serde(default)]
    pub(super) source: Vec<RawSource>,
    #[serde(default)]
    pub(super) target: Vec<RawTarget>,
    #[serde(default)]
    pub(super) restore_target: Vec<RawRestoreTarget>,
    #[serde(default)]
    pub(super) restore: RawRestore,
    #[serde(default)]
    pub(super) verify: RawVerify,
    /// Webhook for run reports (see `ops`).
    #[serde(default)]
    pub(super) notify: super::ops::RawNotify,
    #[serde(default)]
    pub(super) repair: RawRepair,
    #[serde(default)]
    pub(super) encryption: RawEncryption,
}

/// `[encryption]`: age recipients new backups are encrypted to, and the identity file that
/// restore and verify decrypt with when their own section names none.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEncryption {
    /// Public keys, `age1…`; new snapshots are encrypted to all of them.
    #[serde(default)]
    pub(super) recipients: Vec<Text>,
    /// A file of recipients, one per line (`#` comments); added to `recipients`.
    #[serde(default)]
    pub(super) recipients_file: Option<Text>,
    /// Secret keys (age-keygen's format) for restore and verify; never in production.
    #[serde(default)]
    pub(super) identity_file: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    /// Address of the HTTP server (metrics, health, API).
    #[serde(default = "default_listen")]
    pub(super) listen: Text,
    /// File holding the bearer token for mutating API calls; missing file = those are disabled.
    #[serde(default = "default_token_file")]
    pub(super) api_token_file: Text,
    /// File holding the bearer token the read endpoints (`/api/*` GETs, the status page) then
    /// require; unset = they are open.
    #[serde(default)]
    pub(super) read_token_file: Option<Text>,
    /// Backups running at once across all sources (each is one pg_dump + one compression).
    #[serde(default = "default_max_concurrent")]
    pub(super) max_concurrent_backups: usize,
    /// How long running backups may go on after SIGTERM before they are cancelled.
    #[serde(default = "default_grace")]
    pub(super) shutdown_grace: Text,
}

impl Default for RawDaemon {
    fn default() -> Self {
        RawDaemon {
            listen: default_listen(),
            api_token_file: default_token_file(),
            read_token_file: None,
            max_concurrent_backups: default_max_concurrent(),
            shutdown_grace: default_grace(),
        }
    }
}

fn default_listen() -> Text {
    Text("0.0.0.0:9187".into())
}
fn default_token_file() -> Text {
    Text("/var/run/secrets/pgferry/api-token".into())
}
fn default_max_concurrent() -> usize {
    2
}
fn default_grace() -> Text {
    Text("60s".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPipeline {
    /// zstd level (1–22). The default, 1, is chosen from benches/RESULTS.md: on Odoo-like
    /// data it compresses as well as level 3 (better, on the benchmark database) for half the
    /// CPU, and that CPU is shared with the PostgreSQL server being dumped.
    #[serde(default = "default_zstd_level")]
    pub(super) zstd_level: i32,
    /// zstd worker threads; 0 = one per core, at most 4.
    #[serde(default)]
    pub(super) zstd_workers: u32,
    /// A snapshot counts once committed on this many targets.
    #[serde(default = "default_min_targets")]
    pub(super) min_targets: usize,
    /// A target that accepts no part for this long is dropped, so it cannot stall the others.
    #[serde(default = "default_stall_timeout")]
    pub(super) stall_timeout: Text,
    /// A dump object or upload marker without a manifest older than this was left by a run
    /// that died, and `prune` removes it (aborting the upload). Longer than any backup run.
    #[serde(default = "default_orphan_grace")]
    pub(super) orphan_grace: Text,
    /// pg_dump's `--lock-wait-timeout`: a dump waiting longer for a table lock fails, naming
    /// the session that holds it, instead of hanging.
    #[serde(default = "default_lock_wait_timeout")]
    pub(super) lock_wait_timeout: Text,
    /// A pg_dump that sends nothing for this long is killed and the run fails.
    #[serde(default = "default_idle_timeout")]
    pub(super) idle_timeout: Text,
    /// Bytes the pipeline's buffers of one backup may hold (e.g. "64MiB"); parts in flight
    /// shrink as parts grow to stay under it.
    #[serde(default = "default_memory_budget")]
    pub(super) memory_budget: Text,
}

impl Default for RawPipeline {
    fn default() -> Self {
        RawPipeline {
            zstd_level: default_zstd_level(),
            zstd_workers: 0,
            min_targets: default_min_targets(),
            stall_timeout: default_stall_timeout(),
            orphan_grace: default_orphan_grace(),
            lock_wait_timeout: default_lock_wait_timeout(),
            idle_timeout: default_idle_timeout(),
            memory_budget: default_memory_budget(),
        }
    }
}

fn default_zstd_level() -> i32 {
    1
}
fn default_min_targets() -> usize {
    1
}
fn default_stall_timeout() -> Text {
    Text("300s".into())
}
fn default_orphan_grace() -> Text {
    Text("24h".into())
}
fn default_lock_wait_timeout() -> Text {
    Text("2m".into())
}
fn default_idle_timeout() -> Text {
    Text("10m".into())
}
fn default_memory_budget() -> Text {
    Text("64MiB".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) name: Text,
    pub(super) url: RawText,
    #[serde(default = "default_databases")]
    pub(super) databases: Vec<Text>,
    #[serde(default = "default_exclude")]
    pub(super) exclude: Vec<Text>,
    #[serde(default = "default_schedule")]
    pub(super) schedule: Text,
    /// Absent: [`RetentionPolicy::default`]. Given: each key it leaves out takes its default,
    /// which validation says in a warning.
    #[serde(default)]
    pub(super) retention: Option<RawRetention>,
    /// Directory holding pg_dump; default `/usr/lib/postgresql/<server major>/bin`.
    #[serde(default)]
    pub(super) pg_bin_dir: Option<Text>,
    /// Dead-man's-switch URL pinged at start (`/start`), success and failure (`/fail`).
    #[serde(default)]
    pub(super) ping: Option<Text>,
    /// Spreads the dumps of a slot over its first part (e.g. "45m"): each database starts at
    /// a stable offset in [0, spread), from a hash of "source/database". Unset: all at once.
    #[serde(default)]
    pub(super) spread: Option<Text>,
    /// Companion files archived with each dump: `"/mnt/filestore/filestore/{database}"`.
    #[serde(default)]
    pub(super) files: Option<Text>,
}

fn default_databases() -> Vec<Text> {
    vec![Text("*".into())]
}
fn default_exclude() -> Vec<Text> {
    vec![Text("postgres".into()), Text("template*".into())]
}
fn default_schedule() -> Text {
    Text("0 * * * *".into())
}

/// Grandfather-father-son retention, per source, database and target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionPolicy {
    /// The N newest snapshots, whatever their age.
    pub keep_last: u32,
    /// The newest snapshot of each of the N newest hours that have one.
    pub hourly: u32,
    /// Likewise per UTC day.
    pub daily: u32,
    /// Likewise per ISO week.
    pub weekly: u32,
    /// Likewise per calendar month.
    pub monthly: u32,
}

/// `retention = { ... }` as written: which keys were given matters (see [`RawSource`]).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    pub(super) keep_last: Option<u32>,
    pub(super) hourly: Option<u32>,
    pub(super) daily: Option<u32>,
    pub(super) weekly: Option<u32>,
    pub(super) monthly: Option<u32>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            keep_last: 3,
            hourly: 48,
            daily: 14,
            weekly: 8,
            monthly: 12,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) name: Text,
    pub(super) url: Text,
    #[serde(default)]
    pub(super) endpoint: Option<Text>,
    #[serde(default)]
    pub(super) region: Option<Text>,
    #[serde(default)]
    pub(super) access_key_id: Option<Text>,
    #[serde(default)]
    pub(super) secret_access_key: Option<Text>,
    /// PEM file of CA certificates trusted for an `https://` endpoint, besides the system's.
    #[serde(default)]
    pub(super) ca_file: Option<Text>,
    #[serde(default = "default_max_parts")]
    pub(super) max_parts: u32,
    /// Virtual-hosted-style addressing (`bucket.endpoint`); default path style.
    #[serde(default)]
    pub(super) virtual_hosted_style: Option<bool>,
    /// Server-side encryption: "AES256" or "aws:kms".
    #[serde(default)]
    pub(super) sse: Option<Text>,
    /// KMS key for `sse = "aws:kms"`; default the bucket's key.
    #[serde(default)]
    pub(super) sse_kms_key_id: Option<Text>,
    /// Rejected with a hint (see `ops::s3_options`).
    #[serde(default)]
    pub(super) storage_class: Option<Text>,
    /// Session token of temporary credentials given in `access_key_id`/`secret_access_key`.
    #[serde(default)]
    pub(super) session_token: Option<Text>,
}

fn default_max_parts() -> u32 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRestoreTarget {
    pub(super) namespace: Text,
    pub(super) url: RawText,
    #[serde(default = "default_owner")]
    pub(super) owner: Text,
    #[serde(default)]
    pub(super) hooks: Vec<Text>,
    #[serde(default)]
    pub(super) pg_bin_dir: Option<Text>,
    /// Secret keys that open encrypted snapshots restored here; default
    /// `encryption.identity_file`.
    #[serde(default)]
    pub(super) identity_file: Option<Text>,
    /// psql-style variables for the hooks (`:'base_url'`), beside the built-in ones.
    #[serde(default)]
    pub(super) variables: std::collections::BTreeMap<String, Text>,
    /// Where a restore puts the snapshot's companion files: `".../filestore/{database}"`.
    #[serde(default)]
    pub(super) files: Option<Text>,
}

fn default_owner() -> Text {
    Text("odoo".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRestore {
    /// Where `restore --jobs N` spools the verified dump before `pg_restore -j N`.
    #[serde(default = "default_spool_dir")]
    pub(super) spool_dir: Text,
}

impl Default for RawRestore {
    fn default() -> Self {
        RawRestore {
            spool_dir: default_spool_dir(),
        }
    }
}

fn default_spool_dir() -> Text {
    Text("/var/tmp/pgferry".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVerify {
    #[serde(default = "default_verify_url")]
    pub(super) url: RawText,
    #[serde(default)]
    pub(super) checks: Vec<Text>,
    /// When the daemon runs verify by itself; unset = only the CronJob does.
    #[serde(default)]
    pub(super) schedule: Option<Text>,
    #[serde(default)]
    pub(super) pg_bin_dir: Option<Text>,
    /// Databases verified at once (each is one pg_restore and one scratch database on the
    /// verify server).
    #[serde(default = "default_verify_concurrency")]
    pub(super) concurrency: usize,
    /// No database is started once this much time has passed since the run began (e.g.
    /// "4h30m"); the rest wait for the next run, oldest verification first. Unset: no limit.
    #[serde(default)]
    pub(super) window: Option<Text>,
    /// A database whose newest verify report is older than this (or that has none) counts in
    /// `pgferry_verify_overdue_databases`.
    #[serde(default = "default_verify_max_age")]
    pub(super) max_age: Text,
    /// Secret keys that open encrypted snapshots for verify; default
    /// `encryption.identity_file`.
    #[serde(default)]
    pub(super) identity_file: Option<Text>,
}

impl Default for RawVerify {
    fn default() -> Self {
        RawVerify {
            url: default_verify_url(),
            checks: Vec::new(),
            schedule: None,
            pg_bin_dir: None,
            concurrency: default_verify_concurrency(),
            window: None,
            max_age: default_verify_max_age(),
            identity_file: None,
        }
    }
}

fn default_verify_concurrency() -> usize {
    1
}

/// Two nights: a nightly verify that covers the fleet keeps every database under it.
fn default_verify_max_age() -> Text {
    Text("48h".into())
}

fn default_verify_url() -> RawText {
    RawText("postgres://pgferry@pg-verify.tools.svc:5432/postgres".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRepair {
    /// When the daemon checks every target (listings) and repairs what one lacks.
    #[serde(default = "default_repair_schedule")]
    pub(super) schedule: Text,
    /// How long prune keeps every copy of a snapshot that a configured target lacks, so that
    /// repair can copy it first.
    #[serde(default = "default_repair_grace")]
    pub(super) grace: Text,
}

impl Default for RawRepair {
    fn default() -> Self {
        RawRepair {
            schedule: default_repair_schedule(),
            grace: default_repair_grace(),
        }
    }
}

/// Hourly, at half past: after the hour's backups (which start at :00, spread over 45 min).
fn default_repair_schedule() -> Text {
    Text("30 * * * *".into())
}

fn default_repair_grace() -> Text {
    Text("24h".into())
}
