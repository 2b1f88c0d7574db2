//! A fleet's catalog against real PostgreSQL and Garage servers: the snapshot API walks every
//! snapshot exactly once page by page; the folders' derived indexes follow manifests deleted
//! or added behind pgferry's back, and a garbage or crafted index never wins over the
//! manifests; prune and repair never touch an index nor take it for a snapshot; the read
//! endpoints need `daemon.read_token_file`'s token when it is set.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};

use crate::support::api_daemon::ApiDaemon;
use crate::support::env::{
    copy_snapshot, get, keys, list_json, listed_rows, manifest_of, shift, Listed, Run, TestEnv,
};
use crate::support::free_port;

const INDEX: &str = "pgferry-index.json";

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: Vec<u8>) {
    store
        .put(&Key::from(key), PutPayload::from(body))
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

/// Copies snapshot `id` of `db` (dump and manifest) to `count` older slots, an hour apart,
/// with their data read an hour earlier each: what a fleet's history looks like, without
/// waiting for it. Returns the new ids.
async fn older_copies(store: &Arc<dyn ObjectStore>, db: &str, id: &str, count: i64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 1..=count {
        let new = shift(id, -3600 * i);
        copy_snapshot(store, db, id, &new, i).await;
        ids.push(new);
    }
    ids
}

/// (database, snapshot id) of every manifest in `store`.
async fn manifests(store: &Arc<dyn ObjectStore>) -> BTreeSet<(String, String)> {
    keys(store)
        .await
        .iter()
        .filter_map(|k| {
            let parts: Vec<&str> = k.split('/').collect();
            let id = parts.get(2)?.strip_suffix(".manifest.json")?;
            Some((parts[1].to_string(), id.to_string()))
        })
        .collect()
}

/// (database, snapshot id) of what `pgferry list --json` printed; no row twice.
fn listed(run: &Run) -> BTreeSet<(String, String)> {
    rows(&list_json(run).0["snapshots"])
}

fn rows(snapshots: &serde_json::Value) -> BTreeSet<(String, String)> {
    let all: Vec<(String, String)> = listed_rows(snapshots).iter().map(Listed::key).collect();
    let set: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(set.len(), all.len(), "a snapshot listed twice: {all:?}");
    set
}

/// A database folder's index as stored, if any.
async fn index(store: &Arc<dyn ObjectStore>, db: &str) -> Option<serde_json::Value> {
    let r = store
        .get(&Key::from(format!("prod/{db}/{INDEX}").as_str()))
        .await
        .ok()?;
    serde_json::from_slice(&r.bytes().await.ok()?).ok()
}

/// The manifest file names an index holds entries for.
fn indexed_names(index: &serde_json::Value) -> BTreeSet<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stamp"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn daemon_toml(port: u16, env: &TestEnv, read_token: bool) -> String {
    let dir = env.dir.path();
    let mut toml = format!(
        "[daemon]\nlisten = \"127.0.0.1:{port}\"\napi_token_file = \"{}\"\n",
        dir.join("api-token").display()
    );
    if read_token {
        toml.push_str(&format!(
            "read_token_file = \"{}\"\n",
            dir.join("read-token").display()
        ));
    }
    toml
}

