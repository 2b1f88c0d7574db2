//! Retention planning: which committed snapshots of one database on one target to keep and
//! which to delete under a grandfather-father-son [`RetentionPolicy`].
//!
//! This module owns the decision only and is pure: no I/O, no clock (the caller passes `now`),
//! no logging. It must not list or delete objects and knows nothing about backups in flight.
//! The caller (`pgferry prune`, the daemon's retention pass) does, per source, database and
//! target: ask [`prune_allowed`] whether the database may be pruned at all, list its manifests,
//! call [`plan`], delete every snapshot in [`Plan::delete`] manifest first and dump second (a
//! crash in between leaves an orphan dump, never a manifest pointing at nothing), then remove
//! the dumps [`orphan_dumps`] names.
//!
//! Semantics of [`plan`] (those of restic `forget` and borg `prune`):
//! - The input is the committed snapshots (manifests) of one source/database/target, in any
//!   order. They are ordered newest first by time (ties: greater id first).
//! - `keep_last = N` keeps the N newest snapshots.
//! - `hourly`, `daily`, `weekly`, `monthly = N`: walking newest to oldest, snapshots fall in
//!   buckets by UTC hour, UTC calendar day, ISO 8601 week (Monday to Sunday, numbered in the
//!   ISO week-numbering year, so 2026-12-31 and 2027-01-03 share week 2026-W53) and UTC
//!   calendar month. The newest snapshot of each bucket is kept, for the N newest buckets that
//!   hold a snapshot: empty periods do not count, so a gap in backups never makes older
//!   snapshots expire sooner.
//! - The rules are independent; a snapshot kept by several rules carries every reason.
//! - The newest snapshot is always kept (reason [`KeepReason::Newest`]), even when every count
//!   is 0. Everything else is deleted.
//! - Planning again over the kept set deletes nothing (the plan is idempotent), and with no new
//!   snapshot nothing more ever expires.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};

use crate::config::RetentionPolicy;

/// How long a dump may sit without its manifest before it counts as an orphan (the default of
/// `pipeline.orphan_grace`). A dump object appears when its upload completes, but the manifest
/// is written only once the snapshot has committed on `min_targets` targets, which waits for
/// the slowest target; an upload's marker (see `upload`) appears when the upload starts. A day
/// is longer than any backup run we expect, so a dump or marker this old without a manifest
/// belongs to a run that died.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// One committed snapshot of a database on a target, as listed from its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SnapshotRef {
    /// The snapshot id, `20261127T140000Z`.
    pub id: String,
    /// When the snapshot's data was read (its manifest's `started_at`), used for ordering and
    /// bucketing: not its id, which names the schedule slot (a slot caught up late, or a
    /// manual snapshot's second, would otherwise interleave wrongly).
    pub time: DateTime<Utc>,
}

/// Why a snapshot is kept. A kept snapshot lists every rule that keeps it, in this order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// The newest snapshot, kept whatever the policy says.
    Newest,
    /// One of the `keep_last` newest snapshots.
    KeepLast,
    /// The newest snapshot of one of the `hourly` newest UTC hours that hold a snapshot.
    Hourly,
    /// The newest snapshot of one of the `daily` newest UTC days that hold a snapshot.
    Daily,
    /// The newest snapshot of one of the `weekly` newest ISO weeks that hold a snapshot.
    Weekly,
    /// The newest snapshot of one of the `monthly` newest UTC months that hold a snapshot.
    Monthly,
    /// Another target lacks it and repair may still copy it from here (see
    /// [`held_for_repair`]); only the executor adds this reason, never [`plan`].
    RepairSource,
}

impl KeepReason {
    /// The reason as a stable lower-case word, for logs and `prune --dry-run`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeepReason::Newest => "newest",
            KeepReason::KeepLast => "keep_last",
            KeepReason::Hourly => "hourly",
            KeepReason::Daily => "daily",
            KeepReason::Weekly => "weekly",
            KeepReason::Monthly => "monthly",
            KeepReason::RepairSource => "repair_source",
        }
    }
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What retention does with one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Keep it, for these reasons (never empty).
    Keep(Vec<KeepReason>),
    /// Delete it: manifest first, then dump.
    Delete,
}

