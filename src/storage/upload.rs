//! Multipart uploads that a later run can find and abort after a crash.
//!
//! An S3 multipart upload left open by a killed process is invisible to object listings, yet
//! its parts occupy storage until someone aborts it, and aborting needs its upload id, which
//! object_store's generic `put_multipart` keeps to itself (and object_store 0.12 cannot list
//! open uploads). So on targets whose store implements [`MultipartStore`] (S3), [`start`]
//! creates the upload itself and, before the first part, writes a marker object
//! `<snapshot_id>.upload.json` beside the dump naming the upload id. The marker is deleted
//! once the upload is completed or aborted. A marker without a manifest that is older than
//! `pipeline.orphan_grace` was left by a run that died: `prune` hands it to [`clean`], which
//! aborts the upload, deletes any dump object and then the marker.
//!
//! Targets without [`MultipartStore`] (a directory) keep the generic `put_multipart`: what a
//! killed process leaves there is a staging file `<key>#<n>`, which object_store neither lists
//! nor lets us address; [`staging_files`] finds those of dump objects in the directory itself.
//!
//! This module never decides what is committed or when something is old enough to clean.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, MultipartUpload, PutPayload, PutResult, UploadPart};
use serde::{Deserialize, Serialize};

use crate::storage::key::{
    ENCRYPTED_DUMP_SUFFIX, ENCRYPTED_FILES_SUFFIX, FILES_SUFFIX, FILES_UPLOAD_SUFFIX,
};
use crate::storage::target::{Target, DUMP_SUFFIX, UPLOAD_SUFFIX};

/// Version of the marker document.
const MARKER_FORMAT_VERSION: u32 = 1;

/// Markers are a few hundred bytes; anything much larger was not written by pgferry.
const MAX_MARKER_BYTES: usize = 64 * 1024;

/// The marker of one open multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadMarker {
    pub format_version: u32,
    /// The store's id of the multipart upload: what an abort needs.
    pub upload_id: String,
    /// The key being uploaded (for humans; [`clean`] derives it from the marker's own key).
    pub key: String,
    pub started_at: DateTime<Utc>,
    /// Which process started it, for humans reading the bucket.
    pub host: String,
    pub pid: u32,
    pub pgferry_version: String,
}

/// The marker key of the upload of `object_key`: a dump's (plain or encrypted: one attempt
/// writes one) is `<stem>.upload.json`, a companion-files archive's `<stem>.files.upload.json`,
/// so that a killed run's files upload is found like its dump's.
pub fn marker_key(object_key: &Path) -> Option<Path> {
    let key = object_key.as_ref();
    // `parse`: the stem is already percent-encoded (`from` would encode its `%` again).
    if let Some(stem) = key
        .strip_suffix(FILES_SUFFIX)
        .or_else(|| key.strip_suffix(ENCRYPTED_FILES_SUFFIX))
    {
        // `parse`, not `from`: the stem is already percent-encoded (odd database names).
        return Path::parse(format!("{stem}{FILES_UPLOAD_SUFFIX}")).ok();
    }
    let stem = key
        .strip_suffix(DUMP_SUFFIX)
        .or_else(|| key.strip_suffix(ENCRYPTED_DUMP_SUFFIX))?;
    Path::parse(format!("{stem}{UPLOAD_SUFFIX}")).ok()
}

