//! The catalog: which snapshots exist, read from the manifests on every target.
//!
//! A snapshot exists on a target iff its manifest does, and a manifest counts only where
//! pgferry writes it: at exactly `<prefix>/<source>/<database>/<snapshot_id>.manifest.json`
//! for a configured source, with a body whose source, database and snapshot id match that key
//! and whose `object_key` names a dump of that snapshot in the same folder (and whose
//! `files.object_key`, when it has companion files, one of that snapshot's files archives
//! there). Anything else (a manifest copied into a subfolder, a body that says another
//! database, another deployment's objects under a nested prefix, another snapshot's files) is
//! a warning naming the key, and is ignored by `list`, `restore` and `prune` alike. A copy
//! counts only with every object its manifest names listed at the manifest's size.
//!
//! Listing is per configured source and database folder, never recursive over a prefix: the
//! source folder is listed with a delimiter to find its database folders ([`Plan`]), and each
//! database folder with a delimiter to find the objects directly in it. Only names
//! [`key::parse_name`] recognises are looked at. Manifests are read without their `tables`
//! (a summary: listing never needs the table statistics; verify reads them with
//! [`full_manifest`]), with bounded concurrency, and merged by (source, database, snapshot id),
//! noting on which targets each one is and which objects each target's manifest names. Dump
//! and files objects that no manifest in their folder names are reported as orphans, and the
//! markers of
//! open multipart uploads (see `upload`) as uploads, for retention to clean. An unreachable
//! target is reported, not fatal. Snapshots are ordered by when their data was read
//! (`started_at`), newest first.
//!
//! A fleet is read one database folder at a time ([`Plan::stream`]), so memory stays flat in
//! the fleet's size. With [`Read::Indexed`] (listing, the API, metrics) a folder's manifests
//! come from its derived index (`catalog_index`) where the index has exactly the listed
//! version of them, and the index is rewritten when it was stale: the only write this module
//! does, best effort. Whatever decides a deletion or a restore reads the manifests
//! ([`Read::Manifests`], [`load`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::path::{Path, PathPart};
use serde::Serialize;

use crate::storage::catalog_index;
pub use crate::storage::catalog_index::VerifySummary;
use crate::storage::key::{self, OwnedName, SnapshotId, SnapshotKey};
use crate::storage::manifest::Manifest;
use crate::storage::target::{error_text, Target};
use crate::storage::upload;

/// Manifests fetched at once per target.
const FETCH_CONCURRENCY: usize = 16;

/// Database folders listed at once per target: a fleet has hundreds, each one request.
const LIST_CONCURRENCY: usize = 8;

/// Which snapshots to look at.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// One configured source; `None` = every configured source.
    pub source: Option<String>,
    /// Empty = every database.
    pub databases: Vec<String>,
    pub target: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotEntry {
    pub manifest: Manifest,
    /// Targets holding a valid manifest of this snapshot that names the same object as
    /// `manifest` (the copies restore may read), in config order.
    pub targets: Vec<String>,
    /// The newest verify report found on any target.
    pub verify: Option<VerifySummary>,
    /// Per target holding a valid manifest of this snapshot (even one naming another attempt's
    /// objects than `manifest`), the full keys of the objects that target's manifest names:
    /// what prune deletes with the snapshot on that target, and nothing else.
    #[serde(skip)]
    pub objects: BTreeMap<String, CopyKeys>,
    /// Targets of `targets` whose own manifest names the same objects as `manifest` but says
    /// something else about them (sha256, size, encryption…): one bucket's manifest rewritten
    /// or damaged. Each copy is read with its own target's manifest
    /// ([`SnapshotEntry::manifest_on`]), so one bucket's manifest never makes another bucket's
    /// copy unreadable. Empty unless manifests disagree.
    #[serde(skip)]
    pub disagreeing: BTreeMap<String, Manifest>,
}

impl SnapshotEntry {
    pub fn id(&self) -> &str {
        &self.manifest.snapshot_id
    }

