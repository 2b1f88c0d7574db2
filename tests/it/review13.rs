//! Review 13: a hostile operator against the write-once contract, with the real binary, real
//! PostgreSQL and real Garage servers. Each test is one scenario; the invariants checked at the
//! end: every manifest names an intact object, nothing committed was deleted or overwritten,
//! exit codes tell the truth.
//!
//! Written by a reviewer who had not seen the code's reasoning, against main 682b2a0, where
//! the first four failed: prune deleted a committed dump whose upload marker was left behind,
//! and files that are not pgferry's; a manifest naming a missing object counted as the newest
//! snapshot (retention then deleted the real one); a slot committed below `min_targets` was
//! reported as done. The others (a target down across runs, SIGKILLs, concurrent manual runs,
//! odd names) held then and must keep holding.

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as OPath;
use object_store::{ObjectStore, PutPayload};

use crate::support::env::{
    assert_every_manifest_names_an_intact_object, get, keys, manifest_of, TestEnv,
};
use crate::support::garage::Garage;
use crate::support::proxy::{Proxy, RequestClass};

/// One object's bytes, by its key as listed (percent-encoded segments kept as they are).
async fn put_raw(store: &Arc<dyn ObjectStore>, key: &str, body: Vec<u8>) {
    let path = OPath::parse(key).unwrap_or_else(|e| panic!("parse {key}: {e}"));
    store
        .put(&path, PutPayload::from(body))
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

/// (manifest key, manifest bytes, object key, object bytes) of every manifest in `store` that
/// parses and names an object that exists (crafted garbage is left out).
async fn snapshot_state(store: &Arc<dyn ObjectStore>) -> Vec<(String, Vec<u8>, String, Vec<u8>)> {
    let mut out = Vec::new();
    let all = keys(store).await;
    for key in &all {
        if !key.ends_with(".manifest.json") {
            continue;
        }
        let key = key.clone();
        let body = get(store, &key).await.to_vec();
        let Ok(m) = serde_json::from_slice::<serde_json::Value>(&body) else {
            continue;
        };
        let Some(object) = m["object_key"].as_str().map(str::to_string) else {
            continue;
        };
        if !all.contains(&object) {
            continue;
        }
        let bytes = get(store, &object).await.to_vec();
        out.push((key, body, object, bytes));
    }
    out
}

/// The `[pipeline]` section (the orphan grace cannot be configured below an hour: the tests
/// that need it passed run prune a day later, in-process, see [`prune_a_day_later`]).
fn pipeline(extra: &str) -> String {
    format!("[pipeline]\n{extra}")
}

fn retention_keep_one() -> &'static str {
    crate::support::env::KEEP_NEWEST_ONLY
}

async fn big_database(env: &TestEnv, name: &str, rows: u32) {
    env.pg.create_database(name).await.unwrap();
    env.pg
        .execute(
            name,
            &format!("CREATE TABLE t AS SELECT g AS id, md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, {rows}) g;"),
        )
        .await
        .unwrap();
}

fn prune(run: &Pruned) -> String {
    run.output()
}

/// What a prune run a day from now printed (every orphan and marker is then past the grace).
struct Pruned(String);

impl Pruned {
    fn output(&self) -> String {
        self.0.clone()
    }
}

async fn prune_a_day_later(env: &TestEnv, config: &std::path::Path) -> Pruned {
    Pruned(
        crate::retention::prune_later(
            config,
            &env.env_vars(),
            &pgferry::retention::prune::Selection::default(),
            Duration::from_secs(25 * 3600),
        )
        .await,
    )
}

