//! Companion files, the backup side (issue 18): `[[source]] files` archived beside each dump
//! (tar, zstd, age when encryption is on, the same fan-out), committed by the same manifest,
//! and opened by hand with the real `zstd`, `tar` and `age` tools. Real PostgreSQL, real
//! Garage, real directories.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use age::secrecy::ExposeSecret;
use object_store::ObjectStore;
use sha2::{Digest, Sha256};

use crate::support::env::{
    assert_every_manifest_names_an_intact_object, file_store, get, keys, manifest_of, Run, TestEnv,
};
use crate::support::proxy::{Proxy, RequestClass};
use crate::support::rusage::pgferry_measured;
use crate::support::tree_of;

/// `files = "<root>/{database}"`, the source key under test.
fn files_key(root: &Path) -> String {
    format!("files = \"{}/{{database}}\"\n", root.display())
}

/// Backs up `databases` (a TOML array's items) of source `prod`, with companion files under
/// `root`, to a fresh S3 target followed by `more` (other targets, sections); returns the
/// run and the S3 target's store.
async fn backup_with_files(
    env: &TestEnv,
    databases: &str,
    root: &Path,
    more: &str,
) -> (Run, Arc<dyn ObjectStore>) {
    let (s3, s3_store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [{databases}]\n{}{s3}{more}",
        env.source_toml("prod"),
        files_key(root)
    ));
    (env.pgferry(&config, &["backup"]).await, s3_store)
}

/// A small filestore: a binary file, an empty one, one in a nested directory, an empty
/// directory and a name with spaces and non-ASCII characters.
fn write_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("ab")).unwrap();
    std::fs::create_dir_all(dir.join("cd/sub")).unwrap();
    std::fs::create_dir_all(dir.join("empty dir")).unwrap();
    let mut random = vec![0u8; 3 << 20];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut random,
    )
    .unwrap();
    std::fs::write(dir.join("ab/ab12cdef0123456789"), &random).unwrap();
    std::fs::write(dir.join("ab/empty"), b"").unwrap();
    std::fs::write(dir.join("cd/sub/deep.txt"), "nested\n".repeat(1000)).unwrap();
    std::fs::write(dir.join("name with spaces é 日本.txt"), "ünïcode").unwrap();
}

