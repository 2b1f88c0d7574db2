//! `pgferry verify` end to end: production cluster + Garage (two buckets) + a separate verify
//! cluster, all real.

use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStore, PutPayload};

use crate::backup::TRICKY_SQL;
use crate::support::env::{self, get, keys, Run, TestEnv};
use crate::support::postgres::PgCluster;

const VERIFY_PW_VAR: &str = "PGFERRY_TEST_VERIFY_PASSWORD";

struct World {
    env: TestEnv,
    verify: PgCluster,
    stores: Vec<Arc<dyn ObjectStore>>,
    config: std::path::PathBuf,
}

impl World {
    async fn start(checks: &[&str]) -> World {
        World::start_with(checks, "").await
    }

    /// Like [`start`](Self::start), with `extra_sql` run in `shop` after the usual tables.
    async fn start_with(checks: &[&str], extra_sql: &str) -> World {
        let env = TestEnv::start().await;
        let verify = PgCluster::start()
            .await
            .expect("start the verify PostgreSQL");
        env.add_secret_var(VERIFY_PW_VAR, verify.superuser_password());
        env.pg.create_database("shop").await.unwrap();
        env.pg
            .execute("shop", &format!("{TRICKY_SQL}{extra_sql}"))
            .await
            .unwrap();
        let (a, store_a) = env.s3_target("a").await;
        let (b, store_b) = env.s3_target("b").await;
        let checks = checks
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = env.write_config(&format!(
            "{}databases = [\"shop\"]\n{a}{b}\n[verify]\nurl = \"postgres://postgres:${{{VERIFY_PW_VAR}}}@127.0.0.1:{}/postgres\"\nchecks = [{checks}]\n",
            env.source_toml("prod"),
            verify.port(),
        ));
        World {
            env,
            verify,
            stores: vec![store_a, store_b],
            config,
        }
    }

    async fn pgferry(&self, args: &[&str]) -> Run {
        self.env.pgferry(&self.config, args).await
    }

    async fn backup(&self) -> String {
        self.pgferry(&["backup"]).await.snapshot_id()
    }

    /// The verify cluster holds no database of ours (scratch databases are dropped).
    async fn assert_no_scratch(&self) {
        let dbs = self.verify.databases().await;
        assert!(
            dbs.iter().all(|d| !d.starts_with("pgferry")),
            "scratch databases left: {dbs:?}"
        );
    }

