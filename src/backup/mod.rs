//! One backup of one database: pg_dump → pipeline → commit.
//!
//! [`backup_slot`] is what the daemon and `pgferry backup` call: it takes the database's
//! advisory lock (`lock`), skips a slot that is already committed, and runs the backup
//! (`run`, logged, measured and notified by `observed`): connect, spawn pg_dump, stream it through the `pipeline` (zstd,
//! sha256, fan-out to every target), and once pg_dump exited 0, archive the database's
//! companion files the same way when the source has `files` (`files`), then hand the open
//! uploads to the `commit` (write-once objects, manifests last, copies kept below
//! `min_targets`). Scheduling and retention are the caller's (`schedule`, `daemon`).

pub mod commit;
pub mod files;
pub mod lock;
pub mod pipeline;

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::archive::DumpStatsTap;
use crate::config::SourceConfig;
use crate::encryption;
use crate::metrics::{now_seconds, Outcome};
use crate::notify;
use crate::source::{self, SourceError};
use crate::storage::key::{RunId, SnapshotKey};
use crate::storage::manifest::{Compression, Files, Manifest, NoFiles, TableEntry};
use crate::storage::target;
use commit::{Commit, Stopped};
use files::{Companion, FilesError};
use lock::{DumpLock, Presence};
use pipeline::{PipelineError, PipelineSettings, Progress, Sink, TargetFailure};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot take the advisory lock of {database}: {source}")]
    Lock {
        database: String,
        source: SourceError,
    },
    #[error(
        "pg_dump of {database} failed ({status}): {stderr}{}",
        privilege_hint(stderr)
    )]
    DumpFailed {
        database: String,
        status: String,
        stderr: String,
    },
    #[error("backup of {database}: {source}")]
    Pipeline {
        database: String,
        source: PipelineError,
    },
    #[error(
        "backup of {database} was committed on no target: {}",
        describe(failures)
    )]
    NotCommitted {
        database: String,
        failures: Vec<TargetFailure>,
    },
    #[error("backup of {database} committed on only {} target(s) ({}), fewer than pipeline.min_targets = {}; the copies are kept (the run counts as failed). Failures: {}", .commit.committed.len(), .commit.manifest.targets.join(","), .commit.min_targets, describe(&.commit.failures))]
    Degraded {
        database: String,
        commit: Box<Commit>,
    },
    #[error("backup of {database} stopped: the advisory lock's session on the source ended, so another replica may be dumping it; nothing was committed by this run")]
    LockLost { database: String },
    #[error("backup of {database} was cancelled; nothing was committed")]
    Cancelled { database: String },
    #[error("backup of {database}: {source}; nothing was committed")]
    Files {
        database: String,
        source: FilesError,
    },
}

fn describe(failures: &[TargetFailure]) -> String {
    crate::storage::target::describe_failures(failures)
}

impl BackupError {
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            BackupError::Cancelled { .. }
                | BackupError::Pipeline {
                    source: PipelineError::Cancelled,
                    ..
                }
        )
    }

    /// Whether a later attempt in the same slot may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackupError::Source(e) | BackupError::Lock { source: e, .. } => e.is_retryable(),
            BackupError::DumpFailed { .. }
            | BackupError::NotCommitted { .. }
            | BackupError::Degraded { .. }
            | BackupError::LockLost { .. } => true,
            BackupError::Files { source, .. } => source.is_retryable(),
            BackupError::Pipeline { source, .. } => !matches!(source, PipelineError::Cancelled),
            BackupError::Cancelled { .. } => false,
        }
    }

    /// The manifest this failed run committed anyway (below `min_targets`).
    pub fn committed_manifest(&self) -> Option<&Manifest> {
        match self {
            BackupError::Degraded { commit, .. } => Some(&commit.manifest),
            _ => None,
        }
    }
}