/// Runs `script` with bash (pipefail) and returns its stdout; fails the test on an error.
async fn sh(script: &str) -> String {
    let out = tokio::process::Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Writes `object` to a file, lists it with `decode | tar -t` and extracts it with
/// `decode | tar -x` into a new directory; returns the listing and the directory.
/// `decode` reads the file named by `{}`.
async fn open_by_hand(object: &[u8], decode: &str, work: &Path) -> (Vec<String>, PathBuf) {
    let file = work.join(format!("object-{}", crate::support::random_hex(4)));
    std::fs::write(&file, object).unwrap();
    let decode = decode.replace("{}", &format!("'{}'", file.display()));
    let listing = sh(&format!("{decode} | tar -t")).await;
    let into = work.join(format!("extracted-{}", crate::support::random_hex(4)));
    std::fs::create_dir_all(&into).unwrap();
    sh(&format!("{decode} | tar -x -C '{}'", into.display())).await;
    (listing.lines().map(str::to_string).collect(), into)
}

/// The manifest of the only snapshot of `prod/<database>` in `store`, with its key.
async fn only_manifest(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    database: &str,
) -> serde_json::Value {
    let all = keys(store).await;
    let manifests: Vec<&String> = all
        .iter()
        .filter(|k| k.starts_with(&format!("prod/{database}/")) && k.ends_with(".manifest.json"))
        .collect();
    assert_eq!(manifests.len(), 1, "{all:?}");
    manifest_of(&get(store, manifests[0]).await)
}

/// The JSON log line of `message` in `stderr`.
fn log_line<'a>(stderr: &'a str, message: &str) -> &'a str {
    stderr
        .lines()
        .find(|l| l.contains(&format!("\"message\":\"{message}")))
        .unwrap_or_else(|| panic!("no log line {message:?} in:\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_archived_beside_the_dump_on_every_target_and_untar_identical() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let root = env.dir.path().join("filestore");
    write_tree(&root.join("acme"));
    let (file, file_dir) = env.file_target_toml("local");
    let (run, s3_store) = backup_with_files(&env, "\"acme\"", &root, &file).await;
    run.assert_code(0);
    let committed = log_line(&run.stderr, "Backup committed.");
    assert!(
        committed.contains("\"files\":4") && committed.contains("\"files_skipped\":0"),
        "{committed}"
    );

    let want = tree_of(&root.join("acme"));
    let mut objects = Vec::new();
    for store in [&s3_store, &file_store(&file_dir)] {
        assert_eq!(
            assert_every_manifest_names_an_intact_object(store)
                .await
                .len(),
            1
        );
        let m = only_manifest(store, "acme").await;
        assert_eq!(m["format_version"], 4, "{m}");
        assert_eq!(m["targets"], serde_json::json!(["s3", "local"]));
        let files = &m["files"];
        let key = files["object_key"].as_str().expect("files.object_key");
        let dump = m["object_key"].as_str().unwrap();
        // `<id>-<run>.files.tar.zst`: the same attempt as the dump, beside it.
        assert_eq!(key, dump.replace(".dump.zst", ".files.tar.zst"), "{m}");
        assert_eq!(files["file_count"], 4);
        assert_eq!(
            files["file_bytes"],
            (3 << 20) + "nested\n".len() as u64 * 1000 + "ünïcode".len() as u64
        );
        assert_eq!(files["skipped"], 0);
        let object = get(store, key).await;
        assert_eq!(files["stored_size"], object.len() as u64);
        assert_eq!(files["sha256"], hex::encode(Sha256::digest(&object)));
        assert!(files["raw_size"].as_u64().unwrap() > (3 << 20));
        // Only the dump, the files and the manifest: no marker left behind.
        assert_eq!(keys(store).await.len(), 3, "{:?}", keys(store).await);
        objects.push(object);
    }
    assert_eq!(objects[0], objects[1], "one archive, fanned out");

    let (listing, extracted) = open_by_hand(&objects[0], "zstd -q -d -c {}", env.dir.path()).await;
    for path in &listing {
        assert!(
            !path.starts_with('/') && !path.split('/').any(|s| s == ".."),
            "{listing:?}"
        );
    }
    assert_eq!(tree_of(&extracted), want, "the archive holds the same tree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_commits_the_dump_with_files_none() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    env.small_database("odd/name").await;
    let root = env.dir.path().join("filestore");
    std::fs::create_dir_all(&root).unwrap();
    let (run, s3_store) = backup_with_files(&env, "\"acme\", \"odd/name\"", &root, "").await;
    run.assert_code(0);
    assert!(
        run.stderr
            .contains("The companion files' directory does not exist"),
        "{}",
        run.stderr
    );
    // A database whose name cannot be a directory: no files either, and the dump commits.
    assert!(
        run.stderr.contains("cannot name a directory"),
        "{}",
        run.stderr
    );
    for db in ["acme", "odd%2Fname"] {
        let m = only_manifest(&s3_store, db).await;
        assert_eq!(m["files"], "none", "{m}");
        assert_eq!(m["format_version"], 3, "{m}");
    }
    assert_eq!(
        assert_every_manifest_names_an_intact_object(&s3_store)
            .await
            .len(),
        2
    );
    assert!(
        !keys(&s3_store).await.iter().any(|k| k.contains(".files.")),
        "{:?}",
        keys(&s3_store).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_and_special_files_are_skipped_and_counted() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let root = env.dir.path().join("filestore");
    let dir = root.join("acme");
    write_tree(&dir);
    let want = tree_of(&dir);
    let outside = env.dir.path().join("outside-secret");
    std::fs::write(&outside, b"not the filestore's").unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("ab/points-outside")).unwrap();
    std::os::unix::fs::symlink("../cd/sub/deep.txt", dir.join("ab/points-inside")).unwrap();
    std::os::unix::fs::symlink(env.dir.path(), dir.join("cd/dir-outside")).unwrap();
    sh(&format!("mkfifo '{}'", dir.join("cd/fifo").display())).await;
    let (run, s3_store) = backup_with_files(&env, "\"acme\"", &root, "").await;
    run.assert_code(0);
    let warned = log_line(
        &run.stderr,
        "Symlinks or special files (sockets, FIFOs, devices) in the companion files are not archived.",
    );
    assert!(warned.contains("\"skipped\":4"), "{warned}");
    let m = only_manifest(&s3_store, "acme").await;
    assert_eq!(m["files"]["skipped"], 4, "{m}");
    assert_eq!(m["files"]["file_count"], 4, "{m}");
    let object = get(&s3_store, m["files"]["object_key"].as_str().unwrap()).await;
    let (listing, extracted) = open_by_hand(&object, "zstd -q -d -c {}", env.dir.path()).await;
    for gone in ["points-outside", "points-inside", "dir-outside", "fifo"] {
        assert!(
            !listing.iter().any(|p| p.contains(gone)),
            "{gone} archived: {listing:?}"
        );
    }
    assert_eq!(tree_of(&extracted), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_files_open_with_the_age_tool() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let root = env.dir.path().join("filestore");
    write_tree(&root.join("acme"));
    let want = tree_of(&root.join("acme"));
    let identity = age::x25519::Identity::generate();
    let secret = identity.to_string().expose_secret().to_string();
    env.add_secret_var("PGFERRY_TEST_UNUSED_AGE_KEY", &secret);
    let key_file = env.dir.path().join("key.txt");
    std::fs::write(&key_file, format!("{secret}\n")).unwrap();
    let encryption = format!(
        "[encryption]\nrecipients = [\"{}\"]\n",
        identity.to_public()
    );
    let (run, s3_store) = backup_with_files(&env, "\"acme\"", &root, &encryption).await;
    run.assert_code(0);
    let m = only_manifest(&s3_store, "acme").await;
    let key = m["files"]["object_key"].as_str().unwrap();
    assert!(key.ends_with(".files.tar.zst.age"), "{m}");
    assert!(m["object_key"].as_str().unwrap().ends_with(".dump.zst.age"));
    let object = get(&s3_store, key).await;
    assert!(object.starts_with(b"age-encryption.org/v1\n"));
    assert_eq!(m["files"]["sha256"], hex::encode(Sha256::digest(&object)));
    let decode = format!("age -d -i '{}' {{}} | zstd -q -d -c", key_file.display());
    let (_, extracted) = open_by_hand(&object, &decode, env.dir.path()).await;
    assert_eq!(tree_of(&extracted), want);
}

/// A target whose files upload fails, while streaming (its part uploads) or at its
/// completion (after its dump completed): it gets no manifest and keeps no object of the
/// run; the other target commits both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_its_files_upload_keeps_nothing_of_the_run() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let root = env.dir.path().join("filestore");
    write_tree(&root.join("acme"));
    for (method, query) in [("PUT", "partNumber="), ("POST", "uploadId=")] {
        let (steady, steady_store) = env.s3_target("steady").await;
        let (broken, broken_store) = env.s3_target("broken").await;
        let proxy = Proxy::start(&env.s3.endpoint()).await;
        proxy.fail_requests(
            503,
            RequestClass::Object {
                method,
                suffix: ".files.tar.zst",
                query,
            },
            None,
        );
        let config = env.write_config(&format!(
            "[pipeline]\nstall_timeout = \"10s\"\n{}databases = [\"acme\"]\n{}{steady}{}",
            env.source_toml("prod"),
            files_key(&root),
            proxy.reroute(&broken)
        ));

        let run = env.pgferry(&config, &["backup", "--force"]).await;
        run.assert_code(0);
        assert!(
            run.stdout.contains("not on: broken"),
            "{method}: {}",
            run.stdout
        );
        if method == "PUT" {
            assert!(run.stdout.contains(".files.tar.zst"), "{}", run.stdout);
        }
        assert!(proxy.served(503) >= 1, "{method}: no fault was injected");
        assert_eq!(
            keys(&broken_store).await,
            Vec::<String>::new(),
            "{method}: the broken target keeps an object of the run"
        );
        let m = only_manifest(&steady_store, "acme").await;
        assert_eq!(m["targets"], serde_json::json!(["steady"]), "{method}");
        assert_eq!(m["files"]["file_count"], 4, "{method}");
        assert_eq!(
            assert_every_manifest_names_an_intact_object(&steady_store)
                .await
                .len(),
            1
        );
        let object = get(&steady_store, m["files"]["object_key"].as_str().unwrap()).await;
        assert_eq!(m["files"]["sha256"], hex::encode(Sha256::digest(&object)));
    }
}

/// Peak RSS of backups whose companion files are 100 MiB and then 200 MiB (in 200 and 400
/// files of random bytes, which zstd cannot shrink), against the same backup without files.
/// The archive streams: doubling the tree does not grow the peak, and what the files add is
/// the pipeline's buffers, which `pipeline.memory_budget` bounds (64 MiB by default; the same
/// pipeline as a dump of that size, see faults/target.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_tree_keeps_memory_flat() {
    const FILE_BYTES: usize = 512 << 10;
    const BUDGET: u64 = 64 << 20;
    /// Allocator slack and sampling noise between two runs (measured spread: see the report
    /// this test prints).
    const NOISE: u64 = 16 << 20;
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let root = env.dir.path().join("filestore");
    let (s3, s3_store) = env.s3_target("s3").await;
    let base = format!("{}databases = [\"acme\"]\n", env.source_toml("prod"));
    let without = env.write_config(&format!("{base}{s3}"));
    let with = env.write_config(&format!("{base}{}{s3}", files_key(&root)));
    let baseline = pgferry_measured(&env, &without, &["backup", "--force"]).await;
    baseline.run.assert_code(0);

    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    let mut written = 0;
    let mut grown = Vec::new();
    for files in [200, 400] {
        while written < files {
            let sub = root.join("acme").join(format!("{:02x}", written % 256));
            std::fs::create_dir_all(&sub).unwrap();
            let mut buf = vec![0u8; FILE_BYTES];
            std::io::Read::read_exact(&mut random, &mut buf).unwrap();
            std::fs::write(sub.join(format!("{written:040x}")), buf).unwrap();
            written += 1;
        }
        crate::support::next_second().await;
        let measured = pgferry_measured(&env, &with, &["backup", "--force"]).await;
        measured.run.assert_code(0);
        let m = only_newest_files(&s3_store).await;
        assert_eq!(m["file_count"], files as u64, "{m}");
        assert!(m["stored_size"].as_u64().unwrap() >= (files * FILE_BYTES) as u64);
        let g = measured
            .max_rss_bytes
            .saturating_sub(baseline.max_rss_bytes);
        eprintln!(
            "peak RSS: without files {} MiB, with {} MiB of files {} MiB (+{} MiB)",
            baseline.max_rss_bytes >> 20,
            (files * FILE_BYTES) >> 20,
            measured.max_rss_bytes >> 20,
            g >> 20
        );
        grown.push(g);
    }
    assert_eq!(
        assert_every_manifest_names_an_intact_object(&s3_store)
            .await
            .len(),
        3
    );
    assert!(
        grown[1] <= grown[0] + NOISE,
        "twice the files, +{} MiB instead of +{} MiB: memory grows with the tree",
        grown[1] >> 20,
        grown[0] >> 20
    );
    assert!(
        grown[1] <= BUDGET + NOISE,
        "200 MiB of files peaked {} MiB above the backup without them (budget {} MiB)",
        grown[1] >> 20,
        BUDGET >> 20
    );
}

/// The `files` of the newest manifest in `store` that has an archive.
async fn only_newest_files(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
) -> serde_json::Value {
    let mut newest: Option<serde_json::Value> = None;
    for k in keys(store).await {
        if !k.ends_with(".manifest.json") {
            continue;
        }
        let m = manifest_of(&get(store, &k).await);
        if m["files"].is_object()
            && newest
                .as_ref()
                .is_none_or(|n| n["snapshot_id"].as_str() < m["snapshot_id"].as_str())
        {
            newest = Some(m);
        }
    }
    newest.expect("a manifest with files")["files"].clone()
}

/// SIGTERM while the files stream: the run is cancelled, nothing is committed, and neither
/// the dump's upload (open, waiting for the files) nor the files' is left on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_archiving_commits_nothing_and_leaves_nothing() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let root = env.dir.path().join("filestore");
    let dir = root.join("acme");
    std::fs::create_dir_all(&dir).unwrap();
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    for i in 0..40 {
        let mut buf = vec![0u8; 1 << 20];
        std::io::Read::read_exact(&mut random, &mut buf).unwrap();
        std::fs::write(dir.join(format!("{i:040x}")), buf).unwrap();
    }
    let (s3, s3_store) = env.s3_target("s3").await;
    let proxy = Proxy::start(&env.s3.endpoint()).await;
    proxy.throttle_up(2 << 20); // 40 MiB of files: 20 s
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{}{}",
        env.source_toml("prod"),
        files_key(&root),
        proxy.reroute(&s3)
    ));

    let (mut child, log) = env
        .start_until(&config, &["backup"], "Archiving the companion files.")
        .await;
    // SAFETY: kill(2) of the child this test started.
    assert_eq!(
        unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) },
        0
    );
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
        .await
        .expect("pgferry still running 60 s after SIGTERM")
        .unwrap();
    let log = log.await.unwrap();
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(log.contains("cancelled"), "{log}");
    assert_eq!(
        keys(&s3_store).await,
        Vec::<String>::new(),
        "the cancelled run left objects or markers"
    );
}

/// A `files` path that exists but is not a directory is an error a human must fix (unlike a
/// missing one): the run fails saying which path, and the dump's upload is aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_path_that_is_not_a_directory_fails_the_run_and_leaves_nothing() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let root = env.dir.path().join("filestore");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("acme"), b"a file, not the filestore").unwrap();
    let (run, s3_store) = backup_with_files(&env, "\"acme\"", &root, "").await;
    run.assert_code(1);
    let out = run.output();
    assert!(
        out.contains(&format!(
            "{} is not a directory",
            root.join("acme").display()
        )),
        "{out}"
    );
    assert_eq!(keys(&s3_store).await, Vec::<String>::new());
}
