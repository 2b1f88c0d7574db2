//! `repair`: copies each snapshot a target is missing, or holds damaged, from a target that
//! holds a good copy.
//!
//! It acts on a [`check`](crate::check) report. Per snapshot (one snapshot's targets
//! in turn, so that its manifests' `targets` grow consistently; [`REPAIR_CONCURRENCY`]
//! snapshots at once), per target to fix:
//!
//! 1. the objects first (the dump, then the companion-files archive when the snapshot has
//!    one), each under the very key the manifest names (write-once keys: every holder's
//!    manifest stays identical): an object already there with the manifest's size and sha256
//!    is kept as it is; otherwise GET from a holder, sha256 and byte count as the bytes pass,
//!    cut into parts and uploaded through `upload::start` (a marked multipart upload, so that a
//!    repair killed mid-copy leaves only an upload `prune` aborts);
//! 2. hash and size equal to the manifest's? Complete the upload; otherwise abort it (a copy
//!    whose hash differs is never written) and try the next holder;
//! 3. once every object is there, the manifest (its existence commits the copy), with
//!    `targets` naming every holder, on the repaired target; then, best effort, the same
//!    manifest on the other holders.
//!
//! It never overwrites a good copy: a target that meanwhile holds a manifest naming other
//! intact objects, or the same objects intact, is left alone. Memory: per copy, at most
//! [`PARTS_IN_FLIGHT`] parts uploading plus the one being filled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use futures::stream::FuturesOrdered;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{MultipartUpload, PutPayload};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::check::{CheckReport, Expected, Problem, ProblemKind};
use crate::metrics::Outcome;
use crate::storage::catalog::same_objects;
use crate::storage::catalog::{full_manifest, read_manifest, SnapshotEntry};
use crate::storage::key::{SnapshotId, SnapshotKey};
use crate::storage::manifest::Manifest;
use crate::storage::target::{error_text, PartSizer, Target};
use crate::storage::upload;

/// Snapshots repaired at once: each is one GET stream and one multipart upload; two keep a
/// link busy without starving the backups that share it.
pub const REPAIR_CONCURRENCY: usize = 2;

/// Parts of one copy uploading at once (plus the one being filled): bounds a copy's memory
/// to three parts, as the backup pipeline's per-target queue does.
pub const PARTS_IN_FLIGHT: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("target {target}: cannot read {key}: {error}; the next repair tries again or another holder")]
    Read {
        target: String,
        key: String,
        error: String,
    },
    #[error("target {target}: cannot write {key}: {error}; check the target, then run `pgferry repair --to {target}` again")]
    Write {
        target: String,
        key: String,
        error: String,
    },
    #[error("the copy of {key} on target {target} hashes to {sha256} ({size} bytes), not to the manifest's {expected}: it is damaged and was not copied; run `pgferry check --read-data`")]
    Mismatch {
        target: String,
        key: String,
        sha256: String,
        size: u64,
        expected: String,
    },
    #[error("snapshot {snapshot} has no good copy to repair target {target} from (tried: {tried}); restore it from elsewhere or let retention expire it")]
    NoGoodCopy {
        snapshot: String,
        target: String,
        tried: String,
    },
    #[error("target {target}: an upload of {key} is open, its marker rewritten {age:?} ago: another repair (another replica?) is copying it, or one was killed; it is left alone until its marker is {stale:?} old, then the next repair cleans it and copies")]
    Busy {
        target: String,
        key: String,
        age: std::time::Duration,
        stale: std::time::Duration,
    },
    #[error("cancelled")]
    Cancelled,
}

/// What to repair.
#[derive(Debug, Clone, Default)]
pub struct RepairOptions {
    /// Copy only from this target.
    pub from: Option<String>,
    /// Repair only this target.
    pub to: Option<String>,
    /// Plan, copy nothing.
    pub dry_run: bool,
}

/// One copy repair made, planned, left alone, or failed.
#[derive(Debug, Clone, Serialize)]
pub struct Copied {
    pub snapshot: String,
    pub target: String,
    /// The holder copied from (planned: the first candidate).
    pub from: Option<String>,
    /// Copied: the bytes of the objects copied (an intact one kept is not counted);
    /// otherwise those of every object of the snapshot.
    pub bytes: u64,
    /// Serialized as `result` (`copied`, `planned`, `left_alone`, `failed`) and `detail`.
    #[serde(flatten)]
    pub result: CopyResult,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "result", content = "detail")]
pub enum CopyResult {
    Copied,
    Planned,
    /// The target holds a good copy after all (written meanwhile): nothing written.
    LeftAlone(String),
    Failed(String),
}

/// What a repair run did.
#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    pub copies: Vec<Copied>,
}

