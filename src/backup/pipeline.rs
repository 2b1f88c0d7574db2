//! The backup pipeline: one read of the dump, one compression, one hash, many uploads.
//!
//! ```text
//! reader task ──raw buffers──▶ compressor thread ──parts (Bytes)──▶ fan-out task ─┬▶ upload task (target A)
//!   (pg_dump stdout)   ▲        tap + zstd (+ age) + sha256 + part cutting         └▶ upload task (target B)
//!                      └──────── empty buffers come back (a fixed pool) ◀──────┘
//! ```
//! Every channel is bounded, so memory is bounded by configuration (pool size × read chunk +
//! channel capacities × part size), never by the database, and the slowest target paces
//! pg_dump through backpressure. A target that fails, or accepts nothing for
//! `stall_timeout`, is aborted and dropped; the others go on.
//!
//! This module never completes an upload: it hands the still-open uploads back, and the
//! caller (`backup`) decides to complete or abort them once pg_dump's exit status is known.
//! The stream ending is not success.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{MultipartUpload, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::encryption::{Recipient, Sealer};
use crate::storage::target::{PartSizer, Target};

/// Bytes read from pg_dump per buffer: big enough that the per-buffer overhead (a channel
/// hop, a zstd call) is negligible, small enough to keep the pool cheap.
pub const READ_CHUNK: usize = 1024 * 1024;

/// Raw buffers in the pool: the reader can be this far ahead of the compressor.
const RAW_BUFFERS: usize = 4;

/// Finished parts waiting between the compressor and the fan-out.
const PART_CHANNEL_CAP: usize = 1;

/// Parts queued for each target, beyond the ones being uploaded.
const TARGET_CHANNEL_CAP: usize = 1;

/// Part uploads in flight per target: two keep a link busy while the next part is sent.
pub const PARTS_IN_FLIGHT: usize = 2;

/// How long an abort of a failed upload may take before we give up on cleaning it ourselves
/// (retention removes leftovers later).
const ABORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The zstd workers when `pipeline.zstd_workers` is 0: one per core, at most this.
const MAX_AUTO_ZSTD_WORKERS: u32 = 4;

/// The input each zstd worker compresses at a time, at levels up to
/// [`SMALL_JOB_MAX_LEVEL`]. zstd's own default is four windows (8 MiB at levels 3–7), and it
/// buffers about (workers + 3) jobs of input and one of output per worker: `zstd -3 -T2` peaks
/// at 52 MiB with its default jobs and 18 MiB with `-B2MiB`, and on the benchmark dump the
/// 2 MiB jobs came out 0.2% *smaller* (benches/RESULTS.md). Level 1's default is 2 MiB already.
const ZSTD_JOB_SIZE: u32 = 2 * 1024 * 1024;

/// Above this level the window outgrows [`ZSTD_JOB_SIZE`] (4 MiB and more from level 8), and
/// zstd's own job size is kept: jobs smaller than a window would cost ratio.
const SMALL_JOB_MAX_LEVEL: i32 = 7;

/// A part's buffer starts at most this large and grows as it fills: a part sized for a huge
/// object (up to 5 GiB) must not reserve that much up front, where the kernel may refuse it.
const PART_ALLOC_CHUNK: usize = 16 * 1024 * 1024;

/// Settings of one pipeline run.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub zstd_level: i32,
    /// 0 = one per core (at most 4).
    pub zstd_workers: u32,
    /// Sizes the parts: small first, growing only as the targets' `max_parts` requires.
    pub parts: PartSizer,
    pub stall_timeout: Duration,
    /// A dump stream that sends nothing for this long fails the run (`pipeline.idle_timeout`).
    pub idle_timeout: Duration,
    /// Bytes the pipeline's buffers may hold (`pipeline.memory_budget`): the raw pool, zstd's
    /// buffers (an estimate) and every part alive — being filled, queued, or uploading on any
    /// target. As parts grow, fewer are alive at once; at least one always is.
    pub memory_budget: u64,
    /// Encrypt the compressed stream to these (age, see `crate::encryption`); empty: stored
    /// as zstd. The hash, size and parts are then those of the ciphertext.
    pub recipients: Vec<Recipient>,
}

