//! `pgferry backup` and `pgferry list` end to end: real PostgreSQL, real Garage, real files.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::env::{self, file_store, get, keys, manifest_of, TestEnv};
use crate::support::garage::Garage;
use crate::support::postgres::PgCluster;

/// Text with newlines, tabs and backslashes, jsonb, bytea, numeric, a large object, a view,
/// a materialized view, and a table whose quoted name has spaces, quotes and non-ASCII.
pub const TRICKY_SQL: &str = r#"
CREATE TABLE mixed (
    id int PRIMARY KEY,
    body text,
    doc jsonb,
    bin bytea,
    amount numeric(30, 9)
);
INSERT INTO mixed
SELECT g,
       repeat('line ' || g || E'\n\\back\\slash\ttab ', g % 40),
       jsonb_build_object('k', g, 'arr', jsonb_build_array(g, 'x', null), 'nested', jsonb_build_object('é', 'ü')),
       decode(md5(g::text) || md5((g * 7)::text), 'hex'),
       g * 1234.000000001
FROM generate_series(1, 3000) g;
INSERT INTO mixed VALUES (0, E'\\.\n\\.', '{}', '\x00ff', NULL);
CREATE TABLE "odd ""quoted"" name é 表" (id serial PRIMARY KEY, v text);
INSERT INTO "odd ""quoted"" name é 表" (v) SELECT 'v' || g FROM generate_series(1, 250) g;
CREATE TABLE empty_one (id int);
CREATE VIEW mixed_view AS SELECT id, body FROM mixed WHERE id < 10;
CREATE MATERIALIZED VIEW mixed_mv AS SELECT id % 10 AS k, count(*) AS n FROM mixed GROUP BY 1;
SELECT lo_from_bytea(0, convert_to(repeat('large object payload ', 1000), 'UTF8'));
"#;

/// Restores a downloaded `.dump.zst` by hand, the way DESIGN promises a user can:
/// `zstd -d | pg_restore`, into a new database of `pg`.
pub async fn restore_by_hand(pg: &PgCluster, dump_zst: &Path, into: &str) {
    let decode = format!("zstd -q -d -c '{}'", dump_zst.display());
    restore_piped(pg, &decode, into).await;
}

