//! Tests of the custom-format parser: fixtures from real pg_dump runs, hand-built archives,
//! every chunking of the stream, and the fuzz corpus.
use super::*;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/dumpstats/",
            $name
        ))
    };
}

/// Real archives of one database, one per archive version (see the fixtures' README.md).
const REAL: [(&str, &[u8]); 3] = [
    ("pg15-pipe.dump", fixture!("pg15-pipe.dump")),
    ("pg16-pipe.dump", fixture!("pg16-pipe.dump")),
    ("pg18-pipe.dump", fixture!("pg18-pipe.dump")),
];
const EXPECTED: &[u8] = fixture!("expected.json");

#[derive(Deserialize)]
struct Expected {
    tables: Vec<TableStats>,
    large_objects: u64,
    large_object_bytes: u64,
    archives: HashMap<String, ExpectedArchive>,
}

#[derive(Deserialize)]
struct ExpectedArchive {
    archive_version: String,
    server_version: String,
    pg_dump_version: String,
}

fn read_in_pieces(data: &[u8], piece: usize) -> Result<DumpStats, StatsError> {
    let mut tap = DumpStatsTap::new();
    for piece in data.chunks(piece.max(1)) {
        tap.feed(piece);
    }
    tap.finish()
}

fn read(data: &[u8]) -> Result<DumpStats, StatsError> {
    read_in_pieces(data, data.len())
}

#[test]
fn offset_patches_point_at_each_data_block_and_keep_the_archive_valid() {
    for (name, data) in REAL {
        let mut tap = DumpStatsTap::new();
        // Odd pieces, so fields straddle feeds.
        for piece in data.chunks(7) {
            tap.feed(piece);
        }
        let patches = tap.data_offset_patches();
        let data_entries = tap.entries.len();
        let (int_size, off_size) = (tap.int_size, tap.off_size);
        let stats = tap.finish().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            patches.len(),
            data_entries,
            "{name}: one patch per data block"
        );
        let mut patched = data.to_vec();
        for (at, bytes) in &patches {
            let at = *at as usize;
            assert_eq!(bytes.len(), 1 + off_size);
            assert_eq!(data[at], OFFSET_POS_NOT_SET, "{name}: patch at {at}");
            patched[at..at + bytes.len()].copy_from_slice(bytes);
            // The position written is a block header: a type byte, then a positive dump id.
            let mut pos = [0u8; 8];
            pos.copy_from_slice(&bytes[1..9]);
            let block = u64::from_le_bytes(pos) as usize;
            assert!([BLK_DATA, BLK_BLOBS].contains(&data[block]), "{name}");
            assert_eq!(data[block + 1], 0, "{name}: dump id sign");
            assert!(data[block + 2..block + 2 + int_size]
                .iter()
                .any(|b| *b != 0));
        }
        // Each entry points at a block of its own.
        let mut blocks: Vec<&[u8]> = patches.iter().map(|(_, b)| &b[1..]).collect();
        blocks.sort_unstable();
        blocks.dedup();
        assert_eq!(blocks.len(), patches.len(), "{name}");
        // The patched archive reads the same, and needs no patch any more.
        let mut again = DumpStatsTap::new();
        again.feed(&patched);
        assert!(again.data_offset_patches().is_empty(), "{name}");
        assert_eq!(again.finish().unwrap(), stats, "{name}");
    }
}

#[test]
fn real_archives_match_the_server_counts() {
    let expected: Expected = serde_json::from_slice(EXPECTED).expect("expected.json parses");
    for (name, data) in REAL {
        let stats = read(data).unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(stats.tables, expected.tables, "{name}");
        assert_eq!(stats.large_objects, expected.large_objects, "{name}");
        assert_eq!(
            stats.large_object_bytes, expected.large_object_bytes,
            "{name}"
        );
        let archive = &expected.archives[name];
        assert_eq!(stats.archive_version, archive.archive_version, "{name}");
        assert_eq!(stats.server_version, archive.server_version, "{name}");
        assert_eq!(stats.pg_dump_version, archive.pg_dump_version, "{name}");
    }
}

#[test]
fn piece_sizes_do_not_change_the_result() {
    for (name, data) in REAL {
        let whole = read(data).expect("whole archive reads");
        for piece in [1, 2, 3, 5, 7, 64, 4096, 65536] {
            let stats = read_in_pieces(data, piece).expect("archive reads in pieces");
            assert_eq!(stats, whole, "{name} in pieces of {piece} bytes");
        }
        // Uneven pieces, with empty feeds between them.
        let mut tap = DumpStatsTap::new();
        let (mut rest, mut size) = (data, 1);
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(size.min(rest.len()));
            tap.feed(piece);
            tap.feed(&[]);
            rest = tail;
            size = size % 13 + 1;
        }
        assert_eq!(
            tap.finish().expect("uneven pieces"),
            whole,
            "{name} unevenly"
        );
    }
}