// ---------------------------------------------------------------------------------------------
// 1. A completed upload whose marker could not be deleted (a transient DELETE failure: "prune
//    will"), then prune: the committed dump must survive.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_a_committed_dump_whose_upload_marker_was_left_behind() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (target, store) = env.s3_target("s3").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    let config = env.write_config(&format!(
        "{}{}databases = [\"acme\"]\n{}",
        pipeline(""),
        env.source_toml("prod"),
        proxy.reroute(&target)
    ));
    // Every DELETE of an upload marker fails during this run (the S3 endpoint flaps).
    proxy.fail_requests(503, RequestClass::MarkerDelete, None);
    let run = env.pgferry(&config, &["backup"]).await;
    proxy.stop_failing();
    run.assert_code(0);
    assert!(proxy.served(503) > 0, "the fault never triggered");
    let before = snapshot_state(&store).await;
    assert_eq!(before.len(), 1);
    let all = keys(&store).await;
    assert!(
        all.iter().any(|k| k.ends_with(".upload.json")),
        "the marker should have stayed: {all:?}"
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = prune_a_day_later(&env, &config).await;
    let after_keys = keys(&store).await;
    // The committed snapshot is intact: its manifest names an existing object.
    assert_every_manifest_names_an_intact_object(&store).await;
    assert_eq!(
        snapshot_state(&store).await,
        before,
        "prune changed a committed snapshot\n{}\n{after_keys:?}",
        prune(&p)
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Files that are not pgferry's (not of its exact key shapes) in and under the folders it
//    lists: prune must not touch them ("prune and repair touch nothing else").

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_never_deletes_files_that_are_not_pgferrys() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (target, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}{}databases = [\"acme\"]\n{target}",
        pipeline(""),
        env.source_toml("prod"),
    ));
    env.pgferry(&config, &["backup"]).await.snapshot_id();
    let foreign = [
        // An operator's export next to the snapshots.
        "prod/acme/before-migration.dump.zst",
        // Not a run id: not a key pgferry writes.
        "prod/acme/20250101T000000Z-NOT-A-RUN-ID.dump.zst",
        // A sub-folder of a database folder: never listed by pgferry per the contract.
        "prod/acme/archive/20250101T000000Z.dump.zst",
        // Another tool's files beside the source folders, under the same prefix.
        "othertool/acme.dump.zst",
        "prod/README.dump.zst",
    ];
    for k in foreign {
        put_raw(&store, k, b"not pgferry's".to_vec()).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = prune_a_day_later(&env, &config).await;
    let after = keys(&store).await;
    let gone: Vec<&str> = foreign
        .iter()
        .copied()
        .filter(|k| !after.iter().any(|a| a == k))
        .collect();
    assert_every_manifest_names_an_intact_object(&store).await;
    assert!(
        gone.is_empty(),
        "prune deleted files that are not pgferry's: {gone:?}\n{}",
        prune(&p)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Crafted manifests and garbage beside real snapshots: list, prune and restore-by-catalog
//    must never follow them, and the real snapshots stay intact.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_manifests_are_never_followed() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    env.small_database("beta").await;
    let (target, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}{}databases = [\"acme\", \"beta\"]\n{}{target}",
        pipeline(""),
        env.source_toml("prod"),
        retention_keep_one(),
    ));
    let b = env.pgferry(&config, &["backup"]).await;
    b.assert_code(0);
    let real = snapshot_state(&store).await;
    assert_eq!(real.len(), 2, "{:?}", keys(&store).await);
    let (acme_key, acme_body, acme_obj, _) = real
        .iter()
        .find(|(k, ..)| k.contains("/acme/"))
        .unwrap()
        .clone();
    let (_, _, beta_obj, _) = real
        .iter()
        .find(|(k, ..)| k.contains("/beta/"))
        .unwrap()
        .clone();
    let m = manifest_of(&acme_body);
    let id = m["snapshot_id"].as_str().unwrap().to_string();
    // Newer ids, so that retention (keep_last = 1) would prefer them (a day far ahead: never
    // the real snapshot's own id, whatever the hour the test runs).
    let later = |h: &str| format!("20991231T{h}0000Z");
    let mut crafted = Vec::new();
    let craft = |id2: String, object: String| {
        let mut m2 = m.clone();
        m2["snapshot_id"] = serde_json::json!(id2);
        m2["object_key"] = serde_json::json!(object);
        let key = format!("prod/acme/{id2}.manifest.json");
        (key, serde_json::to_vec(&m2).unwrap())
    };
    // (a) names beta's object
    crafted.push(craft(later("20"), beta_obj.clone()));
    // (b) a `..` path to acme's own object
    crafted.push(craft(
        later("21"),
        format!("prod/beta/../acme/{}", acme_obj.rsplit('/').next().unwrap()),
    ));
    // (c) a dump key of its own id that does not exist
    crafted.push(craft(
        later("22"),
        format!("prod/acme/{}-0123456789ab.dump.zst", later("22")),
    ));
    for (k, body) in &crafted {
        put_raw(&store, k, body.clone()).await;
    }
    // (d) the real manifest copied under another id (its object_key still names the real one)
    let copied = format!("prod/acme/{}.manifest.json", later("23"));
    put_raw(&store, &copied, acme_body.clone()).await;
    // (e) garbage
    put_raw(
        &store,
        &format!("prod/acme/{}.manifest.json", later("19")),
        b"{garbage".to_vec(),
    )
    .await;

    let list = env.pgferry(&config, &["list", "--json"]).await;
    eprintln!("list: {}", list.output());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = prune_a_day_later(&env, &config).await;
    eprintln!("prune: {}", p.output());
    // Whatever prune did with the crafted ones, the real snapshots are untouched.
    let after = keys(&store).await;
    assert!(
        after.contains(&acme_key),
        "prune deleted the real acme snapshot: {after:?}\n{}",
        p.output()
    );
    assert!(
        after.contains(&acme_obj),
        "prune deleted acme's object: {after:?}"
    );
    assert!(
        after.contains(&beta_obj),
        "prune deleted beta's object: {after:?}"
    );
    let now = snapshot_state(&store).await;
    for r in &real {
        assert!(now.contains(r), "{} changed", r.0);
    }
    // A crafted manifest naming a missing object of its own id counts as the newest snapshot?
    let list = env.pgferry(&config, &["list", "--json"]).await;
    let j: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let listed: Vec<String> = j["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["manifest"]["database"].as_str().unwrap(),
                s["manifest"]["snapshot_id"].as_str().unwrap()
            )
        })
        .collect();
    eprintln!("listed after prune: {listed:?}");
    assert!(
        listed.contains(&format!("acme/{id}")),
        "the real acme snapshot is no longer listed: {listed:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A degraded slot (min_targets = 2, b down), then the same slot again while b is still down:
//    the second run must not report the slot as fine.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_slot_is_not_reported_as_done_while_the_target_is_still_down() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (a, a_store) = env.s3_target("a").await;
    let mut other = Garage::start().await.expect("second Garage");
    let (b, b_store) = env.s3_target_on(&other, "b").await;
    let config = env.write_config(&format!(
        "{}{}databases = [\"acme\"]\n{a}{b}",
        pipeline("min_targets = 2\n"),
        env.source_toml("prod"),
    ));
    other.stop().await.unwrap();
    let first = env.pgferry(&config, &["backup"]).await;
    first.assert_code(1);
    let state = snapshot_state(&a_store).await;
    assert_eq!(state.len(), 1);
    let second = env.pgferry(&config, &["backup"]).await;
    eprintln!("second run:\n{}", second.output());
    assert_eq!(
        snapshot_state(&a_store).await,
        state,
        "a committed copy changed"
    );
    // The slot is still on 1 of min_targets = 2 targets: a run that leaves it so is a failure.
    assert_eq!(
        second.code,
        1,
        "the second run, with b still down, reported success for a slot below min_targets:\n{}",
        second.output()
    );
    other.start_again().await.unwrap();
    let third = env.pgferry(&config, &["backup"]).await;
    third.assert_code(0);
    assert_every_manifest_names_an_intact_object(&a_store).await;
    assert_eq!(
        assert_every_manifest_names_an_intact_object(&b_store)
            .await
            .len(),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Three targets, min_targets 2: one down across several runs, then back; prune; restore.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_targets_one_down_across_runs_then_back_then_prune() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (a, a_store) = env.s3_target("a").await;
    let (b, b_store) = env.s3_target("b").await;
    let mut other = Garage::start().await.expect("third Garage");
    let (c, c_store) = env.s3_target_on(&other, "c").await;
    let config = env.write_config(&format!(
        "{}{}databases = [\"acme\"]\n{}{a}{b}{c}",
        pipeline("min_targets = 2\n"),
        env.source_toml("prod"),
        retention_keep_one(),
    ));
    let first = env.pgferry(&config, &["backup"]).await;
    first.assert_code(0);
    other.stop().await.unwrap();
    // c down: forced snapshots still commit on a and b (2 = min_targets): success.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = env.pgferry(&config, &["backup", "--force"]).await;
        r.assert_code(0);
        assert!(r.stdout.contains("not on: c"), "{}", r.stdout);
    }
    // Prune with c down: a and b pruned, c skipped and reported.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = env.pgferry(&config, &["prune"]).await;
    eprintln!("prune with c down: {}", p.output());
    other.start_again().await.unwrap();
    let r = env.pgferry(&config, &["backup", "--force"]).await;
    r.assert_code(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = env.pgferry(&config, &["prune"]).await;
    eprintln!("prune with c back: {}", p.output());
    for s in [&a_store, &b_store, &c_store] {
        let m = assert_every_manifest_names_an_intact_object(s).await;
        assert!(!m.is_empty());
    }
    let verify = env.pgferry(&config, &["list"]).await;
    verify.assert_code(0);
}

// ---------------------------------------------------------------------------------------------
// 6. SIGKILL of a manual backup at different moments, then the next run, then prune.

async fn kill_then_rerun(after: &'static str, extra_wait: Duration) {
    let env = TestEnv::start().await;
    big_database(&env, "big", 200_000).await;
    let (target, store) = env.s3_target("slow").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    proxy.throttle_up(512 * 1024);
    let config = env.write_config(&format!(
        "{}{}databases = [\"big\"]\n{}",
        pipeline(""),
        env.source_toml("prod"),
        proxy.reroute(&target)
    ));
    // A committed snapshot of an earlier second, which nothing may damage.
    proxy.throttle_up(0);
    let first = env.pgferry(&config, &["backup", "--force"]).await;
    first.assert_code(0);
    let before = snapshot_state(&store).await;
    proxy.throttle_up(512 * 1024);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut child, log) = env
        .start_until(&config, &["backup", "--force"], after)
        .await;
    tokio::time::sleep(extra_wait).await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let log = log.await.unwrap();
    proxy.throttle_up(0);
    let list = env.pgferry(&config, &["list"]).await;
    eprintln!("list after kill: {}", list.output());
    // The next run of the slot (the hourly slot, not forced) and a forced one.
    let again = env.pgferry(&config, &["backup"]).await;
    again.assert_code(0);
    let p = prune_a_day_later(&env, &config).await;
    eprintln!("prune: {}", p.output());
    let now = snapshot_state(&store).await;
    for b in &before {
        assert!(now.contains(b), "{} changed after the kill\n{log}", b.0);
    }
    assert_every_manifest_names_an_intact_object(&store).await;
    let left = keys(&store).await;
    assert!(
        !left.iter().any(|k| k.ends_with(".upload.json")),
        "prune left an upload marker: {left:?}\n{}",
        p.output()
    );
    let named: Vec<String> = now.iter().map(|s| s.2.clone()).collect();
    let orphans: Vec<&String> = left
        .iter()
        .filter(|k| k.ends_with(".dump.zst") && !named.contains(k))
        .collect();
    assert!(orphans.is_empty(), "orphans left after prune: {orphans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_backup_started_then_rerun_and_prune() {
    kill_then_rerun("Backup started.", Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_upload_then_rerun_and_prune() {
    kill_then_rerun("Backup started.", Duration::from_secs(6)).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Two forced manual runs at once on the same database, and a plain one beside them.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_manual_runs_never_damage_each_other() {
    let env = TestEnv::start().await;
    big_database(&env, "big", 100_000).await;
    let (target, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}{}databases = [\"big\"]\n{target}",
        pipeline(""),
        env.source_toml("prod"),
    ));
    let (r1, r2, r3) = tokio::join!(
        env.pgferry(&config, &["backup", "--force"]),
        env.pgferry(&config, &["backup", "--force"]),
        env.pgferry(&config, &["backup"]),
    );
    let runs = [&r1, &r2, &r3];
    let mut committed = Vec::new();
    for r in runs {
        eprintln!("run: code {} {}", r.code, r.stdout);
        if r.code == 0 && r.stdout.contains(" committed:") {
            committed.push(r.stdout.split_whitespace().nth(1).unwrap().to_string());
        } else if r.code == 0 {
            assert!(r.stdout.contains("already committed"), "{}", r.output());
        } else {
            assert!(r.stdout.contains("another pgferry"), "{}", r.output());
        }
    }
    assert!(!committed.is_empty());
    let state = assert_every_manifest_names_an_intact_object(&store).await;
    // Every id reported committed has a manifest.
    for id in &committed {
        assert!(
            state.iter().any(|k| k.contains(id.as_str())),
            "{id} reported committed, not in {state:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Odd database names through backup, list, prune and backup again.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_database_names_go_through_the_whole_cycle() {
    let env = TestEnv::start().await;
    let names = [
        "with space",
        "quo\"te's",
        "sl/ash",
        "ünï ☃",
        "50%25",
        "a..b",
        "..",
    ];
    for n in names {
        env.small_database(n).await;
    }
    let (target, store) = env.s3_target("s3").await;
    let (file, dir) = env.file_target_toml("local");
    let dbs: Vec<String> = names.iter().map(|n| format!("{:?}", n)).collect();
    let config = env.write_config(&format!(
        "{}{}databases = [{}]\n{}{target}{file}",
        pipeline(""),
        env.source_toml("prod"),
        dbs.join(", "),
        retention_keep_one(),
    ));
    let first = env.pgferry(&config, &["backup"]).await;
    eprintln!("{}", first.output());
    first.assert_code(0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = env.pgferry(&config, &["backup", "--force"]).await;
    second.assert_code(0);
    let list = env.pgferry(&config, &["list", "--json"]).await;
    list.assert_code(0);
    let j: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let snaps = j["snapshots"].as_array().unwrap();
    for n in names {
        let c = snaps
            .iter()
            .filter(|s| s["manifest"]["database"].as_str() == Some(n))
            .count();
        assert_eq!(c, 2, "{n}: {}", list.output());
    }
    assert!(!list.stderr.contains("warning"), "{}", list.stderr);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = env.pgferry(&config, &["prune"]).await;
    eprintln!("{}", p.output());
    p.assert_code(0);
    let s = assert_every_manifest_names_an_intact_object(&store).await;
    assert_eq!(s.len(), names.len(), "{:?}", keys(&store).await);
    let f = crate::support::env::file_store(&dir);
    let s = assert_every_manifest_names_an_intact_object(&f).await;
    assert_eq!(s.len(), names.len(), "{:?}", keys(&f).await);
    let list = env.pgferry(&config, &["list", "--json"]).await;
    let j: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(j["snapshots"].as_array().unwrap().len(), names.len());
}
