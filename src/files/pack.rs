//! A database's companion-files directory as a tar stream, read by the backup pipeline.
//!
//! [`pack`] walks the directory on a blocking thread and writes a tar (`tar` crate, GNU
//! headers) into a bounded channel of chunks that the caller reads as a
//! [`tokio::io::AsyncRead`]: memory is [`CHANNEL_CAP`] × [`CHUNK`] plus one directory's
//! listing at a time (its names are sorted, so the archive's order is deterministic), whatever
//! the tree's size. When the reader is dropped the thread stops at its next write.
//!
//! What goes into the archive, and what does not:
//! - regular files and directories, under paths relative to the directory (`ab/abcdef…`: no
//!   leading `/`, no `..`), with their permission bits and modification time (owner 0);
//! - never a symlink (wherever it points: the restore refuses them) or a special file (FIFO,
//!   socket, device): they are skipped and counted ([`PackStats::skipped`]);
//! - a file that vanished between the listing and its opening is not archived (not counted:
//!   Odoo's garbage collector deletes unreferenced files);
//! - a file that changes while read is archived as read, at the length it had when opened:
//!   a file that grew is cut there, one that shrank is padded with zeros to it
//!   ([`PackStats::changed`]). The `tar` crate writes whatever its reader yields after a
//!   header of the stated size, so without this a change would corrupt the archive.
//!
//! Any other error reading the tree (permission denied, an I/O error) fails the pack with
//! the path: a backup that silently lacks attachments would only be noticed on a restore.
//!
//! This module does not decide whether a missing directory is an error (see `backup`), and
//! writes nothing but the stream.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::io::StreamReader;

/// Bytes per chunk handed to the reader: large enough that a channel hop per chunk costs
/// nothing next to zstd, small enough that the channel stays cheap.
pub const CHUNK: usize = 256 * 1024;

/// Chunks queued between the walking thread and the reader: with [`CHUNK`], 1 MiB at most.
pub const CHANNEL_CAP: usize = 4;

/// What a pack archived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Regular files archived.
    pub file_count: u64,
    /// Bytes of their contents (as archived: the lengths they had when opened).
    pub file_bytes: u64,
    /// Symlinks and special files not archived.
    pub skipped: u64,
    /// Files whose length changed while they were read (archived cut or zero-padded).
    pub changed: u64,
}

/// Why a pack failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot read {path}: {source}{}", access_hint(source))]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a directory; [[source]] files must name each database's directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot write {path} into the archive: {source}")]
    Entry { path: PathBuf, source: io::Error },
    /// The reader was dropped (the pipeline stopped): not a failure of its own.
    #[error("the archive's reader is gone")]
    ReaderGone,
    #[error("internal error: the archiving thread panicked: {0}")]
    Panicked(String),
}

fn access_hint(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::PermissionDenied {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        format!(
            " (pgferry runs as uid {uid}: it needs read permission on every file and read and \
             execute permission on every directory of the companion files; mount the volume \
             with the application's group, e.g. Kubernetes fsGroup, or run pgferry as its user)"
        )
    } else {
        String::new()
    }
}

/// Whether the directory to archive is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Present,
    /// It does not exist (nor, maybe, its parent: see [`parent_exists`]).
    Missing,
}