/// How long reading the previous snapshot's size may take (it only sizes the first part).
const HISTORY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The stored sizes of the newest committed snapshot of `database` (its dump, its files
/// archive), to size the first parts.
async fn previous_stored_size(
    app: &App,
    source: &str,
    database: &str,
) -> Option<(u64, Option<u64>)> {
    let filter = crate::storage::catalog::Filter {
        source: Some(source.into()),
        databases: vec![database.into()],
        target: None,
    };
    let cat = app.catalog(&filter).await;
    let newest = cat.of(source, database).next();
    newest.map(|e| {
        (
            e.manifest.stored_size,
            e.manifest.files_archive().map(|a| a.stored_size),
        )
    })
}

/// What held the lock pg_dump gave up on, for its error message.
async fn lock_diagnosis(
    source: &SourceConfig,
    database: &str,
    waited: std::time::Duration,
) -> String {
    match source::lock_blockers(&source.url, database).await {
        Ok(b) if b.is_empty() => format!(
            "\n(pg_dump waited {waited:?}, pipeline.lock_wait_timeout; the lock was released since)"
        ),
        Ok(b) => format!(
            "\npg_dump waited {waited:?} (pipeline.lock_wait_timeout) for a table lock: {}. End that transaction (SELECT pg_terminate_backend(<pid>)) or raise pipeline.lock_wait_timeout",
            b.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
        ),
        Err(e) => format!("\n(could not read who holds the lock: {e})"),
    }
}

/// What a committed backup did.
#[derive(Debug)]
pub struct BackupReport {
    pub manifest: Manifest,
    /// Targets that did not get the snapshot, and why.
    pub failed_targets: Vec<TargetFailure>,
    pub duration: std::time::Duration,
}

/// How one slot of one database went.
#[derive(Debug)]
// One value per backup run: its size does not matter, and boxing would only add noise.
#[allow(clippy::large_enum_variant)]
pub enum SlotOutcome {
    Committed(BackupReport),
    /// Every target that answered holds the slot's manifest: nothing to do.
    AlreadyCommitted(Presence),
    /// Another session (another replica, a manual run) holds the database's lock.
    LockedElsewhere,
}

/// Backs up one slot of `database` the way every caller must: under the database's advisory
/// lock (watched while held), and only when the slot is not committed yet (`force` skips that
/// check; the caller then passes a snapshot id of its own).
pub async fn backup_slot(
    app: &App,
    source: &SourceConfig,
    snapshot: &SnapshotKey,
    force: bool,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<SlotOutcome, BackupError> {
    let lock = lock::try_lock(source, &snapshot.database)
        .await
        .map_err(|source| BackupError::Lock {
            database: snapshot.database.clone(),
            source,
        })?;
    let Some(lock) = lock else {
        return Ok(SlotOutcome::LockedElsewhere);
    };
    if !force {
        let presence =
            lock::presence(&app.targets, snapshot, app.config.pipeline.stall_timeout).await;
        if presence.is_committed() {
            return Ok(SlotOutcome::AlreadyCommitted(presence));
        }
    }
    let backup = run(app, source, snapshot, &lock, progress, cancel);
    let report = observed(app, source, snapshot, backup).await;
    drop(lock);
    report.map(SlotOutcome::Committed)
}

/// Runs `backup` (of `snapshot`, a database of `source`) as an operator sees it: in its
/// tracing span, the start and end pinged and reported, its duration, outcome and committed
/// manifest in the metrics, its result logged once.
async fn observed(
    app: &App,
    source: &SourceConfig,
    snapshot: &SnapshotKey,
    backup: impl std::future::Future<Output = Result<BackupReport, BackupError>>,
) -> Result<BackupReport, BackupError> {
    let database = snapshot.database.as_str();
    let span = tracing::info_span!("backup", source = %source.name, database = %database, snapshot_id = %snapshot.id);
    let started = Instant::now();
    app.notifier
        .ping(source.ping.as_ref(), notify::Ping::Start)
        .await;
    let running = crate::metrics::RunningGuard::new(&app.metrics, &source.name, database);
    let result = backup.instrument(span.clone()).await;
    let _enter = span.enter();
    let labels = [source.name.as_str(), database];
    let elapsed = started.elapsed();
    app.metrics
        .backup_duration
        .with_label_values(&labels)
        .observe(elapsed.as_secs_f64());
    if let Some(m) = result.as_ref().map(|r| &r.manifest).ok().or_else(|| {
        result
            .as_ref()
            .err()
            .and_then(BackupError::committed_manifest)
    }) {
        app.metrics.record_committed(m, result.is_err());
    }
    let outcome = match &result {
        Ok(report) => {
            let m = &report.manifest;
            let files = m.files_archive();
            tracing::info!(
                message = "Backup committed.",
                raw_bytes = m.raw_size,
                stored_bytes = m.stored_size,
                files = files.map(|a| a.file_count),
                file_bytes = files.map(|a| a.file_bytes),
                files_stored_bytes = files.map(|a| a.stored_size),
                files_skipped = files.map(|a| a.skipped),
                targets = %m.targets.join(","),
                seconds = elapsed.as_secs_f64()
            );
            for f in &report.failed_targets {
                tracing::warn!(message = "Snapshot not committed on a target.", target = %f.target, error = %f.error);
            }
            Outcome::Success
        }
        Err(e) if e.is_cancelled() => {
            tracing::info!(message = "Backup cancelled; nothing committed.");
            Outcome::Cancelled
        }
        Err(e @ BackupError::Degraded { .. }) => {
            tracing::error!(message = "Backup committed on fewer targets than pipeline.min_targets; the copies are kept.", error = %e);
            Outcome::Failure
        }
        Err(e) => {
            tracing::error!(message = "Backup failed; nothing committed.", error = %e);
            Outcome::Failure
        }
    };
    app.metrics
        .backups_total
        .with_label_values(&[&source.name, database, outcome.as_str()])
        .inc();
    drop(running);
    notify_finished(app, source, snapshot, outcome, elapsed, &result).await;
    result.map(|mut r| {
        r.duration = elapsed;
        r
    })
}

/// The webhook report and the source's ping of one finished backup (a cancelled run pings
/// nothing: it neither succeeded nor failed).
async fn notify_finished(
    app: &App,
    source: &SourceConfig,
    snapshot: &SnapshotKey,
    outcome: Outcome,
    elapsed: std::time::Duration,
    result: &Result<BackupReport, BackupError>,
) {
    let mut report = notify::RunReport::new(
        notify::RunKind::Backup,
        &source.name,
        &snapshot.database,
        outcome.as_str(),
    );
    report.snapshot_id = Some(snapshot.id.to_string());
    report.duration_seconds = elapsed.as_secs_f64();
    match result {
        Ok(r) => {
            report.raw_bytes = Some(r.manifest.raw_size);
            report.stored_bytes = Some(r.manifest.stored_size);
            let files = r.manifest.files_archive();
            report.file_count = files.map(|a| a.file_count);
            report.file_bytes = files.map(|a| a.file_bytes);
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    app.notifier.report(&report).await;
    let ping = match outcome {
        Outcome::Success => Some(notify::Ping::Success),
        Outcome::Failure => Some(notify::Ping::Fail),
        Outcome::Skipped | Outcome::Cancelled => None,
    };
    if let Some(p) = ping {
        app.notifier.ping(source.ping.as_ref(), p).await;
    }
}

/// connect → pg_dump → pipeline → commit.
async fn run(
    app: &App,
    source: &SourceConfig,
    snapshot: &SnapshotKey,
    lock: &DumpLock,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<BackupReport, BackupError> {
    let cfg = &app.config;
    let database = snapshot.database.as_str();
    let started_at = Utc::now();
    let client = source::connect(&source.url, None).await?;
    let server = source::server_version(&client, &source.url).await?;
    let tool = source::find_tool("pg_dump", source.pg_bin_dir.as_deref(), &server).await?;
    let db_size = source::database_size(&client, &source.url, database).await?;
    let system_identifier = source::system_identifier(&client, &source.url).await?;
    drop(client);

    // The pipeline stops when the run is cancelled or the lock is lost.
    let stop = cancel.child_token();
    let relay = {
        let (lost, stop) = (lock.lost().clone(), stop.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            lost.cancelled().await;
            stop.cancel();
        }))
    };
    let stopped = || {
        if lock.is_lost() {
            Some(Stopped::LockLost)
        } else if cancel.is_cancelled() {
            Some(Stopped::Cancelled)
        } else {
            None
        }
    };
    let stopped_error = |why: Stopped| match why {
        Stopped::LockLost => BackupError::LockLost {
            database: database.to_string(),
        },
        Stopped::Cancelled => BackupError::Cancelled {
            database: database.to_string(),
        },
    };

    // One part stream feeds every target: sized for the smallest part limit, first part from
    // the previous snapshot's stored size (see `target::PartSizer`).
    let max_parts = app.targets.iter().map(|t| t.max_parts).min().unwrap_or(1);
    // Bounded: a stalled or unreachable target must not hold the backup before it starts.
    let previous = tokio::time::timeout(
        cfg.pipeline.stall_timeout.min(HISTORY_TIMEOUT),
        previous_stored_size(app, &source.name, database),
    )
    .await
    .unwrap_or_else(|_| {
        tracing::warn!(message = "The targets did not list the previous snapshot in time; sizing parts from the database size.");
        None
    });
    let (previous, previous_files) = previous.unzip();
    let previous_files = previous_files.flatten();
    // No history: the on-disk size, an upper bound of what the compressed dump stores.
    let parts = target::PartSizer::new(previous.or(Some(db_size)), max_parts);
    let settings = PipelineSettings {
        zstd_level: cfg.pipeline.zstd_level,
        zstd_workers: cfg.pipeline.zstd_workers,
        parts: parts.clone(),
        stall_timeout: cfg.pipeline.stall_timeout,
        idle_timeout: cfg.pipeline.idle_timeout,
        memory_budget: cfg.pipeline.memory_budget,
        recipients: cfg.encryption.recipients.clone(),
    };
    let run_id = RunId::random();
    let encrypted = !cfg.encryption.recipients.is_empty();
    let object = snapshot.dump_as(&run_id, encrypted);
    let sinks: Vec<Sink> = app
        .targets
        .iter()
        .map(|t| Sink {
            key: t.at(&object),
            target: t.clone(),
        })
        .collect();

    tracing::info!(
        message = "Backup started.",
        pg_dump = %tool.path.display(),
        server_version = %server.text,
        database_bytes = db_size,
        part_size = parts.first(),
        previous_stored_bytes = previous,
        run = %run_id,
        encrypted_to = cfg.encryption.recipients.len()
    );
    let mut child =
        source::spawn_pg_dump(&tool, &source.url, database, cfg.pipeline.lock_wait_timeout)?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let password = source::resolve_password(&source.url.parsed);
    let stderr_task = tokio::spawn(source::read_stderr_tail(stderr, password));

    // A failed pipeline (a silent pg_dump past idle_timeout, every target gone) kills pg_dump:
    // a stopped or blocked child would otherwise be waited for forever.
    let kill = stop.child_token();
    let (piped, status) = tokio::join!(
        async {
            let r = pipeline::run(
                stdout,
                &settings,
                sinks,
                DumpStatsTap::new(),
                progress.clone(),
                stop.clone(),
            )
            .await;
            if r.is_err() {
                kill.cancel();
            }
            r
        },
        async {
            tokio::select! {
                s = child.wait() => s,
                _ = kill.cancelled() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            }
        }
    );
    let mut stderr = stderr_task.await.unwrap_or_default();
    if source::is_lock_timeout(&stderr) {
        stderr.push_str(&lock_diagnosis(source, database, cfg.pipeline.lock_wait_timeout).await);
    }
    let dump_failed = |status: String| BackupError::DumpFailed {
        database: database.to_string(),
        status,
        stderr: if stderr.is_empty() {
            "(pg_dump printed nothing)".into()
        } else {
            stderr.clone()
        },
    };
    let status_ok = matches!(&status, Ok(s) if s.success());
    let output = match piped {
        Ok(out) if status_ok => out,
        Ok(out) => {
            for u in out.uploads {
                u.abort().await;
            }
            count_failures(app, &out.failures);
            if let Some(why) = stopped() {
                return Err(stopped_error(why));
            }
            return Err(dump_failed(describe_status(&status)));
        }
        Err(PipelineError::Cancelled) => {
            return Err(stopped_error(stopped().unwrap_or(Stopped::Cancelled)))
        }
        // pg_dump's own failure is the root cause when the stream broke because it died.
        Err(PipelineError::Read(_)) if !status_ok => {
            return Err(dump_failed(describe_status(&status)))
        }
        Err(e) => {
            if let PipelineError::NoTargetLeft(failures) = &e {
                count_failures(app, failures);
            }
            return Err(BackupError::Pipeline {
                database: database.into(),
                source: e,
            });
        }
    };

    let stats = match output.tap.finish() {
        Ok(stats) => Some(stats),
        Err(error) => {
            tracing::warn!(message = "Could not read table statistics from the dump stream; the snapshot has none.", error = %error);
            None
        }
    };

    // The companion files, after pg_dump exited 0 and before the commit. Sequential, so the
    // memory budget holds: the dump's uploads stay open meanwhile, with no part in memory.
    // And after pg_dump's snapshot: every row of the dump that names a file (Odoo's
    // `ir_attachment.store_fname`) names one already written, since Odoo writes the file
    // before the row's transaction commits and only deletes files whose rows are gone.
    let files_object = snapshot.files_as(&run_id, encrypted);
    let companion = match &source.files {
        None => Companion::NotConfigured,
        Some(template) => {
            let targets = output.uploads.iter().map(|u| u.target.clone()).collect();
            let settings = PipelineSettings {
                parts: target::PartSizer::new(previous_files, max_parts),
                ..settings.clone()
            };
            let archived = files::archive(
                template,
                database,
                &files_object,
                targets,
                &settings,
                progress,
                stop.clone(),
            )
            .await;
            match archived {
                Ok(c) => c,
                Err(e) => {
                    for u in output.uploads {
                        u.abort().await;
                    }
                    count_failures(app, &output.failures);
                    if let Some(why) = stopped() {
                        return Err(stopped_error(why));
                    }
                    return Err(match e {
                        FilesError::Pipeline {
                            source: PipelineError::NoTargetLeft(mut failures),
                            ..
                        } => {
                            count_failures(app, &failures);
                            let mut all = output.failures;
                            all.append(&mut failures);
                            BackupError::NotCommitted {
                                database: database.to_string(),
                                failures: all,
                            }
                        }
                        FilesError::Pipeline {
                            source: PipelineError::Cancelled,
                            ..
                        } => stopped_error(Stopped::Cancelled),
                        source => BackupError::Files {
                            database: database.to_string(),
                            source,
                        },
                    });
                }
            }
        }
    };
    drop(relay);
    let (files, files_uploads, mut files_failures) = match companion {
        Companion::NotConfigured => (None, Vec::new(), Vec::new()),
        Companion::Missing => (Some(Files::Missing(NoFiles::None)), Vec::new(), Vec::new()),
        Companion::Archived(a) => (Some(Files::Archive(a.archive)), a.uploads, a.failures),
    };

    let mut manifest = Manifest {
        format_version: 0,
        snapshot_id: snapshot.id.to_string(),
        source: source.name.clone(),
        database: database.to_string(),
        started_at,
        finished_at: Utc::now(),
        server_version: server.text.clone(),
        pg_dump_version: tool.version.clone(),
        compression: Compression {
            algorithm: "zstd".into(),
            level: cfg.pipeline.zstd_level,
        },
        object_key: object.to_string(),
        stored_size: output.stored_bytes,
        raw_size: output.raw_bytes,
        sha256: output.sha256.clone(),
        part_size: parts.first(),
        targets: Vec::new(),
        tables: stats.as_ref().map(|s| {
            s.tables
                .iter()
                .map(|t| TableEntry {
                    schema: t.schema.clone(),
                    name: t.name.clone(),
                    rows: t.rows,
                    raw_bytes: t.raw_bytes,
                })
                .collect()
        }),
        large_objects: stats.as_ref().map(|s| s.large_objects),
        pgferry_version: env!("CARGO_PKG_VERSION").to_string(),
        system_identifier: Some(system_identifier),
        encryption: encrypted.then(|| encryption::record(&cfg.encryption.recipients)),
        files,
    };
    manifest.format_version = manifest.required_version();

    if !lock.confirm().await {
        for u in output.uploads.into_iter().chain(files_uploads) {
            u.abort().await;
        }
        return Err(stopped_error(Stopped::LockLost));
    }
    let mut done = commit::commit(
        output.uploads,
        files_uploads,
        snapshot,
        manifest,
        cfg.pipeline.min_targets,
        cfg.pipeline.stall_timeout,
        stopped,
    )
    .await
    .map_err(stopped_error)?;
    let mut failures = output.failures;
    failures.append(&mut files_failures);
    failures.append(&mut done.failures);
    count_failures(app, &failures);
    let now = now_seconds();
    for c in &done.committed {
        let t = c.target.name.as_str();
        app.metrics
            .target_uploads_total
            .with_label_values(&[t, Outcome::Success.as_str()])
            .inc();
        app.metrics
            .target_uploaded_bytes_total
            .with_label_values(&[t])
            .inc_by(c.bytes);
        app.metrics
            .target_last_success
            .with_label_values(&[t])
            .set(now);
    }
    if done.committed.is_empty() {
        return Err(BackupError::NotCommitted {
            database: database.to_string(),
            failures,
        });
    }
    if done.is_degraded() {
        done.failures = failures;
        return Err(BackupError::Degraded {
            database: database.to_string(),
            commit: Box::new(done),
        });
    }
    Ok(BackupReport {
        manifest: done.manifest,
        failed_targets: failures,
        duration: Default::default(),
    })
}

/// Counts each failed target's upload, once, here.
fn count_failures(app: &App, failures: &[TargetFailure]) {
    for f in failures {
        app.metrics
            .target_uploads_total
            .with_label_values(&[&f.target, Outcome::Failure.as_str()])
            .inc();
    }
}

fn describe_status(status: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("could not wait for it: {e}"),
    }
}

/// What the backup role misses, for the pg_dump errors a minimal role runs into
/// (docs/security.md has the grants).
fn privilege_hint(stderr: &str) -> &'static str {
    if stderr.contains("permission denied for large object") {
        "; pg_read_all_data does not cover large objects: as a superuser, run `ALTER ROLE <backup role> SET lo_compat_privileges = on` (see docs/security.md)"
    } else if stderr.contains("would be affected by row-level security policy") {
        "; the table has row-level security: the backup role needs BYPASSRLS (see docs/security.md)"
    } else if stderr.contains("permission denied for") {
        "; the backup role cannot read everything: grant it pg_read_all_data (see docs/security.md)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privilege_errors_say_what_to_grant() {
        let lo = "pg_dump: error: could not open large object 16412: ERROR:  permission denied for large object 16412";
        assert!(privilege_hint(lo).contains("lo_compat_privileges"));
        let rls = "pg_dump: error: Dumping the contents of table \"t\" failed: PQgetResult() failed.\nERROR:  query would be affected by row-level security policy for table \"t\"";
        assert!(privilege_hint(rls).contains("BYPASSRLS"));
        let table = "ERROR:  permission denied for table secrets";
        assert!(privilege_hint(table).contains("pg_read_all_data"));
        assert_eq!(privilege_hint("connection refused"), "");
    }
}