    /// The manifest `target` holds for this snapshot: what its copy must be.
    pub fn manifest_on(&self, target: &str) -> &Manifest {
        self.disagreeing.get(target).unwrap_or(&self.manifest)
    }

    /// The targets holding a copy, `first` (the one the dump was read from) first.
    pub fn targets_from<'a>(&'a self, first: &'a str) -> impl Iterator<Item = &'a str> {
        std::iter::once(first).chain(
            self.targets
                .iter()
                .map(String::as_str)
                .filter(move |t| *t != first),
        )
    }

    /// Whether `target`'s own manifest says otherwise about the encryption than `manifest`:
    /// restore and verify do not read that copy (`restore::load::manifest_for`), check
    /// reports it.
    pub fn encryption_disagrees(&self, target: &str) -> bool {
        self.manifest_on(target).encryption != self.manifest.encryption
    }

    /// When the snapshot's data was read (pg_dump's snapshot): its time for "latest", `--at`
    /// and retention. The id only names the schedule slot.
    pub fn data_time(&self) -> DateTime<Utc> {
        self.manifest.started_at
    }
}

/// A dump or companion-files object that no manifest in its folder names: an upload in flight,
/// or a leftover of a crash. Its key names its snapshot and run (`key::parse_name`).
#[derive(Debug, Clone)]
pub struct Orphan {
    pub target: String,
    pub key: Path,
    pub last_modified: DateTime<Utc>,
    pub size: u64,
}

/// The marker of a multipart upload that was not completed or aborted (yet): an upload in
/// flight, or one left open by a process that died.
#[derive(Debug, Clone)]
pub struct OpenUploadMarker {
    pub target: String,
    /// The marker's key (`<snapshot_id>-<run>.upload.json`, or `.files.upload.json` for a
    /// companion-files upload).
    pub key: Path,
    pub last_modified: DateTime<Utc>,
    /// Whether a manifest names the marker's object (then the upload completed and the marker
    /// is stale).
    pub committed: bool,
}

/// A manifest that exists but could not be read, or whose body does not belong at its key.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub target: String,
    pub key: Path,
    /// Why, for humans (names the key).
    pub error: String,
}

#[derive(Debug, Default)]
pub struct Catalog {
    /// Newest data first.
    pub snapshots: Vec<SnapshotEntry>,
    /// Manifests that could not be read or were ignored, with why.
    pub warnings: Vec<String>,
    /// The same manifests, structured: what `restore` looks at to explain a missing snapshot.
    pub unreadable: Vec<Unreadable>,
    /// Targets that could not be listed, with the error.
    pub unreachable: Vec<(String, String)>,
    pub orphans: Vec<Orphan>,
    pub uploads: Vec<OpenUploadMarker>,
}

impl Catalog {
    /// Snapshots of one database, newest data first.
    pub fn of<'a>(
        &'a self,
        source: &'a str,
        database: &'a str,
    ) -> impl Iterator<Item = &'a SnapshotEntry> + 'a {
        self.snapshots
            .iter()
            .filter(move |s| s.manifest.source == source && s.manifest.database == database)
    }

    /// Why a snapshot missing from the catalog is missing, if its objects say so: one line per
    /// unreadable or ignored manifest and per dump object left without a manifest, on
    /// `targets`. Empty when nothing of that snapshot was seen.
    pub fn damage_of(
        &self,
        targets: &[Target],
        source: &str,
        database: &str,
        snapshot_id: &str,
    ) -> Vec<String> {
        let Some(id) = SnapshotId::parse(snapshot_id) else {
            return Vec::new();
        };
        let sk = SnapshotKey::new(source, database, id.clone());
        let mut damage = Vec::new();
        for t in targets {
            let manifest = t.at(&sk.manifest());
            let folder = t.at(&sk.folder());
            damage.extend(
                self.unreadable
                    .iter()
                    .filter(|u| u.target == t.name && u.key == manifest)
                    .map(|u| format!("target {}: {}", t.name, u.error)),
            );
            damage.extend(
                self.orphans
                    .iter()
                    .filter(|o| {
                        o.target == t.name
                            && parent(&o.key) == folder
                            && owned(&o.key).is_some_and(|n| *n.snapshot_id() == id)
                    })
                    .map(|o| format!("target {}: {} has no manifest", t.name, o.key)),
            );
        }
        damage
    }
}

