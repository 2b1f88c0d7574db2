//! Loading one copy of a snapshot into the temporary database: download, sha256, (age -d,)
//! zstd -d, pg_restore — streamed, or through a spool file for `pg_restore -j N`.
//!
//! One attempt reads one target's object. Success needs all three: the stored bytes' sha256
//! equals the manifest's, their count equals `stored_size`, and pg_restore exited 0. An
//! encrypted snapshot is decrypted between the checksum and zstd with the identity file the
//! caller names ([`RestoreInto::identity_file`]), which is checked against the manifest's
//! recipients before anything is downloaded; a ciphertext that fails age's authentication is
//! a bad copy, like a checksum mismatch. The
//! object is always read to its end (also after pg_restore gave up) so a corrupt copy is
//! told apart from a destination problem: only the former is worth trying another target.
//! Memory stays bounded by [`COPY_BUFFER_BYTES`] plus object_store's chunks. This module
//! never creates or drops databases (see `swap`); the caller drops the temporary database
//! after a failed attempt.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_compression::tokio::bufread::ZstdDecoder;
use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::io::StreamReader;
use tokio_util::sync::CancellationToken;

use crate::archive::DumpStatsTap;
use crate::config::PgUrl;
use crate::encryption::{self, DecryptFailed, Identities, KeyError};
use crate::source::{self, PgTool};
use crate::storage::catalog::SnapshotEntry;
use crate::storage::manifest::{FilesArchive, Manifest};
use crate::storage::target::Target;

/// Decompressed bytes moved per read/write: large enough for few syscalls, small enough
/// that memory never depends on the database size.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Mode of the spool directories restore creates: owner only.
const SPOOL_DIR_MODE: u32 = 0o700;

/// Mode of the spool file (a decompressed production dump): owner read/write only.
const SPOOL_FILE_MODE: u32 = 0o600;

/// Free space required on the spool filesystem beyond the archive itself, so a spool never
/// fills a disk to the last byte.
const SPOOL_HEADROOM_BYTES: u64 = 256 * 1024 * 1024;

/// Bytes counted while a restore runs, for the progress line.
#[derive(Debug, Default)]
pub struct LoadProgress {
    /// Stored (compressed) bytes read from the target.
    pub stored_bytes: AtomicU64,
    /// Decompressed bytes handed to pg_restore or the spool.
    pub raw_bytes: AtomicU64,
    /// The stored size of the object being read (from its manifest), for a percentage.
    pub total_stored_bytes: AtomicU64,
}

/// Why one attempt failed. [`LoadError::is_bad_copy`] says whether another target may do better.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {key}: {}", crate::storage::target::error_text(source))]
    Download {
        key: String,
        source: object_store::Error,
    },
    #[error("checksum mismatch: the object's sha256 is {actual}, the manifest says {expected}; this copy is corrupt")]
    Checksum { expected: String, actual: String },
    #[error("the object is {actual} bytes, the manifest says {expected}; this copy is truncated or altered")]
    Size { expected: u64, actual: u64 },
    #[error("cannot decompress the object ({source}); this copy is corrupt")]
    Decompress { source: std::io::Error },
    #[error(transparent)]
    Decrypt(DecryptFailed),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("pg_restore failed ({status}): {stderr}")]
    PgRestore { status: String, stderr: String },
    #[error(transparent)]
    Tool(#[from] source::SourceError),
    #[error("spool {path}: {source}")]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool directory {dir} has {available} bytes free, the archive needs {needed} (plus headroom); free space or set [restore] spool_dir")]
    SpoolSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("the companion files archive holds {actual} files, its manifest says {expected}; this copy does not match its manifest")]
    FileCount { expected: u64, actual: u64 },
    #[error(
        "the manifest names {key:?}, which is not an object key; this copy's manifest is damaged"
    )]
    ObjectKey { key: String },
    #[error("this target's manifest says the snapshot is {own}, target {first}'s says {expected}: the manifests disagree about its encryption (one bucket was changed outside pgferry), so this copy is not read; see the runbook (\"their manifests … disagree\")")]
    EncryptionDisagrees {
        first: String,
        own: String,
        expected: String,
    },
    #[error("cancelled")]
    Cancelled,
}

