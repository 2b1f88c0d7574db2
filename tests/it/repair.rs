//! `pgferry check` and `pgferry repair` (issue 16), with the real binary against real
//! PostgreSQL and Garage servers: a target down for three slots is healed byte for byte and
//! restores alone; a flipped byte is found by `check --read-data` and healed; good copies are
//! never rewritten; `--dry-run` changes nothing; a repair killed mid-copy leaves no manifest
//! and the next one finishes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::env::{
    assert_every_manifest_names_an_intact_object, corrupt_dump, get, keys, manifest_of, TestEnv,
};
use crate::support::garage::Garage;
use crate::support::postgres::PgCluster;
use crate::support::proxy::Proxy;
use crate::support::restore_argv;

/// Keeps every snapshot the tests take: retention is not under test here.
const KEEP_ALL: &str = "retention = { keep_last = 100 }\n";

/// Every object of a store with its sha256 and e_tag (an overwrite changes the e_tag).
async fn contents(store: &Arc<dyn ObjectStore>) -> BTreeMap<String, (String, Option<String>)> {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    for k in keys(store).await {
        let path = object_store::path::Path::from(k.as_str());
        let head = store.head(&path).await.unwrap();
        let bytes = get(store, &k).await;
        out.insert(k, (hex::encode(sha2::Sha256::digest(&bytes)), head.e_tag));
    }
    out
}

fn manifests_and_dumps(c: &BTreeMap<String, (String, Option<String>)>) -> BTreeMap<String, String> {
    c.iter()
        .filter(|(k, _)| k.ends_with(".manifest.json") || k.ends_with(".dump.zst"))
        .map(|(k, (sha, _))| (k.clone(), sha.clone()))
        .collect()
}

/// Database `acme` backed up to target a (the environment's Garage) and b (a Garage of its
/// own): once while both are up, then `missed` times while b's server is down.
pub(crate) struct BMissed {
    /// The config of both targets: `source`, a, b, then the caller's `more`.
    pub(crate) config: PathBuf,
    /// The `[[source]]` with its databases and retention.
    pub(crate) source: String,
    /// b's `[[target]]`.
    pub(crate) b: String,
    pub(crate) a_store: Arc<dyn ObjectStore>,
    pub(crate) b_store: Arc<dyn ObjectStore>,
    /// b's server, up again (it stops when dropped).
    pub(crate) b_server: Garage,
    /// The snapshot both targets took.
    pub(crate) first: String,
    /// The snapshots b missed, oldest first.
    pub(crate) missed: Vec<String>,
}

