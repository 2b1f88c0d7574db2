//! The catalog: which snapshots exist, read from the manifests on every target.
//!
//! A snapshot exists on a target iff its manifest does. The catalog lists each target,
//! reads the manifests (bounded concurrency), merges them by (source, database, snapshot id)
//! and notes on which targets each one is. Unreadable manifests are skipped with a warning
//! naming the key; an unreachable target is reported, not fatal. Dump objects that have no
//! manifest are reported as orphans, and the markers of open multipart uploads (see
//! `upload`) as uploads, for retention to clean. This module never writes.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::storage::manifest::Manifest;
use crate::storage::target::{Target, DUMP_SUFFIX, MANIFEST_SUFFIX, UPLOAD_SUFFIX, VERIFY_SUFFIX};

/// Manifests fetched at once per target.
const FETCH_CONCURRENCY: usize = 16;

/// Which snapshots to look at.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub source: Option<String>,
    /// Empty = every database.
    pub databases: Vec<String>,
    pub target: Option<String>,
}

/// The gist of a restore-verify report, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifySummary {
    pub result: String,
    pub finished_at: DateTime<Utc>,
    #[serde(default)]
    pub target: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotEntry {
    pub manifest: Manifest,
    /// Targets holding a readable manifest of this snapshot, in config order.
    pub targets: Vec<String>,
    /// The newest verify report found on any target.
    pub verify: Option<VerifySummary>,
}

impl SnapshotEntry {
    pub fn id(&self) -> &str {
        &self.manifest.snapshot_id
    }
}

/// A dump object without a manifest: an upload in flight, or a leftover of a crash.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub target: String,
    pub key: object_store::path::Path,
    pub last_modified: DateTime<Utc>,
    pub size: u64,
}

/// The marker of a multipart upload that was not completed or aborted (yet): an upload in
/// flight, or one left open by a process that died.
#[derive(Debug, Clone)]
pub struct OpenUploadMarker {
    pub target: String,
    /// The marker's key (`<snapshot_id>.upload.json`).
    pub key: object_store::path::Path,
    pub last_modified: DateTime<Utc>,
    /// Whether the snapshot has a manifest on this target (then the marker is stale).
    pub committed: bool,
}

/// A manifest that exists but could not be read or parsed.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub target: String,
    pub key: object_store::path::Path,
    /// Why, for humans (names the key).
    pub error: String,
}

#[derive(Debug, Default)]
pub struct Catalog {
    /// Newest first.
    pub snapshots: Vec<SnapshotEntry>,
    /// Manifests that could not be read, with why.
    pub warnings: Vec<String>,
    /// The same manifests, structured: what `restore` looks at to explain a missing snapshot.
    pub unreadable: Vec<Unreadable>,
    /// Targets that could not be listed, with the error.
    pub unreachable: Vec<(String, String)>,
    pub orphans: Vec<Orphan>,
    pub uploads: Vec<OpenUploadMarker>,
}

impl Catalog {
    /// Snapshots of one database, newest first.
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
    /// unreadable manifest and per dump object left without a manifest, on `targets`. Empty
    /// when nothing of that snapshot was seen.
    pub fn damage_of(
        &self,
        targets: &[Target],
        source: &str,
        database: &str,
        snapshot_id: &str,
    ) -> Vec<String> {
        let mut damage = Vec::new();
        for t in targets {
            let manifest = t.key(source, database, snapshot_id, MANIFEST_SUFFIX);
            let dump = t.key(source, database, snapshot_id, DUMP_SUFFIX);
            damage.extend(
                self.unreadable
                    .iter()
                    .filter(|u| u.target == t.name && u.key == manifest)
                    .map(|u| format!("target {}: {}", t.name, u.error)),
            );
            damage.extend(
                self.orphans
                    .iter()
                    .filter(|o| o.target == t.name && o.key == dump)
                    .map(|o| format!("target {}: {} has no manifest", t.name, o.key)),
            );
        }
        damage
    }
}

