//! The companion files of one backup run (`[[source]] files`, see `crate::files`).
//!
//! Once pg_dump exited 0, [`archive`] streams the database's directory as a tar
//! (`files::pack`) through the same pipeline as the dump (zstd, age when encryption is on,
//! sha256, fan-out) to the targets that hold an open dump upload, under
//! `<snapshot_id>-<run>.files.tar.zst[.age]`. It hands the open uploads back; the commit
//! (`backup::commit`) completes them with the dump's, per target, or aborts them.
//!
//! A database without a directory (or whose name cannot be one) has no files: the manifest
//! says `"none"` and the dump still commits. Any other error reading the directory fails
//! the run (see `files::pack`).

use std::path::PathBuf;
use std::sync::Arc;

use object_store::path::Path;
use tokio_util::sync::CancellationToken;

use crate::backup::pipeline::{
    self, OpenUpload, PipelineError, PipelineSettings, Progress, Sink, TargetFailure,
};
use crate::files::pack::{self, PackError, Presence};
use crate::files::FilesTemplate;
use crate::storage::manifest::FilesArchive;
use crate::storage::target::Target;

/// What the files stage of a run produced.
#[derive(Debug)]
pub enum Companion {
    /// The source has no `files` configured: the manifest has no `files`.
    NotConfigured,
    /// Configured, but the database has no directory: the manifest says `"none"`.
    Missing,
    Archived(Archived),
}

/// An archive streamed to the targets; their uploads are still open.
#[derive(Debug)]
pub struct Archived {
    /// What the manifest records (`object_key` relative to the targets' prefixes).
    pub archive: FilesArchive,
    pub uploads: Vec<OpenUpload>,
    /// Targets that dropped out of the files pipeline.
    pub failures: Vec<TargetFailure>,
}

/// Why the files stage failed (every upload it started is aborted).
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("archiving the companion files in {}: {source}", dir.display())]
    Pack { dir: PathBuf, source: PackError },
    #[error("reading the companion files in {} produced nothing for {after:?} (pipeline.idle_timeout); is the volume hung?", dir.display())]
    Idle {
        dir: PathBuf,
        after: std::time::Duration,
    },
    #[error("archiving the companion files in {}: {source}", dir.display())]
    Pipeline { dir: PathBuf, source: PipelineError },
}

impl FilesError {
    /// Whether another attempt in the same slot may succeed: not when the directory is not
    /// one or cannot be read for lack of permission (someone must fix the mount; retrying
    /// would dump the database again for nothing).
    pub fn is_retryable(&self) -> bool {
        match self {
            FilesError::Pack {
                source: PackError::NotADirectory { .. },
                ..
            } => false,
            FilesError::Pack {
                source: PackError::Read { source, .. },
                ..
            } => source.kind() != std::io::ErrorKind::PermissionDenied,
            _ => true,
        }
    }
}

/// Archives `database`'s directory of `template` to `targets` at `object` (see the module
/// doc). `stop` is the run's stop token.
pub async fn archive(
    template: &FilesTemplate,
    database: &str,
    object: &Path,
    targets: Vec<Target>,
    settings: &PipelineSettings,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Result<Companion, FilesError> {
    let dir = match template.dir_for(database) {
        Ok(dir) => dir,
        Err(e) => {
            tracing::warn!(message = "The snapshot has no companion files (files: none).", error = %e);
            return Ok(Companion::Missing);
        }
    };
    let pack_error = |source| FilesError::Pack {
        dir: dir.clone(),
        source,
    };
    match pack::probe(&dir).await.map_err(pack_error)? {
        Presence::Present => {}
        Presence::Missing => {
            let hint = if pack::parent_exists(&dir).await {
                "the database has no companion files yet"
            } else {
                "its parent directory does not exist either: is the volume mounted?"
            };
            tracing::warn!(message = "The companion files' directory does not exist; the snapshot has none (files: none).", dir = %dir.display(), hint);
            return Ok(Companion::Missing);
        }
    }
    let sinks = targets
        .into_iter()
        .map(|t| Sink {
            key: t.at(object),
            target: t,
        })
        .collect();
    tracing::info!(message = "Archiving the companion files.", dir = %dir.display());
    let packing = pack::pack(dir.clone());
    let piped = pipeline::run(packing.reader, settings, sinks, (), progress, stop).await;
    let packed = packing
        .task
        .await
        .unwrap_or_else(|e| Err(PackError::Panicked(e.to_string())));
    // The stream ending is not success: the walk's own result is.
    let (out, stats) = match (piped, packed) {
        (Ok(out), Ok(stats)) => (out, stats),
        (Ok(out), Err(e)) => {
            for u in out.uploads {
                u.abort().await;
            }
            return Err(pack_error(e));
        }
        // The walk's failure is the root cause of the stream's.
        (Err(PipelineError::Read(_)), Err(e)) if !matches!(e, PackError::ReaderGone) => {
            return Err(pack_error(e))
        }
        (Err(PipelineError::Idle { after }), _) => return Err(FilesError::Idle { dir, after }),
        (Err(source), _) => return Err(FilesError::Pipeline { dir, source }),
    };
    if stats.skipped > 0 {
        tracing::warn!(message = "Symlinks or special files (sockets, FIFOs, devices) in the companion files are not archived.", dir = %dir.display(), skipped = stats.skipped);
    }
    if stats.changed > 0 {
        tracing::warn!(message = "Companion files changed while archived; each is archived at the length it had when opened.", dir = %dir.display(), changed = stats.changed);
    }
    Ok(Companion::Archived(Archived {
        archive: FilesArchive {
            object_key: object.to_string(),
            stored_size: out.stored_bytes,
            raw_size: out.raw_bytes,
            sha256: out.sha256,
            file_count: stats.file_count,
            file_bytes: stats.file_bytes,
            skipped: stats.skipped,
        },
        uploads: out.uploads,
        failures: out.failures,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_mount_problem_is_not_retried() {
        let dir = PathBuf::from("/fs/acme");
        let pack = |source| FilesError::Pack {
            dir: dir.clone(),
            source,
        };
        let read = |kind| {
            pack(PackError::Read {
                path: dir.join("ab"),
                source: std::io::Error::from(kind),
            })
        };
        assert!(!pack(PackError::NotADirectory { path: dir.clone() }).is_retryable());
        assert!(!read(std::io::ErrorKind::PermissionDenied).is_retryable());
        assert!(read(std::io::ErrorKind::Other).is_retryable());
        assert!(FilesError::Idle {
            dir: dir.clone(),
            after: std::time::Duration::from_secs(1)
        }
        .is_retryable());
    }
}
