//! Unit tests of the catalog over in-memory stores.

use super::*;
use crate::storage::key::RunId;
use crate::storage::manifest::tests::sample;
use object_store::memory::InMemory;
use object_store::{ObjectStore, PutPayload};
use std::sync::Arc;

const SOURCES: &[&str] = &["prod"];

fn target(name: &str, prefix: &str) -> Target {
    Target::new(name, Arc::new(InMemory::new()), prefix, 10_000)
}

fn manifest(database: &str, id: &str, run: &RunId) -> Manifest {
    let mut m = sample();
    m.database = database.into();
    m.snapshot_id = id.into();
    m.started_at = SnapshotId::parse(id).unwrap().time();
    m.object_key = sk(database, id).dump(run).to_string();
    m
}

fn sk(database: &str, id: &str) -> SnapshotKey {
    SnapshotKey::new("prod", database, SnapshotId::parse(id).unwrap())
}

async fn put_raw(t: &Target, key: &Path, body: Vec<u8>) {
    t.store.put(key, PutPayload::from(body)).await.unwrap();
}

/// A committed snapshot as a write-once backup leaves it: the run's dump, then the manifest.
async fn put(t: &Target, m: &Manifest) {
    let object = t.at(&Path::parse(&m.object_key).unwrap());
    put_raw(t, &object, b"x".to_vec()).await;
    let key = t.at(&sk(&m.database, &m.snapshot_id).manifest());
    put_raw(t, &key, m.to_json()).await;
}

async fn all(targets: &[Target]) -> Catalog {
    load(targets, SOURCES, &Filter::default()).await
}

fn ids(c: &Catalog) -> Vec<(&str, &str, Vec<String>)> {
    c.snapshots
        .iter()
        .map(|s| (s.manifest.database.as_str(), s.id(), s.targets.clone()))
        .collect()
}

#[tokio::test]
async fn merges_targets_newest_first_and_skips_bad_manifests() {
    let a = target("a", "pg");
    let b = target("b", "");
    let run = RunId::random();
    let m1 = manifest("acme", "20261127T140000Z", &run);
    let m2 = manifest("acme", "20261127T150000Z", &run);
    put(&a, &m1).await;
    put(&a, &m2).await;
    put(&b, &m1).await;
    // A truncated manifest, an open upload's marker and an orphan dump on b.
    let bad = b.at(&sk("acme", "20261127T160000Z").manifest());
    put_raw(&b, &bad, b"{\"format_version\": 2, ".to_vec()).await;
    let marker = b.at(&sk("acme", "20261127T180000Z").upload_marker(&run));
    put_raw(&b, &marker, b"{}".to_vec()).await;
    let orphan = b.at(&sk("acme", "20261127T170000Z").dump(&run));
    put_raw(&b, &orphan, b"x".to_vec()).await;

    let c = all(&[a.clone(), b.clone()]).await;
    let ab = vec!["a".to_string(), "b".to_string()];
    assert_eq!(
        ids(&c),
        vec![
            ("acme", "20261127T150000Z", vec!["a".to_string()]),
            ("acme", "20261127T140000Z", ab),
        ]
    );
    assert_eq!(c.warnings.len(), 1);
    assert!(
        c.warnings[0].contains("20261127T160000Z.manifest.json"),
        "{:?}",
        c.warnings
    );
    assert_eq!(c.orphans.len(), 1);
    assert_eq!(c.orphans[0].key, orphan);
    assert_eq!(c.uploads.len(), 1);
    assert!(!c.uploads[0].committed);
    let entry = &c.snapshots[1];
    assert_eq!(
        entry.objects["a"].as_ref(),
        format!("pg/prod/acme/20261127T140000Z-{run}.dump.zst")
    );

    let only_b = load(
        &[a, b],
        SOURCES,
        &Filter {
            source: Some("prod".into()),
            databases: vec!["acme".into()],
            target: Some("b".into()),
        },
    )
    .await;
    assert_eq!(only_b.snapshots.len(), 1);
}

#[tokio::test]
async fn another_deployment_under_a_nested_prefix_is_not_ours() {
    // Deployment A at `nest`, deployment B at `nest/eu`: one bucket, same names.
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = Target::new("a", store.clone(), "nest", 10_000);
    let b = Target::new("b", store.clone(), "nest/eu", 10_000);
    let run = RunId::random();
    put(&a, &manifest("acme", "20261127T100000Z", &run)).await;
    put(&b, &manifest("acme", "20261127T120000Z", &run)).await;
    // Even when A also has a source named like B's prefix segment.
    for sources in [&["prod"][..], &["prod", "eu"][..]] {
        let c = load(std::slice::from_ref(&a), sources, &Filter::default()).await;
        assert_eq!(
            ids(&c),
            vec![("acme", "20261127T100000Z", vec!["a".to_string()])]
        );
        assert!(c.orphans.is_empty() && c.warnings.is_empty(), "{c:?}");
    }
    let c = all(&[b]).await;
    assert_eq!(
        ids(&c),
        vec![("acme", "20261127T120000Z", vec!["b".to_string()])]
    );
}

