//! The scheduler: turns each source's cron slots into backup runs.
//!
//! One loop per source does the work of a slot (re-discover the databases, start a run for
//! each), then idles until the next slot is due. Each database run is a task of its own: it
//! waits for one of `max_concurrent_backups` permits, makes an attempt, and on a retryable
//! failure backs off (doubling, capped) and tries again until the next slot is due. A database
//! whose previous run is still going is skipped for the slot (counted as `skipped`), never
//! queued. The snapshot id is the slot's start, so a slot is dumped at most once.
//!
//! With `[[source]] spread`, each database starts at a stable offset inside the slot
//! ([`spread_offset`]: a hash of "source/database", in [0, spread)), so the dumps of a slot
//! are spread over its first part instead of all starting at its first second; the snapshot
//! id is still the slot's start, the retries still end at the next slot, and
//! `max_concurrent_backups` still applies when the offset comes. Until then the database is
//! not running, and its `next_run` is its start.
//!
//! Timing is a pure function ([`tick`]) plus a [`Clock`], so tests drive the loop with
//! `tokio::time::pause()` and a [`TokioClock`]. What an attempt does (lock, check, dump) is
//! behind [`Runner`]; this module owns no I/O of its own.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backup::BackupError;
use crate::config::SourceConfig;
use crate::metrics::{Metrics, Outcome};
use crate::retention::BackupOutcome;
use crate::schedule::{self, Schedule};
use crate::source::SourceError;

use super::state::{Running, StartError, StateMap};

/// First wait after a failed attempt: long enough for a restarting server or a flapping
/// network to come back, short enough that an hourly slot gets several tries.
pub const RETRY_INITIAL: Duration = Duration::from_secs(15);
/// Longest wait between attempts, so a long outage still gets a try every few minutes.
pub const RETRY_MAX: Duration = Duration::from_secs(5 * 60);

/// The time, injectable so tests can use tokio's paused clock.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// Wall-clock UTC.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// UTC derived from tokio's clock: moves with `tokio::time::advance` and auto-advance when
/// time is paused.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin_utc: DateTime<Utc>,
    origin: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(origin_utc: DateTime<Utc>) -> TokioClock {
        TokioClock {
            origin_utc,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now().duration_since(self.origin);
        self.origin_utc + chrono::TimeDelta::from_std(elapsed).unwrap_or(chrono::TimeDelta::MAX)
    }
}

/// Sleeps until the clock reads `t` (returns at once if it already does).
pub async fn sleep_until(clock: &impl Clock, t: DateTime<Utc>) {
    let left = (t - clock.now()).to_std().unwrap_or(Duration::ZERO);
    tokio::time::sleep(left).await;
}

/// What a source loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Back up the slot starting at this time now.
    Run(DateTime<Utc>),
    /// Nothing is due before this time.
    SleepUntil(DateTime<Utc>),
    /// The schedule never fires again.
    Never,
}

