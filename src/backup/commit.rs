//! The commit: open uploads become complete objects, then manifests name them.
//!
//! Objects are write-once: this run's dump is at `<snapshot_id>-<run>.dump.zst`, a key no
//! other run uses, so nothing here can damage what another run (an earlier attempt, a
//! replica that also believes it holds the lock) committed. The order, per target:
//! 1. every part handed over: the bytes the target accepted equal the stored size;
//! 2. the upload is completed, and the object's size, read back, equals the stored size;
//! 3. the manifest naming the object is written: the snapshot exists there from now on.
//!
//! With companion files (`crate::files`), each target has two uploads, the dump and the files
//! archive (`<snapshot_id>-<run>.files.tar.zst`): steps 1 and 2 apply to both, and a target
//! where either failed gets no manifest; the one that completed there is deleted (this run's
//! own, named by no manifest). A target whose files upload is missing (it dropped out of the
//! files pipeline) has its dump upload aborted.
//!
//! The snapshot commits wherever step 3 succeeded. Fewer copies than `min_targets` make the
//! run a failure ([`Commit::is_degraded`]) but the copies stay: a completed copy is never
//! deleted because another target failed (`repair` copies it where it is missing).
//! This run deletes only its own objects, and only before it tried to write a manifest naming
//! them: once a manifest PUT was attempted, even one that failed, the object stays (the PUT
//! may have been stored after all), and prune removes it later if no manifest names it.

use std::time::Duration;

use futures::future::join_all;
use object_store::path::Path;
use object_store::PutPayload;

use crate::backup::pipeline::{OpenUpload, TargetFailure, UploadError};
use crate::storage::key::SnapshotKey;
use crate::storage::manifest::Manifest;
use crate::storage::target::Target;

/// How long an abort of this run's own failed upload may take before it is left to prune
/// (its marker names it).
const ABORT_PATIENCE: Duration = Duration::from_secs(30);

/// One copy of the snapshot that is complete (and, once its manifest is written, committed)
/// on a target.
#[derive(Debug, Clone)]
pub struct Committed {
    pub target: Target,
    /// The object's full key on that target.
    pub key: Path,
    /// The companion-files archive's full key on that target, when the snapshot has one.
    pub files_key: Option<Path>,
    /// Bytes written to that target (dump and files).
    pub bytes: u64,
}

/// Why a run stopped right before its commit: nothing was committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The advisory lock's session ended: another replica may be dumping the database.
    LockLost,
    Cancelled,
}

/// What the commit did.
#[derive(Debug)]
pub struct Commit {
    /// The manifest as written (its `targets` are the committed copies).
    pub manifest: Manifest,
    pub committed: Vec<Committed>,
    /// Targets that do not hold the snapshot, and why.
    pub failures: Vec<TargetFailure>,
    pub min_targets: usize,
}

impl Commit {
    /// Committed somewhere, but on fewer targets than `min_targets`: a failed run whose
    /// copies are kept.
    pub fn is_degraded(&self) -> bool {
        !self.committed.is_empty() && self.committed.len() < self.min_targets
    }
}

/// Completes `uploads` (and, when `manifest` names a files archive, each target's upload of
/// it in `files`) and writes `manifest` (with `targets` filled in) beside each complete pair,
/// at `snapshot`'s manifest key. `stopped` is asked right before the first manifest is
/// written: when it answers (the lock was lost, the run was cancelled), the completed objects
/// are deleted and nothing is committed.
pub async fn commit(
    uploads: Vec<OpenUpload>,
    files: Vec<OpenUpload>,
    snapshot: &SnapshotKey,
    mut manifest: Manifest,
    min_targets: usize,
    patience: Duration,
    stopped: impl Fn() -> Option<Stopped>,
) -> Result<Commit, Stopped> {
    let mut failures = Vec::new();
    let files_size = manifest.files_archive().map(|a| a.stored_size);
    let pairs = pair(uploads, files, files_size.is_some()).await;
    let completions = join_all(pairs.into_iter().map(|(dump, files)| {
        complete_pair(dump, files, manifest.stored_size, files_size, patience)
    }))
    .await;
    let mut complete = Vec::new();
    for c in completions {
        match c {
            Ok(c) => complete.push(c),
            Err(f) => failures.push(f),
        }
    }

    if let Some(why) = stopped() {
        for c in &complete {
            delete_own(&c.target, &c.key).await;
            if let Some(k) = &c.files_key {
                delete_own(&c.target, k).await;
            }
        }
        return Err(why);
    }

    manifest.targets = complete.iter().map(|c| c.target.name.clone()).collect();
    let written = write_manifests(&complete, snapshot, &manifest).await;
    let mut committed = Vec::new();
    for (c, w) in complete.into_iter().zip(written) {
        match w {
            Ok(()) => committed.push(c),
            Err(f) => failures.push(f),
        }
    }
    if committed.len() < manifest.targets.len() {
        // Name only the copies that exist. Best effort: a manifest that still names a failed
        // target is harmless (the catalog counts copies by the manifests it finds).
        manifest.targets = committed.iter().map(|c| c.target.name.clone()).collect();
        for f in write_manifests(&committed, snapshot, &manifest)
            .await
            .into_iter()
            .filter_map(Result::err)
        {
            tracing::warn!(message = "Could not rewrite a manifest's target list; it names a target that lacks the snapshot.", target = %f.target, error = %f.error);
        }
    }
    Ok(Commit {
        manifest,
        committed,
        failures,
        min_targets,
    })
}

