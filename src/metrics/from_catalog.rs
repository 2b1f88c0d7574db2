//! The last-success gauges from what the buckets hold, not from what this process did.
//!
//! `pgferry_backup_last_success_timestamp_seconds` (and the stored/raw sizes, and
//! `pgferry_backup_degraded`) come from each database's newest committed snapshot;
//! `pgferry_verify_last_success_timestamp_seconds` from its newest passed `.verify.json`. Every
//! replica seeds them at start and keeps them current, so a restart never makes a failing
//! database disappear from the alerts, and the verify CronJob's push never erases a database's
//! last success. This module reads a catalog it is given (`App::refresh_bucket_metrics` streams
//! the fleet's); it writes nothing to the targets.

use std::collections::HashSet;

use crate::metrics::{Metrics, Outcome};
use crate::storage::catalog::Catalog;

/// Sets the gauges of every database the catalog holds snapshots of.
pub fn seed(metrics: &Metrics, catalog: &Catalog, min_targets: usize) {
    let mut newest_seen = HashSet::new();
    // Newest first: the first snapshot of a database is its newest.
    for s in &catalog.snapshots {
        let m = &s.manifest;
        let db = (m.source.as_str(), m.database.as_str());
        if newest_seen.insert(db) {
            metrics.record_committed(m, s.targets.len() < min_targets);
        }
        // The newest snapshot's report is not always the newest passed one: take the max.
        if let Some(v) = s
            .verify
            .as_ref()
            .filter(|v| v.result == Outcome::Success.as_str())
        {
            set_max(
                metrics,
                db,
                v.finished_at.timestamp_millis() as f64 / 1000.0,
            );
        }
    }
}

fn set_max(metrics: &Metrics, (source, database): (&str, &str), t: f64) {
    let g = metrics
        .verify_last_success
        .with_label_values(&[source, database]);
    if g.get() < t {
        g.set(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::catalog::{SnapshotEntry, VerifySummary};
    use crate::storage::manifest::tests::sample;
    use chrono::{Duration, Utc};

    #[test]
    fn gauges_come_from_the_newest_snapshot_and_the_newest_passed_verify() {
        let now = Utc::now();
        let mut newest = sample();
        newest.snapshot_id = "20261127T150000Z".into();
        newest.finished_at = now;
        let mut older = sample();
        older.finished_at = now - Duration::hours(1);
        let passed = VerifySummary {
            result: "success".into(),
            finished_at: now - Duration::minutes(30),
            target: "a".into(),
        };
        let failed = VerifySummary {
            result: "failure".into(),
            finished_at: now,
            target: "a".into(),
        };
        let cat = Catalog {
            snapshots: vec![
                SnapshotEntry {
                    manifest: newest.clone(),
                    targets: vec!["a".into()],
                    verify: Some(failed),
                    objects: Default::default(),
                    disagreeing: Default::default(),
                },
                SnapshotEntry {
                    manifest: older,
                    targets: vec!["a".into(), "b".into()],
                    verify: Some(passed.clone()),
                    objects: Default::default(),
                    disagreeing: Default::default(),
                },
            ],
            ..Catalog::default()
        };
        let m = Metrics::new();
        seed(&m, &cat, 2);
        let l = ["prod", "acme"];
        let secs = |t: chrono::DateTime<Utc>| t.timestamp_millis() as f64 / 1000.0;
        assert_eq!(m.backup_last_success.with_label_values(&l).get(), secs(now));
        assert_eq!(m.backup_degraded.with_label_values(&l).get(), 1);
        assert_eq!(
            m.verify_last_success.with_label_values(&l).get(),
            secs(passed.finished_at)
        );
    }
}