#[test]
fn every_proper_prefix_is_truncated() {
    for (name, data) in REAL {
        let mut tap = DumpStatsTap::new();
        for cut in 0..data.len() {
            match tap.clone().finish() {
                Err(StatsError::Truncated { at_offset, .. }) => {
                    assert_eq!(at_offset, cut as u64, "{name} cut at {cut}");
                }
                other => panic!("{name} cut at {cut}: {other:?}"),
            }
            tap.feed(&data[cut..cut + 1]);
        }
        tap.finish().expect("the whole archive reads");
    }
}

#[test]
fn corrupted_archives_never_panic() {
    // xorshift64: deterministic, no dependency.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..400 {
        let (_, original) = REAL[round % REAL.len()];
        let mut data = original.to_vec();
        for _ in 0..1 + next() % 3 {
            let at = (next() % data.len() as u64) as usize;
            data[at] = next() as u8;
        }
        if round % 5 == 0 {
            data.truncate((next() % data.len() as u64) as usize);
        }
        // Either result is fine; reaching it without a panic is the test.
        let _ = read_in_pieces(&data, 1 + (next() % 5000) as usize);
    }
    let mut noise = b"PGDMP\x01\x0e\x00\x04\x08\x01".to_vec();
    noise.extend((0..100_000).map(|_| next() as u8));
    let _ = read_in_pieces(&noise, 777);
}

#[test]
fn compressed_archives_are_refused_at_the_header() {
    for data in [
        &fixture!("pg15-gzip-head.dump")[..],
        &fixture!("pg16-gzip-head.dump")[..],
    ] {
        match read(data) {
            Err(StatsError::Compressed { algorithm }) => assert!(algorithm.starts_with("gzip")),
            other => panic!("{other:?}"),
        }
    }
}

/// Writes archives as pg_dump does (`WriteHead`, `WriteToc`, `_StartData`, `_StartLOs`),
/// for the cases real dumps do not show.
struct Writer {
    out: Vec<u8>,
    int_size: usize,
}

struct Entry {
    id: i64,
    desc: &'static str,
    schema: &'static str,
    tag: &'static str,
    copy: Option<&'static str>,
    dumper: bool,
}

fn table(id: i64, schema: &'static str, tag: &'static str) -> Entry {
    Entry {
        id,
        desc: "TABLE DATA",
        schema,
        tag,
        copy: Some("COPY t (a) FROM stdin;\n"),
        dumper: true,
    }
}

fn blobs(id: i64) -> Entry {
    Entry {
        id,
        desc: "BLOBS",
        schema: "",
        tag: "BLOBS",
        copy: None,
        dumper: true,
    }
}

fn schema_only(id: i64) -> Entry {
    Entry {
        id,
        desc: "SCHEMA",
        schema: "",
        tag: "s",
        copy: None,
        dumper: false,
    }
}

impl Writer {
    fn int(&mut self, value: i64) -> &mut Self {
        self.out.push(u8::from(value < 0));
        let magnitude = value.unsigned_abs();
        for i in 0..self.int_size {
            self.out.push((magnitude >> (8 * i)) as u8);
        }
        self
    }