impl LoadError {
    /// A problem of this copy (or of reaching its target): the next target may have a good one.
    pub fn is_bad_copy(&self) -> bool {
        matches!(
            self,
            LoadError::Download { .. }
                | LoadError::Checksum { .. }
                | LoadError::Size { .. }
                | LoadError::Decompress { .. }
                | LoadError::Decrypt(_)
                | LoadError::EncryptionDisagrees { .. }
                | LoadError::FileCount { .. }
        )
    }

    /// Whether the same attempt may succeed later (a target or the network was down).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LoadError::Download { .. })
    }
}

/// The manifest `target`'s copy is read with: that target's own (the manifests of one
/// snapshot may disagree: one bucket's rewritten or damaged must not make another's intact copy
/// unreadable), but only when it says what the first target's says about the encryption: a
/// copy whose manifest says "not encrypted", or encrypted to other keys, is not read (no
/// downgrade, no copy re-encrypted to a key of the attacker's choosing behind a good one).
pub fn manifest_for<'a>(entry: &'a SnapshotEntry, target: &str) -> Result<&'a Manifest, LoadError> {
    let own = entry.manifest_on(target);
    if !entry.encryption_disagrees(target) {
        return Ok(own);
    }
    Err(LoadError::EncryptionDisagrees {
        first: entry.targets.first().cloned().unwrap_or_default(),
        own: encryption::describe(own.encryption.as_ref()),
        expected: encryption::describe(entry.manifest.encryption.as_ref()),
    })
}

/// One stored object a manifest names, and what its stored bytes must be: the dump, or the
/// companion files' archive (`crate::files`). Both are zstd, then age when the manifest's
/// `encryption` is set.
#[derive(Debug, Clone, Copy)]
pub struct StoredObject<'a> {
    pub key: &'a str,
    pub stored_size: u64,
    pub sha256: &'a str,
}

impl<'a> StoredObject<'a> {
    pub fn dump(m: &'a Manifest) -> Self {
        StoredObject {
            key: &m.object_key,
            stored_size: m.stored_size,
            sha256: &m.sha256,
        }
    }

    pub fn files(a: &'a FilesArchive) -> Self {
        StoredObject {
            key: &a.object_key,
            stored_size: a.stored_size,
            sha256: &a.sha256,
        }
    }
}

/// What a finished attempt read.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub stored_bytes: u64,
    pub raw_bytes: u64,
}

/// Everything pg_restore needs to write into the temporary database.
pub struct RestoreInto<'a> {
    pub tool: &'a PgTool,
    /// The destination server's URL (credentials travel through the environment).
    pub url: &'a PgUrl,
    pub tmp_database: &'a str,
    pub owner: &'a str,
    /// The age identity file that opens encrypted snapshots; `None`: none configured (an
    /// unencrypted snapshot needs none).
    pub identity_file: Option<&'a Path>,
}

/// sha256 and byte count of the stored bytes, updated as the stream passes by.
#[derive(Default)]
struct Tap {
    hasher: Sha256,
    bytes: u64,
}

/// The object's byte stream (hashed as it passes).
type RawStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send>>;

/// The object's byte stream, shared between the reader chain above it and [`drain`], which
/// takes it to read what is left after a stage above failed (a decryptor cannot hand back its
/// input), so that the checksum always covers every stored byte.
#[derive(Clone)]
struct Detachable(Arc<Mutex<Option<RawStream>>>);

