//! Companion files out of their archive: a tar stream → a directory (restore), or → a listing
//! of its file paths (verify), read on a blocking thread.
//!
//! The stream handed in is already checked and decoded by the caller's reader chain (sha256
//! and size of the stored bytes, age, zstd: `restore::load::consume`); of the archive itself
//! nothing is trusted. Each entry's path is checked here before anything is written: relative,
//! no `..`, no absolute path; only regular files and directories (symlinks, hard links,
//! devices, FIFOs, sparse files are refused, the error naming the entry). `tar::Archive::unpack`
//! is not used. Files are created with `create_new` under the directory the caller has just
//! created, where only this module writes and never a link, so no entry can write through a
//! link or over another entry (a path twice in the archive is refused). Modes are the
//! archive's masked by 0o777 (no setuid, setgid, sticky), owner read/write (and search for
//! directories) always kept so the tree can be replaced later; ownership is the caller's
//! [`Owner`] when set. The stream is read to its very end, past tar's end-of-archive blocks,
//! so the decoders' own checks (zstd's frame checksum, age's last chunk) run.
//!
//! Memory is bounded by one copy buffer whatever the archive holds; a listing keeps 8 bytes
//! per file (a 64-bit hash of its path: 8 MB for a million files). This module never removes
//! anything: after a failure the caller removes its temporary directory.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use tar::EntryType;
use tokio::io::AsyncRead;
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

/// Bytes moved per read/write while extracting a file: few syscalls, bounded memory.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Mode of directories the archive does not list (a file's parents), before the owner bits.
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// Permission bits kept from the archive: no setuid, setgid or sticky bit.
const MODE_MASK: u32 = 0o777;

/// Owner bits always set: pgferry (and the next restore) must be able to replace the tree.
const FILE_OWNER_BITS: u32 = 0o600;
const DIR_OWNER_BITS: u32 = 0o700;

/// What an archive held (regular files, their bytes, directories).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub files: u64,
    pub bytes: u64,
    pub dirs: u64,
}

/// The uid and gid given to everything extracted (a restore running as root gives the tree
/// to the owner of the directory it lands in: Odoo must be able to write there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The files of an archive, for verify: counts, and a 64-bit hash of each file's path.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub counts: Counts,
    /// Sorted, deduplicated.
    hashes: Vec<u64>,
}

impl Listing {
    /// Whether `relative` (a path under the directory, `ab/abcdef…`; `./` and doubled or
    /// leading slashes ignored) names a file of the archive. A path that could not be in an
    /// archive (`..`) is not in it. A 64-bit hash: two paths may collide with a probability
    /// of about n²/2⁶⁵ (3·10⁻⁸ for a million files), which can only hide a missing file.
    pub fn contains(&self, relative: &str) -> bool {
        let trimmed = relative.trim_start_matches('/');
        match normalize(Path::new(trimmed)) {
            Ok(p) if !p.as_os_str().is_empty() => self.hashes.binary_search(&path_hash(&p)).is_ok(),
            _ => false,
        }
    }
}

/// Why an entry is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ParentDir,
    Absolute,
    EmptyPath,
    Symlink,
    HardLink,
    Special,
    Duplicate,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::ParentDir => "its path climbs out with `..`",
            Refusal::Absolute => "its path is absolute",
            Refusal::EmptyPath => "a file with an empty path",
            Refusal::Symlink => "it is a symbolic link",
            Refusal::HardLink => "it is a hard link",
            Refusal::Special => {
                "it is not a regular file or directory (device, FIFO, sparse or unknown type)"
            }
            Refusal::Duplicate => "its path is in the archive twice",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the files archive holds entry {entry:?}, refused: {reason}; nothing of the archive is used")]
    Refused { entry: String, reason: Refusal },
    /// Reading the decoded stream failed (download, decryption, decompression: the inner
    /// error says which), or the tar format is broken.
    #[error("cannot read the files archive: {source}")]
    Read { source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cancelled")]
    Cancelled,
}

/// Extracts the tar stream `reader` into `dir` (an empty directory the caller created), on a
/// blocking thread. Returns what was written; on error, what was written stays for the
/// caller to remove.
pub async fn unpack<R>(
    reader: R,
    dir: PathBuf,
    owner: Option<Owner>,
    cancel: CancellationToken,
) -> Result<Counts, UnpackError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let bridge = SyncIoBridge::new(reader);
    join(tokio::task::spawn_blocking(move || {
        unpack_sync(bridge, &dir, owner, &cancel)
    }))
    .await
}