    fn str(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            None => self.int(-1),
            Some(s) => {
                self.int(s.len() as i64);
                self.out.extend_from_slice(s.as_bytes());
                self
            }
        }
    }

    /// Header and table of contents; `offset_flag` 2 is what a seekable file gets.
    fn archive(minor: u8, int_size: u8, entries: &[Entry], offset_flag: u8) -> Writer {
        let mut w = Writer {
            out: b"PGDMP".to_vec(),
            int_size: usize::from(int_size),
        };
        w.out
            .extend_from_slice(&[1, minor, 0, int_size, 8, FORMAT_CUSTOM]);
        if minor >= 15 {
            w.out.push(0);
        } else {
            w.int(0);
        }
        for part in [30, 59, 23, 31, 11, 126, 0] {
            w.int(part);
        }
        w.str(Some("db"))
            .str(Some("15.18"))
            .str(Some("17.2"))
            .int(entries.len() as i64);
        for e in entries {
            w.int(e.id)
                .int(i64::from(e.dumper))
                .str(Some("0"))
                .str(Some("0"));
            w.str(Some(e.tag))
                .str(Some(e.desc))
                .int(3)
                .str(Some(""))
                .str(Some(""));
            w.str(e.copy)
                .str(Some(e.schema))
                .str(Some(""))
                .str(Some("heap"));
            if minor >= 16 {
                w.int(i64::from(b'r'));
            }
            w.str(Some("postgres"))
                .str(Some("false"))
                .str(Some("1"))
                .str(None);
            w.out.push(if e.dumper { offset_flag } else { 3 });
            w.out.extend_from_slice(&[0; 8]);
        }
        w
    }

    fn table_block(&mut self, id: i64, chunks: &[&[u8]]) -> &mut Self {
        self.out.push(BLK_DATA);
        self.int(id);
        self.chunks(chunks)
    }

    /// Like `_CustomWriteFunc`, never writes an empty chunk: zero ends the data.
    fn chunks(&mut self, chunks: &[&[u8]]) -> &mut Self {
        for chunk in chunks.iter().filter(|chunk| !chunk.is_empty()) {
            self.int(chunk.len() as i64);
            self.out.extend_from_slice(chunk);
        }
        self.int(0)
    }

    fn blobs_block(&mut self, id: i64, objects: &[(i64, &[&[u8]])]) -> &mut Self {
        self.out.push(BLK_BLOBS);
        self.int(id);
        for (oid, chunks) in objects {
            self.int(*oid);
            self.chunks(chunks);
        }
        self.int(0)
    }
}

fn stats_of(schema: &str, name: &str, rows: u64, raw_bytes: u64) -> TableStats {
    TableStats {
        schema: schema.to_owned(),
        name: name.to_owned(),
        rows,
        raw_bytes,
    }
}

#[test]
fn every_version_and_int_size_reads_alike() {
    let entries = [
        schema_only(1),
        table(5, "public", "b_table"),
        table(6, "a", "empty"),
        blobs(7),
    ];
    for minor in [14, 15, 16] {
        for int_size in [4, 8] {
            for offset_flag in [1, 2] {
                let mut w = Writer::archive(minor, int_size, &entries, offset_flag);
                w.table_block(5, &[b"1\tone\n2\tt", b"wo\n", b"3\tthree\n", COPY_TRAILER]);
                w.table_block(6, &[COPY_TRAILER]);
                // An oid above 2^31 is written as a negative int; an empty object has no chunk.
                w.blobs_block(
                    7,
                    &[
                        (16384, &[b"abc", b"de"]),
                        (-1_294_967_296, &[]),
                        (16390, &[b"\n"]),
                    ],
                );
                let stats = read_in_pieces(&w.out, 3).expect("synthetic archive");
                assert_eq!(
                    stats.tables,
                    vec![
                        stats_of("a", "empty", 0, 0),
                        stats_of("public", "b_table", 3, 20)
                    ]
                );
                assert_eq!((stats.large_objects, stats.large_object_bytes), (3, 6));
                assert_eq!(stats.archive_version, format!("1.{minor}"));
                assert_eq!(stats.server_version, "15.18");
                assert_eq!(stats.pg_dump_version, "17.2");
            }
        }
    }
}

/// Reads one table block of COPY data given as chunks.
fn table_data(chunks: &[&[u8]]) -> Result<DumpStats, StatsError> {
    let mut w = Writer::archive(16, 4, &[table(1, "s", "t")], 1);
    w.table_block(1, chunks);
    read(&w.out)
}

fn rows_and_bytes(chunks: &[&[u8]]) -> (u64, u64) {
    let stats = table_data(chunks).expect("table data reads");
    (stats.tables[0].rows, stats.tables[0].raw_bytes)
}

#[test]
fn rows_and_the_trailer_split_anywhere() {
    let data = b"1\tx\n22\t\\\\.\n\n\\N\n\\.\n\n\n";
    for split in 0..=data.len() {
        let (a, b) = data.split_at(split);
        assert_eq!(rows_and_bytes(&[a, b]), (4, 15), "split at {split}");
    }
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(rows_and_bytes(&bytes), (4, 15));
}

