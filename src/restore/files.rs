//! The companion files' side of a restore (DESIGN.md "Restore" step 6): the archive is
//! downloaded, checked and extracted beside the destination's directory, and swapped in with
//! the database, both or neither.
//!
//! The destination directory `D` is `[[restore_target]] files.dir_for(<destination database>)`.
//! Everything this module creates is a sibling of `D` in the same parent (one filesystem, so
//! every move is one `rename`), named for exactly one destination:
//!
//! ```text
//! <parent>/.pgferry-tmp-<db>-<random>   the archive being extracted (T)
//! <parent>/.pgferry-old-<db>-<stamp>    the previous D during the swap (O); when there was
//!                                       no D, an empty directory holding `.pgferry-absent`
//! <parent>/<db>_pre_<stamp>             with --keep-old: the previous D, named after the
//!                                       database kept beside it (`guard::kept_name`), so the
//!                                       kept database finds its files as Odoo expects
//! ```
//!
//! The order of the moves, and a kill between any two of them. The database rename is one
//! transaction (`swap::Server::swap`) and is the commit point; the directories move while
//! the old database is closed to connections, just before it:
//!
//! 1. `D → O` (or create O with the absent marker)   2. `T → D`   3. the databases' rename
//! 4. `O → kept` or O removed.
//!
//! A killed run runs no cleanup; the next restore of the same destination, holding the same
//! advisory lock, settles what it left ([`settle`]) before anything else, and decides by the
//! commit point: while the run's temporary database still exists (`pgferry_tmp_<hash>_…`,
//! dropped by any failure only after the directories were put back), step 3 did not happen.
//! - O and no D (killed between 1 and 2): `O → D`; D is never left missing.
//! - O and D, temporary database present (killed between 2 and 3): roll back, `D → T`, `O → D`.
//! - O and D, no temporary database (killed after 3): roll forward: `O → kept` when the kept
//!   database of O's stamp exists, else O removed.
//! - every T: removed.
//!
//! The same rule settles a database swap that failed with the outcome unknown (the
//! connection dropped during the commit): the temporary database is looked up afresh.
//! Files are written only under T; D is replaced only by rename; nothing outside
//! `<parent>/` names of this destination is ever moved or removed.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::guard::kept_name;
use super::load::{self, Consumed, LoadError, LoadProgress, StoredObject};
use super::swap::Server;
use super::TargetFailure;
use crate::app::App;
use crate::files::unpack::{self, Counts, Owner, UnpackError};
use crate::files::{FilesTemplate, UnsafeName};
use crate::storage::catalog::SnapshotEntry;
use crate::storage::key::RunId;
use crate::storage::manifest::Manifest;

const TMP_PREFIX: &str = ".pgferry-tmp-";
const OLD_PREFIX: &str = ".pgferry-old-";
/// The file inside an O that stands for "there was no D".
const ABSENT_MARKER: &str = ".pgferry-absent";
/// The length of a stamp (`schedule::snapshot_id`: `20261127T140000Z`).
const STAMP_LEN: usize = 16;
/// Mode of T when there is no D to take it from.
const NEW_DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(transparent)]
    UnsafeName(#[from] UnsafeName),
    #[error("the companion files' directory {path} is not usable ({source}); create it on the restore target's files volume, or fix [[restore_target]] files")]
    Parent { path: PathBuf, source: io::Error },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}, where the companion files of the destination go, is not a directory; move it away (the restore replaces the directory, and could not settle a file left aside)")]
    NotADirectory { path: PathBuf },
    #[error("{path} already exists, where --keep-old would keep the previous files; move it away or restore without --keep-old")]
    KeptExists { path: PathBuf },
    #[error("the companion files of snapshot {snapshot_id}: no target gave a good copy: {}", failures.iter().map(|f| format!("{}: {}", f.target, f.error)).collect::<Vec<_>>().join("; "))]
    AllTargetsFailed {
        snapshot_id: String,
        failures: Vec<TargetFailure>,
    },
    #[error("the companion files (target {target}): {source}")]
    Load { target: String, source: LoadError },
    #[error("the companion files (target {target}): {source}")]
    Unpack { target: String, source: UnpackError },
    #[error("cancelled")]
    Cancelled,
}