/// The object keys a marker may belong to: the attempt's plain and encrypted dump (it wrote
/// only one of them; the marker's body says which), plain first; for a companion-files marker
/// (`<id>-<run>.files.upload.json`) the attempt's plain and encrypted files archive. Only keys
/// of shapes pgferry owns: a format ≤ 2 marker (`<id>.upload.json`, no run) has only the plain
/// dump, since an encrypted dump always names its run (`<id>.dump.zst.age` is someone else's
/// file).
pub fn dump_keys(marker_key: &Path) -> Option<Vec<Path>> {
    use crate::storage::key::{parse_name, OwnedName};
    let key = marker_key.as_ref();
    let (stem, suffixes, files) = match key.strip_suffix(FILES_UPLOAD_SUFFIX) {
        Some(stem) => (stem, [FILES_SUFFIX, ENCRYPTED_FILES_SUFFIX], true),
        None => (
            key.strip_suffix(UPLOAD_SUFFIX)?,
            [DUMP_SUFFIX, ENCRYPTED_DUMP_SUFFIX],
            false,
        ),
    };
    let keys: Vec<Path> = suffixes
        .into_iter()
        // `parse`, not `from`: the stem is already percent-encoded (odd database names), and
        // `from` would encode its `%` again, naming another key.
        .filter_map(|suffix| Path::parse(format!("{stem}{suffix}")).ok())
        .filter(|k| {
            k.filename().and_then(parse_name).is_some_and(|n| match n {
                OwnedName::Dump(..) => !files,
                OwnedName::Files(..) => files,
                _ => false,
            })
        })
        .collect();
    (!keys.is_empty()).then_some(keys)
}

/// How often a long copy rewrites its upload's marker ([`Heartbeat`]).
pub const MARKER_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(20);

/// A marker not rewritten for this long belongs to a run that is gone (three missed beats).
pub const MARKER_STALE: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps the marker of `key`'s open upload fresh while a copy runs: its `last_modified` then
/// tells another run a live upload (younger than [`MARKER_STALE`]) from one a killed process
/// left. The marker's body is rewritten as it is, every [`MARKER_HEARTBEAT`], until
/// [`Heartbeat::stop`] (awaited before the upload is completed or aborted, so no rewrite can
/// land after the marker's removal) or drop.
pub struct Heartbeat {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    /// Starts beating for `key`'s marker on `target`; `None` where there is no marker (a
    /// directory target, or the marker is gone).
    pub async fn start(
        target: &Target,
        key: &Path,
        every: std::time::Duration,
    ) -> Option<Heartbeat> {
        let marker = marker_key(key)?;
        target.multipart.as_ref()?;
        let body = target.store.get(&marker).await.ok()?.bytes().await.ok()?;
        let stop = tokio_util::sync::CancellationToken::new();
        let (store, beating) = (target.store.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = beating.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if let Err(error) = store.put(&marker, PutPayload::from(body.clone())).await {
                    tracing::debug!(message = "Could not refresh an upload marker.", key = %marker, error = %error);
                }
            }
        });
        Some(Heartbeat { stop, task })
    }

    /// Stops beating, after any rewrite in flight has landed.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a multipart upload of `key` on `target`: marked (see the module doc) where the
