//! Fault matrix (issue 8): what pgferry does when the world it reads is damaged. Each test
//! builds a real world (PostgreSQL, Garage, a file target, a staging cluster to restore into),
//! breaks one thing the way it breaks in production, and checks that nothing crashes, that the
//! user is told which object is bad, and that the good data stays usable.
//!
//! Faults while things run are in the submodules: `target` (a throttled, stalled or failing
//! S3 target during a backup), `source` (the server restarted or a database dropped mid-run),
//! `spool` (the restore spool disk full).

mod source;
mod spool;
mod target;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::support::env::{self, Run, TestEnv};
use crate::support::postgres::PgCluster;
use crate::support::restore_argv;

/// Environment variable carrying the staging cluster's superuser password into the config.
const STAGING_PW_VAR: &str = "PGFERRY_TEST_STAGING_PASSWORD";

/// Production + a Garage target "s3" + a file target "disk", a staging cluster to restore into.
struct World {
    env: TestEnv,
    staging: PgCluster,
    s3: Arc<dyn ObjectStore>,
    disk: Arc<dyn ObjectStore>,
    config: PathBuf,
}

impl World {
    async fn start() -> World {
        let env = TestEnv::start().await;
        let staging = PgCluster::start()
            .await
            .expect("start the staging PostgreSQL");
        env.pg.create_database("acme").await.unwrap();
        env.pg
            .execute(
                "acme",
                "CREATE TABLE version (v int); INSERT INTO version VALUES (1);",
            )
            .await
            .unwrap();
        let (s3_toml, s3) = env.s3_target("s3").await;
        let (disk_toml, disk_dir) = env.file_target_toml("disk");
        let disk = env::file_store(&disk_dir);
        let config = env.write_config(&format!(
            "{}databases = [\"acme\"]\n{s3_toml}{disk_toml}\n[[restore_target]]\nnamespace = \"staging\"\nurl = \"postgres://postgres:${{{STAGING_PW_VAR}}}@127.0.0.1:{}/postgres\"\nowner = \"postgres\"\n",
            env.source_toml("prod"),
            staging.port(),
        ));
        World {
            env,
            staging,
            s3,
            disk,
            config,
        }
    }

    async fn pgferry(&self, args: &[&str]) -> Run {
        let mut vars = self.env.env_vars();
        vars.push((
            STAGING_PW_VAR.into(),
            self.staging.superuser_password().to_string(),
        ));
        let run = env::pgferry_with_env(&self.config, args, &vars).await;
        let mut secrets = self.env.secrets();
        secrets.push(self.staging.superuser_password().to_string());
        env::assert_no_secret(&run.output(), &secrets);
        assert!(
            !run.stderr.contains("panicked"),
            "pgferry panicked:\n{}",
            run.stderr
        );
        run
    }

    /// Backs up `acme` (version `v` in its table) and returns the snapshot id.
    async fn backup(&self, v: i32, after: Option<&str>) -> String {
        // Snapshot ids of forced manual runs are seconds: wait for the next one.
        while after.is_some_and(|prev| snapshot_now() == prev) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.env
            .pg
            .execute("acme", &format!("UPDATE version SET v = {v}"))
            .await
            .unwrap();
        self.pgferry(&["backup", "--source", "prod", "--force"])
            .await
            .snapshot_id()
    }

    async fn restore(&self, extra: &[&str]) -> Run {
        self.pgferry(&restore_argv("acme", "staging", extra)).await
    }

    async fn restored_version(&self) -> i32 {
        self.staging
            .client("acme")
            .await
            .unwrap()
            .query_one("SELECT v FROM version", &[])
            .await
            .unwrap()
            .get(0)
    }
}

fn snapshot_now() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string()
}

fn manifest_key(id: &str) -> String {
    format!("prod/acme/{id}.manifest.json")
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, bytes: Vec<u8>) {
    store
        .put(&ObjectPath::from(key), PutPayload::from(bytes))
        .await
        .unwrap_or_else(|e| panic!("overwrite {key}: {e}"));
}