#[test]
fn only_a_whole_trailer_line_is_taken_off() {
    // Without the trailer (a pg_dump that would not write it), every line is a row.
    assert_eq!(rows_and_bytes(&[b"1\n2\n"]), (2, 4));
    // A value `\.` then two empty strings: COPY doubles the backslash, so it is not `\.`.
    assert_eq!(rows_and_bytes(&[b"\\\\.\n\n\n"]), (3, 6));
    assert_eq!(rows_and_bytes(&[b"\\\\.\n\n\n", COPY_TRAILER]), (3, 6));
    // Empty rows (a zero-column table) before the trailer.
    assert_eq!(rows_and_bytes(&[b"\n\n", COPY_TRAILER]), (2, 2));
    assert_eq!(rows_and_bytes(&[]), (0, 0));
}

#[test]
fn copy_data_must_end_a_row() {
    match table_data(&[b"1\n2"]) {
        Err(StatsError::Malformed { what, .. }) => assert!(what.contains("s.t"), "{what}"),
        other => panic!("{other:?}"),
    }
}

fn assert_malformed(data: &[u8], needle: &str) {
    match read_in_pieces(data, 2) {
        Err(StatsError::Malformed { what, .. }) => {
            assert!(what.contains(needle), "{what:?} lacks {needle:?}");
        }
        other => panic!("expected Malformed with {needle:?}, got {other:?}"),
    }
}

#[test]
fn malformed_data_sections_are_errors() {
    let entries = [table(1, "s", "t"), blobs(2)];
    let base = || Writer::archive(14, 4, &entries, 1);

    let mut w = base();
    w.out.push(2);
    assert_malformed(&w.out, "unknown data block type 2");

    let mut w = base();
    w.table_block(1, &[COPY_TRAILER]).blobs_block(2, &[]);
    w.out.push(7);
    assert_malformed(&w.out, "unknown data block type 7");

    let mut w = base();
    w.table_block(1, &[]).table_block(1, &[]);
    assert_malformed(&w.out, "second data block for dump id 1");

    let mut w = base();
    w.table_block(9, &[]);
    assert_malformed(&w.out, "dump id 9");

    let mut w = base();
    w.blobs_block(1, &[]);
    assert_malformed(&w.out, "TABLE DATA of s.t");

    let mut w = base();
    w.out.push(BLK_DATA);
    w.int(1).int(-5);
    assert_malformed(&w.out, "negative data chunk length");

    let mut w = base();
    w.out.extend_from_slice(&[BLK_DATA, 2, 1, 0, 0, 0]);
    assert_malformed(&w.out, "sign byte 2");
}

#[test]
fn malformed_tables_of_contents_are_errors() {
    let mut w = Writer::archive(14, 4, &[], 1);
    let header_len = w.out.len() - 5;
    w.out.truncate(header_len);
    w.int(-1);
    assert_malformed(&w.out, "TOC entry count -1");

    let mut w = Writer::archive(14, 4, &[table(0, "s", "t")], 1);
    w.table_block(0, &[]);
    assert_malformed(&w.out, "TOC entry dump id 0");

    let w = Writer::archive(15, 4, &[table(3, "s", "t"), table(3, "s", "u")], 1);
    assert_malformed(&w.out, "two TOC entries with data have dump id 3");

    let w = Writer::archive(16, 4, &[table(3, "s", "t")], 9);
    assert_malformed(&w.out, "data offset flag 9");

    let mut w = Writer::archive(14, 4, &[], 1);
    w.out[8] = 9;
    assert_malformed(&w.out, "integer size 9");
    w.out[8] = 4;
    w.out[9] = 0;
    assert_malformed(&w.out, "offset size 0");

    // A corrupt length is refused before anything that size is read or kept: a skipped
    // string (defn) past MAX_TOC_STRING, a kept one (the tag of an entry with data) past
    // MAX_KEPT_STRING.
    for (kept, len) in [
        (false, i64::from(i32::MAX)),
        (true, MAX_KEPT_STRING as i64 + 1),
    ] {
        let mut w = Writer::archive(14, 4, &[], 1);
        let count_at = w.out.len() - 5;
        w.out.truncate(count_at);
        w.int(1).int(7).int(1).str(Some("0")).str(Some("0"));
        if !kept {
            w.str(Some("t")).str(Some("TABLE DATA")).int(4);
        }
        w.int(len);
        assert_malformed(&w.out, &format!("string length {len}"));
    }
}

