//! `pgferry daemon`: the scheduler, the HTTP server and graceful shutdown, wired together.
//!
//! [`run`] builds a [`scheduler::Scheduler`] over the real [`PgRunner`] (advisory lock →
//! "already committed?" check → `backup::backup_slot` → retention), starts the readiness
//! checker and the HTTP server, and waits for SIGTERM or SIGINT. Then it stops scheduling,
//! reports not ready, lets running backups finish for `daemon.shutdown_grace`, cancels what is left
//! (pg_dump killed, uploads aborted, no manifest) and returns once everything has ended.

pub mod http;
pub mod readiness;
pub mod repair_loop;
pub mod scheduler;
pub mod state;

use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::backup::pipeline::Progress;
use crate::backup::{self, SlotOutcome};
use crate::config::SourceConfig;
use crate::retention::prune::{self, Selection};
use crate::retention::BackupOutcome;
use crate::source;
use crate::storage::key::{SnapshotId, SnapshotKey};

use scheduler::{Attempt, RetryPolicy, RunError, Runner, Scheduler, SchedulerParts, SystemClock};
use state::StateMap;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr} (daemon.listen): {source}; pick a free address")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// The real [`Runner`]: PostgreSQL discovery, the advisory lock, the committed check, the
/// backup pipeline, and retention after a commit.
pub struct PgRunner {
    pub app: App,
}

impl Runner for PgRunner {
    async fn discover(&self, source: &SourceConfig) -> Result<Vec<String>, RunError> {
        let discover_err = |error| RunError::Discover {
            source_name: source.name.clone(),
            error,
        };
        let client = source::connect(&source.url, None)
            .await
            .map_err(discover_err)?;
        let selection = source::discover(&client, source, &[])
            .await
            .map_err(discover_err)?;
        for s in &selection.skipped {
            tracing::warn!(message = "Skipping a database the source's globs select.", source = %source.name, database = %s.database, reason = %s.reason);
        }
        Ok(selection.databases)
    }

    async fn attempt(
        &self,
        source: &SourceConfig,
        database: &str,
        snapshot_id: &str,
        cancel: CancellationToken,
    ) -> Result<Attempt, RunError> {
        let id = SnapshotId::parse(snapshot_id).expect("the scheduler names slots by SnapshotId");
        let snapshot = SnapshotKey::new(&source.name, database, id);
        let progress = Arc::new(Progress::default());
        match backup::backup_slot(&self.app, source, &snapshot, false, progress, cancel).await? {
            SlotOutcome::Committed(report) => Ok(Attempt::Committed {
                finished_at: report.manifest.finished_at,
            }),
            SlotOutcome::AlreadyCommitted(_) => Ok(Attempt::AlreadyCommitted),
            SlotOutcome::LockedElsewhere => Ok(Attempt::LockedElsewhere),
        }
    }

    async fn after_commit(
        &self,
        source: &SourceConfig,
        database: &str,
        last: Option<BackupOutcome>,
    ) {
        let selection = Selection {
            source: Some(source.name.clone()),
            database: Some(database.to_string()),
        };
        let report = prune::prune(
            &self.app,
            &selection,
            &move |_, _| last,
            Utc::now(),
            self.app.config.pipeline.orphan_grace,
            false,
        )
        .await;
        for e in &report.errors {
            tracing::warn!(message = "Retention incomplete.", source = %source.name, database = %database, error = %e);
        }
    }
}

/// The daemon's scheduler type.
pub type DaemonScheduler = Scheduler<PgRunner, SystemClock>;

/// Runs the daemon until SIGTERM/SIGINT, then drains. Returns Ok once everything has ended.
pub async fn run(app: App) -> Result<(), DaemonError> {
    let stop = CancellationToken::new();
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(DaemonError::Signals)?;
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!(message = "SIGTERM received: stopping the schedule, letting running backups finish."),
                r = tokio::signal::ctrl_c() => match r {
                    Ok(()) => tracing::info!(message = "SIGINT received: stopping the schedule, letting running backups finish."),
                    Err(error) => tracing::error!(message = "Cannot wait for SIGINT.", error = %error),
                },
            }
            stop.cancel();
        });
    }
    run_until(app, stop).await
}

