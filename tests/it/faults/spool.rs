//! `pgferry restore --jobs 2` when the spool disk is full: a small tmpfs mounted by the test
//! as `[restore] spool_dir` (the tests run as root). Too small up front, and filled by the
//! test while the download runs (slowed down by a [`Proxy`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::env::{self, get, keys, TestEnv};
use crate::support::postgres::PgCluster;
use crate::support::proxy::Proxy;
use crate::support::running_as_root;

/// A tmpfs of a given size mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts it; fails the test (never skips it) when that is not possible.
    fn mount(dir: &Path, bytes: u64) -> Tmpfs {
        assert!(
            running_as_root(),
            "the spool tests mount a tmpfs: run them as root (as CI does)"
        );
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

const PREVIOUS_SQL: &str =
    "CREATE TABLE previous_contents AS SELECT g AS id, 'kept ' || g AS note FROM generate_series(1, 100) g;";

/// Production `acme` backed up through `proxy`; the staging copy `acme_staging`, on a staging
/// server of its own (restore refuses the source's server), holds older contents. Returns the
/// config, the manifest's raw size and the staging server.
async fn world(env: &TestEnv, proxy: &Proxy, spool: &Path) -> (PathBuf, u64, PgCluster) {
    let staging = PgCluster::start()
        .await
        .expect("start the staging PostgreSQL");
    env.add_secret_var(STAGING_PW_VAR, staging.superuser_password());
    env.pg.create_database("acme").await.unwrap();
    env.pg
        .execute(
            "acme",
            "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 100000) g;",
        )
        .await
        .unwrap();
    staging.create_database("acme_staging").await.unwrap();
    staging.execute("acme_staging", PREVIOUS_SQL).await.unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{}\n[[restore_target]]\nnamespace = \"staging-*\"\nurl = \"postgres://postgres:${{{}}}@127.0.0.1:{}/postgres\"\nowner = \"postgres\"\n\n[restore]\nspool_dir = {:?}\n",
        env.source_toml("prod"),
        proxy.reroute(&s3),
        STAGING_PW_VAR,
        staging.port(),
        spool.display().to_string(),
    ));
    env.pgferry(&config, &["backup"]).await.snapshot_id();
    let manifest_key = keys(&store)
        .await
        .into_iter()
        .find(|k| k.ends_with(".manifest.json"))
        .expect("a manifest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&get(&store, &manifest_key).await).unwrap();
    (config, manifest["raw_size"].as_u64().unwrap(), staging)
}

/// Carries the staging server's password into the config.
const STAGING_PW_VAR: &str = "PGFERRY_TEST_SPOOL_STAGING_PASSWORD";

const RESTORE: &[&str] = &[
    "restore",
    "--source",
    "prod",
    "--database",
    "acme",
    "--to",
    "staging-acme",
    "--as",
    "acme_staging",
    "--jobs",
    "2",
];

/// Staging holds what it held before, and no temporary database is left.
async fn assert_staging_untouched(
    staging: &PgCluster,
    before: &std::collections::BTreeMap<String, (i64, String)>,
) {
    assert_eq!(
        &staging.table_fingerprints("acme_staging").await.unwrap(),
        before
    );
    let dbs = staging.databases().await;
    assert!(
        dbs.iter().all(|d| !d.starts_with("pgferry_")),
        "leftover databases: {dbs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_too_small_is_refused_before_the_download() {
    let env = TestEnv::start().await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    let spool = env.dir.path().join("spool");
    let (config, raw_size, staging) = world(&env, &proxy, &spool).await;
    let tmpfs = Tmpfs::mount(&spool, 16 << 20);
    let before = staging.table_fingerprints("acme_staging").await.unwrap();
    let down_before = proxy.bytes_down();

    let run = env.pgferry(&config, RESTORE).await;
    run.assert_code(1);
    let err = run.stderr.clone();
    assert!(
        err.contains(&format!("spool directory {}", spool.display())) && err.contains("free"),
        "{err}"
    );
    assert!(err.contains(&raw_size.to_string()), "{err}");
    // Only the listing and the manifest were read, not the dump.
    let read = proxy.bytes_down() - down_before;
    assert!(
        read < raw_size / 4,
        "read {read} bytes of a {raw_size}-byte dump"
    );
    assert_eq!(tmpfs.entries(), Vec::<String>::new());
    assert_staging_untouched(&staging, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_filling_up_during_the_download_fails_cleanly() {
    let env = TestEnv::start().await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    let spool = env.dir.path().join("spool");
    let (config, raw_size, staging) = world(&env, &proxy, &spool).await;
    // Just enough for the up-front check (the archive + 256 MiB of headroom).
    let tmpfs = Tmpfs::mount(&spool, raw_size + (256 << 20) + (8 << 20));
    let before = staging.table_fingerprints("acme_staging").await.unwrap();
    proxy.throttle_down(512 << 10); // the download takes seconds

    let child = env.command(&config, RESTORE).spawn().unwrap();
    // Once the spool file exists, fill the disk.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !tmpfs.entries().iter().any(|n| n.starts_with("pgferry-")) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no spool file appeared in {}",
            spool.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let filler = spool.join("filler");
    let filled = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(filled.raw_os_error(), Some(libc::ENOSPC), "{filled}");

    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("restore ended")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    env::assert_no_secret(&stderr, &env.secrets());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("spool {}/pgferry-", spool.display()))
            && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(stderr.contains("the destination is untouched"), "{stderr}");
    // The spool file is gone; only the test's filler remains.
    assert_eq!(tmpfs.entries(), vec!["filler".to_string()]);
    assert_staging_untouched(&staging, &before).await;
}
