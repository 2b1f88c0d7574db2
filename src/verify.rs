//! Restore-verify: prove that the latest snapshot of each database restores completely.
//!
//! For each selected database: take the newest committed snapshot from the catalog, restore
//! it into a scratch database on the `[verify]` server (the restore path: sha256 and size
//! checked as it streams, falling back to the next target on a bad copy), compare every
//! table's row count with the statistics the manifest recorded from the dump stream itself,
//! run the configured checks, drop the scratch database, and write the report as
//! `<snapshot_id>.verify.json` beside the manifest on every target holding the snapshot.
//!
//! A run takes the databases oldest verification first ([`plan`]: never verified, then the
//! oldest newest report), `verify.concurrency` at a time, and starts none once
//! `verify.window` has passed since it began: those are reported as skipped (they do not
//! fail the run) and come first next time, so a fleet bigger than one night is covered over
//! successive nights. Each database verifies into a scratch database of its own name (a hash
//! of source/database, see [`scratch_key`]) under a lock of its own, so concurrent ones never
//! share one. After a run that covered a whole source, `pgferry_verify_overdue_databases`
//! counts its databases whose newest report is older than `verify.max_age` or missing.
//!
//! A snapshot with companion files (`crate::files`) also has its archive read (sha256, age,
//! zstd, tar; nothing written to disk): its file count must be the manifest's, and every
//! `ir_attachment.store_fname` of the restored database (Odoo's attachments, when that table
//! exists) must name a file in it; missing ones fail the verify, reported by count.
//!
//! This module never touches a source or a staging database: it writes only to the verify
//! server (scratch databases it created) and to `.verify.json` objects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::PutPayload;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::files::unpack::{self, Listing, UnpackError};
use crate::metrics::Outcome;
use crate::restore::guard::{self, quote_ident};
use crate::restore::identity::{self, IdentityError};
use crate::restore::load::{self, LoadError, LoadProgress, RestoreInto};
use crate::restore::swap::{Server, SwapError};
use crate::restore::TargetFailure;
use crate::source::{self, SourceError};
use crate::storage::catalog::{Filter, SnapshotEntry};
use crate::storage::key::{SnapshotId, SnapshotKey};
use crate::storage::manifest::{FilesArchive, TableEntry};

/// The manifest format from which every manifest records table statistics.
const TABLE_STATS_FORMAT: u32 = 2;

/// Version of the verify report format.
pub const REPORT_FORMAT_VERSION: u32 = 1;

/// Missing attachments named in a report (the count is always whole).
const MISSING_EXAMPLES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no source named {0:?} in the config")]
    UnknownSource(String),
    #[error("no committed snapshot of {source_name}/{database} on any target; run `pgferry list --source {source_name}`")]
    NoSnapshot {
        source_name: String,
        database: String,
    },
    #[error("verify server: {0}")]
    Server(#[from] SwapError),
    #[error("verify server: {0}")]
    Source(#[from] SourceError),
    #[error(transparent)]
    Guard(#[from] IdentityError),
    #[error("verify cancelled; the scratch database was dropped")]
    Cancelled,
}

/// Refuses a verify server that is a configured source or the server any of these snapshots
/// was taken from, whatever name reaches it (see `restore::identity`).
async fn guard_server(app: &App, latest: &[&SnapshotEntry]) -> Result<(), VerifyError> {
    let url = &app.config.verify.url;
    let what = "the [verify] server";
    let client = source::connect(url, None)
        .await
        .map_err(|source| IdentityError::Connect {
            what: what.into(),
            source,
        })?;
    let server_id = identity::read(&client, url, what).await?;
    let sources = identity::source_identifiers(&app.config).await;
    let mut matched = identity::matches_production(&server_id, None, &sources);
    for entry in latest {
        let m = &entry.manifest;
        if matched.is_some() {
            break;
        }
        let label = format!(
            "the server snapshot {} of {}/{} was taken from",
            m.snapshot_id, m.source, m.database
        );
        matched = identity::matches_production(
            &server_id,
            m.system_identifier
                .as_deref()
                .map(|id| (label.as_str(), id)),
            &[],
        );
    }
    match matched {
        Some(matched) => Err(IdentityError::IsProduction {
            what: what.into(),
            matched,
            system_identifier: server_id,
        }
        .into()),
        None => Ok(()),
    }
}

/// One table's comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCheck {
    pub schema: String,
    pub name: String,
    /// Rows recorded in the manifest (COPY lines in the dump stream).
    pub expected: u64,
    /// `count(*) FROM ONLY` in the restored database; None if the table is missing.
    pub actual: Option<u64>,
}

impl TableCheck {
    pub fn ok(&self) -> bool {
        self.actual == Some(self.expected)
    }
}

/// One configured check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub sql: String,
    pub passed: bool,
    /// Why it did not pass: the error, or "returned false".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `<snapshot_id>.verify.json` document (`catalog::VerifySummary` reads its gist).
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub format_version: u32,
    /// "success" or "failure".
    pub result: String,
    pub source: String,
    pub database: String,
    pub snapshot_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The target whose copy was restored, if any copy was good.
    pub restored_from: Option<String>,
    pub failed_targets: Vec<TargetFailure>,
    pub tables: Vec<TableCheck>,
    pub large_objects: Option<LargeObjectCheck>,
    pub checks: Vec<CheckResult>,
    /// Everything that made the result a failure, in words.
    pub problems: Vec<String>,
    pub restore_seconds: f64,
    pub total_seconds: f64,
    /// Scratch databases of an earlier verify of this database that was killed, dropped
    /// before this one started.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cleaned_leftovers: Vec<String>,
    /// The companion files, when the snapshot has an archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesCheck>,
}