impl PipelineSettings {
    fn workers(&self) -> u32 {
        if self.zstd_workers > 0 {
            return self.zstd_workers;
        }
        std::thread::available_parallelism()
            .map_or(1, |n| n.get() as u32)
            .min(MAX_AUTO_ZSTD_WORKERS)
    }
}

/// What looks at the raw stream as it passes (`crate::archive`'s statistics parser, or `()`).
pub use crate::archive::RawTap;

/// Live byte counters, for progress lines and metrics.
#[derive(Debug, Default)]
pub struct Progress {
    pub raw_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
}

/// Why one target's upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(
        "cannot start the multipart upload of {key}: {}",
        crate::storage::target::error_text(source)
    )]
    Start {
        key: String,
        source: object_store::Error,
    },
    #[error(
        "upload of part {part} of {key} failed: {}",
        crate::storage::target::error_text(source)
    )]
    Part {
        key: String,
        part: u64,
        source: object_store::Error,
    },
    #[error("accepted no data for {after:?} (pipeline.stall_timeout); dropped so it cannot stall the other targets")]
    Stalled { after: Duration },
    #[error(
        "completing the upload of {key} failed: {}",
        crate::storage::target::error_text(source)
    )]
    Complete {
        key: String,
        source: object_store::Error,
    },
    #[error(
        "{key}: the target holds {got} bytes, the stream had {expected}; the copy was discarded"
    )]
    SizeMismatch {
        key: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "writing the manifest {key} failed: {}; the object stays for prune to judge",
        crate::storage::target::error_text(source)
    )]
    Manifest {
        key: String,
        source: object_store::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

/// One target whose upload failed; it was aborted.
pub type TargetFailure = crate::storage::target::TargetFailure<UploadError>;

/// One target whose parts were all uploaded; the upload is still open.
pub struct OpenUpload {
    pub target: Target,
    pub key: Path,
    pub upload: Box<dyn MultipartUpload>,
    pub bytes: u64,
}

impl std::fmt::Debug for OpenUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenUpload")
            .field("target", &self.target.name)
            .field("key", &self.key)
            .finish()
    }
}

impl OpenUpload {
    /// Aborts the upload (best effort, bounded in time).
    pub async fn abort(mut self) {
        abort_quietly(&self.target.name, &self.key, &mut *self.upload).await;
    }
}

async fn abort_quietly(target: &str, key: &Path, upload: &mut dyn MultipartUpload) {
    match tokio::time::timeout(ABORT_TIMEOUT, upload.abort()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(
            message = "Could not abort a multipart upload; retention will clean it.",
            target = %target, key = %key, error = %error
        ),
        Err(_) => tracing::warn!(
            message = "Abort of a multipart upload timed out; retention will clean it.",
            target = %target, key = %key
        ),
    }
}

