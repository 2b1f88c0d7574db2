//! Targets misbehaving during `pgferry backup`, through [`Proxy`] in front of a real Garage:
//! a throttled target (it paces the others, memory stays bounded), a stalled one (dropped
//! after `pipeline.stall_timeout`), and S3 errors for a while (retried inside the upload) or
//! for good (the target is dropped; never a half-committed snapshot).

use std::time::{Duration, Instant};

use crate::support::env::{
    assert_every_manifest_names_an_intact_object, file_store, get, keys, manifest_of, TestEnv,
};
use crate::support::proxy::{Proxy, RequestClass};
use crate::support::rusage::pgferry_measured;

/// Peak RSS pgferry may reach with 10 MiB parts and the default `pipeline.memory_budget`
/// (64 MiB of buffers) over the runtime's ~30 MiB. Measured (VmHWM, this test, debug build):
/// 82 MiB. (It read 125–276 MiB before: `wait4`'s ru_maxrss carried the test process's own
/// size into the child's, see support/rusage.rs.)
const RSS_BOUND: u64 = 128 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_target_paces_the_others_and_memory_stays_bounded() {
    const MIB: usize = 160;
    const RATE: u64 = 10 << 20; // bytes per second to the slow target
    let env = TestEnv::start().await;
    env.pg.create_database("big").await.unwrap();
    env.random_large_object("big", MIB).await;
    let (fast, fast_store) = env.s3_target("fast").await;
    let (slow, slow_store) = env.s3_target("slow").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    proxy.throttle_up(RATE);
    let slow = proxy.reroute(&slow);
    let (file, file_dir) = env.file_target_toml("local");
    let config = env.write_config(&format!(
        "{}databases = [\"big\"]\n{fast}{file}{slow}",
        env.source_toml("prod")
    ));

    let started = Instant::now();
    let measured = pgferry_measured(&env, &config, &["backup"]).await;
    let took = started.elapsed();
    measured.run.assert_code(0);
    let stored = (MIB as u64) << 20; // at least: random bytes do not compress
    for store in [&fast_store, &slow_store, &file_store(&file_dir)] {
        let manifests = assert_every_manifest_names_an_intact_object(store).await;
        assert_eq!(manifests.len(), 1, "{manifests:?}");
        assert_eq!(
            manifest_of(&get(store, &manifests[0]).await)["targets"],
            serde_json::json!(["fast", "local", "slow"])
        );
    }
    assert!(proxy.bytes_up() >= stored, "{}", proxy.bytes_up());
    // Every byte went through the throttle, and the run waited for it.
    let min = Duration::from_secs_f64(stored as f64 / RATE as f64);
    assert!(
        took >= min,
        "took {took:?}, the throttle alone needs {min:?}"
    );
    assert!(
        measured.max_rss_bytes < RSS_BOUND,
        "peak RSS {} MiB (bound {} MiB, dump {} MiB)",
        measured.max_rss_bytes >> 20,
        RSS_BOUND >> 20,
        stored >> 20
    );
    eprintln!(
        "throttled backup of {MIB} MiB: {took:?}, peak RSS {} MiB",
        measured.max_rss_bytes >> 20
    );
}

