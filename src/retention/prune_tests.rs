//! Unit tests of the retention executor over in-memory stores.

use super::*;
use crate::storage::key::RunId;
use crate::storage::manifest::tests::sample;
use crate::storage::target::{Target, DUMP_SUFFIX, MANIFEST_SUFFIX, VERIFY_SUFFIX};
use crate::test_support::{keys, put_at};
use object_store::memory::InMemory;
use object_store::PutPayload;
use std::sync::Arc;

/// Source `prod` keeps the last 2 snapshots and nothing else.
fn app(targets: Vec<Target>) -> App {
    let retention = "retention = { keep_last = 2, hourly = 0, daily = 0, weekly = 0, monthly = 0 }";
    crate::test_support::app_over(retention, targets)
}

async fn put_snapshot(t: &Target, id: &str) {
    let mut m = sample();
    m.snapshot_id = id.into();
    m.started_at = SnapshotId::parse(id).unwrap().time();
    m.object_key = format!("prod/acme/{id}{DUMP_SUFFIX}");
    for (suffix, body) in [
        (DUMP_SUFFIX, b"x".to_vec()),
        (
            VERIFY_SUFFIX,
            br#"{"result":"ok","finished_at":"2026-11-27T15:00:00Z"}"#.to_vec(),
        ),
        (MANIFEST_SUFFIX, m.to_json().to_vec()),
    ] {
        t.store
            .put(&t.key("prod", "acme", id, suffix), PutPayload::from(body))
            .await
            .unwrap();
    }
}

/// Prunes every source and database of `app` as of `now`, no run's outcome known (as
/// `pgferry prune` by hand).
async fn prune_all(app: &App, now: DateTime<Utc>, grace: Duration, dry_run: bool) -> PruneReport {
    prune(
        app,
        &Selection::default(),
        &|_, _| None,
        now,
        grace,
        dry_run,
    )
    .await
}

const IDS: [&str; 4] = [
    "20261127T110000Z",
    "20261127T120000Z",
    "20261127T130000Z",
    "20261127T140000Z",
];

#[tokio::test]
async fn deletes_expired_snapshots_on_every_target_and_old_orphans() {
    let a = Target::new("a", Arc::new(InMemory::new()), "pg", 10_000);
    let b = Target::new("b", Arc::new(InMemory::new()), "", 10_000);
    for id in IDS {
        put_snapshot(&a, id).await;
    }
    for id in &IDS[2..] {
        put_snapshot(&b, id).await;
    }
    // A dump without a manifest on b.
    let orphan = b.key("prod", "acme", "20261126T000000Z", DUMP_SUFFIX);
    b.store
        .put(&orphan, PutPayload::from_static(b"x"))
        .await
        .unwrap();
    let app = app(vec![a.clone(), b.clone()]);
    let now = Utc::now();

    // Dry run: plans, deletes nothing; the orphan is younger than the grace.
    let r = prune_all(&app, now, retention::DEFAULT_ORPHAN_GRACE, true).await;
    assert_eq!(r.plans.len(), 2);
    assert_eq!(r.plans[0].delete, vec![IDS[1], IDS[0]]);
    assert!(r.plans[1].delete.is_empty());
    assert!(r.orphans.is_empty());
    assert_eq!(keys(&a).await.len(), 12);
    assert!(render(&r, true).contains("would delete 20261127T110000Z"));

    // For real, with a grace that makes the orphan old.
    let r = prune_all(&app, now, Duration::ZERO, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.deleted_snapshots, 2);
    assert_eq!(r.deleted_orphans, 1);
    let left = keys(&a).await;
    assert_eq!(left.len(), 6, "{left:?}");
    assert!(left
        .iter()
        .all(|k| k.contains("T130000Z") || k.contains("T140000Z")));
    assert_eq!(keys(&b).await.len(), 6);
    assert_eq!(
        app.metrics
            .retention_deleted_total
            .with_label_values(&["a"])
            .get(),
        2
    );
    // Idempotent.
    let r = prune_all(&app, now, Duration::ZERO, false).await;
    assert_eq!(r.deleted_snapshots, 0);
}