/// Runs `decode | pg_restore` (bash, pipefail) into a new database `into` of `pg`.
pub async fn restore_piped(pg: &PgCluster, decode: &str, into: &str) {
    pg.create_database(into).await.unwrap();
    let script = format!(
        "{decode} | '{}' --no-owner --exit-on-error -h 127.0.0.1 -p {} -U postgres -d '{}'",
        pg.bin_dir().join("pg_restore").display(),
        pg.port(),
        into
    );
    let out = tokio::process::Command::new("bash")
        .args(["-o", "pipefail", "-c", &script])
        .env("PGPASSWORD", pg.superuser_password())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{decode} | pg_restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_to_two_buckets_and_a_directory_restores_exactly() {
    let env = TestEnv::start().await;
    env.pg.create_database("shop").await.unwrap();
    env.pg.execute("shop", TRICKY_SQL).await.unwrap();
    let (s3a, store_a) = env.s3_target("s3a").await;
    let s3b_garage = Garage::start().await.expect("second Garage");
    let (s3b, store_b) = env.s3_target_on(&s3b_garage, "s3b").await;
    let (file, file_dir) = env.file_target_toml("local");
    let config = env.write_config(&format!(
        "{}databases = [\"shop\"]\n{s3a}{s3b}{file}",
        env.source_toml("prod")
    ));

    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(0);
    assert!(run.stdout.contains("prod/shop"), "{}", run.stdout);
    assert!(run.stdout.contains("committed"), "{}", run.stdout);

    let stores = [store_a, store_b, file_store(&file_dir)];
    let mut ids = Vec::new();
    for store in &stores {
        let k = keys(store).await;
        assert_eq!(k.len(), 2, "{k:?}");
        // `<id>-<run>.dump.zst` (write-once, one key per attempt) and `<id>.manifest.json`.
        let (id, run) = k[0]
            .strip_prefix("prod/shop/")
            .and_then(|r| r.strip_suffix(".dump.zst"))
            .and_then(|r| r.split_once('-'))
            .unwrap_or_else(|| panic!("unexpected key layout: {k:?}"));
        assert_eq!(run.len(), 12, "{k:?}");
        let id = id.to_string();
        assert_eq!(k[1], format!("prod/shop/{id}.manifest.json"));
        let manifest = manifest_of(&get(store, &k[1]).await);
        let dump = get(store, &k[0]).await;
        assert_eq!(manifest["sha256"], hex::encode(Sha256::digest(&dump)));
        assert_eq!(manifest["stored_size"], dump.len() as u64);
        assert_eq!(manifest["object_key"], k[0]);
        assert_eq!(manifest["snapshot_id"], id);
        assert_eq!(manifest["compression"]["algorithm"], "zstd");
        assert_eq!(
            manifest["targets"],
            serde_json::json!(["s3a", "s3b", "local"])
        );
        assert!(manifest["raw_size"].as_u64().unwrap() > dump.len() as u64);
        ids.push(id);
    }
    assert!(ids.iter().all(|i| *i == ids[0]));

    // Restore by hand from the S3 copy: exactly the source's rows, table by table.
    let dump = get(&stores[0], &env::dump_key(&stores[0], &ids[0]).await).await;
    let path = env.dir.path().join("shop.dump.zst");
    std::fs::write(&path, &dump).unwrap();
    restore_by_hand(&env.pg, &path, "shop_restored").await;
    let source = env.pg.table_fingerprints("shop").await.unwrap();
    let restored = env.pg.table_fingerprints("shop_restored").await.unwrap();
    assert!(source.len() >= 5, "{source:?}");
    assert_eq!(source, restored);

    // The manifest's table statistics match count(*) in the source.
    let manifest =
        manifest_of(&get(&stores[0], &format!("prod/shop/{}.manifest.json", ids[0])).await);
    let stats: BTreeMap<String, u64> = manifest["tables"]
        .as_array()
        .expect("tables in manifest")
        .iter()
        .map(|t| {
            (
                format!(
                    "{}.{}",
                    t["schema"].as_str().unwrap(),
                    t["name"].as_str().unwrap()
                ),
                t["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    for (table, rows) in &stats {
        let (count, _) = source
            .get(table)
            .unwrap_or_else(|| panic!("{table} not in source: {source:?}"));
        assert_eq!(*count as u64, *rows, "{table}");
    }
    assert_eq!(stats["public.odd \"quoted\" name é 表"], 250);
    assert_eq!(manifest["large_objects"], 1);

    // list merges the three targets into one snapshot.
    let run = env.pgferry(&config, &["list", "--json"]).await;
    run.assert_code(0);
    let listed: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let snaps = listed["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{listed}");
    assert_eq!(
        snaps[0]["targets"],
        serde_json::json!(["s3a", "s3b", "local"])
    );
    let run = env.pgferry(&config, &["list"]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains(&ids[0]) && run.stdout.contains("shop"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_s3_server_is_dropped_and_min_targets_is_enforced() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (alive, alive_store) = env.s3_target("alive").await;
    let mut dead_garage = Garage::start().await.expect("second Garage");
    let (dead, dead_store) = env.s3_target_on(&dead_garage, "dead").await;
    let (file, file_dir) = env.file_target_toml("local");
    dead_garage.stop().await.unwrap();
    let base = format!(
        "{}databases = [\"acme\"]\n{alive}{dead}{file}",
        env.source_toml("prod")
    );

    // min_targets = 3 cannot be met: exit 1, but the two copies that completed stay
    // committed (a degraded snapshot), and their manifests don't name the dead target.
    let strict = env.write_config(&format!("[pipeline]\nmin_targets = 3\n{base}"));
    let run = env.pgferry(&strict, &["backup"]).await;
    run.assert_code(1);
    assert!(run.output().contains("dead"), "{}", run.output());
    assert!(run.output().contains("min_targets"), "{}", run.output());
    let file_store = file_store(&file_dir);
    for store in [&alive_store, &file_store] {
        let k = keys(store).await;
        assert_eq!(k.len(), 2, "{k:?}");
        let manifest = manifest_of(&get(store, &k[1]).await);
        assert_eq!(manifest["targets"], serde_json::json!(["alive", "local"]));
    }

    // Default min_targets = 1: the next run (a new snapshot) commits on the two live targets.
    let lenient = env.write_config(&base);
    let run = env.pgferry(&lenient, &["backup", "--force"]).await;
    run.assert_code(0);
    for store in [&alive_store, &file_store] {
        let k = keys(store).await;
        assert_eq!(k.len(), 4, "{k:?}");
        assert_eq!(
            env::assert_every_manifest_names_an_intact_object(store)
                .await
                .len(),
            2
        );
    }
    dead_garage.start_again().await.unwrap();
    assert_eq!(keys(&dead_store).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_server_killed_during_the_upload_is_dropped() {
    let env = TestEnv::start().await;
    env.pg.create_database("big").await.unwrap();
    // ~150 MB of hex text: ~75 MB stored, several 10 MiB parts, long enough to kill mid-way.
    env.pg
        .execute(
            "big",
            "CREATE TABLE t AS SELECT g AS id, (SELECT string_agg(md5(random()::text || g || s), '') FROM generate_series(1, 16) s) AS v FROM generate_series(1, 280000) g;",
        )
        .await
        .unwrap();
    let (alive, alive_store) = env.s3_target("alive").await;
    let mut doomed = Garage::start().await.expect("second Garage");
    let (dying, _) = env.s3_target_on(&doomed, "dying").await;
    // A stall bound well inside this test's limit: whatever the dead server leaves pending
    // (a part, the completion, the abort) is given up within it.
    let config = env.write_config(&format!(
        "[pipeline]\nstall_timeout = \"30s\"\n{}databases = [\"big\"]\n{alive}{dying}",
        env.source_toml("prod")
    ));
    let mut child = env.command(&config, &["backup"]).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("Backup started.") {
            break;
        }
    }
    assert!(seen.contains("Backup started."), "{seen}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.stop().await.unwrap();
    let rest = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("backup finished")
        .unwrap();
    let stderr = seen + &rest.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    env::assert_no_secret(&(stdout.clone() + &stderr), &env.secrets());
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("not on: dying"), "{stdout}");
    let k = keys(&alive_store).await;
    assert_eq!(k.len(), 2, "{k:?}");
    let manifest = manifest_of(&get(&alive_store, &k[1]).await);
    assert_eq!(manifest["targets"], serde_json::json!(["alive"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_commits_nothing_and_says_why() {
    let env = TestEnv::start().await;
    env.pg.create_database("acme").await.unwrap();
    let (file, dir) = env.file_target_toml("local");
    let config = env.write_config(&format!(
        "[[source]]\nname = \"prod\"\nurl = \"postgres://postgres:wrong-password-123@127.0.0.1:{}/postgres\"\n{file}",
        env.pg.port()
    ));
    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(1);
    assert!(
        run.output().contains("password authentication failed"),
        "{}",
        run.output()
    );
    assert!(
        !run.output().contains("wrong-password-123"),
        "{}",
        run.output()
    );
    assert_eq!(keys(&file_store(&dir)).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_dump_connection_commits_nothing() {
    let env = TestEnv::start().await;
    env.pg.create_database("big").await.unwrap();
    env.pg
        .execute(
            "big",
            "CREATE TABLE t AS SELECT g AS id, repeat(md5(g::text), 20) AS v FROM generate_series(1, 400000) g;",
        )
        .await
        .unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"big\"]\n{s3}",
        env.source_toml("prod")
    ));
    let child = env.command(&config, &["backup"]).spawn().unwrap();
    // Wait for pg_dump's COPY, then terminate its backend.
    let client = env.pg.client("postgres").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut terminated = false;
    while tokio::time::Instant::now() < deadline && !terminated {
        let rows = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'big' AND application_name = 'pgferry' AND query ILIKE 'COPY%'",
                &[],
            )
            .await
            .unwrap();
        terminated = !rows.is_empty();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(terminated, "never saw pg_dump's COPY");
    let out = child.wait_with_output().await.unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    env::assert_no_secret(&output, &env.secrets());
    assert_eq!(out.status.code(), Some(1), "{output}");
    assert!(output.contains("pg_dump of big failed"), "{output}");
    assert!(output.contains("terminat"), "{output}");
    assert_eq!(keys(&store).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_pg_dump_than_the_server_is_refused() {
    let env = TestEnv::start().await;
    env.pg.create_database("acme").await.unwrap();
    let bin = env.dir.path().join("old-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("pg_dump");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 12.22'; exit 0; fi\necho 'should not run' >&2; exit 3\n",
    )
    .unwrap();
    let mut perm = std::fs::metadata(&fake).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&fake, perm).unwrap();
    let (file, dir) = env.file_target_toml("local");
    let config = env.write_config(&format!(
        "{}pg_bin_dir = \"{}\"\n{file}",
        env.source_toml("prod"),
        bin.display()
    ));
    let run = env
        .pgferry(&config, &["backup", "--database", "acme"])
        .await;
    run.assert_code(1);
    let out = run.output();
    assert!(
        out.contains("12.22") && out.contains("older than the server"),
        "{out}"
    );
    assert!(!out.contains("should not run"), "{out}");
    assert_eq!(keys(&file_store(&dir)).await, Vec::<String>::new());
}

/// About 100 MB of random UUID text: about 50 MB stored, so several 10 MiB parts; at zstd
/// level 7 the backup runs for seconds after its first part, so it is caught mid-upload.
const SLOW_SQL: &str = "CREATE TABLE slow AS SELECT g AS id, gen_random_uuid()::text || gen_random_uuid()::text AS u FROM generate_series(1, 1200000) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_mid_upload_leaves_an_upload_that_prune_aborts() {
    // Two S3 buckets (the World's) and a directory.
    let disk = tempfile::tempdir().unwrap();
    let more = format!(
        "[pipeline]\nzstd_level = 7\n\n[[target]]\nname = \"disk\"\nurl = \"file://{}\"\n",
        disk.path().display()
    );
    let w = crate::restore::World::start(SLOW_SQL, &[], &more).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .arg("--config")
        .arg(&w.config)
        .args(["backup", "--source", "prod"])
        .envs(w.env_vars())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until both buckets hold an open upload with at least one part, and its marker.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let markers = loop {
        let mut parts = Vec::new();
        for b in &w.buckets {
            let n = w
                .env
                .s3
                .bucket_counter(b, "unfinishedMultipartUploadParts")
                .await
                .unwrap();
            parts.push(n);
        }
        let mut markers = Vec::new();
        for s in &w.stores {
            markers.extend(
                keys(s)
                    .await
                    .into_iter()
                    .filter(|k| k.ends_with(".upload.json")),
            );
        }
        if parts.iter().all(|&n| n >= 1) && markers.len() == 2 {
            break markers;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no part was uploaded in time: parts {parts:?}, markers {markers:?}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before a part was seen: parts {parts:?}, markers {markers:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.start_kill().unwrap(); // SIGKILL: no abort, no cleanup code runs
    assert!(!child.wait().await.unwrap().success());

    let marker: serde_json::Value =
        serde_json::from_slice(&get(&w.stores[0], &markers[0]).await).expect("the marker is JSON");
    let attempt = markers[0]
        .strip_prefix("prod/acme/")
        .and_then(|k| k.strip_suffix(".upload.json"))
        .unwrap()
        .to_string();
    assert!(
        attempt.contains('-'),
        "the marker names the attempt: {attempt}"
    );
    let id = attempt;
    assert_eq!(marker["key"], format!("backups/prod/acme/{id}.dump.zst"));
    assert!(marker["upload_id"].as_str().is_some_and(|u| !u.is_empty()));
    for (b, s) in w.buckets.iter().zip(&w.stores) {
        let k = keys(s).await;
        assert_eq!(
            k,
            [format!("prod/acme/{id}.upload.json")],
            "no manifest, no dump"
        );
        assert_eq!(
            w.env
                .s3
                .bucket_counter(b, "unfinishedMultipartUploads")
                .await
                .unwrap(),
            1
        );
    }
    // The directory target keeps its staging file: object_store writes `<key>#<n>` and
    // renames it into place on completion.
    let staging = files_under(disk.path());
    assert_eq!(staging.len(), 1, "{staging:?}");
    assert!(
        staging[0].ends_with(format!("{id}.dump.zst#1")),
        "{staging:?}"
    );
    let list = w.pgferry(&["list"]).await;
    list.assert_code(0);
    assert!(
        list.stderr.contains(&format!(
            "prod/acme/{id}.upload.json marks an unfinished upload"
        )),
        "{}",
        list.stderr
    );

    // Within the grace (24 h by default) the upload may be a live one: prune leaves it.
    let run = w.pgferry(&["prune"]).await;
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("deleted 0 snapshot(s) and 0 orphan dump(s), aborted 0 unfinished upload(s)"),
        "{}",
        run.stdout
    );
    assert_eq!(files_under(disk.path()), staging);
    for (b, s) in w.buckets.iter().zip(&w.stores) {
        assert_eq!(keys(s).await.len(), 1);
        assert_eq!(
            w.env
                .s3
                .bucket_counter(b, "unfinishedMultipartUploads")
                .await
                .unwrap(),
            1
        );
    }

    // Once the grace has passed (prune run a day and a minute later: the grace cannot be
    // configured below an hour), prune aborts both uploads and removes the staging file.
    let out = crate::retention::prune_later(
        &w.config,
        &w.env_vars(),
        &Default::default(),
        pgferry::retention::DEFAULT_ORPHAN_GRACE + Duration::from_secs(60),
    )
    .await;
    assert!(
        out.contains("deleted 0 snapshot(s) and 1 orphan dump(s), aborted 2 unfinished upload(s)"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "unfinished upload on a (no manifest, older than the grace): abort the upload of backups/prod/acme/{id}.upload.json"
        )),
        "{out}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (b, s) in w.buckets.iter().zip(&w.stores) {
        assert!(keys(s).await.is_empty(), "marker and dump deleted");
        loop {
            let open = w
                .env
                .s3
                .bucket_counter(b, "unfinishedMultipartUploads")
                .await
                .unwrap();
            if open == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "Garage still counts {open} unfinished upload(s) in {b}: {}",
                w.env.s3.bucket_info(b).await.unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    assert!(files_under(disk.path()).is_empty(), "staging file removed");
    // The next backup commits and restores exactly.
    let run = w
        .pgferry_with(&w.config, &["backup", "--source", "prod"])
        .await;
    let new_id = run.snapshot_id();
    for s in &w.stores {
        let k = keys(s).await;
        assert_eq!(
            k,
            [
                env::dump_key(s, &new_id).await,
                format!("prod/acme/{new_id}.manifest.json")
            ],
            "the marker goes once the upload completes"
        );
    }
    let dir = disk.path().join("prod").join("acme");
    let disk_store = file_store(disk.path());
    let object = env::dump_key(&disk_store, &new_id).await;
    assert_eq!(
        files_under(disk.path()),
        [
            dir.join(object.rsplit('/').next().unwrap()),
            dir.join(format!("{new_id}.manifest.json"))
        ]
    );
    w.restore(&[]).await.assert_code(0);
    w.staging
        .assert_same_tables("acme", &w.env.pg, "acme")
        .await;
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