/// The pure timing rule. `last_run` is the slot this loop last ran (None after start).
/// - After start, the slot containing `now` is due at once: a daemon restarted mid-slot
///   catches up, and the "already committed" check keeps it from dumping a slot twice.
/// - Otherwise the slot containing `now` is due if it is newer than `last_run`; when several
///   slots passed (the process was starved), only the latest runs: old slots are not replayed.
/// - Else sleep until the next fire time.
pub fn tick(schedule: &Schedule, last_run: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Tick {
    match (schedule.slot_at_or_before(now), last_run) {
        (Some(slot), None) => Tick::Run(slot),
        (Some(slot), Some(done)) if slot > done => Tick::Run(slot),
        _ => match schedule.next_after(now) {
            Some(t) => Tick::SleepUntil(t),
            None => Tick::Never,
        },
    }
}

/// Where a database's dumps start inside each slot of a source with `spread`: a stable
/// offset in [0, spread), whole seconds, from the first 8 bytes of sha256("source/database")
/// (not std's `DefaultHasher`, whose keys are random per process: a restart would move every
/// database).
pub fn spread_offset(source: &str, database: &str, spread: Duration) -> Duration {
    let secs = spread.as_secs();
    if secs == 0 {
        return Duration::ZERO;
    }
    let digest = Sha256::digest(format!("{source}/{database}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Duration::from_secs(u64::from_be_bytes(first) % secs)
}

/// When the run of `database` in the slot starting at `slot` starts: the slot's start plus
/// its spread offset, kept before `deadline` (the next slot; validation makes spread shorter
/// than any slot, so this only matters for a slot shorter than the sample `config` saw).
pub fn start_in_slot(
    source: &SourceConfig,
    database: &str,
    slot: DateTime<Utc>,
    deadline: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    let Some(spread) = source.spread else {
        return slot;
    };
    let mut offset = spread_offset(&source.name, database, spread);
    if let Some(len) = deadline.and_then(|d| (d - slot).to_std().ok()) {
        if offset >= len && !len.is_zero() {
            offset = Duration::from_secs(offset.as_secs() % len.as_secs().max(1));
        }
    }
    slot + chrono::TimeDelta::from_std(offset).unwrap_or_default()
}

/// Capped exponential backoff between attempts of one database within one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: RETRY_INITIAL,
            max: RETRY_MAX,
        }
    }
}

impl RetryPolicy {
    /// The wait after the `failures`-th consecutive failure (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// When to try again, or None when that would be at or after `deadline` (the next slot).
    pub fn retry_at(
        &self,
        failures: u32,
        now: DateTime<Utc>,
        deadline: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        let at = now + chrono::TimeDelta::from_std(self.delay(failures)).ok()?;
        match deadline {
            Some(d) if at >= d => None,
            _ => Some(at),
        }
    }
}

/// How an attempt ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This process committed the snapshot.
    Committed { finished_at: DateTime<Utc> },
    /// Another replica holds the database's lock: it is on it.
    LockedElsewhere,
    /// The slot's manifest already exists on `min_targets` targets.
    AlreadyCommitted,
}

/// Why an attempt (or a slot's discovery) failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot discover the databases of source {source_name}: {error}")]
    Discover {
        source_name: String,
        error: SourceError,
    },
    #[error(transparent)]
    Backup(#[from] BackupError),
}

impl RunError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, RunError::Backup(e) if e.is_cancelled())
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            RunError::Discover { error, .. } => error.is_retryable(),
            RunError::Backup(e) => e.is_retryable(),
        }
    }
}

/// What a slot does for real: discovery, one attempt (lock, check, dump), and what follows a
/// commit (retention). The daemon's is `PgRunner`; tests fake it.
pub trait Runner: Send + Sync + 'static {
    fn discover(
        &self,
        source: &SourceConfig,
    ) -> impl Future<Output = Result<Vec<String>, RunError>> + Send;
    fn attempt(
        &self,
        source: &SourceConfig,
        database: &str,
        snapshot_id: &str,
        cancel: CancellationToken,
    ) -> impl Future<Output = Result<Attempt, RunError>> + Send;
    fn after_commit(
        &self,
        source: &SourceConfig,
        database: &str,
        last: Option<BackupOutcome>,
    ) -> impl Future<Output = ()> + Send;
}

struct Inner<R, C> {
    runner: R,
    clock: C,
    sources: Vec<SourceConfig>,
    state: Arc<StateMap>,
    permits: Semaphore,
    tracker: TaskTracker,
    /// Stop scheduling: no new slot, no new attempt, no retry.
    shutdown: CancellationToken,
    /// Stop running backups (after the grace period).
    cancel: CancellationToken,
    retry: RetryPolicy,
    metrics: Metrics,
    /// Source loops started, and still running (a loop only ends at shutdown, or by a panic:
    /// `/readyz` reports the latter).
    loops_started: AtomicUsize,
    loops_alive: AtomicUsize,
}

