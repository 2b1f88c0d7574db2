//! Verify for a fleet, end to end (real PostgreSQL source and verify clusters, real Garage):
//! oldest verification first, `verify.window` leaving the rest for the next run,
//! `verify.concurrency` with a scratch database per database, the overdue gauge; and
//! `[[source]] spread` in a real daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::support::env::{get, keys, Run, TestEnv};
use crate::support::postgres::PgCluster;

const VERIFY_PW_VAR: &str = "PGFERRY_TEST_FLEET_VERIFY_PASSWORD";
const FLEET: [&str; 3] = ["fleet_a", "fleet_b", "fleet_c"];

struct Fleet {
    env: TestEnv,
    verify: PgCluster,
    config: std::path::PathBuf,
}

impl Fleet {
    /// Three small databases backed up once to one S3 target; `[verify]` with `verify_keys`
    /// and a check that takes `check_seconds`, so that how long one verify lasts is known.
    async fn start(verify_keys: &str, check_seconds: u32) -> Fleet {
        let env = TestEnv::start().await;
        let verify = PgCluster::start()
            .await
            .expect("start the verify PostgreSQL");
        env.add_secret_var(VERIFY_PW_VAR, verify.superuser_password());
        for db in FLEET {
            env.small_database(db).await;
        }
        let (target, _) = env.s3_target("a").await;
        let config = env.write_config(&format!(
            "{}databases = {FLEET:?}\n{target}\n[verify]\nurl = \"postgres://postgres:${{{VERIFY_PW_VAR}}}@127.0.0.1:{}/postgres\"\nchecks = [\"SELECT (SELECT true FROM pg_sleep({check_seconds}))\"]\n{verify_keys}\n",
            env.source_toml("prod"),
            verify.port(),
        ));
        let fleet = Fleet {
            env,
            verify,
            config,
        };
        fleet.pgferry(&["backup"]).await.assert_code(0);
        fleet
    }

    async fn pgferry(&self, args: &[&str]) -> Run {
        self.env.pgferry(&self.config, args).await
    }

    /// `pgferry verify --json <args>`: its exit code and its JSON summary.
    async fn verify(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut all = vec!["verify", "--json"];
        all.extend_from_slice(args);
        let run = self.pgferry(&all).await;
        let last = run.stdout.lines().last().unwrap_or_default();
        let json = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{e}: not JSON:\n{}", run.output()));
        (run.code, json)
    }

    async fn assert_no_scratch(&self) {
        let dbs = self.verify.databases().await;
        assert!(
            dbs.iter().all(|d| !d.starts_with("pgferry")),
            "scratch databases left: {dbs:?}"
        );
    }
}