/// store allows it, the store's generic upload otherwise.
pub async fn start(
    target: &Target,
    key: &Path,
) -> Result<Box<dyn MultipartUpload>, object_store::Error> {
    let (Some(multipart), Some(marker)) = (&target.multipart, marker_key(key)) else {
        return target.store.put_multipart(key).await;
    };
    let id = multipart.create_multipart(key).await?;
    let body = UploadMarker {
        format_version: MARKER_FORMAT_VERSION,
        upload_id: id.clone(),
        key: key.to_string(),
        started_at: Utc::now(),
        host: hostname(),
        pid: std::process::id(),
        pgferry_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let json = serde_json::to_vec_pretty(&body).expect("a marker serializes");
    if let Err(error) = target.store.put(&marker, PutPayload::from(json)).await {
        // Without its marker the upload could not be found again: do not use it.
        if let Err(abort) = multipart.abort_multipart(key, &id).await {
            tracing::warn!(message = "Could not abort an upload whose marker could not be written; the bucket's lifecycle rule must.", target = %target.name, key = %key, error = %abort);
        }
        return Err(error);
    }
    Ok(Box::new(MarkedUpload {
        target: target.name.clone(),
        multipart: multipart.clone(),
        store: target.store.clone(),
        key: key.clone(),
        marker,
        id,
        next_part: 0,
        parts: Arc::default(),
    }))
}

/// Whether `marker` was written by a process of this host that no longer runs: its upload
/// is then certainly abandoned, whatever its age (a repair or backup killed and run again on
/// the same machine). A marker of another host, of this process, or of a pid that is alive
/// (perhaps reused: a container's restarted PID 1) is not known dead.
pub fn left_by_dead_process(marker: &UploadMarker) -> bool {
    if marker.host != hostname() || marker.pid == std::process::id() || marker.pid == 0 {
        return false;
    }
    let Ok(pid) = libc::pid_t::try_from(marker.pid) else {
        return false;
    };
    // Signal 0 checks for existence only; ESRCH: no such process.
    // SAFETY: kill(2) with signal 0 sends nothing and touches no memory.
    let r = unsafe { libc::kill(pid, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Reads and parses the marker at `key` (at most [`MAX_MARKER_BYTES`]).
pub async fn read_marker(target: &Target, key: &Path) -> Option<UploadMarker> {
    let bytes = target.store.get(key).await.ok()?.bytes().await.ok()?;
    if bytes.len() > MAX_MARKER_BYTES {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// A multipart upload through [`MultipartStore`] with a marker; the parts it received are
/// remembered by index so that they complete in order whatever order they finish in.
struct MarkedUpload {
    target: String,
    multipart: Arc<dyn MultipartStore>,
    store: Arc<dyn object_store::ObjectStore>,
    key: Path,
    marker: Path,
    id: MultipartId,
    next_part: usize,
    parts: Arc<Mutex<Vec<Option<PartId>>>>,
}

impl std::fmt::Debug for MarkedUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarkedUpload")
            .field("target", &self.target)
            .field("key", &self.key)
            .field("id", &self.id)
            .field("next_part", &self.next_part)
            .finish()
    }
}

/// A part missing when the upload is completed (its upload failed or was dropped).
#[derive(Debug, thiserror::Error)]
#[error("part {part} of {key} was never uploaded")]
struct MissingPart {
    key: String,
    part: usize,
}

impl MarkedUpload {
    /// Deletes the marker once the upload is settled; a failure leaves a stale marker that
    /// `prune` removes later, so it is only logged.
    async fn remove_marker(&self) {
        match self.store.delete(&self.marker).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(error) => tracing::warn!(
                message = "Could not delete the marker of a settled upload; prune will.",
                target = %self.target, key = %self.marker, error = %error
            ),
        }
    }
}

#[async_trait::async_trait]
impl MultipartUpload for MarkedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let idx = self.next_part;
        self.next_part += 1;
        let multipart = self.multipart.clone();
        let parts = self.parts.clone();
        let key = self.key.clone();
        let id = self.id.clone();
        Box::pin(async move {
            let part = multipart.put_part(&key, &id, idx, data).await?;
            let mut parts = parts.lock().expect("no panic while holding the parts lock");
            if parts.len() <= idx {
                parts.resize(idx + 1, None);
            }
            parts[idx] = Some(part);
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let parts = {
            let mut parts = self
                .parts
                .lock()
                .expect("no panic while holding the parts lock");
            parts.resize(self.next_part, None);
            parts
                .iter()
                .enumerate()
                .map(|(part, p)| {
                    p.clone().ok_or_else(|| object_store::Error::Generic {
                        store: "pgferry",
                        source: Box::new(MissingPart {
                            key: self.key.to_string(),
                            part,
                        }),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let done = self
            .multipart
            .complete_multipart(&self.key, &self.id, parts)
            .await?;
        self.remove_marker().await;
        Ok(done)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        // On failure the marker stays, so that `prune` retries the abort later.
        self.multipart.abort_multipart(&self.key, &self.id).await?;
        self.remove_marker().await;
        Ok(())
    }
}

/// Why a marker could not be cleaned.
#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    #[error("cannot read the upload marker {key}: {source}")]
    Read {
        key: String,
        source: object_store::Error,
    },
    #[error("upload marker {key} is not one pgferry wrote ({reason}); abort the upload by hand (or let the bucket's lifecycle rule do it), then delete the marker")]
    Unreadable { key: String, reason: String },
    #[error(
        "cannot abort the multipart upload {upload_id} of {key}: {source}; the next prune retries"
    )]
    Abort {
        key: String,
        upload_id: String,
        source: object_store::Error,
    },
    #[error("cannot delete {key}: {source}; the next prune retries")]
    Delete {
        key: String,
        source: object_store::Error,
    },
}

/// What [`clean`] did with one marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleaned {
    /// The upload was aborted (or was already gone), any dump object and the marker deleted.
    Aborted { upload_id: String },
    /// The snapshot has a manifest: the upload completed and only its marker was left; the
    /// marker was deleted, nothing else touched.
    StaleMarker,
}

/// Cleans the upload that the marker `marker` on `target` names. `committed` says whether the
/// snapshot has a manifest there: then the dump is the snapshot and only the marker goes.
/// The caller decides that the marker is old enough (see `retention::orphan_dumps`).
pub async fn clean(target: &Target, marker: &Path, committed: bool) -> Result<Cleaned, CleanError> {
    if committed {
        delete(target, marker).await?;
        return Ok(Cleaned::StaleMarker);
    }
    let read_err = |source| CleanError::Read {
        key: marker.to_string(),
        source,
    };
    let bytes = target
        .store
        .get(marker)
        .await
        .map_err(read_err)?
        .bytes()
        .await
        .map_err(read_err)?;
    let unreadable = |reason: String| CleanError::Unreadable {
        key: marker.to_string(),
        reason,
    };
    if bytes.len() > MAX_MARKER_BYTES {
        return Err(unreadable(format!("{} bytes", bytes.len())));
    }
    let parsed: UploadMarker =
        serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
    let dumps = dump_keys(marker).ok_or_else(|| unreadable("not a marker key".into()))?;
    // The body names the key being uploaded; it is followed only when it is one of this
    // marker's own two (markers written before encryption existed name the plain one).
    let dump = dumps
        .iter()
        .find(|d| d.as_ref() == parsed.key)
        .unwrap_or(&dumps[0])
        .clone();
    if let Some(multipart) = &target.multipart {
        match multipart.abort_multipart(&dump, &parsed.upload_id).await {
            // Gone already: completed (then the dump is an orphan, deleted below) or aborted.
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(CleanError::Abort {
                    key: dump.to_string(),
                    upload_id: parsed.upload_id,
                    source,
                })
            }
        }
    }
    for d in &dumps {
        delete(target, d).await?;
    }
    delete(target, marker).await?;
    Ok(Cleaned::Aborted {
        upload_id: parsed.upload_id,
    })
}

/// The staging files of dump and companion-files uploads under a directory target's `root`,
/// with their modification times: `<snapshot_id>.dump.zst#<n>`, as object_store's `LocalFileSystem`
/// names the file an upload writes before it is renamed into place. One that is old was left by
/// a killed process (an abort or a drop removes it). A missing `root` holds none. Blocking:
/// call it off the async threads.
pub fn staging_files(root: &std::path::Path) -> std::io::Result<Vec<(PathBuf, DateTime<Utc>)>> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let name = entry.file_name();
            let Some((stem, n)) = name.to_str().and_then(|n| n.rsplit_once('#')) else {
                continue;
            };
            let is_dump = [
                DUMP_SUFFIX,
                ENCRYPTED_DUMP_SUFFIX,
                FILES_SUFFIX,
                ENCRYPTED_FILES_SUFFIX,
            ]
            .iter()
            .any(|s| stem.ends_with(s));
            if is_dump && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                let modified = entry.metadata()?.modified()?;
                found.push((entry.path(), DateTime::<Utc>::from(modified)));
            }
        }
    }
    found.sort();
    Ok(found)
}