impl FilesError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, FilesError::Cancelled)
    }

    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FilesError + 'a {
        move |source| FilesError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What the restore did with companion files (in the report, text and JSON).
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum FilesReport {
    Restored {
        directory: PathBuf,
        file_count: u64,
        file_bytes: u64,
        stored_bytes: u64,
        /// The target whose copy was extracted.
        target: String,
        failed_targets: Vec<TargetFailure>,
        /// Whether a previous directory was replaced.
        replaced: bool,
        /// With `--keep-old`: where the previous directory is kept.
        kept_old: Option<PathBuf>,
    },
    /// Not restored (the reason is also logged as a warning).
    Skipped { warning: String },
}

/// The warning (and report) of a restore whose snapshot and target disagree about files;
/// `None` when there is nothing to say (or the files are restored).
pub fn mismatch(manifest: &Manifest, template: Option<&FilesTemplate>) -> Option<String> {
    match (manifest.files_archive(), template) {
        (Some(a), None) => Some(format!(
            "companion files not restored: the snapshot has {} files ({} bytes) but this restore target has no `files`; set [[restore_target]] files",
            a.file_count, a.file_bytes
        )),
        (None, Some(t)) => Some(format!(
            "the snapshot has no companion files{}; the directory under {} is left as it is",
            if manifest.files.is_some() {
                " (the source's directory did not exist at backup time)"
            } else {
                " (its source had no `files` configured)"
            },
            t.parent().display()
        )),
        _ => None,
    }
}

/// The directories of one destination.
#[derive(Debug, Clone)]
pub struct Dirs {
    parent: PathBuf,
    database: String,
    /// D.
    dest: PathBuf,
}

impl Dirs {
    /// The destination's directories; the parent must be an existing directory.
    pub async fn new(template: &FilesTemplate, database: &str) -> Result<Dirs, FilesError> {
        let dest = template.dir_for(database)?;
        let parent = template.parent().to_path_buf();
        match tokio::fs::metadata(&parent).await {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(FilesError::Parent {
                    path: parent,
                    source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                })
            }
            Err(source) => {
                return Err(FilesError::Parent {
                    path: parent,
                    source,
                })
            }
        }
        // D (what a symlink names) must be a directory when it exists: set aside as O, a file
        // could never be settled (O's absent marker is looked up inside it).
        match tokio::fs::metadata(&dest).await {
            Ok(m) if !m.is_dir() => return Err(FilesError::NotADirectory { path: dest }),
            _ => {}
        }
        Ok(Dirs {
            parent,
            database: database.to_string(),
            dest,
        })
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    fn tmp(&self, run: &RunId) -> PathBuf {
        self.parent
            .join(format!("{TMP_PREFIX}{}-{run}", self.database))
    }

    fn old(&self, stamp: &str) -> PathBuf {
        self.parent
            .join(format!("{OLD_PREFIX}{}-{stamp}", self.database))
    }

    fn kept(&self, stamp: &str) -> PathBuf {
        self.parent.join(kept_name(&self.database, stamp))
    }

    /// Whether `name` is one of this destination's T (exactly: `acme-x`'s are not `acme`'s).
    fn is_tmp(&self, name: &str) -> bool {
        name.strip_prefix(TMP_PREFIX)
            .and_then(|rest| rest.rsplit_once('-'))
            .is_some_and(|(db, run)| db == self.database && RunId::parse(run).is_some())
    }