impl RepairReport {
    pub fn failed(&self) -> usize {
        self.copies
            .iter()
            .filter(|c| matches!(c.result, CopyResult::Failed(_)))
            .count()
    }
}

/// Repairs what `report` (a check) found, as `opts` selects. `copied` counts the bytes copied
/// so far (for progress).
pub async fn repair(
    app: &App,
    report: &CheckReport,
    opts: &RepairOptions,
    copied: Arc<AtomicU64>,
    cancel: CancellationToken,
) -> RepairReport {
    // (source, database, id) → the targets to fix and the targets whose copy is suspect.
    let mut work: BTreeMap<(String, String, String), Vec<&Problem>> = BTreeMap::new();
    for p in &report.problems {
        work.entry((p.source.clone(), p.database.clone(), p.snapshot_id.clone()))
            .or_default()
            .push(p);
    }
    let jobs = work.into_iter().filter_map(|(key, problems)| {
        let entry = report.expected.iter().find(|e| {
            (
                &e.manifest.source,
                &e.manifest.database,
                &e.manifest.snapshot_id,
            ) == (&key.0, &key.1, &key.2)
        })?;
        Some(repair_snapshot(
            app,
            entry,
            problems,
            opts,
            copied.clone(),
            cancel.clone(),
        ))
    });
    // Collected first: see `check` (a borrowing closure in the stream is not `Send` enough).
    let jobs: Vec<_> = jobs.collect();
    let copies: Vec<Vec<Copied>> = futures::stream::iter(jobs)
        .buffer_unordered(REPAIR_CONCURRENCY)
        .collect()
        .await;
    RepairReport {
        copies: copies.into_iter().flatten().collect(),
    }
}

async fn repair_snapshot(
    app: &App,
    entry: &SnapshotEntry,
    problems: Vec<&Problem>,
    opts: &RepairOptions,
    copied: Arc<AtomicU64>,
    cancel: CancellationToken,
) -> Vec<Copied> {
    let m = &entry.manifest;
    let name = format!("{}/{}/{}", m.source, m.database, m.snapshot_id);
    let suspect: Vec<&str> = problems.iter().map(|p| p.target.as_str()).collect();
    // Good holders: hold it, and no problem was found with their copy.
    let mut holders: Vec<String> = entry
        .targets
        .iter()
        .filter(|t| !suspect.contains(&t.as_str()))
        .cloned()
        .collect();
    // One copy per target, whatever number of its objects are damaged (dump and files).
    let mut per_target: Vec<(&Problem, Vec<&Problem>)> = Vec::new();
    for p in problems {
        match per_target
            .iter_mut()
            .find(|(first, _)| first.target == p.target)
        {
            Some((_, all)) => all.push(p),
            None => per_target.push((p, vec![p])),
        }
    }
    let bytes = Expected::of(m)
        .map(|o| o.iter().map(|o| o.size).sum())
        .unwrap_or(m.stored_size);
    let mut out = Vec::new();
    for (p, of_target) in per_target {
        if opts.to.as_deref().is_some_and(|to| to != p.target) {
            continue;
        }
        let Some(target) = app.target(&p.target) else {
            continue;
        };
        let candidates: Vec<&Target> = holders
            .iter()
            .filter(|h| opts.from.as_deref().is_none_or(|f| f == h.as_str()))
            .filter_map(|h| app.target(h))
            .collect();
        let mut done = Copied {
            snapshot: name.clone(),
            target: p.target.clone(),
            from: candidates.first().map(|t| t.name.clone()),
            bytes,
            result: CopyResult::Planned,
        };
        if opts.dry_run {
            if candidates.is_empty() {
                done.result = CopyResult::Failed("no good copy to copy from".into());
            }
            tracing::info!(message = "Repair would copy a snapshot.", snapshot = %name, target = %p.target, from = ?done.from, bytes);
            out.push(done);
            continue;
        }
        let kinds: Vec<&Problem> = of_target;
        done.result = match repair_copy(
            entry,
            &kinds,
            target,
            &candidates,
            &holders,
            app,
            &copied,
            &cancel,
        )
        .await
        {
            Ok((from, Fixed::Copied { bytes })) => {
                holders.push(p.target.clone());
                done.from = Some(from);
                done.bytes = bytes;
                CopyResult::Copied
            }
            Ok((_, Fixed::LeftAlone(why))) => CopyResult::LeftAlone(why),
            Err(RepairError::Cancelled) => CopyResult::Failed("cancelled".into()),
            Err(e) => CopyResult::Failed(e.to_string()),
        };
        let outcome = match &done.result {
            CopyResult::Copied => Some(Outcome::Success),
            CopyResult::Failed(_) if !cancel.is_cancelled() => Some(Outcome::Failure),
            _ => None,
        };
        if let Some(o) = outcome {
            app.metrics
                .repairs_total
                .with_label_values(&[&p.target, o.as_str()])
                .inc();
        }
        match &done.result {
            CopyResult::Copied => {
                tracing::info!(message = "Repair copied a snapshot.", snapshot = %name, target = %p.target, from = ?done.from, bytes = done.bytes)
            }
            CopyResult::LeftAlone(why) => {
                tracing::info!(message = "Repair left a copy alone.", snapshot = %name, target = %p.target, reason = %why)
            }
            CopyResult::Failed(error) => {
                tracing::warn!(message = "Repair could not copy a snapshot.", snapshot = %name, target = %p.target, error = %error)
            }
            CopyResult::Planned => {}
        }
        out.push(done);
    }
    out
}

