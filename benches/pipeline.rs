//! Criterion micro-benchmarks of the backup pipeline's stages, on in-memory data (issue 7,
//! item 1). Every figure is MB/s of RAW dump bytes (what pg_dump writes), whatever the stage
//! really processes. Results and the command that produced them: `benches/RESULTS.md`.
//!
//! The input, generated once per run in memory (`synthetic_dump`): the real fixture
//! `tests/fixtures/dumpstats/pg15-pipe.dump` (a `pg_dump -Fc -Z0` archive written to a pipe),
//! with ~64 MiB of COPY rows spliced into the data blocks of two of its tables, one chunk per
//! row as pg_dump -Z0 writes them, so the archive stays valid for the stats tap:
//! - 40% of the bytes are pgbench_accounts-like rows (`aid, bid, abalance, 84-space filler`),
//! - 60% are `docs`-like rows as `benches/backup.sh` seeds them: id, 660 bytes of lorem-ipsum
//!   text, a jsonb-looking object with a random 32-hex note, and a 1 KiB bytea shown as hex,
//!   half a repeated 16-byte pattern and half random bytes.
//!
//! Groups: `zstd_direct` (the zstd crate, one thread, checksum), `zstd_pipeline`
//! (`pipeline::run` to one in-memory target: zstd with 2 workers and checksum, sha256, part
//! cutting, fan-out, multipart upload), `sha256` (alone, over the raw bytes), `stats_tap`
//! (`DumpStatsTap::feed` alone), `fanout` (`pipeline::run` at level 1 to 1/2/3 targets) and
//! `pipeline_tap` (`pipeline::run` at level 3 to 2 targets, without and with the stats tap).
//! `sealer` (issue 17) is apart: the last stage of the compressor alone, on 64 MiB of random
//! bytes (what zstd's output looks like) written in zstd's 32 KiB pieces into a reused
//! buffer: `memcpy` (the buffer alone), `plain` and `age` ([`Sealer`] without and with two
//! recipients), `age_crate` (the `age` crate's own stream writer, which `Sealer` used before), `aead` / `aead_ring` (ChaCha20-Poly1305 in place on 64 KiB chunks, by
//! the RustCrypto crate age uses and by ring: the crypto's own cost). Its MB/s are of the bytes sealed, not of raw dump bytes; run
//! it alone with `cargo bench --bench pipeline -- sealer`. `opener` is the restore's side:
//! those bytes sealed once, opened by `encryption::open` (`age`) and by the `age` crate's
//! reader (`age_crate`); `cargo bench --bench pipeline -- opener`.
//!
//! For instruction counts under valgrind, `PGFERRY_BENCH_ONCE=<stage>` runs one stage once
//! without criterion (`none` only builds the input, to subtract), and `PGFERRY_BENCH_MIB`
//! sets the input size: see `benches/RESULTS.md`.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use object_store::memory::InMemory;
use pgferry::archive::DumpStatsTap;
use pgferry::backup::pipeline::{self, PipelineSettings, RawTap, Sink, READ_CHUNK};
use pgferry::encryption::{Recipient, Sealer};
use pgferry::storage::target::{self, Target, DUMP_SUFFIX};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The archive the rows are spliced into.
const FIXTURE: &[u8] = include_bytes!("../tests/fixtures/dumpstats/pg15-pipe.dump");
/// Default size of the spliced rows: big enough that zstd's windows and the part cutting
/// behave as on a real dump, small enough that level 6 on one core takes under 2 s here.
const DEFAULT_MIB: usize = 64;
/// Input size when the benchmarks only run as tests.
const TEST_MIB: usize = 1;
/// Share of the spliced bytes that are pgbench_accounts-like rows; the rest are docs rows.
const ACCOUNTS_SHARE: f64 = 0.4;
/// The pipeline's zstd workers as the daemon runs them on this 2-core machine.
const ZSTD_WORKERS: u32 = 2;
/// Tokio workers, as the daemon's runtime has on 2 cores.
const RUNTIME_WORKERS: usize = 2;