    /// The stamp of `name` when it is one of this destination's O.
    fn old_stamp<'n>(&self, name: &'n str) -> Option<&'n str> {
        let (db, stamp) = name.strip_prefix(OLD_PREFIX)?.rsplit_once('-')?;
        let valid = stamp.len() == STAMP_LEN
            && crate::schedule::parse_snapshot_id(stamp).is_some()
            && db == self.database;
        valid.then_some(stamp)
    }

    /// The uid/gid to give extracted files: when running as root, the owner of D (else of the
    /// parent), so that the application (Odoo) can write there; otherwise files are ours.
    async fn owner(&self) -> Option<Owner> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let m = match tokio::fs::metadata(&self.dest).await {
            Ok(m) => m,
            Err(_) => tokio::fs::metadata(&self.parent).await.ok()?,
        };
        Some(Owner {
            uid: m.uid(),
            gid: m.gid(),
        })
    }
}

fn exists(p: &Path) -> io::Result<bool> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

async fn remove_tree(path: &Path) -> Result<(), FilesError> {
    match tokio::fs::remove_dir_all(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FilesError::Io {
            what: "removing",
            path: path.to_path_buf(),
            source,
        }),
    }
}

async fn rename(from: &Path, to: &Path) -> Result<(), FilesError> {
    tokio::fs::rename(from, to)
        .await
        .map_err(|source| FilesError::Io {
            what: "renaming",
            path: format!("{} → {}", from.display(), to.display()).into(),
            source,
        })
}