enum Fixed {
    /// The objects that were missing or damaged (`bytes` of them) and the manifest written.
    Copied {
        bytes: u64,
    },
    LeftAlone(String),
}

#[allow(clippy::too_many_arguments)]
async fn repair_copy(
    entry: &SnapshotEntry,
    problems: &[&Problem],
    target: &Target,
    candidates: &[&Target],
    holders: &[String],
    app: &App,
    copied: &AtomicU64,
    cancel: &CancellationToken,
) -> Result<(String, Fixed), RepairError> {
    let m = &entry.manifest;
    let objects = Expected::of(m).ok_or_else(|| RepairError::Read {
        target: target.name.clone(),
        key: m.object_key.clone(),
        error: "not a key pgferry wrote".into(),
    })?;
    // Objects the check found damaged here: copied over without reading them again.
    let damaged: Vec<&str> = problems
        .iter()
        .filter(|p| is_damage(&p.kind))
        .map(|p| p.object_key.as_str())
        .collect();
    let id = SnapshotId::parse(&m.snapshot_id).ok_or_else(|| RepairError::Read {
        target: target.name.clone(),
        key: m.snapshot_id.clone(),
        error: "not a snapshot id".into(),
    })?;
    let manifest_key = target.at(&SnapshotKey::new(&m.source, &m.database, id).manifest());
    if let Some(why) = good_copy_there(target, &manifest_key, m, &damaged).await {
        return Ok((target.name.clone(), Fixed::LeftAlone(why)));
    }
    // The catalog holds summaries (no `tables`): what is written is the manifest in full.
    let full = full_manifest(&app.targets, entry)
        .await
        .map_err(|error| RepairError::Read {
            target: target.name.clone(),
            key: manifest_key.to_string(),
            error,
        })?;
    let mut tried = Vec::new();
    for from in candidates {
        if cancel.is_cancelled() {
            return Err(RepairError::Cancelled);
        }
        tracing::info!(message = "Repair copying a snapshot.", snapshot_id = %m.snapshot_id, source = %m.source, database = %m.database, target = %target.name, from = %from.name, bytes = m.stored_size);
        let mut failed = None;
        let mut bytes = 0;
        for object in &objects {
            let known_bad = damaged.contains(&object.key.as_ref());
            if !known_bad && intact_there(target, object).await {
                tracing::info!(message = "Repair kept an intact object.", target = %target.name, key = %object.key);
                continue;
            }
            let grace = app.config.pipeline.orphan_grace;
            match copy_object(from, target, object, grace, copied, cancel).await {
                Ok(()) => bytes += object.size,
                Err(RepairError::Cancelled) => return Err(RepairError::Cancelled),
                // About the destination: another holder would find the same upload open.
                Err(e @ RepairError::Busy { .. }) => return Err(e),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            tracing::warn!(message = "Repair could not copy from this holder.", target = %target.name, from = %from.name, error = %e);
            tried.push(format!("{}: {e}", from.name));
            continue;
        }
        // The objects are there, whole: now the manifest, unless a good one appeared meanwhile.
        if let Some(why) = good_copy_there(target, &manifest_key, m, &damaged).await {
            return Ok((from.name.clone(), Fixed::LeftAlone(why)));
        }
        let mut repaired = full.clone();
        repaired.targets = app
            .targets
            .iter()
            .map(|t| t.name.clone())
            .filter(|n| n == &target.name || holders.contains(n))
            .collect();
        let body = PutPayload::from(repaired.to_json());
        target
            .store
            .put(&manifest_key, body.clone())
            .await
            .map_err(|e| RepairError::Write {
                target: target.name.clone(),
                key: manifest_key.to_string(),
                error: error_text(&e),
            })?;
        for h in holders.iter().filter_map(|h| app.target(h)) {
            rewrite_manifest(
                h,
                &manifest_key_on(h, &manifest_key, target),
                m,
                body.clone(),
            )
            .await;
        }
        return Ok((from.name.clone(), Fixed::Copied { bytes }));
    }
    Err(RepairError::NoGoodCopy {
        snapshot: format!("{}/{}/{}", m.source, m.database, m.snapshot_id),
        target: target.name.clone(),
        tried: if tried.is_empty() {
            "no holder".into()
        } else {
            tried.join("; ")
        },
    })
}

/// The same manifest key on another target (prefixes differ).
fn manifest_key_on(h: &Target, key_on_target: &Path, target: &Target) -> Path {
    let prefix_len = target.folder(None, None).parts().count();
    h.at(&Path::from_iter(key_on_target.parts().skip(prefix_len)))
}

/// Writes the updated manifest on a holder whose manifest still names the same object; a
/// failure only leaves that holder's `targets` out of date, so it is logged.
async fn rewrite_manifest(h: &Target, key: &Path, m: &Manifest, body: PutPayload) {
    match read_manifest(h, key).await {
        Ok(there) if same_objects(&there, m) => {}
        _ => return,
    }
    if let Err(error) = h.store.put(key, body).await {
        tracing::warn!(message = "Could not update a holder's manifest targets; the copy is fine.", target = %h.name, key = %key, error = %error_text(&error));
    }
}

/// Whether the check found this object of a copy damaged (not merely the copy missing).
fn is_damage(kind: &ProblemKind) -> bool {
    matches!(
        kind,
        ProblemKind::WrongHash { .. }
            | ProblemKind::WrongSize { .. }
            | ProblemKind::ObjectMissing
            | ProblemKind::Unreadable { .. }
    )
}

/// `Some(why)` when `target` holds a manifest of the snapshot whose objects (dump and files)
/// are intact (listed with the manifest's sizes) and the check did not find that very copy
/// damaged (`damaged`: the objects it found damaged there).
async fn good_copy_there(
    target: &Target,
    manifest_key: &Path,
    m: &Manifest,
    damaged: &[&str],
) -> Option<String> {
    let there = read_manifest(target, manifest_key).await.ok()?;
    if same_objects(&there, m) && Expected::of(&there) != Expected::of(m) {
        // Two manifests of the same objects that disagree about their bytes: one bucket was
        // changed outside pgferry. Copying over this one could destroy the good copy.
        return Some(format!(
            "its own manifest of {} disagrees with the one repair would copy from (sha256 {} here, {} there): the targets' manifests disagree; find out which bucket was changed and fix it by hand",
            there.object_key, there.sha256, m.sha256
        ));
    }
    for object in Expected::of(&there)? {
        let head = target.store.head(&target.at(&object.key)).await.ok()?;
        if head.size != object.size {
            return None;
        }
    }
    let damaged_here = same_objects(&there, m) && !damaged.is_empty();
    (!damaged_here).then(|| {
        format!(
            "it holds a manifest naming the intact object {}",
            there.object_key
        )
    })
}

/// Whether `object` is on `target` already with the manifest's size and sha256 (read to be
/// sure): then it is never written again.
async fn intact_there(target: &Target, object: &Expected) -> bool {
    let key = target.at(&object.key);
    match target.store.head(&key).await {
        Ok(head) if head.size == object.size => {}
        _ => return false,
    }
    matches!(
        crate::check::hash_object(target, &key).await,
        Ok((sha256, size)) if sha256 == object.sha256 && size == object.size
    )
}

/// Streams `object` from `from` to `to` (same relative key), checking the manifest's sha256
/// and size before completing the upload; aborts it otherwise.
async fn copy_object(
    from: &Target,
    to: &Target,
    object: &Expected,
    grace: std::time::Duration,
    copied: &AtomicU64,
    cancel: &CancellationToken,
) -> Result<(), RepairError> {
    let src = from.at(&object.key);
    let dst = to.at(&object.key);
    let (stored_size, want_sha256) = (object.size, &object.sha256);
    let read_err = |e: object_store::Error| RepairError::Read {
        target: from.name.clone(),
        key: src.to_string(),
        error: error_text(&e),
    };
    let write_err = |e: object_store::Error| RepairError::Write {
        target: to.name.clone(),
        key: dst.to_string(),
        error: error_text(&e),
    };
    clear_left_upload(to, &dst, grace).await?;
    let mut stream = from.store.get(&src).await.map_err(read_err)?.into_stream();
    let mut upload = upload::start(to, &dst).await.map_err(write_err)?;
    let heartbeat = upload::Heartbeat::start(to, &dst, upload::MARKER_HEARTBEAT).await;
    // The size is known: one part size that fits the whole object in the target's limit.
    let fits = stored_size
        .div_ceil(u64::from(to.max_parts.max(1)))
        .next_multiple_of(1 << 20);
    let part = PartSizer::new(Some(stored_size), to.max_parts)
        .first()
        .max(fits) as usize;
    let fed = async {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = BytesMut::new();
        let mut in_flight = FuturesOrdered::new();
        loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => return Err(RepairError::Cancelled),
                c = stream.try_next() => c.map_err(read_err)?,
            };
            let Some(chunk) = chunk else {
                if !buf.is_empty() || size == 0 {
                    let body = PutPayload::from(buf.split().freeze());
                    send(upload.as_mut(), &mut in_flight, body)
                        .await
                        .map_err(write_err)?;
                }
                break;
            };
            hasher.update(&chunk);
            size += chunk.len() as u64;
            copied.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            buf.extend_from_slice(&chunk);
            while buf.len() >= part {
                let body = PutPayload::from(buf.split_to(part).freeze());
                send(upload.as_mut(), &mut in_flight, body)
                    .await
                    .map_err(write_err)?;
            }
        }
        while let Some(r) = in_flight.next().await {
            r.map_err(write_err)?;
        }
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != *want_sha256 || size != stored_size {
            return Err(RepairError::Mismatch {
                target: from.name.clone(),
                key: src.to_string(),
                sha256,
                size,
                expected: want_sha256.clone(),
            });
        }
        Ok(())
    }
    .await;
    if let Some(h) = heartbeat {
        h.stop().await;
    }
    if let Err(e) = fed {
        abort(to, &dst, upload.as_mut()).await;
        return Err(e);
    }
    upload.complete().await.map_err(write_err)?;
    let head = to.store.head(&dst).await.map_err(write_err)?;
    if head.size != stored_size {
        return Err(RepairError::Write {
            target: to.name.clone(),
            key: dst.to_string(),
            error: format!(
                "the completed object has {} bytes, the manifest says {}",
                head.size, stored_size
            ),
        });
    }
    Ok(())
}