/// Fault 7: manifests truncated, not JSON, of a future format_version, or missing while the
/// dump stays. `list` skips each with a warning naming the key; `restore` refuses the damaged
/// snapshots with a clear message and exit code 1, and `latest` is the newest good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_manifests_are_skipped_by_list_and_refused_by_restore() {
    let w = World::start().await;
    let good = w.backup(1, None).await;
    let half = w.backup(2, Some(&good)).await;
    let newest = w.backup(3, Some(&half)).await;
    for id in [&good, &half, &newest] {
        for store in [&w.s3, &w.disk] {
            assert!(env::keys(store).await.contains(&manifest_key(id)));
        }
    }

    // The newest snapshot: truncated on s3, not JSON on disk.
    let json = env::get(&w.s3, &manifest_key(&newest)).await.to_vec();
    put(
        &w.s3,
        &manifest_key(&newest),
        json[..json.len() / 2].to_vec(),
    )
    .await;
    put(
        &w.disk,
        &manifest_key(&newest),
        b"<html>502 Bad Gateway</html>".to_vec(),
    )
    .await;
    // The middle one: from a future pgferry on s3, manifest deleted on disk (dump stays).
    let mut v: serde_json::Value =
        serde_json::from_slice(&env::get(&w.s3, &manifest_key(&half)).await).unwrap();
    v["format_version"] = 99.into();
    put(&w.s3, &manifest_key(&half), v.to_string().into_bytes()).await;
    w.disk
        .delete(&ObjectPath::from(manifest_key(&half)))
        .await
        .unwrap();
    // Its dump (write-once key `<id>-<run>.dump.zst`) stays.
    let half_dump = env::keys(&w.disk)
        .await
        .into_iter()
        .find(|k| k.starts_with(&format!("prod/acme/{half}")) && k.ends_with(".dump.zst"))
        .expect("the dump of the snapshot whose manifest was deleted stays");

    // list: exit 0, only the good snapshot, a warning per bad key.
    let list = w.pgferry(&["list"]).await;
    list.assert_code(0);
    assert!(list.stdout.contains(&good), "{}", list.stdout);
    assert!(
        !list.stdout.contains(&half) && !list.stdout.contains(&newest),
        "{}",
        list.stdout
    );
    let warning_lines = |needle: &str| -> Vec<&str> {
        list.stderr
            .lines()
            .filter(|l| l.contains("warning") && l.contains(needle))
            .collect()
    };
    let newest_warnings = warning_lines(&manifest_key(&newest));
    assert!(
        newest_warnings.iter().any(|l| l.contains("target s3")),
        "{}",
        list.stderr
    );
    assert!(
        newest_warnings.iter().any(|l| l.contains("target disk")),
        "{}",
        list.stderr
    );
    let future = warning_lines(&manifest_key(&half));
    assert!(
        future
            .iter()
            .any(|l| l.contains("target s3") && l.contains("upgrade pgferry")),
        "{}",
        list.stderr
    );
    assert!(
        warning_lines(&half_dump)
            .iter()
            .any(|l| l.contains("disk") && l.contains("no manifest")),
        "the dump without a manifest is named:\n{}",
        list.stderr
    );
    // Both copies of the good snapshot still count.
    let json_list = w.pgferry(&["list", "--json"]).await;
    json_list.assert_code(0);
    let listed: serde_json::Value = serde_json::from_str(&json_list.stdout).unwrap();
    let snapshots = listed["snapshots"].as_array().unwrap();
    assert_eq!(snapshots.len(), 1, "{listed}");
    assert_eq!(snapshots[0]["targets"], serde_json::json!(["s3", "disk"]));
    assert_eq!(listed["warnings"].as_array().unwrap().len(), 3, "{listed}");

    // restore of a damaged snapshot: refused, exit 1, the message says why.
    for (id, why) in [(&newest, "not valid JSON"), (&half, "upgrade pgferry")] {
        let run = w.restore(&["--snapshot", id]).await;
        run.assert_code(1);
        let error = run
            .stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line:\n{}", run.stderr));
        assert!(error.contains(id.as_str()), "{error}");
        assert!(error.contains("manifest"), "{error}");
        assert!(error.contains(why), "{error}");
        assert!(error.contains(&good), "names what can be restored: {error}");
    }
    assert!(
        !w.staging
            .client("postgres")
            .await
            .unwrap()
            .query("SELECT 1 FROM pg_database WHERE datname = 'acme'", &[])
            .await
            .unwrap()
            .iter()
            .any(|_| true),
        "a refused restore created the database"
    );

    // latest: the newest good snapshot.
    let run = w.restore(&["--json"]).await;
    run.assert_code(0);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["restore"]["snapshot_id"], good.as_str(), "{report}");
    assert_eq!(w.restored_version().await, 1);
}