/// What a successful pipeline run produced.
#[derive(Debug)]
pub struct PipelineOutput<T> {
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// sha256 of the stored bytes, lowercase hex.
    pub sha256: String,
    pub parts: u64,
    pub tap: T,
    pub uploads: Vec<OpenUpload>,
    pub failures: Vec<TargetFailure>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading the dump stream failed: {0}")]
    Read(#[source] std::io::Error),
    #[error("pg_dump sent nothing for {after:?} (pipeline.idle_timeout); it was killed. Look for a blocked or stuck session on the source (pg_stat_activity)")]
    Idle { after: Duration },
    #[error("compression failed: {0}")]
    Compress(#[source] std::io::Error),
    #[error("every target failed: {}", describe(.0))]
    NoTargetLeft(Vec<TargetFailure>),
    #[error("cancelled")]
    Cancelled,
    #[error("internal error: a pipeline task panicked: {0}")]
    Panicked(String),
}

fn describe(failures: &[TargetFailure]) -> String {
    crate::storage::target::describe_failures(failures)
}

/// One destination of the stream.
#[derive(Debug, Clone)]
pub struct Sink {
    pub target: Target,
    pub key: Path,
}

/// Runs the pipeline over `reader` until it ends, fails, or `cancel` fires. On error every
/// upload has been aborted. On success the uploads are open; see the module doc.
pub async fn run<R, T>(
    reader: R,
    settings: &PipelineSettings,
    sinks: Vec<Sink>,
    tap: T,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<PipelineOutput<T>, PipelineError>
where
    R: AsyncRead + Unpin + Send + 'static,
    T: RawTap,
{
    let (full_tx, full_rx) = mpsc::channel::<Vec<u8>>(RAW_BUFFERS);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>(RAW_BUFFERS);
    for _ in 0..RAW_BUFFERS {
        free_tx
            .try_send(Vec::with_capacity(READ_CHUNK))
            .expect("the pool channel holds every buffer");
    }
    let (part_tx, part_rx) = mpsc::channel::<Bytes>(PART_CHANNEL_CAP);
    let budget = Arc::new(PartBudget::new(parts_budget(settings)));

    // Per-target upload tasks.
    let uploads_cancel = cancel.child_token();
    let mut senders = Vec::new();
    let mut upload_tasks = Vec::new();
    for sink in sinks {
        let (tx, rx) = mpsc::channel::<Bytes>(TARGET_CHANNEL_CAP);
        let token = uploads_cancel.child_token();
        senders.push(TargetSender {
            name: sink.target.name.clone(),
            tx: Some(tx),
            token: token.clone(),
            stalled: false,
        });
        let span = tracing::info_span!("upload", target = %sink.target.name);
        upload_tasks.push(tokio::spawn(
            upload_target(sink, rx, token, settings.stall_timeout).instrument(span),
        ));
    }

    let reader_task = tokio::spawn(
        read_stream(
            reader,
            full_tx,
            free_rx,
            settings.idle_timeout,
            cancel.clone(),
        )
        .in_current_span(),
    );
    let compressor = {
        let settings = settings.clone();
        let progress = progress.clone();
        let cancel = cancel.clone();
        tokio::task::spawn_blocking(move || {
            let out = PartsOut {
                tx: part_tx,
                budget,
            };
            compress(&settings, full_rx, free_tx, out, tap, &progress, &cancel)
        })
    };
    let fanout_task =
        tokio::spawn(fan_out(part_rx, senders, settings.stall_timeout).in_current_span());

    let read_result = reader_task.await;
    let compress_result = compressor.await;
    let fanout_result = fanout_task.await;
    let mut uploads = Vec::new();
    let mut failures = Vec::new();
    let mut panicked = None;
    for task in upload_tasks {
        match task.await {
            Ok(Ok(u)) => uploads.push(u),
            Ok(Err(f)) => failures.push(f),
            Err(e) => panicked = Some(e.to_string()),
        }
    }
    let stalled = match fanout_result {
        Ok(stalled) => stalled,
        Err(e) => {
            panicked = Some(e.to_string());
            Vec::new()
        }
    };
    for failure in &mut failures {
        if stalled.contains(&failure.target) {
            failure.error = UploadError::Stalled {
                after: settings.stall_timeout,
            };
        }
    }

    // Decide the outcome; the root cause wins over its downstream echoes.
    let outcome = (|| {
        if let Some(p) = panicked {
            return Err(PipelineError::Panicked(p));
        }
        if cancel.is_cancelled() {
            return Err(PipelineError::Cancelled);
        }
        let read = read_result.map_err(|e| PipelineError::Panicked(e.to_string()))?;
        let compressed = compress_result.map_err(|e| PipelineError::Panicked(e.to_string()))?;
        if uploads.is_empty() {
            return Err(PipelineError::NoTargetLeft(std::mem::take(&mut failures)));
        }
        read.map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                PipelineError::Idle {
                    after: settings.idle_timeout,
                }
            } else {
                PipelineError::Read(e)
            }
        })?;
        let c = compressed.map_err(PipelineError::Compress)?;
        Ok(c)
    })();
    match outcome {
        Ok(c) => Ok(PipelineOutput {
            raw_bytes: c.raw_bytes,
            stored_bytes: c.stored_bytes,
            sha256: c.sha256,
            parts: c.parts,
            tap: c.tap,
            uploads,
            failures,
        }),
        Err(e) => {
            for u in uploads {
                u.abort().await;
            }
            Err(e)
        }
    }
}