/// Counts a source loop as alive until dropped, which also happens when the loop panics.
struct LoopAlive<'a>(&'a AtomicUsize);

impl Drop for LoopAlive<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The scheduler of one daemon; cheap to clone.
pub struct Scheduler<R, C> {
    inner: Arc<Inner<R, C>>,
}

impl<R, C> Clone for Scheduler<R, C> {
    fn clone(&self) -> Self {
        Scheduler {
            inner: self.inner.clone(),
        }
    }
}

/// Everything a scheduler is built from.
pub struct SchedulerParts<R, C> {
    pub runner: R,
    pub clock: C,
    pub sources: Vec<SourceConfig>,
    pub state: Arc<StateMap>,
    pub max_concurrent: usize,
    pub retry: RetryPolicy,
    pub metrics: Metrics,
}

impl<R: Runner, C: Clock> Scheduler<R, C> {
    pub fn new(parts: SchedulerParts<R, C>) -> Scheduler<R, C> {
        Scheduler {
            inner: Arc::new(Inner {
                runner: parts.runner,
                clock: parts.clock,
                sources: parts.sources,
                state: parts.state,
                permits: Semaphore::new(parts.max_concurrent.max(1)),
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                cancel: CancellationToken::new(),
                retry: parts.retry,
                metrics: parts.metrics,
                loops_started: AtomicUsize::new(0),
                loops_alive: AtomicUsize::new(0),
            }),
        }
    }

    pub fn state(&self) -> &Arc<StateMap> {
        &self.inner.state
    }

    pub fn runner(&self) -> &R {
        &self.inner.runner
    }

    pub fn sources(&self) -> &[SourceConfig] {
        &self.inner.sources
    }

    /// Starts one loop per source.
    pub fn start(&self) {
        for idx in 0..self.inner.sources.len() {
            let inner = self.inner.clone();
            self.inner.loops_started.fetch_add(1, Ordering::SeqCst);
            self.inner.loops_alive.fetch_add(1, Ordering::SeqCst);
            self.inner.tracker.spawn(async move {
                let _alive = LoopAlive(&inner.loops_alive);
                source_loop(inner.clone(), idx).await
            });
        }
    }

    /// Why the scheduler cannot do its work, if it cannot: not started, or a source loop
    /// ended before shutdown (a bug: it panicked). `None` while shutting down is for the
    /// caller to report.
    pub fn not_alive(&self) -> Option<String> {
        let started = self.inner.loops_started.load(Ordering::SeqCst);
        let alive = self.inner.loops_alive.load(Ordering::SeqCst);
        if started < self.inner.sources.len() {
            Some("the scheduler has not started".into())
        } else if alive < started && !self.is_shutting_down() {
            Some(format!(
                "{} of {started} source scheduling loop(s) stopped; see the log, restart the pod",
                started - alive
            ))
        } else {
            None
        }
    }

    /// Starts a run of one database now (a manual backup): no retry, same lock and checks.
    pub fn start_manual(&self, source_idx: usize, database: &str) -> Result<String, StartError> {
        let now = self.inner.clock.now();
        let id = schedule::snapshot_id(now);
        let run = DatabaseRun {
            idx: source_idx,
            database: database.to_string(),
            snapshot_id: id.clone(),
            deadline: Some(now),
        };
        start_run(&self.inner, run, true)?;
        Ok(id)
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Stops scheduling, lets running backups finish for up to `grace`, then cancels them and
    /// waits until every task has ended.
    pub async fn drain(&self, grace: Duration) {
        let inner = &self.inner;
        inner.shutdown.cancel();
        inner.tracker.close();
        if tokio::time::timeout(grace, inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                message = "Shutdown grace period over; cancelling the backups still running.",
                grace_seconds = grace.as_secs_f64()
            );
            inner.cancel.cancel();
            inner.tracker.wait().await;
        }
    }
}