/// Settles what earlier, killed restores of this destination left (module doc), under the
/// destination's lock and before its leftover databases are dropped. Returns what it did,
/// one line each.
pub async fn settle(dirs: &Dirs, server: &Server) -> Result<Vec<String>, FilesError> {
    let mut tmps = Vec::new();
    let mut olds = Vec::new();
    let mut rd = tokio::fs::read_dir(&dirs.parent)
        .await
        .map_err(FilesError::io("listing", &dirs.parent))?;
    while let Some(e) = rd
        .next_entry()
        .await
        .map_err(FilesError::io("listing", &dirs.parent))?
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if dirs.is_tmp(&name) {
            tmps.push(e.path());
        } else if let Some(stamp) = dirs.old_stamp(&name) {
            olds.push((e.path(), stamp.to_string()));
        }
    }
    olds.sort();
    let mut done = Vec::new();
    if !olds.is_empty() {
        // The commit point: the databases' rename consumed the temporary database.
        let committed = !server
            .has_tmp(&dirs.database)
            .await
            .map_err(|e| FilesError::Io {
                what: "looking up the temporary database of",
                path: dirs.dest.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        for (old, stamp) in olds {
            let kept = if committed {
                server
                    .exists(&kept_name(&dirs.database, &stamp))
                    .await
                    .unwrap_or(false)
                    .then(|| dirs.kept(&stamp))
            } else {
                None
            };
            let line = settle_one(dirs, &old, committed, kept.as_deref()).await?;
            tracing::warn!(message = "Settled the companion files of an interrupted restore.", action = %line);
            done.push(line);
        }
    }
    for t in tmps {
        if exists(&t).map_err(FilesError::io("looking up", &t))? {
            tracing::warn!(message = "Removing the companion files of an interrupted restore.", path = %t.display());
            remove_tree(&t).await?;
            done.push(format!("removed {}", t.display()));
        }
    }
    Ok(done)
}

/// One O: put back (not committed) or retired (committed), see the module doc.
async fn settle_one(
    dirs: &Dirs,
    old: &Path,
    committed: bool,
    kept: Option<&Path>,
) -> Result<String, FilesError> {
    let absent = exists(&old.join(ABSENT_MARKER)).map_err(FilesError::io("looking up", old))?;
    let dest_there = exists(&dirs.dest).map_err(FilesError::io("looking up", &dirs.dest))?;
    if committed && dest_there {
        if let (Some(k), false) = (kept, absent) {
            rename(old, k).await?;
            return Ok(format!("kept {} as {}", old.display(), k.display()));
        }
        remove_tree(old).await?;
        return Ok(format!("removed {}", old.display()));
    }
    if dest_there {
        // The new files went in but the databases did not: they go back to a T (removed).
        let aside = dirs.tmp(&RunId::random());
        rename(&dirs.dest, &aside).await?;
        remove_tree(&aside).await?;
    }
    if absent {
        remove_tree(old).await?;
        Ok(format!(
            "removed {} (there was no {})",
            old.display(),
            dirs.dest.display()
        ))
    } else {
        rename(old, &dirs.dest).await?;
        Ok(format!(
            "put {} back as {}",
            old.display(),
            dirs.dest.display()
        ))
    }
}

/// The companion files on their way in: T extracted, then [`DirSwap::swap_in`] at the
/// databases' swap. Dropped without [`DirSwap::finish`], [`DirSwap::discard`] is the
/// caller's to call.
#[derive(Debug)]
pub struct DirSwap {
    dirs: Dirs,
    staged: PathBuf,
    stamp: String,
    keep_old: bool,
    state: State,
    /// Where the previous D is kept, once finished with `--keep-old`.
    kept: Option<PathBuf>,
    replaced: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// T holds the files; D untouched.
    Staged,
    /// D holds the new files, O the old ones (or the absent marker).
    SwappedIn,
    /// O retired; nothing left to undo.
    Finished,
}

impl DirSwap {
    /// Creates T, empty, with D's mode (0755 when there is no D) and owner.
    pub async fn stage(
        dirs: &Dirs,
        stamp: &str,
        keep_old: bool,
    ) -> Result<(DirSwap, Option<Owner>), FilesError> {
        let staged = dirs.tmp(&RunId::random());
        if keep_old {
            let k = dirs.kept(stamp);
            if exists(&k).map_err(FilesError::io("looking up", &k))? {
                return Err(FilesError::KeptExists { path: k });
            }
        }
        tokio::fs::create_dir(&staged)
            .await
            .map_err(FilesError::io("creating", &staged))?;
        let swap = DirSwap {
            dirs: dirs.clone(),
            staged: staged.clone(),
            stamp: stamp.to_string(),
            keep_old,
            state: State::Staged,
            kept: None,
            replaced: false,
        };
        let mode = match tokio::fs::metadata(&dirs.dest).await {
            Ok(m) => m.permissions().mode() & 0o7777,
            Err(_) => NEW_DIR_MODE,
        };
        let owner = dirs.owner().await;
        let prepared = async {
            tokio::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).await?;
            if let Some(o) = owner {
                std::os::unix::fs::chown(&staged, Some(o.uid), Some(o.gid))?;
            }
            Ok::<_, io::Error>(())
        }
        .await;
        if let Err(source) = prepared {
            let _ = swap.discard().await;
            return Err(FilesError::Io {
                what: "preparing",
                path: staged,
                source,
            });
        }
        Ok((swap, owner))
    }

    pub fn staged(&self) -> &Path {
        &self.staged
    }

    pub fn kept(&self) -> Option<&Path> {
        self.kept.as_deref()
    }

    pub fn replaced(&self) -> bool {
        self.replaced
    }

    /// Whether D holds the new files and O the old ones (a failed swap whose outcome could
    /// not be told leaves it so, for the next restore to settle).
    pub fn is_swapped_in(&self) -> bool {
        self.state == State::SwappedIn
    }

    /// Steps 1 and 2: D aside as O (or O marks that there was none), T in as D. A failure of
    /// step 2 puts D back.
    pub async fn swap_in(&mut self) -> Result<(), FilesError> {
        assert_eq!(self.state, State::Staged, "swap_in once, after stage");
        let old = self.dirs.old(&self.stamp);
        let dest = self.dirs.dest.clone();
        self.replaced = exists(&dest).map_err(FilesError::io("looking up", &dest))?;
        if self.replaced {
            rename(&dest, &old).await?;
        } else {
            // Made whole under a temporary name (a T, which settling removes), then renamed:
            // an O killed before its marker was written would be taken for a previous
            // directory and put back as an empty D.
            let making = self.dirs.tmp(&RunId::random());
            tokio::fs::create_dir(&making)
                .await
                .map_err(FilesError::io("creating", &making))?;
            tokio::fs::write(making.join(ABSENT_MARKER), b"")
                .await
                .map_err(FilesError::io("creating", &making))?;
            rename(&making, &old).await?;
        }
        if let Err(e) = rename(&self.staged, &dest).await {
            let back = if self.replaced {
                rename(&old, &dest).await
            } else {
                remove_tree(&old).await
            };
            if let Err(back) = back {
                tracing::error!(message = "Cannot put the previous companion files back; the next restore of this destination will.", error = %back);
            }
            return Err(e);
        }
        self.state = State::SwappedIn;
        Ok(())
    }

    /// Undoes [`DirSwap::swap_in`] (the databases' rename did not happen): D back to T, O back
    /// to D. T is then the caller's to [`DirSwap::discard`].
    pub async fn roll_back(&mut self) -> Result<(), FilesError> {
        if self.state != State::SwappedIn {
            return Ok(());
        }
        let old = self.dirs.old(&self.stamp);
        rename(&self.dirs.dest, &self.staged).await?;
        if self.replaced {
            rename(&old, &self.dirs.dest).await?;
        } else {
            remove_tree(&old).await?;
        }
        self.state = State::Staged;
        Ok(())
    }

    /// Step 4, after the databases' rename: O kept (with `--keep-old`, when there was a D) or
    /// removed. A failure is logged only: the swap is done, the next restore settles O.
    pub async fn finish(&mut self) {
        if self.state != State::SwappedIn {
            return;
        }
        self.state = State::Finished;
        let old = self.dirs.old(&self.stamp);
        if self.keep_old && self.replaced {
            let k = self.dirs.kept(&self.stamp);
            match rename(&old, &k).await {
                Ok(()) => self.kept = Some(k),
                Err(error) => {
                    tracing::warn!(message = "Cannot keep the previous companion files under the kept database's name; they stay aside.", path = %old.display(), error = %error)
                }
            }
            return;
        }
        if let Err(error) = remove_tree(&old).await {
            tracing::warn!(message = "Cannot remove the previous companion files; the next restore of this destination will.", error = %error);
        }
    }

    /// Removes T after a failure (before the swap, or after [`DirSwap::roll_back`]). Does
    /// nothing once D holds the new files.
    pub async fn discard(&self) -> Result<(), FilesError> {
        if self.state != State::Staged {
            return Ok(());
        }
        remove_tree(&self.staged).await
    }
}