/// What a backup's buffers take besides the pool, zstd and the parts: the HTTP connections'
/// buffers and the allocator's slack. Measured (tests/it/faults/target.rs, debug build): a
/// 96 MiB backup peaked 28–34 MiB above a tiny one plus the parts alive, the most under load;
/// the pool and zstd account for 18 of it, this for the rest with some margin.
const OTHER_BUFFERS: u64 = 20 << 20;

/// The bytes of parts that may be alive at once: the budget less the raw buffer pool, zstd's
/// own buffers and the rest. One part is always allowed: see [`PartBudget::reserve`].
fn parts_budget(settings: &PipelineSettings) -> u64 {
    let pool = (RAW_BUFFERS * READ_CHUNK) as u64;
    settings
        .memory_budget
        .saturating_sub(pool)
        .saturating_sub(zstd_buffers(settings.zstd_level, settings.workers()))
        .saturating_sub(OTHER_BUFFERS)
}

/// An estimate of zstd's buffers: with workers, about (workers + 3) jobs of input and one of
/// output per worker (measured, see [`ZSTD_JOB_SIZE`]); alone, a window and a block or two.
fn zstd_buffers(level: i32, workers: u32) -> u64 {
    let job = if level <= SMALL_JOB_MAX_LEVEL {
        u64::from(ZSTD_JOB_SIZE)
    } else {
        // Four windows of 8 MiB (levels 8–19); more above, where pgferry's docs warn already.
        32 << 20
    };
    if workers > 1 {
        (2 * u64::from(workers) + 3) * job
    } else {
        job
    }
}

/// Permits, in KiB, for the bytes of parts alive at once. The compressor reserves a part's
/// size before it fills it; the permit travels inside the part's [`Bytes`] and is released
/// when its last clone is dropped, i.e. when every target is done with it.
struct PartBudget {
    permits: Arc<Semaphore>,
    total_kib: u32,
}

impl PartBudget {
    fn new(bytes: u64) -> PartBudget {
        let total_kib = (bytes / 1024).clamp(1, u64::from(u32::MAX) / 2) as u32;
        PartBudget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Blocks the calling (compressor) thread until a part of `bytes` fits in the budget. A
    /// part larger than the whole budget takes all of it: it waits until no other part is
    /// alive, so the budget is exceeded only by that one part.
    fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let kib = (bytes as u64)
            .div_ceil(1024)
            .clamp(1, u64::from(self.total_kib)) as u32;
        futures::executor::block_on(self.permits.clone().acquire_many_owned(kib))
            .expect("the part budget's semaphore is never closed")
    }
}

/// Where the compressor's parts go, and the budget they are cut within.
struct PartsOut {
    tx: mpsc::Sender<Bytes>,
    budget: Arc<PartBudget>,
}

/// A finished part and the budget it holds; dropped with the last clone of its [`Bytes`].
struct BudgetedPart {
    bytes: BytesMut,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for BudgetedPart {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads `reader` to EOF into pooled buffers. Ok only at EOF; cancellation is an error, and
/// so is a reader that sends nothing for `idle_timeout` (kind `TimedOut`). Only the wait for
/// the reader counts: waiting for a free buffer is our own backpressure.
async fn read_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    full_tx: mpsc::Sender<Vec<u8>>,
    mut free_rx: mpsc::Receiver<Vec<u8>>,
    idle_timeout: Duration,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let closed = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "pipeline closed");
    loop {
        let mut buf = tokio::select! {
            _ = cancel.cancelled() => return Err(std::io::Error::other("cancelled")),
            b = free_rx.recv() => b.ok_or_else(closed)?,
        };
        buf.clear();
        let mut eof = false;
        while buf.len() < READ_CHUNK {
            // `read_buf` on a Vec fills its spare capacity: no zeroing, and no reallocation
            // because the loop stops once the buffer holds READ_CHUNK bytes.
            let n = tokio::select! {
                _ = cancel.cancelled() => return Err(std::io::Error::other("cancelled")),
                _ = tokio::time::sleep(idle_timeout) => return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the dump stream sent nothing for {idle_timeout:?}"),
                )),
                n = reader.read_buf(&mut buf) => n?,
            };
            if n == 0 {
                eof = true;
                break;
            }
        }
        if !buf.is_empty() {
            full_tx.send(buf).await.map_err(|_| closed())?;
        }
        if eof {
            return Ok(());
        }
    }
}