impl futures::Stream for Detachable {
    type Item = std::io::Result<bytes::Bytes>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match inner.as_mut() {
            Some(stream) => stream.as_mut().poll_next(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

type ObjectReader = StreamReader<Detachable, bytes::Bytes>;

/// What the decompressor reads: the object, or its decrypted plaintext.
type Plain = Box<dyn tokio::io::AsyncBufRead + Send + Unpin>;

/// An opened object: the decoded stream, its raw bytes for [`drain`], and what they hashed
/// to for [`check_copy`].
struct Opened {
    decoder: ZstdDecoder<Plain>,
    raw: Detachable,
    tap: Arc<Mutex<Tap>>,
}

/// Opens the object and wraps it: stored bytes → tap → (age decryption →) zstd decoder.
/// The identities of an encrypted snapshot are read and checked first: a missing or wrong
/// key fails before any download.
async fn open(
    target: &Target,
    manifest: &Manifest,
    object: StoredObject<'_>,
    identity_file: Option<&Path>,
    progress: Arc<LoadProgress>,
) -> Result<Opened, LoadError> {
    let identities = encryption::identities_for(
        &manifest.snapshot_id,
        manifest.encryption.as_ref(),
        identity_file,
    )?;
    // The object the manifest names (write-once: `<id>-<run>.dump.zst[.age]`, or
    // `<id>.dump.zst` for format ≤ 2), never a key derived from the id.
    let path =
        crate::storage::key::object_path(object.key).ok_or_else(|| LoadError::ObjectKey {
            key: object.key.to_string(),
        })?;
    let key = target.at(&path);
    progress
        .total_stored_bytes
        .store(object.stored_size, Ordering::Relaxed);
    let got = target
        .store
        .get(&key)
        .await
        .map_err(|source| LoadError::Download {
            key: key.to_string(),
            source,
        })?;
    let tap = Arc::new(Mutex::new(Tap::default()));
    let hashed = tap.clone();
    let stream = got
        .into_stream()
        .map_err(std::io::Error::other)
        .inspect_ok(move |chunk| {
            let mut t = hashed.lock().unwrap_or_else(|p| p.into_inner());
            t.hasher.update(chunk);
            t.bytes += chunk.len() as u64;
            progress
                .stored_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        });
    let raw = Detachable(Arc::new(Mutex::new(Some(Box::pin(stream)))));
    let reader = StreamReader::new(raw.clone());
    let plain: Plain = match &identities {
        None => Box::new(reader),
        Some(ids) => Box::new(decrypting(reader, ids).await?),
    };
    let mut decoder = ZstdDecoder::new(plain);
    decoder.multiple_members(true);
    Ok(Opened { decoder, raw, tap })
}

/// [`open`] of the snapshot's dump.
async fn open_dump(
    target: &Target,
    manifest: &Manifest,
    into: &RestoreInto<'_>,
    progress: &Arc<LoadProgress>,
) -> Result<Opened, LoadError> {
    let object = StoredObject::dump(manifest);
    open(
        target,
        manifest,
        object,
        into.identity_file,
        progress.clone(),
    )
    .await
}

/// The plaintext of an age-encrypted object (buffered: zstd reads from its 64 KiB chunks).
async fn decrypting(
    reader: ObjectReader,
    ids: &Identities,
) -> Result<impl tokio::io::AsyncBufRead + Send + Unpin, LoadError> {
    encryption::open(reader, ids).await.map_err(read_error)
}

/// How a copy loop ended.
struct Pumped {
    read_error: Option<std::io::Error>,
    write_error: Option<std::io::Error>,
    raw_bytes: u64,
    cancelled: bool,
}

/// Copies decoded bytes into `sink` until the end, an error on either side, or cancellation.
async fn pump<R, W>(
    reader: &mut R,
    sink: &mut W,
    progress: &LoadProgress,
    cancel: &CancellationToken,
) -> Pumped
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    // Where the time went: waiting for decoded bytes (download, decryption, decompression)
    // or for pg_restore to take them (it and the server are the slower side).
    let (mut reading, mut writing) = (Duration::ZERO, Duration::ZERO);
    let mut out = Pumped {
        read_error: None,
        write_error: None,
        raw_bytes: 0,
        cancelled: false,
    };
    loop {
        let read_at = Instant::now();
        let n = tokio::select! {
            _ = cancel.cancelled() => { out.cancelled = true; break; }
            r = reader.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => { out.read_error = Some(e); break; }
            },
        };
        let write_at = Instant::now();
        reading += write_at - read_at;
        let written = tokio::select! {
            _ = cancel.cancelled() => { out.cancelled = true; break; }
            w = sink.write_all(&buf[..n]) => w,
        };
        writing += write_at.elapsed();
        if let Err(e) = written {
            out.write_error = Some(e);
            break;
        }
        out.raw_bytes += n as u64;
        progress.raw_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    tracing::debug!(
        message = "Decoded stream copied.",
        bytes = out.raw_bytes,
        waiting_for_input_seconds = reading.as_secs_f64(),
        waiting_for_output_seconds = writing.as_secs_f64()
    );
    if out.write_error.is_none() && !out.cancelled {
        if let Err(e) = sink.flush().await {
            out.write_error = Some(e);
        }
    }
    out
}

/// Reads what is left of the object (after a decoder, the decryptor or pg_restore stopped
/// early) so the checksum covers every stored byte.
async fn drain(raw: Detachable, cancel: &CancellationToken) -> Result<(), LoadError> {
    use futures::StreamExt;
    let taken = raw.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(mut stream) = taken else {
        return Ok(());
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Err(LoadError::Cancelled),
            next = stream.next() => match next {
                None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(read_error(e)),
            },
        }
    }
}

/// Maps a read error of the decoder: a download error inside, a ciphertext that did not
/// decrypt, else corrupt compressed data.
pub fn read_error(e: std::io::Error) -> LoadError {
    if e.get_ref().is_some_and(|inner| inner.is::<DecryptFailed>()) {
        if let Some(Ok(failed)) = e.into_inner().map(|b| b.downcast::<DecryptFailed>()) {
            return LoadError::Decrypt(*failed);
        }
        return LoadError::Decrypt(DecryptFailed {
            reason: "unknown".into(),
        });
    }
    let is_store = e
        .get_ref()
        .is_some_and(|inner| inner.is::<object_store::Error>());
    if is_store {
        let msg = e.to_string();
        match e.into_inner().map(|b| b.downcast::<object_store::Error>()) {
            Some(Ok(source)) => LoadError::Download {
                key: String::new(),
                source: *source,
            },
            _ => LoadError::Decompress {
                source: std::io::Error::other(msg),
            },
        }
    } else {
        LoadError::Decompress { source: e }
    }
}

/// Checks the stored bytes against the manifest; `Ok` only when size and sha256 agree.
fn check_copy(tap: &Mutex<Tap>, object: StoredObject<'_>) -> Result<u64, LoadError> {
    let t = tap.lock().unwrap_or_else(|p| p.into_inner());
    let actual = hex::encode(t.hasher.clone().finalize());
    if t.bytes != object.stored_size {
        return Err(LoadError::Size {
            expected: object.stored_size,
            actual: t.bytes,
        });
    }
    if !actual.eq_ignore_ascii_case(object.sha256) {
        return Err(LoadError::Checksum {
            expected: object.sha256.to_string(),
            actual,
        });
    }
    Ok(t.bytes)
}

/// pg_restore's stdin pipe is widened to this. With Linux's default (64 KiB), a stream restore
/// of the 2 GB bench database switched pgferry and pg_restore out ~300 000 times and cost them
/// 3.1–3.6 CPU s (medians of four runs); at 1 MiB ~150 000 times and 2.75–2.85 s
/// (benches/RESULTS.md).
/// Unprivileged processes may go up to `/proc/sys/fs/pipe-max-size` (1 MiB by default).
const PIPE_BYTES: i32 = 1 << 20;

/// Widens the pipe to pg_restore ([`PIPE_BYTES`]); where the kernel refuses, the default stays
/// (slower, never wrong).
fn widen_pipe(stdin: &tokio::process::ChildStdin) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor `stdin` keeps open for the call; no memory is passed.
    if unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) } < 0 {
        tracing::debug!(message = "Cannot widen the pipe to pg_restore; it keeps the default size.", error = %std::io::Error::last_os_error());
    }
}