#[tokio::test]
async fn unfinished_uploads_past_the_grace_are_aborted_and_stale_markers_removed() {
    use object_store::multipart::MultipartStore;
    let store = Arc::new(InMemory::new());
    let a = Target::new("a", store.clone(), "pg", 10_000).with_multipart(store.clone());
    put_snapshot(&a, IDS[0]).await;
    // A marker left beside a committed snapshot (its deletion failed after completion).
    let stale = a.key(
        "prod",
        "acme",
        IDS[0],
        crate::storage::target::UPLOAD_SUFFIX,
    );
    a.store
        .put(&stale, PutPayload::from_static(b"{}"))
        .await
        .unwrap();
    // An upload whose process died after one part.
    let dump = a.key("prod", "acme", IDS[1], DUMP_SUFFIX);
    let mut open = crate::storage::upload::start(&a, &dump).await.unwrap();
    open.put_part(PutPayload::from_static(b"part"))
        .await
        .unwrap();
    drop(open);
    let marker = a.key(
        "prod",
        "acme",
        IDS[1],
        crate::storage::target::UPLOAD_SUFFIX,
    );
    let id: crate::storage::upload::UploadMarker =
        serde_json::from_slice(&a.store.get(&marker).await.unwrap().bytes().await.unwrap())
            .unwrap();
    let app = app(vec![a.clone()]);
    let run = |grace, dry_run| prune_all(&app, Utc::now(), grace, dry_run);

    // Within the grace it may be a live upload: left alone, not even reported.
    let r = run(retention::DEFAULT_ORPHAN_GRACE, false).await;
    assert!(r.unfinished_uploads.is_empty());
    assert_eq!(r.aborted_uploads, 0);
    assert_eq!(keys(&a).await.len(), 5);

    let r = run(Duration::ZERO, true).await;
    assert_eq!(
        r.unfinished_uploads,
        vec![("a".to_string(), marker.to_string())]
    );
    assert!(render(&r, true).contains(&format!("would abort the upload of {marker}")));
    assert_eq!(keys(&a).await.len(), 5, "a dry run touches nothing");

    let r = run(Duration::ZERO, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.aborted_uploads, 1);
    let left = keys(&a).await;
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left
        .iter()
        .all(|k| k.contains(IDS[0]) && !k.ends_with(".upload.json")));
    assert!(
        store.abort_multipart(&dump, &id.upload_id).await.is_err(),
        "the upload is still open"
    );
}

#[tokio::test]
async fn a_failed_last_backup_blocks_pruning_and_the_newest_always_stays() {
    let a = Target::new("a", Arc::new(InMemory::new()), "", 10_000);
    for id in IDS {
        put_snapshot(&a, id).await;
    }
    let app = app(vec![a.clone()]);
    let failed = |_: &str, _: &str| Some(BackupOutcome::Failed);
    let r = prune(
        &app,
        &Selection::default(),
        &failed,
        Utc::now(),
        Duration::ZERO,
        false,
    )
    .await;
    assert_eq!(r.deleted_snapshots, 0);
    assert_eq!(r.plans[0].skipped, Some(SkipReason::LastBackupFailed));
    assert_eq!(keys(&a).await.len(), 12);

    let mut cfg = (*app.config).clone();
    cfg.sources[0].retention = crate::config::RetentionPolicy {
        keep_last: 0,
        hourly: 0,
        daily: 0,
        weekly: 0,
        monthly: 0,
    };
    let app = App {
        config: Arc::new(cfg),
        ..app
    };
    let sel = Selection {
        source: Some("prod".into()),
        database: Some("acme".into()),
    };
    let r = prune(
        &app,
        &sel,
        &|_, _| Some(BackupOutcome::Committed),
        Utc::now(),
        Duration::ZERO,
        false,
    )
    .await;
    assert_eq!(r.deleted_snapshots, 3);
    let left = keys(&a).await;
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|k| k.contains(IDS[3])));
    assert_eq!(r.plans[0].keep[0].1, vec![KeepReason::Newest]);
}