async fn abort(to: &Target, dst: &Path, upload: &mut dyn MultipartUpload) {
    if let Err(error) = upload.abort().await {
        tracing::warn!(message = "Could not abort a repair's upload; prune will.", target = %to.name, key = %dst, error = %error_text(&error));
    }
}

/// Aborts the upload a killed repair (or backup) left open on this very key: its marker
/// would otherwise be overwritten by ours and the upload forgotten. Only a marker not
/// rewritten for [`upload::MARKER_STALE`] (or `pipeline.orphan_grace`, when shorter): a live
/// repair (a second replica's) rewrites its marker every [`upload::MARKER_HEARTBEAT`], and
/// cleaning would destroy its upload or, once completed, its object; this copy is then
/// [`RepairError::Busy`] and left to a later run. A marker written on this host by a process
/// that is gone is stale at once (a repair killed and run again on the same machine).
async fn clear_left_upload(
    to: &Target,
    dst: &Path,
    grace: std::time::Duration,
) -> Result<(), RepairError> {
    let Some(marker) = upload::marker_key(dst) else {
        return Ok(());
    };
    let Ok(head) = to.store.head(&marker).await else {
        return Ok(());
    };
    let age = (chrono::Utc::now() - head.last_modified)
        .to_std()
        .unwrap_or_default();
    let stale = upload::MARKER_STALE.min(grace);
    let dead = || async {
        upload::read_marker(to, &marker)
            .await
            .is_some_and(|m| upload::left_by_dead_process(&m))
    };
    if age < stale && !dead().await {
        return Err(RepairError::Busy {
            target: to.name.clone(),
            key: dst.to_string(),
            age: std::time::Duration::from_secs(age.as_secs()),
            stale,
        });
    }
    match upload::clean(to, &marker, false).await {
        Ok(cleaned) => {
            tracing::info!(message = "Repair cleaned an upload left by an earlier run.", target = %to.name, key = %marker, outcome = ?cleaned)
        }
        Err(error) => {
            tracing::warn!(message = "Could not clean an upload left by an earlier run; prune will.", target = %to.name, key = %marker, error = %error)
        }
    }
    Ok(())
}

