//! One backup of one database: pg_dump → pipeline → commit protocol.
//!
//! The commit protocol: uploads complete only after pg_dump exited 0 and every pipeline
//! stage succeeded; a manifest is written on each target whose upload completed, last; the
//! snapshot counts when at least `pipeline.min_targets` manifests exist. If fewer, whatever
//! was completed or written is deleted again, so nothing half-committed remains. Scheduling,
//! locking across replicas and retention are the caller's (`schedule`, `daemon`).

pub mod pipeline;

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::future::join_all;
use object_store::PutPayload;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::archive::DumpStatsTap;
use crate::config::SourceConfig;
use crate::metrics::{now_seconds, Outcome};
use crate::notify;
use crate::source::{self, SourceError};
use crate::storage::manifest::{Compression, Manifest, TableEntry, FORMAT_VERSION};
use crate::storage::target::{self, DUMP_SUFFIX, MANIFEST_SUFFIX};
use pipeline::{OpenUpload, PipelineError, PipelineSettings, Progress, Sink};

impl pipeline::RawTap for DumpStatsTap {
    fn feed(&mut self, bytes: &[u8]) {
        DumpStatsTap::feed(self, bytes);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Source(#[from] SourceError),
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
    #[error("backup of {database} committed on {committed} target(s), fewer than pipeline.min_targets = {min}; nothing was kept. Failures: {failures}")]
    TooFewTargets {
        database: String,
        committed: usize,
        min: usize,
        failures: String,
    },
    #[error("backup of {database} was cancelled; nothing was committed")]
    Cancelled { database: String },
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
            BackupError::Source(e) => e.is_retryable(),
            BackupError::DumpFailed { .. } | BackupError::TooFewTargets { .. } => true,
            BackupError::Pipeline { source, .. } => !matches!(source, PipelineError::Cancelled),
            BackupError::Cancelled { .. } => false,
        }
    }
}

/// What a committed backup did.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub manifest: Manifest,
    /// Targets that did not get the snapshot, and why.
    pub failed_targets: Vec<(String, String)>,
    pub duration: std::time::Duration,
}

