//! What pgferry owns and when a snapshot's data was read, against real PostgreSQL and Garage
//! servers: another deployment under a nested prefix, misplaced manifests and objects pgferry
//! did not write never cost a real snapshot; `--at`, "latest" and retention go by the time the
//! data was read, not the id; one dead source does not stop the others; database selection
//! says what it skips and refuses typos.

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};

use crate::support::env::{self, get, keys, manifest_of, shift, Run, TestEnv, KEEP_NEWEST_ONLY};

/// How long a test waits for the clock to pass a second boundary (ids are whole seconds).
const CLOCK_DEADLINE: Duration = Duration::from_secs(10);

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: Vec<u8>) {
    store
        .put(&Key::from(key), PutPayload::from(body))
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

/// Waits (polling the clock) until the wall clock has left `id`'s second and `after` more has
/// passed, so that the next manual snapshot gets a later id and a later start.
async fn wait_past(id: &str, after: Duration) {
    let t = chrono::NaiveDateTime::parse_from_str(id, "%Y%m%dT%H%M%SZ")
        .unwrap()
        .and_utc()
        + chrono::TimeDelta::seconds(1)
        + chrono::TimeDelta::from_std(after).unwrap();
    let deadline = std::time::Instant::now() + CLOCK_DEADLINE;
    while chrono::Utc::now() <= t {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stands still"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Re-labels snapshot `from` of `folder` (under `store`'s root) as slot `to`, keeping its
/// data and its `started_at`: what a slot the daemon caught up late looks like (its id the
/// slot's start, its data read later). The dump moves to the key shape the manifest used.
async fn relabel(store: &Arc<dyn ObjectStore>, folder: &str, from: &str, to: &str) {
    let manifest_key = format!("{folder}/{from}.manifest.json");
    let mut m = manifest_of(&get(store, &manifest_key).await);
    let object = m["object_key"].as_str().unwrap().to_string();
    let new_object = object.replace(from, to);
    // The manifest's object_key is relative to the target's prefix, the store is rooted at it.
    let dump = get(store, &object).await;
    put(store, &new_object, dump.to_vec()).await;
    m["snapshot_id"] = to.into();
    m["object_key"] = new_object.into();
    put(
        store,
        &format!("{folder}/{to}.manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .await;
    for k in [manifest_key, object] {
        store.delete(&Key::from(k.as_str())).await.unwrap();
    }
}

fn committed_ids(run: &Run) -> Vec<String> {
    run.assert_code(0);
    run.stdout
        .lines()
        .filter(|l| l.contains(" committed: "))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect()
}

/// The (snapshot, database, targets) rows `pgferry list --json` printed, newest data first.
fn listed(run: &Run) -> Vec<(String, String, String)> {
    env::list_json(run)
        .1
        .into_iter()
        .map(|l| (l.snapshot_id, l.database, l.targets.join(",")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_prefixes_and_misplaced_manifests_never_cost_a_real_snapshot() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    env.small_database("globex").await;
    // Deployment A at s3://bkt/nest, deployment B at s3://bkt/nest/eu: same bucket, same names.
    let (toml, _) = env.s3_target("s3t").await;
    let bucket = crate::support::env::bucket_of(&toml);
    let root: Arc<dyn ObjectStore> = Arc::new(env.s3.object_store(&bucket).unwrap());
    let policy = "retention = { keep_last = 2, hourly = 0, daily = 0, weekly = 0, monthly = 0 }\n";
    let source = format!(
        "{}databases = [\"acme\", \"globex\"]\n{policy}",
        env.source_toml("prod")
    );
    let a = env.write_config(&format!(
        "{source}{}",
        toml.replace("/backups\"", "/nest\"")
    ));
    let b = env.write_config(&format!(
        "{source}{}",
        toml.replace("/backups\"", "/nest/eu\"")
    ));
    let mut ours = Vec::new();
    for _ in 0..2 {
        let ids = committed_ids(&env.pgferry(&a, &["backup", "--force"]).await);
        assert_eq!(ids.len(), 2);
        wait_past(&ids[0], Duration::ZERO).await;
        ours.push(ids[0].clone());
    }
    for _ in 0..2 {
        let ids = committed_ids(&env.pgferry(&b, &["backup", "--force"]).await);
        wait_past(&ids[0], Duration::ZERO).await;
    }
    // A manifest in acme's folder whose body says globex, newer than everything; a copy of a
    // real manifest in a subfolder.
    let newest = shift(&ours[1], 3600);
    let mut stray = manifest_of(
        &get(
            &root,
            &format!("nest/prod/globex/{}.manifest.json", ours[1]),
        )
        .await,
    );
    stray["snapshot_id"] = newest.clone().into();
    let stray_key = format!("nest/prod/acme/{newest}.manifest.json");
    put(&root, &stray_key, serde_json::to_vec(&stray).unwrap()).await;
    let copy = get(&root, &format!("nest/prod/acme/{}.manifest.json", ours[0])).await;
    put(
        &root,
        &format!("nest/prod/acme/old/{}.manifest.json", ours[0]),
        copy.to_vec(),
    )
    .await;
    let before = keys(&root).await;

    let list = env.pgferry(&a, &["list", "--json"]).await;
    let mut want = Vec::new();
    for id in &ours {
        for db in ["acme", "globex"] {
            want.push((id.clone(), db.to_string(), "s3t".to_string()));
        }
    }
    let mut got = listed(&list);
    got.sort();
    assert_eq!(got, want, "{}", list.stdout);
    assert!(list.stderr.contains(&stray_key), "{}", list.stderr);

    let prune = env.pgferry(&a, &["prune"]).await;
    prune.assert_code(0);
    assert!(
        prune.stdout.contains("deleted 0 snapshot(s)"),
        "{}",
        prune.stdout
    );
    assert_eq!(
        keys(&root).await,
        before,
        "nothing of A's or B's was deleted"
    );
    let list = env.pgferry(&b, &["list", "--json"]).await;
    assert_eq!(listed(&list).len(), 4, "{}", list.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_leaves_alone_what_pgferry_did_not_write() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    env.small_database("globex").await;
    let (s3, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\", \"globex\"]\n{s3}",
        env.source_toml("prod")
    ));
    committed_ids(&env.pgferry(&config, &["backup"]).await);
    let foreign = [
        "otherteam/db1/x.dump.zst",
        "otherteam/db1/20260101T000000Z.dump.zst",
        "prod/globex/manual-copy.dump.zst",
        "backup-by-hand.dump.zst",
        "prod/acme/deeper/20260101T000000Z.dump.zst",
        // pgferry's shape, but in globex's folder: not selected by `--database acme`.
        "prod/globex/20260101T000000Z-0123456789ab.dump.zst",
    ];
    for k in foreign {
        put(&store, k, b"not pgferry's".to_vec()).await;
    }
    let before = keys(&store).await;
    // A day and a minute later, so that the orphan grace (24 h) has passed for everything.
    let later = pgferry::retention::DEFAULT_ORPHAN_GRACE + Duration::from_secs(60);
    let acme = pgferry::retention::prune::Selection {
        source: None,
        database: Some("acme".into()),
    };
    let out = crate::retention::prune_later(&config, &env.env_vars(), &acme, later).await;
    assert_eq!(keys(&store).await, before, "{out}");
    assert!(
        out.contains("deleted 0 snapshot(s) and 0 orphan dump(s)"),
        "{out}"
    );
    // A real orphan of acme goes; everything else stays.
    let orphan = "prod/acme/20260101T000000Z-0123456789ab.dump.zst";
    put(&store, orphan, b"left by a crash".to_vec()).await;
    let out = crate::retention::prune_later(&config, &env.env_vars(), &acme, later).await;
    assert_eq!(keys(&store).await, before, "{out}");
    assert!(
        out.contains("deleted 0 snapshot(s) and 1 orphan dump(s)"),
        "{out}"
    );

    // A grace shorter than a backup would let prune abort uploads in progress.
    let r = env
        .pgferry(
            &env.write_config(&format!(
                "{}[pipeline]\norphan_grace = \"0s\"\n{s3}",
                env.source_toml("prod")
            )),
            &["config", "check"],
        )
        .await;
    r.assert_code(2);
    assert!(r.stderr.contains("pipeline.orphan_grace"), "{}", r.stderr);
}

/// A production database whose contents change between two snapshots, so that a restore
/// shows which one it loaded: `n` rows in table `t`.
async fn rows(pg: &crate::support::postgres::PgCluster, db: &str) -> i64 {
    let c = pg.client(db).await.unwrap();
    c.query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_between_a_slot_start_and_its_late_dump_picks_the_previous_snapshot() {
    let w = crate::restore::World::start(
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10) g;",
        &[],
        "",
    )
    .await;
    let previous = w
        .pgferry(&["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    w.env
        .pg
        .execute("acme", "INSERT INTO t SELECT generate_series(11, 15)")
        .await
        .unwrap();
    wait_past(&previous, Duration::from_secs(3)).await;
    let late = w
        .pgferry(&["backup", "--source", "prod", "--force"])
        .await
        .snapshot_id();
    // The later dump becomes the slot starting one second after `previous`: its id is earlier
    // than its data.
    let slot = shift(&previous, 1);
    for s in &w.stores {
        relabel(s, "prod/acme", &late, &slot).await;
    }
    // At the slot's start, or later once the previous snapshot's data was read (its read
    // time trails its id by pg_dump's start), and before the slot's data was read.
    let read_at = |id: &str| {
        let store = w.stores[0].clone();
        let key = format!("prod/acme/{id}.manifest.json");
        async move {
            let m = manifest_of(&get(&store, &key).await);
            chrono::DateTime::parse_from_rfc3339(m["started_at"].as_str().unwrap())
                .unwrap()
                .with_timezone(&chrono::Utc)
        }
    };
    let slot_time = chrono::NaiveDateTime::parse_from_str(&slot, "%Y%m%dT%H%M%SZ")
        .unwrap()
        .and_utc();
    let at_time = slot_time.max(read_at(&previous).await);
    assert!(
        at_time < read_at(&slot).await,
        "the slot's data is read later"
    );
    let at = at_time.to_rfc3339();
    let run = w.restore(&["--at", &at]).await;
    run.assert_code(0);
    assert!(
        run.stdout
            .contains(&format!("prod/acme {previous} restored")),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains(&format!("snapshot {previous} (data read at")),
        "{}",
        run.stderr
    );
    assert_eq!(rows(&w.staging, "acme").await, 10);
    // "latest" is the snapshot whose data was read last: the slot.
    let run = w.restore(&[]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!("prod/acme {slot} restored")),
        "{}",
        run.stdout
    );
    assert_eq!(rows(&w.staging, "acme").await, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_with_interleaved_manual_snapshots_keeps_the_newest_data() {
    let env = TestEnv::start().await;
    let (config, store) = env
        .small_databases_on_s3(&["acme"], KEEP_NEWEST_ONLY, "")
        .await;
    let manual = committed_ids(&env.pgferry(&config, &["backup", "--force"]).await).remove(0);
    wait_past(&manual, Duration::ZERO).await;
    let late = committed_ids(&env.pgferry(&config, &["backup", "--force"]).await).remove(0);
    // The newer data becomes a slot that started before the manual snapshot (07:00 caught up
    // at 07:39, beside a manual one of 07:18).
    let slot = shift(&manual, -60);
    relabel(&store, "prod/acme", &late, &slot).await;

    let run = env.pgferry(&config, &["prune"]).await;
    run.assert_code(0);
    assert!(
        run.stdout
            .contains(&format!("keep    {slot}  newest, keep_last")),
        "{}",
        run.stdout
    );
    let left = keys(&store).await;
    assert!(
        left.contains(&format!("prod/acme/{slot}.manifest.json")),
        "{left:?}"
    );
    assert!(
        !left.iter().any(|k| k.contains(&manual)),
        "the older data goes: {left:?}"
    );
    let list = env.pgferry(&config, &["list", "--json"]).await;
    assert_eq!(listed(&list)[0].0, slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_source_does_not_stop_the_others() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (s3, store) = env.s3_target("s3").await;
    // Nothing listens on the dead source's port.
    let dead = format!(
        "[[source]]\nname = \"dead\"\nurl = \"postgres://pgferry@127.0.0.1:{}/postgres\"\n",
        crate::support::free_port()
    );
    let config = env.write_config(&format!(
        "{dead}{}databases = [\"acme\"]\n{s3}",
        env.source_toml("prod")
    ));
    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(1);
    assert!(run.stdout.contains("prod/acme "), "{}", run.stdout);
    assert!(run.stdout.contains(" committed: "), "{}", run.stdout);
    assert!(
        run.stderr.contains("could not reach source(s) dead"),
        "{}",
        run.stderr
    );
    assert!(
        keys(&store)
            .await
            .iter()
            .any(|k| k.starts_with("prod/acme/") && k.ends_with(".manifest.json")),
        "prod/acme committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_selection_names_what_it_skips_and_refuses_typos() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    env.small_database("globex").await;
    env.pg.create_database("archive").await.unwrap();
    env.pg
        .execute(
            "postgres",
            "ALTER DATABASE archive WITH ALLOW_CONNECTIONS false",
        )
        .await
        .unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!("{}{s3}", env.source_toml("prod")));

    for args in [
        &["backup", "--database", "globex", "--database", "nosuch"][..],
        &["backup", "--source", "prod", "--database", "nosuch"][..],
        &["backup", "--database", "template1"][..],
        &["backup", "--database", "archive"][..],
        &["list", "--source", "nosuch"][..],
    ] {
        let run = env.pgferry(&config, args).await;
        run.assert_code(2);
        assert!(keys(&store).await.is_empty(), "{args:?} dumped something");
        let name = args.last().unwrap();
        assert!(run.stderr.contains(name), "{args:?}: {}", run.stderr);
    }

    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(0);
    assert!(
        run.stderr
            .contains("skipped prod/archive: it does not allow connections"),
        "{}",
        run.stderr
    );
    let committed: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains(" committed: "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let mut committed = committed;
    committed.sort();
    assert_eq!(
        committed,
        vec!["prod/acme", "prod/globex"],
        "{}",
        run.stdout
    );
}