/// The outcome of [`plan`]: every input snapshot is in exactly one of the two lists, and both
/// lists are ordered newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// Snapshots to keep, with the rules that keep them.
    pub keep: Vec<(SnapshotRef, Vec<KeepReason>)>,
    /// Snapshots to delete.
    pub delete: Vec<SnapshotRef>,
}

/// Splits `snapshots` into those to keep and those to delete (see the module docs).
pub fn plan(policy: &RetentionPolicy, snapshots: &[SnapshotRef]) -> Plan {
    let mut plan = Plan::default();
    for (snapshot, decision) in decide(policy, snapshots) {
        match decision {
            Decision::Keep(reasons) => plan.keep.push((snapshot, reasons)),
            Decision::Delete => plan.delete.push(snapshot),
        }
    }
    plan
}

/// The decision for every snapshot, newest first: the per-snapshot view of [`plan`], for
/// listings that show kept and deleted snapshots side by side.
pub fn decide(policy: &RetentionPolicy, snapshots: &[SnapshotRef]) -> Vec<(SnapshotRef, Decision)> {
    let mut sorted: Vec<&SnapshotRef> = snapshots.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));

    let mut keep_last = policy.keep_last;
    let mut rules = [
        BucketRule::new(KeepReason::Hourly, policy.hourly, hour_bucket),
        BucketRule::new(KeepReason::Daily, policy.daily, day_bucket),
        BucketRule::new(KeepReason::Weekly, policy.weekly, iso_week_bucket),
        BucketRule::new(KeepReason::Monthly, policy.monthly, month_bucket),
    ];

    let mut decisions = Vec::with_capacity(sorted.len());
    for (index, snapshot) in sorted.into_iter().enumerate() {
        let mut reasons = Vec::new();
        if index == 0 {
            reasons.push(KeepReason::Newest);
        }
        if keep_last > 0 {
            keep_last -= 1;
            reasons.push(KeepReason::KeepLast);
        }
        for rule in &mut rules {
            if rule.admits(snapshot.time) {
                reasons.push(rule.reason);
            }
        }
        let decision = if reasons.is_empty() {
            Decision::Delete
        } else {
            Decision::Keep(reasons)
        };
        decisions.push((snapshot.clone(), decision));
    }
    decisions
}

/// A calendar period a snapshot falls in; only compared for equality within one rule.
type Bucket = (i32, u32, u32);

fn hour_bucket(t: DateTime<Utc>) -> Bucket {
    (t.year(), t.ordinal(), t.hour())
}

fn day_bucket(t: DateTime<Utc>) -> Bucket {
    (t.year(), t.ordinal(), 0)
}

fn iso_week_bucket(t: DateTime<Utc>) -> Bucket {
    let week = t.iso_week();
    (week.year(), week.week(), 0)
}

fn month_bucket(t: DateTime<Utc>) -> Bucket {
    (t.year(), t.month(), 0)
}

/// One of the hourly/daily/weekly/monthly rules while walking snapshots newest first.
struct BucketRule {
    reason: KeepReason,
    /// Buckets this rule may still keep a snapshot from.
    remaining: u32,
    bucket_of: fn(DateTime<Utc>) -> Bucket,
    /// The bucket of the last snapshot this rule kept; snapshots arrive newest first, so a
    /// bucket's snapshots are contiguous and the first one seen is its newest.
    last: Option<Bucket>,
}

impl BucketRule {
    fn new(reason: KeepReason, count: u32, bucket_of: fn(DateTime<Utc>) -> Bucket) -> Self {
        BucketRule {
            reason,
            remaining: count,
            bucket_of,
            last: None,
        }
    }

    /// Whether the rule keeps the snapshot taken at `time`, the next one newest first.
    fn admits(&mut self, time: DateTime<Utc>) -> bool {
        if self.remaining == 0 {
            return false;
        }
        let bucket = (self.bucket_of)(time);
        if self.last == Some(bucket) {
            return false;
        }
        self.last = Some(bucket);
        self.remaining -= 1;
        true
    }
}

/// How the last backup run of a database ended, as far as the caller knows. A cancelled run
/// (shutdown) is not an outcome: the caller keeps the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupOutcome {
    /// The snapshot committed on at least `min_targets` targets.
    Committed,
    /// The run failed: dump, upload or commit.
    Failed,
}

