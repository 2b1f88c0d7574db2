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

/// The catalog's open-upload markers as (key, committed), sorted.
fn uploads(c: &Catalog) -> Vec<(String, bool)> {
    sorted(
        c.uploads
            .iter()
            .map(|u| (u.key.to_string(), u.committed))
            .collect(),
    )
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
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
        entry.objects["a"].dump.as_ref(),
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
    let want = sorted(vec![
        (s.upload_marker(&other).to_string(), false),
        (s.upload_marker(&run).to_string(), true),
    ]);
    assert_eq!(uploads(&c), want);
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

/// An in-memory store that counts GETs by file name and can refuse every write (a read-only
/// credential): what the index tests observe the catalog through.
#[derive(Debug, Default)]
struct Counting {
    inner: InMemory,
    gets: std::sync::Mutex<Vec<String>>,
    puts: std::sync::atomic::AtomicUsize,
    read_only: std::sync::atomic::AtomicBool,
}

impl std::fmt::Display for Counting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting")
    }
}

impl Counting {
    fn refuse(&self, location: &Path) -> object_store::Result<()> {
        if self.read_only.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "read-only credential".into(),
            });
        }
        Ok(())
    }

    fn take_gets(&self) -> Vec<String> {
        let mut gets = std::mem::take(&mut *self.gets.lock().unwrap());
        gets.sort();
        gets
    }
}

#[async_trait::async_trait]
impl ObjectStore for Counting {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.refuse(location)?;
        self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.refuse(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.gets
            .lock()
            .unwrap()
            .push(location.filename().unwrap_or_default().to_string());
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.refuse(location)?;
        self.inner.delete(location).await
    }
    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.refuse(to)?;
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.refuse(to)?;
        self.inner.copy_if_not_exists(from, to).await
    }
}

fn counting(name: &str) -> (Target, Arc<Counting>) {
    let store = Arc::new(Counting::default());
    (Target::new(name, store.clone(), "pg", 10_000), store)
}

async fn indexed(targets: &[Target]) -> Catalog {
    load_with(targets, SOURCES, &Filter::default(), Read::Indexed).await
}

/// What a listing says, to compare a read through the index with one of every manifest.
type Facts = Vec<(String, Vec<String>, Option<String>, Vec<(String, String)>)>;

fn facts(c: &Catalog) -> Facts {
    c.snapshots
        .iter()
        .map(|s| {
            (
                serde_json::to_string(&s.manifest).unwrap(),
                s.targets.clone(),
                s.verify.as_ref().map(|v| v.result.clone()),
                s.objects
                    .iter()
                    .map(|(t, o)| (t.clone(), format!("{o:?}")))
                    .collect(),
            )
        })
        .collect()
}

const INDEX: &str = crate::storage::key::INDEX_NAME;

