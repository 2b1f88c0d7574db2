//! `pgferry daemon` end to end: the schedule, `/metrics` (checked by promtool), two replicas
//! sharing the work, the token-protected API, readiness following the S3 server, and SIGTERM
//! in the middle of a long dump. Real PostgreSQL, real Garage, the real binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::support::env::{self, assert_no_secret, keys, TestEnv};
use crate::support::free_port;

/// Where Debian's `prometheus` package installs promtool.
const PROMTOOL: &str = "/usr/bin/promtool";

/// A running daemon, its port and everything it logged so far.
struct Daemon {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

/// A `[daemon]` section on a free loopback port.
fn daemon_toml(port: u16, token_file: &Path, grace: &str) -> String {
    format!(
        "[daemon]\nlisten = \"127.0.0.1:{port}\"\napi_token_file = \"{}\"\nshutdown_grace = \"{grace}\"\n",
        token_file.display()
    )
}

impl Daemon {
    async fn start(env: &TestEnv, config: &Path, port: u16) -> Daemon {
        let mut child = env
            .command(config, &["--log-format", "json", "daemon"])
            .spawn()
            .expect("start pgferry daemon");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let d = Daemon { child, port, log };
        d.wait_until(
            "the HTTP server answers",
            Duration::from_secs(30),
            || async { d.get("/healthz").await.0 == 200 },
        )
        .await;
        d
    }