fn spawn_pg_restore(
    into: &RestoreInto<'_>,
    jobs: u32,
    file: Option<&Path>,
) -> Result<tokio::process::Child, LoadError> {
    let mut cmd = tokio::process::Command::new(&into.tool.path);
    cmd.arg("--no-owner")
        .arg(format!("--role={}", into.owner))
        // Grants name production roles that staging does not have; the owner owns everything.
        .arg("--no-privileges")
        .arg("--exit-on-error")
        .arg("--no-password")
        .arg(format!("--dbname={}", into.tmp_database));
    if jobs > 1 {
        cmd.arg(format!("--jobs={jobs}"));
    }
    if let Some(f) = file {
        cmd.arg(f);
    }
    cmd.env_clear()
        .envs(source::libpq_env(into.url, into.tmp_database))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(if file.is_some() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn().map_err(|source| {
        LoadError::Tool(source::SourceError::Spawn {
            path: into.tool.path.clone(),
            source,
        })
    })
}

/// Waits for pg_restore; kills it first when `kill` (cancellation, or a corrupt copy).
async fn finish_child(
    mut child: tokio::process::Child,
    stderr: tokio::task::JoinHandle<String>,
    kill: bool,
) -> Result<(), LoadError> {
    if kill {
        let _ = child.start_kill();
    }
    let status = child.wait().await.map_err(|e| LoadError::PgRestore {
        status: "unknown".into(),
        stderr: format!("cannot wait for pg_restore: {e}"),
    })?;
    let stderr = stderr.await.unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(LoadError::PgRestore {
            status: status.to_string(),
            stderr,
        })
    }
}