/// The databases of a summary's `reports` (each must have passed) and `skipped`.
fn verified_and_skipped(json: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    let names = |key: &str| -> Vec<String> {
        json[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {json}"))
            .iter()
            .map(|r| r["database"].as_str().unwrap().to_string())
            .collect()
    };
    for r in json["reports"].as_array().unwrap() {
        assert_eq!(r["result"], "success", "{r}");
    }
    (names("reports"), names("skipped"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_shorter_than_the_fleet_takes_the_oldest_verified_first_and_the_rest_next_time() {
    // One verify lasts over 6 s and the window is 5 s: each run verifies one database (the
    // first starts inside the window, the next turn comes after it).
    let fleet = Fleet::start("concurrency = 1\nwindow = \"5s\"\n", 6).await;
    let mut order = Vec::new();
    for (run, overdue_after) in [(1, 2), (2, 1), (3, 0), (4, 0)] {
        let (code, json) = fleet.verify(&[]).await;
        // Skipped databases leave the exit code alone: every verified one passed.
        assert_eq!(code, 0, "run {run}: {json}");
        let (verified, skipped) = verified_and_skipped(&json);
        assert_eq!(verified.len(), 1, "run {run}: {json}");
        assert_eq!(skipped.len(), 2, "run {run}: {json}");
        assert_eq!(
            json["overdue"],
            serde_json::json!({ "prod": overdue_after }),
            "run {run}: never-verified databases are overdue"
        );
        order.push(verified[0].clone());
        // The skipped ones are listed in the order the next run takes them.
        if run == 1 {
            assert_eq!(skipped, ["fleet_b", "fleet_c"], "{json}");
            assert!(json["skipped"][0]["last_verified"].is_null(), "{json}");
        }
    }
    // Never verified first (by name among equals), then the oldest verification: the fourth
    // run comes back to the first database.
    assert_eq!(order, ["fleet_a", "fleet_b", "fleet_c", "fleet_a"]);
    fleet.assert_no_scratch().await;

    // The text output names what was skipped and why.
    let run = fleet.pgferry(&["verify"]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains("prod/fleet_b ") && run.stdout.contains(" verified"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("skipped: the verify window ran out before its turn (last verified 20"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_two_verifies_two_databases_at_once_each_in_a_scratch_database_of_its_own() {
    let fleet = Fleet::start("concurrency = 2\n", 4).await;
    let run = fleet.pgferry(&["verify", "--json"]);
    tokio::pin!(run);
    // Watch the verify server while pgferry runs: every scratch database seen, and the most
    // at once.
    let mut seen = BTreeSet::new();
    let mut most = 0;
    let run = loop {
        tokio::select! {
            run = &mut run => break run,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let scratch: Vec<String> = fleet
                    .verify
                    .databases()
                    .await
                    .into_iter()
                    .filter(|d| d.starts_with("pgferry"))
                    .collect();
                most = most.max(scratch.len());
                seen.extend(scratch);
            }
        }
    };
    run.assert_code(0);
    let json: serde_json::Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    let (mut verified, skipped) = verified_and_skipped(&json);
    verified.sort();
    assert_eq!(verified, FLEET, "{json}");
    assert!(skipped.is_empty(), "{json}");
    assert_eq!(most, 2, "two at once, never more: {seen:?}");
    assert_eq!(seen.len(), 3, "a scratch database per database: {seen:?}");
    // The reports say so too: two verifies overlapped in time.
    let mut spans = Vec::new();
    for r in json["reports"].as_array().unwrap() {
        let t = |k: &str| {
            r[k].as_str()
                .unwrap()
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap()
        };
        spans.push((t("started_at"), t("finished_at")));
    }
    spans.sort();
    assert!(
        spans[1].0 < spans[0].1,
        "the first two verifies did not overlap: {spans:?}"
    );
    fleet.assert_no_scratch().await;
    assert_eq!(json["overdue"], serde_json::json!({ "prod": 0 }), "{json}");
}

/// A Prometheus Pushgateway on a free port, killed on drop.
struct Pushgateway {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    url: String,
}

impl Pushgateway {
    async fn start() -> Pushgateway {
        let bin = "/usr/bin/prometheus-pushgateway";
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: run scripts/setup.sh (Debian package prometheus-pushgateway)"
        );
        let port = crate::support::free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new(bin)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--persistence.file={}",
                dir.path().join("p").display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{url}/-/ready")).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pushgateway did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Pushgateway {
            _child: child,
            _dir: dir,
            url,
        }
    }

    /// The value of `name` in the group whose labels include every one of `labels`.
    async fn value(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overdue_gauge_counts_databases_without_a_recent_report_per_source() {
    // max_age 1 s: a report older than that is overdue, so a database verified in an earlier
    // run counts again, and one verified in this run does not. Each run verifies one.
    let fleet = Fleet::start("window = \"3s\"\nmax_age = \"1s\"\n", 4).await;
    let gateway = Pushgateway::start().await;
    let overdue = || {
        gateway.value(
            "pgferry_verify_overdue_databases",
            &["job=\"pgferry_verify\"", "source=\"prod\""],
        )
    };
    let (code, json) = fleet.verify(&["--pushgateway", &gateway.url]).await;
    assert_eq!(code, 0, "{json}");
    assert_eq!(verified_and_skipped(&json).0, ["fleet_a"]);
    assert_eq!(
        overdue().await,
        Some(2.0),
        "fleet_b and fleet_c never verified"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, json) = fleet.verify(&["--pushgateway", &gateway.url]).await;
    assert_eq!(verified_and_skipped(&json).0, ["fleet_b"]);
    // fleet_c never, fleet_a seconds ago (older than max_age); fleet_b in this run.
    assert_eq!(overdue().await, Some(2.0));
    assert_eq!(json["overdue"], serde_json::json!({ "prod": 2 }));
    // The skipped databases are counted in the run's counters.
    let skipped = gateway
        .value(
            "pgferry_verifies_total",
            &["job=\"pgferry_verify\"", "result=\"skipped\""],
        )
        .await;
    assert_eq!(skipped, Some(2.0));
    // A run of some databases cannot count a source's: it pushes no overdue value and
    // leaves the source's last one.
    let (_, json) = fleet
        .verify(&["--database", "fleet_c", "--pushgateway", &gateway.url])
        .await;
    assert_eq!(verified_and_skipped(&json).0, ["fleet_c"]);
    assert_eq!(json["overdue"], serde_json::json!({}), "{json}");
    assert_eq!(overdue().await, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_spread_starts_the_dumps_of_a_slot_at_distinct_offsets_under_its_id() {
    // Every 30 s, spread over 20 s: the three databases of a slot start at their offsets and
    // their snapshots all carry the slot's id.
    let env = TestEnv::start().await;
    for db in FLEET {
        env.small_database(db).await;
    }
    let (target, store) = env.s3_target("a").await;
    let port = crate::support::free_port();
    let config = env.write_config(&format!(
        "[daemon]\nlisten = \"127.0.0.1:{port}\"\nmax_concurrent_backups = 3\n{}databases = {FLEET:?}\nschedule = \"*/30 * * * * *\"\nspread = \"20s\"\n{target}",
        env.source_toml("prod"),
    ));
    let (mut daemon, _log) = env.start_until(&config, &["daemon"], "Slot due.").await;
    // A slot that started after the daemon did (the first may have begun before it, and
    // then the databases whose offset had passed start at once).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    let (slot, manifests) = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no slot with all three snapshots: {:?}",
            keys(&store).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut by_slot: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for k in keys(&store).await {
            if let Some(id) = k
                .strip_suffix(".manifest.json")
                .and_then(|k| k.rsplit('/').next())
            {
                let m: serde_json::Value = serde_json::from_slice(&get(&store, &k).await).unwrap();
                by_slot.entry(id.to_string()).or_default().push(m);
            }
        }
        // The second slot seen complete, so the daemon was up before it began.
        let complete: Vec<_> = by_slot
            .into_iter()
            .filter(|(_, ms)| ms.len() == FLEET.len())
            .collect();
        if complete.len() >= 2 {
            break complete[1].clone();
        }
    };
    daemon.start_kill().unwrap();
    let slot_start = pgferry::schedule::parse_snapshot_id(&slot).unwrap();
    let mut starts = BTreeSet::new();
    for m in &manifests {
        assert_eq!(m["snapshot_id"], slot.as_str());
        let db = m["database"].as_str().unwrap();
        let started: chrono::DateTime<chrono::Utc> =
            m["started_at"].as_str().unwrap().parse().unwrap();
        let offset = pgferry::daemon::scheduler::spread_offset("prod", db, Duration::from_secs(20));
        let due = slot_start + chrono::TimeDelta::from_std(offset).unwrap();
        // pg_dump starts a moment after the run does (lock, connection).
        let late = started - due;
        assert!(
            late >= chrono::TimeDelta::zero() && late < chrono::TimeDelta::seconds(5),
            "{db}: offset {offset:?}, started {started}, slot {slot_start}"
        );
        starts.insert(offset);
    }
    assert_eq!(starts.len(), FLEET.len(), "distinct offsets: {starts:?}");
}