/// The companion files' archive against its manifest and the restored attachments.
#[derive(Debug, Default, Serialize)]
pub struct FilesCheck {
    /// Files the manifest records.
    pub expected_files: u64,
    /// Files in the archive as read; `None` when no copy could be read.
    pub actual_files: Option<u64>,
    /// The target whose copy was read.
    pub read_from: Option<String>,
    pub failed_targets: Vec<TargetFailure>,
    /// Non-null `ir_attachment.store_fname` values compared; `None`: the restored database
    /// has no such column (not an Odoo database).
    pub attachments_checked: Option<u64>,
    /// Of those, how many name no file of the archive.
    pub missing_attachments: u64,
    /// The first few of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_examples: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LargeObjectCheck {
    pub expected: u64,
    pub actual: u64,
}

impl VerifyReport {
    pub fn passed(&self) -> bool {
        self.result == Outcome::Success.as_str()
    }
}

/// Compares the manifest's tables with the restored counts; returns the checks and the
/// problems, each naming the table and by how much it differs.
pub fn compare_tables(
    expected: &[TableEntry],
    actual: &[(String, String, Option<u64>)],
) -> (Vec<TableCheck>, Vec<String>) {
    let mut checks = Vec::new();
    let mut problems = Vec::new();
    for t in expected {
        let found = actual
            .iter()
            .find(|(s, n, _)| *s == t.schema && *n == t.name)
            .and_then(|(_, _, c)| *c);
        let check = TableCheck {
            schema: t.schema.clone(),
            name: t.name.clone(),
            expected: t.rows,
            actual: found,
        };
        if !check.ok() {
            problems.push(match found {
                None => format!(
                    "table {}.{} is missing from the restored database (manifest: {} rows)",
                    t.schema, t.name, t.rows
                ),
                Some(n) => format!(
                    "table {}.{} has {n} rows, the manifest says {} ({:+})",
                    t.schema,
                    t.name,
                    t.rows,
                    n as i128 - t.rows as i128
                ),
            });
        }
        checks.push(check);
    }
    (checks, problems)
}

/// What `pgferry verify` selects.
#[derive(Debug, Clone, Default)]
pub struct VerifyRequest {
    pub source: Option<String>,
    pub databases: Vec<String>,
}

/// One database of a run's plan: its latest snapshot and when it was last verified.
#[derive(Debug, Clone)]
pub struct Planned<'a> {
    pub entry: &'a SnapshotEntry,
    /// The newest verify report (any result) of any of its snapshots; `None`: never.
    pub last_verified: Option<DateTime<Utc>>,
}

impl Planned<'_> {
    fn source(&self) -> &str {
        &self.entry.manifest.source
    }
    fn database(&self) -> &str {
        &self.entry.manifest.database
    }
}

/// The order of a run: each database's latest snapshot, never-verified databases first, then
/// the oldest last verification first (by source and database among equals), so that a
/// fleet bigger than one window is covered over successive runs. A report of any result
/// counts as a verification: a failing database is alerted on by its own series
/// (`PgferryVerifyStale`) and does not hold the head of the queue every night.
pub fn plan(snapshots: &[SnapshotEntry]) -> Vec<Planned<'_>> {
    let mut planned: Vec<Planned<'_>> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    for s in snapshots {
        let key = (s.manifest.source.as_str(), s.manifest.database.as_str());
        let verified = s.verify.as_ref().map(|v| v.finished_at);
        match index.get(&key) {
            Some(&i) => {
                let p = &mut planned[i];
                p.last_verified = p.last_verified.max(verified);
            }
            None => {
                // Newest data first: the first seen is the latest.
                index.insert(key, planned.len());
                planned.push(Planned {
                    entry: s,
                    last_verified: verified,
                });
            }
        }
    }
    planned.sort_by(|a, b| {
        a.last_verified
            .cmp(&b.last_verified)
            .then_with(|| (a.source(), a.database()).cmp(&(b.source(), b.database())))
    });
    planned
}

/// A database not started because `verify.window` ran out first: the next run takes it
/// early (it is then among the oldest verified).
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub source: String,
    pub database: String,
    pub snapshot_id: String,
    pub last_verified: Option<DateTime<Utc>>,
}

/// What one `verify` run did.
#[derive(Debug)]
pub struct VerifyRun {
    /// In the plan's order: a report (passed or not) or an error that kept verification of
    /// the database from running at all.
    pub results: Vec<(String, String, Result<VerifyReport, VerifyError>)>,
    /// Not started: the window ran out. They do not make the run fail.
    pub skipped: Vec<Skipped>,
    /// Per source the run covered whole (no `--database`), the databases overdue after it:
    /// newest verify report older than `verify.max_age`, or none (tonight's count).
    pub overdue: BTreeMap<String, u64>,
}