/// splitmix64: deterministic, so every run compresses the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .take(n)
            .collect()
    }
}

/// Where the data chunk holding `row` starts: its length int (a sign byte and 4 bytes).
fn chunk_start(row: &[u8]) -> usize {
    let at = FIXTURE
        .windows(row.len())
        .position(|w| w == row)
        .expect("the fixture holds the row");
    let start = at - 5;
    let len = u32::from_le_bytes(FIXTURE[start + 1..at].try_into().unwrap()) as usize;
    assert!(FIXTURE[start] == 0 && len >= row.len(), "a chunk length");
    start
}

/// Appends one row as pg_dump -Z0 writes it: a chunk of its own.
fn push_chunk(out: &mut Vec<u8>, row: &[u8]) {
    out.push(0);
    out.extend_from_slice(&(row.len() as u32).to_le_bytes());
    out.extend_from_slice(row);
}

fn accounts_rows(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 256);
    let filler = " ".repeat(84);
    let mut aid = 1u64;
    while out.len() < bytes {
        let row = format!("{aid}\t{}\t0\t{filler}\n", aid / 100_000 + 1);
        push_chunk(&mut out, row.as_bytes());
        aid += 1;
    }
    out
}

fn docs_rows(bytes: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 4096);
    let mut g = 1u64;
    while out.len() < bytes {
        let partner = g % 977;
        let body =
            format!("Lorem ipsum dolor sit amet, invoice {g} for partner {partner}. ").repeat(12);
        let note = hex::encode(rng.bytes(16));
        let meta = format!(
            r#"{{"note": "{note}", "lines": [{g}, {}, {}], "state": "posted", "partner": {partner}}}"#,
            g * 2,
            g * 3
        );
        let pattern = Rng(g % 100).bytes(16).repeat(32);
        let blob = hex::encode([pattern, rng.bytes(512)].concat());
        // COPY text escapes the backslash of bytea's hex format.
        let row = format!("{g}\t{body}\t{meta}\t\\\\x{blob}\n");
        push_chunk(&mut out, row.as_bytes());
        g += 1;
    }
    out
}

/// The fixture with `mib` MiB of rows spliced into two tables' data blocks; see the module doc.
fn synthetic_dump(mib: usize) -> Bytes {
    let total = mib << 20;
    let accounts_bytes = (total as f64 * ACCOUNTS_SHARE) as usize;
    let accounts_at = chunk_start(b"1\trow 1\n"); // table many_rows
    let docs_at = chunk_start(b"1\tabcdefghij"); // table wide_row, later in the archive
    let mut rng = Rng(7);
    let mut out = Vec::with_capacity(FIXTURE.len() + total + (1 << 16));
    out.extend_from_slice(&FIXTURE[..accounts_at]);
    out.extend_from_slice(&accounts_rows(accounts_bytes));
    out.extend_from_slice(&FIXTURE[accounts_at..docs_at]);
    out.extend_from_slice(&docs_rows(total - accounts_bytes, &mut rng));
    out.extend_from_slice(&FIXTURE[docs_at..]);
    Bytes::from(out)
}

fn zstd_direct(input: &[u8], level: i32) -> u64 {
    let mut encoder = zstd::stream::write::Encoder::new(Counter(0), level).unwrap();
    encoder.include_checksum(true).unwrap();
    for chunk in input.chunks(READ_CHUNK) {
        encoder.write_all(chunk).unwrap();
    }
    encoder.finish().unwrap().0
}

/// Bytes sealed per `sealer` iteration.
const SEALER_MIB: usize = 64;
/// The size of the writes zstd's stream encoder makes into its writer (its output buffer).
const ZSTD_OUT_CHUNK: usize = 32 * 1024;
/// age's plaintext chunk.
const AGE_CHUNK: usize = 64 * 1024;

/// Two fresh age recipients, as `benches/backup.sh` configures.
fn age_recipients() -> Vec<age::x25519::Recipient> {
    (0..2)
        .map(|_| age::x25519::Identity::generate().to_public())
        .collect()
}