async fn source_loop<R: Runner, C: Clock>(inner: Arc<Inner<R, C>>, idx: usize) {
    let source = &inner.sources[idx];
    let mut last_run = None;
    loop {
        if inner.shutdown.is_cancelled() {
            return;
        }
        match tick(&source.schedule, last_run, inner.clock.now()) {
            Tick::Never => {
                tracing::warn!(message = "The schedule never fires again; no more backups of this source.", source = %source.name, schedule = %source.schedule.expr());
                return;
            }
            Tick::SleepUntil(t) => {
                let next_slot = source.schedule.next_after(t);
                inner
                    .state
                    .set_next_run_of_source(&source.name, inner.clock.now(), |db| {
                        Some(start_in_slot(source, db, t, next_slot))
                    });
                tokio::select! {
                    _ = sleep_until(&inner.clock, t) => {}
                    _ = inner.shutdown.cancelled() => return,
                }
            }
            Tick::Run(slot) => {
                last_run = Some(slot);
                let deadline = source.schedule.next_after(slot);
                run_slot(&inner, idx, slot, deadline).await;
            }
        }
    }
}

/// Discovers the databases of a source (retrying until the slot is over) and starts a run of
/// each that is not still running.
async fn run_slot<R: Runner, C: Clock>(
    inner: &Arc<Inner<R, C>>,
    idx: usize,
    slot: DateTime<Utc>,
    deadline: Option<DateTime<Utc>>,
) {
    let source = &inner.sources[idx];
    let snapshot_id = schedule::snapshot_id(slot);
    let mut failures = 0;
    let databases = loop {
        let found = tokio::select! {
            r = inner.runner.discover(source) => r,
            _ = inner.shutdown.cancelled() => return,
        };
        match found {
            Ok(dbs) => break dbs,
            Err(error) => {
                failures += 1;
                let now = inner.clock.now();
                for db in inner.state.databases_of(&source.name) {
                    inner
                        .state
                        .record_failure(&source.name, &db, error.to_string(), now);
                }
                let retry = if error.is_retryable() {
                    inner.retry.retry_at(failures, now, deadline)
                } else {
                    None
                };
                tracing::error!(message = "Cannot discover the databases of a source.", source = %source.name, snapshot_id = %snapshot_id, error = %error, retry_at = ?retry);
                let Some(at) = retry else { return };
                tokio::select! {
                    _ = sleep_until(&inner.clock, at) => {}
                    _ = inner.shutdown.cancelled() => return,
                }
            }
        }
    };
    tracing::info!(message = "Slot due.", source = %source.name, snapshot_id = %snapshot_id, databases = databases.len(), spread_seconds = source.spread.map(|d| d.as_secs()));
    for database in databases {
        inner.state.ensure(&source.name, &database);
        inner.metrics.init_database(&source.name, &database);
        let start = start_in_slot(source, &database, slot, deadline);
        let run = DatabaseRun {
            idx,
            database,
            snapshot_id: snapshot_id.clone(),
            deadline,
        };
        if start <= inner.clock.now() {
            start_in_slot_or_skip(inner, run);
            continue;
        }
        // Not due yet (spread): not running, not missed; it starts at its offset.
        inner
            .state
            .set_next_run(&source.name, &run.database, Some(start));
        let waiting = inner.clone();
        inner.tracker.spawn(async move {
            tokio::select! {
                _ = sleep_until(&waiting.clock, start) => {}
                _ = waiting.shutdown.cancelled() => return,
            }
            start_in_slot_or_skip(&waiting, run);
        });
    }
}

