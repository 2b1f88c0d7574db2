//! Snapshot addresses: the one place object keys are built and recognised.
//!
//! A snapshot is addressed by [`SnapshotKey`] (source, database, [`SnapshotId`]); every key of
//! its objects, relative to a target's prefix, is derived from it:
//!
//! ```text
//! <source>/<database>/<snapshot_id>.manifest.json       the commit (written last)
//! <source>/<database>/<snapshot_id>.verify.json         the latest restore-verify report
//! <source>/<database>/<snapshot_id>-<run>.dump.zst      one attempt's dump (write-once)
//! <source>/<database>/<snapshot_id>-<run>.dump.zst.age  the same, encrypted (age)
//! <source>/<database>/<snapshot_id>-<run>.upload.json   marker of that attempt's open upload
//! <source>/<database>/<snapshot_id>-<run>.files.tar.zst[.age]  the attempt's companion files
//! <source>/<database>/<snapshot_id>-<run>.files.upload.json    marker of their open upload
//! <source>/<database>/<snapshot_id>.dump.zst            format ≤ 2 manifests' dump (read only)
//! <source>/<database>/pgferry-index.json                the folder's derived index (see catalog)
//! ```
//!
//! `run` is random per attempt ([`RunId`]), so two attempts at one slot (a retry, a restart,
//! two replicas) never write to the same object: a manifest names its object, and no run
//! writes to or deletes an object that another run created. [`parse_name`] recognises exactly
//! these shapes and nothing else: what it does not recognise is not pgferry's to touch.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use object_store::path::{Path, PathPart};
use sha2::{Digest, Sha256};

use crate::schedule;

pub const DUMP_SUFFIX: &str = ".dump.zst";
/// An encrypted dump: [`DUMP_SUFFIX`] then age's (see `crate::encryption`).
pub const ENCRYPTED_DUMP_SUFFIX: &str = ".dump.zst.age";
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
pub const VERIFY_SUFFIX: &str = ".verify.json";
pub const UPLOAD_SUFFIX: &str = ".upload.json";
/// Companion files (`crate::files`): a tar of the directory, zstd, then age when encrypted.
pub const FILES_SUFFIX: &str = ".files.tar.zst";
pub const ENCRYPTED_FILES_SUFFIX: &str = ".files.tar.zst.age";
/// The marker of a companion-files upload (checked before [`UPLOAD_SUFFIX`], which it ends
/// with).
pub const FILES_UPLOAD_SUFFIX: &str = ".files.upload.json";

/// The file name of a database folder's derived index (`storage::catalog_index`). It matches
/// no shape [`parse_name`] recognises, so nothing takes it for a snapshot's object: retention
/// and repair never touch it, and listing reads it only as a cache checked against the
/// manifests.
pub const INDEX_NAME: &str = "pgferry-index.json";

/// Hex digits of a [`RunId`]: 48 random bits, so two attempts of one slot never collide.
const RUN_ID_LEN: usize = 12;

/// A snapshot id, `20261127T140000Z`: the UTC start of a schedule slot (or a manual run's
/// second). Only valid ids can be built.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(String);

impl SnapshotId {
    /// The id of the slot (or second) starting at `t`; sub-seconds are dropped.
    pub fn from_time(t: DateTime<Utc>) -> SnapshotId {
        SnapshotId(schedule::snapshot_id(t))
    }