/// Reads the catalog from `targets` (those the filter selects).
pub async fn load(targets: &[Target], filter: &Filter) -> Catalog {
    let mut catalog = Catalog::default();
    let mut merged: BTreeMap<(String, String, String), SnapshotEntry> = BTreeMap::new();
    let selected: Vec<&Target> = targets
        .iter()
        .filter(|t| filter.target.as_deref().is_none_or(|n| n == t.name))
        .collect();
    let listings = futures::future::join_all(selected.iter().map(|t| load_target(t, filter))).await;
    for (t, listing) in selected.iter().zip(listings) {
        let listing = match listing {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(message = "Cannot list a target.", target = %t.name, error = %crate::storage::target::error_text(&e));
                catalog
                    .unreachable
                    .push((t.name.clone(), crate::storage::target::error_text(&e)));
                continue;
            }
        };
        catalog.warnings.extend(listing.warnings);
        catalog.unreadable.extend(listing.unreadable);
        catalog.orphans.extend(listing.orphans);
        catalog.uploads.extend(listing.uploads);
        for (manifest, verify) in listing.manifests {
            let key = (
                manifest.source.clone(),
                manifest.database.clone(),
                manifest.snapshot_id.clone(),
            );
            let entry = merged.entry(key).or_insert_with(|| SnapshotEntry {
                manifest: manifest.clone(),
                targets: Vec::new(),
                verify: None,
            });
            // Two attempts at one slot can leave manifests naming different objects on
            // different targets (one of them failed on a target that still had the other's):
            // a copy counts only with the manifest it was written with, and the newest wins.
            if entry.manifest.object_key != manifest.object_key {
                if manifest.finished_at <= entry.manifest.finished_at {
                    continue;
                }
                entry.manifest = manifest;
                entry.targets.clear();
                entry.verify = None;
            }
            entry.targets.push(t.name.clone());
            if let Some(v) = verify {
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
    catalog.snapshots.sort_by(|a, b| {
        b.manifest
            .snapshot_id
            .cmp(&a.manifest.snapshot_id)
            .then_with(|| a.manifest.source.cmp(&b.manifest.source))
            .then_with(|| a.manifest.database.cmp(&b.manifest.database))
    });
    catalog
}

struct Listing {
    manifests: Vec<(Manifest, Option<VerifySummary>)>,
    warnings: Vec<String>,
    unreadable: Vec<Unreadable>,
    orphans: Vec<Orphan>,
    uploads: Vec<OpenUploadMarker>,
}

async fn load_target(t: &Target, filter: &Filter) -> Result<Listing, object_store::Error> {
    let folders = if filter.databases.is_empty() {
        vec![t.folder(filter.source.as_deref(), None)]
    } else if let Some(source) = &filter.source {
        filter
            .databases
            .iter()
            .map(|d| t.folder(Some(source), Some(d)))
            .collect()
    } else {
        // Databases without a source: list everything, filter by the manifests' fields.
        vec![t.folder(None, None)]
    };
    let mut objects = Vec::new();
    for folder in folders {
        let mut listed: Vec<object_store::ObjectMeta> =
            t.store.list(Some(&folder)).try_collect().await?;
        objects.append(&mut listed);
    }
    let names: HashSet<String> = objects.iter().map(|o| o.location.to_string()).collect();
    let mut orphans = Vec::new();
    let mut uploads = Vec::new();
    let mut manifest_keys = Vec::new();
    for o in &objects {
        let key = o.location.to_string();
        if let Some(stem) = key.strip_suffix(MANIFEST_SUFFIX) {
            manifest_keys.push((o.location.clone(), format!("{stem}{VERIFY_SUFFIX}")));
        } else if key.ends_with(DUMP_SUFFIX) {
            // An orphan unless a manifest names it (checked once the manifests are read).
            orphans.push(Orphan {
                target: t.name.clone(),
                key: o.location.clone(),
                last_modified: o.last_modified,
                size: o.size,
            });
        } else if let Some(stem) = key.strip_suffix(UPLOAD_SUFFIX) {
            uploads.push(OpenUploadMarker {
                target: t.name.clone(),
                key: o.location.clone(),
                last_modified: o.last_modified,
                committed: names.contains(&format!("{stem}{MANIFEST_SUFFIX}")),
            });
        }
    }
    let results: Vec<_> =
        futures::stream::iter(manifest_keys.into_iter().map(|(key, verify_key)| {
            let has_verify = names.contains(&verify_key);
            async move {
                let manifest = read_manifest(t, &key).await;
                let verify = if has_verify && manifest.is_ok() {
                    read_verify(t, &object_store::path::Path::from(verify_key)).await
                } else {
                    None
                };
                (key, manifest, verify)
            }
        }))
        .buffer_unordered(FETCH_CONCURRENCY)
        .collect()
        .await;
    let mut manifests = Vec::new();
    let mut warnings = Vec::new();
    let mut unreadable = Vec::new();
    let mut named = HashSet::new();
    for (key, manifest, verify) in results {
        let manifest = manifest.and_then(|m| {
            let owns = crate::storage::key::SnapshotId::parse(&m.snapshot_id).is_some_and(|id| {
                crate::storage::key::SnapshotKey::new(&m.source, &m.database, id)
                    .owns_object(&m.object_key)
            });
            if owns {
                Ok(m)
            } else {
                Err(format!(
                    "manifest {key} names object {:?}, which is not a dump key of snapshot {}/{}/{}; ignored (pgferry never follows it)",
                    m.object_key, m.source, m.database, m.snapshot_id
                )
                .into())
            }
        });
        match manifest {
            Ok(m) => {
                if let Some(object) = crate::storage::key::object_path(&m.object_key) {
                    named.insert(t.at(&object));
                }
                let wanted = filter.source.as_deref().is_none_or(|s| s == m.source)
                    && (filter.databases.is_empty() || filter.databases.contains(&m.database));
                if wanted {
                    manifests.push((m, verify));
                }
            }
            Err(e) => {
                let w = format!("target {}: skipping {key}: {e}", t.name);
                tracing::warn!(message = "Skipping an unreadable manifest.", target = %t.name, key = %key, error = %e);
                warnings.push(w);
                unreadable.push(Unreadable {
                    target: t.name.clone(),
                    key,
                    error: e.to_string(),
                });
            }
        }
    }
    // A dump that a manifest names is that snapshot's (write-once keys: `<id>-<run>`), and
    // one whose snapshot has an unreadable manifest may be too: neither is an orphan.
    let unreadable_keys: HashSet<String> = unreadable.iter().map(|u| u.key.to_string()).collect();
    orphans.retain(|o| {
        let manifest_of_its_slot = o.key.as_ref().rsplit_once('/').and_then(|(dir, name)| {
            match crate::storage::key::parse_name(name)? {
                crate::storage::key::OwnedName::Dump(id, _) => {
                    Some(format!("{dir}/{id}{MANIFEST_SUFFIX}"))
                }
                _ => None,
            }
        });
        !named.contains(&o.key)
            && manifest_of_its_slot.is_none_or(|m| !unreadable_keys.contains(&m))
    });
    Ok(Listing {
        manifests,
        warnings,
        unreadable,
        orphans,
        uploads,
    })
}

/// Reads and parses one manifest.
pub async fn read_manifest(
    t: &Target,
    key: &object_store::path::Path,
) -> Result<Manifest, Box<dyn std::error::Error + Send + Sync>> {
    let bytes = t.store.get(key).await?.bytes().await?;
    Ok(Manifest::from_json(key.as_ref(), &bytes)?)
}

async fn read_verify(t: &Target, key: &object_store::path::Path) -> Option<VerifySummary> {
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

/// Groups snapshots by (source, database), each group newest first.
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
mod tests {
    use super::*;
    use crate::storage::manifest::tests::sample;
    use object_store::memory::InMemory;
    use object_store::{ObjectStore, PutPayload};
    use std::sync::Arc;

    async fn put(t: &Target, m: &Manifest) {
        let mut m = m.clone();
        m.object_key = crate::storage::target::snapshot_path(
            &m.source,
            &m.database,
            &m.snapshot_id,
            DUMP_SUFFIX,
        )
        .to_string();
        let m = &m;
        let key = t.key(&m.source, &m.database, &m.snapshot_id, MANIFEST_SUFFIX);
        t.store
            .put(&key, PutPayload::from(m.to_json()))
            .await
            .unwrap();
        let dump = t.key(&m.source, &m.database, &m.snapshot_id, DUMP_SUFFIX);
        t.store
            .put(&dump, PutPayload::from_static(b"x"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn merges_targets_newest_first_and_skips_bad_manifests() {
        let a = Target::new("a", Arc::new(InMemory::new()), "pg", 10_000);
        let b = Target::new("b", Arc::new(InMemory::new()), "", 10_000);
        let m1 = sample();
        let mut m2 = sample();
        m2.snapshot_id = "20261127T150000Z".into();
        put(&a, &m1).await;
        put(&a, &m2).await;
        put(&b, &m1).await;
        // A truncated manifest and an orphan dump on b.
        let bad = b.key("prod", "acme", "20261127T160000Z", MANIFEST_SUFFIX);
        b.store
            .put(&bad, PutPayload::from_static(b"{\"format_version\": 2, "))
            .await
            .unwrap();
        let marker = b.key("prod", "acme", "20261127T180000Z", UPLOAD_SUFFIX);
        b.store
            .put(&marker, PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        let orphan = b.key("prod", "acme", "20261127T170000Z", DUMP_SUFFIX);
        b.store
            .put(&orphan, PutPayload::from_static(b"x"))
            .await
            .unwrap();

        let c = load(&[a.clone(), b.clone()], &Filter::default()).await;
        let ids: Vec<_> = c
            .snapshots
            .iter()
            .map(|s| (s.id(), s.targets.clone()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("20261127T150000Z", vec!["a".to_string()]),
                ("20261127T140000Z", vec!["a".to_string(), "b".to_string()]),
            ]
        );
        assert_eq!(c.warnings.len(), 1);
        assert!(
            c.warnings[0].contains("20261127T160000Z.manifest.json"),
            "{:?}",
            c.warnings
        );
        assert_eq!(c.orphans.len(), 1);
        assert_eq!(c.uploads.len(), 1);
        assert!(!c.uploads[0].committed);
        assert_eq!(c.orphans[0].key, orphan);

        let only_b = load(
            &[a, b],
            &Filter {
                source: Some("prod".into()),
                databases: vec!["acme".into()],
                target: Some("b".into()),
            },
        )
        .await;
        assert_eq!(only_b.snapshots.len(), 1);
    }
}