/// Reads the tar stream `reader` to its end: counts and the paths of its files, nothing
/// written. Unsafe entries are refused as [`unpack`] refuses them.
pub async fn list<R>(reader: R, cancel: CancellationToken) -> Result<Listing, UnpackError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let bridge = SyncIoBridge::new(reader);
    join(tokio::task::spawn_blocking(move || {
        list_sync(bridge, &cancel)
    }))
    .await
}

async fn join<T>(task: tokio::task::JoinHandle<Result<T, UnpackError>>) -> Result<T, UnpackError> {
    match task.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(UnpackError::Cancelled),
    }
}

/// The marker error a [`Watched`] reader returns once cancelled.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
struct CancelledRead;

/// The source stream, which stops with [`CancelledRead`] once the token fires.
struct Watched<'a, R> {
    inner: R,
    cancel: &'a CancellationToken,
}

impl<R: Read> Read for Watched<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(io::Error::other(CancelledRead));
        }
        self.inner.read(buf)
    }
}

fn read_err(cancel: &CancellationToken) -> impl Fn(io::Error) -> UnpackError + '_ {
    move |source| {
        if cancel.is_cancelled() || source.get_ref().is_some_and(|e| e.is::<CancelledRead>()) {
            UnpackError::Cancelled
        } else {
            UnpackError::Read { source }
        }
    }
}

/// An entry that passed the checks.
struct Checked {
    /// Relative, normal components only; empty for the archive's root (`./`).
    path: PathBuf,
    dir: bool,
    mode: u32,
    mtime: u64,
    size: u64,
}

/// `path` without `.` components, or why it is refused.
fn normalize(path: &Path) -> Result<PathBuf, Refusal> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => return Err(Refusal::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::Absolute),
        }
    }
    Ok(out)
}

fn path_hash(relative: &Path) -> u64 {
    // SipHash with fixed keys: the same value for the same path in this process, which is
    // all a listing needs (it is never stored).
    let mut h = DefaultHasher::new();
    relative.as_os_str().hash(&mut h);
    h.finish()
}

/// Checks one entry: `Ok(None)` for entries that carry no file (a pax global header).
fn check<R: Read>(entry: &tar::Entry<'_, R>) -> Result<Option<Checked>, UnpackError> {
    let name = || String::from_utf8_lossy(&entry.path_bytes()).into_owned();
    let refuse = |reason| UnpackError::Refused {
        entry: name(),
        reason,
    };
    let header = entry.header();
    let dir = match header.entry_type() {
        EntryType::Regular | EntryType::Continuous => false,
        EntryType::Directory => true,
        EntryType::XGlobalHeader => return Ok(None),
        EntryType::Symlink => return Err(refuse(Refusal::Symlink)),
        EntryType::Link => return Err(refuse(Refusal::HardLink)),
        _ => return Err(refuse(Refusal::Special)),
    };
    let raw = entry
        .path()
        .map_err(|source| UnpackError::Read { source })?;
    let path = normalize(&raw).map_err(refuse)?;
    if path.as_os_str().is_empty() && !dir {
        return Err(refuse(Refusal::EmptyPath));
    }
    let bad_header = |source| UnpackError::Read { source };
    Ok(Some(Checked {
        path,
        dir,
        mode: header.mode().map_err(bad_header)? & MODE_MASK,
        mtime: header.mtime().unwrap_or(0),
        size: entry.size(),
    }))
}

/// Reads every entry of the archive, checked, handing each to `each`; then the stream to its
/// end.
fn walk<R: Read>(
    reader: R,
    cancel: &CancellationToken,
    mut each: impl FnMut(&Checked, &mut tar::Entry<'_, Watched<'_, R>>) -> Result<(), UnpackError>,
) -> Result<(), UnpackError> {
    let to_err = read_err(cancel);
    let mut archive = tar::Archive::new(Watched {
        inner: reader,
        cancel,
    });
    for entry in archive.entries().map_err(&to_err)? {
        let mut entry = entry.map_err(&to_err)?;
        if let Some(checked) = check(&entry)? {
            each(&checked, &mut entry)?;
        }
    }
    // Past the end-of-archive blocks: the rest of the stream, so the decoders check it all.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(&to_err)?;
    Ok(())
}

fn list_sync<R: Read>(reader: R, cancel: &CancellationToken) -> Result<Listing, UnpackError> {
    let mut listing = Listing::default();
    walk(reader, cancel, |c, _| {
        if c.dir {
            listing.counts.dirs += 1;
        } else {
            listing.counts.files += 1;
            listing.counts.bytes += c.size;
            listing.hashes.push(path_hash(&c.path));
        }
        Ok(())
    })?;
    listing.hashes.sort_unstable();
    listing.hashes.dedup();
    Ok(listing)
}