    /// Starts a daemon on a free port, shutdown grace `grace`, with a config of `before`, the
    /// `[daemon]` section, source `prod` with `source_keys` (schedule, databases, …), then
    /// `targets`.
    async fn start_with(
        env: &TestEnv,
        before: &str,
        grace: &str,
        source_keys: &str,
        targets: &str,
    ) -> Daemon {
        let port = free_port();
        let config = env.write_config(&format!(
            "{before}{}{}{source_keys}{targets}",
            daemon_toml(port, &token_path(env), grace),
            env.source_toml("prod"),
        ));
        Daemon::start(env, &config, port).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        match reqwest::get(self.url(path)).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    async fn post_backup(&self, token: Option<&str>, body: &str) -> (u16, String) {
        let mut req = reqwest::Client::new()
            .post(self.url("/api/v1/backups"))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = req.send().await.expect("POST /api/v1/backups");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    async fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/api/v1/status").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    /// Polls `cond` every 200 ms until it holds; fails the test after `limit`.
    async fn wait_until<F, Fut>(&self, what: &str, limit: Duration, cond: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !cond().await {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting until {what}; daemon log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn sigterm(&self) {
        let pid = self.child.id().expect("daemon pid");
        let st = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(st.success());
    }

    /// SIGTERM, then the exit code and how long the exit took.
    async fn stop(self, limit: Duration) -> (i32, Duration, String) {
        self.sigterm();
        self.wait_exit(Instant::now(), limit).await
    }

    /// Waits for the exit after a SIGTERM sent at `start`.
    async fn wait_exit(mut self, start: Instant, limit: Duration) -> (i32, Duration, String) {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "daemon still running {limit:?} after SIGTERM:\n{}",
                    self.log_text()
                )
            })
            .expect("wait for the daemon");
        let took = start.elapsed();
        // Let the log reader drain.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (status.code().unwrap_or(-1), took, self.log_text())
    }
}

/// (database → snapshot ids) of the manifests in a store rooted at a target's prefix.
async fn manifests(store: &Arc<dyn ObjectStore>, source: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in keys(store).await {
        let parts: Vec<&str> = k.split('/').collect();
        if parts.len() == 3 && parts[0] == source {
            if let Some(id) = parts[2].strip_suffix(".manifest.json") {
                out.entry(parts[1].to_string())
                    .or_default()
                    .push(id.to_string());
            }
        }
    }
    out
}

/// Runs promtool over a metrics exposition; fails with an install hint if it is missing.
fn promtool_check(text: &str) {
    assert!(
        Path::new(PROMTOOL).exists(),
        "{PROMTOOL} is missing: install Debian's `prometheus` package (apt-get install prometheus) to run this test"
    );
    use std::io::Write;
    let mut child = std::process::Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates each of `databases` with a table `t` of `rows` rows.
async fn tables_of_rows(env: &TestEnv, databases: &[&str], rows: u32) {
    for db in databases {
        env.pg.create_database(db).await.unwrap();
        env.pg
            .execute(
                db,
                &format!(
                    "CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, {rows}) g"
                ),
            )
            .await
            .unwrap();
    }
}

fn token_path(env: &TestEnv) -> PathBuf {
    env.dir.path().join("api-token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_daemon_commits_every_database_exports_metrics_and_prunes() {
    let env = TestEnv::start().await;
    tables_of_rows(&env, &["alpha", "beta"], 5000).await;
    let (s3, store) = env.s3_target("s3").await;
    let d = Daemon::start_with(
        &env,
        "",
        "30s",
        "schedule = \"*/3 * * * * *\"\nretention = { keep_last = 2, hourly = 0, daily = 0, weekly = 0, monthly = 0 }\n",
        &s3,
    )
    .await;

    // Every database commits, and keeps committing slot after slot.
    d.wait_until(
        "both databases committed three slots",
        Duration::from_secs(90),
        || async {
            let text = d.get("/metrics").await.1;
            ["alpha", "beta"].iter().all(|db| {
                text.lines().any(|l| {
                    l.starts_with(&format!(
                    "pgferry_backups_total{{database=\"{db}\",result=\"success\",source=\"prod\"}} "
                )) && l
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                        >= 3
                })
            })
        },
    )
    .await;

    let resp = reqwest::get(d.url("/metrics")).await.unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let metrics = resp.text().await.unwrap();
    for db in ["alpha", "beta"] {
        let line = format!(
            "pgferry_backup_last_success_timestamp_seconds{{database=\"{db}\",source=\"prod\"}} "
        );
        let ts: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no last-success line for {db}:\n{metrics}"))
            .parse()
            .unwrap();
        assert!(
            (chrono::Utc::now().timestamp() as f64 - ts).abs() < 120.0,
            "{ts}"
        );
    }
    assert!(
        metrics.contains("pgferry_retention_deleted_total{target=\"s3\"}"),
        "{metrics}"
    );
    promtool_check(&metrics);

    // A real Prometheus scrapes the running daemon and its query API answers for both.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", d.port).parse().unwrap();
    let series = tokio::task::spawn_blocking(move || {
        let prom = crate::support::prometheus::Prometheus::start("pgferry", &[addr]);
        prom.wait_for(
            "count by (database) (pgferry_backup_last_success_timestamp_seconds{source=\"prod\"})",
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    let mut scraped: Vec<String> = series
        .iter()
        .map(|s| s["metric"]["database"].as_str().unwrap_or("").to_string())
        .collect();
    scraped.sort();
    assert_eq!(scraped, ["alpha", "beta"], "{series:?}");

    let status = d.status().await;
    let dbs = status["databases"].as_array().unwrap();
    assert_eq!(dbs.len(), 2, "{status}");
    for s in dbs {
        assert!(s["last_success"].is_string(), "{s}");
        assert!(s["next_run"].is_string(), "{s}");
    }
    let (code, page) = d.get("/").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("alpha") && page.contains("beta") && page.contains("s3"),
        "{page}"
    );
    let (code, _) = d.get("/healthz").await;
    assert_eq!(code, 200);

    let (code, took, log) = d.stop(Duration::from_secs(40)).await;
    assert_eq!(code, 0, "{log}");
    assert!(took < Duration::from_secs(35), "{took:?}");
    assert_no_secret(&log, &env.secrets());
    assert_no_secret(&metrics, &env.secrets());
    assert!(
        log.lines()
            .any(|l| l.contains("\"message\":\"Backup committed.\"")
                && l.contains("\"snapshot_id\":")),
        "JSON log lines carry the backup span:\n{log}"
    );

    // Retention after each commit: keep_last = 2, and no dump without its manifest.
    let found = manifests(&store, "prod").await;
    let all = keys(&store).await;
    for db in ["alpha", "beta"] {
        assert_eq!(found[db].len(), 2, "{all:?}");
        let dumps = all
            .iter()
            .filter(|k| k.starts_with(&format!("prod/{db}/")) && k.ends_with(".dump.zst"))
            .count();
        assert_eq!(dumps, 2, "{all:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_the_work_one_snapshot_per_database_per_slot() {
    let env = TestEnv::start().await;
    tables_of_rows(&env, &["alpha", "beta", "gamma"], 20000).await;
    let (s3, store) = env.s3_target("s3").await;
    let body = |port: u16| {
        format!(
            "{}{}schedule = \"*/2 * * * * *\"\nretention = {{ keep_last = 1000 }}\n{s3}",
            daemon_toml(port, &token_path(&env), "30s"),
            env.source_toml("prod"),
        )
    };
    let (pa, pb) = (free_port(), free_port());
    let a = Daemon::start(&env, &env.write_config(&body(pa)), pa).await;
    let b = Daemon::start(&env, &env.write_config(&body(pb)), pb).await;
    // Until every database has three committed snapshots (slots of 2 s): a poll, not a guess.
    a.wait_until(
        "three snapshots of each database",
        Duration::from_secs(60),
        || async {
            let found = manifests(&store, "prod").await;
            ["alpha", "beta", "gamma"]
                .iter()
                .all(|db| found.get(*db).is_some_and(|ids| ids.len() >= 3))
        },
    )
    .await;
    let (ca, _, log_a) = a.stop(Duration::from_secs(40)).await;
    let (cb, _, log_b) = b.stop(Duration::from_secs(40)).await;
    assert_eq!((ca, cb), (0, 0), "{log_a}\n{log_b}");

    // Every commit either daemon made, per database and snapshot id.
    let mut commits: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in log_a.lines().chain(log_b.lines()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["message"] == "Backup committed." {
            let span = &v["span"];
            let key = (
                span["database"].as_str().unwrap().to_string(),
                span["snapshot_id"].as_str().unwrap().to_string(),
            );
            *commits.entry(key).or_default() += 1;
        }
    }
    let found = manifests(&store, "prod").await;
    for db in ["alpha", "beta", "gamma"] {
        let ids = &found[db];
        assert!(ids.len() >= 3, "{db}: only {ids:?}");
        for id in ids {
            assert_eq!(
                commits.get(&(db.to_string(), id.clone())),
                Some(&1),
                "{db} {id} was dumped {:?} times\n{log_a}\n{log_b}",
                commits.get(&(db.to_string(), id.clone()))
            );
        }
    }
    assert!(
        commits.values().all(|n| *n == 1),
        "a slot was dumped twice: {commits:?}"
    );
    // Both replicas took part.
    assert!(log_a.contains("Backup committed.") && log_b.contains("Backup committed."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_backup_needs_the_bearer_token() {
    let env = TestEnv::start().await;
    env.pg.create_database("alpha").await.unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let token = format!(
        "tok-{}",
        env::S3_PREFIX.len() * 7919 + std::process::id() as usize
    );
    std::fs::write(token_path(&env), format!("{token}\n")).unwrap();
    // A yearly schedule: the daemon catches up the current slot once at start, then idles.
    let d = Daemon::start_with(&env, "", "30s", "schedule = \"0 0 1 1 *\"\n", &s3).await;
    d.wait_until(
        "the start-up catch-up backup finished",
        Duration::from_secs(60),
        || async {
            let s = d.status().await;
            s["databases"][0]["last_success"].is_string() && s["databases"][0]["running"].is_null()
        },
    )
    .await;
    let before = manifests(&store, "prod").await["alpha"].clone();

    let req = r#"{"source":"prod","database":"alpha"}"#;
    assert_eq!(d.post_backup(None, req).await.0, 401);
    assert_eq!(d.post_backup(Some("wrong"), req).await.0, 401);
    let (code, body) = d
        .post_backup(Some(&token), r#"{"source":"prod","database":"nope"}"#)
        .await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        d.post_backup(Some(&token), r#"{"source":"nope","database":"alpha"}"#)
            .await
            .0,
        404
    );
    let (code, body) = d.post_backup(Some(&token), req).await;
    assert_eq!(code, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!before.contains(&id));
    d.wait_until(
        "the manual snapshot is committed",
        Duration::from_secs(60),
        || async { manifests(&store, "prod").await["alpha"].contains(&id) },
    )
    .await;
    let (code, snaps) = d.get("/api/v1/snapshots?source=prod&database=alpha").await;
    assert_eq!(code, 200);
    assert!(snaps.contains(&id), "{snaps}");

    // No token file: mutating endpoints are disabled.
    std::fs::remove_file(token_path(&env)).unwrap();
    let (code, body) = d.post_backup(Some(&token), req).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("disabled: no token configured"), "{body}");

    let mut secrets = env.secrets();
    secrets.push(token.clone());
    for path in [
        "/api/v1/status",
        "/api/v1/snapshots",
        "/",
        "/readyz",
        "/metrics",
    ] {
        assert_no_secret(&d.get(path).await.1, &secrets);
    }
    let (code, _, log) = d.stop(Duration::from_secs(40)).await;
    assert_eq!(code, 0);
    assert_no_secret(&log, &secrets);
}

/// `/readyz` says whether this process works, not whether every dependency answers: a
/// provider's blip must not make every replica unready. `pgferry_target_up` tells instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_stays_200_while_the_s3_server_is_down_and_target_up_goes_0() {
    let mut env = TestEnv::start().await;
    env.pg.create_database("alpha").await.unwrap();
    let (s3, _store) = env.s3_target("s3").await;
    let d = Daemon::start_with(&env, "", "30s", "schedule = \"0 0 1 1 *\"\n", &s3).await;
    let up = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        let d = &d;
        async move { sample(&d.get("/metrics").await.1, name, labels) }
    };
    d.wait_until("target and source up", Duration::from_secs(30), || async {
        up("pgferry_target_up", &[("target", "s3")]).await == Some(1.0)
            && up("pgferry_source_up", &[("source", "prod")]).await == Some(1.0)
    })
    .await;
    assert_eq!(d.get("/readyz").await.0, 200);
    let metrics = d.get("/metrics").await.1;
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "{metrics}"
    );
    assert!(metrics.contains("pgferry_backup_running{"), "{metrics}");

    env.s3.stop().await.unwrap();
    d.wait_until(
        "target_up 0 while S3 is down",
        Duration::from_secs(30),
        || async { up("pgferry_target_up", &[("target", "s3")]).await == Some(0.0) },
    )
    .await;
    let (code, body) = d.get("/readyz").await;
    assert_eq!(code, 200, "still ready: the process works: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true, "{body}");
    // The dependency state is there for people, not for the probe.
    let why = v["dependencies"]["reasons"].as_array().unwrap();
    assert!(
        why.iter()
            .any(|r| r.as_str().unwrap().contains("target s3")),
        "{body}"
    );
    assert_eq!(
        up("pgferry_source_up", &[("source", "prod")]).await,
        Some(1.0)
    );
    assert_no_secret(&body, &env.secrets());

    env.s3.start_again().await.unwrap();
    d.wait_until(
        "target_up 1 once S3 is back",
        Duration::from_secs(60),
        || async { up("pgferry_target_up", &[("target", "s3")]).await == Some(1.0) },
    )
    .await;
    let (code, _, _) = d.stop(Duration::from_secs(40)).await;
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_dump_exits_within_grace_and_commits_nothing() {
    let env = TestEnv::start().await;
    env.pg.create_database("big").await.unwrap();
    // ~200 MB of poorly compressible text; zstd level 19 on one worker makes the dump take far
    // longer than the grace period (one worker: a multi-threaded zstd context finishes its
    // in-flight jobs, tens of MB at level 19, before it can be dropped).
    env.pg
        .execute(
            "big",
            "CREATE TABLE w AS SELECT g, md5(g::text) || md5((g * 3)::text) || md5((g * 7)::text) AS v \
             FROM generate_series(1, 2000000) g",
        )
        .await
        .unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let grace = Duration::from_secs(3);
    let d = Daemon::start_with(
        &env,
        "[pipeline]\nzstd_level = 19\nzstd_workers = 1\n",
        "3s",
        "schedule = \"0 0 1 1 *\"\n",
        &s3,
    )
    .await;
    d.wait_until("the dump is running", Duration::from_secs(30), || async {
        d.status().await["databases"][0]["running"].is_object()
    })
    .await;
    // Not a wait for a condition: let zstd fill its in-flight jobs, the worst case for a stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.sigterm();
    let start = Instant::now();
    // While the dump drains, the daemon still serves: not ready, but metrics and status answer.
    let (code, body) = d.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    let (code, body) = d.get("/metrics").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("pgferry_"), "{body}");
    assert_eq!(d.status().await["shutting_down"], true);
    assert!(
        start.elapsed() < grace,
        "the checks took longer than the grace"
    );
    let (code, took, log) = d.wait_exit(start, grace + Duration::from_secs(30)).await;
    eprintln!("the daemon exited {took:?} after SIGTERM (grace {grace:?})");
    assert_eq!(code, 0, "{log}");
    assert!(
        took < grace + Duration::from_secs(8),
        "took {took:?} to exit, grace {grace:?}\n{log}"
    );
    assert!(
        log.contains("Backup cancelled; nothing committed."),
        "{log}"
    );
    let left = keys(&store).await;
    assert!(
        left.iter().all(|k| !k.starts_with("prod/big/")),
        "objects left behind: {left:?}"
    );
}

/// The value of the sample `name{labels…}` in a metrics exposition, if it is there.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        let labelled = rest.is_empty() || rest.starts_with('{');
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        (labelled && all).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_server_killed_and_back_shows_in_the_metrics() {
    let mut env = TestEnv::start().await;
    env.pg.create_database("alpha").await.unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let d = Daemon::start_with(
        &env,
        "",
        "30s",
        "databases = [\"alpha\"]\nschedule = \"*/2 * * * * *\"\n",
        &s3,
    )
    .await;
    const DB: &[(&str, &str)] = &[("source", "prod"), ("database", "alpha")];
    const SUCCESS: &[(&str, &str)] = &[
        ("source", "prod"),
        ("database", "alpha"),
        ("result", "success"),
    ];
    const FAILURE: &[(&str, &str)] = &[
        ("source", "prod"),
        ("database", "alpha"),
        ("result", "failure"),
    ];
    const TARGET: &[(&str, &str)] = &[("target", "s3")];
    const TARGET_FAILURE: &[(&str, &str)] = &[("target", "s3"), ("result", "failure")];
    let metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        let d = &d;
        async move { sample(&d.get("/metrics").await.1, name, labels) }
    };
    d.wait_until("a slot committed", Duration::from_secs(30), || async {
        metric("pgferry_backups_total", SUCCESS).await >= Some(1.0)
    })
    .await;

    let before = manifests(&store, "prod").await;
    env.s3.stop().await.unwrap();
    d.wait_until(
        "a slot failed on the killed server",
        Duration::from_secs(60),
        || async {
            metric("pgferry_backups_total", FAILURE).await >= Some(1.0)
                && metric("pgferry_target_uploads_total", TARGET_FAILURE).await >= Some(1.0)
        },
    )
    .await;
    let last_backup = metric("pgferry_backup_last_success_timestamp_seconds", DB)
        .await
        .expect("last backup success");
    let last_target = metric("pgferry_target_last_success_timestamp_seconds", TARGET)
        .await
        .expect("last target success");
    let successes = metric("pgferry_backups_total", SUCCESS).await.unwrap();

    env.s3.start_again().await.unwrap();
    d.wait_until(
        "the next slot commits and the metrics show it",
        Duration::from_secs(60),
        || async {
            metric("pgferry_backups_total", SUCCESS).await > Some(successes)
                && metric("pgferry_backup_last_success_timestamp_seconds", DB).await
                    > Some(last_backup)
                && metric("pgferry_target_last_success_timestamp_seconds", TARGET).await
                    > Some(last_target)
        },
    )
    .await;
    let after = manifests(&store, "prod").await;
    assert!(
        after["alpha"].len() > before.get("alpha").map_or(0, Vec::len),
        "no new snapshot after the server came back: {before:?} → {after:?}"
    );
    let (code, _, log) = d.stop(Duration::from_secs(40)).await;
    assert_eq!(code, 0);
    assert_no_secret(&log, &env.secrets());
}

/// A config for the restart tests: a yearly slot (the same one for the whole test), acme only.
fn yearly(env: &TestEnv, port: u16, extra: &str, targets: &str) -> PathBuf {
    env.write_config(&format!(
        "{extra}{}{}schedule = \"0 0 1 1 *\"\ndatabases = [\"acme\"]\n{targets}",
        daemon_toml(port, &token_path(env), "30s"),
        env.source_toml("prod"),
    ))
}

/// The value of a gauge line `name{database="acme",source="prod"} V` in a scrape.
fn acme_gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{database=\"acme\",source=\"prod\"}}")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_target_down_never_rewrites_a_committed_slot() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (a, a_store) = env.s3_target("a").await;
    let mut other = crate::support::garage::Garage::start()
        .await
        .expect("second Garage");
    let (b, _) = env.s3_target_on(&other, "b").await;
    let port = free_port();
    let config = yearly(
        &env,
        port,
        "[pipeline]\nmin_targets = 2\n",
        &format!("{a}{b}"),
    );
    // The slot commits on both targets.
    let id = env.pgferry(&config, &["backup"]).await.snapshot_id();
    let manifest_key = format!("prod/acme/{id}.manifest.json");
    let before = env::get(&a_store, &manifest_key).await;

    // A rollout while b is down: the new daemon catches up the slot, and must leave it be.
    other.stop().await.unwrap();
    let d = Daemon::start(&env, &config, port).await;
    d.wait_until(
        "the daemon looked at the slot",
        Duration::from_secs(60),
        || async {
            let log = d.log_text();
            log.contains("Slot already committed") || log.contains("Backup started.")
        },
    )
    .await;
    // This process committed nothing, yet it exports acme's last success from the bucket
    // (read by a background task at start: poll for it).
    d.wait_until(
        "the last success is exported from the bucket",
        Duration::from_secs(60),
        || async {
            let (_, m) = d.get("/metrics").await;
            acme_gauge(&m, "pgferry_backup_last_success_timestamp_seconds").is_some()
        },
    )
    .await;
    let (_, metrics) = d.get("/metrics").await;
    let last = acme_gauge(&metrics, "pgferry_backup_last_success_timestamp_seconds");
    let (code, _, log) = d.stop(Duration::from_secs(40)).await;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("Slot already committed"), "{log}");
    assert!(!log.contains("Backup started."), "{log}");
    assert_eq!(env::get(&a_store, &manifest_key).await, before);
    env::assert_every_manifest_names_an_intact_object(&a_store).await;
    let finished = env::manifest_of(&before)["finished_at"]
        .as_str()
        .unwrap()
        .to_string();
    let finished = chrono::DateTime::parse_from_rfc3339(&finished).unwrap();
    assert_eq!(
        last,
        Some(finished.timestamp_millis() as f64 / 1000.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_failing_database_keeps_its_last_success_in_the_metrics() {
    let mut env = TestEnv::start().await;
    env.small_database("acme").await;
    let (s3, _) = env.s3_target("s3").await;
    let port = free_port();
    let config = yearly(&env, port, "", &s3);
    env.pgferry(&config, &["backup"]).await.snapshot_id();
    // The source is down from now on: every run of the new process fails.
    env.pg.stop().await.unwrap();
    let d = Daemon::start(&env, &config, port).await;
    d.wait_until(
        "the last success is exported from the bucket",
        Duration::from_secs(60),
        || async {
            let (_, m) = d.get("/metrics").await;
            acme_gauge(&m, "pgferry_backup_last_success_timestamp_seconds").is_some()
        },
    )
    .await;
    let (_, metrics) = d.get("/metrics").await;
    promtool_check(&metrics);
    assert_eq!(
        acme_gauge(&metrics, "pgferry_backup_degraded"),
        Some(0.0),
        "{metrics}"
    );
    let (code, _, log) = d.stop(Duration::from_secs(40)).await;
    assert_eq!(code, 0, "{log}");
}
