//! Review 15: a hostile operator against the fleet-scale catalog (issue 15: derived indexes,
//! paginated API, memory budget) and the encryption merge (issue 17), with the real binary,
//! real PostgreSQL and real Garage servers.
//!
//! Written by a reviewer who had not seen the code's reasoning, against lead 45b0ead, where
//! `prune_never_deletes_an_age_file_without_a_run_id_beside_a_legacy_marker` failed: a stale
//! format ≤ 2 upload marker `<id>.upload.json` made prune delete `<id>.dump.zst.age`, a name
//! pgferry does not own (encrypted dumps always name their run); and
//! `an_index_entry_failing_the_size_check_never_hides_a_real_snapshot` failed: an index entry
//! with the manifest's real stamp but another `stored_size` made `list` (and the API and the
//! metrics) hide an intact snapshot as "damaged", since the object-size check ran after the
//! index lookup and a failure there did not read the manifest again. The others held.

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};

use crate::support::api_daemon::ApiDaemon;
use crate::support::env::{
    assert_every_manifest_names_an_intact_object, copy_snapshot, file_store, get, keys, list_json,
    listed_rows, manifest_of, shift, Listed, Run, TestEnv,
};
use crate::support::proxy::{Proxy, RequestClass};
use crate::support::restore_argv;

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: Vec<u8>) {
    store
        .put(&Key::from(key), PutPayload::from(body))
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

/// What `pgferry prune` prints a day from now (every orphan and marker past the grace).
async fn prune_a_day_later(env: &TestEnv, config: &std::path::Path) -> String {
    crate::retention::prune_later(
        config,
        &env.env_vars(),
        &pgferry::retention::prune::Selection::default(),
        Duration::from_secs(25 * 3600),
    )
    .await
}

/// An upload marker's body as pgferry writes it, naming `key`.
fn marker_body(key: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "format_version": 1,
        "upload_id": "not-a-real-upload",
        "key": key,
        "started_at": "2025-01-01T00:00:00Z",
        "host": "elsewhere",
        "pid": 1,
        "pgferry_version": "0.0.0",
    }))
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Issue 17 key shapes and prune. `<id>.dump.zst.age` (no run id) is not a shape pgferry
//    writes (parse_name refuses it), so nothing may delete it; a committed dump must survive
//    a same-run `.age` sibling and a stale marker of that run.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_never_deletes_an_age_file_without_a_run_id_beside_a_legacy_marker() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (file, dir) = env.file_target_toml("local");
    let store = file_store(&dir);
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{file}",
        env.source_toml("prod")
    ));
    env.pgferry(&config, &["backup"]).await.assert_code(0);
    // A format ≤ 2 marker left by a dead run, and an operator's file of a shape pgferry does
    // not own (an encrypted dump without a run id) beside it.
    let legacy = "prod/acme/20250101T000000Z";
    put(
        &store,
        &format!("{legacy}.upload.json"),
        marker_body(&format!("{legacy}.dump.zst")),
    )
    .await;
    let foreign = format!("{legacy}.dump.zst.age");
    put(&store, &foreign, b"an operator's encrypted export".to_vec()).await;

    let report = prune_a_day_later(&env, &config).await;
    let after = keys(&store).await;
    assert_every_manifest_names_an_intact_object(&store).await;
    assert!(
        !after.iter().any(|k| k == &format!("{legacy}.upload.json")),
        "the stale legacy marker should be cleaned: {after:?}\n{report}"
    );
    assert!(
        after.contains(&foreign),
        "prune deleted {foreign}, which is not pgferry's (no run id): {after:?}\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_plain_dump_survives_a_same_run_age_sibling_and_a_stale_marker() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (file, dir) = env.file_target_toml("local");
    let store = file_store(&dir);
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{file}",
        env.source_toml("prod")
    ));
    let id = env.pgferry(&config, &["backup"]).await.snapshot_id();
    let manifest_key = format!("prod/acme/{id}.manifest.json");
    let manifest = get(&store, &manifest_key).await;
    let object = manifest_of(&manifest)["object_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(object.ends_with(".dump.zst"), "{object}");
    let dump = get(&store, &object).await;
    let stem = object.strip_suffix(".dump.zst").unwrap();
    // The same attempt's name, encrypted (a second writer, or a copy), and the attempt's marker
    // left behind naming the encrypted one.
    let age = format!("{stem}.dump.zst.age");
    put(&store, &age, b"age-encryption.org/v1 not really".to_vec()).await;
    put(&store, &format!("{stem}.upload.json"), marker_body(&age)).await;

    let report = prune_a_day_later(&env, &config).await;
    let after = keys(&store).await;
    assert_eq!(
        get(&store, &manifest_key).await,
        manifest,
        "prune changed the manifest\n{report}"
    );
    assert_eq!(
        get(&store, &object).await,
        dump,
        "prune changed the committed dump\n{report}"
    );
    assert!(
        !after.contains(&format!("{stem}.upload.json")),
        "the stale marker stayed: {after:?}\n{report}"
    );
    assert!(
        !after.contains(&age),
        "the uncommitted `.age` sibling stayed: {after:?}\n{report}"
    );
    // `list` says exactly the one snapshot, on this target.
    let list = env.pgferry(&config, &["list", "--json"]).await;
    list.assert_code(0);
    assert!(list.stdout.contains(&id), "{}", list.stdout);
}