#[test]
fn other_archives_are_refused_by_name() {
    match read(b"--\n-- PostgreSQL database dump\n--\n") {
        Err(StatsError::NotCustomFormat { found }) => {
            assert!(found.contains("--\\n--"), "{found}")
        }
        other => panic!("{other:?}"),
    }
    let mut directory_toc = Writer::archive(16, 4, &[], 1);
    directory_toc.out[10] = 5;
    assert!(matches!(
        read(&directory_toc.out),
        Err(StatsError::NotCustomFormat { .. })
    ));
    for (bytes, version) in [
        (&b"PGDMP\x01\x0d\x00"[..], "1.13.0"),
        (b"PGDMP\x01\x11\x00", "1.17.0"),
        (b"PGDMP\x02\x00\x00", "2.0.0"),
    ] {
        match read(bytes) {
            Err(StatsError::UnsupportedVersion { version: found }) => {
                assert_eq!(found, version)
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn compression_is_read_from_either_header_layout() {
    let mut level = Writer::archive(14, 4, &[], 1);
    level.out[11..16].copy_from_slice(&[0, 6, 0, 0, 0]);
    let mut zstd = Writer::archive(15, 4, &[], 1);
    zstd.out[11] = 3;
    let mut lz4 = Writer::archive(16, 4, &[], 1);
    lz4.out[11] = 2;
    for (w, algorithm) in [(level, "gzip, level 6"), (zstd, "zstd"), (lz4, "lz4")] {
        match read(&w.out) {
            Err(StatsError::Compressed { algorithm: found }) => assert_eq!(found, algorithm),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn entries_whose_data_cannot_be_counted_are_refused() {
    let mut inserts = table(4, "s", "t");
    inserts.copy = None;
    match read(&Writer::archive(15, 4, &[inserts], 1).out) {
        Err(StatsError::NotCopyData { schema, name }) => {
            assert_eq!((schema, name), ("s".into(), "t".into()))
        }
        other => panic!("{other:?}"),
    }
    let mut unknown = table(4, "s", "t");
    unknown.desc = "FUTURE DATA";
    assert!(matches!(
        read(&Writer::archive(16, 4, &[unknown], 1).out),
        Err(StatsError::UnsupportedEntry { dump_id: 4, .. })
    ));
}

#[test]
fn a_stream_cut_between_blocks_is_truncated() {
    let mut w = Writer::archive(
        16,
        4,
        &[table(1, "s", "t"), table(2, "s", "u"), blobs(3)],
        1,
    );
    w.table_block(1, &[b"1\n"]);
    match read(&w.out) {
        Err(StatsError::Truncated { at_offset, inside }) => {
            assert_eq!(at_offset, w.out.len() as u64);
            assert!(
                inside.contains("2 data blocks") && inside.contains("s.u"),
                "{inside}"
            );
        }
        other => panic!("{other:?}"),
    }
    match DumpStatsTap::new().finish() {
        Err(StatsError::Truncated {
            at_offset: 0,
            inside,
        }) => assert_eq!(inside, "the archive header"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_archive_without_data_has_no_tables() {
    let stats = read(&Writer::archive(16, 4, &[schema_only(1), schema_only(2)], 1).out)
        .expect("schema-only archive");
    assert!(stats.tables.is_empty());
    assert_eq!((stats.large_objects, stats.large_object_bytes), (0, 0));
}

#[test]
fn the_first_error_stays() {
    let mut w = Writer::archive(14, 4, &[table(1, "s", "t")], 1);
    let bad_at = w.out.len() as u64;
    w.out.push(9);
    let mut tap = DumpStatsTap::new();
    tap.feed(&w.out);
    tap.feed(b"anything after that is ignored");
    match tap.finish() {
        Err(StatsError::Malformed { at_offset, .. }) => assert_eq!(at_offset, bad_at),
        other => panic!("{other:?}"),
    }
}

#[test]
fn stats_serialize_for_the_manifest() {
    let (_, data) = REAL[0];
    let stats = read(data).expect("real archive");
    let json = serde_json::to_string(&stats).expect("serializes");
    let back: DumpStats = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, stats);
}

/// The fuzz corpus (seeds and past crashes of `fuzz/fuzz_targets/dumpstats.rs`) plus the
/// real archives run in every `cargo test`: no input may panic the tap, and the result
/// does not depend on how the stream was cut into pieces.
#[test]
fn fuzz_corpus_does_not_panic() {
    for (path, bytes) in crate::test_support::fuzz_corpus("dumpstats") {
        let outcome = std::panic::catch_unwind(|| {
            let whole = format!("{:?}", read(&bytes));
            for piece in [1, 7, 4096] {
                let pieces = format!("{:?}", read_in_pieces(&bytes, piece));
                assert_eq!(pieces, whole, "pieces of {piece}");
            }
        });
        assert!(
            outcome.is_ok(),
            "{} panicked the dump stats tap",
            path.display()
        );
    }
}
