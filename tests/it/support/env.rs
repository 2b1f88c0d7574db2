//! A test environment: one PostgreSQL cluster, one Garage S3 server, a temp dir, and a way to
//! run the `pgferry` binary against a config written for them.
//!
//! Secrets (the PostgreSQL password, the S3 secret key) reach pgferry only through `${VAR}`
//! expansion from its environment, and every run's output is checked for them: no test can
//! leak a secret without failing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use tokio::process::Command;

use super::garage::Garage;
use super::postgres::PgCluster;

/// Environment variable names the configs use for secrets.
pub const PG_PASSWORD_VAR: &str = "PGFERRY_TEST_PG_PASSWORD";
pub const S3_KEY_VAR: &str = "PGFERRY_TEST_S3_KEY_ID";
pub const S3_SECRET_VAR: &str = "PGFERRY_TEST_S3_SECRET";

pub struct TestEnv {
    pub pg: PgCluster,
    pub s3: Garage,
    pub dir: tempfile::TempDir,
    /// Further variables (credentials of other servers a test configured), and which of
    /// them are secrets.
    extra_vars: std::sync::Mutex<Vec<(String, String)>>,
    extra_secrets: std::sync::Mutex<Vec<String>>,
}

/// What one pgferry run printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// The snapshot id a successful `pgferry backup` printed (`src/db ID committed: …`).
    #[track_caller]
    pub fn snapshot_id(&self) -> String {
        self.assert_code(0);
        let id = self
            .stdout
            .split_whitespace()
            .nth(1)
            .expect("the backup line names the snapshot")
            .to_string();
        assert_eq!(id.len(), 16, "not a snapshot id: {}", self.stdout);
        id
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "expected exit {code}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        let pg = PgCluster::start().await.expect("start PostgreSQL");
        let s3 = Garage::start().await.expect("start Garage");
        TestEnv {
            pg,
            s3,
            dir: tempfile::tempdir().expect("temp dir"),
            extra_vars: Default::default(),
            extra_secrets: Default::default(),
        }
    }

    /// Fills database `db` with `mib` MiB of random bytes as one large object: pg_dump writes
    /// them as they are and zstd cannot shrink them, so the stored object is as big.
    pub async fn random_large_object(&self, db: &str, mib: usize) {
        let path = self.pg.data_dir().join("random.bin");
        let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
        let mut file = std::fs::File::create(&path).unwrap();
        std::io::copy(
            &mut std::io::Read::take(&mut urandom, (mib as u64) << 20),
            &mut file,
        )
        .unwrap();
        drop(file);
        self.pg
            .execute(db, &format!("SELECT lo_import('{}');", path.display()))
            .await
            .unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    /// Creates database `name` with one small table `t` (20 000 rows, ~1 MB of dump): enough
    /// for a real backup, quick to take.
    pub async fn small_database(&self, name: &str) {
        self.pg.create_database(name).await.unwrap();
        self.pg
            .execute(
                name,
                "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g;",
            )
            .await
            .unwrap();
    }

    /// Creates database `name` with table `t` of `rows` rows of random text (~70 bytes each,
    /// incompressible enough that a copy of it takes a while through a throttled proxy).
    pub async fn random_rows_database(&self, name: &str, rows: u32) {
        self.pg.create_database(name).await.unwrap();
        self.pg
            .execute(
                name,
                &format!(
                    "CREATE TABLE t AS SELECT g AS id, md5(random()::text) || md5(random()::text) AS v FROM generate_series(1, {rows}) g;"
                ),
            )
            .await
            .unwrap();
    }

    /// Creates each of `databases` ([`small_database`](Self::small_database)) and a config
    /// backing them up as source `prod`, with `source_keys` (retention, …), to a fresh S3
    /// target `s3`, then `more`; returns the config and the target's store.
    pub async fn small_databases_on_s3(
        &self,
        databases: &[&str],
        source_keys: &str,
        more: &str,
    ) -> (PathBuf, Arc<dyn ObjectStore>) {
        for db in databases {
            self.small_database(db).await;
        }
        let (s3, store) = self.s3_target("s3").await;
        let list = databases
            .iter()
            .map(|d| format!("{d:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = self.write_config(&format!(
            "{}databases = [{list}]\n{source_keys}{s3}{more}",
            self.source_toml("prod")
        ));
        (config, store)
    }

    /// Every secret of this environment: none may appear in any output.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![
            self.pg.superuser_password().to_string(),
            self.s3.secret_access_key().to_string(),
        ];
        secrets.extend(self.extra_secrets.lock().unwrap().iter().cloned());
        secrets
    }

    /// Adds a secret variable (e.g. another cluster's password) for `${name}` in configs.
    pub fn add_secret_var(&self, name: &str, value: &str) {
        self.extra_vars
            .lock()
            .unwrap()
            .push((name.to_string(), value.to_string()));
        self.extra_secrets.lock().unwrap().push(value.to_string());
    }

    /// A `[[source]]` for this cluster, password from the environment.
    pub fn source_toml(&self, name: &str) -> String {
        source_toml(&self.pg, name)
    }

    /// A `[[target]]` on a fresh bucket of this environment's Garage, and a client for
    /// that bucket rooted at the target's prefix.
    pub async fn s3_target(&self, name: &str) -> (String, Arc<dyn ObjectStore>) {
        s3_target(&self.s3, name, "").await
    }

    /// Like [`s3_target`](Self::s3_target), on another Garage server; its credentials are
    /// added to this environment's variables and secrets.
    pub async fn s3_target_on(&self, s3: &Garage, name: &str) -> (String, Arc<dyn ObjectStore>) {
        let suffix = format!("_{}", s3.access_key_id());
        self.extra_vars.lock().unwrap().extend([
            (
                format!("{S3_KEY_VAR}{suffix}"),
                s3.access_key_id().to_string(),
            ),
            (
                format!("{S3_SECRET_VAR}{suffix}"),
                s3.secret_access_key().to_string(),
            ),
        ]);
        s3_target(s3, name, &suffix).await
    }

    /// A `[[target]]` in a fresh directory; returns the TOML and the directory.
    pub fn file_target_toml(&self, name: &str) -> (String, PathBuf) {
        let dir = self.dir.path().join(format!("target-{name}"));
        (
            format!(
                "[[target]]\nname = \"{name}\"\nurl = \"file://{}\"\n",
                dir.display()
            ),
            dir,
        )
    }

    /// Writes a config file and returns its path.
    pub fn write_config(&self, body: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("pgferry-{}.toml", super::unique_name("cfg")));
        std::fs::write(&path, body).expect("write config");
        path
    }

    /// Runs pgferry with `config` and `args`; fails the test if any secret shows in the output.
    pub async fn pgferry(&self, config: &Path, args: &[&str]) -> Run {
        let run = pgferry_with_env(config, args, &self.env_vars()).await;
        assert_no_secret(&run.output(), &self.secrets());
        run
    }

    /// The environment that `${VAR}` in configs expands from.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            (
                PG_PASSWORD_VAR.into(),
                self.pg.superuser_password().to_string(),
            ),
            (S3_KEY_VAR.into(), self.s3.access_key_id().to_string()),
            (
                S3_SECRET_VAR.into(),
                self.s3.secret_access_key().to_string(),
            ),
        ]
        .into_iter()
        .chain(self.extra_vars.lock().unwrap().iter().cloned())
        .collect()
    }

    /// Starts `pgferry <args>` and returns once it logged `marker` on stderr (within 90 s),
    /// with a task that collects everything it logs.
    pub async fn start_until(
        &self,
        config: &Path,
        args: &[&str],
        marker: &'static str,
    ) -> (tokio::process::Child, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut child = self.command(config, args).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let log = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut seen = String::new();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(marker) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
            seen
        });
        tokio::time::timeout(Duration::from_secs(90), rx)
            .await
            .unwrap_or_else(|_| panic!("{marker:?} not logged within 90 s"))
            .expect("the process ended before logging the marker");
        (child, log)
    }

    /// A `pgferry` command set up with this environment's variables, for tests that need
    /// to drive the process themselves (signals, reading output as it comes).
    pub fn command(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
        cmd.arg("--config")
            .arg(config)
            .args(args)
            .envs(self.env_vars())
            .env("PGFERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

pub fn source_toml(pg: &PgCluster, name: &str) -> String {
    format!(
        "[[source]]\nname = \"{name}\"\nurl = \"postgres://{}:${{{PG_PASSWORD_VAR}}}@127.0.0.1:{}/postgres\"\n",
        PgCluster::SUPERUSER,
        pg.port()
    )
}

/// A source's retention that keeps only the newest snapshot.
pub const KEEP_NEWEST_ONLY: &str =
    "retention = { keep_last = 1, hourly = 0, daily = 0, weekly = 0, monthly = 0 }\n";

/// Key prefix of every S3 target the tests configure.
pub const S3_PREFIX: &str = "backups";

/// A `[[target]]` on a fresh bucket of `s3` whose credentials come from the variables
/// `S3_KEY_VAR + var_suffix` and `S3_SECRET_VAR + var_suffix`.
pub async fn s3_target(
    s3: &Garage,
    name: &str,
    var_suffix: &str,
) -> (String, Arc<dyn ObjectStore>) {
    let bucket = s3
        .unique_bucket(&format!("pgferry-{name}"))
        .await
        .expect("create bucket");
    let toml = format!(
        "[[target]]\nname = \"{name}\"\nurl = \"s3://{bucket}/backups\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"${{{S3_KEY_VAR}{var_suffix}}}\"\nsecret_access_key = \"${{{S3_SECRET_VAR}{var_suffix}}}\"\n",
        s3.endpoint(),
        s3.region()
    );
    (toml, s3_store(s3, &bucket))
}

/// The bucket of a `[[target]]` written by [`s3_target`].
pub fn bucket_of(target_toml: &str) -> String {
    target_toml
        .split("s3://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("an S3 target's TOML names its bucket")
        .to_string()
}

/// A client for one bucket of `s3`, rooted at [`S3_PREFIX`].
pub fn s3_store(s3: &Garage, bucket: &str) -> Arc<dyn ObjectStore> {
    let store = AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region(s3.region())
        .with_bucket_name(bucket)
        .with_access_key_id(s3.access_key_id())
        .with_secret_access_key(s3.secret_access_key())
        .build()
        .expect("S3 client");
    Arc::new(PrefixStore::new(store, S3_PREFIX))
}

/// A client for a file target's directory.
pub fn file_store(dir: &Path) -> Arc<dyn ObjectStore> {
    std::fs::create_dir_all(dir).expect("create target dir");
    Arc::new(LocalFileSystem::new_with_prefix(dir).expect("file store"))
}

/// Every key in a store but the folders' indexes, sorted.
pub async fn keys(store: &Arc<dyn ObjectStore>) -> Vec<String> {
    let mut keys: Vec<String> = store
        .list(None)
        .map(|m| m.expect("list").location.to_string())
        // The folders' derived indexes (`list` writes them, a cache of the manifests) are left
        // out: `fleet.rs` looks at them itself.
        .filter(|k| std::future::ready(!k.ends_with("/pgferry-index.json")))
        .collect()
        .await;
    keys.sort();
    keys
}

/// One object's bytes; `key` as a listing shows it (segments already percent-encoded, so odd
/// database names round-trip).
pub async fn get(store: &Arc<dyn ObjectStore>, key: &str) -> bytes::Bytes {
    let path = object_store::path::Path::parse(key).unwrap_or_else(|e| panic!("parse {key}: {e}"));
    store
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .bytes()
        .await
        .expect("read object")
}

/// The id of the first snapshot with a manifest in `folder` (`<source>/<database>`) of
/// `store`.
pub async fn first_snapshot_in(store: &Arc<dyn ObjectStore>, folder: &str) -> String {
    keys(store)
        .await
        .iter()
        .find_map(|k| {
            k.strip_prefix(&format!("{folder}/"))?
                .strip_suffix(".manifest.json")
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no committed snapshot in {folder}"))
}

/// Snapshot id `id` moved by `seconds`.
pub fn shift(id: &str, seconds: i64) -> String {
    let t = chrono::NaiveDateTime::parse_from_str(id, "%Y%m%dT%H%M%SZ")
        .unwrap()
        .and_utc()
        + chrono::TimeDelta::seconds(seconds);
    t.format("%Y%m%dT%H%M%SZ").to_string()
}

/// A copy of snapshot `id` of `prod/<db>` in `store` (its dump and manifest) as snapshot
/// `new`, its data read `hours` earlier.
pub async fn copy_snapshot(
    store: &Arc<dyn ObjectStore>,
    db: &str,
    id: &str,
    new: &str,
    hours: i64,
) {
    let put = |key: String, body: Vec<u8>| async move {
        store
            .put(
                &object_store::path::Path::from(key.as_str()),
                object_store::PutPayload::from(body),
            )
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    };
    let mut m = manifest_of(&get(store, &format!("prod/{db}/{id}.manifest.json")).await);
    let body = get(store, m["object_key"].as_str().unwrap()).await;
    let object = m["object_key"].as_str().unwrap().replace(id, new);
    put(object.clone(), body.to_vec()).await;
    let started = chrono::DateTime::parse_from_rfc3339(m["started_at"].as_str().unwrap()).unwrap()
        - chrono::TimeDelta::hours(hours);
    m["snapshot_id"] = new.into();
    m["object_key"] = object.into();
    m["started_at"] = started.to_rfc3339().into();
    m["finished_at"] = started.to_rfc3339().into();
    put(
        format!("prod/{db}/{new}.manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .await;
}

/// A manifest's JSON.
pub fn manifest_of(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("manifest is JSON")
}

/// Runs the binary to completion (at most 10 minutes).
pub async fn pgferry_with_env(config: &Path, args: &[&str], env: &[(String, String)]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), out)
        .await
        .expect("pgferry ran for more than 10 minutes")
        .expect("run pgferry");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[track_caller]
pub fn assert_no_secret(output: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            s.len() < 6 || !output.contains(s.as_str()),
            "a secret appeared in pgferry's output:\n{output}"
        );
    }
}

/// The key of the dump object that the manifest of `snapshot_id` names in `store`
/// (write-once keys: `<id>-<run>.dump.zst`).
pub async fn dump_key(store: &Arc<dyn ObjectStore>, snapshot_id: &str) -> String {
    let manifest = keys(store)
        .await
        .into_iter()
        .find(|k| k.ends_with(&format!("/{snapshot_id}.manifest.json")))
        .unwrap_or_else(|| panic!("no manifest of {snapshot_id}"));
    let m = manifest_of(&get(store, &manifest).await);
    m["object_key"].as_str().expect("object_key").to_string()
}

/// Every manifest in `store` names an object that exists with the manifest's size and
/// sha256: nothing committed is damaged. Returns the manifests' keys.
pub async fn assert_every_manifest_names_an_intact_object(
    store: &Arc<dyn ObjectStore>,
) -> Vec<String> {
    use sha2::Digest;
    let all = keys(store).await;
    let manifests: Vec<String> = all
        .iter()
        .filter(|k| k.ends_with(".manifest.json"))
        .cloned()
        .collect();
    for key in &manifests {
        let m = manifest_of(&get(store, key).await);
        let object = m["object_key"].as_str().expect("object_key");
        assert!(
            all.iter().any(|k| k == object),
            "{key} names {object}, which is gone: {all:?}"
        );
        let bytes = get(store, object).await;
        assert_eq!(
            bytes.len() as u64,
            m["stored_size"].as_u64().unwrap(),
            "{object}: size differs from {key}"
        );
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            m["sha256"].as_str().unwrap(),
            "{object}: sha256 differs from {key}"
        );
    }
    manifests
}

/// Overwrites the dump object of `snapshot_id` in `store` with bytes of the same length:
/// a silently corrupted copy.
pub async fn corrupt_dump(store: &Arc<dyn ObjectStore>, snapshot_id: &str) {
    let key = dump_key(store, snapshot_id).await;
    let mut bytes = get(store, &key).await.to_vec();
    let len = bytes.len();
    for b in bytes[len / 3..len / 3 + 64.min(len / 3)].iter_mut() {
        *b ^= 0x5a;
    }
    store
        .put(
            &object_store::path::Path::from(key.as_str()),
            object_store::PutPayload::from(bytes),
        )
        .await
        .expect("overwrite the object");
    assert_eq!(get(store, &key).await.len(), len);
}

/// Replaces snapshot `id`'s companion-files archive in `store` with `tar` (zstd), and its
/// manifest says the archive's true size, sha256 and `file_count`: a committed archive that
/// lies.
pub async fn plant_files_archive(
    store: &Arc<dyn ObjectStore>,
    id: &str,
    tar: &[u8],
    file_count: u64,
) {
    use sha2::Digest;
    let put = |key: String, bytes: Vec<u8>| async move {
        let path = object_store::path::Path::parse(&key).unwrap();
        store
            .put(&path, object_store::PutPayload::from(bytes))
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    };
    let stored = zstd::encode_all(tar, 3).unwrap();
    let manifest = keys(store)
        .await
        .into_iter()
        .find(|k| k.ends_with(&format!("/{id}.manifest.json")))
        .unwrap_or_else(|| panic!("no manifest of {id}"));
    let mut m = manifest_of(&get(store, &manifest).await);
    let archive = m["files"]["object_key"]
        .as_str()
        .unwrap_or_else(|| panic!("{id} has no files archive: {m}"))
        .to_string();
    put(archive, stored.clone()).await;
    m["files"]["sha256"] = hex::encode(sha2::Sha256::digest(&stored)).into();
    m["files"]["stored_size"] = (stored.len() as u64).into();
    m["files"]["raw_size"] = (tar.len() as u64).into();
    m["files"]["file_count"] = file_count.into();
    put(manifest, serde_json::to_vec(&m).unwrap()).await;
}

/// One snapshot as `pgferry list --json` and the API's listing print it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub database: String,
    pub snapshot_id: String,
    /// The targets holding it, in the listing's order.
    pub targets: Vec<String>,
}

impl Listed {
    /// (database, snapshot id).
    pub fn key(&self) -> (String, String) {
        (self.database.clone(), self.snapshot_id.clone())
    }
}

/// The snapshots of a listing's `snapshots` array, in its order.
#[track_caller]
pub fn listed_rows(snapshots: &serde_json::Value) -> Vec<Listed> {
    snapshots
        .as_array()
        .expect("an array of snapshots")
        .iter()
        .map(|s| {
            let m = &s["manifest"];
            Listed {
                database: m["database"].as_str().unwrap().to_string(),
                snapshot_id: m["snapshot_id"].as_str().unwrap().to_string(),
                targets: s["targets"]
                    .as_array()
                    .map(|t| t.iter().map(|t| t.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// What a successful `pgferry list --json` printed: the whole document and its snapshots.
#[track_caller]
pub fn list_json(run: &Run) -> (serde_json::Value, Vec<Listed>) {
    run.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("list --json is not JSON ({e}):\n{}", run.output()));
    let rows = listed_rows(&v["snapshots"]);
    (v, rows)
}
