//! Scheduler tests on tokio's paused clock with a fake [`Runner`].

use std::sync::Mutex;

use chrono::TimeZone;

use super::*;
use crate::config::Config;

fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, h, m, s)
        .single()
        .unwrap()
}

fn source(schedule: &str) -> SourceConfig {
    source_with(schedule, "")
}

/// A source with more keys (`extra`, TOML lines of `[[source]]`).
fn source_with(schedule: &str, extra: &str) -> SourceConfig {
    let text = format!(
        r#"
[[source]]
name = "prod"
url = "postgres://pgferry@127.0.0.1:1/postgres"
schedule = "{schedule}"
{extra}

[[target]]
name = "local"
url = "file:///nonexistent/pgferry"
"#
    );
    Config::from_str_at(&text, std::path::Path::new("/etc/pgferry/pgferry.toml"))
        .unwrap()
        .sources
        .remove(0)
}

#[derive(Default)]
struct Fake {
    databases: Mutex<Vec<String>>,
    duration: Duration,
    /// Attempts that fail (retryably) before the first success.
    failures_left: Mutex<u32>,
    /// (database, snapshot id, when the attempt started)
    attempts: Mutex<Vec<(String, String, DateTime<Utc>)>>,
    pruned: Mutex<Vec<String>>,
    clock: Option<TokioClock>,
}

impl Fake {
    fn new(dbs: &[&str], duration: Duration) -> Arc<Fake> {
        Arc::new(Fake {
            databases: Mutex::new(dbs.iter().map(|s| s.to_string()).collect()),
            duration,
            clock: Some(TokioClock::starting_at(at(14, 0, 0))),
            ..Fake::default()
        })
    }
    fn attempts(&self) -> Vec<(String, String, DateTime<Utc>)> {
        self.attempts.lock().unwrap().clone()
    }
}

impl Runner for Arc<Fake> {
    async fn discover(&self, _source: &SourceConfig) -> Result<Vec<String>, RunError> {
        Ok(self.databases.lock().unwrap().clone())
    }

    async fn attempt(
        &self,
        _source: &SourceConfig,
        database: &str,
        snapshot_id: &str,
        cancel: CancellationToken,
    ) -> Result<Attempt, RunError> {
        let clock = self.clock.unwrap();
        self.attempts
            .lock()
            .unwrap()
            .push((database.into(), snapshot_id.into(), clock.now()));
        tokio::select! {
            _ = tokio::time::sleep(self.duration) => {}
            _ = cancel.cancelled() => return Err(BackupError::Cancelled { database: database.into() }.into()),
        }
        let mut left = self.failures_left.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            return Err(BackupError::DumpFailed {
                database: database.into(),
                status: "exit code 1".into(),
                stderr: "connection reset".into(),
            }
            .into());
        }
        Ok(Attempt::Committed {
            finished_at: clock.now(),
        })
    }

    async fn after_commit(&self, _s: &SourceConfig, database: &str, _l: Option<BackupOutcome>) {
        self.pruned.lock().unwrap().push(database.into());
    }
}

fn scheduler(fake: &Arc<Fake>, schedule: &str, max: usize) -> Scheduler<Arc<Fake>, TokioClock> {
    Scheduler::new(SchedulerParts {
        runner: fake.clone(),
        clock: fake.clock.unwrap(),
        sources: vec![source(schedule)],
        state: Arc::new(StateMap::default()),
        max_concurrent: max,
        retry: RetryPolicy::default(),
        metrics: Metrics::new(),
    })
}

fn skipped(s: &Scheduler<Arc<Fake>, TokioClock>, db: &str) -> u64 {
    s.inner
        .metrics
        .backups_total
        .with_label_values(&["prod", db, "skipped"])
        .get()
}

#[test]
fn tick_runs_the_current_slot_once_then_sleeps_until_the_next() {
    let hourly = Schedule::parse("0 * * * *").unwrap();
    assert_eq!(tick(&hourly, None, at(14, 30, 0)), Tick::Run(at(14, 0, 0)));
    assert_eq!(
        tick(&hourly, Some(at(14, 0, 0)), at(14, 30, 0)),
        Tick::SleepUntil(at(15, 0, 0))
    );
    assert_eq!(
        tick(&hourly, Some(at(14, 0, 0)), at(15, 0, 0)),
        Tick::Run(at(15, 0, 0))
    );
    // Missed slots are not replayed: only the latest runs.
    assert_eq!(
        tick(&hourly, Some(at(12, 0, 0)), at(15, 10, 0)),
        Tick::Run(at(15, 0, 0))
    );
}