fn take_stderr(child: &mut tokio::process::Child, url: &PgUrl) -> tokio::task::JoinHandle<String> {
    let password = source::resolve_password(&url.parsed);
    match child.stderr.take() {
        Some(s) => tokio::spawn(source::read_stderr_tail(s, password)),
        None => tokio::spawn(async { String::new() }),
    }
}

/// Streams one target's copy straight into pg_restore's stdin.
pub async fn stream(
    target: &Target,
    manifest: &Manifest,
    into: &RestoreInto<'_>,
    progress: Arc<LoadProgress>,
    cancel: &CancellationToken,
) -> Result<Loaded, LoadError> {
    let Opened {
        mut decoder,
        raw,
        tap,
    } = open_dump(target, manifest, into, &progress).await?;
    let mut child = spawn_pg_restore(into, 1, None)?;
    let stderr = take_stderr(&mut child, into.url);
    let Some(mut stdin) = child.stdin.take() else {
        return Err(LoadError::PgRestore {
            status: "not started".into(),
            stderr: "pg_restore has no stdin".into(),
        });
    };
    widen_pipe(&stdin);
    let pumped = pump(&mut decoder, &mut stdin, &progress, cancel).await;
    drop(stdin); // EOF for pg_restore
    if pumped.cancelled {
        let _ = finish_child(child, stderr, true).await;
        return Err(LoadError::Cancelled);
    }
    let decode_failed = pumped.read_error.map(read_error);
    // pg_restore stopped reading (its own error) or the copy is bad: read the rest to know.
    drop(decoder);
    let drained = drain(raw, cancel).await;
    let copy = check_copy(&tap, StoredObject::dump(manifest));
    let bad_copy = decode_failed.is_some() || copy.is_err() || drained.is_err();
    let restored = finish_child(child, stderr, bad_copy).await;
    if matches!(drained, Err(LoadError::Cancelled)) {
        return Err(LoadError::Cancelled);
    }
    // A download error first (the object could not be read), then what the bytes say.
    if let Some(e @ LoadError::Download { .. }) = decode_failed {
        return Err(e);
    }
    if let Err(e @ LoadError::Download { .. }) = drained {
        return Err(e);
    }
    let stored_bytes = copy?;
    if let Some(e) = decode_failed {
        return Err(e);
    }
    drained?;
    restored?;
    Ok(Loaded {
        stored_bytes,
        raw_bytes: pumped.raw_bytes,
    })
}

/// The decoded (decrypted, decompressed) bytes of an object, for [`consume`]'s reader.
pub type Decoded = Box<dyn AsyncRead + Send + Unpin>;

/// Why [`consume`] failed: the copy (download, size, sha256, decoding) or the consumer.
#[derive(Debug)]
pub enum Consumed<E> {
    Load(LoadError),
    /// The copy was good (size and sha256 as the manifest says); what read it failed.
    Consumer(E),
}

/// Reads one target's copy of `object` through `consume`, which gets the decoded stream
/// (and should read it to its end: zstd and age check their last bytes only there). Then
/// the rest of the stored bytes is read and the copy checked: a bad copy (download, size,
/// sha256) is reported before anything the consumer says, so the caller knows whether another
/// target may do better. The consumer's read errors are the decoders' (map them with
/// [`read_error`]).
pub async fn consume<T, E, F, Fut>(
    target: &Target,
    manifest: &Manifest,
    object: StoredObject<'_>,
    identity_file: Option<&Path>,
    progress: Arc<LoadProgress>,
    cancel: &CancellationToken,
    consume: F,
) -> Result<(T, u64), Consumed<E>>
where
    F: FnOnce(Decoded) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let Opened { decoder, raw, tap } = open(target, manifest, object, identity_file, progress)
        .await
        .map_err(Consumed::Load)?;
    let consumed = consume(Box::new(decoder)).await;
    let drained = drain(raw, cancel).await;
    if let Err(e) = drained {
        return Err(Consumed::Load(e));
    }
    let stored_bytes = check_copy(&tap, object).map_err(Consumed::Load)?;
    consumed
        .map(|t| (t, stored_bytes))
        .map_err(Consumed::Consumer)
}