    /// `None` unless `s` is exactly an id as [`SnapshotId::from_time`] writes it.
    pub fn parse(s: &str) -> Option<SnapshotId> {
        schedule::parse_snapshot_id(s).map(|_| SnapshotId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The time the id names (the slot's start).
    pub fn time(&self) -> DateTime<Utc> {
        schedule::parse_snapshot_id(&self.0).expect("a SnapshotId is valid by construction")
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One attempt at writing a snapshot: `RUN_ID_LEN` lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunId(String);

impl RunId {
    /// A new random run id. Random enough that attempts by any number of processes at the same
    /// slot do not collide: the per-process random hasher key, the time, the pid and a counter,
    /// hashed.
    pub fn random() -> RunId {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
        seed.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let mut h = Sha256::new();
        h.update(seed.finish().to_le_bytes());
        h.update(
            Utc::now()
                .timestamp_nanos_opt()
                .unwrap_or_default()
                .to_le_bytes(),
        );
        h.update(std::process::id().to_le_bytes());
        let hex = hex::encode(h.finalize());
        RunId(hex[..RUN_ID_LEN].to_string())
    }

    pub fn parse(s: &str) -> Option<RunId> {
        (s.len() == RUN_ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| RunId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The address of one snapshot: which source, which database, which slot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotKey {
    pub source: String,
    pub database: String,
    pub id: SnapshotId,
}

impl SnapshotKey {
    pub fn new(source: &str, database: &str, id: SnapshotId) -> SnapshotKey {
        SnapshotKey {
            source: source.to_string(),
            database: database.to_string(),
            id,
        }
    }

    /// The database's folder, relative to a target's prefix. Database names may hold `/`,
    /// spaces or anything else: each segment is encoded on its own, so a name never splits
    /// into two levels.
    pub fn folder(&self) -> Path {
        database_folder(&self.source, &self.database)
    }

    fn file(&self, name: String) -> Path {
        Path::from_iter(self.folder().parts().chain([PathPart::from(name.as_str())]))
    }

    pub fn manifest(&self) -> Path {
        self.file(format!("{}{MANIFEST_SUFFIX}", self.id))
    }

    pub fn verify(&self) -> Path {
        self.file(format!("{}{VERIFY_SUFFIX}", self.id))
    }

    /// The dump object of attempt `run`.
    pub fn dump(&self, run: &RunId) -> Path {
        self.file(format!("{}-{run}{DUMP_SUFFIX}", self.id))
    }

    /// The dump object of attempt `run`, encrypted when `encrypted`.
    pub fn dump_as(&self, run: &RunId, encrypted: bool) -> Path {
        if encrypted {
            self.file(format!("{}-{run}{ENCRYPTED_DUMP_SUFFIX}", self.id))
        } else {
            self.dump(run)
        }
    }

    /// The dump object of a format ≤ 2 manifest (one key per slot, rewritten by retries).
    pub fn legacy_dump(&self) -> Path {
        self.file(format!("{}{DUMP_SUFFIX}", self.id))
    }

    /// The marker of attempt `run`'s open multipart upload.
    pub fn upload_marker(&self, run: &RunId) -> Path {
        self.file(format!("{}-{run}{UPLOAD_SUFFIX}", self.id))
    }

    /// The companion-files archive of attempt `run`, encrypted when `encrypted`.
    pub fn files_as(&self, run: &RunId, encrypted: bool) -> Path {
        let suffix = if encrypted {
            ENCRYPTED_FILES_SUFFIX
        } else {
            FILES_SUFFIX
        };
        self.file(format!("{}-{run}{suffix}", self.id))
    }

    /// The marker of attempt `run`'s open companion-files upload.
    pub fn files_upload_marker(&self, run: &RunId) -> Path {
        self.file(format!("{}-{run}{FILES_UPLOAD_SUFFIX}", self.id))
    }
}

impl fmt::Display for SnapshotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.source, self.database, self.id)
    }
}

/// The folder of one database's snapshots, relative to a target's prefix.
pub fn database_folder(source: &str, database: &str) -> Path {
    Path::from_iter([PathPart::from(source), PathPart::from(database)])
}

/// The derived index of one database's folder, relative to a target's prefix.
pub fn folder_index(source: &str, database: &str) -> Path {
    Path::from_iter(
        database_folder(source, database)
            .parts()
            .chain([PathPart::from(INDEX_NAME)]),
    )
}

/// What an object in a database folder is, by its file name (the last key segment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedName {
    Manifest(SnapshotId),
    Verify(SnapshotId),
    /// A dump, plain or encrypted: `None` run for the format ≤ 2 shape `<id>.dump.zst`
    /// (encrypted dumps always name their run).
    Dump(SnapshotId, Option<RunId>),
    /// An upload marker: `None` run for the format ≤ 2 shape `<id>.upload.json`.
    UploadMarker(SnapshotId, Option<RunId>),
    /// A companion-files archive, plain or encrypted (always named by its run).
    Files(SnapshotId, RunId),
    /// The marker of a companion-files upload.
    FilesUploadMarker(SnapshotId, RunId),
}

impl OwnedName {
    pub fn snapshot_id(&self) -> &SnapshotId {
        match self {
            OwnedName::Manifest(id)
            | OwnedName::Verify(id)
            | OwnedName::Dump(id, _)
            | OwnedName::UploadMarker(id, _)
            | OwnedName::Files(id, _)
            | OwnedName::FilesUploadMarker(id, _) => id,
        }
    }
}

/// Recognises the file names pgferry writes; `None` for anything else.
pub fn parse_name(name: &str) -> Option<OwnedName> {
    if let Some(id) = name.strip_suffix(MANIFEST_SUFFIX) {
        return SnapshotId::parse(id).map(OwnedName::Manifest);
    }
    if let Some(id) = name.strip_suffix(VERIFY_SUFFIX) {
        return SnapshotId::parse(id).map(OwnedName::Verify);
    }
    if let Some(stem) = name.strip_suffix(DUMP_SUFFIX) {
        return parse_attempt(stem).map(|(id, run)| OwnedName::Dump(id, run));
    }
    if let Some(stem) = name.strip_suffix(ENCRYPTED_DUMP_SUFFIX) {
        return match parse_attempt(stem) {
            Some((id, Some(run))) => Some(OwnedName::Dump(id, Some(run))),
            _ => None,
        };
    }
    if let Some(stem) = name
        .strip_suffix(FILES_SUFFIX)
        .or_else(|| name.strip_suffix(ENCRYPTED_FILES_SUFFIX))
    {
        return match parse_attempt(stem) {
            Some((id, Some(run))) => Some(OwnedName::Files(id, run)),
            _ => None,
        };
    }
    if let Some(stem) = name.strip_suffix(FILES_UPLOAD_SUFFIX) {
        return match parse_attempt(stem) {
            Some((id, Some(run))) => Some(OwnedName::FilesUploadMarker(id, run)),
            _ => None,
        };
    }
    if let Some(stem) = name.strip_suffix(UPLOAD_SUFFIX) {
        return parse_attempt(stem).map(|(id, run)| OwnedName::UploadMarker(id, run));
    }
    None
}

impl SnapshotKey {
    /// Whether `object_key` (relative to a target's prefix, as a manifest names it) is one of
    /// this snapshot's dump keys: in its folder, with its id. A manifest naming anything else
    /// (another database's object, another folder) is not pgferry's and is never followed.
    pub fn owns_object(&self, object_key: &str) -> bool {
        matches!(self.owned_in_folder(object_key), Some(OwnedName::Dump(id, _)) if id == self.id)
    }

    /// Whether `object_key` is one of this snapshot's companion-files archives (what a
    /// manifest's `files.object_key` may name).
    pub fn owns_files_object(&self, object_key: &str) -> bool {
        matches!(self.owned_in_folder(object_key), Some(OwnedName::Files(id, _)) if id == self.id)
    }

    /// What `object_key` is, when it is a key in this snapshot's folder.
    fn owned_in_folder(&self, object_key: &str) -> Option<OwnedName> {
        let key = object_path(object_key)?;
        let parts: Vec<PathPart<'_>> = key.parts().collect();
        let [source, database, name] = parts.as_slice() else {
            return None;
        };
        let folder = self.folder();
        let want: Vec<PathPart<'_>> = folder.parts().collect();
        if want.as_slice() != [source.clone(), database.clone()] {
            return None;
        }
        parse_name(name.as_ref())
    }
}

/// A manifest's `object_key` (a key as `Path` displays it: percent-encoded segments) as a
/// path; `None` unless it is in canonical form (no `..`, no empty segment, valid encoding).
pub fn object_path(object_key: &str) -> Option<Path> {
    let key = Path::parse(object_key).ok()?;
    (key.as_ref() == object_key && !object_key.is_empty()).then_some(key)
}

/// `<id>` or `<id>-<run>`.
fn parse_attempt(stem: &str) -> Option<(SnapshotId, Option<RunId>)> {
    match stem.split_once('-') {
        None => SnapshotId::parse(stem).map(|id| (id, None)),
        Some((id, run)) => Some((SnapshotId::parse(id)?, Some(RunId::parse(run)?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SnapshotKey {
        SnapshotKey::new(
            "prod",
            "acme",
            SnapshotId::parse("20261127T140000Z").unwrap(),
        )
    }

    #[test]
    fn keys_follow_the_design_layout() {
        let k = key();
        let run = RunId::parse("0123456789ab").unwrap();
        assert_eq!(
            k.manifest().as_ref(),
            "prod/acme/20261127T140000Z.manifest.json"
        );
        assert_eq!(
            k.verify().as_ref(),
            "prod/acme/20261127T140000Z.verify.json"
        );
        assert_eq!(
            k.dump(&run).as_ref(),
            "prod/acme/20261127T140000Z-0123456789ab.dump.zst"
        );
        assert_eq!(
            k.upload_marker(&run).as_ref(),
            "prod/acme/20261127T140000Z-0123456789ab.upload.json"
        );
        assert_eq!(
            k.legacy_dump().as_ref(),
            "prod/acme/20261127T140000Z.dump.zst"
        );
        assert_eq!(
            k.dump_as(&run, true).as_ref(),
            "prod/acme/20261127T140000Z-0123456789ab.dump.zst.age"
        );
        assert_eq!(k.dump_as(&run, false), k.dump(&run));
        assert_eq!(
            k.files_as(&run, false).as_ref(),
            "prod/acme/20261127T140000Z-0123456789ab.files.tar.zst"
        );
        assert_eq!(
            k.files_as(&run, true).as_ref(),
            "prod/acme/20261127T140000Z-0123456789ab.files.tar.zst.age"
        );
        assert_eq!(
            k.files_upload_marker(&run).as_ref(),
            "prod/acme/20261127T140000Z-0123456789ab.files.upload.json"
        );
        let odd = SnapshotKey::new("prod", "a/b c\"é", k.id.clone());
        assert_eq!(odd.manifest().parts().count(), 3);
    }

    #[test]
    fn ids_and_runs_are_valid_by_construction() {
        assert!(SnapshotId::parse("20261127T140000Z").is_some());
        for bad in [
            "20261127T140000",
            "20261327T140000Z",
            "x",
            "20261127T140000Z/",
        ] {
            assert!(SnapshotId::parse(bad).is_none(), "{bad}");
        }
        let a = RunId::random();
        let b = RunId::random();
        assert_ne!(a, b);
        assert!(RunId::parse(a.as_str()).is_some());
        for bad in [
            "",
            "0123456789aB",
            "0123456789a",
            "0123456789abc",
            "0123456789a/",
        ] {
            assert!(RunId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_snapshot_owns_only_its_own_dump_keys() {
        let k = key();
        let run = RunId::parse("0123456789ab").unwrap();
        assert!(k.owns_object(k.dump(&run).as_ref()));
        assert!(k.owns_object(k.legacy_dump().as_ref()));
        assert!(k.owns_object(k.dump_as(&run, true).as_ref()));
        for other in [
            "prod/globex/20261127T140000Z-0123456789ab.dump.zst.age",
            "prod/acme/20261127T140000Z.dump.zst.age",
            "prod/globex/20261127T140000Z.dump.zst",
            "prod/acme/20261127T150000Z.dump.zst",
            "otherteam/db1/x.dump.zst",
            "prod/acme/old/20261127T140000Z.dump.zst",
            "prod/acme/../acme/20261127T140000Z.dump.zst",
            "/prod/acme/20261127T140000Z.dump.zst",
            "prod/acme/20261127T140000Z.manifest.json",
            "prod/acme/20261127T140000Z-0123456789ab.files.tar.zst",
            "",
        ] {
            assert!(!k.owns_object(other), "{other}");
        }
        assert!(k.owns_files_object(k.files_as(&run, false).as_ref()));
        assert!(k.owns_files_object(k.files_as(&run, true).as_ref()));
        for other in [
            k.dump(&run).to_string(),
            "prod/globex/20261127T140000Z-0123456789ab.files.tar.zst".into(),
            "prod/acme/20261127T150000Z-0123456789ab.files.tar.zst".into(),
            "prod/acme/20261127T140000Z.files.tar.zst".into(),
            "prod/acme/x/20261127T140000Z-0123456789ab.files.tar.zst".into(),
        ] {
            assert!(!k.owns_files_object(&other), "{other}");
        }
        // Odd database names: the key is percent-encoded, and still owned.
        let odd = SnapshotKey::new("prod", "café/日本 \"x\"", k.id.clone());
        let dump = odd.dump(&run);
        assert!(dump.as_ref().contains('%'), "{dump}");
        assert!(odd.owns_object(dump.as_ref()));
        assert_eq!(object_path(dump.as_ref()), Some(dump));
    }

    #[test]
    fn only_pgferry_shapes_are_recognised() {
        let id = SnapshotId::parse("20261127T140000Z").unwrap();
        let run = RunId::parse("0123456789ab").unwrap();
        let k = key();
        for (path, want) in [
            (k.manifest(), OwnedName::Manifest(id.clone())),
            (k.verify(), OwnedName::Verify(id.clone())),
            (k.dump(&run), OwnedName::Dump(id.clone(), Some(run.clone()))),
            (k.legacy_dump(), OwnedName::Dump(id.clone(), None)),
            (
                k.dump_as(&run, true),
                OwnedName::Dump(id.clone(), Some(run.clone())),
            ),
            (
                k.upload_marker(&run),
                OwnedName::UploadMarker(id.clone(), Some(run.clone())),
            ),
            (
                k.files_as(&run, false),
                OwnedName::Files(id.clone(), run.clone()),
            ),
            (
                k.files_as(&run, true),
                OwnedName::Files(id.clone(), run.clone()),
            ),
            (
                k.files_upload_marker(&run),
                OwnedName::FilesUploadMarker(id.clone(), run.clone()),
            ),
        ] {
            let name = path.filename().unwrap();
            assert_eq!(parse_name(name), Some(want), "{name}");
        }
        for other in [
            "manual-copy.dump.zst",
            "backup-by-hand.dump.zst",
            "20261127T140000Z-x.dump.zst",
            "20261127T140000Z.dump.zst.bak",
            "20261127T140000Z-0123456789ab-1.dump.zst",
            "20261127T140000Z.dump.zst.age",
            "20261127T140000Z-0123456789ab.dump.zst.age.age",
            "20261127T140000Z-0123456789ab.age",
            "manual-copy.dump.zst.age",
            "old.manifest.json",
            "20261127T140000Z.manifest.json.tmp",
            "20261127T140000Z.files.tar.zst",
            "20261127T140000Z.files.upload.json",
            "20261127T140000Z-0123456789ab.files.tar",
            "20261127T140000Z-0123456789ab.files.tar.zst.age.age",
            INDEX_NAME,
        ] {
            assert_eq!(parse_name(other), None, "{other}");
        }
    }
}
