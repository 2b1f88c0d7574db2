//! Write-once snapshots (issue 13), with the real binary against real PostgreSQL and Garage:
//! a target down below `min_targets` keeps the copies that completed; an ambiguous manifest
//! PUT never leaves a manifest without its object; a lost advisory lock cancels the run, and
//! a second run that takes the lock then never overwrites anything; a manual run takes the
//! lock and honours the committed check.

use std::time::{Duration, Instant};

use crate::support::env::{
    assert_every_manifest_names_an_intact_object, file_store, get, keys, manifest_of, TestEnv,
};
use crate::support::garage::Garage;
use crate::support::proxy::{Proxy, RequestClass};

/// `pgferry backup`'s first line's snapshot id, whatever the outcome.
fn id_in(stdout: &str) -> String {
    stdout
        .split_whitespace()
        .nth(1)
        .expect("the backup line names the snapshot")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_below_min_targets_keeps_the_committed_copy_and_fails() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (alive, alive_store) = env.s3_target("alive").await;
    let mut down = Garage::start().await.expect("second Garage");
    let (dead, dead_store) = env.s3_target_on(&down, "dead").await;
    down.stop().await.unwrap();
    let config = env.write_config(&format!(
        "[pipeline]\nmin_targets = 2\n{}databases = [\"acme\"]\n{alive}{dead}",
        env.source_toml("prod")
    ));

    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(1);
    let out = run.output();
    assert!(
        out.contains("min_targets") && out.contains("dead") && out.contains("kept"),
        "{out}"
    );
    // The copy that completed is committed, intact, and names only its own target.
    let manifests = assert_every_manifest_names_an_intact_object(&alive_store).await;
    assert_eq!(manifests.len(), 1, "{:?}", keys(&alive_store).await);
    let m = manifest_of(&get(&alive_store, &manifests[0]).await);
    assert_eq!(m["targets"], serde_json::json!(["alive"]));

    // list shows it, and a restore-by-catalog sees it: it is a real snapshot.
    let list = env.pgferry(&config, &["list", "--json"]).await;
    list.assert_code(0);
    assert!(
        list.stdout.contains(m["snapshot_id"].as_str().unwrap()),
        "{}",
        list.stdout
    );
    down.start_again().await.unwrap();
    assert!(keys(&dead_store).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_manifest_put_never_leaves_a_manifest_without_its_object() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (target, store) = env.s3_target("flaky").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{}",
        env.source_toml("prod"),
        proxy.reroute(&target)
    ));
    // Every manifest PUT reaches the bucket, and then the client is told it failed (as when
    // the answer is lost after the server stored it).
    proxy.fail_after_forwarding(500, RequestClass::ManifestPut, None);
    let run = env.pgferry(&config, &["backup"]).await;
    assert!(proxy.served(500) > 0, "the fault never triggered");
    let manifests = assert_every_manifest_names_an_intact_object(&store).await;
    assert_eq!(manifests.len(), 1, "{}", run.output());
    // The manifest that did land names this run's object, so the snapshot counts.
    run.assert_code(0);

    // The next attempt at the slot sees it committed, and the snapshot restores.
    proxy.stop_failing();
    let again = env.pgferry(&config, &["backup"]).await;
    again.assert_code(0);
    assert!(
        again.stdout.contains("already committed"),
        "{}",
        again.stdout
    );
    assert_every_manifest_names_an_intact_object(&store).await;
}

/// A database whose dump takes a while through a throttled target, so that a test can act
/// while it runs.
async fn slow_setup(
    env: &TestEnv,
) -> (
    std::path::PathBuf,
    Proxy,
    std::sync::Arc<dyn object_store::ObjectStore>,
) {
    env.random_rows_database("big", 200_000).await;
    let (target, store) = env.s3_target("slow").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    proxy.throttle_up(512 * 1024);
    let config = env.write_config(&format!(
        "{}databases = [\"big\"]\n{}",
        env.source_toml("prod"),
        proxy.reroute(&target)
    ));
    (config, proxy, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_cancels_the_run_and_the_next_holder_never_overwrites() {
    let env = TestEnv::start().await;
    let (config, proxy, store) = slow_setup(&env).await;
    let (mut first, first_log) = env
        .start_until(&config, &["backup"], "Backup started.")
        .await;

    // A second run while the first holds the lock: it does not dump.
    let second = env.pgferry(&config, &["backup"]).await;
    second.assert_code(1);
    assert!(
        second.stdout.contains("another pgferry"),
        "{}",
        second.output()
    );

    // The lock's session dies under the first run (idle_session_timeout, a proxy, an admin).
    let killed = env
        .pg
        .client("postgres")
        .await
        .unwrap()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(killed, 1, "one session holds the advisory lock");
    // Now another run can take the lock: it dumps the same slot under its own key, while the
    // first notices and stops.
    let started = Instant::now();
    let (third, status) = tokio::join!(env.pgferry(&config, &["backup"]), async {
        tokio::time::timeout(Duration::from_secs(60), first.wait())
            .await
            .expect("the first run went on after losing its lock")
            .unwrap()
    });
    let first_out = first_log.await.unwrap();
    assert_eq!(status.code(), Some(1), "{first_out}");
    assert!(first_out.contains("advisory lock"), "{first_out}");
    assert!(started.elapsed() < Duration::from_secs(90));
    drop(proxy);
    third.assert_code(0);
    // One snapshot, named by one manifest, whose object is intact: the first run committed
    // nothing and damaged nothing.
    let manifests = assert_every_manifest_names_an_intact_object(&store).await;
    assert_eq!(manifests.len(), 1, "{:?}", keys(&store).await);
    let dumps: Vec<String> = keys(&store)
        .await
        .into_iter()
        .filter(|k| k.ends_with(".dump.zst"))
        .collect();
    assert_eq!(dumps.len(), 1, "the first run left its object: {dumps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_backup_honours_the_committed_check_and_force_takes_a_new_snapshot() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (file, dir) = env.file_target_toml("local");
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{file}",
        env.source_toml("prod")
    ));
    let first = env.pgferry(&config, &["backup"]).await;
    let id = first.snapshot_id();
    let store = file_store(&dir);
    let before = keys(&store).await;

    let again = env.pgferry(&config, &["backup"]).await;
    again.assert_code(0);
    assert!(
        again.stdout.contains("already committed"),
        "{}",
        again.stdout
    );
    assert_eq!(id_in(&again.stdout), id);
    assert_eq!(keys(&store).await, before, "nothing was written");

    let forced = env.pgferry(&config, &["backup", "--force"]).await;
    let new_id = forced.snapshot_id();
    assert_ne!(new_id, id, "--force takes a snapshot of its own");
    assert_eq!(
        assert_every_manifest_names_an_intact_object(&store)
            .await
            .len(),
        2
    );
}