/// Per source, the planned databases whose last verification (tonight's, for those in
/// `verified_now`) is older than `max_age` at `now`, or missing. Every source of `sources`
/// is in the answer, with 0 when none is overdue.
pub fn overdue(
    planned: &[Planned<'_>],
    verified_now: &HashSet<(String, String)>,
    sources: &[&str],
    now: DateTime<Utc>,
    max_age: std::time::Duration,
) -> BTreeMap<String, u64> {
    let max_age = chrono::TimeDelta::from_std(max_age).unwrap_or(chrono::TimeDelta::MAX);
    let mut out: BTreeMap<String, u64> = sources.iter().map(|s| (s.to_string(), 0)).collect();
    for p in planned {
        let key = (p.source().to_string(), p.database().to_string());
        if verified_now.contains(&key) {
            continue;
        }
        if p.last_verified.is_none_or(|t| now - t > max_age) {
            *out.entry(key.0).or_default() += 1;
        }
    }
    out
}

/// What became of one planned database.
enum Step {
    Done(Box<Result<VerifyReport, VerifyError>>),
    /// The window ran out before it started.
    Skipped,
    /// Cancelled before it started: not reported.
    NotStarted,
}

/// Verifies the latest snapshot of every selected database, oldest verification first,
/// `verify.concurrency` at a time; once `verify.window` has passed since the run began, no
/// other database is started (those running finish).
pub async fn verify_all(
    app: &App,
    req: &VerifyRequest,
    cancel: CancellationToken,
) -> Result<VerifyRun, VerifyError> {
    let window_end = app
        .config
        .verify
        .window
        .map(|w| tokio::time::Instant::now() + w);
    if let Some(s) = &req.source {
        if app.config.source(s).is_none() {
            return Err(VerifyError::UnknownSource(s.clone()));
        }
    }
    let filter = Filter {
        source: req.source.clone(),
        databases: req.databases.clone(),
        target: None,
    };
    let cat = app.catalog(&filter).await;
    // What the buckets say first: a database that fails tonight keeps its last success (the
    // pushed group replaces the previous one whole).
    crate::metrics::from_catalog::seed(&app.metrics, &cat, app.config.pipeline.min_targets);
    let planned = plan(&cat.snapshots);
    if !planned.is_empty() {
        let latest: Vec<&SnapshotEntry> = planned.iter().map(|p| p.entry).collect();
        guard_server(app, &latest).await?;
    }
    let mut results = Vec::new();
    for d in &req.databases {
        if !planned.iter().any(|p| p.database() == *d) {
            results.push((
                req.source.clone().unwrap_or_default(),
                d.clone(),
                Err(VerifyError::NoSnapshot {
                    source_name: req.source.clone().unwrap_or_else(|| "*".into()),
                    database: d.clone(),
                }),
            ));
        }
    }
    let concurrency = app.config.verify.concurrency.max(1);
    tracing::info!(
        message = "Verify planned.",
        databases = planned.len(),
        never_verified = planned.iter().filter(|p| p.last_verified.is_none()).count(),
        concurrency,
        window_seconds = app.config.verify.window.map(|w| w.as_secs())
    );
    let steps: Vec<_> = planned
        .iter()
        .enumerate()
        .map(|(i, p)| step(app, i, p.entry, window_end, cancel.clone()))
        .collect();
    let mut steps: Vec<(usize, Step)> = futures::stream::iter(steps)
        .buffer_unordered(concurrency)
        .collect()
        .await;
    steps.sort_by_key(|(i, _)| *i);
    let mut skipped = Vec::new();
    let mut verified_now = HashSet::new();
    for (i, step) in steps {
        let p = &planned[i];
        let (source, database) = (p.source().to_string(), p.database().to_string());
        match step {
            Step::Done(r) => {
                let r = *r;
                if r.is_ok() {
                    verified_now.insert((source.clone(), database.clone()));
                }
                results.push((source, database, r));
            }
            Step::Skipped => {
                app.metrics
                    .verifies_total
                    .with_label_values(&[Outcome::Skipped.as_str()])
                    .inc();
                skipped.push(Skipped {
                    source,
                    database,
                    snapshot_id: p.entry.manifest.snapshot_id.clone(),
                    last_verified: p.last_verified,
                });
            }
            Step::NotStarted => {}
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(
            message = "The verify window ran out; the databases not started go first next time.",
            skipped = skipped.len(),
            window_seconds = app.config.verify.window.map(|w| w.as_secs())
        );
    }
    // A count per source is only right when the run saw all of the source's databases.
    let mut overdue_now = BTreeMap::new();
    if req.databases.is_empty() {
        let sources: Vec<&str> = app
            .config
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .filter(|s| req.source.as_deref().is_none_or(|r| r == *s))
            .collect();
        overdue_now = overdue(
            &planned,
            &verified_now,
            &sources,
            Utc::now(),
            app.config.verify.max_age,
        );
        for (source, n) in &overdue_now {
            app.metrics
                .verify_overdue_databases
                .with_label_values(&[source])
                .set(*n as i64);
        }
    }
    Ok(VerifyRun {
        results,
        skipped,
        overdue: overdue_now,
    })
}

/// One database's turn: skipped when the window (or the run) is over by the time it comes.
async fn step(
    app: &App,
    i: usize,
    entry: &SnapshotEntry,
    window_end: Option<tokio::time::Instant>,
    cancel: CancellationToken,
) -> (usize, Step) {
    if cancel.is_cancelled() {
        return (i, Step::NotStarted);
    }
    if window_end.is_some_and(|end| tokio::time::Instant::now() >= end) {
        return (i, Step::Skipped);
    }
    let m = &entry.manifest;
    let span = tracing::info_span!("verify", source = %m.source, database = %m.database, snapshot_id = %m.snapshot_id);
    let r = verify_one(app, entry, cancel).instrument(span).await;
    record(app, &m.source, &m.database, &r);
    (i, Step::Done(Box::new(r)))
}

fn record(app: &App, source: &str, database: &str, r: &Result<VerifyReport, VerifyError>) {
    let outcome = match r {
        Ok(rep) if rep.passed() => {
            // The report's own time, as written to the buckets (what a later run seeds).
            app.metrics
                .verify_last_success
                .with_label_values(&[source, database])
                .set(rep.finished_at.timestamp_millis() as f64 / 1000.0);
            Outcome::Success
        }
        Err(VerifyError::Cancelled) => Outcome::Cancelled,
        _ => Outcome::Failure,
    };
    app.metrics
        .verifies_total
        .with_label_values(&[outcome.as_str()])
        .inc();
}

/// Verifies one snapshot; the report is written to every target holding it.
pub async fn verify_one(
    app: &App,
    entry: &SnapshotEntry,
    cancel: CancellationToken,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let started_at = Utc::now();
    let m = &entry.manifest;
    let url = &app.config.verify.url;
    // The scratch database is named like a restore's temporary one, keyed on this database,
    // so the same lock and leftover cleaning apply after a killed run.
    let key = scratch_key(&m.source, &m.database);
    let server = Server::lock(url, &key).await?;
    let cleaned = server.clean_leftovers(&key).await?;
    if !cleaned.is_empty() {
        tracing::warn!(message = "Dropped scratch databases of an interrupted verify.", databases = %cleaned.join(","));
    }
    let version = source::server_version(&server.client, url).await?;
    let tool = source::find_tool(
        "pg_restore",
        app.config.verify.pg_bin_dir.as_deref(),
        &version,
    )
    .await?;
    let scratch = guard::tmp_name(&key, &m.snapshot_id);
    let owner = url.parsed.get_user().unwrap_or("postgres").to_string();

    let mut failures = Vec::new();
    let mut restored_from = None;
    for target_name in &entry.targets {
        let Some(target) = app.target(target_name) else {
            continue;
        };
        if cancel.is_cancelled() {
            server.drop_database(&scratch).await.ok();
            return Err(VerifyError::Cancelled);
        }
        server.drop_database(&scratch).await?;
        server
            .create_tmp(
                &scratch,
                &owner,
                &format!(
                    "pgferry verify scratch of {}/{} snapshot {}, pid {}; safe to drop when no verify runs",
                    m.source,
                    m.database,
                    m.snapshot_id,
                    std::process::id()
                ),
            )
            .await?;
        let into = RestoreInto {
            tool: &tool,
            url,
            tmp_database: &scratch,
            owner: &owner,
            identity_file: app.config.verify_identity_file(),
        };
        // Each copy with its own target's manifest (see `load::manifest_for`).
        let loaded = match load::manifest_for(entry, target_name) {
            Ok(own) => {
                load::stream(
                    target,
                    own,
                    &into,
                    Arc::new(LoadProgress::default()),
                    &cancel,
                )
                .instrument(tracing::info_span!("load", target = %target.name))
                .await
            }
            Err(e) => Err(e),
        };
        match loaded {
            Ok(_) => {
                restored_from = Some(target.name.clone());
                break;
            }
            Err(LoadError::Cancelled) => {
                server.drop_database(&scratch).await.ok();
                return Err(VerifyError::Cancelled);
            }
            Err(e) => {
                tracing::warn!(message = "This target's copy did not restore; trying the next target.", target = %target.name, error = %e);
                failures.push(TargetFailure {
                    target: target.name.clone(),
                    error: e,
                });
            }
        }
    }
    let restore_seconds = started.elapsed().as_secs_f64();

    let mut problems = Vec::new();
    let mut tables = Vec::new();
    let mut large_objects = None;
    let mut checks = Vec::new();
    let mut files = None;
    if restored_from.is_some() {
        // Copies that failed before a good one are reported (in `failed_targets` and the
        // log), but do not fail the verify of the snapshot: the snapshot itself restored.
        match inspect(app, url, &scratch, entry, restored_from.as_deref()).await {
            Ok(found) => {
                tables = found.tables;
                large_objects = found.large_objects;
                checks = found.checks;
                problems = found.problems;
            }
            Err(e) => problems.push(format!("cannot inspect the restored database: {e}")),
        }
        let first = restored_from.as_deref().unwrap_or_default();
        if let Some(archive) = entry.manifest_on(first).files_archive() {
            match check_files(app, entry, archive, first, url, &scratch, &cancel).await {
                Ok((check, p)) => {
                    files = Some(check);
                    problems.extend(p);
                }
                Err(VerifyError::Cancelled) => {
                    server.drop_database(&scratch).await.ok();
                    return Err(VerifyError::Cancelled);
                }
                Err(e) => problems.push(format!("cannot check the companion files: {e}")),
            }
        }
    } else {
        problems.extend(
            failures
                .iter()
                .map(|f| format!("the copy on target {} failed: {}", f.target, f.error)),
        );
        problems.push("no target holds a copy that restores".into());
    }
    server.drop_database(&scratch).await?;

    let report = VerifyReport {
        format_version: REPORT_FORMAT_VERSION,
        result: if problems.is_empty() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
        .as_str()
        .into(),
        source: m.source.clone(),
        database: m.database.clone(),
        snapshot_id: m.snapshot_id.clone(),
        started_at,
        finished_at: Utc::now(),
        restored_from,
        failed_targets: failures,
        tables,
        large_objects,
        checks,
        problems,
        restore_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        cleaned_leftovers: cleaned,
        files,
    };
    write_report(app, entry, &report).await;
    if report.passed() {
        tracing::info!(
            message = "Snapshot verified.",
            tables = report.tables.len(),
            seconds = report.total_seconds
        );
    } else {
        tracing::error!(message = "Snapshot failed verification.", problems = %report.problems.join("; "));
    }
    Ok(report)
}

/// The restore "destination" a verify of one database stands for: its scratch database's
/// name (`guard::tmp_name`), leftover pattern and lock are derived from it, one per database.
pub fn scratch_key(source: &str, database: &str) -> String {
    format!("pgferry-verify:{source}/{database}")
}

struct Inspection {
    tables: Vec<TableCheck>,
    large_objects: Option<LargeObjectCheck>,
    checks: Vec<CheckResult>,
    problems: Vec<String>,
}

/// Counts rows in the restored scratch database and runs the configured checks.
async fn inspect(
    app: &App,
    url: &crate::config::PgUrl,
    scratch: &str,
    entry: &SnapshotEntry,
    restored_from: Option<&str>,
) -> Result<Inspection, SourceError> {
    let client = source::connect(url, Some(scratch)).await?;
    let mut problems = Vec::new();
    // The catalog holds manifest summaries: the table statistics are read here, in full, from
    // the manifest of the copy that restored first.
    let full =
        crate::storage::catalog::full_manifest_from(&app.targets, entry, restored_from).await;
    let m = match &full {
        Ok(full) => full,
        Err(e) => {
            problems.push(e.clone());
            entry.manifest_on(restored_from.unwrap_or_default())
        }
    };
    let mut tables = Vec::new();
    let mut large_objects = None;
    match &m.tables {
        Some(expected) => {
            let mut actual = Vec::new();
            for t in expected {
                let sql = format!(
                    "SELECT count(*) FROM ONLY {}.{}",
                    quote_ident(&t.schema),
                    quote_ident(&t.name)
                );
                let n = client
                    .query_one(&sql, &[])
                    .await
                    .ok()
                    .map(|r| r.get::<_, i64>(0).max(0) as u64);
                actual.push((t.schema.clone(), t.name.clone(), n));
            }
            let (checks, p) = compare_tables(expected, &actual);
            tables = checks;
            problems.extend(p);
            if let Some(expected) = m.large_objects {
                let n: i64 = client
                    .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
                    .await
                    .map_err(|source| SourceError::Query {
                        url: url.redacted(),
                        source,
                    })?
                    .get(0);
                let actual = n.max(0) as u64;
                if actual != expected {
                    problems.push(format!(
                        "{actual} large objects restored, the manifest says {expected}"
                    ));
                }
                large_objects = Some(LargeObjectCheck { expected, actual });
            }
        }
        // Format 2 on always records them: a manifest of this format without them proves
        // nothing about completeness, so it cannot pass.
        None if m.format_version >= TABLE_STATS_FORMAT => problems.push(format!(
            "the manifest (format {}) has no table statistics, so no row count could be compared; back up again to get a snapshot that can be verified",
            m.format_version
        )),
        None => tracing::warn!(
            message = "This snapshot's manifest has no table statistics (written by an older pgferry); only the checks run."
        ),
    }
    let mut checks = Vec::new();
    for sql in &app.config.verify.checks {
        let result = match client.query_one(sql.as_str(), &[]).await {
            Ok(row) => match row.try_get::<_, bool>(0) {
                Ok(true) => None,
                Ok(false) => Some("returned false".to_string()),
                Err(e) => Some(format!("did not return one boolean: {e}")),
            },
            Err(e) => Some(source::pg_message(&e)),
        };
        if let Some(why) = &result {
            problems.push(format!("check `{sql}` failed: {why}"));
        }
        checks.push(CheckResult {
            sql: sql.clone(),
            passed: result.is_none(),
            error: result,
        });
    }
    Ok(Inspection {
        tables,
        large_objects,
        checks,
        problems,
    })
}

/// Reads the companion files' archive (the target the dump came from first, then the others
/// on a bad copy) into a [`Listing`], compares its file count with the manifest's and checks
/// every `ir_attachment.store_fname` of the scratch database against it. Returns the check
/// and its problems.
async fn check_files(
    app: &App,
    entry: &SnapshotEntry,
    archive: &FilesArchive,
    first: &str,
    url: &crate::config::PgUrl,
    scratch: &str,
    cancel: &CancellationToken,
) -> Result<(FilesCheck, Vec<String>), VerifyError> {
    let mut check = FilesCheck {
        expected_files: archive.file_count,
        ..FilesCheck::default()
    };
    let mut problems = Vec::new();
    let order = entry.targets_from(first);
    let mut listing = None;
    for name in order {
        let Some(target) = app.target(name) else {
            continue;
        };
        // Each copy with its own target's manifest (see `load::manifest_for`).
        let r = match load::manifest_for(entry, name) {
            Ok(own) => {
                let Some(own_archive) = own.files_archive() else {
                    continue;
                };
                let c = cancel.clone();
                load::consume(
                    target,
                    own,
                    load::StoredObject::files(own_archive),
                    app.config.verify_identity_file(),
                    Arc::new(LoadProgress::default()),
                    cancel,
                    move |reader| unpack::list(reader, c),
                )
                .await
            }
            Err(e) => Err(load::Consumed::Load(e)),
        };
        let error = match r {
            Ok((l, _)) => {
                check.read_from = Some(target.name.clone());
                listing = Some(l);
                break;
            }
            Err(load::Consumed::Load(LoadError::Cancelled))
            | Err(load::Consumed::Consumer(UnpackError::Cancelled)) => {
                return Err(VerifyError::Cancelled)
            }
            Err(load::Consumed::Load(e)) => e,
            Err(load::Consumed::Consumer(UnpackError::Read { source })) => load::read_error(source),
            // The copy is good but the archive is not: every target has the same bytes.
            Err(load::Consumed::Consumer(e)) => {
                problems.push(format!("the companion files archive: {e}"));
                return Ok((check, problems));
            }
        };
        tracing::warn!(message = "This target's copy of the companion files failed; trying the next target.", target = %target.name, error = %error);
        check.failed_targets.push(TargetFailure {
            target: target.name.clone(),
            error,
        });
    }
    let Some(listing) = listing else {
        problems.push("no target holds a readable copy of the companion files".into());
        return Ok((check, problems));
    };
    check.actual_files = Some(listing.counts.files);
    if listing.counts.files != archive.file_count {
        problems.push(format!(
            "the companion files archive holds {} files, the manifest says {}",
            listing.counts.files, archive.file_count
        ));
    }
    let client = source::connect(url, Some(scratch)).await?;
    let query_err = |source| SourceError::Query {
        url: url.redacted(),
        source,
    };
    if let Some((checked, missing)) = missing_attachments(&client, &listing)
        .await
        .map_err(query_err)?
    {
        check.attachments_checked = Some(checked);
        check.missing_attachments = missing.count;
        check.missing_examples = missing.examples;
        if missing.count > 0 {
            tracing::error!(message = "Attachments name files missing from the companion files.", missing = missing.count, checked, examples = %check.missing_examples.join(", "));
            problems.push(format!(
                "{} of {checked} ir_attachment rows name a file missing from the companion files (e.g. {})",
                missing.count,
                check.missing_examples.join(", ")
            ));
        }
    }
    Ok((check, problems))
}

/// Missing attachments: their count and the first few names.
#[derive(Debug, Default)]
struct Missing {
    count: u64,
    examples: Vec<String>,
}

impl Missing {
    fn note(&mut self, name: &str, listing: &Listing) {
        if !listing.contains(name) {
            self.count += 1;
            if self.examples.len() < MISSING_EXAMPLES {
                self.examples.push(name.to_string());
            }
        }
    }
}

/// Streams every non-null `ir_attachment.store_fname` (one row at a time, however many)
/// and counts those the listing lacks. `None` when the table or column does not exist.
async fn missing_attachments(
    client: &tokio_postgres::Client,
    listing: &Listing,
) -> Result<Option<(u64, Missing)>, tokio_postgres::Error> {
    let has_column = client
        .query_opt(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('ir_attachment') \
             AND attname = 'store_fname' AND NOT attisdropped",
            &[],
        )
        .await?
        .is_some();
    if !has_column {
        return Ok(None);
    }
    let rows = client
        .query_raw(
            "SELECT store_fname::text FROM ir_attachment WHERE store_fname IS NOT NULL",
            std::iter::empty::<i32>(),
        )
        .await?;
    futures::pin_mut!(rows);
    let mut checked = 0u64;
    let mut missing = Missing::default();
    while let Some(row) = rows.next().await {
        let name: String = row?.get(0);
        checked += 1;
        missing.note(&name, listing);
    }
    Ok(Some((checked, missing)))
}

/// Writes the report beside the manifest on every target holding the snapshot.
async fn write_report(app: &App, entry: &SnapshotEntry, report: &VerifyReport) {
    let body = serde_json::to_vec_pretty(report).expect("a report always serializes");
    let m = &entry.manifest;
    // The catalog only keeps manifests whose id is valid.
    let Some(id) = SnapshotId::parse(&m.snapshot_id) else {
        return;
    };
    let report_key = SnapshotKey::new(&m.source, &m.database, id).verify();
    for name in &entry.targets {
        let Some(t) = app.target(name) else { continue };
        let key = t.at(&report_key);
        if let Err(error) = t.store.put(&key, PutPayload::from(body.clone())).await {
            tracing::warn!(message = "Cannot write the verify report.", target = %t.name, error = %error);
        }
    }
}

/// Pushes the verify metrics to a Prometheus Pushgateway (for the CronJob, which is gone
/// before any scrape). A push replaces its whole group, so each database's
/// `verify_last_success` goes to a group of its own
/// (`/metrics/job/pgferry_verify/source@base64/…/database@base64/…`), holding the value the
/// buckets say (seeded from the catalog): a database that fails tonight keeps its last
/// success, and one not verified tonight is not touched. The run's counters go to the job's
/// group, and each source's `verify_overdue_databases` (`overdue`, for the sources the run
/// covered whole) to a group of the source's own, so a run of one source leaves the others'.
pub async fn push_metrics(
    app: &App,
    gateway: &str,
    databases: &[(String, String)],
    overdue: &BTreeMap<String, u64>,
) -> Result<(), String> {
    use prometheus::Encoder;
    let families: Vec<_> = app
        .metrics
        .registry
        .gather()
        .into_iter()
        .filter(|f| f.name() == "pgferry_verifies_total" || f.name() == "pgferry_build_info")
        .collect();
    let mut body = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&families, &mut body)
        .map_err(|e| e.to_string())?;
    let base = format!(
        "{}/metrics/job/pgferry_verify",
        gateway.trim_end_matches('/')
    );
    put_group(&base, body).await?;
    for (source, database) in databases {
        let last = app
            .metrics
            .verify_last_success
            .with_label_values(&[source, database])
            .get();
        if last <= 0.0 {
            continue; // never verified: no series, as on a scrape
        }
        let name = "pgferry_verify_last_success_timestamp_seconds";
        let body = format!("# TYPE {name} gauge\n{name} {last}\n");
        let url = format!(
            "{base}/source@base64/{}/database@base64/{}",
            b64(source),
            b64(database)
        );
        put_group(&url, body.into_bytes()).await?;
    }
    for (source, n) in overdue {
        let name = "pgferry_verify_overdue_databases";
        let body = format!("# TYPE {name} gauge\n{name} {n}\n");
        let url = format!("{base}/source@base64/{}", b64(source));
        put_group(&url, body.into_bytes()).await?;
    }
    Ok(())
}

/// Label values in a Pushgateway path: base64url, so any database name fits.
fn b64(value: &str) -> String {
    use base64::Engine;
    if value.is_empty() {
        return "=".into(); // the Pushgateway's spelling of an empty value
    }
    base64::engine::general_purpose::URL_SAFE.encode(value)
}

async fn put_group(url: &str, body: Vec<u8>) -> Result<(), String> {
    let resp = reqwest::Client::new()
        .put(url)
        .header("Content-Type", "text/plain; version=0.0.4")
        .body(body)
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("cannot push metrics to {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!(
            "the Pushgateway at {url} answered {}",
            resp.status()
        ));
    }
    Ok(())
}