async fn index_of(t: &Target, database: &str) -> catalog_index::FolderIndex {
    let key = t.at(&key::folder_index("prod", database));
    let bytes = t.store.get(&key).await.unwrap().bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn listing_reads_summaries_and_verify_gets_the_tables_in_full() {
    let a = target("a", "pg");
    let run = RunId::random();
    put(&a, &manifest("acme", "20261127T140000Z", &run)).await;
    for c in [
        all(std::slice::from_ref(&a)).await,
        indexed(std::slice::from_ref(&a)).await,
    ] {
        let s = &c.snapshots[0];
        assert_eq!(s.manifest.tables, None, "listing never holds the tables");
        let full = full_manifest(std::slice::from_ref(&a), s).await.unwrap();
        assert_eq!(full.tables, sample().tables);
    }
}

#[tokio::test]
async fn a_listing_through_the_index_reads_the_index_and_no_manifest() {
    let (a, store) = counting("a");
    let run = RunId::random();
    for id in ["20261127T140000Z", "20261127T150000Z", "20261127T160000Z"] {
        put(&a, &manifest("acme", id, &run)).await;
    }
    put(&a, &manifest("globex", "20261127T140000Z", &run)).await;
    let verify = a.at(&sk("acme", "20261127T150000Z").verify());
    put_raw(
        &a,
        &verify,
        br#"{"result":"success","finished_at":"2026-11-27T16:00:00Z"}"#.to_vec(),
    )
    .await;
    let truth = all(std::slice::from_ref(&a)).await;
    store.take_gets();

    // First read: no index yet, every manifest and report read, and the indexes written.
    let first = indexed(std::slice::from_ref(&a)).await;
    assert_eq!(facts(&first), facts(&truth));
    assert_eq!(store.take_gets().len(), 5);
    assert_eq!(index_of(&a, "acme").await.manifests.len(), 3);
    assert_eq!(index_of(&a, "acme").await.verifies.len(), 1);
    store.take_gets();

    // Then: one GET per folder, of its index.
    let second = indexed(std::slice::from_ref(&a)).await;
    assert_eq!(facts(&second), facts(&truth));
    assert_eq!(
        store.take_gets(),
        vec![INDEX.to_string(), INDEX.to_string()]
    );

    // The catalog that decides (prune, restore) never looks at the index.
    let decided = all(std::slice::from_ref(&a)).await;
    assert_eq!(facts(&decided), facts(&truth));
    assert!(!store.take_gets().contains(&INDEX.to_string()));
    assert!(decided.warnings.is_empty(), "{:?}", decided.warnings);
    assert!(decided.orphans.is_empty() && decided.unreadable.is_empty());
}

#[tokio::test]
async fn manifests_deleted_added_or_rewritten_behind_the_index_are_seen() {
    let (a, store) = counting("a");
    let run = RunId::random();
    for id in ["20261127T140000Z", "20261127T150000Z"] {
        put(&a, &manifest("acme", id, &run)).await;
    }
    indexed(std::slice::from_ref(&a)).await;
    // Behind pgferry's back: one manifest deleted, one added, one rewritten (repair copies a
    // manifest under the same key; here with another object of the same snapshot).
    a.store
        .delete(&a.at(&sk("acme", "20261127T140000Z").manifest()))
        .await
        .unwrap();
    put(&a, &manifest("acme", "20261127T170000Z", &run)).await;
    let other = RunId::random();
    let mut rewritten = manifest("acme", "20261127T150000Z", &other);
    rewritten.raw_size = 777;
    put(&a, &rewritten).await;
    store.take_gets();

    let c = indexed(std::slice::from_ref(&a)).await;
    assert_eq!(facts(&c), facts(&all(std::slice::from_ref(&a)).await));
    assert_eq!(
        ids(&c),
        vec![
            ("acme", "20261127T170000Z", vec!["a".to_string()]),
            ("acme", "20261127T150000Z", vec!["a".to_string()]),
        ]
    );
    assert_eq!(c.snapshots[1].manifest.raw_size, 777);
    let gets = store.take_gets();
    assert_eq!(
        gets,
        vec![
            "20261127T150000Z.manifest.json".to_string(),
            "20261127T170000Z.manifest.json".to_string(),
            INDEX.to_string(),
            // `all` above
            "20261127T150000Z.manifest.json".to_string(),
            "20261127T170000Z.manifest.json".to_string(),
        ]
        .into_iter()
        .fold(Vec::new(), |mut v, g| {
            v.push(g);
            v.sort();
            v
        })
    );
    // The index was rewritten to what is there now: the next read is one GET.
    let names: Vec<String> = index_of(&a, "acme")
        .await
        .manifests
        .iter()
        .map(|m| m.stamp.name.clone())
        .collect();
    assert_eq!(
        names,
        vec![
            "20261127T150000Z.manifest.json",
            "20261127T170000Z.manifest.json"
        ]
    );
    store.take_gets();
    indexed(std::slice::from_ref(&a)).await;
    assert_eq!(store.take_gets(), vec![INDEX.to_string()]);
}

#[tokio::test]
async fn a_garbage_or_crafted_index_is_never_trusted_over_the_manifests() {
    let (a, _store) = counting("a");
    let run = RunId::random();
    put(&a, &manifest("acme", "20261127T140000Z", &run)).await;
    put(&a, &manifest("globex", "20261127T140000Z", &run)).await;
    let truth = facts(&all(std::slice::from_ref(&a)).await);
    let index_key = a.at(&key::folder_index("prod", "acme"));

    // Garbage: ignored, rebuilt.
    put_raw(&a, &index_key, b"\x00not json".to_vec()).await;
    assert_eq!(facts(&indexed(std::slice::from_ref(&a)).await), truth);
    assert_eq!(index_of(&a, "acme").await.manifests.len(), 1);

    // Crafted: the real entry (its stamp copied from the listing) made to name globex's dump
    // (what prune would delete), an entry for a manifest that does not exist, and a stale
    // stamp claiming other facts.
    let listed = a
        .store
        .list_with_delimiter(Some(&a.at(&key::database_folder("prod", "acme"))))
        .await
        .unwrap();
    let meta = listed
        .objects
        .iter()
        .find(|o| o.location.as_ref().ends_with(".manifest.json"))
        .unwrap();
    let mut hijack = manifest("acme", "20261127T140000Z", &run);
    hijack.object_key = sk("globex", "20261127T140000Z").dump(&run).to_string();
    let mut ghost = manifest("acme", "20261127T130000Z", &run);
    ghost.raw_size = 1;
    let mut stale = manifest("acme", "20261127T140000Z", &run);
    stale.raw_size = 999_999;
    let stamp = catalog_index::Stamp::of(meta).unwrap();
    let crafted = catalog_index::FolderIndex {
        version: 1,
        manifests: vec![
            catalog_index::IndexedManifest {
                stamp: stamp.clone(),
                manifest: hijack,
            },
            catalog_index::IndexedManifest {
                stamp: catalog_index::Stamp {
                    name: "20261127T130000Z.manifest.json".into(),
                    ..stamp.clone()
                },
                manifest: ghost,
            },
        ],
        verifies: Vec::new(),
    };
    put_raw(&a, &index_key, serde_json::to_vec(&crafted).unwrap()).await;
    let c = indexed(std::slice::from_ref(&a)).await;
    assert_eq!(facts(&c), truth);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let stale_index = catalog_index::FolderIndex {
        version: 1,
        manifests: vec![catalog_index::IndexedManifest {
            stamp: catalog_index::Stamp {
                e_tag: Some("not-this-version".into()),
                ..stamp
            },
            manifest: stale,
        }],
        verifies: Vec::new(),
    };
    put_raw(&a, &index_key, serde_json::to_vec(&stale_index).unwrap()).await;
    assert_eq!(facts(&indexed(std::slice::from_ref(&a)).await), truth);
    // Another version of the index format is not read either.
    let mut future = index_of(&a, "acme").await;
    future.version = 99;
    future.manifests[0].manifest.raw_size = 5;
    put_raw(&a, &index_key, serde_json::to_vec(&future).unwrap()).await;
    assert_eq!(facts(&indexed(std::slice::from_ref(&a)).await), truth);
}

#[tokio::test]
async fn a_read_only_credential_lists_without_an_index() {
    let (a, store) = counting("a");
    let run = RunId::random();
    put(&a, &manifest("acme", "20261127T140000Z", &run)).await;
    store
        .read_only
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let truth = facts(&all(std::slice::from_ref(&a)).await);
    for _ in 0..2 {
        let c = indexed(std::slice::from_ref(&a)).await;
        assert_eq!(facts(&c), truth);
        assert!(c.unreachable.is_empty() && c.warnings.is_empty());
    }
    assert!(a
        .store
        .head(&a.at(&key::folder_index("prod", "acme")))
        .await
        .is_err());
}

#[tokio::test]
async fn a_fleet_streams_one_folder_at_a_time_in_key_order() {
    let a = target("a", "pg");
    let b = target("b", "");
    let run = RunId::random();
    for db in ["globex", "acme", "initech"] {
        put(&a, &manifest(db, "20261127T140000Z", &run)).await;
    }
    put(&b, &manifest("zeta", "20261127T150000Z", &run)).await;
    put(&b, &manifest("acme", "20261127T140000Z", &run)).await;
    let plan = Plan::new(&[a, b], SOURCES, &Filter::default()).await;
    let folders: Vec<String> = plan.folders().iter().map(|f| f.to_string()).collect();
    assert_eq!(
        folders,
        vec!["prod/acme", "prod/globex", "prod/initech", "prod/zeta"]
    );
    let pieces: Vec<Catalog> = plan.stream_range(1, 2, Read::Manifests).collect().await;
    let got: Vec<Vec<(&str, &str, Vec<String>)>> = pieces.iter().map(ids).collect();
    assert_eq!(
        got,
        vec![
            vec![("globex", "20261127T140000Z", vec!["a".to_string()])],
            vec![("initech", "20261127T140000Z", vec!["a".to_string()])],
        ]
    );
}

#[tokio::test]
async fn an_unchanged_folder_costs_no_write_even_with_a_bad_manifest_in_it() {
    let (a, store) = counting("a");
    let run = RunId::random();
    put(&a, &manifest("acme", "20261127T140000Z", &run)).await;
    // A truncated manifest and one whose body says another database: never indexed.
    put_raw(
        &a,
        &a.at(&sk("acme", "20261127T150000Z").manifest()),
        b"{\"format_version\": 3, ".to_vec(),
    )
    .await;
    let mut elsewhere = manifest("globex", "20261127T160000Z", &run);
    elsewhere.object_key = sk("acme", "20261127T160000Z").dump(&run).to_string();
    put_raw(
        &a,
        &a.at(&sk("acme", "20261127T160000Z").manifest()),
        elsewhere.to_json(),
    )
    .await;
    let puts = |store: &Counting| store.puts.swap(0, std::sync::atomic::Ordering::SeqCst);
    puts(&store);
    let first = indexed(std::slice::from_ref(&a)).await;
    assert_eq!(puts(&store), 1, "the index is written once");
    assert_eq!(first.warnings.len(), 2, "{:?}", first.warnings);
    for _ in 0..2 {
        let again = indexed(std::slice::from_ref(&a)).await;
        assert_eq!(facts(&again), facts(&first));
        assert_eq!(again.warnings, first.warnings);
        assert_eq!(puts(&store), 0, "nothing changed: no write");
    }
}

/// `m` with a companion-files archive at `files_key` (relative) of `size` bytes.
fn with_files(mut m: Manifest, files_key: &str, size: u64) -> Manifest {
    use crate::storage::manifest::{Files, FilesArchive, FILES_FORMAT_VERSION};
    m.files = Some(Files::Archive(FilesArchive {
        object_key: files_key.into(),
        stored_size: size,
        raw_size: size * 2,
        sha256: "11".repeat(32),
        file_count: 3,
        file_bytes: size,
        skipped: 0,
    }));
    m.format_version = FILES_FORMAT_VERSION;
    m
}

/// A committed snapshot with companion files, as a backup with `files` leaves it: dump,
/// files archive (one byte each), then the manifest naming both.
async fn put_with_files(t: &Target, database: &str, id: &str, run: &RunId) -> Manifest {
    let files = sk(database, id).files_as(run, false);
    let m = with_files(manifest(database, id, run), files.as_ref(), 1);
    put_raw(t, &t.at(&files), b"f".to_vec()).await;
    put(t, &m).await;
    m
}

#[tokio::test]
async fn a_manifest_naming_files_not_its_own_does_not_count() {
    let t = target("a", "pg");
    let run = RunId::random();
    // Two good snapshots with files: the second's archive is what the strays name.
    put_with_files(&t, "acme", "20261127T100000Z", &run).await;
    let theirs = sk("acme", "20261127T100000Z").files_as(&run, false);
    put_with_files(&t, "globex", "20261127T100000Z", &run).await;
    let globex_files = sk("globex", "20261127T100000Z").files_as(&run, false);
    let cases = [
        // Another snapshot's archive, in the same folder.
        ("20261127T110000Z", theirs.to_string()),
        // Another database's archive (another folder).
        ("20261127T120000Z", globex_files.to_string()),
        // Not a files shape: its own dump.
        (
            "20261127T130000Z",
            sk("acme", "20261127T130000Z").dump(&run).to_string(),
        ),
        // A files shape in a subfolder.
        (
            "20261127T140000Z",
            format!("prod/acme/x/20261127T140000Z-{run}.files.tar.zst"),
        ),
        // Outside every configured folder.
        (
            "20261127T150000Z",
            format!("otherteam/20261127T150000Z-{run}.files.tar.zst"),
        ),
    ];
    for (id, files) in &cases {
        let m = with_files(manifest("acme", id, &run), files, 1);
        // The object the stray names exists with its size: only ownership refuses it.
        put_raw(&t, &t.at(&Path::parse(files).unwrap()), b"f".to_vec()).await;
        put(&t, &m).await;
    }

    for c in [
        all(std::slice::from_ref(&t)).await,
        indexed(std::slice::from_ref(&t)).await,
    ] {
        let counted: Vec<(&str, &str)> = c
            .snapshots
            .iter()
            .map(|s| (s.manifest.database.as_str(), s.id()))
            .collect();
        assert_eq!(
            counted,
            vec![("acme", "20261127T100000Z"), ("globex", "20261127T100000Z")],
            "{:?}",
            c.warnings
        );
        assert_eq!(c.warnings.len(), cases.len(), "{:?}", c.warnings);
        for (id, files) in &cases {
            assert!(
                c.warnings
                    .iter()
                    .any(|w| w.contains(&format!("{id}.manifest.json"))
                        && w.contains("files.object_key")
                        && w.contains(files.as_str())),
                "{id}: {:?}",
                c.warnings
            );
        }
        // Whatever a manifest names is never an orphan, even a refused one's.
        let orphans: Vec<String> = c.orphans.iter().map(|o| o.key.to_string()).collect();
        assert!(orphans.is_empty(), "{orphans:?}");
    }
}

#[tokio::test]
async fn files_archives_no_manifest_names_are_orphans_and_their_markers_uploads() {
    let t = target("a", "");
    let (run, other) = (RunId::random(), RunId::random());
    let committed = put_with_files(&t, "acme", "20261127T100000Z", &run).await;
    let s = sk("acme", "20261127T100000Z");
    // Another attempt at the slot left its archive (plain and encrypted) and its marker.
    put_raw(&t, &t.at(&s.files_as(&other, false)), b"f".to_vec()).await;
    put_raw(&t, &t.at(&s.files_as(&other, true)), b"f".to_vec()).await;
    put_raw(&t, &t.at(&s.files_upload_marker(&other)), b"{}".to_vec()).await;
    // The committed run's marker was left behind after its upload completed.
    put_raw(&t, &t.at(&s.files_upload_marker(&run)), b"{}".to_vec()).await;
    // An archive and a marker of a slot that has no manifest at all.
    let lone = sk("acme", "20261127T090000Z");
    put_raw(&t, &t.at(&lone.files_as(&run, false)), b"f".to_vec()).await;
    put_raw(&t, &t.at(&lone.files_upload_marker(&run)), b"{}".to_vec()).await;

    let c = all(std::slice::from_ref(&t)).await;
    assert_eq!(c.snapshots.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let entry = &c.snapshots[0];
    assert_eq!(entry.manifest, {
        let mut m = committed.clone();
        m.tables = None;
        m
    });
    let mut orphans: Vec<String> = c.orphans.iter().map(|o| o.key.to_string()).collect();
    orphans.sort();
    let mut want = vec![
        s.files_as(&other, false).to_string(),
        s.files_as(&other, true).to_string(),
        lone.files_as(&run, false).to_string(),
    ];
    want.sort();
    assert_eq!(orphans, want);
    // Each orphan names its snapshot and run.
    for o in &c.orphans {
        assert!(matches!(
            owned(&o.key),
            Some(OwnedName::Files(_, r)) if r == other || r == run
        ));
    }
    let want = sorted(vec![
        (s.files_upload_marker(&other).to_string(), false),
        (s.files_upload_marker(&run).to_string(), true),
        (lone.files_upload_marker(&run).to_string(), false),
    ]);
    assert_eq!(uploads(&c), want);
    // `damage_of` explains a missing snapshot by its archive left without a manifest.
    let damage = c.damage_of(&[t], "prod", "acme", "20261127T090000Z");
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert!(
        damage[0].contains(".files.tar.zst has no manifest"),
        "{damage:?}"
    );
}

#[tokio::test]
async fn a_copy_whose_files_archive_is_missing_or_truncated_does_not_count_there() {
    let a = target("a", "pg");
    let b = target("b", "");
    let run = RunId::random();
    let slots = ["20261127T100000Z", "20261127T110000Z", "20261127T120000Z"];
    for id in slots {
        put_with_files(&a, "acme", id, &run).await;
        put_with_files(&b, "acme", id, &run).await;
    }
    // Indexed while intact: the index entries must not vouch for the copies below.
    assert_eq!(
        indexed(&[a.clone(), b.clone()]).await.snapshots[0]
            .targets
            .len(),
        2
    );
    // On b: the first's archive is gone, the second's truncated (0 of 1 bytes).
    b.store
        .delete(&b.at(&sk("acme", slots[0]).files_as(&run, false)))
        .await
        .unwrap();
    put_raw(
        &b,
        &b.at(&sk("acme", slots[1]).files_as(&run, false)),
        Vec::new(),
    )
    .await;

    let ab = vec!["a".to_string(), "b".to_string()];
    let want = vec![
        ("acme", slots[2], ab),
        ("acme", slots[1], vec!["a".to_string()]),
        ("acme", slots[0], vec!["a".to_string()]),
    ];
    for c in [
        all(&[a.clone(), b.clone()]).await,
        indexed(&[a.clone(), b.clone()]).await,
    ] {
        assert_eq!(ids(&c), want);
        assert_eq!(c.unreadable.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings.iter().any(|w| w.contains("does not exist")
            && w.contains(&sk("acme", slots[0]).files_as(&run, false).to_string())));
        assert!(c
            .warnings
            .iter()
            .any(|w| w.contains("is 0 bytes, the manifest says 1")));
        // The dumps and archives those manifests name are not orphans.
        assert!(c.orphans.is_empty(), "{:?}", c.orphans);
    }
}

#[tokio::test]
async fn a_target_whose_manifest_disagrees_keeps_its_own_for_its_copy() {
    let (a, b, c) = (target("a", ""), target("b", ""), target("c", ""));
    let run = RunId::random();
    let m = manifest("acme", "20261127T140000Z", &run);
    let mut rewritten = m.clone();
    rewritten.sha256 = "f".repeat(64);
    assert_ne!(rewritten.sha256, m.sha256);
    put(&a, &m).await;
    put(&b, &rewritten).await;
    put(&c, &m).await;
    for cat in [
        all(&[a.clone(), b.clone(), c.clone()]).await,
        indexed(&[a.clone(), b.clone(), c.clone()]).await,
    ] {
        let entry = &cat.snapshots[0];
        assert_eq!(entry.targets, ["a", "b", "c"]);
        assert_eq!(entry.manifest.sha256, m.sha256);
        assert_eq!(entry.manifest_on("a").sha256, m.sha256);
        assert_eq!(entry.manifest_on("b").sha256, rewritten.sha256);
        assert_eq!(entry.manifest_on("c").sha256, m.sha256);
        assert_eq!(entry.disagreeing.keys().collect::<Vec<_>>(), ["b"]);
        assert!(!entry.encryption_disagrees("b"), "only its sha256 differs");
        assert_eq!(entry.targets_from("b").collect::<Vec<_>>(), ["b", "a", "c"]);
    }
    // Agreeing manifests cost nothing extra.
    let cat = all(&[a.clone(), c.clone()]).await;
    assert!(cat.snapshots[0].disagreeing.is_empty());
}