/// What [`extract`] did.
#[derive(Debug)]
pub struct Extracted {
    pub counts: Counts,
    pub stored_bytes: u64,
    pub target: String,
    pub failed_targets: Vec<TargetFailure>,
}

/// Downloads the archive and extracts it into T: the target the dump came from first, then
/// each other target holding the snapshot on a bad copy (download, size, sha256, decoding, a
/// file count other than its own manifest's, a manifest disagreeing about the encryption).
/// Each copy is read with its own target's manifest (`load::manifest_for`). An archive refused
/// entry by entry fails at once (every copy has the same bytes). T is emptied between
/// attempts.
#[allow(clippy::too_many_arguments)]
pub async fn extract(
    app: &App,
    entry: &SnapshotEntry,
    first: &str,
    identity_file: Option<&Path>,
    swap: &DirSwap,
    owner: Option<Owner>,
    cancel: &CancellationToken,
) -> Result<Extracted, FilesError> {
    let order = entry.targets_from(first);
    let mut failures = Vec::new();
    let mut dirty = false;
    for name in order {
        let Some(target) = app.target(name) else {
            continue;
        };
        if cancel.is_cancelled() {
            return Err(FilesError::Cancelled);
        }
        // Each copy with its own target's manifest (see `load::manifest_for`).
        let manifest = match load::manifest_for(entry, name) {
            Ok(m) => m,
            Err(bad) => {
                tracing::warn!(message = "This target's copy of the companion files failed; trying the next target.", target = %target.name, error = %bad);
                failures.push(TargetFailure {
                    target: target.name.clone(),
                    error: bad,
                });
                continue;
            }
        };
        let Some(archive) = manifest.files_archive() else {
            continue;
        };
        if dirty {
            empty_dir(swap.staged()).await?;
        }
        dirty = true;
        let staged = swap.staged().to_path_buf();
        let c = cancel.clone();
        let r = load::consume(
            target,
            manifest,
            StoredObject::files(archive),
            identity_file,
            Arc::new(LoadProgress::default()),
            cancel,
            move |reader| unpack::unpack(reader, staged, owner, c),
        )
        .await;
        let bad = match r {
            // A count other than its own manifest's (whose sha256 the archive matched): this
            // target's manifest was changed; another target's copy may be intact.
            Ok((counts, _)) if counts.files != archive.file_count => LoadError::FileCount {
                expected: archive.file_count,
                actual: counts.files,
            },
            Ok((counts, stored_bytes)) => {
                sync_tree(swap.staged()).await?;
                return Ok(Extracted {
                    counts,
                    stored_bytes,
                    target: target.name.clone(),
                    failed_targets: failures,
                });
            }
            Err(Consumed::Load(LoadError::Cancelled))
            | Err(Consumed::Consumer(UnpackError::Cancelled)) => return Err(FilesError::Cancelled),
            Err(Consumed::Load(e)) if e.is_bad_copy() => e,
            Err(Consumed::Load(source)) => {
                return Err(FilesError::Load {
                    target: target.name.clone(),
                    source,
                })
            }
            Err(Consumed::Consumer(UnpackError::Read { source })) => {
                match load::read_error(source) {
                    e if e.is_bad_copy() => e,
                    source => {
                        return Err(FilesError::Load {
                            target: target.name.clone(),
                            source,
                        })
                    }
                }
            }
            Err(Consumed::Consumer(source)) => {
                return Err(FilesError::Unpack {
                    target: target.name.clone(),
                    source,
                })
            }
        };
        tracing::warn!(message = "This target's copy of the companion files failed; trying the next target.", target = %target.name, error = %bad);
        failures.push(TargetFailure {
            target: target.name.clone(),
            error: bad,
        });
    }
    Err(FilesError::AllTargetsFailed {
        snapshot_id: entry.manifest.snapshot_id.clone(),
        failures,
    })
}