/// The webhook reports of a verify run, one per database.
pub async fn notify_reports<E: std::fmt::Display>(
    app: &crate::app::App,
    results: &[(String, String, Result<VerifyReport, E>)],
) {
    for (source, database, r) in results {
        let result = match r {
            Ok(rep) if rep.passed() => "success",
            _ => "failure",
        };
        let mut n =
            crate::notify::RunReport::new(crate::notify::RunKind::Verify, source, database, result);
        match r {
            Ok(rep) => {
                n.snapshot_id = Some(rep.snapshot_id.clone());
                n.duration_seconds = rep.total_seconds;
                if !rep.passed() {
                    n.error = Some(rep.problems.join("; "));
                }
            }
            Err(e) => n.error = Some(e.to_string()),
        }
        app.notifier.report(&n).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, rows: u64) -> TableEntry {
        TableEntry {
            schema: "public".into(),
            name: name.into(),
            rows,
            raw_bytes: 0,
        }
    }

    #[test]
    fn compare_names_tables_and_differences() {
        let expected = vec![t("a", 10), t("b", 5), t("c", 0)];
        let actual = vec![
            ("public".into(), "a".into(), Some(10)),
            ("public".into(), "b".into(), Some(3)),
        ];
        let (checks, problems) = compare_tables(&expected, &actual);
        assert_eq!(checks.len(), 3);
        assert!(checks[0].ok());
        assert!(!checks[1].ok());
        assert_eq!(problems.len(), 2);
        assert!(
            problems[0].contains("public.b has 3 rows, the manifest says 5 (-2)"),
            "{problems:?}"
        );
        assert!(problems[1].contains("public.c is missing"), "{problems:?}");
        let (_, none) = compare_tables(&expected[..1], &actual);
        assert!(none.is_empty());
    }

    fn entry(source: &str, db: &str, id: &str, verified: Option<&str>) -> SnapshotEntry {
        let mut manifest = crate::storage::manifest::tests::sample();
        manifest.source = source.into();
        manifest.database = db.into();
        manifest.snapshot_id = id.into();
        manifest.started_at = crate::schedule::parse_snapshot_id(id).unwrap();
        SnapshotEntry {
            manifest,
            targets: vec!["a".into()],
            verify: verified.map(|v| crate::storage::catalog::VerifySummary {
                result: "failure".into(),
                finished_at: v.parse().unwrap(),
                target: "a".into(),
            }),
            objects: Default::default(),
            disagreeing: Default::default(),
        }
    }

    #[test]
    fn the_plan_takes_the_latest_snapshot_never_verified_first_then_oldest_verification() {
        // Newest data first, as the catalog gives them.
        let snaps = vec![
            entry("prod", "acme", "20261127T030000Z", None),
            entry("prod", "globex", "20261127T030000Z", None),
            entry("prod", "initech", "20261127T030000Z", None),
            entry("prod", "umbrella", "20261127T030000Z", None),
            entry(
                "prod",
                "acme",
                "20261126T030000Z",
                Some("2026-11-26T04:00:00Z"),
            ),
            // An older snapshot's report counts: globex's last verification is its newest.
            entry(
                "prod",
                "globex",
                "20261125T030000Z",
                Some("2026-11-25T04:00:00Z"),
            ),
            entry(
                "prod",
                "globex",
                "20261124T030000Z",
                Some("2026-11-24T04:00:00Z"),
            ),
            entry(
                "prod",
                "initech",
                "20261126T030000Z",
                Some("2026-11-26T05:00:00Z"),
            ),
            entry("dev", "zeta", "20261127T030000Z", None),
        ];
        let p = plan(&snaps);
        let order: Vec<(&str, &str, Option<String>)> = p
            .iter()
            .map(|p| {
                (
                    p.source(),
                    p.database(),
                    p.last_verified.map(|t| t.to_rfc3339()),
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                ("dev", "zeta", None),
                ("prod", "umbrella", None),
                ("prod", "globex", Some("2026-11-25T04:00:00+00:00".into())),
                ("prod", "acme", Some("2026-11-26T04:00:00+00:00".into())),
                ("prod", "initech", Some("2026-11-26T05:00:00+00:00".into())),
            ]
        );
        // Each database's latest snapshot is the one verified.
        assert!(p.iter().all(|p| p.entry.id() == "20261127T030000Z"));
    }

    #[test]
    fn overdue_counts_old_and_missing_reports_but_not_tonights() {
        let snaps = vec![
            entry(
                "prod",
                "acme",
                "20261127T030000Z",
                Some("2026-11-27T04:00:00Z"),
            ),
            entry(
                "prod",
                "globex",
                "20261127T030000Z",
                Some("2026-11-24T04:00:00Z"),
            ),
            entry("prod", "initech", "20261127T030000Z", None),
            entry("prod", "umbrella", "20261127T030000Z", None),
        ];
        let p = plan(&snaps);
        let now: DateTime<Utc> = "2026-11-27T06:00:00Z".parse().unwrap();
        let tonight: HashSet<(String, String)> =
            [("prod".to_string(), "umbrella".to_string())].into();
        let h48 = std::time::Duration::from_secs(48 * 3600);
        let got = overdue(&p, &tonight, &["prod", "empty"], now, h48);
        // globex (3 days) and initech (never); acme is recent, umbrella verified tonight.
        assert_eq!(
            got,
            BTreeMap::from([("empty".into(), 0), ("prod".into(), 2)])
        );
        let h100 = std::time::Duration::from_secs(100 * 3600);
        let got = overdue(&p, &HashSet::new(), &["prod"], now, h100);
        assert_eq!(got, BTreeMap::from([("prod".into(), 2)]));
    }

    #[tokio::test]
    async fn missing_attachments_are_counted_with_a_few_examples() {
        use crate::files::unpack::tests::raw_entry;
        let mut b = tar::Builder::new(Vec::new());
        for name in ["ab/ab01", "ab/ab02", "cd/cd03"] {
            raw_entry(
                &mut b,
                name.as_bytes(),
                tar::EntryType::Regular,
                0o644,
                b"x",
                None,
            );
        }
        let listing = unpack::list(
            std::io::Cursor::new(b.into_inner().unwrap()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let mut missing = Missing::default();
        for name in ["ab/ab01", "/cd/cd03", "ab/ab02"] {
            missing.note(name, &listing);
        }
        assert_eq!(missing.count, 0);
        let absent: Vec<String> = (0..8).map(|i| format!("ef/ef{i:02}")).collect();
        for name in &absent {
            missing.note(name, &listing);
        }
        missing.note("../ab/ab01", &listing);
        assert_eq!(missing.count, 9);
        assert_eq!(missing.examples, absent[..MISSING_EXAMPLES].to_vec());
    }

    #[test]
    fn concurrent_verifies_of_a_fleet_never_share_a_scratch_database_or_lock() {
        let id = "20261127T030000Z";
        let keys: Vec<String> = (0..300)
            .flat_map(|i| {
                ["prod", "staging"].map(|s| scratch_key(s, &format!("odoo_client_{i:03}")))
            })
            .collect();
        let names: HashSet<String> = keys.iter().map(|k| guard::tmp_name(k, id)).collect();
        assert_eq!(names.len(), keys.len(), "scratch names collide");
        // One verify's leftover cleaning (LIKE its own prefix) never matches another's.
        let prefixes: Vec<String> = keys
            .iter()
            .map(|k| format!("{}{}_", guard::TMP_PREFIX, guard::dest_hash(k)))
            .collect();
        for (i, name) in names.iter().enumerate() {
            let matching = prefixes
                .iter()
                .filter(|p| name.starts_with(p.as_str()))
                .count();
            assert_eq!(matching, 1, "name {i}: {name}");
        }
        let locks: HashSet<i32> = keys.iter().map(|k| guard::lock_key(k)).collect();
        assert_eq!(locks.len(), keys.len(), "advisory lock keys collide");
    }
}