/// Each dump upload with its target's files upload. With `files_wanted`, a dump upload
/// whose target has no files upload (it dropped out of the files pipeline, which reported
/// why) is aborted, and so is a files upload without a dump (none is expected).
async fn pair(
    uploads: Vec<OpenUpload>,
    mut files: Vec<OpenUpload>,
    files_wanted: bool,
) -> Vec<(OpenUpload, Option<OpenUpload>)> {
    let mut pairs = Vec::new();
    for dump in uploads {
        let mine = files
            .iter()
            .position(|f| f.target.name == dump.target.name)
            .map(|i| files.swap_remove(i));
        match mine {
            Some(f) if files_wanted => pairs.push((dump, Some(f))),
            Some(f) => {
                f.abort().await;
                pairs.push((dump, None));
            }
            None if files_wanted => dump.abort().await,
            None => pairs.push((dump, None)),
        }
    }
    for f in files {
        f.abort().await;
    }
    pairs
}

/// Completes a target's dump and files uploads together: when one fails, the other, if it
/// completed, is deleted (this run's own object, named by no manifest yet).
async fn complete_pair(
    dump: OpenUpload,
    files: Option<OpenUpload>,
    stored_size: u64,
    files_size: Option<u64>,
    patience: Duration,
) -> Result<Committed, TargetFailure> {
    let Some(files) = files else {
        return complete(dump, stored_size, patience).await;
    };
    let (d, f) = futures::join!(
        complete(dump, stored_size, patience),
        complete(files, files_size.unwrap_or_default(), patience)
    );
    match (d, f) {
        (Ok(mut d), Ok(f)) => {
            d.files_key = Some(f.key);
            d.bytes += f.bytes;
            Ok(d)
        }
        (Ok(done), Err(failed)) | (Err(failed), Ok(done)) => {
            delete_own(&done.target, &done.key).await;
            Err(failed)
        }
        (Err(failed), Err(_)) => Err(failed),
    }
}

/// Completes one upload and checks the object's size, each request bounded by `patience`
/// (`pipeline.stall_timeout`: a target that stops answering at the completion must not hold
/// the commit for the HTTP client's own timeout). On failure the upload is aborted (bounded
/// too) or the object deleted: it is this run's own, and no manifest names it yet. A
/// completion that timed out may still land: its object is then an orphan for prune.
async fn complete(
    u: OpenUpload,
    stored_size: u64,
    patience: Duration,
) -> Result<Committed, TargetFailure> {
    let OpenUpload {
        target,
        key,
        mut upload,
        bytes,
    } = u;
    let fail = |error| TargetFailure {
        target: target.name.clone(),
        error,
    };
    if bytes != stored_size {
        abort(&mut *upload).await;
        return Err(fail(UploadError::SizeMismatch {
            key: key.to_string(),
            expected: stored_size,
            got: bytes,
        }));
    }
    match tokio::time::timeout(patience, upload.complete()).await {
        Ok(Ok(_)) => {}
        Ok(Err(source)) => {
            abort(&mut *upload).await;
            return Err(fail(UploadError::Complete {
                key: key.to_string(),
                source,
            }));
        }
        Err(_) => {
            abort(&mut *upload).await;
            return Err(fail(UploadError::Stalled { after: patience }));
        }
    }
    let head = tokio::time::timeout(patience, target.store.head(&key)).await;
    let head = match head {
        Ok(h) => h,
        Err(_) => return Err(fail(UploadError::Stalled { after: patience })),
    };
    match head {
        Ok(meta) if meta.size == stored_size => Ok(Committed {
            target,
            key,
            files_key: None,
            bytes,
        }),
        Ok(meta) => {
            delete_own(&target, &key).await;
            Err(fail(UploadError::SizeMismatch {
                key: key.to_string(),
                expected: stored_size,
                got: meta.size,
            }))
        }
        Err(source) => Err(fail(UploadError::Complete {
            key: key.to_string(),
            source,
        })),
    }
}

