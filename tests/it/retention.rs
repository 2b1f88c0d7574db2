//! `pgferry prune` against a real S3 server: the plan printed by `--dry-run`, then the real
//! deletion (manifest, verify report and dump of each expired snapshot), newest kept, young
//! orphan dumps left alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStore, PutPayload};

use crate::support::env::{get, keys, TestEnv};

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: Vec<u8>) {
    store
        .put(&object_store::path::Path::from(key), PutPayload::from(body))
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_applies_the_policy_on_s3() {
    let env = TestEnv::start().await;
    env.pg.create_database("acme").await.unwrap();
    let (s3, store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "{}databases = [\"acme\"]\nretention = {{ keep_last = 1, hourly = 0, daily = 2, weekly = 0, monthly = 0 }}\n{s3}",
        env.source_toml("prod")
    ));
    env.pgferry(&config, &["backup"]).await.assert_code(0);
    let now_id = crate::support::env::first_snapshot_in(&store, "prod/acme").await;
    // Older snapshots: copies of the real one under older ids.
    let manifest = get(&store, &format!("prod/acme/{now_id}.manifest.json")).await;
    let object_key = crate::support::env::manifest_of(&manifest)["object_key"]
        .as_str()
        .unwrap()
        .to_string();
    let dump = get(&store, &object_key).await;
    let old = [
        "20260101T000000Z",
        "20260102T000000Z",
        "20260102T120000Z",
        "20260103T000000Z",
    ];
    for id in old {
        let mut m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        // Each names its own dump, and its data was read at its slot's start.
        let own_object = object_key.replace(&now_id, id);
        m["snapshot_id"] = id.into();
        m["object_key"] = own_object.clone().into();
        m["started_at"] = chrono::NaiveDateTime::parse_from_str(id, "%Y%m%dT%H%M%SZ")
            .unwrap()
            .and_utc()
            .to_rfc3339()
            .into();
        put(&store, &own_object, dump.to_vec()).await;
        put(
            &store,
            &format!("prod/acme/{id}.verify.json"),
            br#"{"result":"ok","finished_at":"2026-01-04T00:00:00Z"}"#.to_vec(),
        )
        .await;
        put(
            &store,
            &format!("prod/acme/{id}.manifest.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .await;
    }
    // A dump without a manifest, younger than the orphan grace: an upload in flight.
    put(
        &store,
        "prod/acme/20260104T000000Z.dump.zst",
        b"partial".to_vec(),
    )
    .await;
    let before = keys(&store).await;

    let run = env.pgferry(&config, &["prune", "--dry-run"]).await;
    run.assert_code(0);
    let out = &run.stdout;
    assert!(
        out.contains(&format!("keep    {now_id}  newest, keep_last, daily")),
        "{out}"
    );
    assert!(out.contains("keep    20260103T000000Z  daily"), "{out}");
    for id in &old[..3] {
        assert!(out.contains(&format!("would delete {id}")), "{out}");
    }
    assert_eq!(keys(&store).await, before, "a dry run deletes nothing");

    let run = env.pgferry(&config, &["prune"]).await;
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("deleted 3 snapshot(s) and 0 orphan dump(s)"),
        "{}",
        run.stdout
    );
    let mut want = vec![
        object_key.clone(),
        format!("prod/acme/{now_id}.manifest.json"),
        object_key.replace(&now_id, "20260103T000000Z"),
        "prod/acme/20260103T000000Z.manifest.json".to_string(),
        "prod/acme/20260103T000000Z.verify.json".to_string(),
        "prod/acme/20260104T000000Z.dump.zst".to_string(),
    ];
    want.sort();
    assert_eq!(keys(&store).await, want);

    // Idempotent.
    let run = env.pgferry(&config, &["prune"]).await;
    run.assert_code(0);
    assert!(
        run.stdout.contains("deleted 0 snapshot(s)"),
        "{}",
        run.stdout
    );
}

/// Runs prune in this process as `pgferry prune` would, `later` from now: how a test sees what
/// prune does once the orphan grace (at least an hour) has passed. `vars` are the `${VAR}`
/// values of `config` (inlined, so this process's environment is not touched). Returns what
/// `pgferry prune` prints. (`pgferry prune` itself always runs at the current time.)
pub(crate) async fn prune_later(
    config: &Path,
    vars: &[(String, String)],
    selection: &pgferry::retention::prune::Selection,
    later: Duration,
) -> String {
    let mut text = std::fs::read_to_string(config).unwrap();
    for (k, v) in vars {
        text = text.replace(&format!("${{{k}}}"), v);
    }
    let config = pgferry::config::Config::from_str_at(&text, config).unwrap();
    let app = pgferry::app::App::new(config).unwrap();
    let now = chrono::Utc::now() + chrono::TimeDelta::from_std(later).unwrap();
    let grace = app.config.pipeline.orphan_grace;
    let report =
        pgferry::retention::prune::prune(&app, selection, &|_, _| None, now, grace, false).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    pgferry::retention::prune::render(&report, false)
}