/// Looks at `dir` (following a symlink: the configured path may be one): missing, a
/// directory, or an error (not a directory, not accessible).
pub async fn probe(dir: &Path) -> Result<Presence, PackError> {
    match tokio::fs::metadata(dir).await {
        Ok(m) if m.is_dir() => Ok(Presence::Present),
        Ok(_) => Err(PackError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Presence::Missing),
        Err(source) => Err(PackError::Read {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Whether `dir`'s parent exists (a missing one suggests an unmounted volume).
pub async fn parent_exists(dir: &Path) -> bool {
    match dir.parent() {
        Some(p) => tokio::fs::metadata(p).await.is_ok_and(|m| m.is_dir()),
        None => true,
    }
}

/// A pack in progress: read the archive from `reader`; `task` says how it went once the
/// reader hit the end (or an error).
pub struct Packing {
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    pub task: JoinHandle<Result<PackStats, PackError>>,
}

/// Starts archiving `dir` (see the module doc). A failure shows on the reader as an error
/// (so a consumer never takes a cut stream for a whole one) and in `task` with its path.
pub fn pack(dir: PathBuf) -> Packing {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CAP);
    let task = tokio::task::spawn_blocking(move || {
        let result = write_archive(&dir, Chunks::new(tx.clone()));
        if let Err(e) = &result {
            // The reader sees the failure instead of an end (best effort: it may be gone).
            let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
        result
    });
    Packing {
        reader: Box::pin(StreamReader::new(Received(rx))),
        task,
    }
}

/// The receiving end of the chunk channel as a stream.
struct Received(mpsc::Receiver<io::Result<Bytes>>);

impl futures::Stream for Received {
    type Item = io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Writes the tar of `root` into `out`, then the end-of-archive blocks and the last chunk.
fn write_archive(root: &Path, out: Chunks) -> Result<PackStats, PackError> {
    let mut tar = tar::Builder::new(out);
    let mut stats = PackStats::default();
    let walked = walk(root, &mut tar, &mut stats);
    if walked.is_err() {
        // The builder writes the end-of-archive blocks when dropped: not after a failure.
        tar.get_mut().discard = true;
        return walked.map(|()| stats);
    }
    let mut out = tar.into_inner().map_err(write_error(root))?;
    out.send().map_err(write_error(root))?;
    Ok(stats)
}

fn write_error(path: &Path) -> impl Fn(io::Error) -> PackError + '_ {
    move |source| {
        if source.kind() == io::ErrorKind::BrokenPipe {
            PackError::ReaderGone
        } else {
            PackError::Entry {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Depth first, each directory's entries in name order; a directory's entry comes before its
/// contents. Only the directories still to visit are held, as relative paths.
fn walk(
    root: &Path,
    tar: &mut tar::Builder<Chunks>,
    stats: &mut PackStats,
) -> Result<(), PackError> {
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let dir = root.join(&rel);
        let names = match sorted_names(&dir) {
            Ok(names) => names,
            // A subdirectory removed since it was listed: nothing of it to archive.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
                tracing::debug!(message = "A directory vanished while archiving; skipped.", path = %dir.display());
                continue;
            }
            Err(source) => return Err(PackError::Read { path: dir, source }),
        };
        let mut subdirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            let path = root.join(&rel);
            if tar.get_ref().tx.is_closed() {
                return Err(PackError::ReaderGone);
            }
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!(message = "A file vanished while archiving; skipped.", path = %path.display());
                    continue;
                }
                Err(source) => return Err(PackError::Read { path, source }),
            };
            let kind = meta.file_type();
            if kind.is_dir() {
                append_dir(tar, &rel, &meta, &path)?;
                subdirs.push(rel);
            } else if kind.is_file() {
                append_file(tar, &rel, &path, stats)?;
            } else {
                tracing::debug!(message = "Not a regular file or directory; not archived.", path = %path.display(), kind = ?kind);
                stats.skipped += 1;
            }
        }
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

fn sorted_names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

fn header(kind: tar::EntryType, meta: &fs::Metadata, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(meta.mode() & 0o7777);
    h.set_mtime(meta.mtime().max(0) as u64);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_dir(
    tar: &mut tar::Builder<Chunks>,
    rel: &Path,
    meta: &fs::Metadata,
    path: &Path,
) -> Result<(), PackError> {
    let mut h = header(tar::EntryType::Directory, meta, 0);
    tar.append_data(&mut h, rel, io::empty())
        .map_err(write_error(path))
}

/// Archives one regular file at the length it has once opened (see [`Exact`]).
fn append_file(
    tar: &mut tar::Builder<Chunks>,
    rel: &Path,
    path: &Path,
    stats: &mut PackStats,
) -> Result<(), PackError> {
    // O_NOFOLLOW: a symlink swapped in since the listing is not followed (ELOOP, skipped);
    // O_NONBLOCK: a FIFO swapped in does not block the open (fstat then skips it).
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(message = "A file vanished while archiving; skipped.", path = %path.display());
            return Ok(());
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            stats.skipped += 1;
            return Ok(());
        }
        Err(source) => {
            return Err(PackError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let meta = file.metadata().map_err(|source| PackError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        stats.skipped += 1;
        return Ok(());
    }
    append_open_file(tar, rel, path, file, &meta, stats)
}

/// Archives `file` as `rel` with the length `meta` states, whatever its reads yield.
fn append_open_file(
    tar: &mut tar::Builder<Chunks>,
    rel: &Path,
    path: &Path,
    file: impl Read,
    meta: &fs::Metadata,
    stats: &mut PackStats,
) -> Result<(), PackError> {
    let size = meta.len();
    let mut h = header(tar::EntryType::Regular, meta, size);
    let mut data = Exact::new(file, size);
    match tar.append_data(&mut h, rel, &mut data) {
        Ok(()) => {}
        Err(_) if data.read_error.is_some() => {
            return Err(PackError::Read {
                path: path.to_path_buf(),
                source: data.read_error.take().expect("checked"),
            })
        }
        Err(e) => return Err(write_error(path)(e)),
    }
    stats.file_count += 1;
    stats.file_bytes += size;
    if data.changed() {
        tracing::debug!(message = "A file changed while archived; archived at its length when opened.", path = %path.display(), bytes = size);
        stats.changed += 1;
    }
    Ok(())
}

/// Exactly `len` bytes of `inner`: cut when it has more, zeros after its end when it has
/// fewer. A read error is kept to tell it from a write error.
struct Exact<R> {
    inner: R,
    left: u64,
    padded: bool,
    grew: bool,
    read_error: Option<io::Error>,
}

impl<R: Read> Exact<R> {
    fn new(inner: R, len: u64) -> Self {
        Exact {
            inner,
            left: len,
            padded: false,
            grew: false,
            read_error: None,
        }
    }

    /// Whether the source had fewer or more bytes than the stated length (more is only seen
    /// when the stated length was read: one byte past it is probed).
    fn changed(&mut self) -> bool {
        if !self.padded && !self.grew {
            let mut probe = [0u8; 1];
            self.grew = matches!(self.inner.read(&mut probe), Ok(1));
        }
        self.padded || self.grew
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = if self.padded {
            0
        } else {
            loop {
                match self.inner.read(&mut buf[..want]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let copy = io::Error::new(e.kind(), e.to_string());
                        self.read_error = Some(e);
                        return Err(copy);
                    }
                }
            }
        };
        let n = if n == 0 {
            // The file ended early (it shrank): zeros up to the stated length.
            self.padded = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// The tar's writer: fills [`CHUNK`]-sized chunks and hands each to the channel, blocking
/// while it is full; fails with `BrokenPipe` once the reader is gone.
struct Chunks {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    /// Set after a failure: what the builder writes when dropped goes nowhere.
    discard: bool,
}

impl Chunks {
    fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        Chunks {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
            discard: false,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, BytesMut::with_capacity(CHUNK)).freeze();
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the archive's reader is gone"))
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.discard {
            return Ok(data.len());
        }
        let take = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a whole pack into memory and returns it with its stats (tests).
#[cfg(test)]
pub(crate) async fn pack_to_vec(dir: &Path) -> Result<(Vec<u8>, PackStats), PackError> {
    use tokio::io::AsyncReadExt;
    let mut p = pack(dir.to_path_buf());
    let mut out = Vec::new();
    let read = p.reader.read_to_end(&mut out).await;
    let stats = p
        .task
        .await
        .map_err(|e| PackError::Panicked(e.to_string()))??;
    read.map_err(|source| PackError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// (path, kind, contents) of every entry of a tar, in archive order.
    fn entries(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let kind = e.header().entry_type();
                let mut body = Vec::new();
                e.read_to_end(&mut body).unwrap();
                (path, kind, body)
            })
            .collect()
    }

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("b/nested")).unwrap();
        fs::create_dir_all(root.join("a")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join("b/nested/deep.bin"), [0u8, 1, 2, 255]).unwrap();
        fs::write(root.join("a/zz"), b"zz").unwrap();
        fs::write(root.join("a/aa"), b"").unwrap();
        fs::write(root.join("top name é.txt"), "unicode and spaces").unwrap();
        d
    }

    #[tokio::test]
    async fn archives_files_and_directories_in_name_order_under_relative_paths() {
        let d = tree();
        let (bytes, stats) = pack_to_vec(d.path()).await.unwrap();
        let got: Vec<(String, tar::EntryType)> = entries(&bytes)
            .into_iter()
            .map(|(p, k, _)| (p, k))
            .collect();
        use tar::EntryType::{Directory as D, Regular as F};
        let want = [
            ("a", D),
            ("b", D),
            ("empty", D),
            ("top name é.txt", F),
            ("a/aa", F),
            ("a/zz", F),
            ("b/nested", D),
            ("b/nested/deep.bin", F),
        ];
        let want: Vec<(String, tar::EntryType)> =
            want.iter().map(|(p, k)| (p.to_string(), *k)).collect();
        assert_eq!(got, want);
        for (path, _, body) in entries(&bytes) {
            assert!(!path.starts_with('/') && !path.contains(".."), "{path}");
            let on_disk = d.path().join(&path);
            if on_disk.is_file() {
                assert_eq!(body, fs::read(on_disk).unwrap(), "{path}");
            }
        }
        assert_eq!(
            stats,
            PackStats {
                file_count: 4,
                file_bytes: 4 + 2 + 18,
                skipped: 0,
                changed: 0
            }
        );
        // Deterministic: the same tree gives the same bytes.
        assert_eq!(pack_to_vec(d.path()).await.unwrap().0, bytes);
    }

    #[tokio::test]
    async fn long_and_non_utf8_names_and_an_empty_tree_archive() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let (bytes, stats) = pack_to_vec(d.path()).await.unwrap();
        assert_eq!(stats, PackStats::default());
        assert!(
            entries(&bytes).is_empty(),
            "an empty tree is an empty archive"
        );
        let long = "d".repeat(120);
        fs::create_dir_all(d.path().join(&long)).unwrap();
        fs::write(d.path().join(&long).join("f".repeat(200)), b"long").unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"latin1-\xe9");
        fs::write(d.path().join(odd), b"odd").unwrap();
        let (bytes, stats) = pack_to_vec(d.path()).await.unwrap();
        assert_eq!(stats.file_count, 2);
        let got = entries(&bytes);
        assert_eq!(got[0].0, long);
        assert_eq!(
            got[1].0, "latin1-\u{fffd}",
            "lossy in the test's listing only"
        );
        assert_eq!(got[2].0, format!("{long}/{}", "f".repeat(200)));
        assert_eq!(got[2].2, b"long");
        let mut a = tar::Archive::new(&bytes[..]);
        let raw: Vec<Vec<u8>> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path_bytes().into_owned())
            .collect();
        assert_eq!(raw[1], b"latin1-\xe9");
    }

    #[tokio::test]
    async fn symlinks_and_special_files_are_skipped_and_counted() {
        let d = tree();
        let root = d.path();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("out-link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("a/out-dir")).unwrap();
        std::os::unix::fs::symlink("zz", root.join("a/in-link")).unwrap();
        std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
        let fifo = std::ffi::CString::new(root.join("b/fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();

        let (bytes, stats) = pack_to_vec(root).await.unwrap();
        assert_eq!(stats.skipped, 6, "{stats:?}");
        assert_eq!(stats.file_count, 4);
        let paths: Vec<String> = entries(&bytes).into_iter().map(|(p, _, _)| p).collect();
        for gone in [
            "out-link",
            "a/out-dir",
            "a/in-link",
            "dangling",
            "b/fifo",
            "sock",
        ] {
            assert!(!paths.iter().any(|p| p == gone), "{gone} in {paths:?}");
        }
        for (_, kind, _) in entries(&bytes) {
            assert!(matches!(
                kind,
                tar::EntryType::Regular | tar::EntryType::Directory
            ));
        }
    }

    #[test]
    fn a_file_that_shrinks_or_grows_while_read_keeps_its_stated_length() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        fs::write(&path, vec![7u8; 1000]).unwrap();
        let meta = fs::metadata(&path).unwrap(); // 1000 bytes when "opened"
        let (tx, mut rx) = mpsc::channel(1024);
        let mut tar = tar::Builder::new(Chunks::new(tx));
        let mut stats = PackStats::default();
        // Shrank to 300 bytes after the stat: zeros up to 1000.
        append_open_file(
            &mut tar,
            Path::new("shrunk"),
            &path,
            &[7u8; 300][..],
            &meta,
            &mut stats,
        )
        .unwrap();
        // Grew to 1500 bytes: cut at 1000.
        append_open_file(
            &mut tar,
            Path::new("grown"),
            &path,
            &[9u8; 1500][..],
            &meta,
            &mut stats,
        )
        .unwrap();
        // Unchanged.
        append_open_file(
            &mut tar,
            Path::new("same"),
            &path,
            &[5u8; 1000][..],
            &meta,
            &mut stats,
        )
        .unwrap();
        let mut out = tar.into_inner().unwrap();
        out.send().unwrap();
        drop(out);
        let mut bytes = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        let got = entries(&bytes);
        assert_eq!(got.len(), 3, "the archive reads as three whole entries");
        let mut shrunk = vec![7u8; 300];
        shrunk.resize(1000, 0);
        assert_eq!(got[0].2, shrunk);
        assert_eq!(got[1].2, vec![9u8; 1000]);
        assert_eq!(got[2].2, vec![5u8; 1000]);
        assert_eq!(stats.changed, 2);
        assert_eq!(stats.file_count, 3);
        assert_eq!(stats.file_bytes, 3000);
    }

    #[test]
    fn a_vanished_file_is_not_archived_nor_counted() {
        let d = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let mut tar = tar::Builder::new(Chunks::new(tx));
        let mut stats = PackStats::default();
        // Listed, then deleted before it was opened.
        append_file(
            &mut tar,
            Path::new("gone"),
            &d.path().join("gone"),
            &mut stats,
        )
        .unwrap();
        assert_eq!(stats, PackStats::default());
    }

    /// Run on a thread of its own whose filesystem uid is not root (`setfsuid` is per
    /// thread, and drops root's permission override with it), so that the test means the
    /// same whoever runs it.
    #[test]
    fn an_unreadable_file_fails_with_its_path() {
        let d = tree();
        let locked = d.path().join("a/zz");
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = d.path().to_path_buf();
        let err = std::thread::spawn(move || {
            // SAFETY: changes this thread's filesystem uid only; the thread ends here.
            unsafe { libc::setfsuid(65534) };
            let (tx, _rx) = mpsc::channel(1024);
            write_archive(&root, Chunks::new(tx))
        })
        .join()
        .unwrap()
        .unwrap_err();
        assert!(
            matches!(&err, PackError::Read { path, .. } if path == &locked),
            "{err}"
        );
        assert!(err.to_string().contains("fsGroup"), "{err}");
    }

    #[tokio::test]
    async fn the_reader_sees_an_error_not_an_end_when_the_pack_fails() {
        use tokio::io::AsyncReadExt;
        let d = tempfile::tempdir().unwrap();
        let mut p = pack(d.path().join("missing"));
        let mut out = Vec::new();
        assert!(p.reader.read_to_end(&mut out).await.is_err());
        assert!(matches!(p.task.await.unwrap(), Err(PackError::Read { .. })));
    }

    #[tokio::test]
    async fn dropping_the_reader_stops_the_thread() {
        let d = tempfile::tempdir().unwrap();
        // More than the channel holds: the thread must block on it, then see the reader go.
        fs::write(d.path().join("big"), vec![1u8; 4 * CHANNEL_CAP * CHUNK]).unwrap();
        let p = pack(d.path().to_path_buf());
        drop(p.reader);
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), p.task)
            .await
            .expect("the thread stopped")
            .unwrap();
        assert!(matches!(r, Err(PackError::ReaderGone)), "{r:?}");
    }

    #[tokio::test]
    async fn probe_tells_missing_from_present_from_not_a_directory() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(probe(d.path()).await.unwrap(), Presence::Present);
        assert_eq!(probe(&d.path().join("x")).await.unwrap(), Presence::Missing);
        assert!(!parent_exists(&d.path().join("x/y")).await);
        assert!(parent_exists(&d.path().join("x")).await);
        fs::write(d.path().join("f"), b"").unwrap();
        assert!(matches!(
            probe(&d.path().join("f")).await,
            Err(PackError::NotADirectory { .. })
        ));
    }
}