/// Backs up `database` of `source` as snapshot `snapshot_id`.
pub async fn backup_database(
    app: &App,
    source: &SourceConfig,
    database: &str,
    snapshot_id: &str,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<BackupReport, BackupError> {
    let span = tracing::info_span!("backup", source = %source.name, database = %database, snapshot_id = %snapshot_id);
    let started = Instant::now();
    app.notifier
        .ping(source.ping.as_ref(), notify::Ping::Start)
        .await;
    let running = crate::metrics::RunningGuard::new(&app.metrics, &source.name, database);
    let result = run(app, source, database, snapshot_id, progress, cancel)
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    let labels = [source.name.as_str(), database];
    let elapsed = started.elapsed();
    app.metrics
        .backup_duration
        .with_label_values(&labels)
        .observe(elapsed.as_secs_f64());
    let outcome = match &result {
        Ok(report) => {
            let m = &report.manifest;
            app.metrics
                .backup_last_success
                .with_label_values(&labels)
                .set(now_seconds());
            app.metrics
                .backup_stored_bytes
                .with_label_values(&labels)
                .set(m.stored_size as i64);
            app.metrics
                .backup_raw_bytes
                .with_label_values(&labels)
                .set(m.raw_size as i64);
            tracing::info!(
                message = "Backup committed.",
                raw_bytes = m.raw_size,
                stored_bytes = m.stored_size,
                targets = %m.targets.join(","),
                seconds = elapsed.as_secs_f64()
            );
            Outcome::Success
        }
        Err(e) if e.is_cancelled() => {
            tracing::info!(message = "Backup cancelled; nothing committed.");
            Outcome::Cancelled
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
    notify_finished(
        app,
        source,
        database,
        snapshot_id,
        outcome,
        elapsed,
        &result,
    )
    .await;
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
    database: &str,
    snapshot_id: &str,
    outcome: Outcome,
    elapsed: std::time::Duration,
    result: &Result<BackupReport, BackupError>,
) {
    let mut report = notify::RunReport::new(
        notify::RunKind::Backup,
        &source.name,
        database,
        outcome.as_str(),
    );
    report.snapshot_id = Some(snapshot_id.to_string());
    report.duration_seconds = elapsed.as_secs_f64();
    match result {
        Ok(r) => {
            report.raw_bytes = Some(r.manifest.raw_size);
            report.stored_bytes = Some(r.manifest.stored_size);
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

async fn run(
    app: &App,
    source: &SourceConfig,
    database: &str,
    snapshot_id: &str,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<BackupReport, BackupError> {
    let cfg = &app.config;
    let started_at = Utc::now();
    let client = source::connect(&source.url, None).await?;
    let server = source::server_version(&client, &source.url).await?;
    let tool = source::find_tool("pg_dump", source.pg_bin_dir.as_deref(), &server).await?;
    let db_size = source::database_size(&client, &source.url, database).await?;
    let system_identifier = source::system_identifier(&client, &source.url).await?;
    drop(client);

    let min_part = app
        .targets
        .iter()
        .map(|t| target::part_size(db_size, t.max_parts))
        .max()
        .unwrap_or(crate::config::MIN_PART_SIZE);
    let settings = PipelineSettings {
        zstd_level: cfg.pipeline.zstd_level,
        zstd_workers: cfg.pipeline.zstd_workers,
        part_size: min_part as usize,
        stall_timeout: cfg.pipeline.stall_timeout,
    };
    let sinks: Vec<Sink> = app
        .targets
        .iter()
        .map(|t| Sink {
            key: t.key(&source.name, database, snapshot_id, DUMP_SUFFIX),
            target: t.clone(),
        })
        .collect();

    tracing::info!(
        message = "Backup started.",
        pg_dump = %tool.path.display(),
        server_version = %server.text,
        database_bytes = db_size,
        part_size = settings.part_size
    );
    let mut child = source::spawn_pg_dump(&tool, &source.url, database)?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let password = source::resolve_password(&source.url.parsed);
    let stderr_task = tokio::spawn(source::read_stderr_tail(stderr, password));

    let (piped, status) = tokio::join!(
        pipeline::run(
            stdout,
            &settings,
            sinks,
            DumpStatsTap::new(),
            progress,
            cancel.clone()
        ),
        async {
            tokio::select! {
                s = child.wait() => s,
                _ = cancel.cancelled() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            }
        }
    );
    let stderr = stderr_task.await.unwrap_or_default();
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
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled {
                    database: database.into(),
                });
            }
            return Err(dump_failed(describe_status(&status)));
        }
        Err(PipelineError::Cancelled) => {
            return Err(BackupError::Cancelled {
                database: database.into(),
            })
        }
        // pg_dump's own failure is the root cause when the stream broke because it died.
        Err(PipelineError::Read(_)) if !status_ok => {
            return Err(dump_failed(describe_status(&status)))
        }
        Err(e) => {
            // Every target failed: each is a failed upload, as when only some do.
            if let PipelineError::NoTargetLeft(failures) = &e {
                for f in failures {
                    app.metrics
                        .target_uploads_total
                        .with_label_values(&[&f.target, Outcome::Failure.as_str()])
                        .inc();
                }
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

    let mut failed: Vec<(String, String)> = output
        .failures
        .iter()
        .map(|f| (f.target.clone(), f.error.to_string()))
        .collect();
    for f in &output.failures {
        app.metrics
            .target_uploads_total
            .with_label_values(&[&f.target, Outcome::Failure.as_str()])
            .inc();
    }

    // Complete every open upload.
    let completions = join_all(output.uploads.into_iter().map(complete)).await;
    let mut completed = Vec::new();
    for (upload, result) in completions {
        match result {
            Ok(()) => completed.push(upload),
            Err(e) => failed.push((upload.0.name.clone(), e)),
        }
    }
    let min = cfg.pipeline.min_targets;
    let object_key =
        target::snapshot_path(&source.name, database, snapshot_id, DUMP_SUFFIX).to_string();
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        snapshot_id: snapshot_id.to_string(),
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
        object_key,
        stored_size: output.stored_bytes,
        raw_size: output.raw_bytes,
        sha256: output.sha256.clone(),
        part_size: settings.part_size as u64,
        targets: completed.iter().map(|c| c.0.name.clone()).collect(),
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
    };

    let too_few = |committed: usize, failed: &[(String, String)]| BackupError::TooFewTargets {
        database: database.to_string(),
        committed,
        min,
        failures: failed
            .iter()
            .map(|(t, e)| format!("{t}: {e}"))
            .collect::<Vec<_>>()
            .join("; "),
    };
    if completed.len() < min {
        delete_all(&completed, source, database, snapshot_id, false).await;
        return Err(too_few(completed.len(), &failed));
    }

    // The commit: manifests, last.
    let body = manifest.to_json();
    let writes = join_all(completed.iter().map(|(t, _)| {
        let key = t.key(&source.name, database, snapshot_id, MANIFEST_SUFFIX);
        let body = body.clone();
        async move { t.store.put(&key, PutPayload::from(body)).await }
    }))
    .await;
    let mut committed = Vec::new();
    let mut uncommitted = Vec::new();
    for (c, w) in completed.into_iter().zip(writes) {
        match w {
            Ok(_) => committed.push(c),
            Err(e) => {
                failed.push((
                    c.0.name.clone(),
                    format!("writing the manifest failed: {e}"),
                ));
                uncommitted.push(c);
            }
        }
    }
    delete_all(&uncommitted, source, database, snapshot_id, false).await;
    if committed.len() < min {
        delete_all(&committed, source, database, snapshot_id, true).await;
        return Err(too_few(committed.len(), &failed));
    }
    if !uncommitted.is_empty() {
        // Rewrite the manifests so that they name only the targets that hold the snapshot.
        manifest.targets = committed.iter().map(|c| c.0.name.clone()).collect();
        let body = manifest.to_json();
        for (t, _) in &committed {
            let key = t.key(&source.name, database, snapshot_id, MANIFEST_SUFFIX);
            if let Err(error) = t.store.put(&key, PutPayload::from(body.clone())).await {
                tracing::warn!(message = "Could not rewrite a manifest's target list.", target = %t.name, error = %error);
            }
        }
    }
    let now = now_seconds();
    for (t, bytes) in &committed {
        app.metrics
            .target_uploads_total
            .with_label_values(&[&t.name, Outcome::Success.as_str()])
            .inc();
        app.metrics
            .target_uploaded_bytes_total
            .with_label_values(&[&t.name])
            .inc_by(*bytes);
        app.metrics
            .target_last_success
            .with_label_values(&[&t.name])
            .set(now);
    }
    for (t, error) in &failed {
        tracing::warn!(message = "Snapshot not committed on a target.", target = %t, error = %error);
    }
    Ok(BackupReport {
        manifest,
        failed_targets: failed,
        duration: Default::default(),
    })
}

async fn complete(u: OpenUpload) -> ((target::Target, u64), Result<(), String>) {
    let OpenUpload {
        target,
        mut upload,
        bytes,
        key,
    } = u;
    let r = upload
        .complete()
        .await
        .map(|_| ())
        .map_err(|e| format!("completing the upload of {key} failed: {e}"));
    if r.is_err() {
        let _ = upload.abort().await;
    }
    ((target, bytes), r)
}

/// Deletes the dump objects (and the manifests first, when `manifests`) of a snapshot.
async fn delete_all(
    on: &[(target::Target, u64)],
    source: &SourceConfig,
    database: &str,
    snapshot_id: &str,
    manifests: bool,
) {
    for (t, _) in on {
        let mut keys = Vec::new();
        if manifests {
            keys.push(t.key(&source.name, database, snapshot_id, MANIFEST_SUFFIX));
        }
        keys.push(t.key(&source.name, database, snapshot_id, DUMP_SUFFIX));
        for key in keys {
            if let Err(error) = t.store.delete(&key).await {
                tracing::warn!(message = "Could not delete an uncommitted object; retention will.", target = %t.name, key = %key, error = %error);
            }
        }
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