/// Two databases, one real backup each, then older copies: 2 × (1 + `older`) snapshots.
async fn fleet(env: &TestEnv, store: &Arc<dyn ObjectStore>, config: &Path, older: i64) {
    let run = env.pgferry(config, &["backup", "--force"]).await;
    run.assert_code(0);
    for line in run.stdout.lines().filter(|l| l.contains(" committed: ")) {
        let mut words = line.split_whitespace();
        let db = words.next().unwrap().split('/').nth(1).unwrap().to_string();
        let id = words.next().unwrap().to_string();
        older_copies(store, &db, &id, older).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_walks_every_snapshot_exactly_once() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    env.small_database("globex").await;
    let (s3, store) = env.s3_target("s3").await;
    let port = free_port();
    let config = env.write_config(&format!(
        "{}databases = [\"acme\", \"globex\"]\n{s3}",
        env.source_toml("prod"),
    ));
    fleet(&env, &store, &config, 6).await;
    // The daemon backs nothing up meanwhile (its catch-up of the current slot would add one).
    let config = env.write_config(&format!(
        "{}{}databases = [\"zz_none_*\"]\n{s3}",
        daemon_toml(port, &env, false),
        env.source_toml("prod"),
    ));
    let want = manifests(&store).await;
    assert_eq!(want.len(), 14);

    let d = ApiDaemon::start(&env, &config, port).await;
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/snapshots?limit=4&cursor={c}"),
            None => "/api/v1/snapshots?limit=4".to_string(),
        };
        let (code, body) = d.get(&path, None).await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("a page is JSON");
        let page = rows(&v["snapshots"]);
        assert!(page.len() <= 4, "{body}");
        seen.extend(page);
        pages += 1;
        assert!(pages <= 10, "the walk does not end: {seen:?}");
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let set: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(set.len(), seen.len(), "a snapshot came twice: {seen:?}");
    assert_eq!(set, want);
    assert!(pages >= 4, "{pages} pages for 14 snapshots at 4 a page");

    // One database, and the bounds.
    let (code, body) = d
        .get("/api/v1/snapshots?database=acme&limit=1000", None)
        .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rows(&v["snapshots"]).len(), 7);
    assert!(v["next_cursor"].is_null(), "{body}");
    for bad in ["limit=0", "limit=1001", "cursor=nothex"] {
        let (code, body) = d.get(&format!("/api/v1/snapshots?{bad}"), None).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_follows_manifests_changed_behind_pgferrys_back_and_is_never_trusted_over_them() {
    let env = TestEnv::start().await;
    let (config, store) = env.small_databases_on_s3(&["acme", "globex"], "", "").await;
    fleet(&env, &store, &config, 3).await;
    assert_eq!(
        listed(&env.pgferry(&config, &["list", "--json"]).await),
        manifests(&store).await
    );
    let built = index(&store, "acme")
        .await
        .expect("list wrote acme's index");
    assert_eq!(indexed_names(&built).len(), 4);

    // Behind pgferry's back: the newest acme manifest deleted, an older one added.
    let acme: Vec<String> = manifests(&store)
        .await
        .into_iter()
        .filter(|(db, _)| db == "acme")
        .map(|(_, id)| id)
        .collect();
    let newest = acme.last().unwrap().clone();
    let oldest = acme.first().unwrap().clone();
    store
        .delete(&Key::from(
            format!("prod/acme/{newest}.manifest.json").as_str(),
        ))
        .await
        .unwrap();
    let added = older_copies(&store, "acme", &oldest, 1).await;
    let list = env.pgferry(&config, &["list", "--json"]).await;
    let got = listed(&list);
    assert_eq!(got, manifests(&store).await);
    assert!(!got.contains(&("acme".to_string(), newest.clone())));
    assert!(got.contains(&("acme".to_string(), added[0].clone())));
    let rebuilt = index(&store, "acme").await.unwrap();
    let want: BTreeSet<String> = manifests(&store)
        .await
        .into_iter()
        .filter(|(db, _)| db == "acme")
        .map(|(_, id)| format!("{id}.manifest.json"))
        .collect();
    assert_eq!(indexed_names(&rebuilt), want);

    // Garbage: ignored and rebuilt.
    put(
        &store,
        &format!("prod/acme/{INDEX}"),
        b"\x00garbage".to_vec(),
    )
    .await;
    assert_eq!(
        listed(&env.pgferry(&config, &["list", "--json"]).await),
        manifests(&store).await
    );
    assert_eq!(indexed_names(&index(&store, "acme").await.unwrap()), want);

    // Crafted: the deleted snapshot put back into the index with a real entry's stamp, and a
    // real entry's manifest made to name globex's dump (what prune would delete).
    let mut crafted = index(&store, "acme").await.unwrap();
    let entries = crafted["manifests"].as_array_mut().unwrap();
    let mut ghost = entries[0].clone();
    ghost["stamp"]["name"] = format!("{newest}.manifest.json").into();
    ghost["manifest"]["snapshot_id"] = newest.clone().into();
    let globex_dump = keys(&store)
        .await
        .into_iter()
        .find(|k| k.starts_with("prod/globex/") && k.ends_with(".dump.zst"))
        .unwrap();
    entries[1]["manifest"]["object_key"] = globex_dump.into();
    entries.push(ghost);
    put(
        &store,
        &format!("prod/acme/{INDEX}"),
        serde_json::to_vec(&crafted).unwrap(),
    )
    .await;
    let list = env.pgferry(&config, &["list", "--json"]).await;
    assert_eq!(listed(&list), manifests(&store).await, "{}", list.stderr);
    assert!(!list.stderr.contains("ignoring"), "{}", list.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_and_repair_never_touch_the_index_nor_take_it_for_a_snapshot() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (a_toml, a) = env.s3_target("a").await;
    let (b_toml, b) = env.s3_target("b").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\nretention = {{ keep_last = 3, hourly = 0, daily = 0, weekly = 0, monthly = 0 }}\n{a_toml}{b_toml}",
        env.source_toml("prod"),
    ));
    let run = env.pgferry(&config, &["backup"]).await;
    let id = run.snapshot_id();
    for store in [&a, &b] {
        older_copies(store, "acme", &id, 5).await;
    }
    // b lost one snapshot that retention keeps: repair has work to do.
    let lost = format!("prod/acme/{}.manifest.json", shift(&id, -3600));
    let lost_dump = manifest_of(&get(&b, &lost).await)["object_key"]
        .as_str()
        .unwrap()
        .to_string();
    for k in [lost, lost_dump] {
        b.delete(&Key::from(k.as_str())).await.unwrap();
    }
    listed(&env.pgferry(&config, &["list", "--json"]).await);
    // a's index as list wrote it, b's a garbage one: neither is pgferry's to delete or copy.
    put(&b, &format!("prod/acme/{INDEX}"), b"not an index".to_vec()).await;
    let index_key = Key::from(format!("prod/acme/{INDEX}").as_str());
    let before_a = get(&a, index_key.as_ref()).await;
    let before_b = get(&b, index_key.as_ref()).await;

    for args in [&["prune"][..], &["repair"][..], &["check"][..]] {
        let run = env.pgferry(&config, args).await;
        run.assert_code(0);
        assert!(
            !run.output().contains(INDEX),
            "{args:?} mentioned the index:\n{}",
            run.output()
        );
    }
    assert_eq!(
        get(&a, index_key.as_ref()).await,
        before_a,
        "prune or repair changed a's index"
    );
    assert_eq!(
        get(&b, index_key.as_ref()).await,
        before_b,
        "prune or repair changed b's index"
    );
    // Retention deleted some, repair gave b the kept one it lacked; list (through the stale
    // and garbage indexes) says exactly what the manifests say.
    let (on_a, on_b) = (manifests(&a).await, manifests(&b).await);
    assert!(on_a.len() < 6, "prune deleted nothing: {on_a:?}");
    assert!(
        on_b.contains(&("acme".to_string(), shift(&id, -3600))),
        "repair did not copy: {on_b:?}"
    );
    // What repair wrote is the manifest in full, table statistics included.
    let repaired = manifest_of(
        &get(
            &b,
            &format!("prod/acme/{}.manifest.json", shift(&id, -3600)),
        )
        .await,
    );
    assert!(
        !repaired["tables"].as_array().expect("tables").is_empty(),
        "{repaired}"
    );
    let list = env.pgferry(&config, &["list", "--json"]).await;
    assert_eq!(listed(&list), on_a.union(&on_b).cloned().collect());
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    for s in v["snapshots"].as_array().unwrap() {
        let key = (
            "acme".to_string(),
            s["manifest"]["snapshot_id"].as_str().unwrap().to_string(),
        );
        let want: Vec<&str> = [("a", &on_a), ("b", &on_b)]
            .iter()
            .filter(|(_, on)| on.contains(&key))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(s["targets"], serde_json::json!(want), "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_guards_the_read_endpoints_and_not_the_probes() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let (s3, _store) = env.s3_target("s3").await;
    let port = free_port();
    let config = env.write_config(&format!(
        "{}{}databases = [\"zz_none_*\"]\n{s3}",
        daemon_toml(port, &env, true),
        env.source_toml("prod"),
    ));
    std::fs::write(env.dir.path().join("read-token"), "r3ad\n").unwrap();
    std::fs::write(env.dir.path().join("api-token"), "wr1te\n").unwrap();
    let d = ApiDaemon::start(&env, &config, port).await;
    for path in ["/api/v1/status", "/api/v1/snapshots", "/"] {
        assert_eq!(d.get(path, None).await.0, 401, "{path} without a token");
        assert_eq!(d.get(path, Some("nope")).await.0, 401, "{path} wrong token");
        let (code, body) = d.get(path, Some("r3ad")).await;
        assert_eq!(code, 200, "{path} with the read token: {body}");
        assert_eq!(
            d.get(path, Some("wr1te")).await.0,
            200,
            "{path} with the API token"
        );
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        let code = d.get(path, None).await.0;
        assert!(code == 200 || code == 503, "{path} must stay open: {code}");
        assert_ne!(code, 401, "{path}");
    }
    // A configured read token whose file is gone: the read endpoints refuse, they do not open.
    std::fs::remove_file(env.dir.path().join("read-token")).unwrap();
    assert_eq!(d.get("/api/v1/snapshots", Some("r3ad")).await.0, 403);
    assert_eq!(d.get("/api/v1/status", None).await.0, 403);
}