async fn put_raw(t: &Target, key: &str) {
    put_at(t, &Path::from(key), PutPayload::from_static(b"x")).await;
}

/// A snapshot as a write-once backup commits it: `<id>-<run>.dump.zst`, then the manifest
/// naming it; its data read at `read`.
async fn put_run(t: &Target, database: &str, id: &str, run: &RunId, read: &str) {
    let sk = SnapshotKey::new("prod", database, SnapshotId::parse(id).unwrap());
    let mut m = sample();
    m.database = database.into();
    m.snapshot_id = id.into();
    m.started_at = SnapshotId::parse(read).unwrap().time();
    m.object_key = sk.dump(run).to_string();
    put_raw(t, m.object_key.as_str()).await;
    put_at(t, &sk.manifest(), m.to_json()).await;
}

#[tokio::test]
async fn only_owned_keys_in_the_selected_folders_are_deleted() {
    let a = Target::new("a", Arc::new(InMemory::new()), "prod-bkt", 10_000);
    let run = RunId::random();
    for id in IDS {
        put_run(&a, "acme", id, &run, id).await;
        put_run(&a, "globex", id, &run, id).await;
    }
    let foreign = [
        "otherteam/db1/x.dump.zst",
        "otherteam/db1/20261127T100000Z-0123456789ab.dump.zst",
        "prod/globex/manual-copy.dump.zst",
        "backup-by-hand.dump.zst",
        "prod/acme/old/20261127T100000Z-0123456789ab.dump.zst",
        "eu/prod/acme/20261127T100000Z-0123456789ab.dump.zst",
    ];
    for k in foreign {
        put_raw(&a, k).await;
    }
    // Orphans of pgferry's shape: one in acme's folder, one in globex's.
    put_raw(&a, "prod/acme/20261126T000000Z-0123456789ab.dump.zst").await;
    put_raw(&a, "prod/globex/20261126T000000Z-0123456789ab.dump.zst").await;
    let app = app(vec![a.clone()]);
    let acme = Selection {
        source: None,
        database: Some("acme".into()),
    };
    let r = prune(&app, &acme, &|_, _| None, Utc::now(), Duration::ZERO, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.deleted_snapshots, r.deleted_orphans), (2, 1));
    let left = keys(&a).await;
    for k in foreign {
        assert!(
            left.contains(&format!("prod-bkt/{k}")),
            "{k} deleted: {left:?}"
        );
    }
    assert!(left.contains(&"prod-bkt/prod/globex/20261126T000000Z-0123456789ab.dump.zst".into()));
    assert_eq!(
        left.iter()
            .filter(|k| k.contains("/globex/20261127"))
            .count(),
        8
    );
}

#[tokio::test]
async fn a_snapshot_takes_the_object_its_manifest_names_and_nothing_else() {
    let a = Target::new("a", Arc::new(InMemory::new()), "", 10_000);
    let (committed, other) = (RunId::random(), RunId::random());
    for id in IDS {
        put_run(&a, "acme", id, &committed, id).await;
    }
    // Another attempt at the oldest slot that never committed (a replica's, say).
    let sk = SnapshotKey::new("prod", "acme", SnapshotId::parse(IDS[0]).unwrap());
    put_raw(&a, sk.dump(&other).as_ref()).await;
    let app = app(vec![a.clone()]);
    let r = prune_all(&app, Utc::now(), retention::DEFAULT_ORPHAN_GRACE, false).await;
    assert_eq!(r.deleted_snapshots, 2);
    let left = keys(&a).await;
    assert!(left.contains(&sk.dump(&other).to_string()), "{left:?}");
    assert!(!left.contains(&sk.dump(&committed).to_string()), "{left:?}");
    assert_eq!(left.len(), 5, "{left:?}");
}