/// Writes to the spool, reading the archive as it passes (for [`set_data_offsets`]).
struct Indexing<W> {
    inner: W,
    archive: DumpStatsTap,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Indexing<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = written {
            this.archive.feed(&buf[..n]);
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes each data block's position into the spooled archive's TOC, as pg_dump does when it
/// writes to a file rather than a pipe: `pg_restore -j` then seeks to each table's data
/// instead of scanning the archive for it (pipe-written archives restored 6–20% slower with
/// `-j 2`, benches/RESULTS.md). An archive the parser does not fully understand is left as it
/// is: pg_restore reads it either way, only slower. pg_restore checks the dump id it finds at
/// each offset, so a wrong offset would fail the restore, never load the wrong data.
fn set_data_offsets(file: std::fs::File, archive: DumpStatsTap) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let patches = archive.data_offset_patches();
    match archive.finish() {
        Ok(_) => {
            for (at, bytes) in &patches {
                file.write_all_at(bytes, *at)?;
            }
            tracing::debug!(
                message = "Spooled archive indexed.",
                data_blocks = patches.len()
            );
        }
        Err(error) => {
            tracing::info!(message = "Spooled archive not indexed; pg_restore will scan it.", error = %error);
        }
    }
    Ok(())
}

/// Removes the spool file when dropped: on success, on error, and on cancellation. While it
/// lives it holds an exclusive `flock` on the file, which the kernel releases however the
/// process ends: a spool file nobody holds locked was left by a killed run, and the next
/// run's [`remove_left_spools`] removes it.
struct SpoolFile {
    path: PathBuf,
    _lock: std::fs::File,
}

/// The names spool files get: `pgferry-<dest hash>-<snapshot id>-<pid>.dump`.
fn is_spool_name(name: &str) -> bool {
    name.starts_with("pgferry-") && name.ends_with(".dump")
}

/// Takes `file`'s exclusive `flock` without waiting; `false` when another process holds it.
fn try_lock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this `File` owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Creates spool file `path` (mode 0600, never an existing one) and locks it.
fn create_spool(path: &Path) -> std::io::Result<(std::fs::File, SpoolFile)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(SPOOL_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let guard = SpoolFile {
        path: path.to_path_buf(),
        _lock: file.try_clone()?,
    };
    if !try_lock(&guard._lock)? {
        return Err(std::io::Error::other(
            "the new spool file is locked by another process",
        ));
    }
    Ok((file, guard))
}

/// Removes the spool files in `dir` that a killed run left: those nobody holds locked (a
/// live restore or verify holds its own). They hold a decompressed, decrypted dump.
/// Best effort: what cannot be read or removed is logged and left.
pub(crate) fn remove_left_spools(dir: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if !regular || !name.to_str().is_some_and(is_spool_name) {
            continue;
        }
        let path = entry.path();
        let left = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|f| try_lock(&f).map(|free| (f, free)));
        match left {
            Ok((_locked, true)) => match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(message = "Removed a spool file a killed restore left.", path = %path.display())
                }
                Err(error) => {
                    tracing::warn!(message = "Cannot remove a spool file a killed restore left.", path = %path.display(), error = %error)
                }
            },
            Ok((_, false)) => {}
            Err(error) => {
                tracing::warn!(message = "Cannot check a spool file left in the spool directory.", path = %path.display(), error = %error)
            }
        }
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(message = "Cannot remove the spool file.", path = %self.path.display(), error = %error);
            }
        }
    }
}

