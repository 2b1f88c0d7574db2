//! The derived index of one database folder: the small facts of each manifest and verify
//! report in it, so that listing a folder costs one LIST and one GET instead of a GET per
//! manifest.
//!
//! It lives at `<folder>/pgferry-index.json` ([`key::INDEX_NAME`], a name no snapshot shape
//! matches) and is only a cache: an entry is used for an object the folder's listing shows
//! right now with the same name, size, e_tag and modification time as when the entry was
//! made, and the catalog still runs every check on it (an entry that fails one is read again
//! from the manifest). Anything else — a missing, unparsable, oversized or foreign index, an
//! entry for a manifest that is gone, changed or new — means reading the object itself, and
//! the index is rewritten. Writing is best effort: a failed write (a read-only credential, a
//! target going away) never fails a listing. Manifests are stored as summaries (no `tables`).
//! This module does the index's I/O and nothing else.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectMeta, PutPayload};
use serde::{Deserialize, Serialize};

use crate::storage::key;
use crate::storage::manifest::Manifest;
use crate::storage::target::{error_text, Target};

/// The gist of a restore-verify report (`<snapshot_id>.verify.json`, written by `verify`),
/// as `list` shows it and the index keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifySummary {
    pub result: String,
    pub finished_at: DateTime<Utc>,
    #[serde(default)]
    pub target: String,
}

/// The index format this build writes and reads; any other is ignored (and rewritten).
const INDEX_VERSION: u32 = 1;

/// An index larger than this is ignored unread: a real one is about 1 KiB per snapshot.
const MAX_INDEX_BYTES: u64 = 16 * 1024 * 1024;

/// What identifies one version of an object in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// File name in the folder.
    pub name: String,
    pub size: u64,
    pub e_tag: Option<String>,
    pub last_modified: DateTime<Utc>,
}

impl Stamp {
    pub fn of(meta: &ObjectMeta) -> Option<Stamp> {
        Some(Stamp {
            name: meta.location.filename()?.to_string(),
            size: meta.size,
            e_tag: meta.e_tag.clone(),
            last_modified: meta.last_modified,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexedManifest {
    pub stamp: Stamp,
    /// The manifest as read, without `tables`.
    pub manifest: Manifest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexedVerify {
    pub stamp: Stamp,
    pub verify: VerifySummary,
}

/// The document stored at `<folder>/pgferry-index.json`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FolderIndex {
    pub version: u32,
    pub manifests: Vec<IndexedManifest>,
    pub verifies: Vec<IndexedVerify>,
}

/// An index read from a folder, looked up by the listing's objects.
#[derive(Debug, Default)]
pub struct Lookup {
    manifests: HashMap<String, IndexedManifest>,
    verifies: HashMap<String, IndexedVerify>,
    /// Entries in the stored index (to notice ones whose object is gone).
    stored: usize,
}

impl Lookup {
    pub fn new(index: FolderIndex) -> Lookup {
        let stored = index.manifests.len() + index.verifies.len();
        Lookup {
            manifests: index
                .manifests
                .into_iter()
                .map(|e| (e.stamp.name.clone(), e))
                .collect(),
            verifies: index
                .verifies
                .into_iter()
                .map(|e| (e.stamp.name.clone(), e))
                .collect(),
            stored,
        }
    }

    /// The indexed manifest of `meta`, if the entry is of exactly this version of it. Without
    /// an e_tag there is nothing to tell two versions of one size and second apart: never.
    pub fn manifest(&self, meta: &ObjectMeta) -> Option<Manifest> {
        let e = self.manifests.get(meta.location.filename()?)?;
        matches(&e.stamp, meta).then(|| e.manifest.clone())
    }

    pub fn verify(&self, meta: &ObjectMeta) -> Option<VerifySummary> {
        let e = self.verifies.get(meta.location.filename()?)?;
        matches(&e.stamp, meta).then(|| e.verify.clone())
    }

    /// Whether the stored index holds exactly `index` (then it need not be written again).
    pub fn holds_exactly(&self, index: &FolderIndex) -> bool {
        self.stored == index.manifests.len() + index.verifies.len()
            && index.manifests.iter().all(|e| {
                self.manifests
                    .get(&e.stamp.name)
                    .is_some_and(|old| old.stamp == e.stamp && old.manifest == e.manifest)
            })
            && index.verifies.iter().all(|e| {
                self.verifies
                    .get(&e.stamp.name)
                    .is_some_and(|old| old.stamp == e.stamp && old.verify == e.verify)
            })
    }
}

fn matches(stamp: &Stamp, meta: &ObjectMeta) -> bool {
    meta.e_tag.is_some() && Stamp::of(meta).as_ref() == Some(stamp)
}

/// Reads the index of `folder` if the listing shows one; an absent, unreadable or foreign
/// index is an empty lookup (and will be rewritten).
pub async fn read(t: &Target, listed: &[ObjectMeta]) -> Lookup {
    let Some(meta) = listed
        .iter()
        .find(|o| o.location.filename() == Some(key::INDEX_NAME))
    else {
        return Lookup::default();
    };
    if meta.size > MAX_INDEX_BYTES {
        tracing::warn!(message = "Ignoring an oversized catalog index.", target = %t.name, key = %meta.location, bytes = meta.size);
        return Lookup::default();
    }
    let parsed = match t.store.get(&meta.location).await {
        Ok(r) => match r.bytes().await {
            Ok(bytes) => serde_json::from_slice::<FolderIndex>(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(error_text(&e)),
        },
        Err(e) => Err(error_text(&e)),
    };
    match parsed {
        Ok(index) if index.version == INDEX_VERSION => Lookup::new(index),
        Ok(index) => {
            tracing::info!(message = "Ignoring a catalog index of another version.", target = %t.name, key = %meta.location, version = index.version);
            Lookup::default()
        }
        Err(error) => {
            tracing::warn!(message = "Ignoring an unreadable catalog index; it is rebuilt from the manifests.", target = %t.name, key = %meta.location, error = %error);
            Lookup::default()
        }
    }
}

/// Writes `index` as `folder`'s index, best effort: a failure is logged, never returned.
pub async fn write(t: &Target, folder: &Path, mut index: FolderIndex) {
    index.version = INDEX_VERSION;
    index
        .manifests
        .sort_by(|a, b| a.stamp.name.cmp(&b.stamp.name));
    index
        .verifies
        .sort_by(|a, b| a.stamp.name.cmp(&b.stamp.name));
    let body = match serde_json::to_vec(&index) {
        Ok(b) => b,
        Err(error) => {
            tracing::warn!(message = "Cannot serialize a catalog index.", target = %t.name, error = %error);
            return;
        }
    };
    let key = folder.child(key::INDEX_NAME);
    if let Err(e) = t.store.put(&key, PutPayload::from(body)).await {
        // A read-only credential is a supported setup: listing then reads every manifest.
        tracing::debug!(message = "Cannot write a catalog index; listing reads the manifests.", target = %t.name, key = %key, error = %error_text(&e));
    }
}