struct Compressed<T> {
    raw_bytes: u64,
    stored_bytes: u64,
    sha256: String,
    parts: u64,
    tap: T,
}

/// The compressor thread: tap, zstd, encryption when configured ([`Sealer`]: age's 64 KiB
/// chunks, so memory stays flat), and (through [`PartWriter`]) hashing and part cutting.
fn compress<T: RawTap>(
    settings: &PipelineSettings,
    mut full_rx: mpsc::Receiver<Vec<u8>>,
    free_tx: mpsc::Sender<Vec<u8>>,
    out: PartsOut,
    mut tap: T,
    progress: &Progress,
    cancel: &CancellationToken,
) -> std::io::Result<Compressed<T>> {
    let mut sizer = settings.parts.clone();
    let part_size = sizer.next_size() as usize;
    let writer = PartWriter {
        part_size,
        sizer,
        permit: Some(out.budget.reserve(part_size)),
        budget: out.budget,
        current: BytesMut::with_capacity(part_size.min(PART_ALLOC_CHUNK)),
        hasher: Sha256::new(),
        stored_bytes: 0,
        parts: 0,
        part_tx: out.tx,
        progress,
    };
    let sealer = Sealer::new(&settings.recipients, writer)?;
    let mut encoder = zstd::stream::write::Encoder::new(sealer, settings.zstd_level)?;
    encoder.include_checksum(true)?;
    let workers = settings.workers();
    if workers > 1 {
        encoder.multithread(workers)?;
        if settings.zstd_level <= SMALL_JOB_MAX_LEVEL {
            encoder.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))?;
        }
    }
    let mut raw_bytes = 0u64;
    while let Some(buf) = full_rx.blocking_recv() {
        tap.feed(&buf);
        encoder.write_all(&buf)?;
        raw_bytes += buf.len() as u64;
        progress
            .raw_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        // The reader may have stopped (EOF or error); then the buffer is simply dropped.
        let _ = free_tx.try_send(buf);
        // Cancelled: stop at once rather than compress what is buffered (at high levels that
        // takes far longer than a shutdown grace period); nothing will be committed anyway.
        if cancel.is_cancelled() {
            return Err(std::io::Error::other("cancelled"));
        }
    }
    if cancel.is_cancelled() {
        return Err(std::io::Error::other("cancelled"));
    }
    let mut writer = encoder.finish()?.finish()?;
    writer.send_current(false)?;
    Ok(Compressed {
        raw_bytes,
        stored_bytes: writer.stored_bytes,
        sha256: hex::encode(writer.hasher.finalize()),
        parts: writer.parts,
        tap,
    })
}

/// Receives zstd's output: hashes it, counts it, and cuts it into parts of `part_size`.
struct PartWriter<'a> {
    /// The size of the part being filled.
    part_size: usize,
    sizer: PartSizer,
    /// What the part being filled holds of the budget (reserved before it is filled).
    permit: Option<OwnedSemaphorePermit>,
    budget: Arc<PartBudget>,
    current: BytesMut,
    hasher: Sha256,
    stored_bytes: u64,
    parts: u64,
    part_tx: mpsc::Sender<Bytes>,
    progress: &'a Progress,
}

