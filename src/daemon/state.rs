//! What the daemon knows about each database it backs up: last success, last error,
//! consecutive failures, next run, and whether a run is going on now.
//!
//! The scheduler writes it, the HTTP API reads it. It lives in memory only: a restarted
//! daemon starts empty and the manifests on the targets are the durable truth. This module
//! holds no locks across awaits and does no I/O.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::retention::BackupOutcome;

/// A run in progress.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Running {
    pub snapshot_id: String,
    pub started_at: DateTime<Utc>,
    /// Started by `POST /api/v1/backups` rather than the schedule.
    pub manual: bool,
}

/// The state of one database, as `/api/v1/status` shows it.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct DbStatus {
    pub source: String,
    pub database: String,
    /// When the last snapshot this daemon committed finished, and its id.
    pub last_success: Option<DateTime<Utc>>,
    pub last_snapshot_id: Option<String>,
    /// The last failure (cleared by nothing: compare its time with `last_success`).
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    /// When the daemon will next try this database (the next slot, or a retry).
    pub next_run: Option<DateTime<Utc>>,
    pub running: Option<Running>,
    /// Whether the last run this daemon saw committed; drives the retention gate.
    #[serde(skip)]
    pub last_outcome: Option<BackupOutcome>,
}

/// Why a run could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("a backup of {source_name}/{database} is already running (snapshot {snapshot_id})")]
    AlreadyRunning {
        source_name: String,
        database: String,
        snapshot_id: String,
    },
}

/// Every database's state, keyed by (source, database).
#[derive(Debug, Default)]
pub struct StateMap {
    inner: Mutex<BTreeMap<(String, String), DbStatus>>,
}

impl StateMap {
    fn with<T>(&self, source: &str, database: &str, f: impl FnOnce(&mut DbStatus) -> T) -> T {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry((source.to_string(), database.to_string()))
            .or_insert_with(|| DbStatus {
                source: source.to_string(),
                database: database.to_string(),
                ..DbStatus::default()
            });
        f(entry)
    }

    /// Marks a run as started, unless one is going on already (then it is not queued).
    pub fn try_start(
        &self,
        source: &str,
        database: &str,
        running: Running,
    ) -> Result<(), StartError> {
        self.with(source, database, |s| match &s.running {
            Some(r) => Err(StartError::AlreadyRunning {
                source_name: source.to_string(),
                database: database.to_string(),
                snapshot_id: r.snapshot_id.clone(),
            }),
            None => {
                s.running = Some(running);
                Ok(())
            }
        })
    }

    /// Marks the run as over (whatever its result).
    pub fn finish(&self, source: &str, database: &str) {
        self.with(source, database, |s| s.running = None);
    }

    pub fn record_success(
        &self,
        source: &str,
        database: &str,
        snapshot_id: &str,
        at: DateTime<Utc>,
    ) {
        self.with(source, database, |s| {
            s.last_success = Some(at);
            s.last_snapshot_id = Some(snapshot_id.to_string());
            s.consecutive_failures = 0;
            s.last_outcome = Some(BackupOutcome::Committed);
        });
    }

    pub fn record_failure(&self, source: &str, database: &str, error: String, at: DateTime<Utc>) {
        self.with(source, database, |s| {
            s.last_error = Some(error);
            s.last_error_at = Some(at);
            s.consecutive_failures += 1;
            s.last_outcome = Some(BackupOutcome::Failed);
        });
    }

    pub fn set_next_run(&self, source: &str, database: &str, at: Option<DateTime<Utc>>) {
        self.with(source, database, |s| s.next_run = at);
    }

    /// Sets the next run of every known database of `source` that is not running, to `at` of
    /// its name (the next slot, plus the database's spread offset), unless it is due sooner:
    /// a database waiting for its offset in the current slot keeps that time (after `now`).
    pub fn set_next_run_of_source(
        &self,
        source: &str,
        now: DateTime<Utc>,
        at: impl Fn(&str) -> Option<DateTime<Utc>>,
    ) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for ((s, d), st) in map.iter_mut() {
            if s != source || st.running.is_some() {
                continue;
            }
            let next = at(d);
            let sooner = st
                .next_run
                .is_some_and(|t| t > now && next.is_none_or(|n| t < n));
            if !sooner {
                st.next_run = next;
            }
        }
    }

    /// Makes sure a discovered database is listed, so the status shows it before its first run.
    pub fn ensure(&self, source: &str, database: &str) {
        self.with(source, database, |_| ());
    }

    /// The databases of `source` seen so far.
    pub fn databases_of(&self, source: &str) -> Vec<String> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.keys()
            .filter(|(s, _)| s == source)
            .map(|(_, d)| d.clone())
            .collect()
    }

    pub fn last_outcome(&self, source: &str, database: &str) -> Option<BackupOutcome> {
        self.with(source, database, |s| s.last_outcome)
    }

    pub fn get(&self, source: &str, database: &str) -> Option<DbStatus> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(source.to_string(), database.to_string()))
            .cloned()
    }

    /// Every database, ordered by source then database.
    pub fn snapshot(&self) -> Vec<DbStatus> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(id: &str) -> Running {
        Running {
            snapshot_id: id.into(),
            started_at: Utc::now(),
            manual: false,
        }
    }

    #[test]
    fn a_running_database_cannot_start_again_until_finished() {
        let s = StateMap::default();
        s.try_start("prod", "acme", running("a")).unwrap();
        let err = s.try_start("prod", "acme", running("b")).unwrap_err();
        assert!(err.to_string().contains("snapshot a"), "{err}");
        s.try_start("prod", "other", running("b")).unwrap();
        s.finish("prod", "acme");
        s.try_start("prod", "acme", running("c")).unwrap();
    }

    #[test]
    fn failures_count_until_a_success() {
        let s = StateMap::default();
        let now = Utc::now();
        s.record_failure("p", "d", "boom".into(), now);
        s.record_failure("p", "d", "boom".into(), now);
        assert_eq!(s.get("p", "d").unwrap().consecutive_failures, 2);
        assert_eq!(s.last_outcome("p", "d"), Some(BackupOutcome::Failed));
        s.record_success("p", "d", "20261127T140000Z", now);
        let st = s.get("p", "d").unwrap();
        assert_eq!(st.consecutive_failures, 0);
        assert_eq!(st.last_outcome, Some(BackupOutcome::Committed));
        assert_eq!(st.last_error.as_deref(), Some("boom"));
    }
}