/// How listing learns the small facts of each manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Every manifest is read (without its tables): what decides a deletion or a restore.
    Manifests,
    /// Through each folder's derived index (`catalog_index`), checked against the listing;
    /// what is missing or stale in it is read and the index rewritten (best effort). For
    /// listing and reporting.
    Indexed,
}

/// The database folders a catalog read covers, found once, then read one at a time.
#[derive(Clone)]
pub struct Plan {
    /// The selected targets that could be listed (clones share their clients).
    targets: std::sync::Arc<Vec<Target>>,
    /// Folders relative to a target's prefix, ordered by key.
    folders: Vec<Path>,
    /// Targets whose source folders could not be listed: left out of every folder.
    unreachable: Vec<(String, String)>,
}

impl Plan {
    /// Lists the selected sources' folders on the selected targets (one LIST per source and
    /// target, none when the filter names the databases).
    pub async fn new(targets: &[Target], sources: &[&str], filter: &Filter) -> Plan {
        let sources: Vec<&str> = sources
            .iter()
            .copied()
            .filter(|s| filter.source.as_deref().is_none_or(|f| f == *s))
            .collect();
        let selected: Vec<&Target> = targets
            .iter()
            .filter(|t| filter.target.as_deref().is_none_or(|n| n == t.name))
            .collect();
        let listings = futures::future::join_all(
            selected
                .iter()
                .map(|t| database_folders(t, &sources, filter)),
        )
        .await;
        let mut reachable = Vec::new();
        let mut unreachable = Vec::new();
        let mut seen: HashSet<Path> = HashSet::new();
        let mut folders: Vec<Path> = Vec::new();
        for (t, listing) in selected.into_iter().zip(listings) {
            match listing {
                Ok(found) => {
                    reachable.push(t.clone());
                    for folder in found {
                        if seen.insert(folder.clone()) {
                            folders.push(folder);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(message = "Cannot list a target.", target = %t.name, error = %error_text(&e));
                    unreachable.push((t.name.clone(), error_text(&e)));
                }
            }
        }
        // By key, so that a position in the plan (an API cursor) survives a new plan.
        folders.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        Plan {
            targets: std::sync::Arc::new(reachable),
            folders,
            unreachable,
        }
    }

    /// Targets that could not be listed at all, with the error.
    pub fn unreachable(&self) -> &[(String, String)] {
        &self.unreachable
    }

    /// The folders, relative to a target's prefix, in the order they are read.
    pub fn folders(&self) -> &[Path] {
        &self.folders
    }

    /// The catalog of each folder, merged across targets, in the plan's order, reading
    /// [`LIST_CONCURRENCY`] folders at once: memory is a few folders', whatever the fleet.
    /// A target failing on one folder is in that piece's `unreachable`.
    pub fn stream(self, read: Read) -> impl futures::Stream<Item = Catalog> + Send {
        self.stream_range(0, usize::MAX, read)
    }

    /// [`Plan::stream`] of at most `take` folders from the `skip`th on.
    pub fn stream_range(
        self,
        skip: usize,
        take: usize,
        read: Read,
    ) -> impl futures::Stream<Item = Catalog> + Send {
        let targets = self.targets;
        futures::stream::iter(self.folders.into_iter().skip(skip).take(take))
            .map(move |rel| {
                let targets = targets.clone();
                async move { load_merged(&targets, &rel, read).await }
            })
            .buffered(LIST_CONCURRENCY)
    }
}

/// Reads the catalog of the configured `sources` from `targets` (those the filter selects),
/// every manifest read ([`Read::Manifests`]), all of it in memory: for the commands that
/// decide on it (prune, restore, check). A fleet-wide listing streams a [`Plan`] instead.
pub async fn load(targets: &[Target], sources: &[&str], filter: &Filter) -> Catalog {
    load_with(targets, sources, filter, Read::Manifests).await
}

/// [`load`], reading the manifests as `read` says.
pub async fn load_with(
    targets: &[Target],
    sources: &[&str],
    filter: &Filter,
    read: Read,
) -> Catalog {
    let plan = Plan::new(targets, sources, filter).await;
    let mut catalog = Catalog {
        unreachable: plan.unreachable.clone(),
        ..Catalog::default()
    };
    let mut pieces = std::pin::pin!(plan.stream(read));
    while let Some(mut piece) = pieces.next().await {
        catalog.snapshots.append(&mut piece.snapshots);
        catalog.warnings.append(&mut piece.warnings);
        catalog.unreadable.append(&mut piece.unreadable);
        catalog.orphans.append(&mut piece.orphans);
        catalog.uploads.append(&mut piece.uploads);
        for (t, e) in piece.unreachable {
            if !catalog.unreachable.iter().any(|(n, _)| *n == t) {
                catalog.unreachable.push((t, e));
            }
        }
    }
    sort_newest_first(&mut catalog.snapshots);
    catalog
}

fn sort_newest_first(snapshots: &mut [SnapshotEntry]) {
    snapshots.sort_by(|a, b| {
        b.data_time()
            .cmp(&a.data_time())
            .then_with(|| b.manifest.snapshot_id.cmp(&a.manifest.snapshot_id))
            .then_with(|| a.manifest.source.cmp(&b.manifest.source))
            .then_with(|| a.manifest.database.cmp(&b.manifest.database))
    });
}

/// One database folder (relative `rel`) on every target, merged.
async fn load_merged(targets: &[Target], rel: &Path, read: Read) -> Catalog {
    let listings = futures::future::join_all(targets.iter().map(|t| async move {
        let folder = t.at(rel);
        load_folder(t, &folder, read).await
    }))
    .await;
    let mut catalog = Catalog::default();
    let mut merged: BTreeMap<(String, String, String), SnapshotEntry> = BTreeMap::new();
    for (t, listing) in targets.iter().zip(listings) {
        let listing = match listing {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(message = "Cannot list a target.", target = %t.name, folder = %rel, error = %error_text(&e));
                catalog.unreachable.push((t.name.clone(), error_text(&e)));
                continue;
            }
        };
        catalog.warnings.extend(listing.warnings);
        catalog.unreadable.extend(listing.unreadable);
        catalog.orphans.extend(listing.orphans);
        catalog.uploads.extend(listing.uploads);
        for found in listing.manifests {
            let m = found.manifest;
            let key = (m.source.clone(), m.database.clone(), m.snapshot_id.clone());
            let entry = merged.entry(key).or_insert_with(|| SnapshotEntry {
                manifest: m.clone(),
                targets: Vec::new(),
                verify: None,
                objects: BTreeMap::new(),
                disagreeing: BTreeMap::new(),
            });
            // Every target's own objects, for prune (which deletes that target's copy).
            entry.objects.insert(t.name.clone(), found.objects);
            // Two attempts at one slot can leave manifests naming different objects on
            // different targets: a copy counts (for restore) only with the manifest it was
            // written with, and the newest wins.
            if !same_objects(&entry.manifest, &m) {
                if m.finished_at <= entry.manifest.finished_at {
                    continue;
                }
                entry.manifest = m;
                entry.targets.clear();
                entry.disagreeing.clear();
                entry.verify = None;
            } else if m != entry.manifest {
                entry.disagreeing.insert(t.name.clone(), m);
            }
            entry.targets.push(t.name.clone());
            if let Some(v) = found.verify {
                if entry
                    .verify
                    .as_ref()
                    .is_none_or(|old| old.finished_at < v.finished_at)
                {
                    entry.verify = Some(v);
                }
            }
        }
    }
    catalog.snapshots = merged.into_values().collect();
    sort_newest_first(&mut catalog.snapshots);
    catalog
}

/// A valid manifest on one target.
struct Found {
    manifest: Manifest,
    /// Full keys of the objects it names.
    objects: CopyKeys,
    verify: Option<VerifySummary>,
}

/// The full keys of the objects one target's manifest of a snapshot names, checked to be that
/// snapshot's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyKeys {
    pub dump: Path,
    /// The companion-files archive, when the manifest has one.
    pub files: Option<Path>,
}