/// Starts the slot's run of one database, or counts it as skipped when its previous run is
/// still going.
fn start_in_slot_or_skip<R: Runner, C: Clock>(inner: &Arc<Inner<R, C>>, run: DatabaseRun) {
    let source = &inner.sources[run.idx];
    let (database, snapshot_id) = (run.database.clone(), run.snapshot_id.clone());
    if let Err(e) = start_run(inner, run, false) {
        inner
            .metrics
            .backups_total
            .with_label_values(&[&source.name, &database, Outcome::Skipped.as_str()])
            .inc();
        tracing::warn!(message = "Skipping the slot: the previous backup is still running.", source = %source.name, database = %database, snapshot_id = %snapshot_id, error = %e);
    }
}

/// The run of one database of source `idx` under `snapshot_id`, retried until `deadline`
/// (the end of its slot; a manual run's is its start: no retry).
struct DatabaseRun {
    idx: usize,
    database: String,
    snapshot_id: String,
    deadline: Option<DateTime<Utc>>,
}

fn start_run<R: Runner, C: Clock>(
    inner: &Arc<Inner<R, C>>,
    run: DatabaseRun,
    manual: bool,
) -> Result<(), StartError> {
    let source = &inner.sources[run.idx];
    inner.state.try_start(
        &source.name,
        &run.database,
        Running {
            snapshot_id: run.snapshot_id.clone(),
            started_at: inner.clock.now(),
            manual,
        },
    )?;
    inner.tracker.spawn(database_run(inner.clone(), run));
    Ok(())
}

/// One database for one slot: attempts until committed, skipped, cancelled, out of retries or
/// out of time.
async fn database_run<R: Runner, C: Clock>(inner: Arc<Inner<R, C>>, run: DatabaseRun) {
    let DatabaseRun {
        idx,
        database,
        snapshot_id,
        deadline,
    } = run;
    let source = &inner.sources[idx];
    let name = source.name.as_str();
    let mut failures = 0;
    loop {
        let permit = tokio::select! {
            p = inner.permits.acquire() => p,
            _ = inner.shutdown.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        if inner.shutdown.is_cancelled() {
            break;
        }
        let result = inner
            .runner
            .attempt(source, &database, &snapshot_id, inner.cancel.clone())
            .await;
        drop(permit);
        match result {
            Ok(Attempt::Committed { finished_at }) => {
                inner
                    .state
                    .record_success(name, &database, &snapshot_id, finished_at);
                let last = inner.state.last_outcome(name, &database);
                inner.runner.after_commit(source, &database, last).await;
                break;
            }
            Ok(Attempt::LockedElsewhere) => {
                tracing::debug!(message = "Another replica is backing up this database; skipping.", source = %name, database = %database, snapshot_id = %snapshot_id);
                break;
            }
            Ok(Attempt::AlreadyCommitted) => {
                tracing::info!(message = "Slot already committed on every target that answers; skipping.", source = %name, database = %database, snapshot_id = %snapshot_id);
                break;
            }
            Err(e) if e.is_cancelled() => break,
            Err(e) => {
                failures += 1;
                let now = inner.clock.now();
                inner
                    .state
                    .record_failure(name, &database, e.to_string(), now);
                let retry = if e.is_retryable() {
                    inner.retry.retry_at(failures, now, deadline)
                } else {
                    None
                };
                if !matches!(e, RunError::Backup(_)) {
                    // backup_slot logs its own failures.
                    tracing::error!(message = "Backup attempt failed.", source = %name, database = %database, snapshot_id = %snapshot_id, error = %e, retry_at = ?retry);
                }
                let Some(at) = retry else { break };
                inner.state.set_next_run(name, &database, Some(at));
                tokio::select! {
                    _ = sleep_until(&inner.clock, at) => {}
                    _ = inner.shutdown.cancelled() => break,
                }
            }
        }
    }
    inner.state.finish(name, &database);
    let now = inner.clock.now();
    let next = source.schedule.next_after(now).map(|slot| {
        let deadline = source.schedule.next_after(slot);
        start_in_slot(source, &database, slot, deadline)
    });
    inner.state.set_next_run(name, &database, next);
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