pub(crate) async fn b_down_for(
    env: &TestEnv,
    retention: &str,
    more: &str,
    missed: usize,
) -> BMissed {
    env.small_database("acme").await;
    let (a, a_store) = env.s3_target("a").await;
    let mut b_server = Garage::start().await.expect("second Garage");
    let (b, b_store) = env.s3_target_on(&b_server, "b").await;
    let source = format!(
        "{}databases = [\"acme\"]\n{retention}",
        env.source_toml("prod")
    );
    let config = env.write_config(&format!("{source}{a}{b}{more}"));
    let first = env
        .pgferry(&config, &["backup", "--force"])
        .await
        .snapshot_id();
    b_server.stop().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..missed {
        // `--force` names a snapshot by the current second: one per second at most.
        crate::support::next_second().await;
        ids.push(
            env.pgferry(&config, &["backup", "--force"])
                .await
                .snapshot_id(),
        );
    }
    b_server.start_again().await.unwrap();
    BMissed {
        config,
        source,
        b,
        a_store,
        b_store,
        b_server,
        first,
        missed: ids,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_for_three_slots_is_repaired_byte_identical_and_restores_alone() {
    let env = TestEnv::start().await;
    let staging = PgCluster::start().await.expect("staging PostgreSQL");
    staging.create_role("odoo", "odoo-pw", "").await.unwrap();
    env.add_secret_var("PGFERRY_TEST_STAGING_PW", staging.superuser_password());
    let restore_target = format!(
        "[[restore_target]]\nnamespace = \"staging-*\"\nurl = \"postgres://postgres:${{PGFERRY_TEST_STAGING_PW}}@127.0.0.1:{}/postgres\"\nowner = \"odoo\"\n[restore]\nspool_dir = {:?}\n",
        staging.port(),
        env.dir.path().join("spool").display().to_string()
    );
    let BMissed {
        config,
        source,
        b,
        a_store,
        b_store,
        b_server: _b_server,
        missed,
        ..
    } = b_down_for(&env, KEEP_ALL, &restore_target, 3).await;

    let check = env.pgferry(&config, &["check"]).await;
    check.assert_code(1);
    for id in &missed {
        assert!(check.stdout.contains(id.as_str()), "{}", check.stdout);
    }
    assert!(
        check.stdout.contains("run `pgferry repair --to b`"),
        "{}",
        check.stdout
    );

    // --dry-run plans the three copies and writes nothing.
    let before = (contents(&a_store).await, contents(&b_store).await);
    let dry = env.pgferry(&config, &["repair", "--dry-run"]).await;
    dry.assert_code(0);
    assert_eq!(
        dry.stdout.matches("would copy").count(),
        3,
        "{}",
        dry.stdout
    );
    assert_eq!(before, (contents(&a_store).await, contents(&b_store).await));

    let run = env.pgferry(&config, &["repair"]).await;
    run.assert_code(0);
    assert_eq!(run.stdout.matches("copied ").count(), 3, "{}", run.stdout);
    env.pgferry(&config, &["check", "--read-data"])
        .await
        .assert_code(0);

    // b holds every snapshot a holds, byte for byte (manifests too: same keys, same targets);
    // a's copies were not rewritten.
    let (after_a, after_b) = (contents(&a_store).await, contents(&b_store).await);
    assert_eq!(manifests_and_dumps(&after_a), manifests_and_dumps(&after_b));
    for (k, (sha, etag)) in &before.0 {
        if k.ends_with(".dump.zst") {
            assert_eq!(
                after_a.get(k),
                Some(&(sha.clone(), etag.clone())),
                "{k} rewritten"
            );
        }
    }
    for m in assert_every_manifest_names_an_intact_object(&b_store).await {
        let m = manifest_of(&get(&b_store, &m).await);
        assert_eq!(m["targets"], serde_json::json!(["a", "b"]), "{m}");
    }
    // A second repair has nothing to do and writes nothing.
    let again = env.pgferry(&config, &["repair"]).await;
    again.assert_code(0);
    assert_eq!(contents(&b_store).await, after_b);

    // Restorable from b alone.
    let only_b = env.write_config(&format!("{source}{b}{restore_target}"));
    let newest = missed.last().unwrap();
    let restore = env
        .pgferry(
            &only_b,
            &restore_argv("acme", "staging-acme", &["--snapshot", newest]),
        )
        .await;
    restore.assert_code(0);
    staging.assert_same_tables("acme", &env.pg, "acme").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_found_by_read_data_and_healed_without_touching_the_good_copy() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (a, a_store) = env.s3_target("a").await;
    let (b, b_store) = env.s3_target("b").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{KEEP_ALL}{a}{b}",
        env.source_toml("prod")
    ));
    let id = env
        .pgferry(&config, &["backup", "--force"])
        .await
        .snapshot_id();
    corrupt_dump(&b_store, &id).await;
    let good = contents(&a_store).await;

    // Listings cannot see a same-size flip; reading can.
    env.pgferry(&config, &["check"]).await.assert_code(0);
    let check = env
        .pgferry(&config, &["check", "--read-data", "--json"])
        .await;
    check.assert_code(1);
    let report: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert_eq!(problems[0]["target"], "b");
    assert_eq!(problems[0]["kind"], "wrong_hash");
    assert_eq!(problems[0]["snapshot_id"], id.as_str());

    // --json: one compact object on the last line, the plan per copy.
    let plan = env
        .pgferry(&config, &["repair", "--dry-run", "--json"])
        .await;
    plan.assert_code(0);
    assert_eq!(plan.stdout.lines().count(), 1, "{}", plan.stdout);
    let plan: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    assert_eq!(plan["result"], "success", "{plan}");
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(plan["failed"], 0, "{plan}");
    let copies = plan["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 1, "{plan}");
    assert_eq!(copies[0]["result"], "planned", "{plan}");
    assert_eq!(copies[0]["target"], "b", "{plan}");
    assert_eq!(copies[0]["from"], "a", "{plan}");
    assert!(
        copies[0]["snapshot"]
            .as_str()
            .unwrap()
            .contains(id.as_str()),
        "{plan}"
    );

    let run = env.pgferry(&config, &["repair"]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains("copied ") && run.stdout.contains(" to b from a"),
        "{}",
        run.stdout
    );
    env.pgferry(&config, &["check", "--read-data"])
        .await
        .assert_code(0);
    assert_every_manifest_names_an_intact_object(&b_store).await;
    // The good copy was never rewritten.
    assert_eq!(contents(&a_store).await, good);
}

/// Database `big` (200 000 random rows) backed up to target a alone; b is reached directly
/// or through a proxy throttled to `rate` bytes/s up.
pub(crate) struct SlowB {
    pub(crate) a_store: Arc<dyn ObjectStore>,
    pub(crate) b_store: Arc<dyn ObjectStore>,
    pub(crate) proxy: Proxy,
    /// The config of a and b through the proxy.
    pub(crate) slow_b: PathBuf,
    /// The config of a and b.
    pub(crate) fast_b: PathBuf,
    /// The snapshot on a.
    pub(crate) id: String,
}

pub(crate) async fn slow_b(env: &TestEnv, rate: u64) -> SlowB {
    env.random_rows_database("big", 200_000).await;
    let (a, a_store) = env.s3_target("a").await;
    let (b, b_store) = env.s3_target("b").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    proxy.throttle_up(rate);
    let source = format!(
        "{}databases = [\"big\"]\n{KEEP_ALL}",
        env.source_toml("prod")
    );
    let only_a = env.write_config(&format!("{source}{a}"));
    let id = env
        .pgferry(&only_a, &["backup", "--force"])
        .await
        .snapshot_id();
    SlowB {
        slow_b: env.write_config(&format!("{source}{a}{}", proxy.reroute(&b))),
        fast_b: env.write_config(&format!("{source}{a}{b}")),
        a_store,
        b_store,
        proxy,
        id,
    }
}

/// Kills `repair` once a good part of its copy went up through `proxy` (1 MiB, within 120
/// s), well before the end.
pub(crate) async fn kill_once_a_mib_went_up(proxy: &Proxy, repair: &mut tokio::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while proxy.bytes_up() < 1024 * 1024 {
        assert!(Instant::now() < deadline, "the copy never started");
        assert!(
            repair.try_wait().unwrap().is_none(),
            "repair ended before the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    repair.start_kill().unwrap();
    repair.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_killed_mid_copy_leaves_no_manifest_and_the_next_one_finishes() {
    let env = TestEnv::start().await;
    let SlowB {
        b_store,
        proxy,
        slow_b,
        id,
        ..
    } = slow_b(&env, 256 * 1024).await;

    let mut child = env.command(&slow_b, &["repair"]).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    kill_once_a_mib_went_up(&proxy, &mut child).await;
    let log = log.await.unwrap();
    assert!(log.contains("Repair copying a snapshot."), "{log}");
    let left = keys(&b_store).await;
    assert!(
        left.iter()
            .all(|k| !k.ends_with(".manifest.json") && !k.ends_with(".dump.zst")),
        "a killed repair left a manifest or an object: {left:?}"
    );
    let marker = left
        .iter()
        .find(|k| k.ends_with(".upload.json"))
        .unwrap_or_else(|| panic!("no upload marker: {left:?}"));
    assert!(manifest_of(&get(&b_store, marker).await)["upload_id"].is_string());

    proxy.throttle_up(0);
    // Its marker is fresh, but its process is gone (same host): cleaned at once.
    let run = env.pgferry(&slow_b, &["repair"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains(&id), "{}", run.stdout);
    env.pgferry(&slow_b, &["check", "--read-data"])
        .await
        .assert_code(0);
    let after = keys(&b_store).await;
    assert!(
        after.iter().all(|k| !k.ends_with(".upload.json")),
        "{after:?}"
    );
    assert_eq!(
        assert_every_manifest_names_an_intact_object(&b_store)
            .await
            .len(),
        1
    );
}

/// A second repair (another replica's loop) that finds a live repair's upload open on the key
/// it is about to write leaves it alone: it used to abort it (and delete the key), failing the
/// first repair mid-copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_repair_leaves_a_live_repairs_upload_alone() {
    let env = TestEnv::start().await;
    let SlowB {
        b_store,
        proxy,
        slow_b,
        fast_b,
        ..
    } = slow_b(&env, 512 * 1024).await;

    let first = env.command(&slow_b, &["repair"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while proxy.bytes_up() < 1024 * 1024 {
        assert!(Instant::now() < deadline, "the first copy never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = env.pgferry(&fast_b, &["repair"]).await;
    assert_ne!(second.code, 0, "{}", second.output());
    assert!(
        second.output().contains("is open, its marker rewritten"),
        "{}",
        second.output()
    );
    proxy.throttle_up(0);
    let first = tokio::time::timeout(Duration::from_secs(180), first.wait_with_output())
        .await
        .expect("the first repair hung")
        .unwrap();
    assert!(
        first.status.success(),
        "the live repair failed:\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    env.pgferry(&fast_b, &["check", "--read-data"])
        .await
        .assert_code(0);
    assert_eq!(
        assert_every_manifest_names_an_intact_object(&b_store)
            .await
            .len(),
        1
    );
    assert!(keys(&b_store)
        .await
        .iter()
        .all(|k| !k.ends_with(".upload.json")));
}