/// Whether two manifests of one snapshot name the same objects (are the same attempt's).
pub fn same_objects(a: &Manifest, b: &Manifest) -> bool {
    a.object_key == b.object_key
        && a.files_archive().map(|f| &f.object_key) == b.files_archive().map(|f| &f.object_key)
}

/// Why the copy of manifest `m` (whose objects are `named`) is damaged on a target whose
/// listing is `metas`: an object missing or of another size than the manifest says. `None`:
/// every object is there with its size.
fn damage(
    metas: &HashMap<&Path, &object_store::ObjectMeta>,
    named: &CopyKeys,
    m: &Manifest,
) -> Option<String> {
    let mut objects = vec![(&named.dump, m.stored_size)];
    if let (Some(files), Some(a)) = (&named.files, m.files_archive()) {
        objects.push((files, a.stored_size));
    }
    objects.into_iter().find_map(|(object, want)| {
        match metas.get(object).map(|o| o.size) {
            Some(size) if size == want => None,
            Some(size) => Some(format!(
                "the object it names, {object}, is {size} bytes, the manifest says {want}; this copy is damaged (`pgferry repair` can replace it from another target)"
            )),
            None => Some(format!(
                "the object it names, {object}, does not exist; this copy is damaged (`pgferry repair` can replace it from another target)"
            )),
        }
    })
}