fn recipients() -> Vec<Recipient> {
    age_recipients()
        .iter()
        .map(|r| Recipient::parse(&r.to_string()).unwrap())
        .collect()
}

/// Seals `input` (written in zstd's pieces) into `out` (cleared, capacity kept).
fn seal(input: &[u8], recipients: &[Recipient], out: &mut Vec<u8>) -> usize {
    out.clear();
    let mut sealer = Sealer::new(recipients, &mut *out).unwrap();
    for piece in input.chunks(ZSTD_OUT_CHUNK) {
        sealer.write_all(piece).unwrap();
    }
    sealer.finish().unwrap();
    out.len()
}

/// The same with the `age` crate's own stream writer (what `Sealer` was until issue 17's
/// speed-up), for comparison.
fn seal_age_crate(input: &[u8], recipients: &[age::x25519::Recipient], out: &mut Vec<u8>) -> usize {
    out.clear();
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .unwrap();
    let mut writer = encryptor.wrap_output(&mut *out).unwrap();
    for piece in input.chunks(ZSTD_OUT_CHUNK) {
        writer.write_all(piece).unwrap();
    }
    writer.finish().unwrap();
    out.len()
}

/// The copy into the part buffer alone.
fn memcpy(input: &[u8], out: &mut Vec<u8>) -> usize {
    out.clear();
    for piece in input.chunks(ZSTD_OUT_CHUNK) {
        out.extend_from_slice(black_box(piece));
    }
    out.len()
}

/// ChaCha20-Poly1305 alone, in place, chunk by chunk (nonces as age's STREAM makes them).
fn aead(input: &[u8], out: &mut Vec<u8>) -> usize {
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(&[7u8; 32].into());
    out.clear();
    out.extend_from_slice(input);
    let mut tags = 0u8;
    for (i, chunk) in out.chunks_mut(AGE_CHUNK).enumerate() {
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = cipher
            .encrypt_in_place_detached(&nonce.into(), &[], chunk)
            .unwrap();
        tags ^= tag[0];
    }
    black_box(tags);
    out.len()
}

/// The same with ring's ChaCha20-Poly1305 (what `src/encryption/payload.rs` uses).
fn aead_ring(input: &[u8], out: &mut Vec<u8>) -> usize {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).unwrap());
    out.clear();
    out.extend_from_slice(input);
    let mut tags = 0u8;
    for (i, chunk) in out.chunks_mut(AGE_CHUNK).enumerate() {
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), chunk)
            .unwrap();
        tags ^= tag.as_ref()[0];
    }
    black_box(tags);
    out.len()
}

/// A writer that only counts.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sha256(input: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for chunk in input.chunks(READ_CHUNK) {
        hasher.update(chunk);
    }
    hasher.finalize().into()
}

fn stats_tap(input: &[u8]) -> DumpStatsTap {
    let mut tap = DumpStatsTap::new();
    for chunk in input.chunks(READ_CHUNK) {
        tap.feed(chunk);
    }
    tap
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .enable_all()
        .build()
        .unwrap()
}

