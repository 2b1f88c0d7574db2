//! Interrupting a restore and what it leaves on disk (issue 20 items 7 and 10): SIGTERM or
//! SIGINT while a slow hook runs cancels the hook's query, drops the temporary database and
//! exits within seconds; the `--jobs` spool and file-target objects are private (0600 files
//! in 0700 directories).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::restore::World;
use crate::support::restore_argv;

/// How soon after the signal the restore must have ended.
const EXIT_WITHIN: Duration = Duration::from_secs(15);

async fn assert_no_tmp_and_no_sleeper(w: &World) {
    let dbs = w.staging.databases().await;
    assert!(
        dbs.iter().all(|d| !d.starts_with("pgferry_")),
        "leftovers: {dbs:?}"
    );
    let c = w.staging.client("postgres").await.unwrap();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(3600)%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the hook's query still runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_a_slow_hook_ends_the_restore_within_seconds_leaving_nothing() {
    let hooks = tempfile::tempdir().unwrap();
    let hook = hooks.path().join("slow.sql");
    std::fs::write(&hook, "SELECT pg_sleep(3600);\n").unwrap();
    let w = World::start("", &[hook.display().to_string()], "").await;
    w.pgferry(&["backup", "--source", "prod"])
        .await
        .assert_code(0);
    let before = w.staging.table_fingerprints("acme").await.unwrap();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut cmd = w
            .env
            .command(&w.config, &restore_argv("acme", "staging-acme", &[]));
        cmd.envs(w.env_vars());
        let child = cmd.spawn().unwrap();
        // Wait until the hook's query runs on staging.
        let c = w.staging.client("postgres").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(3600)%' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the hook never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // SAFETY: kill(2) of the child this test started.
        assert_eq!(unsafe { libc::kill(child.id().unwrap() as i32, signal) }, 0);
        let signalled = Instant::now();
        let out = tokio::time::timeout(EXIT_WITHIN, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!("restore still running {EXIT_WITHIN:?} after signal {signal}")
            })
            .unwrap();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(out.status.code(), Some(0), "{output}");
        assert!(output.contains("cancelled"), "{output}");
        eprintln!("signal {signal}: ended {:?} after", signalled.elapsed());
        assert_no_tmp_and_no_sleeper(&w).await;
        assert_eq!(w.staging.table_fingerprints("acme").await.unwrap(), before);
    }
}

/// Every file under `root` is 0600 and every directory 0700.
fn assert_private(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                let mode = meta.permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{} is {mode:o}", e.path().display());
            }
        }
    }
    assert!(files > 0, "nothing under {}", root.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_target_objects_and_the_spool_are_private() {
    let w = World::start("", &[], "").await;
    let (file_toml, root) = w.env.file_target_toml("local");
    let mut toml = std::fs::read_to_string(&w.config).unwrap();
    // The file target goes with the other [[target]]s: before the first non-target table.
    let at = toml.find("[[restore_target]]").unwrap();
    toml.insert_str(at, &format!("{file_toml}\n"));
    let config = w.env.write_config(&toml);
    w.pgferry_with(&config, &["backup", "--source", "prod"])
        .await
        .assert_code(0);
    assert_private(&root);
    let spool = w.env.dir.path().join("spool");
    assert!(!spool.exists());
    w.pgferry_with(
        &config,
        &restore_argv("acme", "staging-acme", &["--jobs", "2"]),
    )
    .await
    .assert_code(0);
    let mode = std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "spool dir is {mode:o}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_left_closed_by_a_killed_swap_is_reopened_by_the_next_run() {
    let w = World::start("", &[], "").await;
    let run = w.pgferry(&["backup", "--source", "prod"]).await;
    run.assert_code(0);
    let id = run.snapshot_id();
    let before = w.staging.table_fingerprints("acme").await.unwrap();
    // What a restore killed between ALLOW_CONNECTIONS false and the rename leaves.
    w.staging
        .execute("postgres", "ALTER DATABASE acme ALLOW_CONNECTIONS false")
        .await
        .unwrap();
    // The next run fails (every copy is damaged) but reopens the destination first.
    w.corrupt(0, &id).await;
    w.corrupt(1, &id).await;
    w.restore(&[]).await.assert_code(1);
    assert_eq!(w.staging.table_fingerprints("acme").await.unwrap(), before);
}