/// Why retention leaves a database alone this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    /// The last backup failed: while backups are broken, old snapshots may be all there is.
    #[error(
        "the last backup of this database failed, so retention leaves its snapshots alone; \
         fix the backup (see the daemon log) and retention resumes after the next commit"
    )]
    LastBackupFailed,
}

/// The gate the caller passes before calling [`plan`] for a database: retention never runs for
/// a database whose last backup failed. `None` (no run recorded, e.g. a standalone
/// `pgferry prune` or a freshly started daemon) allows it: the manifests are then the only
/// truth, and [`plan`] never deletes the newest of them.
pub fn prune_allowed(last: Option<BackupOutcome>) -> Result<(), SkipReason> {
    match last {
        Some(BackupOutcome::Failed) => Err(SkipReason::LastBackupFailed),
        Some(BackupOutcome::Committed) | None => Ok(()),
    }
}

/// The keys, in input order, of dumps (or upload markers) without a manifest that were last
/// modified more than `grace` before `now`: left by runs that died before committing, to be
/// removed. Younger ones
/// may belong to a run still uploading to its other targets and are left alone, and so is a dump
/// dated in the future (clock skew). A `grace` too large to represent removes nothing.
pub fn orphan_dumps(
    dumps_without_manifest: &[(String, DateTime<Utc>)],
    now: DateTime<Utc>,
    grace: Duration,
) -> Vec<String> {
    let Ok(grace) = TimeDelta::from_std(grace) else {
        return Vec::new();
    };
    dumps_without_manifest
        .iter()
        .filter(|(_, last_modified)| now.signed_duration_since(*last_modified) > grace)
        .map(|(key, _)| key.clone())
        .collect()
}