#[tokio::test]
async fn misplaced_and_copied_manifests_are_ignored_with_a_warning() {
    let t = target("s3t", "");
    let run = RunId::random();
    let acme = manifest("acme", "20261127T100000Z", &run);
    let globex = manifest("globex", "20261127T100000Z", &run);
    put(&t, &acme).await;
    put(&t, &globex).await;
    // A newer globex manifest in acme's folder, and a copy of acme's in a subfolder.
    let mut stray = manifest("globex", "20261127T200000Z", &run);
    stray.object_key = globex.object_key.clone();
    put_raw(
        &t,
        &t.at(&sk("acme", "20261127T200000Z").manifest()),
        stray.to_json(),
    )
    .await;
    put_raw(
        &t,
        &Path::from("prod/acme/old/20261127T100000Z.manifest.json"),
        acme.to_json(),
    )
    .await;
    // A manifest naming an object outside its folder.
    let mut outside = manifest("acme", "20261127T110000Z", &run);
    outside.object_key = "otherteam/db1/x.dump.zst".into();
    put_raw(
        &t,
        &t.at(&sk("acme", "20261127T110000Z").manifest()),
        outside.to_json(),
    )
    .await;

    let c = all(std::slice::from_ref(&t)).await;
    assert_eq!(
        ids(&c),
        vec![
            ("acme", "20261127T100000Z", vec!["s3t".to_string()]),
            ("globex", "20261127T100000Z", vec!["s3t".to_string()]),
        ]
    );
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(c.warnings.iter().any(
        |w| w.contains("prod/acme/20261127T200000Z.manifest.json") && w.contains("prod/globex")
    ));
    assert!(c.warnings.iter().any(|w| w.contains("otherteam/db1")));
    assert!(c.orphans.is_empty(), "{:?}", c.orphans);
    let damage = c.damage_of(&[t], "prod", "acme", "20261127T200000Z");
    assert_eq!(damage.len(), 1, "{damage:?}");
}

#[tokio::test]
async fn only_owned_shapes_in_configured_folders_are_seen() {
    let t = target("a", "");
    let run = RunId::random();
    let other = RunId::random();
    let m = manifest("acme", "20261127T100000Z", &run);
    put(&t, &m).await;
    for key in [
        "otherteam/db1/x.dump.zst",
        "otherteam/db1/20261127T100000Z.manifest.json",
        "prod/globex/manual-copy.dump.zst",
        "backup-by-hand.dump.zst",
        "prod/20261127T100000Z.dump.zst",
        "prod/acme/deeper/20261127T100000Z.dump.zst",
    ] {
        put_raw(&t, &Path::from(key), b"x".to_vec()).await;
    }
    // Another attempt at the same slot, never committed, and both runs' markers.
    let s = sk("acme", "20261127T100000Z");
    put_raw(&t, &s.dump(&other), b"x".to_vec()).await;
    put_raw(&t, &s.upload_marker(&other), b"{}".to_vec()).await;
    put_raw(&t, &s.upload_marker(&run), b"{}".to_vec()).await;

    let c = all(&[t]).await;
    assert_eq!(ids(&c).len(), 1);
    let orphans: Vec<String> = c.orphans.iter().map(|o| o.key.to_string()).collect();
    assert_eq!(orphans, vec![s.dump(&other).to_string()]);
    let mut uploads: Vec<(String, bool)> = c
        .uploads
        .iter()
        .map(|u| (u.key.to_string(), u.committed))
        .collect();
    uploads.sort();
    let mut want = vec![
        (s.upload_marker(&other).to_string(), false),
        (s.upload_marker(&run).to_string(), true),
    ];
    want.sort();
    assert_eq!(uploads, want);
}

#[tokio::test]
async fn legacy_manifests_name_their_one_dump() {
    let t = target("a", "pg");
    let mut m = sample();
    let s = sk("acme", &m.snapshot_id);
    m.object_key = s.legacy_dump().to_string();
    put(&t, &m).await;
    let legacy_marker = Path::from(format!("prod/acme/{}.upload.json", m.snapshot_id));
    put_raw(&t, &t.at(&legacy_marker), b"{}".to_vec()).await;
    let c = all(&[t]).await;
    assert_eq!(c.snapshots.len(), 1);
    assert!(c.orphans.is_empty());
    assert!(c.uploads[0].committed);
}

#[tokio::test]
async fn an_unreadable_manifest_protects_its_dumps() {
    let t = target("a", "");
    let run = RunId::random();
    let s = sk("acme", "20261127T100000Z");
    put_raw(&t, &s.manifest(), b"{".to_vec()).await;
    put_raw(&t, &s.dump(&run), b"x".to_vec()).await;
    put_raw(&t, &s.upload_marker(&run), b"{}".to_vec()).await;
    let c = all(&[t]).await;
    assert!(c.snapshots.is_empty());
    assert!(c.orphans.is_empty() && c.uploads.is_empty(), "{c:?}");
    assert_eq!(c.unreadable.len(), 1);
}

#[tokio::test]
async fn newest_means_the_data_read_last_not_the_greatest_id() {
    let t = target("a", "");
    let run = RunId::random();
    // The 07:00 slot caught up at 07:39; a manual snapshot at 07:18.
    let mut slot = manifest("acme", "20261127T070000Z", &run);
    slot.started_at = SnapshotId::parse("20261127T073900Z").unwrap().time();
    put(&t, &slot).await;
    put(&t, &manifest("acme", "20261127T071800Z", &run)).await;
    let c = all(&[t]).await;
    let order: Vec<&str> = c.snapshots.iter().map(|s| s.id()).collect();
    assert_eq!(order, vec!["20261127T070000Z", "20261127T071800Z"]);
}