impl PartWriter<'_> {
    /// Hands the filled part to the fan-out; `more`: reserve room for the next one.
    fn send_current(&mut self, more: bool) -> std::io::Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        self.sizer.advance(self.current.len() as u64);
        self.part_size = self.sizer.next_size() as usize;
        let part = BudgetedPart {
            bytes: std::mem::take(&mut self.current),
            _permit: self.permit.take().expect("a filled part holds its permit"),
        };
        self.parts += 1;
        let sent = self.part_tx.blocking_send(Bytes::from_owner(part));
        // The next part's room is reserved only once this one is handed over: the budget
        // then holds this one until the targets are done with it.
        if sent.is_ok() && more {
            self.permit = Some(self.budget.reserve(self.part_size));
            self.current = BytesMut::with_capacity(self.part_size.min(PART_ALLOC_CHUNK));
        }
        sent.map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "no target is left"))
    }
}

impl Write for PartWriter<'_> {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len();
        self.hasher.update(buf);
        self.stored_bytes += n as u64;
        self.progress
            .stored_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        while !buf.is_empty() {
            let room = self.part_size - self.current.len();
            let take = room.min(buf.len());
            self.current.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.current.len() == self.part_size {
                self.send_current(true)?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct TargetSender {
    name: String,
    tx: Option<mpsc::Sender<Bytes>>,
    token: CancellationToken,
    stalled: bool,
}

/// Sends every part to every live target; returns the names of targets dropped for stalling.
async fn fan_out(
    mut part_rx: mpsc::Receiver<Bytes>,
    mut targets: Vec<TargetSender>,
    stall_timeout: Duration,
) -> Vec<String> {
    while let Some(part) = part_rx.recv().await {
        for t in targets.iter_mut() {
            let Some(tx) = &t.tx else { continue };
            // A clone of `Bytes` is a reference count, not a copy.
            match tokio::time::timeout(stall_timeout, tx.send(part.clone())).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => t.tx = None, // the upload task failed and said why
                Err(_) => {
                    tracing::warn!(message = "Target stalled; dropping it.", target = %t.name, after = ?stall_timeout);
                    t.stalled = true;
                    t.tx = None;
                    t.token.cancel();
                }
            }
        }
        if targets.iter().all(|t| t.tx.is_none()) {
            break; // dropping part_rx stops the compressor
        }
    }
    targets
        .into_iter()
        .filter(|t| t.stalled)
        .map(|t| t.name)
        .collect()
}

/// Uploads the parts it receives as one multipart upload; on any failure aborts it.
///
/// A target that accepts nothing for `stall_timeout` fails as stalled: the multipart start
/// not answered, or parts in flight and none finished. The fan-out's timeout alone would not
/// see it once every part is handed over (a dump of one part, or the last parts).
async fn upload_target(
    sink: Sink,
    mut rx: mpsc::Receiver<Bytes>,
    cancel: CancellationToken,
    stall_timeout: Duration,
) -> Result<OpenUpload, TargetFailure> {
    let Sink { target, key } = sink;
    let fail = |error| TargetFailure {
        target: target.name.clone(),
        error,
    };
    let stalled = || {
        tracing::warn!(message = "Target stalled; dropping it.", target = %target.name, after = ?stall_timeout);
        UploadError::Stalled {
            after: stall_timeout,
        }
    };
    // Dropping a start that never got an answer leaves at most an empty multipart upload:
    // prune aborts it once its marker is old; if the marker was not written yet, only the
    // bucket's lifecycle rule can (docs/reliability.md, known gaps).
    let mut upload = tokio::select! {
        _ = cancel.cancelled() => return Err(fail(UploadError::Cancelled)),
        _ = tokio::time::sleep(stall_timeout) => return Err(fail(stalled())),
        u = crate::storage::upload::start(&target, &key) => u.map_err(|source| fail(UploadError::Start { key: key.to_string(), source }))?,
    };
    let mut in_flight = FuturesUnordered::new();
    // When the parts in flight must have made progress by (one finished).
    let mut stall_deadline = tokio::time::Instant::now() + stall_timeout;
    let mut sent = 0u64;
    let mut bytes = 0u64;
    let mut closed = false;
    let result: Result<(), UploadError> = loop {
        if closed && in_flight.is_empty() {
            break Ok(());
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Err(UploadError::Cancelled),
            Some((part, res)) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(source) = res {
                    break Err(UploadError::Part { key: key.to_string(), part, source });
                }
                stall_deadline = tokio::time::Instant::now() + stall_timeout;
            }
            _ = tokio::time::sleep_until(stall_deadline), if !in_flight.is_empty() => break Err(stalled()),
            part = rx.recv(), if !closed && in_flight.len() < PARTS_IN_FLIGHT => match part {
                Some(p) => {
                    if in_flight.is_empty() {
                        stall_deadline = tokio::time::Instant::now() + stall_timeout;
                    }
                    sent += 1;
                    bytes += p.len() as u64;
                    let fut = upload.put_part(PutPayload::from_bytes(p));
                    let n = sent;
                    in_flight.push(async move { (n, fut.await) });
                }
                None => closed = true,
            }
        }
    };
    match result {
        Ok(()) => Ok(OpenUpload {
            target,
            key,
            upload,
            bytes,
        }),
        Err(error) => {
            drop(rx); // the fan-out sees the closed channel and stops sending here
            drop(in_flight);
            if !matches!(error, UploadError::Cancelled) {
                tracing::warn!(message = "Upload failed; target dropped from this snapshot.", target = %target.name, error = %error);
            }
            abort_quietly(&target.name, &key, &mut *upload).await;
            Err(fail(error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStore;

    fn settings(part_size: usize) -> PipelineSettings {
        PipelineSettings {
            zstd_level: 3,
            zstd_workers: 2,
            parts: PartSizer::with_first(part_size as u64, 10_000),
            stall_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            memory_budget: 64 << 20,
            recipients: Vec::new(),
        }
    }

    fn data(len: usize) -> Vec<u8> {
        // Compressible but not trivially: a counter in text.
        let mut v = Vec::with_capacity(len);
        let mut i = 0u64;
        while v.len() < len {
            v.extend_from_slice(format!("row {i}\t{}\n", i * 7919 % 104_729).as_bytes());
            i += 1;
        }
        v.truncate(len);
        v
    }

    /// Completes `out`'s uploads and returns what each of `stores` then holds at `key`, each
    /// checked to be what the pipeline stored (its size and sha256).
    async fn completed<T>(
        out: PipelineOutput<T>,
        stores: &[Arc<InMemory>],
        key: &str,
    ) -> Vec<Bytes> {
        for mut u in out.uploads {
            u.upload.complete().await.unwrap();
        }
        let mut held = Vec::new();
        for s in stores {
            let stored = crate::test_support::read(&**s, &Path::from(key)).await;
            assert_eq!(stored.len() as u64, out.stored_bytes);
            assert_eq!(hex::encode(Sha256::digest(&stored)), out.sha256);
            held.push(stored);
        }
        held
    }

    struct CountLines(u64);
    impl RawTap for CountLines {
        fn feed(&mut self, b: &[u8]) {
            self.0 += b.iter().filter(|&&c| c == b'\n').count() as u64;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_stream_fails_after_idle_timeout() {
        // The writer half stays open and sends nothing: a stopped pg_dump.
        let (_writer, reader) = tokio::io::duplex(1024);
        let store = Arc::new(InMemory::new());
        let target = Target::new("t", store, "p", 10_000);
        let sinks = vec![Sink {
            key: target.key("src", "db", "id", crate::storage::target::DUMP_SUFFIX),
            target,
        }];
        let mut s = settings(5 << 20);
        s.idle_timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let r = run(
            reader,
            &s,
            sinks,
            (),
            Arc::new(Progress::default()),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(r, Err(PipelineError::Idle { .. })), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn the_budget_leaves_parts_what_the_pool_and_zstd_do_not_take() {
        let mut s = settings(1);
        s.zstd_level = 1;
        s.zstd_workers = 2;
        s.memory_budget = 64 << 20;
        // 64 MiB less the 4 MiB pool, (2 × 2 + 3) zstd jobs of 2 MiB, and 20 MiB of the rest.
        assert_eq!(parts_budget(&s), 26 << 20);
        s.memory_budget = 1;
        assert_eq!(parts_budget(&s), 0);
    }

    /// A part larger than the whole budget still goes through, alone; parts that fit are
    /// held back until the targets release the ones before.
    #[test]
    fn the_part_budget_holds_parts_until_released() {
        let budget = PartBudget::new(3 << 20);
        let a = budget.reserve(2 << 20);
        assert_eq!(budget.permits.available_permits(), 1024);
        let part = Bytes::from_owner(BudgetedPart {
            bytes: BytesMut::from(&b"x"[..]),
            _permit: a,
        });
        let clone = part.clone();
        drop(part);
        assert_eq!(
            budget.permits.available_permits(),
            1024,
            "a clone still holds it"
        );
        drop(clone);
        assert_eq!(budget.permits.available_permits(), 3072);
        let whole = budget.reserve(10 << 20);
        assert_eq!(budget.permits.available_permits(), 0);
        drop(whole);
        assert_eq!(budget.permits.available_permits(), 3072);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fans_out_identical_objects_with_matching_hash() {
        let input = data(12 * 1024 * 1024 + 17);
        let stores: Vec<Arc<InMemory>> = (0..3).map(|_| Arc::new(InMemory::new())).collect();
        let sinks = stores
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let target = Target::new(&format!("t{i}"), s.clone(), "p", 10_000);
                Sink {
                    key: target.key("src", "db", "id", crate::storage::target::DUMP_SUFFIX),
                    target,
                }
            })
            .collect();
        let out = run(
            std::io::Cursor::new(input.clone()),
            &settings(5 * 1024 * 1024),
            sinks,
            CountLines(0),
            Arc::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.raw_bytes, input.len() as u64);
        assert_eq!(
            out.tap.0,
            input.iter().filter(|&&c| c == b'\n').count() as u64
        );
        assert_eq!(out.uploads.len(), 3);
        assert!(out.failures.is_empty());
        for stored in completed(out, &stores, "p/src/db/id.dump.zst").await {
            assert_eq!(zstd::decode_all(&stored[..]).unwrap(), input);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn encrypts_once_and_fans_out_the_same_ciphertext() {
        let input = data(6 * 1024 * 1024 + 5);
        let key = age::x25519::Identity::generate();
        let recipient = crate::encryption::Recipient::parse(&key.to_public().to_string()).unwrap();
        let stores: Vec<Arc<InMemory>> = (0..2).map(|_| Arc::new(InMemory::new())).collect();
        let sinks = stores
            .iter()
            .enumerate()
            .map(|(i, s)| Sink {
                key: Path::from("p/x.dump.zst.age"),
                target: Target::new(&format!("t{i}"), s.clone(), "p", 10_000),
            })
            .collect();
        let mut settings = settings(5 * 1024 * 1024);
        settings.recipients = vec![recipient];
        let out = run(
            std::io::Cursor::new(input.clone()),
            &settings,
            sinks,
            (),
            Arc::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(out.parts, 1, "6 MiB of text compresses into one part");
        for stored in completed(out, &stores, "p/x.dump.zst.age").await {
            assert!(stored.starts_with(b"age-encryption.org/v1\n"));
            let decryptor = age::Decryptor::new(&stored[..]).unwrap();
            let plain = decryptor
                .decrypt(std::iter::once(&key as &dyn age::Identity))
                .unwrap();
            assert_eq!(zstd::decode_all(plain).unwrap(), input);
        }
    }

    #[tokio::test]
    async fn a_failed_reader_is_an_error_and_aborts_uploads() {
        struct Failing(usize);
        impl AsyncRead for Failing {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                if self.0 == 0 {
                    return std::task::Poll::Ready(Err(std::io::Error::other("boom")));
                }
                self.0 -= 1;
                buf.put_slice(&[b'x'; 1000]);
                std::task::Poll::Ready(Ok(()))
            }
        }
        let store = Arc::new(InMemory::new());
        let target = Target::new("t", store.clone(), "", 10_000);
        let sink = Sink {
            key: target.key("s", "d", "i", ".dump.zst"),
            target,
        };
        let err = run(
            Failing(100),
            &settings(5 << 20),
            vec![sink],
            (),
            Arc::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PipelineError::Read(_)), "{err}");
        let listed: Vec<_> = store.list(None).collect().await;
        assert!(listed.is_empty());
    }
}