#[derive(Default)]
struct Listing {
    manifests: Vec<Found>,
    warnings: Vec<String>,
    unreadable: Vec<Unreadable>,
    orphans: Vec<Orphan>,
    uploads: Vec<OpenUploadMarker>,
}

/// The database folders (relative to the prefix) of the selected sources on `t`: the
/// filter's databases, or every folder directly under each source's folder.
async fn database_folders(
    t: &Target,
    sources: &[&str],
    filter: &Filter,
) -> Result<Vec<Path>, object_store::Error> {
    let mut folders = Vec::new();
    for source in sources {
        if filter.databases.is_empty() {
            let source_folder = Path::from_iter([PathPart::from(*source)]);
            let listed = list_folder(t, &t.at(&source_folder)).await?;
            for prefix in listed.common_prefixes {
                // The database segment as listed (already encoded), under the source.
                if let Some(db) = prefix.parts().last() {
                    folders.push(Path::from_iter([PathPart::from(*source), db]));
                }
            }
        } else {
            folders.extend(
                filter
                    .databases
                    .iter()
                    .map(|d| key::database_folder(source, d)),
            );
        }
    }
    Ok(folders)
}

/// The objects directly in `folder` and its subfolders' names; a folder that does not exist
/// is empty.
async fn list_folder(
    t: &Target,
    folder: &Path,
) -> Result<object_store::ListResult, object_store::Error> {
    match t.store.list_with_delimiter(Some(folder)).await {
        Err(object_store::Error::NotFound { .. }) => Ok(object_store::ListResult {
            common_prefixes: Vec::new(),
            objects: Vec::new(),
        }),
        other => other,
    }
}