#[tokio::test]
async fn retention_keeps_the_newest_data_when_manual_ids_interleave() {
    let a = Target::new("a", Arc::new(InMemory::new()), "", 10_000);
    let run = RunId::random();
    // 06:00 on time, a manual snapshot at 07:18, the 07:00 slot caught up at 07:39.
    put_run(&a, "acme", "20261127T060000Z", &run, "20261127T060000Z").await;
    put_run(&a, "acme", "20261127T071800Z", &run, "20261127T071800Z").await;
    put_run(&a, "acme", "20261127T070000Z", &run, "20261127T073900Z").await;
    let app = app(vec![a.clone()]);
    let mut cfg = (*app.config).clone();
    cfg.sources[0].retention.keep_last = 1;
    let app = App {
        config: Arc::new(cfg),
        ..app
    };
    let r = prune_all(&app, Utc::now(), Duration::ZERO, false).await;
    assert_eq!(r.plans[0].keep[0].0, "20261127T070000Z");
    assert_eq!(r.plans[0].keep.len(), 1);
    let left = keys(&a).await;
    assert!(
        left.iter().all(|k| k.contains("20261127T070000Z")),
        "{left:?}"
    );
}

#[tokio::test]
async fn a_snapshot_the_policy_expires_everywhere_is_not_held_for_repair() {
    let a = Target::new("a", Arc::new(InMemory::new()), "pg", 10_000);
    let b = Target::new("b", Arc::new(InMemory::new()), "", 10_000);
    for id in IDS {
        put_snapshot(&a, id).await;
    }
    // b holds the two newest and the oldest: it lacks IDS[1], which a's plan expires.
    for id in [IDS[0], IDS[2], IDS[3]] {
        put_snapshot(&b, id).await;
    }
    let app = app(vec![a.clone(), b.clone()]);
    let finished = sample().finished_at;
    let run = |now| prune_all(&app, now, Duration::ZERO, false);

    // b lacks IDS[1], but the policy over every target's snapshots together (keep_last = 2)
    // expires it: repair would never copy it, so it is not held (two targets each lacking
    // an expired snapshot the other pruned would otherwise hold each other's for the grace).
    let r = run(finished + chrono::TimeDelta::hours(1)).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let plan_a = r.plans.iter().find(|p| p.target == "a").unwrap();
    assert_eq!(plan_a.delete, vec![IDS[1], IDS[0]]);
    assert!(plan_a
        .keep
        .iter()
        .all(|(_, why)| !why.contains(&KeepReason::RepairSource)));
    assert!(keys(&a).await.iter().all(|k| !k.contains(IDS[1])));
}

/// A snapshot with companion files as a backup with `files` commits it: dump, files archive,
/// then the manifest naming both; its data read at its slot.
async fn put_with_files(t: &Target, id: &str, run: &RunId) -> (String, String) {
    use crate::storage::manifest::{Files, FilesArchive, FILES_FORMAT_VERSION};
    let sk = SnapshotKey::new("prod", "acme", SnapshotId::parse(id).unwrap());
    let mut m = sample();
    m.snapshot_id = id.into();
    m.started_at = SnapshotId::parse(id).unwrap().time();
    m.object_key = sk.dump(run).to_string();
    let files = sk.files_as(run, false).to_string();
    m.files = Some(Files::Archive(FilesArchive {
        object_key: files.clone(),
        stored_size: 1,
        raw_size: 2,
        sha256: "11".repeat(32),
        file_count: 1,
        file_bytes: 1,
        skipped: 0,
    }));
    m.format_version = FILES_FORMAT_VERSION;
    put_raw(t, &m.object_key).await;
    put_raw(t, &files).await;
    put_at(t, &sk.manifest(), m.to_json()).await;
    (m.object_key, files)
}

#[tokio::test]
async fn a_snapshot_takes_its_files_archive_and_keeps_it_otherwise() {
    let a = Target::new("a", Arc::new(InMemory::new()), "pg", 10_000);
    let run = RunId::random();
    let mut objects = Vec::new();
    for id in IDS {
        objects.push(put_with_files(&a, id, &run).await);
    }
    // The marker a completed files upload of the oldest left behind.
    let old = SnapshotKey::new("prod", "acme", SnapshotId::parse(IDS[0]).unwrap());
    put_raw(&a, old.files_upload_marker(&run).as_ref()).await;
    let app = app(vec![a.clone()]);
    let r = prune_all(&app, Utc::now(), retention::DEFAULT_ORPHAN_GRACE, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.deleted_snapshots, 2);
    let left = keys(&a).await;
    let mut want: Vec<String> = IDS[2..]
        .iter()
        .flat_map(|id| {
            let sk = SnapshotKey::new("prod", "acme", SnapshotId::parse(id).unwrap());
            [
                sk.dump(&run).to_string(),
                sk.files_as(&run, false).to_string(),
                sk.manifest().to_string(),
            ]
        })
        .map(|k| format!("pg/{k}"))
        .collect();
    want.sort();
    assert_eq!(left, want);
}