    async fn report(&self, i: usize, id: &str) -> serde_json::Value {
        let key = format!("prod/shop/{id}.verify.json");
        serde_json::from_slice(&get(&self.stores[i], &key).await).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_verify_passes_writes_reports_and_list_shows_it() {
    let w = World::start(&["SELECT count(*) = 3001 FROM mixed"]).await;
    let id = w.backup().await;
    let run = w.pgferry(&["verify"]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!("prod/shop {id} verified")),
        "{}",
        run.stdout
    );
    for i in 0..2 {
        let r = w.report(i, &id).await;
        assert_eq!(r["result"], "success", "{r}");
        assert_eq!(r["restored_from"], "a");
        let tables = r["tables"].as_array().unwrap();
        assert!(tables.len() >= 3, "{r}");
        assert!(tables.iter().all(|t| t["expected"] == t["actual"]), "{r}");
        assert_eq!(r["checks"][0]["passed"], true);
        assert_eq!(r["large_objects"]["actual"], 1);
    }
    w.assert_no_scratch().await;
    let run = w.pgferry(&["list", "--json"]).await;
    run.assert_code(0);
    let listed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        listed["snapshots"][0]["verify"]["result"], "success",
        "{listed}"
    );
    let run = w.pgferry(&["list"]).await;
    assert!(run.stdout.contains("success"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_row_count_and_a_false_check_fail_naming_them() {
    let w = World::start(&["SELECT false", "SELECT count(*) > 0 FROM mixed"]).await;
    let id = w.backup().await;
    // Tamper with the manifest on both targets: one table claims 7 more rows.
    for store in &w.stores {
        let key = format!("prod/shop/{id}.manifest.json");
        let mut m: serde_json::Value = serde_json::from_slice(&get(store, &key).await).unwrap();
        let tables = m["tables"].as_array_mut().unwrap();
        let t = tables.iter_mut().find(|t| t["name"] == "mixed").unwrap();
        t["rows"] = (t["rows"].as_u64().unwrap() + 7).into();
        store
            .put(
                &key.as_str().into(),
                PutPayload::from(serde_json::to_vec(&m).unwrap()),
            )
            .await
            .unwrap();
    }
    let run = w
        .pgferry(&["verify", "--source", "prod", "--database", "shop"])
        .await;
    run.assert_code(1);
    let out = run.output();
    assert!(
        out.contains("public.mixed has 3001 rows, the manifest says 3008 (-7)"),
        "{out}"
    );
    assert!(
        out.contains("check `SELECT false` failed: returned false"),
        "{out}"
    );
    assert!(
        !out.contains("SELECT count(*) > 0 FROM mixed` failed"),
        "{out}"
    );
    let r = w.report(0, &id).await;
    assert_eq!(r["result"], "failure");
    w.assert_no_scratch().await;
    let run = w.pgferry(&["list", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        listed["snapshots"][0]["verify"]["result"], "failure",
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_copy_verifies_from_the_other_target_and_is_reported() {
    let w = World::start(&[]).await;
    let id = w.backup().await;
    env::corrupt_dump(&w.stores[0], &id).await;
    let run = w.pgferry(&["verify", "--json"]).await;
    run.assert_code(0);
    let out: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(out["result"], "success", "{out}");
    let r = &out["reports"][0];
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(r["restored_from"], "b");
    assert_eq!(r["failed_targets"][0]["target"], "a", "{r}");
    let why = r["failed_targets"][0]["error"].as_str().unwrap();
    assert!(why.contains("checksum") || why.contains("corrupt"), "{why}");
    w.assert_no_scratch().await;

    // Both copies corrupt: verify fails, the report says so, nothing is left behind.
    env::corrupt_dump(&w.stores[1], &id).await;
    let run = w.pgferry(&["verify"]).await;
    run.assert_code(1);
    assert!(
        run.stdout.contains("no target holds a copy that restores"),
        "{}",
        run.stdout
    );
    w.assert_no_scratch().await;
    assert!(keys(&w.stores[1])
        .await
        .iter()
        .any(|k| k.ends_with(".verify.json")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_pushes_its_metrics_to_a_pushgateway() {
    let w = World::start(&[]).await;
    w.backup().await;
    let port = crate::support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let bin = "/usr/bin/prometheus-pushgateway";
    assert!(
        std::path::Path::new(bin).exists(),
        "{bin} is missing: run scripts/setup.sh (Debian package prometheus-pushgateway)"
    );
    let _gateway = tokio::process::Command::new(bin)
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
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client.get(format!("{url}/-/ready")).send().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pushgateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the pushgateway holds.
    let pushed = || async {
        client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let run = w.pgferry(&["verify", "--pushgateway", &url]).await;
    run.assert_code(0);
    let metrics = pushed().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgferry_verifies_total{")
                && l.contains("job=\"pgferry_verify\"")
                && l.contains("result=\"success\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    let last_success = |metrics: &str| -> Option<String> {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("pgferry_verify_last_success_timestamp_seconds{")
                    && l.contains("database=\"shop\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    let first = last_success(&metrics).unwrap_or_else(|| panic!("{metrics}"));

    // A failing night: every copy is damaged, verify fails, and what it pushes still holds
    // shop's last success (read from the first night's report in the buckets).
    let id = env::first_snapshot_in(&w.stores[0], "prod/shop").await;
    for store in &w.stores {
        env::corrupt_dump(store, &id).await;
    }
    let run = w.pgferry(&["verify", "--pushgateway", &url]).await;
    run.assert_code(1);
    let metrics = pushed().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pgferry_verifies_total{")
                && l.contains("result=\"failure\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert_eq!(last_success(&metrics), Some(first), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_verify_writes_no_report_and_the_next_one_drops_its_scratch_database() {
    // Big enough that pg_restore is still loading when the scratch database is seen.
    let big = "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS h, repeat('x', 100) AS pad FROM generate_series(1, 1500000) g;";
    let w = World::start_with(&["SELECT count(*) = 1500000 FROM big"], big).await;
    let id = w.backup().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .arg("--config")
        .arg(&w.config)
        .arg("verify")
        .envs(w.env.env_vars())
        .env(VERIFY_PW_VAR, w.verify.superuser_password())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let scratch = loop {
        let dbs = w.verify.databases().await;
        if let Some(d) = dbs.iter().find(|d| d.starts_with("pgferry")) {
            break d.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the scratch database never appeared: {dbs:?}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "verify ended before the scratch database was seen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    child.start_kill().unwrap(); // SIGKILL: no cleanup code runs
    assert!(!child.wait().await.unwrap().success());
    assert!(w.verify.databases().await.contains(&scratch));
    for store in &w.stores {
        assert!(
            keys(store)
                .await
                .iter()
                .all(|k| !k.ends_with(".verify.json")),
            "a killed verify wrote a report"
        );
    }
    let run = w.pgferry(&["list", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(listed["snapshots"][0]["verify"].is_null(), "{listed}");

    let run = w.pgferry(&["verify"]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!("prod/shop {id} verified")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "dropped the scratch database(s) of an interrupted verify: {scratch}"
        )),
        "{}",
        run.stdout
    );
    w.assert_no_scratch().await;
    for i in 0..2 {
        let r = w.report(i, &id).await;
        assert_eq!(r["result"], "success", "{r}");
        assert_eq!(r["cleaned_leftovers"], serde_json::json!([scratch]), "{r}");
    }
}