/// The object names pgferry owns directly in one database folder, read and checked.
async fn load_folder(
    t: &Target,
    folder: &Path,
    read: Read,
) -> Result<Listing, object_store::Error> {
    let listed = list_folder(t, folder).await?;
    let metas: HashMap<&Path, &object_store::ObjectMeta> =
        listed.objects.iter().map(|o| (&o.location, o)).collect();
    let lookup = match read {
        Read::Indexed => catalog_index::read(t, &listed.objects).await,
        Read::Manifests => catalog_index::Lookup::default(),
    };
    let mut index = catalog_index::FolderIndex::default();
    let manifest_metas: Vec<(&object_store::ObjectMeta, SnapshotId)> = listed
        .objects
        .iter()
        .filter_map(|o| match owned(&o.location)? {
            OwnedName::Manifest(id) => Some((o, id)),
            _ => None,
        })
        .collect();
    let mut read_results: Vec<(Path, SnapshotId, Result<Manifest, String>)> = Vec::new();
    let mut to_read = Vec::new();
    for (meta, id) in manifest_metas {
        // An index entry counts only for this very version of the manifest, and only if it
        // passes every check a manifest read now would have to (its key, and its object there
        // with its size, as below): otherwise the manifest is read. A wrong entry must never
        // hide an intact snapshot as "damaged" (review 15).
        let passes = |m: &Manifest| {
            check_manifest(t, folder, &meta.location, &id, m)
                .is_ok_and(|named| damage(&metas, &named, m).is_none())
        };
        match lookup.manifest(meta) {
            Some(m) if passes(&m) => {
                push_indexed(&mut index, meta, &m);
                read_results.push((meta.location.clone(), id, Ok(m)));
            }
            _ => to_read.push((meta.clone(), id)),
        }
    }
    let fresh: Vec<(
        object_store::ObjectMeta,
        SnapshotId,
        Result<Manifest, String>,
    )> = futures::stream::iter(to_read.into_iter().map(|(meta, id)| async move {
        let manifest = read_summary(t, &meta.location)
            .await
            .map_err(|e| e.to_string());
        (meta, id, manifest)
    }))
    .buffer_unordered(FETCH_CONCURRENCY)
    .collect()
    .await;
    for (meta, id, manifest) in fresh {
        if let Ok(m) = &manifest {
            push_indexed(&mut index, &meta, m);
        }
        read_results.push((meta.location, id, manifest));
    }

    let mut listing = Listing::default();
    // Dumps and files archives named by any manifest body in this folder (valid or not):
    // never orphans.
    let mut named: HashSet<Path> = HashSet::new();
    // Snapshots with a manifest that could not be read: we cannot know what it names, so their
    // dumps and markers are left alone.
    let mut unknown: HashSet<SnapshotId> = HashSet::new();
    let mut valid = Vec::new();
    for (key, id, manifest) in read_results {
        let why = match manifest {
            Err(why) => {
                unknown.insert(id);
                why
            }
            Ok(m) => {
                let files = m.files_archive().map(|a| a.object_key.as_str());
                for object in std::iter::once(m.object_key.as_str()).chain(files) {
                    if let Some(rel) = key::object_path(object) {
                        named.insert(t.at(&rel));
                    }
                }
                match check_manifest(t, folder, &key, &id, &m) {
                    // Every object must be there with the manifest's size: a manifest whose
                    // dump or files are gone (or were never written) is no snapshot, so
                    // retention never keeps it in place of a real one.
                    Ok(objects) => match damage(&metas, &objects, &m) {
                        None => {
                            valid.push((m, objects, id));
                            continue;
                        }
                        Some(why) => why,
                    },
                    Err(why) => why,
                }
            }
        };
        tracing::warn!(message = "Ignoring a manifest.", target = %t.name, key = %key, error = %why);
        listing
            .warnings
            .push(format!("target {}: ignoring {key}: {why}", t.name));
        listing.unreadable.push(Unreadable {
            target: t.name.clone(),
            key,
            error: why,
        });
    }
    let mut verify_reads = Vec::new();
    for (m, objects, id) in valid {
        let sk = SnapshotKey::new(&m.source, &m.database, id);
        let verify_key = t.at(&sk.verify());
        let meta = metas.get(&verify_key).copied();
        let indexed = meta.and_then(|meta| lookup.verify(meta));
        if let (Some(meta), Some(v)) = (meta, &indexed) {
            push_verify(&mut index, meta, v);
        }
        verify_reads.push(async move {
            let verify = match (indexed, meta) {
                (Some(mut v), _) => {
                    v.target = t.name.clone();
                    Some((v, None))
                }
                (None, Some(meta)) => read_verify(t, &verify_key).await.map(|v| (v, Some(meta))),
                (None, None) => None,
            };
            (m, objects, verify)
        });
    }
    let found: Vec<_> = futures::stream::iter(verify_reads)
        .buffer_unordered(FETCH_CONCURRENCY)
        .collect()
        .await;
    for (manifest, objects, verify) in found {
        let verify = verify.map(|(v, read_now)| {
            if let Some(meta) = read_now {
                push_verify(&mut index, meta, &v);
            }
            v
        });
        listing.manifests.push(Found {
            manifest,
            objects,
            verify,
        });
    }
    // Written only when it would change: a folder whose manifests did not change (even one
    // with a manifest that cannot be read, which is never indexed) costs no write.
    if read == Read::Indexed && !lookup.holds_exactly(&index) {
        catalog_index::write(t, folder, index).await;
    }

    for o in &listed.objects {
        match owned(&o.location) {
            Some(OwnedName::Dump(id, _) | OwnedName::Files(id, _))
                if !named.contains(&o.location) && !unknown.contains(&id) =>
            {
                listing.orphans.push(Orphan {
                    target: t.name.clone(),
                    key: o.location.clone(),
                    last_modified: o.last_modified,
                    size: o.size,
                });
            }
            Some(OwnedName::UploadMarker(id, _) | OwnedName::FilesUploadMarker(id, _)) => {
                let Some(dumps) = upload::dump_keys(&o.location) else {
                    continue;
                };
                if unknown.contains(&id) {
                    continue;
                }
                listing.uploads.push(OpenUploadMarker {
                    target: t.name.clone(),
                    key: o.location.clone(),
                    last_modified: o.last_modified,
                    committed: dumps.iter().any(|d| named.contains(d)),
                });
            }
            _ => {}
        }
    }
    Ok(listing)
}