async fn delete(target: &Target, key: &Path) -> Result<(), CleanError> {
    match target.store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(CleanError::Delete {
            key: key.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{keys, read};
    use object_store::memory::InMemory;
    use object_store::ObjectStore;

    fn marked_target() -> (Target, Arc<InMemory>) {
        let store = Arc::new(InMemory::new());
        let t = Target::new("t", store.clone(), "pg", 10_000).with_multipart(store.clone());
        (t, store)
    }

    async fn marker_of(store: &InMemory, key: &str) -> UploadMarker {
        serde_json::from_slice(&read(store, &Path::from(key)).await).unwrap()
    }

    /// Starts an upload of `key` on `t`, writes one part and drops it as a killed process
    /// would; returns the upload id its marker (at `marker`) holds.
    async fn abandon(t: &Target, store: &InMemory, key: &Path, marker: &str) -> String {
        let mut upload = start(t, key).await.unwrap();
        upload
            .put_part(PutPayload::from_static(b"a"))
            .await
            .unwrap();
        let id = marker_of(store, marker).await.upload_id;
        drop(upload); // the process died: nothing aborts it
        id
    }

    const DUMP: &str = "pg/prod/acme/20261127T140000Z.dump.zst";
    const MARKER: &str = "pg/prod/acme/20261127T140000Z.upload.json";
    /// An attempt's keys (what pgferry writes since write-once; encrypted dumps always have a run).
    const RUN_DUMP: &str = "pg/prod/acme/20261127T140000Z-0123456789ab.dump.zst";
    const RUN_MARKER: &str = "pg/prod/acme/20261127T140000Z-0123456789ab.upload.json";

    #[test]
    fn marker_keys_sit_beside_the_dump() {
        let dump = Path::from(DUMP);
        assert_eq!(marker_key(&dump).unwrap().as_ref(), MARKER);
        assert_eq!(dump_keys(&Path::from(MARKER)).unwrap()[0], dump);
        // A format ≤ 2 marker (no run) has only the plain dump: `<id>.dump.zst.age` is not a
        // shape pgferry writes, so nothing deletes it (review 15).
        assert_eq!(dump_keys(&Path::from(MARKER)).unwrap(), vec![dump]);
        let sealed = Path::from(format!("{RUN_DUMP}.age"));
        assert_eq!(marker_key(&sealed).unwrap().as_ref(), RUN_MARKER);
        assert_eq!(
            dump_keys(&Path::from(RUN_MARKER)).unwrap(),
            vec![Path::from(RUN_DUMP), sealed]
        );
        assert!(marker_key(&Path::from("a/b.manifest.json")).is_none());
    }

    #[test]
    fn a_files_marker_names_its_archives_and_only_them() {
        let stem = "pg/prod/acme/20261127T140000Z-0123456789ab";
        let marker = Path::from(format!("{stem}.files.upload.json"));
        assert_eq!(
            dump_keys(&marker).unwrap(),
            vec![
                Path::from(format!("{stem}.files.tar.zst")),
                Path::from(format!("{stem}.files.tar.zst.age"))
            ]
        );
        for archive in [".files.tar.zst", ".files.tar.zst.age"] {
            let key = Path::from(format!("{stem}{archive}"));
            assert_eq!(marker_key(&key), Some(marker.clone()));
        }
        assert_eq!(
            marker_key(&Path::from(RUN_DUMP)),
            Some(Path::from(RUN_MARKER))
        );
        // A files marker without a run is not a shape pgferry writes.
        assert!(dump_keys(&Path::from(
            "pg/prod/acme/20261127T140000Z.files.upload.json"
        ))
        .is_none());
        // Odd database names: the keys stay the ones the listing shows (no double encoding).
        let odd = crate::storage::key::SnapshotKey::new(
            "prod",
            "café 100%",
            crate::storage::key::SnapshotId::parse("20261127T140000Z").unwrap(),
        );
        let run = crate::storage::key::RunId::parse("0123456789ab").unwrap();
        assert_eq!(
            dump_keys(&odd.files_upload_marker(&run)).unwrap()[0],
            odd.files_as(&run, false)
        );
        assert_eq!(
            marker_key(&odd.files_as(&run, true)),
            Some(odd.files_upload_marker(&run))
        );
        assert_eq!(marker_key(&odd.dump(&run)), Some(odd.upload_marker(&run)));
        assert_eq!(
            dump_keys(&odd.upload_marker(&run)).unwrap()[0],
            odd.dump(&run)
        );
    }

    #[test]
    fn files_archives_have_their_own_marker() {
        use crate::storage::key::{RunId, SnapshotId, SnapshotKey};
        let k = SnapshotKey::new(
            "prod",
            "acme",
            SnapshotId::parse("20261127T140000Z").unwrap(),
        );
        let run = RunId::random();
        for encrypted in [false, true] {
            assert_eq!(
                marker_key(&k.files_as(&run, encrypted)),
                Some(k.files_upload_marker(&run)),
                "encrypted: {encrypted}"
            );
        }
        assert_eq!(marker_key(&k.dump(&run)), Some(k.upload_marker(&run)));
        assert!(marker_key(&Path::from("a/b.files.tar")).is_none());
    }

    #[tokio::test]
    async fn a_files_upload_writes_and_removes_its_files_marker() {
        use crate::storage::key::{RunId, SnapshotId, SnapshotKey};
        let (t, store) = marked_target();
        let k = SnapshotKey::new(
            "prod",
            "acme",
            SnapshotId::parse("20261127T140000Z").unwrap(),
        );
        let run = RunId::random();
        let files = t.at(&k.files_as(&run, false));
        let mut upload = start(&t, &files).await.unwrap();
        let marker = t.at(&k.files_upload_marker(&run));
        assert_eq!(marker_of(&store, marker.as_ref()).await.key, files.as_ref());
        upload
            .put_part(PutPayload::from_static(b"tar"))
            .await
            .unwrap();
        upload.complete().await.unwrap();
        assert_eq!(keys(&t).await, [files.to_string()]);
    }

    #[tokio::test]
    async fn a_completed_upload_leaves_the_object_in_part_order_and_no_marker() {
        let (t, store) = marked_target();
        let mut upload = start(&t, &Path::from(DUMP)).await.unwrap();
        let m = marker_of(&store, MARKER).await;
        assert_eq!(m.key, DUMP);
        assert_eq!(m.pid, std::process::id());
        // Both parts are in flight at once (InMemory needs them to start in order).
        let first = upload.put_part(PutPayload::from_static(b"first "));
        let second = upload.put_part(PutPayload::from_static(b"second"));
        let (a, b) = futures::join!(first, second);
        a.unwrap();
        b.unwrap();
        upload.complete().await.unwrap();
        assert_eq!(keys(&t).await, [DUMP]);
        let got = store.get(&Path::from(DUMP)).await.unwrap().bytes().await;
        assert_eq!(&got.unwrap()[..], b"first second");
    }

    #[tokio::test]
    async fn a_missing_part_fails_the_completion() {
        let (t, _) = marked_target();
        let mut upload = start(&t, &Path::from(DUMP)).await.unwrap();
        upload
            .put_part(PutPayload::from_static(b"a"))
            .await
            .unwrap();
        drop(upload.put_part(PutPayload::from_static(b"b"))); // never polled
        let err = upload.complete().await.unwrap_err();
        assert!(err.to_string().contains("part 1 of"), "{err}");
        upload.abort().await.unwrap();
        assert!(keys(&t).await.is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_upload_is_found_by_its_marker_and_aborted() {
        let (t, store) = marked_target();
        let id = abandon(&t, &store, &Path::from(DUMP), MARKER).await;
        assert_eq!(keys(&t).await, [MARKER]);

        let cleaned = clean(&t, &Path::from(MARKER), false).await.unwrap();
        assert_eq!(
            cleaned,
            Cleaned::Aborted {
                upload_id: id.clone()
            }
        );
        assert!(keys(&t).await.is_empty());
        // The store no longer knows the upload: it was aborted, not merely forgotten.
        let again = store.abort_multipart(&Path::from(DUMP), &id).await;
        assert!(again.is_err(), "the upload is still open");
    }

    #[tokio::test]
    async fn an_abandoned_encrypted_upload_is_aborted_under_its_own_key() {
        let (t, store) = marked_target();
        let sealed = Path::from(format!("{RUN_DUMP}.age"));
        let id = abandon(&t, &store, &sealed, RUN_MARKER).await;
        let cleaned = clean(&t, &Path::from(RUN_MARKER), false).await.unwrap();
        assert_eq!(
            cleaned,
            Cleaned::Aborted {
                upload_id: id.clone()
            }
        );
        assert!(keys(&t).await.is_empty());
        let again = store.abort_multipart(&sealed, &id).await;
        assert!(again.is_err(), "the encrypted upload is still open");
    }

    #[tokio::test]
    async fn a_stale_marker_of_a_committed_snapshot_goes_alone() {
        let (t, store) = marked_target();
        store
            .put(&Path::from(DUMP), PutPayload::from_static(b"dump"))
            .await
            .unwrap();
        store
            .put(
                &Path::from(MARKER),
                PutPayload::from_static(b"not even JSON"),
            )
            .await
            .unwrap();
        let cleaned = clean(&t, &Path::from(MARKER), true).await.unwrap();
        assert_eq!(cleaned, Cleaned::StaleMarker);
        assert_eq!(keys(&t).await, [DUMP]);
    }

    #[tokio::test]
    async fn an_unreadable_marker_is_an_error_and_stays() {
        let (t, store) = marked_target();
        store
            .put(&Path::from(MARKER), PutPayload::from_static(b"<html>"))
            .await
            .unwrap();
        let err = clean(&t, &Path::from(MARKER), false).await.unwrap_err();
        assert!(matches!(err, CleanError::Unreadable { .. }), "{err}");
        assert_eq!(keys(&t).await, [MARKER]);
    }

    #[test]
    fn staging_files_of_dumps_are_found_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("prod").join("a%2Fb");
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "20261127T140000Z.dump.zst#1",
            "20261127T140000Z.dump.zst#12",
            "20261127T140000Z-0123456789ab.dump.zst.age#3",
            "20261127T140000Z.dump.zst",
            "20261127T140000Z.manifest.json#1",
            "20261127T140000Z.dump.zst#x",
            "20261127T140000Z.dump.zst#",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let found: Vec<PathBuf> = staging_files(root.path())
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            found,
            [
                dir.join("20261127T140000Z-0123456789ab.dump.zst.age#3"),
                dir.join("20261127T140000Z.dump.zst#1"),
                dir.join("20261127T140000Z.dump.zst#12")
            ]
        );
        assert!(staging_files(&root.path().join("nonexistent"))
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_store_without_multipart_ids_gets_no_marker() {
        let store = Arc::new(InMemory::new());
        let t = Target::new("t", store.clone(), "pg", 10_000);
        let mut upload = start(&t, &Path::from(DUMP)).await.unwrap();
        assert!(keys(&t).await.is_empty());
        upload
            .put_part(PutPayload::from_static(b"x"))
            .await
            .unwrap();
        upload.complete().await.unwrap();
        assert_eq!(keys(&t).await, [DUMP]);
    }

    #[test]
    fn only_a_gone_process_of_this_host_leaves_a_dead_marker() {
        let mut m = UploadMarker {
            format_version: MARKER_FORMAT_VERSION,
            upload_id: "u".into(),
            key: "k".into(),
            started_at: Utc::now(),
            host: hostname(),
            pid: std::process::id(),
            pgferry_version: "x".into(),
        };
        assert!(!left_by_dead_process(&m), "this process");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        m.pid = gone;
        assert!(left_by_dead_process(&m), "a reaped child");
        m.host = "another-host".into();
        assert!(!left_by_dead_process(&m), "another host");
        m.host = hostname();
        m.pid = 1;
        assert!(!left_by_dead_process(&m), "a live pid");
    }
}