#[tokio::test]
async fn orphan_files_archives_and_files_uploads_are_cleaned_after_the_grace_only() {
    use object_store::multipart::MultipartStore;
    let store = Arc::new(InMemory::new());
    let a = Target::new("a", store.clone(), "pg", 10_000).with_multipart(store.clone());
    let (committed, dead, crashed) = (RunId::random(), RunId::random(), RunId::random());
    let (_, kept_files) = put_with_files(&a, IDS[3], &committed).await;
    let sk = SnapshotKey::new("prod", "acme", SnapshotId::parse(IDS[3]).unwrap());
    // A run that died after its files upload completed but before the manifest (orphan).
    let orphan = sk.files_as(&crashed, true);
    put_raw(&a, orphan.as_ref()).await;
    // A run killed mid-upload of its files: the open upload and its marker.
    let files = a.at(&sk.files_as(&dead, false));
    let upload_id = store.create_multipart(&files).await.unwrap();
    store
        .put_part(&files, &upload_id, 0, PutPayload::from_static(b"part"))
        .await
        .unwrap();
    let marker = a.at(&sk.files_upload_marker(&dead));
    let body = crate::storage::upload::UploadMarker {
        format_version: 1,
        upload_id: upload_id.clone(),
        key: files.to_string(),
        started_at: Utc::now(),
        host: "test".into(),
        pid: 1,
        pgferry_version: "0".into(),
    };
    a.store
        .put(
            &marker,
            PutPayload::from(serde_json::to_vec(&body).unwrap()),
        )
        .await
        .unwrap();
    let app = app(vec![a.clone()]);
    let run = |grace, dry_run| prune_all(&app, Utc::now(), grace, dry_run);

    let before = keys(&a).await;
    assert_eq!(before.len(), 5, "{before:?}");
    let r = run(retention::DEFAULT_ORPHAN_GRACE, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.orphans.is_empty() && r.unfinished_uploads.is_empty());
    assert_eq!(keys(&a).await, before, "within the grace nothing goes");

    let r = run(Duration::ZERO, true).await;
    assert_eq!(
        r.orphans,
        vec![("a".to_string(), a.at(&orphan).to_string())]
    );
    assert_eq!(
        r.unfinished_uploads,
        vec![("a".to_string(), marker.to_string())]
    );
    assert!(render(&r, true).contains("orphan files archive on a"));
    assert_eq!(keys(&a).await, before, "a dry run touches nothing");

    let r = run(Duration::ZERO, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.deleted_orphans, r.aborted_uploads), (1, 1));
    let left = keys(&a).await;
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.contains(&format!("pg/{kept_files}")), "{left:?}");
    assert!(
        store.abort_multipart(&files, &upload_id).await.is_err(),
        "the files upload is still open"
    );
}

#[tokio::test]
async fn staging_files_of_a_killed_files_upload_go_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let mut a = Target::new("a", store, "", 10_000);
    a.root = Some(dir.path().to_path_buf());
    let run = RunId::random();
    put_with_files(&a, IDS[3], &run).await;
    let folder = dir.path().join("prod").join("acme");
    let staging = folder.join(format!("{}-{run}.files.tar.zst#1", IDS[2]));
    std::fs::write(&staging, b"x").unwrap();
    let app = app(vec![a.clone()]);
    let r = prune_all(&app, Utc::now(), Duration::ZERO, false).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(
        !staging.exists(),
        "the staging file of a files upload stayed"
    );
    assert_eq!(keys(&a).await.len(), 3);
}