fn push_indexed(
    index: &mut catalog_index::FolderIndex,
    meta: &object_store::ObjectMeta,
    m: &Manifest,
) {
    if let Some(stamp) = catalog_index::Stamp::of(meta) {
        index.manifests.push(catalog_index::IndexedManifest {
            stamp,
            manifest: m.clone(),
        });
    }
}

fn push_verify(
    index: &mut catalog_index::FolderIndex,
    meta: &object_store::ObjectMeta,
    v: &VerifySummary,
) {
    if let Some(stamp) = catalog_index::Stamp::of(meta) {
        index.verifies.push(catalog_index::IndexedVerify {
            stamp,
            verify: v.clone(),
        });
    }
}

/// Whether manifest `m`, read from `key` in `folder` under the name of snapshot `id`, belongs
/// there; if so, the full keys of the dump and files archive it names.
fn check_manifest(
    t: &Target,
    folder: &Path,
    key: &Path,
    id: &SnapshotId,
    m: &Manifest,
) -> Result<CopyKeys, String> {
    if m.snapshot_id != id.as_str() {
        return Err(format!(
            "its body says snapshot {:?}, its name {id}",
            m.snapshot_id
        ));
    }
    let sk = SnapshotKey::new(&m.source, &m.database, id.clone());
    let own_key = t.at(&sk.manifest());
    if own_key != *key {
        return Err(format!(
            "its body says {}/{}, whose manifest would be {own_key}; a manifest counts only at its own key (a copy or a misplaced file?)",
            m.source, m.database
        ));
    }
    let object = key::object_path(&m.object_key).map(|rel| t.at(&rel));
    let names_own_dump = object.as_ref().is_some_and(|o| {
        parent(o) == *folder && matches!(owned(o), Some(OwnedName::Dump(ref d, _)) if d == id)
    });
    let Some(object) = object.filter(|_| names_own_dump) else {
        return Err(format!(
            "its object_key {:?} is not a dump of this snapshot in its folder",
            m.object_key
        ));
    };
    // The same rule for the companion files: only an archive of this very snapshot, in its
    // folder (never another snapshot's, whose prune would take it away).
    let files = match m.files_archive() {
        None => None,
        Some(a) => match key::object_path(&a.object_key) {
            Some(rel) if sk.owns_files_object(&a.object_key) => Some(t.at(&rel)),
            _ => {
                return Err(format!(
                "its files.object_key {:?} is not a files archive of this snapshot in its folder",
                a.object_key
            ))
            }
        },
    };
    Ok(CopyKeys {
        dump: object,
        files,
    })
}