fn unpack_sync<R: Read>(
    reader: R,
    dir: &Path,
    owner: Option<Owner>,
    cancel: &CancellationToken,
) -> Result<Counts, UnpackError> {
    let mut counts = Counts::default();
    let mut out = Writer {
        root: dir,
        owner,
        last_parent: None,
        buf: vec![0u8; COPY_BUFFER_BYTES],
    };
    let to_err = read_err(cancel);
    walk(reader, cancel, |c, entry| {
        if c.dir {
            if !c.path.as_os_str().is_empty() {
                out.directory(&c.path, c.mode)?;
                counts.dirs += 1;
            }
            return Ok(());
        }
        let written = out.file(c, entry, &to_err)?;
        counts.files += 1;
        counts.bytes += written;
        Ok(())
    })?;
    Ok(counts)
}

/// Writes entries under `root`.
struct Writer<'a> {
    root: &'a Path,
    owner: Option<Owner>,
    /// The parent directory of the last file written (archives list a directory's files
    /// together: one check for all of them).
    last_parent: Option<PathBuf>,
    buf: Vec<u8>,
}

impl Writer<'_> {
    fn write_err(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        move |source| UnpackError::Write {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Creates `relative` (and its missing parents) under the root; an existing directory is
    /// given `mode`. Only directories are ever met on the way: nothing else is created here.
    fn directory(&mut self, relative: &Path, mode: u32) -> Result<(), UnpackError> {
        if let Some(parent) = relative.parent() {
            self.parents(parent)?;
        }
        let full = self.root.join(relative);
        self.mkdir(&full)?;
        fs::set_permissions(&full, fs::Permissions::from_mode(mode | DIR_OWNER_BITS))
            .map_err(Self::write_err(&full))
    }

    /// Creates the missing directories of `relative` (mode [`IMPLICIT_DIR_MODE`]).
    fn parents(&mut self, relative: &Path) -> Result<(), UnpackError> {
        if relative.as_os_str().is_empty() || self.last_parent.as_deref() == Some(relative) {
            return Ok(());
        }
        let mut at = self.root.to_path_buf();
        for c in relative.components() {
            at.push(c);
            self.mkdir(&at)?;
        }
        self.last_parent = Some(relative.to_path_buf());
        Ok(())
    }

    fn mkdir(&self, full: &Path) -> Result<(), UnpackError> {
        match fs::DirBuilder::new()
            .mode(IMPLICIT_DIR_MODE | DIR_OWNER_BITS)
            .create(full)
        {
            Ok(()) => {
                // The umask applied to the mode above: set it exactly.
                fs::set_permissions(
                    full,
                    fs::Permissions::from_mode(IMPLICIT_DIR_MODE | DIR_OWNER_BITS),
                )
                .map_err(Self::write_err(full))?;
                if let Some(o) = self.owner {
                    std::os::unix::fs::lchown(full, Some(o.uid), Some(o.gid))
                        .map_err(Self::write_err(full))?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match fs::symlink_metadata(full) {
                    Ok(m) if m.is_dir() => Ok(()),
                    Ok(_) => Err(UnpackError::Write {
                        path: full.to_path_buf(),
                        source: io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "a file of the archive has this path, which another entry needs as a directory",
                        ),
                    }),
                    Err(source) => Err(UnpackError::Write {
                        path: full.to_path_buf(),
                        source,
                    }),
                }
            }
            Err(source) => Err(UnpackError::Write {
                path: full.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes one regular file (created, never opened if it exists); returns its bytes.
    fn file<R: Read>(
        &mut self,
        c: &Checked,
        entry: &mut R,
        to_err: &impl Fn(io::Error) -> UnpackError,
    ) -> Result<u64, UnpackError> {
        if let Some(parent) = c.path.parent() {
            self.parents(parent)?;
        }
        let full = self.root.join(&c.path);
        let mut file = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_OWNER_BITS)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(UnpackError::Refused {
                    entry: c.path.display().to_string(),
                    reason: Refusal::Duplicate,
                })
            }
            Err(source) => return Err(UnpackError::Write { path: full, source }),
        };
        let mut written = 0u64;
        loop {
            let n = entry.read(&mut self.buf).map_err(to_err)?;
            if n == 0 {
                break;
            }
            file.write_all(&self.buf[..n])
                .map_err(Self::write_err(&full))?;
            written += n as u64;
        }
        if written != c.size {
            // tar's entry reader ends quietly at the end of the stream.
            return Err(UnpackError::Read {
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "entry {} ends after {written} of its {} bytes",
                        c.path.display(),
                        c.size
                    ),
                ),
            });
        }
        file.set_permissions(fs::Permissions::from_mode(c.mode | FILE_OWNER_BITS))
            .map_err(Self::write_err(&full))?;
        file.set_modified(UNIX_EPOCH + Duration::from_secs(c.mtime))
            .map_err(Self::write_err(&full))?;
        if let Some(o) = self.owner {
            std::os::unix::fs::fchown(&file, Some(o.uid), Some(o.gid))
                .map_err(Self::write_err(&full))?;
        }
        Ok(written)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A tar entry written raw: any path (`../x`, `/etc/x`), any type.
    pub(crate) fn raw_entry(
        b: &mut tar::Builder<Vec<u8>>,
        path: &[u8],
        kind: EntryType,
        mode: u32,
        data: &[u8],
        link: Option<&[u8]>,
    ) {
        let mut h = tar::Header::new_old();
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    /// One tar entry: path, type, mode, data, link target.
    type Entry = (
        &'static str,
        EntryType,
        u32,
        &'static [u8],
        Option<&'static [u8]>,
    );

    /// A case of the refusal tests: an archive of `entries`, refused at the last one's path
    /// for `reason`.
    fn refused(entries: &[Entry], reason: Refusal) -> (Vec<u8>, &'static str, Refusal) {
        let bytes = archive(|b| {
            for &(path, kind, mode, data, link) in entries {
                raw_entry(b, path.as_bytes(), kind, mode, data, link);
            }
        });
        (bytes, entries.last().unwrap().0, reason)
    }

    fn good() -> Vec<u8> {
        archive(|b| {
            raw_entry(b, b"./", EntryType::Directory, 0o755, b"", None);
            raw_entry(b, b"ab/", EntryType::Directory, 0o2775, b"", None);
            raw_entry(b, b"ab/abcdef", EntryType::Regular, 0o4644, b"hello", None);
            raw_entry(b, b"ab/empty", EntryType::Regular, 0o600, b"", None);
            // A file whose directory is not listed, and one under `./`.
            raw_entry(
                b,
                b"cd/ef/x.bin",
                EntryType::Regular,
                0o640,
                &[0u8, 1, 2, 255],
                None,
            );
            raw_entry(b, b"./top", EntryType::Regular, 0o644, b"t", None);
        })
    }

    async fn unpack_bytes(bytes: Vec<u8>, dir: &Path) -> Result<Counts, UnpackError> {
        unpack(
            std::io::Cursor::new(bytes),
            dir.to_path_buf(),
            None,
            CancellationToken::new(),
        )
        .await
    }

    #[tokio::test]
    async fn files_and_directories_are_written_with_sanitized_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let counts = unpack_bytes(good(), tmp.path()).await.unwrap();
        assert_eq!(
            counts,
            Counts {
                files: 4,
                bytes: 10,
                dirs: 1
            }
        );
        let p = tmp.path();
        assert_eq!(fs::read(p.join("ab/abcdef")).unwrap(), b"hello");
        assert_eq!(fs::read(p.join("ab/empty")).unwrap(), b"");
        assert_eq!(fs::read(p.join("cd/ef/x.bin")).unwrap(), [0u8, 1, 2, 255]);
        assert_eq!(fs::read(p.join("top")).unwrap(), b"t");
        let mode = |rel: &str| fs::metadata(p.join(rel)).unwrap().mode() & 0o7777;
        assert_eq!(mode("ab/abcdef"), 0o644, "setuid dropped");
        assert_eq!(mode("ab"), 0o775, "setgid dropped");
        assert_eq!(mode("cd"), 0o755);
        assert_eq!(mode("cd/ef/x.bin"), 0o640);
        assert_eq!(
            fs::metadata(p.join("ab/abcdef")).unwrap().mtime(),
            1_700_000_000
        );
    }

    #[tokio::test]
    async fn the_listing_counts_files_and_knows_their_paths() {
        let listing = list(std::io::Cursor::new(good()), CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(listing.counts.files, 4);
        assert_eq!(listing.counts.bytes, 10);
        for present in ["ab/abcdef", "/ab/abcdef", "./ab/abcdef", "ab//empty", "top"] {
            assert!(listing.contains(present), "{present}");
        }
        for absent in ["ab/abcdeg", "ab", "cd/ef", "", "../ab/abcdef", "x/../top"] {
            assert!(!listing.contains(absent), "{absent}");
        }
    }

    #[tokio::test]
    async fn escaping_and_special_entries_are_refused_by_name() {
        use EntryType::{Char, Directory, Fifo, Link, Regular, Symlink};
        // A file before the refused entry, so that it is not the first.
        const FILE: Entry = ("ab/x", Regular, 0o644, b"x", None);
        let cases = [
            refused(
                &[("../evil", Regular, 0o644, b"x", None)],
                Refusal::ParentDir,
            ),
            refused(
                &[("a/../../evil", Regular, 0o644, b"x", None)],
                Refusal::ParentDir,
            ),
            refused(
                &[("/tmp/evil", Regular, 0o644, b"x", None)],
                Refusal::Absolute,
            ),
            refused(
                &[("../d/", Directory, 0o755, b"", None)],
                Refusal::ParentDir,
            ),
            refused(
                &[FILE, ("link", Symlink, 0o777, b"", Some(b"/etc"))],
                Refusal::Symlink,
            ),
            refused(
                &[FILE, ("hard", Link, 0o644, b"", Some(b"/etc/passwd"))],
                Refusal::HardLink,
            ),
            refused(&[("fifo", Fifo, 0o644, b"", None)], Refusal::Special),
            refused(&[("dev", Char, 0o644, b"", None)], Refusal::Special),
            refused(
                &[FILE, ("ab/x", Regular, 0o644, b"y", None)],
                Refusal::Duplicate,
            ),
        ];
        for (bytes, name, reason) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("root");
            fs::create_dir(&root).unwrap();
            let e = unpack_bytes(bytes.clone(), &root).await.unwrap_err();
            match &e {
                UnpackError::Refused { entry, reason: r } => {
                    assert_eq!((entry.as_str(), *r), (name, reason), "{e}");
                    assert!(e.to_string().contains(name), "{e}");
                }
                other => panic!("{name}: {other:?}"),
            }
            // Nothing outside the directory, nothing where the links pointed.
            assert!(!tmp.path().join("evil").exists());
            assert!(!Path::new("/tmp/evil").exists());
            assert_eq!(
                fs::read_dir(tmp.path()).unwrap().count(),
                1,
                "{name}: only root"
            );
            if reason != Refusal::Duplicate {
                // The listing refuses the same archive (verify reports it).
                let l = list(std::io::Cursor::new(bytes), CancellationToken::new()).await;
                assert!(matches!(l, Err(UnpackError::Refused { .. })), "{name}");
            }
        }
    }

    #[tokio::test]
    async fn a_truncated_archive_is_a_read_error() {
        let mut bytes = good();
        // Cut inside the first file's data.
        let at = bytes.windows(5).position(|w| w == b"hello").unwrap() + 2;
        bytes.truncate(at);
        let tmp = tempfile::tempdir().unwrap();
        let e = unpack_bytes(bytes, tmp.path()).await.unwrap_err();
        assert!(matches!(e, UnpackError::Read { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_cancelled_unpack_stops() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let tmp = tempfile::tempdir().unwrap();
        let e = unpack(
            std::io::Cursor::new(good()),
            tmp.path().to_path_buf(),
            None,
            cancel,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, UnpackError::Cancelled), "{e:?}");
    }

    #[tokio::test]
    async fn the_stream_is_read_past_the_end_of_archive() {
        // Trailing bytes after tar's end blocks (zstd's checksum lives at the very end of the
        // stream: a reader that stops at the end blocks would never check it).
        let mut bytes = good();
        bytes.extend_from_slice(&[7u8; 4096]);
        let (tx, rx) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut tx = tx;
            tx.write_all(&bytes).await.unwrap();
        });
        let tmp = tempfile::tempdir().unwrap();
        unpack(rx, tmp.path().to_path_buf(), None, CancellationToken::new())
            .await
            .unwrap();
        // The writer finishes only if all was read (more than the pipe holds was left after
        // the end blocks); once the reader is dropped, its write fails instead.
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn the_owner_is_given_to_everything_written() {
        // Only root can give files away; as anyone else the owner must be the caller's own.
        let me = Owner {
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
        };
        let owner = if me.uid == 0 {
            Owner {
                uid: 4321,
                gid: 4322,
            }
        } else {
            me
        };
        let tmp = tempfile::tempdir().unwrap();
        unpack(
            std::io::Cursor::new(good()),
            tmp.path().to_path_buf(),
            Some(owner),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        for rel in ["ab", "ab/abcdef", "cd", "cd/ef", "cd/ef/x.bin", "top"] {
            let m = fs::symlink_metadata(tmp.path().join(rel)).unwrap();
            assert_eq!((m.uid(), m.gid()), (owner.uid, owner.gid), "{rel}");
        }
    }
}