/// The repair hold: whether prune must keep a snapshot's copy that its plan would delete,
/// because the copies may be the source `repair` needs. The rule: a snapshot is held on every
/// target that has it while some configured target lacks it (`holders` does not name every
/// one of `configured`) and it finished less than `grace` (`[repair] grace`) before `now`.
/// Past the grace the lack is taken as permanent (the target was dropped, or repair could not
/// reach it for that long) and retention goes on. A snapshot dated in the future (clock skew)
/// counts as young; a `grace` too large to represent holds everything some target lacks.
pub fn held_for_repair(
    holders: &[String],
    configured: &[String],
    finished_at: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: Duration,
) -> bool {
    let lacking = configured.iter().any(|t| !holders.contains(t));
    let young = TimeDelta::from_std(grace)
        .map_or(true, |grace| now.signed_duration_since(finished_at) < grace);
    lacking && young
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use chrono::TimeZone;

    use super::*;
    use KeepReason::*;

    fn policy(
        keep_last: u32,
        hourly: u32,
        daily: u32,
        weekly: u32,
        monthly: u32,
    ) -> RetentionPolicy {
        RetentionPolicy {
            keep_last,
            hourly,
            daily,
            weekly,
            monthly,
        }
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("valid test date")
    }

    fn snap(time: DateTime<Utc>) -> SnapshotRef {
        SnapshotRef {
            id: time.format("%Y%m%dT%H%M%SZ").to_string(),
            time,
        }
    }

    /// `hours` hourly snapshots from `start`, oldest first.
    fn hourly_series(start: DateTime<Utc>, hours: i64) -> Vec<SnapshotRef> {
        (0..hours)
            .map(|h| snap(start + TimeDelta::hours(h)))
            .collect()
    }

    /// 90 days of hourly snapshots: 2026-01-01T00:00Z to 2026-03-31T23:00Z.
    fn ninety_days() -> Vec<SnapshotRef> {
        hourly_series(at(2026, 1, 1, 0, 0), 90 * 24)
    }

    fn kept_ids(plan: &Plan) -> Vec<&str> {
        plan.keep.iter().map(|(s, _)| s.id.as_str()).collect()
    }

    fn reasons_of<'a>(plan: &'a Plan, id: &str) -> Option<&'a [KeepReason]> {
        plan.keep
            .iter()
            .find(|(s, _)| s.id == id)
            .map(|(_, r)| r.as_slice())
    }

    /// splitmix64: a tiny deterministic PRNG, enough to shuffle and generate inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                let j = usize::try_from(self.below(i as u64 + 1)).expect("fits");
                items.swap(i, j);
            }
        }
    }

    #[test]
    fn empty_input_plans_nothing() {
        let plan = plan(&policy(3, 48, 14, 8, 12), &[]);
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn zero_policy_keeps_only_the_newest() {
        let mut snapshots = ninety_days();
        Rng(7).shuffle(&mut snapshots);
        let plan = plan(&policy(0, 0, 0, 0, 0), &snapshots);
        assert_eq!(kept_ids(&plan), ["20260331T230000Z"]);
        assert_eq!(plan.keep[0].1, [Newest]);
        assert_eq!(plan.delete.len(), 90 * 24 - 1);
    }

    #[test]
    fn single_snapshot_is_kept_as_newest() {
        let only = snap(at(2026, 5, 1, 12, 0));
        let plan = plan(&policy(0, 0, 0, 0, 0), std::slice::from_ref(&only));
        assert_eq!(plan.keep, [(only, vec![Newest])]);
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn keep_last_alone_keeps_the_n_newest() {
        let plan = plan(&policy(5, 0, 0, 0, 0), &ninety_days());
        assert_eq!(
            kept_ids(&plan),
            [
                "20260331T230000Z",
                "20260331T220000Z",
                "20260331T210000Z",
                "20260331T200000Z",
                "20260331T190000Z",
            ]
        );
        assert_eq!(plan.keep[0].1, [Newest, KeepLast]);
        assert_eq!(plan.keep[4].1, [KeepLast]);
        assert_eq!(plan.delete.len(), 90 * 24 - 5);
        assert_eq!(plan.delete[0].id, "20260331T180000Z");
    }

    #[test]
    fn keep_last_larger_than_input_keeps_everything() {
        let snapshots = hourly_series(at(2026, 1, 1, 0, 0), 10);
        let plan = plan(&policy(100, 0, 0, 0, 0), &snapshots);
        assert_eq!(plan.keep.len(), 10);
        assert!(plan.delete.is_empty());
    }

    #[test]
    fn hourly_alone_keeps_the_newest_of_each_hour() {
        // Two snapshots an hour, at :00 and :30: the :30 one is the newest of its hour.
        let mut snapshots = ninety_days();
        snapshots.extend(
            ninety_days()
                .iter()
                .map(|s| snap(s.time + TimeDelta::minutes(30))),
        );
        let plan = plan(&policy(0, 48, 0, 0, 0), &snapshots);
        assert_eq!(plan.keep.len(), 48);
        assert!(plan.keep.iter().all(|(s, _)| s.id.ends_with("3000Z")));
        assert_eq!(plan.keep[0].0.id, "20260331T233000Z");
        assert_eq!(plan.keep[0].1, [Newest, Hourly]);
        assert_eq!(plan.keep[47].0.id, "20260330T003000Z");
        assert_eq!(plan.keep[47].1, [Hourly]);
        assert_eq!(plan.delete.len(), 2 * 90 * 24 - 48);
    }

    #[test]
    fn daily_alone_keeps_the_last_snapshot_of_each_day() {
        let plan = plan(&policy(0, 0, 14, 0, 0), &ninety_days());
        let expected: Vec<String> = (18..=31)
            .rev()
            .map(|d| format!("202603{d:02}T230000Z"))
            .collect();
        assert_eq!(kept_ids(&plan), expected);
        assert_eq!(plan.keep[0].1, [Newest, Daily]);
        assert_eq!(plan.keep[13].1, [Daily]);
    }

    #[test]
    fn weekly_alone_keeps_the_last_snapshot_of_each_iso_week() {
        // 2026-03-31 is a Tuesday (week 14, partial); earlier weeks end on Sundays.
        let plan = plan(&policy(0, 0, 0, 8, 0), &ninety_days());
        assert_eq!(
            kept_ids(&plan),
            [
                "20260331T230000Z",
                "20260329T230000Z",
                "20260322T230000Z",
                "20260315T230000Z",
                "20260308T230000Z",
                "20260301T230000Z",
                "20260222T230000Z",
                "20260215T230000Z",
            ]
        );
    }

    #[test]
    fn monthly_alone_keeps_the_last_snapshot_of_each_month() {
        // Only three months exist: a count of 12 keeps all three, no more.
        let plan = plan(&policy(0, 0, 0, 0, 12), &ninety_days());
        assert_eq!(
            kept_ids(&plan),
            ["20260331T230000Z", "20260228T230000Z", "20260131T230000Z"]
        );
        assert_eq!(plan.keep[1].1, [Monthly]);
    }

    #[test]
    fn empty_periods_do_not_count() {
        // Backups stopped for months: monthly = 2 keeps the two newest months that hold a
        // snapshot, not "the last two calendar months".
        let snapshots =
            [(1, 10), (4, 10), (4, 20), (7, 5)].map(|(mo, d)| snap(at(2026, mo, d, 0, 0)));
        let plan = plan(&policy(0, 0, 0, 0, 2), &snapshots);
        assert_eq!(kept_ids(&plan), ["20260705T000000Z", "20260420T000000Z"]);
        assert_eq!(plan.delete.len(), 2);
    }

    #[test]
    fn default_policy_over_ninety_days() {
        let plan = plan(&policy(3, 48, 14, 8, 12), &ninety_days());
        // 48 hourly (Mar 30 00:00 to Mar 31 23:00, holding keep_last) + daily Mar 18..29 (12)
        // + weekly Mar 15, 8, 1, Feb 22, 15 (5) + monthly Feb 28, Jan 31 (2).
        assert_eq!(plan.keep.len(), 48 + 12 + 5 + 2);
        assert_eq!(plan.delete.len(), 90 * 24 - 67);
        assert_eq!(
            reasons_of(&plan, "20260331T230000Z"),
            Some(&[Newest, KeepLast, Hourly, Daily, Weekly, Monthly][..])
        );
        assert_eq!(
            reasons_of(&plan, "20260331T210000Z"),
            Some(&[KeepLast, Hourly][..])
        );
        assert_eq!(
            reasons_of(&plan, "20260330T230000Z"),
            Some(&[Hourly, Daily][..])
        );
        assert_eq!(
            reasons_of(&plan, "20260329T230000Z"),
            Some(&[Daily, Weekly][..])
        );
        assert_eq!(reasons_of(&plan, "20260215T230000Z"), Some(&[Weekly][..]));
        assert_eq!(reasons_of(&plan, "20260228T230000Z"), Some(&[Monthly][..]));
        assert_eq!(reasons_of(&plan, "20260131T230000Z"), Some(&[Monthly][..]));
        assert_eq!(reasons_of(&plan, "20260329T220000Z"), None);
        assert_eq!(reasons_of(&plan, "20260101T000000Z"), None);
    }

    #[test]
    fn newest_of_a_bucket_wins_whatever_the_input_order() {
        // Five snapshots of one morning, out of order.
        let snapshots = [(10, 20), (10, 45), (9, 59), (10, 5), (9, 10)]
            .map(|(h, mi)| snap(at(2026, 6, 1, h, mi)));
        let hourly = plan(&policy(0, 2, 0, 0, 0), &snapshots);
        assert_eq!(kept_ids(&hourly), ["20260601T104500Z", "20260601T095900Z"]);
        let delete: Vec<&str> = hourly.delete.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            delete,
            ["20260601T102000Z", "20260601T100500Z", "20260601T091000Z"]
        );

        let daily = plan(&policy(0, 0, 1, 0, 0), &snapshots);
        assert_eq!(kept_ids(&daily), ["20260601T104500Z"]);
    }

    #[test]
    fn unsorted_input_gives_the_same_plan_as_sorted() {
        let sorted = ninety_days();
        let expected = plan(&policy(3, 48, 14, 8, 12), &sorted);
        let mut rng = Rng(42);
        for _ in 0..5 {
            let mut shuffled = sorted.clone();
            rng.shuffle(&mut shuffled);
            assert_eq!(plan(&policy(3, 48, 14, 8, 12), &shuffled), expected);
        }
    }

    #[test]
    fn iso_week_spans_the_year_end() {
        // 2026-12-28 (Mon) to 2027-01-03 (Sun) is ISO week 2026-W53; 2027-01-04 starts
        // 2027-W01. Bucketing by calendar year would split W53 in two and keep Dec 31.
        let snapshots = [
            snap(at(2026, 12, 27, 12, 0)), // Sun, 2026-W52
            snap(at(2026, 12, 31, 12, 0)), // Thu, 2026-W53
            snap(at(2027, 1, 1, 12, 0)),   // Fri, 2026-W53
            snap(at(2027, 1, 3, 12, 0)),   // Sun, 2026-W53
            snap(at(2027, 1, 4, 12, 0)),   // Mon, 2027-W01
        ];
        let plan = plan(&policy(0, 0, 0, 3, 0), &snapshots);
        assert_eq!(
            kept_ids(&plan),
            ["20270104T120000Z", "20270103T120000Z", "20261227T120000Z"]
        );
        assert_eq!(plan.keep[0].1, [Newest, Weekly]);
    }

    #[test]
    fn month_and_day_buckets_span_the_year_end() {
        let snapshots = [
            snap(at(2025, 12, 31, 23, 0)),
            snap(at(2026, 1, 1, 0, 0)),
            snap(at(2026, 12, 31, 23, 0)),
        ];
        let monthly = plan(&policy(0, 0, 0, 0, 3), &snapshots);
        assert_eq!(monthly.keep.len(), 3);
        let daily = plan(&policy(0, 0, 3, 0, 0), &snapshots);
        assert_eq!(daily.keep.len(), 3);
    }

    #[test]
    fn planning_again_over_the_kept_set_deletes_nothing() {
        let policy = policy(3, 48, 14, 8, 12);
        let first = plan(&policy, &ninety_days());
        let kept: Vec<SnapshotRef> = first.keep.iter().map(|(s, _)| s.clone()).collect();
        let second = plan(&policy, &kept);
        assert!(second.delete.is_empty());
        assert_eq!(second.keep, first.keep);
    }

    #[test]
    fn decide_lists_every_snapshot_newest_first() {
        let snapshots = hourly_series(at(2026, 1, 1, 0, 0), 4);
        let decisions = decide(&policy(2, 0, 0, 0, 0), &snapshots);
        let ids: Vec<&str> = decisions.iter().map(|(s, _)| s.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "20260101T030000Z",
                "20260101T020000Z",
                "20260101T010000Z",
                "20260101T000000Z",
            ]
        );
        assert_eq!(decisions[0].1, Decision::Keep(vec![Newest, KeepLast]));
        assert_eq!(decisions[1].1, Decision::Keep(vec![KeepLast]));
        assert_eq!(decisions[2].1, Decision::Delete);
        assert_eq!(decisions[3].1, Decision::Delete);
    }

    #[test]
    fn random_inputs_keep_the_invariants() {
        let mut rng = Rng(0x5eed);
        let base = at(2025, 1, 1, 0, 0);
        for _ in 0..400 {
            // Up to 300 distinct times over about two years, clustered so that buckets often
            // hold several snapshots.
            let count = rng.below(300);
            let spread_minutes =
                [90, 3 * 24 * 60, 60 * 24 * 60, 730 * 24 * 60][rng.below(4) as usize];
            let mut seen = HashSet::new();
            let mut snapshots = Vec::new();
            for _ in 0..count {
                let offset = i64::try_from(rng.below(spread_minutes)).expect("fits");
                let time = base + TimeDelta::minutes(offset);
                if seen.insert(time) {
                    snapshots.push(snap(time));
                }
            }
            let counts: Vec<u32> = (0..5)
                .map(|_| u32::try_from(rng.below(12)).expect("fits"))
                .collect();
            let policy = policy(counts[0], counts[1], counts[2], counts[3], counts[4]);
            let plan = plan(&policy, &snapshots);

            // keep ∪ delete = input, and the two are disjoint.
            let kept: HashSet<&str> = plan.keep.iter().map(|(s, _)| s.id.as_str()).collect();
            let deleted: HashSet<&str> = plan.delete.iter().map(|s| s.id.as_str()).collect();
            let input: HashSet<&str> = snapshots.iter().map(|s| s.id.as_str()).collect();
            assert!(kept.is_disjoint(&deleted), "{policy:?}");
            assert_eq!(kept.len() + deleted.len(), snapshots.len(), "{policy:?}");
            assert_eq!(&kept | &deleted, input, "{policy:?}");

            // The newest is never deleted, and is the first kept.
            if let Some(newest) = snapshots.iter().max_by_key(|s| s.time) {
                assert_eq!(plan.keep[0].0, *newest, "{policy:?}");
                assert_eq!(plan.keep[0].1[0], Newest);
            } else {
                assert_eq!(plan, Plan::default());
            }

            // Every kept snapshot has a reason; no rule keeps more than its count.
            let mut per_reason: BTreeMap<KeepReason, u32> = BTreeMap::new();
            for (_, reasons) in &plan.keep {
                assert!(!reasons.is_empty());
                for reason in reasons {
                    *per_reason.entry(*reason).or_default() += 1;
                }
            }
            for (reason, limit) in [
                (KeepLast, policy.keep_last),
                (Hourly, policy.hourly),
                (Daily, policy.daily),
                (Weekly, policy.weekly),
                (Monthly, policy.monthly),
            ] {
                assert!(per_reason.get(&reason).copied().unwrap_or(0) <= limit);
            }
            let n = u32::try_from(snapshots.len()).expect("fits");
            assert_eq!(
                per_reason.get(&KeepLast).copied().unwrap_or(0),
                policy.keep_last.min(n)
            );

            // Idempotent.
            let again: Vec<SnapshotRef> = plan.keep.iter().map(|(s, _)| s.clone()).collect();
            let second = super::plan(&policy, &again);
            assert!(second.delete.is_empty(), "{policy:?}");
            assert_eq!(second.keep, plan.keep, "{policy:?}");
        }
    }

    #[test]
    fn prune_is_skipped_after_a_failed_backup() {
        assert_eq!(prune_allowed(None), Ok(()));
        assert_eq!(prune_allowed(Some(BackupOutcome::Committed)), Ok(()));
        assert_eq!(
            prune_allowed(Some(BackupOutcome::Failed)),
            Err(SkipReason::LastBackupFailed)
        );
    }

    #[test]
    fn orphan_dumps_older_than_the_grace_period() {
        let now = at(2026, 6, 2, 12, 0);
        let hour = Duration::from_secs(3600);
        let dumps = [
            (
                "prod/acme/a.dump.zst".to_string(),
                now - TimeDelta::hours(5),
            ),
            (
                "prod/acme/b.dump.zst".to_string(),
                now - TimeDelta::minutes(10),
            ),
            (
                "prod/acme/c.dump.zst".to_string(),
                now - TimeDelta::hours(1),
            ),
            (
                "prod/acme/d.dump.zst".to_string(),
                now + TimeDelta::hours(3),
            ),
            (
                "prod/acme/e.dump.zst".to_string(),
                now - TimeDelta::days(400),
            ),
        ];
        // Exactly at the grace period is not yet older than it.
        assert_eq!(
            orphan_dumps(&dumps, now, hour),
            ["prod/acme/a.dump.zst", "prod/acme/e.dump.zst"]
        );
        assert_eq!(
            orphan_dumps(&dumps, now, DEFAULT_ORPHAN_GRACE),
            ["prod/acme/e.dump.zst"]
        );
        assert!(orphan_dumps(&dumps, now, Duration::MAX).is_empty());
        assert!(orphan_dumps(&[], now, hour).is_empty());
    }

    #[test]
    fn keep_reasons_have_stable_names() {
        assert_eq!(KeepLast.to_string(), "keep_last");
        assert_eq!(Newest.as_str(), "newest");
    }

    #[test]
    fn the_last_copies_of_a_snapshot_another_target_lacks_are_held_for_the_grace() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = names(&["a", "b", "c"]);
        // Whether the copies on `holders` are held, with targets a, b and c configured.
        let held = |holders: &[&str], finished, now, grace| {
            held_for_repair(&names(holders), &all, finished, now, grace)
        };
        let day = Duration::from_secs(24 * 3600);
        let finished = at(2026, 11, 27, 9, 0);
        // b lacks it: held on a and c for a day after it finished, then not.
        assert!(held(&["a", "c"], finished, at(2026, 11, 27, 10, 0), day));
        assert!(held(&["a"], finished, at(2026, 11, 28, 8, 59), day));
        assert!(!held(&["a"], finished, at(2026, 11, 28, 9, 0), day));
        // Every target holds it: nothing to wait for.
        assert!(!held(
            &["a", "b", "c"],
            finished,
            at(2026, 11, 27, 10, 0),
            day
        ));
        // A holder no longer configured does not count as a lack.
        assert!(!held(
            &["a", "b", "c", "old"],
            finished,
            at(2026, 11, 27, 10, 0),
            day
        ));
        // Clock skew: a snapshot from the future is young.
        assert!(held(&["a"], at(2026, 11, 29, 0, 0), finished, day));
        // A grace too large to represent holds.
        assert!(held(&["a"], finished, at(2030, 1, 1, 0, 0), Duration::MAX));
    }
}