/// Bytes available to an unprivileged user on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Downloads one target's copy into a spool file (decompressed: `pg_restore -j` needs a
/// seekable archive), verifies it, then runs `pg_restore -j jobs` on it. The spool file is
/// removed whatever happens.
pub async fn spooled(
    target: &Target,
    manifest: &Manifest,
    into: &RestoreInto<'_>,
    jobs: u32,
    spool_dir: &Path,
    progress: Arc<LoadProgress>,
    cancel: &CancellationToken,
) -> Result<Loaded, LoadError> {
    let spool_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Spool { path, source }
    };
    // The spool holds a decompressed production dump: directories we create are 0700 and
    // the file 0600, whatever the umask (an existing directory is left as the operator set it).
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(SPOOL_DIR_MODE)
        .create(spool_dir)
        .await
        .map_err(spool_err(spool_dir))?;
    // Before measuring the free space: what a killed run left takes it.
    remove_left_spools(spool_dir);
    let available = free_bytes(spool_dir).map_err(spool_err(spool_dir))?;
    if available < manifest.raw_size.saturating_add(SPOOL_HEADROOM_BYTES) {
        return Err(LoadError::SpoolSpace {
            dir: spool_dir.to_path_buf(),
            needed: manifest.raw_size,
            available,
        });
    }
    let path = spool_dir.join(format!(
        "pgferry-{}-{}-{}.dump",
        super::guard::dest_hash(into.tmp_database),
        manifest.snapshot_id,
        std::process::id()
    ));
    let (file, guard) = create_spool(&path).map_err(spool_err(&path))?;
    let mut file = Indexing {
        inner: tokio::fs::File::from_std(file),
        archive: DumpStatsTap::new(),
    };
    let Opened {
        mut decoder,
        raw,
        tap,
    } = open_dump(target, manifest, into, &progress).await?;
    let pumped = pump(&mut decoder, &mut file, &progress, cancel).await;
    if pumped.cancelled {
        return Err(LoadError::Cancelled);
    }
    if let Some(e) = pumped.write_error {
        return Err(LoadError::Spool { path, source: e });
    }
    let decode_failed = pumped.read_error.map(read_error);
    drop(decoder);
    let drained = drain(raw, cancel).await;
    if let Some(e @ LoadError::Download { .. }) = decode_failed {
        return Err(e);
    }
    drained?;
    let stored_bytes = check_copy(&tap, StoredObject::dump(manifest))?;
    if let Some(e) = decode_failed {
        return Err(e);
    }
    // No fsync: the spool lives only as long as this process and pg_restore reads it back
    // from the page cache; waiting for a multi-GiB file to reach the disk would only delay
    // pg_restore. A full disk still shows at write time (tests/it/faults/spool.rs).
    file.flush().await.map_err(spool_err(&path))?;
    let Indexing {
        inner: file,
        archive,
    } = file;
    set_data_offsets(file.into_std().await, archive).map_err(spool_err(&path))?;
    let mut child = spawn_pg_restore(into, jobs, Some(&path))?;
    let stderr = take_stderr(&mut child, into.url);
    let waited = tokio::select! {
        _ = cancel.cancelled() => None,
        s = child.wait() => Some(s),
    };
    match waited {
        None => {
            let _ = finish_child(child, stderr, true).await;
            Err(LoadError::Cancelled)
        }
        Some(_) => finish_child(child, stderr, false).await,
    }?;
    drop(guard);
    Ok(Loaded {
        stored_bytes,
        raw_bytes: pumped.raw_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::manifest::tests::sample;

    fn tap_of(bytes: &[u8]) -> Mutex<Tap> {
        let mut t = Tap::default();
        t.hasher.update(bytes);
        t.bytes = bytes.len() as u64;
        Mutex::new(t)
    }

    #[test]
    fn a_spool_file_nobody_holds_is_removed_and_a_held_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let held = dir.path().join("pgferry-aaaa-20261206T160000Z-1.dump");
        let (_file, guard) = create_spool(&held).unwrap();
        // What a killed run left: the same name shape, nobody holding it.
        let left = dir.path().join("pgferry-bbbb-20261206T160000Z-2.dump");
        std::fs::write(&left, b"plaintext").unwrap();
        let other = dir.path().join("notes.dump");
        std::fs::write(&other, b"x").unwrap();
        let link = dir.path().join("pgferry-cccc-20261206T160000Z-3.dump");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        // A second spool of the same name is refused (create_new), not truncated.
        assert!(create_spool(&held).is_err());
        remove_left_spools(dir.path());
        assert!(held.exists(), "a live run's spool file was removed");
        assert!(!left.exists(), "a killed run's spool file was left");
        assert!(
            other.exists() && link.exists(),
            "only spool files are touched"
        );
        drop(guard);
        assert!(!held.exists(), "the guard removes its file");
    }

    #[test]
    fn a_copy_is_read_with_its_own_manifest_unless_it_disagrees_about_the_encryption() {
        let mut first = sample();
        first.encryption = Some(encryption::Encryption {
            algorithm: "age".into(),
            recipients: vec!["age1first".into()],
        });
        let mut rehashed = first.clone();
        rehashed.sha256 = "f".repeat(64);
        let mut plain = first.clone();
        plain.encryption = None;
        let mut rekeyed = first.clone();
        rekeyed.encryption.as_mut().unwrap().recipients = vec!["age1other".into()];
        let entry = SnapshotEntry {
            manifest: first.clone(),
            targets: ["a", "b", "c", "d"].map(String::from).to_vec(),
            verify: None,
            objects: Default::default(),
            disagreeing: [("b", rehashed.clone()), ("c", plain), ("d", rekeyed)]
                .into_iter()
                .map(|(t, m)| (t.to_string(), m))
                .collect(),
        };
        assert_eq!(manifest_for(&entry, "a").unwrap(), &first);
        assert_eq!(manifest_for(&entry, "b").unwrap(), &rehashed);
        for (target, says) in [("c", "not encrypted"), ("d", "to age1other")] {
            let e = manifest_for(&entry, target).unwrap_err();
            assert!(e.is_bad_copy(), "the next target is tried");
            let text = e.to_string();
            assert!(
                text.contains(says)
                    && text.contains("target a's says encrypted (age) to age1first"),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn the_pipe_to_pg_restore_is_widened() {
        use std::os::fd::AsRawFd;
        let mut child = tokio::process::Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let size = |s: &tokio::process::ChildStdin| unsafe {
            // SAFETY: fcntl on an open descriptor; no memory is passed.
            libc::fcntl(s.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        assert!(size(&stdin) < PIPE_BYTES, "the default is smaller");
        widen_pipe(&stdin);
        assert_eq!(size(&stdin), PIPE_BYTES);
        drop(stdin);
        child.wait().await.unwrap();
    }

    #[test]
    fn a_copy_must_match_size_and_sha256() {
        let mut m = sample();
        m.stored_size = 3;
        m.sha256 = hex::encode(Sha256::digest(b"abc"));
        let m = &m;
        let obj = StoredObject::dump(m);
        assert_eq!(check_copy(&tap_of(b"abc"), obj).unwrap(), 3);
        // Same length, other bytes: the checksum catches it.
        assert!(matches!(
            check_copy(&tap_of(b"abd"), obj),
            Err(LoadError::Checksum { .. })
        ));
        // Truncated: the size says so first.
        assert!(matches!(
            check_copy(&tap_of(b"ab"), obj),
            Err(LoadError::Size {
                expected: 3,
                actual: 2
            })
        ));
    }

    #[test]
    fn read_errors_tell_download_from_corruption() {
        let store = object_store::Error::NotFound {
            path: "k".into(),
            source: "gone".into(),
        };
        let e = read_error(std::io::Error::other(store));
        assert!(matches!(e, LoadError::Download { .. }), "{e:?}");
        assert!(e.is_bad_copy() && e.is_retryable());
        let e = read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "Unknown frame descriptor",
        ));
        assert!(matches!(e, LoadError::Decompress { .. }), "{e:?}");
        assert!(e.is_bad_copy() && !e.is_retryable());
        // A ciphertext that failed age's authentication: a bad copy, the next target is tried.
        let e = read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            DecryptFailed {
                reason: "chunk 3".into(),
            },
        ));
        assert!(matches!(e, LoadError::Decrypt(_)), "{e:?}");
        assert!(e.is_bad_copy() && !e.is_retryable());
        // No identity, or the wrong one: the same everywhere, not worth another target.
        let e = LoadError::Key(KeyError::NoIdentity {
            snapshot: "s".into(),
            recipients: vec![],
        });
        assert!(!e.is_bad_copy());
        let restore_failed = LoadError::PgRestore {
            status: "exit status: 1".into(),
            stderr: "role does not exist".into(),
        };
        assert!(!restore_failed.is_bad_copy());
    }
}