/// Issue 14: a target with few parts allowed (`max_parts = 100`, what a 60 GB database gets at
/// 1000) and a throttled target that makes parts pile up: the backup's buffers stay within
/// `pipeline.memory_budget`, at the smallest budget allowed and at the default. Measured as
/// the peak RSS of this backup less that of a backup of a tiny database with the same config
/// (the runtime, TLS, zstd contexts), in one test. Before the budget covered every part alive
/// (it limited only the parts in flight per target), this peaked 78 MiB above the tiny one
/// with a 32 MiB budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_max_parts_and_a_slow_target_keep_the_buffers_within_the_budget() {
    const MIB: usize = 96;
    let env = TestEnv::start().await;
    env.pg.create_database("big").await.unwrap();
    env.random_large_object("big", MIB).await;
    env.small_database("small").await;
    for budget in [48u64 << 20, 64 << 20] {
        let (fast, fast_store) = env.s3_target("fast").await;
        let (slow, _) = env.s3_target("slow").await;
        let proxy = Proxy::start(&env.s3.endpoint()).await;
        proxy.throttle_up(24 << 20);
        let slow = proxy.reroute(&slow);
        let config = |db: &str| {
            env.write_config(&format!(
                "[pipeline]\nmemory_budget = \"{}MiB\"\n{}databases = [\"{db}\"]\n{}{}",
                budget >> 20,
                env.source_toml("prod"),
                fast.replace("[[target]]\n", "[[target]]\nmax_parts = 100\n"),
                slow.replace("[[target]]\n", "[[target]]\nmax_parts = 100\n"),
            ))
        };
        let baseline = pgferry_measured(&env, &config("small"), &["backup"]).await;
        baseline.run.assert_code(0);
        let big = pgferry_measured(&env, &config("big"), &["backup"]).await;
        big.run.assert_code(0);
        let manifests = assert_every_manifest_names_an_intact_object(&fast_store).await;
        let big_manifest = manifests
            .iter()
            .find(|k| k.starts_with("prod/big/"))
            .unwrap();
        let manifest = manifest_of(&get(&fast_store, big_manifest).await);
        assert!(
            manifest["stored_size"].as_u64().unwrap() >= (MIB as u64) << 20,
            "{manifest}"
        );
        let grown = big.max_rss_bytes.saturating_sub(baseline.max_rss_bytes);
        eprintln!(
            "peak RSS: tiny database {} MiB, {MIB} MiB database {} MiB (+{} MiB; budget {} MiB; part size {})",
            baseline.max_rss_bytes >> 20,
            big.max_rss_bytes >> 20,
            grown >> 20,
            budget >> 20,
            manifest["part_size"]
        );
        assert!(
            grown <= budget,
            "the {MIB} MiB backup peaked {} MiB above the tiny one's {} MiB (budget {} MiB)",
            grown >> 20,
            baseline.max_rss_bytes >> 20,
            budget >> 20
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_target_is_dropped_after_stall_timeout() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (alive, alive_store) = env.s3_target("alive").await;
    let (stalled, stalled_store) = env.s3_target("stalled").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    proxy.stall(true);
    let stalled = proxy.reroute(&stalled);
    let (file, file_dir) = env.file_target_toml("local");
    let config = env.write_config(&format!(
        "[pipeline]\nstall_timeout = \"3s\"\n{}databases = [\"acme\"]\n{alive}{stalled}{file}",
        env.source_toml("prod")
    ));

    let started = Instant::now();
    let run = env.pgferry(&config, &["backup"]).await;
    let took = started.elapsed();
    run.assert_code(0);
    assert!(
        run.stdout.contains("not on: stalled") && run.stdout.contains("pipeline.stall_timeout"),
        "{}",
        run.stdout
    );
    // Dropped after the stall timeout, not after the HTTP client's own (minutes).
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(proxy.connections() >= 1, "pgferry never reached the proxy");
    assert_eq!(proxy.bytes_up(), 0, "a stalled proxy forwarded something");
    for store in [&alive_store, &file_store(&file_dir)] {
        let manifests = assert_every_manifest_names_an_intact_object(store).await;
        assert_eq!(manifests.len(), 1, "{manifests:?}");
        assert_eq!(
            manifest_of(&get(store, &manifests[0]).await)["targets"],
            serde_json::json!(["alive", "local"])
        );
    }
    // Read past the proxy: nothing reached the stalled target's bucket.
    assert_eq!(keys(&stalled_store).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_for_a_while_are_retried_inside_the_upload() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (steady, steady_store) = env.s3_target("steady").await;
    let (slowdown, slowdown_store) = env.s3_target("slowdown").await;
    let (flaky, flaky_store) = env.s3_target("flaky").await;
    // 503 SlowDown on the first three part uploads: the same part is retried three times.
    let p503 = Proxy::start(&env.s3.endpoint()).await;
    p503.fail_requests(503, RequestClass::UploadPart, Some(3));
    // 500 InternalError on the first two requests of any kind (the multipart start).
    let p500 = Proxy::start(&env.s3.endpoint()).await;
    p500.fail_requests(500, RequestClass::Any, Some(2));
    let config = env.write_config(&format!(
        "[pipeline]\nmin_targets = 3\n{}databases = [\"acme\"]\n{steady}{}{}",
        env.source_toml("prod"),
        p503.reroute(&slowdown),
        p500.reroute(&flaky),
    ));

    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(0);
    assert!(!run.stdout.contains("not on:"), "{}", run.stdout);
    assert_eq!(p503.served(503), 3);
    assert_eq!(p500.served(500), 2);
    for store in [&steady_store, &slowdown_store, &flaky_store] {
        let manifests = assert_every_manifest_names_an_intact_object(store).await;
        assert_eq!(manifests.len(), 1, "{manifests:?}");
        assert_eq!(
            manifest_of(&get(store, &manifests[0]).await)["targets"],
            serde_json::json!(["steady", "slowdown", "flaky"])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_errors_that_never_end_drop_the_target_and_never_half_commit() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (steady, steady_store) = env.s3_target("steady").await;
    let (broken, broken_store) = env.s3_target("broken").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    // Every part upload fails; the multipart start and the abort go through.
    proxy.fail_requests(503, RequestClass::UploadPart, None);
    let (file, file_dir) = env.file_target_toml("local");
    let base = format!(
        "{}databases = [\"acme\"]\n{steady}{}{file}",
        env.source_toml("prod"),
        proxy.reroute(&broken)
    );
    let file_store = file_store(&file_dir);

    // min_targets = all three: exit 1, but the two copies that completed stay committed.
    let strict = env.write_config(&format!("[pipeline]\nmin_targets = 3\n{base}"));
    let run = env.pgferry(&strict, &["backup"]).await;
    run.assert_code(1);
    let out = run.output();
    assert!(
        out.contains("min_targets") && out.contains("broken") && out.contains("503"),
        "{out}"
    );
    // object_store's retries: the first try and 5 more, then the part upload fails.
    assert!(proxy.served(503) >= 6, "served {}", proxy.served(503));
    for store in [&steady_store, &file_store] {
        assert_eq!(
            assert_every_manifest_names_an_intact_object(store)
                .await
                .len(),
            1
        );
    }
    assert_eq!(keys(&broken_store).await, Vec::<String>::new());

    // Default min_targets = 1: broken answers that it lacks the slot, so the slot is dumped
    // again; the broken target is dropped, the others commit (the new manifests name the new
    // objects; the earlier ones are orphans for prune).
    let lenient = env.write_config(&base);
    let run = env.pgferry(&lenient, &["backup"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("not on: broken"), "{}", run.stdout);
    for store in [&steady_store, &file_store] {
        let manifests = assert_every_manifest_names_an_intact_object(store).await;
        assert_eq!(manifests.len(), 1, "{manifests:?}");
        assert_eq!(
            manifest_of(&get(store, &manifests[0]).await)["targets"],
            serde_json::json!(["steady", "local"])
        );
    }
    assert_eq!(keys(&broken_store).await, Vec::<String>::new());
}