/// Writes the manifest on each target, all at once.
async fn write_manifests(
    on: &[Committed],
    snapshot: &SnapshotKey,
    manifest: &Manifest,
) -> Vec<Result<(), TargetFailure>> {
    let body = manifest.to_json();
    join_all(on.iter().map(|c| {
        let key = c.target.at(&snapshot.manifest());
        let body = body.clone();
        async move {
            let Err(source) = c.target.store.put(&key, PutPayload::from(body)).await else {
                return Ok(());
            };
            // An error can come after the store applied the PUT (a timeout, a lost answer):
            // if the manifest there names this run's object, the snapshot is committed.
            if names_object(&c.target, &key, &manifest.object_key).await {
                tracing::info!(message = "A manifest PUT reported an error but the manifest is in place.", target = %c.target.name, key = %key, error = %source);
                return Ok(());
            }
            Err(TargetFailure {
                target: c.target.name.clone(),
                error: UploadError::Manifest {
                    key: key.to_string(),
                    source,
                },
            })
        }
    }))
    .await
}

/// Aborts this run's own upload, bounded: past [`ABORT_PATIENCE`] it is left to prune.
async fn abort(upload: &mut dyn object_store::MultipartUpload) {
    let _ = tokio::time::timeout(ABORT_PATIENCE, upload.abort()).await;
}

/// Whether the manifest at `key` names `object_key`.
async fn names_object(target: &Target, key: &Path, object_key: &str) -> bool {
    let Ok(got) = target.store.get(key).await else {
        return false;
    };
    let Ok(bytes) = got.bytes().await else {
        return false;
    };
    Manifest::from_json(key.as_ref(), &bytes).is_ok_and(|m| m.object_key == object_key)
}