// ---------------------------------------------------------------------------------------------
// 2. The memory budget at its smallest with targets that die mid-way: one answering every part
//    with 500 (after the retries, the target is dropped) and one stalling mid-part. Neither may
//    hold the compressor (its parts hold budget permits) past `stall_timeout`: the healthy
//    target commits. A hang is a failure after 120 s, not a hung suite.

/// Calls `then` once `proxy` forwarded more than `bytes` upstream (polled).
fn after_bytes_up(proxy: Arc<Proxy>, bytes: u64, then: impl FnOnce(&Proxy) + Send + 'static) {
    tokio::spawn(async move {
        while proxy.bytes_up() <= bytes {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        then(&proxy);
    });
}

/// Size of database `big`'s one large object in the dying-targets tests.
const MIB: usize = 64;

/// Database `big` ([`MIB`] MiB of random bytes) and two targets that die once 12 MiB went up
/// through their proxies: "failing" answers every part with 500, "stalling" stalls.
struct Dying {
    fail_proxy: Arc<Proxy>,
    stall_proxy: Arc<Proxy>,
    failing_store: Arc<dyn ObjectStore>,
    stalling_store: Arc<dyn ObjectStore>,
    /// At the smallest memory budget: `healthy` (targets that stay up) first, then the two.
    config: std::path::PathBuf,
}

impl Dying {
    async fn start(env: &TestEnv, healthy: &str) -> Dying {
        env.pg.create_database("big").await.unwrap();
        env.random_large_object("big", MIB).await;
        let (failing, failing_store) = env.s3_target("failing").await;
        let (stalling, stalling_store) = env.s3_target("stalling").await;
        let fail_proxy = Arc::new(Proxy::start(&env.s3.endpoint()).await);
        let stall_proxy = Arc::new(Proxy::start(&env.s3.endpoint()).await);
        // Slow enough that the parts pile up behind them (and hold the budget) before they die.
        fail_proxy.throttle_up(8 << 20);
        stall_proxy.throttle_up(8 << 20);
        let config = env.write_config(&format!(
            "[pipeline]\nmemory_budget = \"48MiB\"\nstall_timeout = \"5s\"\n{}databases = [\"big\"]\n{healthy}{}{}",
            env.source_toml("prod"),
            fail_proxy.reroute(&failing),
            stall_proxy.reroute(&stalling),
        ));
        after_bytes_up(fail_proxy.clone(), 12 << 20, |p| {
            p.fail_requests(500, RequestClass::UploadPart, None)
        });
        after_bytes_up(stall_proxy.clone(), 12 << 20, |p| p.stall(true));
        Dying {
            fail_proxy,
            stall_proxy,
            failing_store,
            stalling_store,
            config,
        }
    }

    /// Runs the backup (hung for 120 s with `what`: a failure), then heals the proxies;
    /// returns the run and how long it took.
    async fn backup(&self, env: &TestEnv, what: &str) -> (Run, Duration) {
        let started = Instant::now();
        let run = tokio::time::timeout(
            Duration::from_secs(120),
            env.pgferry(&self.config, &["backup"]),
        )
        .await
        .unwrap_or_else(|_| panic!("the backup hung for 120 s with {what} at the smallest budget"));
        let took = started.elapsed();
        self.fail_proxy.stop_failing();
        self.stall_proxy.stall(false);
        (run, took)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_dying_midway_at_the_smallest_budget_never_hang_the_backup() {
    let env = TestEnv::start().await;
    let (good, good_store) = env.s3_target("good").await;
    let dying = Dying::start(&env, &good).await;
    let (run, took) = dying.backup(&env, "two dying targets").await;
    assert!(
        dying.fail_proxy.served(500) > 0,
        "the failure never triggered\n{}",
        run.output()
    );
    run.assert_code(0);
    assert!(
        run.stdout.contains("failing") && run.stdout.contains("stalling"),
        "the run did not say which targets it lost:\n{}",
        run.output()
    );
    let manifests = assert_every_manifest_names_an_intact_object(&good_store).await;
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    let m = manifest_of(&get(&good_store, &manifests[0]).await);
    assert_eq!(m["targets"], serde_json::json!(["good"]), "{m}");
    assert!(
        m["stored_size"].as_u64().unwrap() >= (MIB as u64) << 20,
        "{m}"
    );
    eprintln!("two targets died mid-way at a 48 MiB budget: the backup took {took:?}");
}

// ---------------------------------------------------------------------------------------------
// 3. Hostile database names: one named like the index, one with `/`, `..`, a literal `%2F`,
//    spaces and unicode. Each is its own folder: backed up, listed (through the manifests, then
//    through the indexes list wrote) once each, and the index of one is never another's.

/// (database, snapshot id) of what `pgferry list --json` printed; no row twice.
fn listed(run: &Run) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = list_json(run).1.iter().map(Listed::key).collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_database_names_are_each_their_own_folder_through_the_index() {
    let env = TestEnv::start().await;
    let names = [
        "pgferry-index.json",
        "a/b",
        "..",
        "%2F",
        "spaces and ünïcode",
    ];
    for n in names {
        env.small_database(n).await;
    }
    let (target, store) = env.s3_target("s3").await;
    let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    let config = env.write_config(&format!(
        "{}databases = [{}]\n{target}",
        env.source_toml("prod"),
        list.join(", ")
    ));
    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(0);
    assert_every_manifest_names_an_intact_object(&store).await;
    let first = env.pgferry(&config, &["list", "--json"]).await;
    let rows = listed(&first);
    let mut dbs: Vec<String> = rows.iter().map(|(d, _)| d.clone()).collect();
    dbs.dedup();
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    assert_eq!(dbs, want, "{}", first.output());
    // Every key, indexes included (`keys` leaves them out).
    let all: Vec<String> = futures::StreamExt::collect::<Vec<_>>(store.list(None))
        .await
        .into_iter()
        .map(|m| m.expect("list").location.to_string())
        .collect();
    let indexes: Vec<&String> = all
        .iter()
        .filter(|k| k.ends_with("/pgferry-index.json"))
        .collect();
    assert_eq!(indexes.len(), names.len(), "{all:?}\n{}", first.output());
    // Through the indexes now: the same rows, no warning.
    let second = env.pgferry(&config, &["list", "--json"]).await;
    assert_eq!(listed(&second), rows, "{}", second.output());
    assert!(!second.stderr.contains("warning"), "{}", second.output());
    // One database at a time, by its name.
    for n in names {
        let one = env
            .pgferry(&config, &["list", "--json", "--database", n])
            .await;
        let got = listed(&one);
        assert_eq!(got.len(), 1, "{n:?}: {}", one.output());
        assert_eq!(got[0].0, n);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A stale or crafted index entry with the manifest's real stamp but a body that fails a
//    check the listing makes after the index lookup (the object's size): the module doc says
//    "an entry that fails one is read again from the manifest". It must never hide a real,
//    intact snapshot from `list` (nor from the metrics and the API, which read the same way).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_entry_failing_the_size_check_never_hides_a_real_snapshot() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (target, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\n{target}",
        env.source_toml("prod")
    ));
    let id = env.pgferry(&config, &["backup"]).await.snapshot_id();
    let want = listed(&env.pgferry(&config, &["list", "--json"]).await);
    assert_eq!(want, vec![("acme".to_string(), id.clone())]);
    let index_key = "prod/acme/pgferry-index.json";
    let mut index: serde_json::Value =
        serde_json::from_slice(&get(&store, index_key).await).unwrap();
    let entry = &mut index["manifests"][0]["manifest"];
    assert_eq!(entry["snapshot_id"], serde_json::json!(id));
    let size = entry["stored_size"].as_u64().unwrap();
    entry["stored_size"] = (size + 1).into();
    put(&store, index_key, serde_json::to_vec(&index).unwrap()).await;

    let list = env.pgferry(&config, &["list", "--json"]).await;
    assert_eq!(
        listed(&list),
        want,
        "a wrong index entry hid a real snapshot:\n{}",
        list.output()
    );
    assert!(!list.stderr.contains("ignoring"), "{}", list.output());
    let m = &serde_json::from_str::<serde_json::Value>(&list.stdout).unwrap()["snapshots"][0];
    assert_eq!(m["manifest"]["stored_size"], serde_json::json!(size), "{m}");
    // And the index was rewritten from the manifest.
    let rewritten: serde_json::Value =
        serde_json::from_slice(&get(&store, index_key).await).unwrap();
    assert_eq!(
        rewritten["manifests"][0]["manifest"]["stored_size"],
        serde_json::json!(size)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. A read-only credential for `list` (the index cannot be written: listing still answers,
//    quietly), and `list`s racing a backup that writes the same folders: whatever order the
//    index writes land in, the final listing says exactly what the manifests say.

/// A key allowed only to read `bucket`: (access key id, secret).
async fn read_only_key(s3: &crate::support::garage::Garage, bucket: &str) -> (String, String) {
    let name = crate::support::unique_name("ro");
    let out = s3.cli(&["key", "create", &name]).await.unwrap();
    let field = |label: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {label:?} in:\n{out}"))
    };
    let (id, secret) = (field("Key ID:"), field("Secret key:"));
    s3.cli(&["bucket", "allow", "--read", bucket, "--key", &id])
        .await
        .unwrap();
    (id, secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_with_a_read_only_credential_and_lists_racing_a_backup() {
    let env = TestEnv::start().await;
    for db in ["acme", "globex", "initech"] {
        env.small_database(db).await;
    }
    let (target, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\", \"globex\", \"initech\"]\n{target}",
        env.source_toml("prod")
    ));
    // Lists racing the backup (and each other) over the same folders.
    let backup = env.pgferry(&config, &["backup"]);
    let lists =
        futures::future::join_all((0..4).map(|_| env.pgferry(&config, &["list", "--json"])));
    let (backup, lists) = tokio::join!(backup, lists);
    backup.assert_code(0);
    for l in &lists {
        listed(l);
    }
    let manifests = manifest_rows(&store).await;
    assert_eq!(manifests.len(), 3, "{manifests:?}");
    for _ in 0..2 {
        let l = env.pgferry(&config, &["list", "--json"]).await;
        assert_eq!(listed(&l), manifests, "{}", l.output());
        assert!(!l.stderr.contains("warning"), "{}", l.output());
    }

    // The same target through a key that can only read: no index write succeeds.
    let bucket = crate::support::env::bucket_of(&target);
    let (id, secret) = read_only_key(&env.s3, &bucket).await;
    env.add_secret_var("PGFERRY_REVIEW15_RO_KEY", &id);
    env.add_secret_var("PGFERRY_REVIEW15_RO_SECRET", &secret);
    let ro_target = target
        .lines()
        .map(|l| {
            if l.starts_with("access_key_id") {
                "access_key_id = \"${PGFERRY_REVIEW15_RO_KEY}\"".to_string()
            } else if l.starts_with("secret_access_key") {
                "secret_access_key = \"${PGFERRY_REVIEW15_RO_SECRET}\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let ro_config = env.write_config(&format!(
        "{}databases = [\"acme\", \"globex\", \"initech\"]\n{ro_target}\n",
        env.source_toml("prod")
    ));
    // Indexes made stale: a new snapshot of acme written by the read-write key.
    let rw = env
        .pgferry(&config, &["backup", "--force", "--database", "acme"])
        .await;
    rw.assert_code(0);
    let want = manifest_rows(&store).await;
    assert!(
        want.contains(&("acme".to_string(), rw.snapshot_id())),
        "{want:?}"
    );
    // A listing through the read-write key would rewrite acme's index: compare its version.
    let index_before = get(&store, "prod/acme/pgferry-index.json").await;
    for _ in 0..2 {
        let l = env.pgferry(&ro_config, &["list", "--json"]).await;
        assert_eq!(listed(&l), want, "{}", l.output());
        assert!(!l.stderr.contains("warning"), "{}", l.output());
    }
    assert_eq!(
        get(&store, "prod/acme/pgferry-index.json").await,
        index_before,
        "the read-only key wrote an index?"
    );
}

/// (database, snapshot id) of every manifest in `store`, sorted.
async fn manifest_rows(store: &Arc<dyn ObjectStore>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = keys(store)
        .await
        .iter()
        .filter_map(|k| {
            let parts: Vec<&str> = k.split('/').collect();
            let id = parts.get(2)?.strip_suffix(".manifest.json")?;
            Some((parts[1].to_string(), id.to_string()))
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// 6. The paginated API under a hostile client: snapshots pruned (the very one a cursor points
//    after, and others) and added between pages, a cursor of another filter or past the end,
//    and the read token offered to the mutating endpoint.

impl ApiDaemon {
    /// One page: its (database, id) rows in order, and its next cursor.
    async fn page(&self, query: &str, token: &str) -> (Vec<(String, String)>, Option<String>) {
        let (code, body) = self
            .request("GET", &format!("/api/v1/snapshots?{query}"), Some(token))
            .await;
        assert_eq!(code, 200, "{query}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("a page is JSON");
        let rows = listed_rows(&v["snapshots"])
            .iter()
            .map(Listed::key)
            .collect();
        (rows, v["next_cursor"].as_str().map(str::to_string))
    }
}

async fn delete_snapshot(store: &Arc<dyn ObjectStore>, db: &str, id: &str) {
    store
        .delete(&Key::from(format!("prod/{db}/{id}.manifest.json").as_str()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_walk_survives_prunes_and_tampered_cursors() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    env.small_database("globex").await;
    let (s3, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\", \"globex\"]\n{s3}",
        env.source_toml("prod"),
    ));
    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(0);
    let id = run.snapshot_id();
    for db in ["acme", "globex"] {
        for h in 1..=4 {
            copy_snapshot(&store, db, &id, &shift(&id, -3600 * h), h).await;
        }
    }
    let port = crate::support::free_port();
    let dir = env.dir.path();
    std::fs::write(dir.join("read-token"), "r3ad\n").unwrap();
    std::fs::write(dir.join("api-token"), "wr1te\n").unwrap();
    let config = env.write_config(&format!(
        "[daemon]\nlisten = \"127.0.0.1:{port}\"\napi_token_file = \"{}\"\nread_token_file = \"{}\"\n{}databases = [\"zz_none_*\"]\n{s3}",
        dir.join("api-token").display(),
        dir.join("read-token").display(),
        env.source_toml("prod"),
    ));
    let d = ApiDaemon::start(&env, &config, port).await;

    // The read token never starts a backup.
    let (code, body) = d.request("POST", "/api/v1/backups", Some("r3ad")).await;
    assert_eq!(code, 401, "the read token was accepted for a write: {body}");

    // A walk at 2 a page; between pages, the snapshot the cursor points after is pruned, and
    // so is one not yet sent, and an older one is added.
    let at_start = manifest_rows(&store).await;
    assert_eq!(at_start.len(), 10);
    let mut seen: Vec<(String, String)> = Vec::new();
    let (rows, mut cursor) = d.page("limit=2", "r3ad").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    seen.extend(rows.clone());
    let anchor = rows.last().unwrap().clone();
    delete_snapshot(&store, &anchor.0, &anchor.1).await;
    let pruned_unsent = (anchor.0.clone(), shift(&id, -3600 * 4));
    delete_snapshot(&store, &pruned_unsent.0, &pruned_unsent.1).await;
    copy_snapshot(&store, &anchor.0, &id, &shift(&id, -3600 * 9), 9).await;
    let mut pages = 1;
    while let Some(c) = cursor.take() {
        let (rows, next) = d.page(&format!("limit=2&cursor={c}"), "r3ad").await;
        seen.extend(rows);
        cursor = next;
        pages += 1;
        assert!(pages < 20, "the walk does not end: {seen:?}");
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "a snapshot came twice: {seen:?}");
    let at_end = manifest_rows(&store).await;
    for s in at_start.iter().filter(|s| at_end.contains(s)) {
        assert!(
            seen.contains(s),
            "{s:?} existed all along, never sent: {seen:?}"
        );
    }
    assert!(
        !seen.contains(&pruned_unsent),
        "a snapshot pruned before its page was sent: {seen:?}"
    );

    // Tampered cursors: one of another filter, one past the end. Never an error page, never a
    // snapshot of another database than asked.
    let (rows, c) = d.page("database=acme&limit=1", "r3ad").await;
    assert_eq!(rows.len(), 1);
    let acme_cursor = c.expect("acme has more than one snapshot");
    let (rows, _) = d
        .page(
            &format!("database=globex&limit=100&cursor={acme_cursor}"),
            "r3ad",
        )
        .await;
    assert!(rows.iter().all(|(db, _)| db == "globex"), "{rows:?}");
    let past = hex::encode(
        serde_json::to_vec(&serde_json::json!({"folder": "prod/zzzz", "after": null})).unwrap(),
    );
    let (rows, next) = d.page(&format!("limit=5&cursor={past}"), "r3ad").await;
    assert!(rows.is_empty() && next.is_none(), "{rows:?} {next:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. Issue 17: manifests lying about encryption, on every target (someone who can write the
//    buckets): one claiming age for a plain object, one claiming none for an `.age` object.
//    Restore must fail on every copy and leave staging as it was, with no leftover database.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_lying_about_encryption_never_touches_staging() {
    use age::secrecy::ExposeSecret;
    let w = crate::restore::World::start("", &[], "").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let identity = age::x25519::Identity::generate();
    let secret = identity.to_string().expose_secret().to_string();
    let recipient = identity.to_public().to_string();
    w.env.add_secret_var("PGFERRY_REVIEW15_UNUSED_AGE", &secret);
    let key_file = keys_dir.path().join("k.txt");
    std::fs::write(&key_file, format!("{secret}\n")).unwrap();
    let base = std::fs::read_to_string(&w.config).unwrap();
    let enc = w.env.write_config(&format!(
        "{base}\n[encryption]\nrecipients = [{recipient:?}]\nidentity_file = {:?}\n",
        key_file.display().to_string()
    ));
    let restore = |config: std::path::PathBuf| {
        let w = &w;
        async move {
            w.pgferry_with(&config, &restore_argv("acme", "staging-acme", &[]))
                .await
        }
    };
    let manifest_key = |id: &str| format!("prod/acme/{id}.manifest.json");

    // A plain snapshot, restored once for real (staging has it: what must not change).
    let plain = w.backup().await;
    restore(enc.clone()).await.assert_code(0);
    let before = w.staging.table_fingerprints("acme").await.unwrap();
    let originals: Vec<bytes::Bytes> = {
        let mut v = Vec::new();
        for s in &w.stores {
            v.push(get(s, &manifest_key(&plain)).await);
        }
        v
    };
    let mut lie = manifest_of(&originals[0]);
    assert!(lie["object_key"].as_str().unwrap().ends_with(".dump.zst"));
    lie["encryption"] = serde_json::json!({"algorithm": "age", "recipients": [recipient]});
    for s in &w.stores {
        put(
            s,
            &manifest_key(&plain),
            serde_json::to_vec_pretty(&lie).unwrap(),
        )
        .await;
    }
    let run = restore(enc.clone()).await;
    assert_ne!(
        run.code,
        0,
        "a plain object restored as encrypted?\n{}",
        run.output()
    );
    eprintln!("claimed encrypted, plain object: {}", run.stderr.trim_end());
    assert_eq!(w.staging.table_fingerprints("acme").await.unwrap(), before);
    w.assert_no_leftovers().await;
    for (s, original) in w.stores.iter().zip(&originals) {
        put(s, &manifest_key(&plain), original.to_vec()).await;
    }

    // An encrypted snapshot (newer: the one restore picks) whose manifests say it is not.
    crate::support::next_second().await;
    let sealed = w
        .pgferry_with(&enc, &["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    let mut lie = manifest_of(&get(&w.stores[0], &manifest_key(&sealed)).await);
    assert!(
        lie["object_key"]
            .as_str()
            .unwrap()
            .ends_with(".dump.zst.age"),
        "{lie}"
    );
    lie.as_object_mut().unwrap().remove("encryption");
    for s in &w.stores {
        put(
            s,
            &manifest_key(&sealed),
            serde_json::to_vec_pretty(&lie).unwrap(),
        )
        .await;
    }
    for config in [w.config.clone(), enc.clone()] {
        let run = restore(config).await;
        assert_ne!(
            run.code,
            0,
            "an `.age` object restored as plain?\n{}",
            run.output()
        );
        eprintln!("claimed plain, .age object: {}", run.stderr.trim_end());
        assert_eq!(w.staging.table_fingerprints("acme").await.unwrap(), before);
        w.assert_no_leftovers().await;
    }
}

/// Every target dying mid-way at the smallest budget: the backup fails (it does not hang on
/// the permits of parts queued for dead targets) and commits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_dying_midway_at_the_smallest_budget_fails_promptly() {
    let env = TestEnv::start().await;
    let dying = Dying::start(&env, "").await;
    let (run, took) = dying.backup(&env, "every target dead").await;
    assert!(dying.fail_proxy.served(500) > 0, "{}", run.output());
    assert_ne!(run.code, 0, "{}", run.output());
    for store in [&dying.failing_store, &dying.stalling_store] {
        let all = keys(store).await;
        assert!(
            !all.iter().any(|k| k.ends_with(".manifest.json")),
            "{all:?}"
        );
    }
    eprintln!("every target died mid-way at a 48 MiB budget: failed after {took:?}");
}