/// Queues one part, first waiting until fewer than [`PARTS_IN_FLIGHT`] are uploading.
async fn send(
    upload: &mut dyn MultipartUpload,
    in_flight: &mut FuturesOrdered<object_store::UploadPart>,
    body: PutPayload,
) -> Result<(), object_store::Error> {
    while in_flight.len() >= PARTS_IN_FLIGHT {
        if let Some(done) = in_flight.next().await {
            done?;
        }
    }
    in_flight.push_back(upload.put_part(body));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{self, CheckOptions};
    use crate::config::Config;
    use crate::storage::key::{object_path, RunId};
    use crate::storage::manifest::tests::sample;
    use crate::test_support::{keys, put_at, read};
    use object_store::ObjectStore;

    /// Two directory targets `a` and `b` and a source `prod` (never connected to).
    fn app(dir: &std::path::Path) -> App {
        let toml = format!(
            "[[source]]\nname = \"prod\"\nurl = \"postgres://u@127.0.0.1:1/postgres\"\n\
             [[target]]\nname = \"a\"\nurl = \"file://{0}/a\"\n\
             [[target]]\nname = \"b\"\nurl = \"file://{0}/b\"\n",
            dir.display()
        );
        let config = Config::from_str_at(&toml, &dir.join("pgferry.toml")).unwrap();
        App::new(config).unwrap()
    }

    /// Commits a snapshot on `a` whose object holds `body`, with a manifest whose sha256 is
    /// that of `claimed`.
    async fn commit_on_a(app: &App, body: &[u8], claimed: &[u8]) -> Manifest {
        let a = app.target("a").unwrap();
        let mut m = sample();
        let id = SnapshotId::parse(&m.snapshot_id).unwrap();
        let key = SnapshotKey::new(&m.source, &m.database, id);
        let object = key.dump(&RunId::random());
        m.object_key = object.to_string();
        m.stored_size = claimed.len() as u64;
        m.sha256 = hex::encode(Sha256::digest(claimed));
        m.targets = vec!["a".into()];
        put_at(a, &object, body.to_vec()).await;
        put_at(a, &key.manifest(), m.to_json()).await;
        m
    }

    /// Asserts that `report` holds one copy per entry of `want`, in order, each with a result
    /// of that kind (the details of `LeftAlone` and `Failed` are not compared).
    fn assert_copies(report: &RepairReport, want: &[CopyResult]) {
        let kind = std::mem::discriminant::<CopyResult>;
        assert!(
            report.copies.len() == want.len()
                && report
                    .copies
                    .iter()
                    .zip(want)
                    .all(|(c, w)| kind(&c.result) == kind(w)),
            "{report:?}"
        );
    }

    async fn run(app: &App, dry_run: bool) -> RepairReport {
        let report = check::check(app, &CheckOptions::default()).await;
        let opts = RepairOptions {
            dry_run,
            ..RepairOptions::default()
        };
        repair(
            app,
            &report,
            &opts,
            Arc::default(),
            CancellationToken::new(),
        )
        .await
    }

    /// Repairs what `report` found, with the default options.
    async fn repair_report(app: &App, report: &CheckReport) -> RepairReport {
        repair(
            app,
            report,
            &RepairOptions::default(),
            Arc::default(),
            CancellationToken::new(),
        )
        .await
    }

    #[tokio::test]
    async fn a_missing_copy_is_written_object_then_manifest_naming_every_holder() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let body = b"zstd bytes".repeat(1000);
        let m = commit_on_a(&app, &body, &body).await;
        let b = app.target("b").unwrap();

        let planned = run(&app, true).await;
        assert_copies(&planned, &[CopyResult::Planned]);
        assert!(keys(b).await.is_empty(), "--dry-run wrote");

        let done = run(&app, false).await;
        assert_copies(&done, &[CopyResult::Copied]);
        let object = object_path(&m.object_key).unwrap();
        let copied = read(&*b.store, &b.at(&object)).await;
        assert_eq!(copied.as_ref(), body.as_slice());
        for t in ["a", "b"] {
            let t = app.target(t).unwrap();
            let key =
                t.at(
                    &SnapshotKey::new("prod", "acme", SnapshotId::parse(&m.snapshot_id).unwrap())
                        .manifest(),
                );
            let there = read_manifest(t, &key).await.unwrap();
            assert_eq!(there.targets, ["a", "b"]);
            assert_eq!(there.object_key, m.object_key);
        }
        assert!(
            run(&app, false).await.copies.is_empty(),
            "a second repair found work"
        );
    }

    #[tokio::test]
    async fn a_copy_whose_hash_differs_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let claimed = b"the bytes the manifest hashed".to_vec();
        let mut damaged = claimed.clone();
        damaged[3] ^= 1;
        commit_on_a(&app, &damaged, &claimed).await;

        let done = run(&app, false).await;
        assert_eq!(done.failed(), 1, "{done:?}");
        match &done.copies[0].result {
            CopyResult::Failed(e) => {
                assert!(e.contains("no good copy") && e.contains("hashes to"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            keys(app.target("b").unwrap()).await.is_empty(),
            "a damaged copy was written"
        );
        assert_eq!(
            app.metrics
                .repairs_total
                .with_label_values(&["b", "failure"])
                .get(),
            1
        );
    }

    /// Commits a snapshot with companion files on `a`: dump `body`, archive `files`, then the
    /// manifest naming both (sha256 of what they hold).
    async fn commit_with_files_on_a(app: &App, body: &[u8], files: &[u8]) -> Manifest {
        use crate::storage::manifest::{Files, FilesArchive, FILES_FORMAT_VERSION};
        let a = app.target("a").unwrap();
        let mut m = commit_on_a(app, body, body).await;
        let key = SnapshotKey::new(
            &m.source,
            &m.database,
            SnapshotId::parse(&m.snapshot_id).unwrap(),
        );
        let run = match crate::storage::key::parse_name(
            object_path(&m.object_key).unwrap().filename().unwrap(),
        ) {
            Some(crate::storage::key::OwnedName::Dump(_, Some(run))) => run,
            other => panic!("{other:?}"),
        };
        let archive = key.files_as(&run, false);
        m.files = Some(Files::Archive(FilesArchive {
            object_key: archive.to_string(),
            stored_size: files.len() as u64,
            raw_size: 0,
            sha256: hex::encode(Sha256::digest(files)),
            file_count: 1,
            file_bytes: 1,
            skipped: 0,
        }));
        m.format_version = FILES_FORMAT_VERSION;
        put_at(a, &archive, files.to_vec()).await;
        put_at(a, &key.manifest(), m.to_json()).await;
        m
    }

    /// Copies every object of `a` to `b` as it is (a copy made while both were up).
    async fn mirror(app: &App) {
        let (a, b) = (app.target("a").unwrap(), app.target("b").unwrap());
        for k in keys(a).await {
            let bytes = read(&*a.store, &Path::from(k.as_str())).await;
            let rel = k
                .strip_prefix(&format!("{}/", a.folder(None, None)))
                .unwrap_or(&k)
                .to_string();
            put_at(b, &Path::from(rel.as_str()), bytes).await;
        }
    }

    async fn bytes_of(t: &Target, key: &str) -> Vec<u8> {
        let key = t.at(&object_path(key).unwrap());
        read(&*t.store, &key).await.to_vec()
    }

    /// The identity of the file a directory target holds for `key`: (inode, mtime). A rewrite
    /// (object_store writes a new file and renames it into place) changes the inode.
    fn file_id(dir: &std::path::Path, t: &str, key: &str) -> (u64, std::time::SystemTime) {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.join(t).join(key)).unwrap();
        (meta.ino(), meta.modified().unwrap())
    }

    fn files_key(m: &Manifest) -> String {
        m.files_archive().unwrap().object_key.clone()
    }

    #[tokio::test]
    async fn a_copy_whose_own_manifest_disagrees_is_reported_so_and_never_overwritten() {
        // b holds the intact snapshot; a's object and manifest were rewritten together (a
        // bucket changed outside pgferry), and a comes first, so the catalog knows the
        // snapshot by a's manifest.
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let good = b"zstd bytes".repeat(1000);
        let m = commit_on_a(&app, &good, &good).await;
        mirror(&app).await;
        let mut bad = good.clone();
        bad[500] ^= 1;
        let mut forged = commit_on_a(&app, &bad, &bad).await;
        // Same object key as the real one: rewrite it in place.
        let a = app.target("a").unwrap();
        forged.object_key = m.object_key.clone();
        put_at(a, &object_path(&m.object_key).unwrap(), bad.clone()).await;
        let id = SnapshotId::parse(&m.snapshot_id).unwrap();
        let manifest = SnapshotKey::new(&m.source, &m.database, id).manifest();
        put_at(a, &manifest, forged.to_json().to_vec()).await;

        let read = CheckOptions {
            read_data: true,
            jobs: 1,
            ..CheckOptions::default()
        };
        let report = check::check(&app, &read).await;
        assert!(
            matches!(
                report.problems[..],
                [Problem {
                    kind: ProblemKind::ManifestsDisagree { .. },
                    ..
                }]
            ),
            "b is blamed as damaged: {:?}",
            report.problems
        );
        assert!(!report.problems[0].fix().contains("repair --to"));
        let done = repair_report(&app, &report).await;
        let b = app.target("b").unwrap();
        assert_eq!(bytes_of(b, &m.object_key).await, good, "{done:?}");
        // Even given a report that calls b's copy damaged (an older check), repair leaves it.
        let blamed = CheckReport {
            problems: vec![Problem {
                kind: ProblemKind::WrongHash {
                    sha256: forged.sha256.clone(),
                    size: good.len() as u64,
                },
                ..report.problems[0].clone()
            }],
            expected: report.expected.clone(),
            ..CheckReport::default()
        };
        let done = repair_report(&app, &blamed).await;
        assert_copies(&done, &[CopyResult::LeftAlone(String::new())]);
        assert_eq!(bytes_of(b, &m.object_key).await, good);
    }

    #[tokio::test]
    async fn a_missing_files_archive_is_copied_alone_and_the_intact_dump_kept() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let m = commit_with_files_on_a(&app, &b"dump".repeat(500), &b"tar".repeat(700)).await;
        mirror(&app).await;
        let b = app.target("b").unwrap();
        b.store
            .delete(&b.at(&object_path(&files_key(&m)).unwrap()))
            .await
            .unwrap();
        let dump_before = file_id(dir.path(), "b", &m.object_key);

        let report = check::check(&app, &CheckOptions::default()).await;
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        let p = &report.problems[0];
        assert_eq!(
            (p.target.as_str(), &p.kind),
            ("b", &ProblemKind::ObjectMissing)
        );
        assert_eq!(p.object_key, files_key(&m));

        let done = run(&app, false).await;
        assert_copies(&done, &[CopyResult::Copied]);
        assert_eq!(bytes_of(b, &files_key(&m)).await, b"tar".repeat(700));
        assert_eq!(
            file_id(dir.path(), "b", &m.object_key),
            dump_before,
            "the intact dump was rewritten"
        );
        let clean = check::check(
            &app,
            &CheckOptions {
                read_data: true,
                jobs: 1,
                ..CheckOptions::default()
            },
        )
        .await;
        assert!(
            clean.is_clean(),
            "{:?} {:?}",
            clean.problems,
            clean.warnings
        );
    }

    #[tokio::test]
    async fn a_flipped_files_byte_is_found_by_read_data_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let tar = b"tar bytes".repeat(300);
        let m = commit_with_files_on_a(&app, &b"dump".repeat(500), &tar).await;
        mirror(&app).await;
        let b = app.target("b").unwrap();
        let mut flipped = tar.clone();
        flipped[100] ^= 1;
        b.store
            .put(
                &b.at(&object_path(&files_key(&m)).unwrap()),
                PutPayload::from(flipped),
            )
            .await
            .unwrap();
        let dump_before = file_id(dir.path(), "b", &m.object_key);

        assert!(
            check::check(&app, &CheckOptions::default())
                .await
                .is_clean(),
            "a listing sees no flip"
        );
        let read = CheckOptions {
            read_data: true,
            jobs: 1,
            ..CheckOptions::default()
        };
        let report = check::check(&app, &read).await;
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].object_key, files_key(&m));
        assert!(matches!(
            report.problems[0].kind,
            ProblemKind::WrongHash { .. }
        ));

        let done = repair_report(&app, &report).await;
        assert_copies(&done, &[CopyResult::Copied]);
        // Only the archive was copied, and counted.
        assert_eq!(done.copies[0].bytes, tar.len() as u64);
        assert_eq!(bytes_of(b, &files_key(&m)).await, tar);
        assert_eq!(
            file_id(dir.path(), "b", &m.object_key),
            dump_before,
            "the intact dump was rewritten"
        );
        assert!(check::check(&app, &read).await.is_clean());
    }

    #[tokio::test]
    async fn a_missing_copy_gets_its_dump_and_files_then_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let m = commit_with_files_on_a(&app, &b"dump".repeat(500), &b"tar".repeat(700)).await;
        let done = run(&app, false).await;
        assert_copies(&done, &[CopyResult::Copied]);
        assert_eq!(done.copies[0].bytes, 2000 + 2100);
        let b = app.target("b").unwrap();
        assert_eq!(bytes_of(b, &files_key(&m)).await, b"tar".repeat(700));
        assert_eq!(bytes_of(b, &m.object_key).await, b"dump".repeat(500));
        let id = SnapshotId::parse(&m.snapshot_id).unwrap();
        let there = read_manifest(b, &b.at(&SnapshotKey::new("prod", "acme", id).manifest()))
            .await
            .unwrap();
        assert_eq!(there.files, m.files);
        assert_eq!(there.targets, ["a", "b"]);
    }

    #[tokio::test]
    async fn a_damaged_files_archive_on_the_only_holder_is_never_copied() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let m = commit_with_files_on_a(&app, &b"dump".repeat(500), &b"tar".repeat(700)).await;
        let a = app.target("a").unwrap();
        let mut bad = b"tar".repeat(700);
        bad[0] ^= 1;
        a.store
            .put(
                &a.at(&object_path(&files_key(&m)).unwrap()),
                PutPayload::from(bad),
            )
            .await
            .unwrap();
        let done = run(&app, false).await;
        assert_eq!(done.failed(), 1, "{done:?}");
        let left = keys(app.target("b").unwrap()).await;
        assert!(
            left.iter()
                .all(|k| !k.ends_with(".manifest.json") && !k.ends_with(".files.tar.zst")),
            "{left:?}"
        );
    }
}