/// Deletes an object this run created and no manifest names.
async fn delete_own(target: &Target, key: &Path) {
    if let Err(error) = target.store.delete(key).await {
        tracing::warn!(message = "Could not delete this run's uncommitted object; prune will.", target = %target.name, key = %key, error = %error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::pipeline::OpenUpload;
    use crate::storage::key::{RunId, SnapshotId};
    use crate::storage::manifest::tests::sample;
    use crate::test_support::keys;
    use object_store::memory::InMemory;
    use object_store::ObjectStore;
    use std::sync::Arc;

    async fn open(t: &Target, key: &Path, body: &'static [u8]) -> OpenUpload {
        let mut upload = t.store.put_multipart(key).await.unwrap();
        upload
            .put_part(PutPayload::from_static(body))
            .await
            .unwrap();
        OpenUpload {
            target: t.clone(),
            key: key.clone(),
            upload,
            bytes: body.len() as u64,
        }
    }

    fn setup() -> (Target, Target, SnapshotKey, Manifest, Path) {
        let a = Target::new("a", Arc::new(InMemory::new()), "", 10_000);
        let b = Target::new("b", Arc::new(InMemory::new()), "", 10_000);
        let mut m = sample();
        let snap = SnapshotKey::new(
            &m.source,
            &m.database,
            SnapshotId::parse(&m.snapshot_id).unwrap(),
        );
        let key = snap.dump(&RunId::random());
        m.object_key = key.to_string();
        m.stored_size = 4;
        (a, b, snap, m, key)
    }

    /// [`commit`] with 5 s of patience (every upload here is in memory) and `stopped` as
    /// what the run's watchers report.
    async fn commit_quickly(
        uploads: Vec<OpenUpload>,
        files: Vec<OpenUpload>,
        snap: &SnapshotKey,
        m: Manifest,
        min_targets: usize,
        stopped: Option<Stopped>,
    ) -> Result<Commit, Stopped> {
        let patience = Duration::from_secs(5);
        commit(uploads, files, snap, m, min_targets, patience, || stopped).await
    }

    #[tokio::test]
    async fn below_min_targets_the_completed_copy_stays_committed() {
        let (a, b, snap, m, key) = setup();
        let ua = open(&a, &key, b"dump").await;
        let ub = open(&b, &key, b"du").await; // b accepted fewer bytes than were stored
        let c = commit_quickly(vec![ua, ub], vec![], &snap, m, 2, None)
            .await
            .unwrap();
        assert!(c.is_degraded());
        assert_eq!(c.manifest.targets, ["a"]);
        assert_eq!(c.failures.len(), 1);
        assert!(matches!(
            c.failures[0].error,
            UploadError::SizeMismatch { got: 2, .. }
        ));
        assert_eq!(
            keys(&a).await,
            [key.to_string(), snap.manifest().to_string()]
        );
        assert!(
            keys(&b).await.is_empty(),
            "b's short object was never completed"
        );
    }

    /// `m` with a files archive of 5 stored bytes, and its key.
    fn with_files(snap: &SnapshotKey, m: &mut Manifest) -> Path {
        use crate::storage::manifest::{Files, FilesArchive};
        let key = snap.files_as(&RunId::random(), false);
        m.files = Some(Files::Archive(FilesArchive {
            object_key: key.to_string(),
            stored_size: 5,
            raw_size: 10240,
            sha256: "00".repeat(32),
            file_count: 1,
            file_bytes: 3,
            skipped: 0,
        }));
        key
    }

    #[tokio::test]
    async fn a_target_commits_only_with_both_its_dump_and_its_files() {
        let (a, b, snap, mut m, key) = setup();
        let files = with_files(&snap, &mut m);
        let c = commit_quickly(
            vec![open(&a, &key, b"dump").await, open(&b, &key, b"dump").await],
            vec![
                open(&a, &files, b"files").await,
                open(&b, &files, b"fil").await, // b's files upload is short
            ],
            &snap,
            m,
            1,
            None,
        )
        .await
        .unwrap();
        assert_eq!(c.manifest.targets, ["a"]);
        assert_eq!(c.committed[0].files_key.as_ref(), Some(&files));
        assert_eq!(c.committed[0].bytes, 9);
        assert_eq!(c.failures.len(), 1);
        assert_eq!(c.failures[0].target, "b");
        let mut want = vec![
            key.to_string(),
            files.to_string(),
            snap.manifest().to_string(),
        ];
        want.sort();
        assert_eq!(keys(&a).await, want);
        assert!(
            keys(&b).await.is_empty(),
            "b's completed dump was deleted with its failed files"
        );
    }

    #[tokio::test]
    async fn a_target_without_a_files_upload_gets_nothing() {
        let (a, b, snap, mut m, key) = setup();
        let files = with_files(&snap, &mut m);
        let c = commit_quickly(
            vec![open(&a, &key, b"dump").await, open(&b, &key, b"dump").await],
            vec![open(&a, &files, b"files").await],
            &snap,
            m,
            2,
            None,
        )
        .await
        .unwrap();
        assert!(c.is_degraded());
        assert_eq!(c.manifest.targets, ["a"]);
        assert!(keys(&b).await.is_empty(), "b's dump upload was aborted");
        assert_eq!(keys(&a).await.len(), 3);
    }

    #[tokio::test]
    async fn a_lost_lock_deletes_the_files_too() {
        let (a, _, snap, mut m, key) = setup();
        let files = with_files(&snap, &mut m);
        let c = commit_quickly(
            vec![open(&a, &key, b"dump").await],
            vec![open(&a, &files, b"files").await],
            &snap,
            m,
            1,
            Some(Stopped::Cancelled),
        )
        .await;
        assert_eq!(c.unwrap_err(), Stopped::Cancelled);
        assert!(keys(&a).await.is_empty());
    }

    #[tokio::test]
    async fn a_lost_lock_commits_nothing_and_removes_only_its_own_objects() {
        let (a, _, snap, m, key) = setup();
        // Another run's committed snapshot of the same slot.
        let other = snap.dump(&RunId::random());
        a.store
            .put(&other, PutPayload::from_static(b"them"))
            .await
            .unwrap();
        let manifest = snap.manifest();
        a.store
            .put(&manifest, PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        let ua = open(&a, &key, b"dump").await;
        let c = commit_quickly(vec![ua], vec![], &snap, m, 1, Some(Stopped::LockLost)).await;
        assert_eq!(c.unwrap_err(), Stopped::LockLost);
        let mut want = vec![other.to_string(), manifest.to_string()];
        want.sort();
        assert_eq!(keys(&a).await, want);
    }
}