#[test]
fn retries_back_off_doubling_up_to_the_cap_and_stop_at_the_next_slot() {
    let p = RetryPolicy::default();
    let secs: Vec<u64> = (1..=7).map(|n| p.delay(n).as_secs()).collect();
    assert_eq!(secs, vec![15, 30, 60, 120, 240, 300, 300]);
    assert_eq!(p.delay(u32::MAX), RETRY_MAX);
    let now = at(14, 0, 0);
    assert_eq!(p.retry_at(1, now, Some(at(15, 0, 0))), Some(at(14, 0, 15)));
    assert_eq!(p.retry_at(1, now, Some(at(14, 0, 10))), None);
    assert_eq!(p.retry_at(1, now, None), Some(at(14, 0, 15)));
}

#[tokio::test(start_paused = true)]
async fn a_database_still_running_is_skipped_for_the_slot_not_queued() {
    // Every 10 s; a backup takes 25 s: slots 0 and 30 run, 10, 20 and 40 are skipped.
    let fake = Fake::new(&["a"], Duration::from_secs(25));
    let s = scheduler(&fake, "*/10 * * * * *", 2);
    s.start();
    tokio::time::sleep(Duration::from_secs(45)).await;
    let ids: Vec<String> = fake.attempts().into_iter().map(|a| a.1).collect();
    assert_eq!(ids, vec!["20261127T140000Z", "20261127T140030Z"]);
    assert_eq!(skipped(&s, "a"), 3);
    let st = s.state().get("prod", "a").unwrap();
    assert_eq!(st.running.unwrap().snapshot_id, "20261127T140030Z");
    assert_eq!(st.last_snapshot_id.as_deref(), Some("20261127T140000Z"));
    assert_eq!(*fake.pruned.lock().unwrap(), vec!["a".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn a_database_created_between_slots_is_backed_up_at_the_next_slot() {
    let fake = Fake::new(&["a"], Duration::from_secs(1));
    let s = scheduler(&fake, "*/10 * * * * *", 2);
    s.start();
    tokio::time::sleep(Duration::from_secs(15)).await;
    fake.databases.lock().unwrap().push("b".into());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let got: Vec<(String, String)> = fake
        .attempts()
        .into_iter()
        .map(|(d, id, _)| (d, id))
        .collect();
    let want: Vec<(String, String)> = [
        ("a", "20261127T140000Z"),
        ("a", "20261127T140010Z"),
        ("a", "20261127T140020Z"),
        ("b", "20261127T140020Z"),
    ]
    .iter()
    .map(|(d, id)| (d.to_string(), id.to_string()))
    .collect();
    assert_eq!(got, want);
    assert_eq!(skipped(&s, "a"), 0);
    // The status knows the next slot.
    let st = s.state().get("prod", "b").unwrap();
    assert_eq!(st.next_run, Some(at(14, 0, 30)));
}

#[tokio::test(start_paused = true)]
async fn failures_retry_with_backoff_inside_the_slot() {
    let fake = Fake::new(&["a"], Duration::from_secs(1));
    *fake.failures_left.lock().unwrap() = 2;
    let s = scheduler(&fake, "0 * * * *", 1);
    s.start();
    tokio::time::sleep(Duration::from_secs(120)).await;
    let got: Vec<(String, DateTime<Utc>)> = fake
        .attempts()
        .into_iter()
        .map(|(_, id, t)| (id, t))
        .collect();
    let id = "20261127T140000Z".to_string();
    // Fails at 1 s, retries 15 s later; fails at 17 s, retries 30 s later; commits at 48 s.
    assert_eq!(
        got,
        vec![
            (id.clone(), at(14, 0, 0)),
            (id.clone(), at(14, 0, 16)),
            (id.clone(), at(14, 0, 47))
        ]
    );
    let st = s.state().get("prod", "a").unwrap();
    assert_eq!(st.consecutive_failures, 0);
    assert_eq!(st.last_success, Some(at(14, 0, 48)));
    assert!(st.last_error.unwrap().contains("connection reset"));
    assert_eq!(st.next_run, Some(at(15, 0, 0)));
}

#[tokio::test(start_paused = true)]
async fn at_most_max_concurrent_backups_run_at_once() {
    let fake = Fake::new(&["a", "b", "c"], Duration::from_secs(10));
    let s = scheduler(&fake, "0 * * * *", 2);
    s.start();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let starts: Vec<DateTime<Utc>> = fake.attempts().into_iter().map(|a| a.2).collect();
    assert_eq!(starts, vec![at(14, 0, 0), at(14, 0, 0), at(14, 0, 10)]);
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_the_grace_period_then_cancels() {
    let fake = Fake::new(&["a"], Duration::from_secs(3600));
    let s = scheduler(&fake, "0 * * * *", 2);
    s.start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = tokio::time::Instant::now();
    s.drain(Duration::from_secs(5)).await;
    assert_eq!(before.elapsed(), Duration::from_secs(5));
    let st = s.state().get("prod", "a").unwrap();
    assert!(st.running.is_none());
    assert!(st.last_success.is_none());
    // Cancelled is not a failure.
    assert_eq!(st.consecutive_failures, 0);
    assert!(fake.pruned.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn drain_returns_as_soon_as_running_backups_finish() {
    let fake = Fake::new(&["a"], Duration::from_secs(2));
    let s = scheduler(&fake, "0 * * * *", 2);
    s.start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = tokio::time::Instant::now();
    s.drain(Duration::from_secs(60)).await;
    assert_eq!(before.elapsed(), Duration::from_secs(1));
    assert!(s.state().get("prod", "a").unwrap().last_success.is_some());
}

#[tokio::test(start_paused = true)]
async fn retries_stop_when_the_next_slot_is_due() {
    let fake = Fake::new(&["a"], Duration::from_secs(1));
    *fake.failures_left.lock().unwrap() = u32::MAX;
    let s = scheduler(&fake, "*/20 * * * * *", 1);
    s.start();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let got: Vec<(String, DateTime<Utc>)> = fake
        .attempts()
        .into_iter()
        .map(|(_, id, t)| (id, t))
        .collect();
    // Slot 0: fails at 1 s, retries at 16 s, fails at 17 s; the next retry (47 s) would be past
    // the next slot (20 s), so slot 0 gives up and slot 20 starts on time.
    assert_eq!(
        got,
        vec![
            ("20261127T140000Z".to_string(), at(14, 0, 0)),
            ("20261127T140000Z".to_string(), at(14, 0, 16)),
            ("20261127T140020Z".to_string(), at(14, 0, 20)),
        ]
    );
    assert_eq!(skipped(&s, "a"), 0);
    assert_eq!(s.state().get("prod", "a").unwrap().consecutive_failures, 3);
}

fn spread_scheduler(
    fake: &Arc<Fake>,
    schedule: &str,
    spread: &str,
    max: usize,
) -> Scheduler<Arc<Fake>, TokioClock> {
    Scheduler::new(SchedulerParts {
        runner: fake.clone(),
        clock: fake.clock.unwrap(),
        sources: vec![source_with(schedule, &format!("spread = \"{spread}\""))],
        state: Arc::new(StateMap::default()),
        max_concurrent: max,
        retry: RetryPolicy::default(),
        metrics: Metrics::new(),
    })
}

const SPREAD: Duration = Duration::from_secs(45 * 60);

fn offset(db: &str) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(spread_offset("prod", db, SPREAD)).unwrap()
}

#[test]
fn spread_offsets_are_stable_inside_the_spread_and_spread_out() {
    // Stable across runs and builds: the value is pinned (sha256, not a per-process hash).
    assert_eq!(
        spread_offset("prod", "acme", SPREAD),
        spread_offset("prod", "acme", SPREAD)
    );
    assert_eq!(
        spread_offset("prod", "acme", SPREAD),
        Duration::from_secs(PINNED_ACME_OFFSET)
    );
    assert_ne!(
        spread_offset("prod", "acme", SPREAD),
        spread_offset("staging", "acme", SPREAD),
        "the source is part of the key"
    );
    let offsets: Vec<Duration> = (0..300)
        .map(|i| spread_offset("prod", &format!("db{i:03}"), SPREAD))
        .collect();
    assert!(offsets.iter().all(|o| *o < SPREAD));
    let distinct: std::collections::BTreeSet<_> = offsets.iter().collect();
    assert!(distinct.len() >= 250, "{} distinct of 300", distinct.len());
    // Every 5-minute ninth of the 45 minutes holds some: no pile-up.
    for ninth in 0..9u64 {
        let (from, to) = (ninth * 300, (ninth + 1) * 300);
        let n = offsets
            .iter()
            .filter(|o| (from..to).contains(&o.as_secs()))
            .count();
        assert!((15..=60).contains(&n), "{n} offsets in [{from}s, {to}s)");
    }
    assert_eq!(
        spread_offset("prod", "acme", Duration::ZERO),
        Duration::ZERO
    );
}

/// sha256("prod/acme")'s first 8 bytes, big-endian, modulo 2700 s.
const PINNED_ACME_OFFSET: u64 = 1711;

#[tokio::test(start_paused = true)]
async fn with_spread_each_database_starts_at_its_offset_under_the_slots_id() {
    let dbs = ["acme", "globex", "initech", "umbrella"];
    let fake = Fake::new(&dbs, Duration::from_secs(60));
    let s = spread_scheduler(&fake, "0 * * * *", "45m", 4);
    s.start();
    // Before any offset has come (all are after 14:00:00 but one may be 0), nothing that is
    // not due runs, and the status says when each starts.
    tokio::time::sleep(Duration::from_millis(10)).await;
    for db in dbs {
        let st = s.state().get("prod", db).unwrap();
        if offset(db) > chrono::TimeDelta::zero() {
            assert!(st.running.is_none(), "{db} runs before its offset");
            assert_eq!(st.next_run, Some(at(14, 0, 0) + offset(db)), "{db}");
        }
    }
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    let mut got = fake.attempts();
    got.sort_by_key(|a| a.2);
    let mut want: Vec<(String, String, DateTime<Utc>)> = Vec::new();
    for (slot, id) in [
        (at(14, 0, 0), "20261127T140000Z"),
        (at(15, 0, 0), "20261127T150000Z"),
    ] {
        for db in dbs {
            want.push((db.to_string(), id.to_string(), slot + offset(db)));
        }
    }
    want.sort_by_key(|a| a.2);
    assert_eq!(got, want);
    // Distinct starts: the slot's dumps are not stacked at :00.
    let starts: std::collections::BTreeSet<_> = got.iter().map(|a| a.2).collect();
    assert_eq!(starts.len(), got.len(), "{got:?}");
    // After its run, each database's next run is the next slot plus its offset.
    for db in dbs {
        let st = s.state().get("prod", db).unwrap();
        assert_eq!(st.next_run, Some(at(16, 0, 0) + offset(db)), "{db}");
        assert_eq!(st.last_snapshot_id.as_deref(), Some("20261127T150000Z"));
        assert_eq!(st.consecutive_failures, 0);
    }
    for db in dbs {
        assert_eq!(skipped(&s, db), 0, "{db}");
    }
}

#[tokio::test(start_paused = true)]
async fn with_spread_max_concurrent_backups_still_applies() {
    // Dumps of 20 minutes, one at a time: a database whose offset comes while another runs
    // waits for the permit, and none overlap.
    let dbs = ["acme", "globex", "initech", "umbrella"];
    let fake = Fake::new(&dbs, Duration::from_secs(20 * 60));
    let s = spread_scheduler(&fake, "0 * * * *", "45m", 1);
    s.start();
    tokio::time::sleep(Duration::from_secs(3600 - 1)).await;
    let mut got = fake.attempts();
    got.sort_by_key(|a| a.2);
    assert!(got.len() >= 2, "{got:?}");
    for w in got.windows(2) {
        assert!(
            w[1].2 - w[0].2 >= chrono::TimeDelta::minutes(20),
            "overlapping dumps: {got:?}"
        );
    }
    for (db, id, t) in &got {
        assert_eq!(id, "20261127T140000Z");
        assert!(
            *t >= at(14, 0, 0) + offset(db),
            "{db} started before its offset"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_daemon_started_mid_slot_runs_the_databases_whose_offset_passed_at_once() {
    let dbs = ["acme", "globex", "initech", "umbrella", "hooli", "wayne"];
    let start = at(14, 20, 0);
    let fake = Arc::new(Fake {
        databases: Mutex::new(dbs.iter().map(|s| s.to_string()).collect()),
        duration: Duration::from_secs(1),
        clock: Some(TokioClock::starting_at(start)),
        ..Fake::default()
    });
    let s = spread_scheduler(&fake, "0 * * * *", "45m", 8);
    s.start();
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    let got = fake.attempts();
    assert_eq!(got.len(), dbs.len(), "{got:?}");
    for (db, id, t) in got {
        assert_eq!(id, "20261127T140000Z", "the slot's id, not the start time");
        let due = at(14, 0, 0) + offset(&db);
        assert_eq!(t, due.max(start), "{db}");
    }
}