/// One backup's pipeline: `input` to `targets` fresh in-memory stores, uploads aborted at the
/// end (completing would only add InMemory's concatenation of the parts). Returns the bytes
/// stored.
async fn run_pipeline<T: RawTap>(input: &Bytes, level: i32, targets: usize, tap: T) -> u64 {
    let settings = PipelineSettings {
        zstd_level: level,
        zstd_workers: ZSTD_WORKERS,
        parts: target::PartSizer::new(Some(input.len() as u64 / 4), 10_000),
        stall_timeout: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(600),
        memory_budget: 64 << 20,
        recipients: Vec::new(),
    };
    let sinks = (0..targets)
        .map(|i| {
            let target = Target::new(&format!("t{i}"), Arc::new(InMemory::new()), "bench", 10_000);
            Sink {
                key: target.at(&object_store::path::Path::from(format!(
                    "src/db/snap{DUMP_SUFFIX}"
                ))),
                target,
            }
        })
        .collect();
    let out = pipeline::run(
        std::io::Cursor::new(input.clone()),
        &settings,
        sinks,
        tap,
        Arc::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(out.raw_bytes, input.len() as u64);
    assert_eq!(out.uploads.len(), targets);
    for upload in out.uploads {
        upload.abort().await;
    }
    out.stored_bytes
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then criterion
/// runs each benchmark once as a smoke test, on a small input to keep the test suite quick.
fn is_bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn mib() -> usize {
    std::env::var("PGFERRY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if is_bench() { DEFAULT_MIB } else { TEST_MIB })
}

/// Checks the input once, and prints what it is: size, compression ratios, table stats.
fn describe(input: &Bytes) {
    let stats = stats_tap(input).finish().expect("a valid archive");
    let rows: u64 = stats.tables.iter().map(|t| t.rows).sum();
    eprintln!(
        "input: {} bytes ({:.1} MiB), {rows} rows in {} tables",
        input.len(),
        input.len() as f64 / 1048576.0,
        stats.tables.len()
    );
    for level in [1, 3, 6] {
        let stored = zstd_direct(input, level);
        eprintln!(
            "zstd -{level}: {stored} bytes, ratio {:.3}",
            input.len() as f64 / stored as f64
        );
    }
}

/// Short runs: each iteration pushes the whole input through, which takes from a tenth of a
/// second to a few, so 10 samples of one iteration each keep `cargo bench` within minutes.
fn configure<'a>(c: &'a mut Criterion, raw_bytes: u64, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(raw_bytes));
    g
}

fn benches(c: &mut Criterion, input: &Bytes) {
    let rt = runtime();
    let len = input.len() as u64;

    let mut g = configure(c, len, "zstd_direct");
    for level in [1, 3, 6] {
        g.bench_with_input(BenchmarkId::from_parameter(level), input, |b, i| {
            b.iter(|| zstd_direct(i, level))
        });
    }
    g.finish();

    let mut g = configure(c, len, "zstd_pipeline");
    for level in [1, 3, 6] {
        g.bench_with_input(BenchmarkId::from_parameter(level), input, |b, i| {
            b.iter(|| rt.block_on(run_pipeline(i, level, 1, ())))
        });
    }
    g.finish();

    let mut g = configure(c, len, "sha256");
    g.bench_function("raw", |b| b.iter(|| sha256(black_box(input))));
    g.finish();

    let mut g = configure(c, len, "stats_tap");
    g.bench_function("feed", |b| b.iter(|| stats_tap(black_box(input))));
    g.finish();

    let mut g = configure(c, len, "fanout");
    for targets in [1, 2, 3] {
        g.bench_with_input(BenchmarkId::from_parameter(targets), input, |b, i| {
            b.iter(|| rt.block_on(run_pipeline(i, 1, targets, ())))
        });
    }
    g.finish();

    let mut g = configure(c, len, "pipeline_tap");
    g.bench_with_input("none", input, |b, i| {
        b.iter(|| rt.block_on(run_pipeline(i, 3, 2, ())))
    });
    g.bench_with_input("stats", input, |b, i| {
        b.iter(|| rt.block_on(run_pipeline(i, 3, 2, DumpStatsTap::new())))
    });
    g.finish();
}

/// The `sealer` group (see the module doc).
fn sealer_benches(c: &mut Criterion) {
    let input = Rng(17).bytes(SEALER_MIB << 20);
    let recipients = recipients();
    let mut out = Vec::with_capacity(input.len() + input.len() / 1000 + 4096);
    let mut g = configure(c, input.len() as u64, "sealer");
    g.bench_function("memcpy", |b| b.iter(|| memcpy(&input, &mut out)));
    g.bench_function("plain", |b| b.iter(|| seal(&input, &[], &mut out)));
    g.bench_function("age", |b| b.iter(|| seal(&input, &recipients, &mut out)));
    let age_recipients = age_recipients();
    g.bench_function("age_crate", |b| {
        b.iter(|| seal_age_crate(&input, &age_recipients, &mut out))
    });
    g.bench_function("aead", |b| b.iter(|| aead(&input, &mut out)));
    g.bench_function("aead_ring", |b| b.iter(|| aead_ring(&input, &mut out)));
    g.finish();
}

/// The restore side of `sealer`: the same 64 MiB sealed once, then opened (read to the end
/// into a reused buffer) by `pgferry::encryption::open` (ring, in place) and by the `age`
/// crate's own stream reader, what restore used before.
fn opener_benches(c: &mut Criterion) {
    use age::secrecy::ExposeSecret;
    let input = Rng(17).bytes(SEALER_MIB << 20);
    let key = age::x25519::Identity::generate();
    let recipient = Recipient::parse(&key.to_public().to_string()).unwrap();
    let mut cipher = Vec::new();
    seal(&input, &[recipient], &mut cipher);
    let identities = pgferry::encryption::Identities::parse(
        std::path::Path::new("bench-key.txt"),
        key.to_string().expose_secret(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut out = Vec::with_capacity(input.len());
    let mut g = configure(c, input.len() as u64, "opener");
    g.bench_function("age", |b| {
        b.iter(|| {
            rt.block_on(async {
                use tokio::io::AsyncReadExt;
                out.clear();
                let mut r = pgferry::encryption::open(&cipher[..], &identities)
                    .await
                    .unwrap();
                r.read_to_end(&mut out).await.unwrap();
            });
            assert_eq!(out.len(), input.len());
        })
    });
    g.bench_function("age_crate", |b| {
        b.iter(|| {
            use std::io::Read;
            out.clear();
            let d = age::Decryptor::new_buffered(&cipher[..]).unwrap();
            let mut r = d
                .decrypt(std::iter::once(&key as &dyn age::Identity))
                .unwrap();
            r.read_to_end(&mut out).unwrap();
            assert_eq!(out.len(), input.len());
        })
    });
    g.finish();
}

/// Runs one stage once, for valgrind; see the module doc.
fn run_once(stage: &str, input: &Bytes) {
    let rt = runtime();
    match stage {
        "none" => {}
        "sha256" => {
            black_box(sha256(input));
        }
        "stats_tap" => {
            black_box(stats_tap(input));
        }
        s if s.starts_with("zstd_direct/") => {
            black_box(zstd_direct(input, s[12..].parse().unwrap()));
        }
        s if s.starts_with("zstd_pipeline/") => {
            black_box(rt.block_on(run_pipeline(input, s[14..].parse().unwrap(), 1, ())));
        }
        s if s.starts_with("fanout/") => {
            black_box(rt.block_on(run_pipeline(input, 1, s[7..].parse().unwrap(), ())));
        }
        "pipeline_tap/none" => {
            black_box(rt.block_on(run_pipeline(input, 3, 2, ())));
        }
        "pipeline_tap/stats" => {
            black_box(rt.block_on(run_pipeline(input, 3, 2, DumpStatsTap::new())));
        }
        s if s.starts_with("sealer/") => {
            let input = Rng(17).bytes(mib() << 20);
            let mut out = Vec::with_capacity(input.len() * 2);
            black_box(match &s[7..] {
                "memcpy" => memcpy(&input, &mut out),
                "plain" => seal(&input, &[], &mut out),
                "age" => seal(&input, &recipients(), &mut out),
                "age_crate" => seal_age_crate(&input, &age_recipients(), &mut out),
                "aead" => aead(&input, &mut out),
                "aead_ring" => aead_ring(&input, &mut out),
                other => panic!("unknown sealer {other}"),
            });
        }
        other => panic!("unknown stage {other}"),
    }
}

fn main() {
    let input = synthetic_dump(mib());
    if let Ok(stage) = std::env::var("PGFERRY_BENCH_ONCE") {
        run_once(&stage, &input);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    describe(&input);
    benches(&mut c, &input);
    sealer_benches(&mut c);
    opener_benches(&mut c);
    c.final_summary();
}