/// Fault 9: odd names. Databases named with spaces, quotes, uppercase, non-ASCII, a slash and
/// the maximum 63 bytes, each with an oddly named table, are backed up to S3 and a directory,
/// listed under their exact names and restored into staging with the same contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_database_and_table_names_round_trip() {
    let w = World::start().await;
    // 63 bytes, NAMEDATALEN - 1: "é" is two bytes.
    let longest = format!("long é {}", "x".repeat(63 - "long é ".len()));
    assert_eq!(longest.len(), 63);
    let names = [
        "with space".to_string(),
        "quote\"double'single".to_string(),
        "UpperCase".to_string(),
        "café 日本 🐘".to_string(),
        "slash/in name".to_string(),
        longest,
    ];
    for name in &names {
        w.env.pg.create_database(name).await.unwrap();
        w.env
            .pg
            .execute(
                name,
                "CREATE TABLE \"Odd \"\"Table\"\" é\" (id int PRIMARY KEY, v text);
                 INSERT INTO \"Odd \"\"Table\"\" é\" SELECT g, 'row ' || g FROM generate_series(1, 100) g;",
            )
            .await
            .unwrap();
    }
    let databases = names
        .iter()
        .map(|n| toml::Value::String(n.clone()).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let text = std::fs::read_to_string(&w.config).unwrap().replace(
        "databases = [\"acme\"]",
        &format!("databases = [{databases}]"),
    );
    std::fs::write(&w.config, text).unwrap();

    let run = w.pgferry(&["backup", "--source", "prod"]).await;
    run.assert_code(0);

    // Manifests carry the exact names, and both targets hold every snapshot.
    let list = w.pgferry(&["list", "--json"]).await;
    list.assert_code(0);
    assert!(!list.stderr.contains("warning"), "{}", list.stderr);
    let listed: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let mut found: Vec<String> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["targets"], serde_json::json!(["s3", "disk"]), "{s}");
            s["manifest"]["database"].as_str().unwrap().to_string()
        })
        .collect();
    found.sort();
    let mut expected = names.to_vec();
    expected.sort();
    assert_eq!(found, expected);
    // Each name is one key segment: prefix/source/<database>/<snapshot>.<suffix>.
    for store in [&w.s3, &w.disk] {
        let keys = env::keys(store).await;
        assert_eq!(keys.len(), 2 * names.len(), "{keys:?}");
        for key in &keys {
            let segments: Vec<&str> = key.split('/').collect();
            assert!(segments.len() == 3, "a database name split the key: {key}");
        }
    }
    // `list --database NAME` finds each by its exact name.
    for name in &names {
        let one = w
            .pgferry(&["list", "--json", "--source", "prod", "--database", name])
            .await;
        one.assert_code(0);
        let v: serde_json::Value = serde_json::from_str(&one.stdout).unwrap();
        assert_eq!(v["snapshots"].as_array().unwrap().len(), 1, "{name}: {v}");
        assert_eq!(v["snapshots"][0]["manifest"]["database"], name.as_str());
    }

    // Restore each into staging under the same name: same contents.
    for name in &names {
        let run = w.pgferry(&restore_argv(name, "staging", &[])).await;
        run.assert_code(0);
        w.staging.assert_same_tables(name, &w.env.pg, name).await;
    }
}
