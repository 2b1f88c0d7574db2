//! Every Prometheus metric pgferry exports, declared in one place.
//!
//! Names carry the `pgferry_` prefix and unit suffixes (`_seconds`, `_bytes`, `_total`), as
//! DESIGN.md lists them; label values come from enums ([`Outcome`]) or from configured names
//! (source, database, target), never from error text. This module only counts: it does not
//! serve HTTP (see `daemon::http`) or push (see `verify`). `from_catalog` sets the
//! last-success gauges from what the buckets hold.

pub mod from_catalog;

use crate::storage::manifest::Manifest;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Result label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Not run because the previous run of the same database was still going.
    Skipped,
    /// Stopped by shutdown; not a failure.
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Skipped => "skipped",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// The metrics of one process (a registry of its own, so tests can run several).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub backup_last_success: GaugeVec,
    pub backups_total: IntCounterVec,
    pub backup_duration: HistogramVec,
    pub backup_stored_bytes: IntGaugeVec,
    pub backup_raw_bytes: IntGaugeVec,
    pub backup_degraded: IntGaugeVec,
    pub target_uploads_total: IntCounterVec,
    pub target_uploaded_bytes_total: IntCounterVec,
    pub target_last_success: GaugeVec,
    pub restores_total: IntCounterVec,
    pub verify_last_success: GaugeVec,
    pub verifies_total: IntCounterVec,
    /// Per source, databases whose newest verify report is older than `verify.max_age` or
    /// missing, as the last `verify` of the whole source left them (see `verify`).
    pub verify_overdue_databases: IntGaugeVec,
    pub retention_deleted_total: IntCounterVec,
    pub build_info: IntGaugeVec,
    /// 1 when the last dependency check could query the source server (see `readiness`).
    pub source_up: IntGaugeVec,
    /// 1 when the last dependency check could list the target.
    pub target_up: IntGaugeVec,
    /// 1 while a backup of the database runs in this process.
    pub backup_running: IntGaugeVec,
    /// Snapshots a target lacks or holds damaged, from the last `check` (see `repair`).
    pub target_missing_snapshots: IntGaugeVec,
    pub repairs_total: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let sd = &["source", "database"];
        let m = Metrics {
            backup_last_success: GaugeVec::new(
                Opts::new(
                    "pgferry_backup_last_success_timestamp_seconds",
                    "Unix time of the last committed backup of a database.",
                ),
                sd,
            )
            .unwrap(),
            backups_total: IntCounterVec::new(
                Opts::new("pgferry_backups_total", "Backup runs by result."),
                &["source", "database", "result"],
            )
            .unwrap(),
            backup_duration: HistogramVec::new(
                HistogramOpts::new(
                    "pgferry_backup_duration_seconds",
                    "Wall time of backup runs, committed or not.",
                )
                .buckets(exponential_buckets(1.0, 2.0, 16).unwrap()),
                sd,
            )
            .unwrap(),
            backup_stored_bytes: IntGaugeVec::new(
                Opts::new(
                    "pgferry_backup_stored_bytes",
                    "Compressed size of the last committed snapshot.",
                ),
                sd,
            )
            .unwrap(),
            backup_raw_bytes: IntGaugeVec::new(
                Opts::new(
                    "pgferry_backup_raw_bytes",
                    "Uncompressed pg_dump size of the last committed snapshot.",
                ),
                sd,
            )
            .unwrap(),
            backup_degraded: IntGaugeVec::new(
                Opts::new(
                    "pgferry_backup_degraded",
                    "1 when the newest committed snapshot of a database has fewer copies than pipeline.min_targets.",
                ),
                sd,
            )
            .unwrap(),
            target_uploads_total: IntCounterVec::new(
                Opts::new(
                    "pgferry_target_uploads_total",
                    "Snapshot uploads per target by result.",
                ),
                &["target", "result"],
            )
            .unwrap(),
            target_uploaded_bytes_total: IntCounterVec::new(
                Opts::new(
                    "pgferry_target_uploaded_bytes_total",
                    "Bytes of committed dump objects written to a target.",
                ),
                &["target"],
            )
            .unwrap(),
            target_last_success: GaugeVec::new(
                Opts::new(
                    "pgferry_target_last_success_timestamp_seconds",
                    "Unix time of the last snapshot committed on a target.",
                ),
                &["target"],
            )
            .unwrap(),
            restores_total: IntCounterVec::new(
                Opts::new("pgferry_restores_total", "Restore runs by result."),
                &["result"],
            )
            .unwrap(),
            verify_last_success: GaugeVec::new(
                Opts::new(
                    "pgferry_verify_last_success_timestamp_seconds",
                    "Unix time of the last successful restore-verify of a database.",
                ),
                sd,
            )
            .unwrap(),
            verifies_total: IntCounterVec::new(
                Opts::new("pgferry_verifies_total", "Restore-verify runs by result."),
                &["result"],
            )
            .unwrap(),
            verify_overdue_databases: IntGaugeVec::new(
                Opts::new(
                    "pgferry_verify_overdue_databases",
                    "Databases whose newest restore-verify report (any result) is older than verify.max_age, or that have none, after the last verify of the source.",
                ),
                &["source"],
            )
            .unwrap(),
            retention_deleted_total: IntCounterVec::new(
                Opts::new(
                    "pgferry_retention_deleted_total",
                    "Snapshots deleted by retention per target.",
                ),
                &["target"],
            )
            .unwrap(),
            build_info: IntGaugeVec::new(
                Opts::new("pgferry_build_info", "Always 1; the version is a label."),
                &["version"],
            )
            .unwrap(),
            source_up: IntGaugeVec::new(
                Opts::new(
                    "pgferry_source_up",
                    "1 if the source server answered the last check (SELECT 1), else 0.",
                ),
                &["source"],
            )
            .unwrap(),
            target_up: IntGaugeVec::new(
                Opts::new(
                    "pgferry_target_up",
                    "1 if the target answered the last check (a listing), else 0.",
                ),
                &["target"],
            )
            .unwrap(),
            backup_running: IntGaugeVec::new(
                Opts::new(
                    "pgferry_backup_running",
                    "1 while a backup of the database runs in this process.",
                ),
                sd,
            )
            .unwrap(),
            target_missing_snapshots: IntGaugeVec::new(
                Opts::new(
                    "pgferry_target_missing_snapshots",
                    "Snapshots that other targets hold and this target lacks or holds damaged, as the last check found.",
                ),
                &["target"],
            )
            .unwrap(),
            repairs_total: IntCounterVec::new(
                Opts::new(
                    "pgferry_repairs_total",
                    "Snapshot copies repair wrote to a target, by result.",
                ),
                &["target", "result"],
            )
            .unwrap(),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 21] = [
            Box::new(m.source_up.clone()),
            Box::new(m.target_up.clone()),
            Box::new(m.backup_running.clone()),
            // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds...:
            // the standard names, which dashboards and kube-prometheus-stack rules expect.
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
            Box::new(m.backup_last_success.clone()),
            Box::new(m.backups_total.clone()),
            Box::new(m.backup_duration.clone()),
            Box::new(m.backup_stored_bytes.clone()),
            Box::new(m.backup_raw_bytes.clone()),
            Box::new(m.backup_degraded.clone()),
            Box::new(m.target_uploads_total.clone()),
            Box::new(m.target_uploaded_bytes_total.clone()),
            Box::new(m.target_last_success.clone()),
            Box::new(m.restores_total.clone()),
            Box::new(m.verify_last_success.clone()),
            Box::new(m.verifies_total.clone()),
            Box::new(m.verify_overdue_databases.clone()),
            Box::new(m.retention_deleted_total.clone()),
            Box::new(m.build_info.clone()),
            Box::new(m.target_missing_snapshots.clone()),
            Box::new(m.repairs_total.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("metric names are unique constants");
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Creates the counters of one database at 0, so that the first failure is an increase
    /// that `increase()`/`rate()` can see (a series born at 1 is invisible to them).
    pub fn init_database(&self, source: &str, database: &str) {
        for outcome in [Outcome::Success, Outcome::Failure, Outcome::Skipped] {
            self.backups_total
                .with_label_values(&[source, database, outcome.as_str()]);
        }
        self.backup_running.with_label_values(&[source, database]);
    }

    /// Likewise for a target's counters, and the process-wide verify and restore counters.
    pub fn init_target(&self, target: &str) {
        for outcome in [Outcome::Success, Outcome::Failure] {
            self.target_uploads_total
                .with_label_values(&[target, outcome.as_str()]);
            self.verifies_total.with_label_values(&[outcome.as_str()]);
            self.restores_total.with_label_values(&[outcome.as_str()]);
        }
        self.target_uploaded_bytes_total
            .with_label_values(&[target]);
        self.retention_deleted_total.with_label_values(&[target]);
        for outcome in [Outcome::Success, Outcome::Failure] {
            self.repairs_total
                .with_label_values(&[target, outcome.as_str()]);
        }
    }

    /// Sets a database's last-success gauges from its newest committed snapshot: what the
    /// buckets hold, whichever process committed it. `degraded`: it has fewer copies than
    /// `pipeline.min_targets`.
    pub fn record_committed(&self, m: &Manifest, degraded: bool) {
        let labels = [m.source.as_str(), m.database.as_str()];
        self.backup_last_success
            .with_label_values(&labels)
            .set(m.finished_at.timestamp_millis() as f64 / 1000.0);
        self.backup_stored_bytes
            .with_label_values(&labels)
            .set(m.stored_size as i64);
        self.backup_raw_bytes
            .with_label_values(&labels)
            .set(m.raw_size as i64);
        self.backup_degraded
            .with_label_values(&labels)
            .set(i64::from(degraded));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// Sets `pgferry_backup_running` to 1 for one database until dropped (also when the backup
/// fails, is cancelled or panics).
pub struct RunningGuard(prometheus::IntGauge);

impl RunningGuard {
    pub fn new(m: &Metrics, source: &str, database: &str) -> RunningGuard {
        let g = m.backup_running.with_label_values(&[source, database]);
        g.inc();
        RunningGuard(g)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Seconds since the Unix epoch, for `_timestamp_seconds` gauges.
pub fn now_seconds() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_names() {
        let m = Metrics::new();
        m.backups_total
            .with_label_values(&["prod", "acme", Outcome::Success.as_str()])
            .inc();
        let text = m.render();
        assert!(text.contains(
            "pgferry_backups_total{database=\"acme\",result=\"success\",source=\"prod\"} 1"
        ));
        assert!(text.contains("pgferry_build_info{version="));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                line.starts_with("pgferry_") || line.starts_with("process_"),
                "{line}"
            );
        }
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}