/// Runs the daemon until `stop` is cancelled, then drains.
pub async fn run_until(app: App, stop: CancellationToken) -> Result<(), DaemonError> {
    let state = Arc::new(StateMap::default());
    let scheduler = Scheduler::new(SchedulerParts {
        runner: PgRunner { app: app.clone() },
        clock: SystemClock,
        sources: app.config.sources.clone(),
        state,
        max_concurrent: app.config.daemon.max_concurrent_backups,
        retry: RetryPolicy::default(),
        metrics: app.metrics.clone(),
    });
    let readiness = readiness::ReadinessCache::default();
    let addr = app.config.daemon.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind { addr, source })?;
    tracing::info!(
        message = "Daemon started.",
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        sources = app.config.sources.len(),
        targets = app.targets.len()
    );
    let checker = tokio::spawn(readiness::run(app.clone(), readiness.clone(), stop.clone()));
    let bucket_metrics = tokio::spawn(bucket_metrics_loop(app.clone(), stop.clone()));
    let repairer = tokio::spawn(repair_loop::run(app.clone(), stop.clone()));
    let verifier = app
        .config
        .verify
        .schedule
        .clone()
        .map(|schedule| tokio::spawn(verify_loop(app.clone(), schedule, stop.clone())));
    scheduler.start();
    let http_state = crate::daemon::http::HttpState::new(app.clone(), scheduler.clone(), readiness);
    let router = crate::daemon::http::router(http_state);
    // The HTTP server outlives the drain: /metrics and /api/v1/status keep answering while
    // running backups finish (/readyz turns 503 at once), and it stops once they have ended.
    let http_stop = CancellationToken::new();
    let server = {
        let http_stop = http_stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        })
    };
    stop.cancelled().await;
    let grace = app.config.daemon.shutdown_grace;
    scheduler.drain(grace).await;
    http_stop.cancel();
    let served = server.await;
    let _ = checker.await;
    let _ = bucket_metrics.await;
    let _ = repairer.await;
    if let Some(v) = verifier {
        let _ = v.await;
    }
    tracing::info!(message = "Daemon stopped.");
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(DaemonError::Serve(e)),
        Err(join) => Err(DaemonError::Serve(std::io::Error::other(join.to_string()))),
    }
}

/// How often the last-success gauges are read again from the buckets: what another replica
/// (or a manual run, or a verify) committed shows within this. Each refresh lists every
/// configured source's folders on every target.
const BUCKET_METRICS_REFRESH: std::time::Duration = std::time::Duration::from_secs(300);

/// Sets the last-success gauges from the buckets at start, then every
/// [`BUCKET_METRICS_REFRESH`], so that every replica exports them and a restart never loses a
/// failing database's series.
async fn bucket_metrics_loop(app: App, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = app.refresh_bucket_metrics() => {}
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(BUCKET_METRICS_REFRESH) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Runs `verify` of every database at each slot of `[verify] schedule`, when configured
/// (the nightly CronJob does the same; this is for installations without one). A verify in
/// progress at shutdown is cancelled: its scratch database is dropped.
async fn verify_loop(app: App, schedule: crate::schedule::Schedule, stop: CancellationToken) {
    loop {
        let now = chrono::Utc::now();
        let Some(next) = schedule.next_after(now) else {
            return;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let req = crate::verify::VerifyRequest::default();
        match crate::verify::verify_all(&app, &req, stop.child_token()).await {
            Ok(run) => {
                crate::verify::notify_reports(&app, &run.results).await;
                let failed = run
                    .results
                    .iter()
                    .filter(|(_, _, r)| !matches!(r, Ok(rep) if rep.passed()))
                    .count();
                tracing::info!(
                    message = "Scheduled verify finished.",
                    databases = run.results.len(),
                    failed,
                    skipped = run.skipped.len()
                );
            }
            Err(error) => {
                tracing::error!(message = "Scheduled verify could not run.", error = %error)
            }
        }
    }
}