/// What pgferry object `key` is, by its file name; `None`: not pgferry's.
fn owned(key: &Path) -> Option<OwnedName> {
    key::parse_name(key.filename()?)
}

/// The folder holding `key`.
fn parent(key: &Path) -> Path {
    let parts: Vec<PathPart<'_>> = key.parts().collect();
    Path::from_iter(parts[..parts.len().saturating_sub(1)].iter().cloned())
}

/// Reads one manifest without its tables ([`Manifest::summary_from_json`]).
pub async fn read_summary(
    t: &Target,
    key: &Path,
) -> Result<Manifest, Box<dyn std::error::Error + Send + Sync>> {
    let bytes = t.store.get(key).await?.bytes().await?;
    Ok(Manifest::summary_from_json(key.as_ref(), &bytes)?)
}

/// The full manifest (with `tables`) of a catalog entry, read from the first of its targets
/// whose manifest still names the entry's object: what verify compares row counts with.
pub async fn full_manifest(targets: &[Target], entry: &SnapshotEntry) -> Result<Manifest, String> {
    full_manifest_from(targets, entry, None).await
}

/// [`full_manifest`], read from target `first` before the others (the target whose copy was
/// read: its own manifest, which may disagree with the others').
pub async fn full_manifest_from(
    targets: &[Target],
    entry: &SnapshotEntry,
    first: Option<&str>,
) -> Result<Manifest, String> {
    let m = &entry.manifest;
    let Some(id) = SnapshotId::parse(&m.snapshot_id) else {
        return Err(format!("invalid snapshot id {:?}", m.snapshot_id));
    };
    let key = SnapshotKey::new(&m.source, &m.database, id).manifest();
    let mut errors = Vec::new();
    let holding = || targets.iter().filter(|t| entry.targets.contains(&t.name));
    let ordered = holding()
        .filter(|t| Some(t.name.as_str()) == first)
        .chain(holding().filter(|t| Some(t.name.as_str()) != first));
    for t in ordered {
        match read_manifest(t, &t.at(&key)).await {
            Ok(full) if full.object_key == m.object_key => return Ok(full),
            Ok(_) => errors.push(format!("target {}: its manifest changed", t.name)),
            Err(e) => errors.push(format!("target {}: {e}", t.name)),
        }
    }
    Err(format!(
        "cannot read the manifest of {}/{}/{} again: {}",
        m.source,
        m.database,
        m.snapshot_id,
        errors.join("; ")
    ))
}

/// Reads and parses one manifest, with its tables.
pub async fn read_manifest(
    t: &Target,
    key: &Path,
) -> Result<Manifest, Box<dyn std::error::Error + Send + Sync>> {
    let bytes = t.store.get(key).await?.bytes().await?;
    Ok(Manifest::from_json(key.as_ref(), &bytes)?)
}

async fn read_verify(t: &Target, key: &Path) -> Option<VerifySummary> {
    let bytes = t.store.get(key).await.ok()?.bytes().await.ok()?;
    match serde_json::from_slice::<VerifySummary>(&bytes) {
        Ok(mut v) => {
            v.target = t.name.clone();
            Some(v)
        }
        Err(error) => {
            tracing::warn!(message = "Skipping an unreadable verify report.", target = %t.name, key = %key, error = %error);
            None
        }
    }
}

/// Groups snapshots by (source, database), each group newest data first.
pub fn by_database(snapshots: &[SnapshotEntry]) -> HashMap<(String, String), Vec<&SnapshotEntry>> {
    let mut map: HashMap<(String, String), Vec<&SnapshotEntry>> = HashMap::new();
    for s in snapshots {
        map.entry((s.manifest.source.clone(), s.manifest.database.clone()))
            .or_default()
            .push(s);
    }
    map
}

#[cfg(test)]
#[path = "catalog_tests.rs"]
mod tests;