/// Removes everything inside `dir` (a failed attempt's files), keeping `dir` itself.
async fn empty_dir(dir: &Path) -> Result<(), FilesError> {
    let mut rd = tokio::fs::read_dir(dir)
        .await
        .map_err(FilesError::io("listing", dir))?;
    while let Some(e) = rd
        .next_entry()
        .await
        .map_err(FilesError::io("listing", dir))?
    {
        let p = e.path();
        let is_dir = e
            .file_type()
            .await
            .map_err(FilesError::io("looking up", &p))?
            .is_dir();
        let r = if is_dir {
            tokio::fs::remove_dir_all(&p).await
        } else {
            tokio::fs::remove_file(&p).await
        };
        r.map_err(FilesError::io("removing", &p))?;
    }
    Ok(())
}

/// Flushes the filesystem holding `dir` (`syncfs`): the extracted files are on disk before
/// the database that names them is swapped in. One call for the whole tree.
async fn sync_tree(dir: &Path) -> Result<(), FilesError> {
    let d = dir.to_path_buf();
    let r = tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&d)?;
        // SAFETY: `f` is an open file descriptor for the duration of the call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
    r.map_err(FilesError::io("flushing", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(parent: &Path, db: &str) -> Dirs {
        Dirs {
            parent: parent.to_path_buf(),
            database: db.into(),
            dest: parent.join(db),
        }
    }

    #[test]
    fn leftover_names_belong_to_exactly_one_destination() {
        let p = Path::new("/fs");
        let acme = dirs(p, "acme");
        let acme_x = dirs(p, "acme-x");
        let run = RunId::random();
        let t = acme_x.tmp(&run);
        let t = t.file_name().unwrap().to_str().unwrap();
        assert!(acme_x.is_tmp(t));
        assert!(!acme.is_tmp(t), "acme must not take acme-x's {t}");
        let o = acme_x.old("20261127T140000Z");
        let o = o.file_name().unwrap().to_str().unwrap();
        assert_eq!(acme_x.old_stamp(o), Some("20261127T140000Z"));
        assert_eq!(acme.old_stamp(o), None);
        for other in [
            ".pgferry-tmp-acme-zzz",
            ".pgferry-tmp-acme",
            ".pgferry-old-acme-2026",
            ".pgferry-old-acme-20261127T140000Zx",
            "acme",
            "acme_pre_20261127T140000Z",
        ] {
            assert!(
                !acme.is_tmp(other) && acme.old_stamp(other).is_none(),
                "{other}"
            );
        }
        assert_eq!(
            acme.kept("20261127T140000Z"),
            PathBuf::from("/fs/acme_pre_20261127T140000Z")
        );
    }

    #[test]
    fn the_mismatch_warnings_say_what_to_do() {
        let mut m = crate::storage::manifest::tests::sample();
        let t = FilesTemplate::parse(Path::new("/fs/{database}")).unwrap();
        assert_eq!(mismatch(&m, None), None);
        let w = mismatch(&m, Some(&t)).unwrap();
        assert!(w.contains("no companion files"), "{w}");
        m.files = Some(crate::storage::manifest::Files::Archive(
            crate::storage::manifest::FilesArchive {
                object_key: "k".into(),
                stored_size: 1,
                raw_size: 1,
                sha256: String::new(),
                file_count: 3,
                file_bytes: 9,
                skipped: 0,
            },
        ));
        assert_eq!(mismatch(&m, Some(&t)), None);
        let w = mismatch(&m, None).unwrap();
        assert!(
            w.contains("companion files not restored")
                && w.contains("set [[restore_target]] files"),
            "{w}"
        );
    }

    async fn staged_with(dirs: &Dirs, stamp: &str, keep_old: bool, file: &str) -> DirSwap {
        let (swap, _) = DirSwap::stage(dirs, stamp, keep_old).await.unwrap();
        std::fs::write(swap.staged().join(file), b"new").unwrap();
        swap
    }

    #[tokio::test]
    async fn swap_in_roll_back_and_finish() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dirs(tmp.path(), "acme");
        std::fs::create_dir(d.dest()).unwrap();
        std::fs::write(d.dest().join("old"), b"old").unwrap();
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };

        // Rolled back: D as it was, T removed.
        let mut s = staged_with(&d, "20261127T140000Z", false, "new").await;
        s.swap_in().await.unwrap();
        assert!(d.dest().join("new").exists());
        s.roll_back().await.unwrap();
        s.discard().await.unwrap();
        assert_eq!(names(), vec!["acme"]);
        assert!(d.dest().join("old").exists());

        // Finished with --keep-old: the old D under the kept database's name.
        let mut s = staged_with(&d, "20261127T150000Z", true, "new").await;
        s.swap_in().await.unwrap();
        s.finish().await;
        assert_eq!(names(), vec!["acme", "acme_pre_20261127T150000Z"]);
        assert!(d.dest().join("new").exists());
        assert_eq!(
            s.kept(),
            Some(tmp.path().join("acme_pre_20261127T150000Z").as_path())
        );
        // The same name again is refused before anything moves.
        let e = DirSwap::stage(&d, "20261127T150000Z", true)
            .await
            .unwrap_err();
        assert!(matches!(e, FilesError::KeptExists { .. }), "{e}");

        // Finished without: the old D removed.
        let mut s = staged_with(&d, "20261127T160000Z", false, "newer").await;
        s.swap_in().await.unwrap();
        s.finish().await;
        assert_eq!(names(), vec!["acme", "acme_pre_20261127T150000Z"]);
        assert!(d.dest().join("newer").exists() && !d.dest().join("new").exists());

        // No D before: rolled back, there is none again.
        let other = dirs(tmp.path(), "globex");
        let mut s = staged_with(&other, "20261127T170000Z", false, "x").await;
        s.swap_in().await.unwrap();
        assert!(other.dest().join("x").exists());
        s.roll_back().await.unwrap();
        s.discard().await.unwrap();
        assert!(!other.dest().exists());
        assert_eq!(names(), vec!["acme", "acme_pre_20261127T150000Z"]);
    }

    /// The on-disk state a run killed after step `k` leaves (module doc), settled as the
    /// next run does, for each outcome of the databases' rename.
    #[tokio::test]
    async fn a_killed_swap_is_settled_by_the_commit_point() {
        for had_dest in [true, false] {
            for killed_after in 0..=2 {
                for committed in [false, true] {
                    if committed && killed_after < 2 {
                        continue; // the databases' rename comes after step 2
                    }
                    let tmp = tempfile::tempdir().unwrap();
                    let d = dirs(tmp.path(), "acme");
                    if had_dest {
                        std::fs::create_dir(d.dest()).unwrap();
                        std::fs::write(d.dest().join("old"), b"old").unwrap();
                    }
                    let stamp = "20261127T140000Z";
                    let s = staged_with(&d, stamp, false, "new").await;
                    let old = d.old(stamp);
                    if killed_after >= 1 {
                        // Step 1 only, as swap_in does it.
                        if had_dest {
                            std::fs::rename(d.dest(), &old).unwrap();
                        } else {
                            std::fs::create_dir(&old).unwrap();
                            std::fs::write(old.join(ABSENT_MARKER), b"").unwrap();
                        }
                    }
                    if killed_after >= 2 {
                        std::fs::rename(s.staged(), d.dest()).unwrap();
                    }
                    let mut tmps = Vec::new();
                    let mut olds = Vec::new();
                    for e in std::fs::read_dir(tmp.path()).unwrap() {
                        let e = e.unwrap();
                        let n = e.file_name().to_string_lossy().into_owned();
                        if d.is_tmp(&n) {
                            tmps.push(e.path());
                        } else if let Some(st) = d.old_stamp(&n) {
                            olds.push(e.path());
                            assert_eq!(st, stamp);
                        }
                    }
                    for o in &olds {
                        settle_one(&d, o, committed, None).await.unwrap();
                    }
                    for t in tmps {
                        remove_tree(&t).await.unwrap();
                    }
                    let case = format!(
                        "had_dest {had_dest}, killed after {killed_after}, committed {committed}"
                    );
                    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
                    match (committed, had_dest) {
                        (true, _) => {
                            assert_eq!(
                                std::fs::read(d.dest().join("new")).unwrap(),
                                b"new",
                                "{case}"
                            );
                            assert_eq!(left.len(), 1, "{case}");
                        }
                        (false, true) => {
                            assert_eq!(
                                std::fs::read(d.dest().join("old")).unwrap(),
                                b"old",
                                "{case}"
                            );
                            assert!(!d.dest().join("new").exists(), "{case}");
                            assert_eq!(left.len(), 1, "{case}");
                        }
                        (false, false) => {
                            assert!(!d.dest().exists(), "{case}");
                            assert_eq!(left.len(), 0, "{case}");
                        }
                    }
                }
            }
        }
    }
}
