//! Per-table statistics read from the `pg_dump -Fc -Z0` stream as it passes by.
//!
//! [`DumpStatsTap`] owns the reading of PostgreSQL's custom archive format, as written by
//! `src/bin/pg_dump/pg_backup_archiver.c` (`WriteHead`, `WriteToc`, `WriteInt`, `WriteStr`,
//! `WriteOffset`) and `src/bin/pg_dump/pg_backup_custom.c` (`_StartData`, `_EndData`,
//! `_StartLOs`, `_StartLO`, `_EndLO`, `_EndLOs`, `_CustomWriteFunc`), archive versions 1.14
//! (pg_dump 12–15), 1.15 (16) and 1.16 (17, 18):
//! - an int is a sign byte (0 or 1) and `intSize` little-endian magnitude bytes; a string is an
//!   int length (-1 for NULL) and that many bytes;
//! - the header is `PGDMP`, the version bytes major, minor, revision, `intSize`, `offSize`, the
//!   format (1 = custom), the compression (from 1.15 one algorithm byte, before an int level),
//!   the creation time as 7 ints, and the strings database name, server version, pg_dump version;
//! - the table of contents is an int count of entries, each: dumpId, hadDumper, tableoid, oid,
//!   tag, desc, section, defn, dropStmt, copyStmt, namespace, tablespace, tableam, relkind (an
//!   int, from 1.16), owner, "false" (WITH OIDS), dependency strings up to a NULL, and the data
//!   offset (a flag byte and `offSize` bytes; not set when pg_dump writes to a pipe);
//! - then one block per entry that had a data dumper, in TOC order: a type byte (1 table data,
//!   3 large objects), the int dumpId, and chunks (int length, bytes) up to a zero length; a
//!   large-object block repeats (int oid, chunks, zero) per object up to an oid of 0. Nothing
//!   follows the last block.
//!
//! Table data is COPY text, one row per `\n`-terminated line (newlines inside values are
//! escaped), which may be split anywhere across chunks; pg_dump's `dumpTableData_copy` appends
//! `\.` and two empty lines to it, which are not counted. `tables` lists every `TABLE DATA`
//! entry, empty tables included, sorted by (schema, name); `rows` is what `count(*) FROM ONLY`
//! gives after a restore. Not listed, because the stream holds no rows for them: partitioned
//! parents (each partition is its own entry), materialized views (restored by a `REFRESH`
//! statement), sequences. An inheritance parent counts only its own rows, as `COPY` does.
//! Names are decoded as UTF-8, lossily for other database encodings.
//!
//! It must not query the database, hold more than one string of the TOC or a few bytes of the
//! data at a time (memory grows with the number of tables, never with their size), panic on
//! any input, or decide what a failed parse means for the backup: that is the pipeline's call.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Statistics of one dump, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpStats {
    /// One entry per `TABLE DATA` item, sorted by (schema, name).
    pub tables: Vec<TableStats>,
    /// Number of large objects in the dump.
    pub large_objects: u64,
    /// Total size of the large objects' data.
    pub large_object_bytes: u64,
    /// Archive format version, e.g. "1.15".
    pub archive_version: String,
    /// Version of the dumped server, as pg_dump recorded it, e.g. "16.4 (Debian 16.4-1)".
    pub server_version: String,
    /// Version of the pg_dump that wrote the archive.
    pub pg_dump_version: String,
}

/// Rows and bytes of one table's data in the dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStats {
    pub schema: String,
    pub name: String,
    /// Number of rows (COPY lines).
    pub rows: u64,
    /// Bytes of COPY text for the table, without pg_dump's end-of-data trailer.
    pub raw_bytes: u64,
}

/// Why the statistics could not be read from a stream. None of these is worth retrying on the
/// same bytes; every one means the stream is not the complete `pg_dump -Fc -Z0` archive expected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StatsError {
    #[error("the dump is not a pg_dump custom-format archive ({found}); pgferry runs pg_dump -Fc")]
    NotCustomFormat { found: String },
    #[error("unsupported archive version {version}: table statistics read versions 1.14 to 1.16 (pg_dump 12 to 18)")]
    UnsupportedVersion { version: String },
    #[error("the archive's data is compressed ({algorithm}); table statistics need pg_dump -Z0")]
    Compressed { algorithm: String },
    #[error(
        "the dump stream ended at byte {at_offset} inside {inside}: pg_dump's output was cut short"
    )]
    Truncated { at_offset: u64, inside: String },
    #[error("malformed dump stream at byte {at_offset}: {what}")]
    Malformed { at_offset: u64, what: String },
    #[error(
        "the data of table {schema}.{name} is not COPY text (was pg_dump run with --inserts?)"
    )]
    NotCopyData { schema: String, name: String },
    #[error("TOC entry {dump_id} ({desc}) carries data of a kind table statistics do not know")]
    UnsupportedEntry { dump_id: i32, desc: String },
}

const MAGIC: &[u8; 5] = b"PGDMP";
/// Archive minor versions (major 1) whose layout is known; see the module docs.
const MINOR_VERSIONS: std::ops::RangeInclusive<u8> = 14..=16;
/// `archCustom` in pg_backup.h.
const FORMAT_CUSTOM: u8 = 1;
/// Data block types in pg_backup_archiver.h.
const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;
/// `K_OFFSET_POS_NOT_SET`, `K_OFFSET_POS_SET`, `K_OFFSET_NO_DATA`.
const OFFSET_FLAGS: std::ops::RangeInclusive<u8> = 1..=3;
const OFFSET_POS_NOT_SET: u8 = 1;
const OFFSET_POS_SET: u8 = 2;
/// Longest TOC string accepted (a huge view or function body); longer is a corrupt length.
const MAX_TOC_STRING: usize = 64 << 20;
/// Longest string kept in memory (names, entry kinds, versions); identifiers are at most 63 bytes.
const MAX_KEPT_STRING: usize = 64 << 10;
/// Widest ints and offsets accepted; pg_dump writes 4 and 8 bytes.
const MAX_INT_SIZE: u8 = 8;
const MAX_OFF_SIZE: u8 = 16;
/// Largest fixed-size read: an offset flag and its bytes.
const MAX_FIXED: usize = 1 + MAX_OFF_SIZE as usize;
/// What `dumpTableData_copy` appends to each table's COPY data: `\.` and two empty lines.
const COPY_TRAILER: &[u8; 5] = b"\\.\n\n\n";
const COPY_TRAILER_LINES: u64 = 3;
/// Bytes of table data remembered to recognise the trailer: the trailer and the byte before it.
const TAIL_LEN: usize = COPY_TRAILER.len() + 1;

/// One field of the header or of a TOC entry, named as in `ReadHead` and `ReadToc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    IntSize,
    OffSize,
    Format,
    CompressionAlgorithm,
    CompressionLevel,
    CreateDate,
    DbName,
    ServerVersion,
    DumpVersion,
    TocCount,
    DumpId,
    HadDumper,
    TableOid,
    Oid,
    Tag,
    Desc,
    Section,
    Defn,
    DropStmt,
    CopyStmt,
    Namespace,
    Tablespace,
    TableAm,
    Relkind,
    Owner,
    WithOids,
    Dependencies,
    DataOffset,
}

use Field::*;

/// The header after the version bytes, in `WriteHead`'s order.
#[rustfmt::skip]
const HEADER_1_14: &[Field] = &[
    IntSize, OffSize, Format, CompressionLevel,
    CreateDate, CreateDate, CreateDate, CreateDate, CreateDate, CreateDate, CreateDate,
    DbName, ServerVersion, DumpVersion, TocCount,
];
#[rustfmt::skip]
const HEADER_1_15: &[Field] = &[
    IntSize, OffSize, Format, CompressionAlgorithm,
    CreateDate, CreateDate, CreateDate, CreateDate, CreateDate, CreateDate, CreateDate,
    DbName, ServerVersion, DumpVersion, TocCount,
];
/// One TOC entry, in `WriteToc`'s order, then `_WriteExtraToc`'s offset.
#[rustfmt::skip]
const ENTRY_1_14: &[Field] = &[
    DumpId, HadDumper, TableOid, Oid, Tag, Desc, Section, Defn, DropStmt, CopyStmt,
    Namespace, Tablespace, TableAm, Owner, WithOids, Dependencies, DataOffset,
];
#[rustfmt::skip]
const ENTRY_1_16: &[Field] = &[
    DumpId, HadDumper, TableOid, Oid, Tag, Desc, Section, Defn, DropStmt, CopyStmt,
    Namespace, Tablespace, TableAm, Relkind, Owner, WithOids, Dependencies, DataOffset,
];

/// A field's value once read; a string's kept bytes are in `DumpStatsTap::str_buf`.
#[derive(Debug, Clone, Copy)]
enum Value {
    Byte(u8),
    Int(i64),
    /// The length, `None` for NULL.
    Str(Option<usize>),
    /// The offset flag.
    Offset(u8),
}

#[derive(Debug, Clone, Copy)]
enum State {
    Magic,
    Version,
    Header {
        program: &'static [Field],
        idx: usize,
    },
    Toc {
        idx: usize,
    },
    BlockType,
    BlockId {
        kind: u8,
        /// Where the block's type byte is.
        at: u64,
    },
    ChunkLen {
        target: Target,
    },
    Chunk {
        target: Target,
        remaining: u64,
    },
    LargeObjectOid,
    Failed,
}

/// Where a data chunk's bytes are counted: a table (index into `tables`) or large objects.
#[derive(Debug, Clone, Copy)]
enum Target {
    Table(usize),
    LargeObject,
}

#[derive(Debug, Clone, Copy)]
enum DataKind {
    Table(usize),
    LargeObjects,
}

#[derive(Debug, Clone)]
struct DataEntry {
    kind: DataKind,
    seen: bool,
    /// Where its TOC entry's data offset flag is, when pg_dump could not set it (a pipe).
    offset_field: Option<u64>,
    /// Where its data block starts (the type byte), once seen.
    block_at: u64,
}

/// The fields of the TOC entry being read that matter here.
#[derive(Debug, Clone, Default)]
struct EntryScratch {
    dump_id: i32,
    had_dumper: bool,
    tag: String,
    desc: String,
    namespace: String,
    has_copy: bool,
    offset_field: Option<u64>,
}

/// The last bytes of the current table's data.
#[derive(Debug, Clone, Default)]
struct Tail {
    buf: [u8; TAIL_LEN],
    len: usize,
}

impl Tail {
    fn push(&mut self, s: &[u8]) {
        if s.len() >= TAIL_LEN {
            self.buf.copy_from_slice(&s[s.len() - TAIL_LEN..]);
            self.len = TAIL_LEN;
            return;
        }
        let keep = (TAIL_LEN - s.len()).min(self.len);
        self.buf.copy_within(self.len - keep..self.len, 0);
        self.buf[keep..keep + s.len()].copy_from_slice(s);
        self.len = keep + s.len();
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The part of one `feed` call not consumed yet, and its offset in the whole stream.
struct Input<'a> {
    bytes: &'a [u8],
    offset: u64,
}

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        self.offset += head.len() as u64;
        head
    }
}

/// Reads a custom-format archive incrementally, whatever the sizes of the pieces fed, and
/// counts rows and bytes per table without copying table data.
#[derive(Debug, Clone)]
pub struct DumpStatsTap {
    state: State,
    /// Bytes consumed so far.
    offset: u64,
    /// Where the field being read started, for error messages.
    item_start: u64,
    error: Option<StatsError>,
    /// A fixed-size field split across `feed` calls.
    partial: [u8; MAX_FIXED],
    partial_len: usize,
    /// The string being read: bytes still to come (`None` while reading its length).
    str_remaining: Option<usize>,
    str_len: usize,
    str_buf: Vec<u8>,
    version: (u8, u8, u8),
    int_size: usize,
    off_size: usize,
    entry_program: &'static [Field],
    server_version: String,
    pg_dump_version: String,
    toc_count: u64,
    toc_read: u64,
    entry: EntryScratch,
    entries: HashMap<i32, DataEntry>,
    tables: Vec<TableStats>,
    large_objects: u64,
    large_object_bytes: u64,
    /// Bytes of the current table block, and its last bytes.
    block_bytes: u64,
    tail: Tail,
}

impl Default for DumpStatsTap {
    fn default() -> Self {
        Self::new()
    }
}

impl DumpStatsTap {
    pub fn new() -> Self {
        DumpStatsTap {
            state: State::Magic,
            offset: 0,
            item_start: 0,
            error: None,
            partial: [0; MAX_FIXED],
            partial_len: 0,
            str_remaining: None,
            str_len: 0,
            str_buf: Vec::new(),
            version: (0, 0, 0),
            int_size: 0,
            off_size: 0,
            entry_program: ENTRY_1_14,
            server_version: String::new(),
            pg_dump_version: String::new(),
            toc_count: 0,
            toc_read: 0,
            entry: EntryScratch::default(),
            entries: HashMap::new(),
            tables: Vec::new(),
            large_objects: 0,
            large_object_bytes: 0,
            block_bytes: 0,
            tail: Tail::default(),
        }
    }

    /// Feeds the next bytes of the stream, in whatever pieces they arrive. After the first
    /// error the rest is ignored, cheaply; `finish` reports the error.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut input = Input {
            bytes,
            offset: self.offset,
        };
        while !input.bytes.is_empty() {
            if let Err(error) = self.step(&mut input) {
                self.error = Some(error);
                self.state = State::Failed;
            }
        }
        self.offset = input.offset;
    }

    /// The TOC bytes that turn this archive, written by pg_dump to a pipe, into one as pg_dump
    /// writes to a file: for each data block, at the position of its entry's offset field,
    /// the flag `K_OFFSET_POS_SET` and the block's position (`offSize` bytes, little-endian, as
    /// `WriteOffset` writes them). `pg_restore -j` then seeks straight to each table's data
    /// instead of scanning the archive for it. Only meaningful once [`finish`](Self::finish)
    /// found the archive complete; pg_restore checks the dump id at each position it seeks to.
    pub fn data_offset_patches(&self) -> Vec<(u64, Vec<u8>)> {
        let mut patches: Vec<(u64, Vec<u8>)> = self
            .entries
            .values()
            .filter(|entry| entry.seen)
            .filter_map(|entry| {
                let field = entry.offset_field?;
                let mut bytes = Vec::with_capacity(1 + self.off_size);
                bytes.push(OFFSET_POS_SET);
                bytes.extend((0..self.off_size).map(|i| {
                    if i < 8 {
                        (entry.block_at >> (8 * i)) as u8
                    } else {
                        0
                    }
                }));
                Some((field, bytes))
            })
            .collect();
        patches.sort_unstable();
        patches
    }

    /// Ends the stream: the statistics, or why the stream was not a complete archive.
    pub fn finish(mut self) -> Result<DumpStats, StatsError> {
        if let Some(error) = self.error.take() {
            return Err(error);
        }
        if !matches!(self.state, State::BlockType) {
            return Err(StatsError::Truncated {
                at_offset: self.offset,
                inside: self.describe_position(),
            });
        }
        let mut missing: Vec<(i32, String)> = self
            .entries
            .iter()
            .filter(|(_, entry)| !entry.seen)
            .map(|(&id, entry)| (id, self.describe_kind(entry.kind)))
            .collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(StatsError::Truncated {
                at_offset: self.offset,
                inside: format!(
                    "the data section: {} data blocks listed in the table of contents never came, the first being {}",
                    missing.len(),
                    missing[0].1
                ),
            });
        }
        let (major, minor, rev) = self.version;
        let archive_version = if rev == 0 {
            format!("{major}.{minor}")
        } else {
            format!("{major}.{minor}.{rev}")
        };
        self.tables
            .sort_unstable_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        Ok(DumpStats {
            tables: self.tables,
            large_objects: self.large_objects,
            large_object_bytes: self.large_object_bytes,
            archive_version,
            server_version: self.server_version,
            pg_dump_version: self.pg_dump_version,
        })
    }

    /// Consumes at least one byte of `input` (which is not empty), or fails.
    fn step(&mut self, input: &mut Input<'_>) -> Result<(), StatsError> {
        match self.state {
            State::Chunk { target, remaining } => self.chunk(input, target, remaining),
            State::ChunkLen { target } => {
                let Some(len) = self.take_int(input)? else {
                    return Ok(());
                };
                self.state = match (len, target) {
                    (0, Target::Table(table)) => {
                        self.end_table_block(table)?;
                        State::BlockType
                    }
                    (0, Target::LargeObject) => State::LargeObjectOid,
                    (1.., _) => State::Chunk {
                        target,
                        remaining: len as u64,
                    },
                    _ => return Err(self.malformed(format!("negative data chunk length {len}"))),
                };
                Ok(())
            }
            State::LargeObjectOid => {
                let Some(oid) = self.take_int(input)? else {
                    return Ok(());
                };
                // An oid above 2^31 is written as a negative int; only 0 ends the block.
                self.state = if oid == 0 {
                    State::BlockType
                } else {
                    self.large_objects += 1;
                    State::ChunkLen {
                        target: Target::LargeObject,
                    }
                };
                Ok(())
            }
            State::BlockType => {
                let Some(fixed) = self.take_fixed(input, 1) else {
                    return Ok(());
                };
                let kind = fixed[0];
                if kind != BLK_DATA && kind != BLK_BLOBS {
                    return Err(self.malformed(format!(
                        "unknown data block type {kind} (1 is table data, 3 large objects)"
                    )));
                }
                self.state = State::BlockId {
                    kind,
                    at: self.item_start,
                };
                Ok(())
            }
            State::BlockId { kind, at } => {
                let Some(id) = self.take_int(input)? else {
                    return Ok(());
                };
                self.start_block(kind, id, at)
            }
            State::Magic => {
                let Some(fixed) = self.take_fixed(input, MAGIC.len()) else {
                    return Ok(());
                };
                if fixed[..MAGIC.len()] != MAGIC[..] {
                    return Err(StatsError::NotCustomFormat {
                        found: format!(
                            "it starts with {:?}, not PGDMP",
                            String::from_utf8_lossy(&fixed[..MAGIC.len()])
                        ),
                    });
                }
                self.state = State::Version;
                Ok(())
            }
            State::Version => {
                let Some(fixed) = self.take_fixed(input, 3) else {
                    return Ok(());
                };
                let (major, minor, rev) = (fixed[0], fixed[1], fixed[2]);
                self.version = (major, minor, rev);
                if major != 1 || !MINOR_VERSIONS.contains(&minor) {
                    return Err(StatsError::UnsupportedVersion {
                        version: format!("{major}.{minor}.{rev}"),
                    });
                }
                self.entry_program = if minor >= 16 { ENTRY_1_16 } else { ENTRY_1_14 };
                let program = if minor >= 15 {
                    HEADER_1_15
                } else {
                    HEADER_1_14
                };
                self.state = State::Header { program, idx: 0 };
                Ok(())
            }
            State::Header { program, idx } => {
                let field = program[idx];
                let Some(value) = self.read_field(input, field)? else {
                    return Ok(());
                };
                self.header_field(field, value)?;
                self.state = if idx + 1 < program.len() {
                    State::Header {
                        program,
                        idx: idx + 1,
                    }
                } else {
                    self.next_entry()
                };
                Ok(())
            }
            State::Toc { idx } => {
                let field = self.entry_program[idx];
                let Some(value) = self.read_field(input, field)? else {
                    return Ok(());
                };
                let next_field = self.toc_field(field, value)?;
                self.state = if !next_field {
                    State::Toc { idx }
                } else if idx + 1 < self.entry_program.len() {
                    State::Toc { idx: idx + 1 }
                } else {
                    self.end_entry()?;
                    self.next_entry()
                };
                Ok(())
            }
            State::Failed => {
                input.take(input.bytes.len());
                Ok(())
            }
        }
    }

    /// The hot path: counts a chunk's bytes where they lie, then reads the following chunk
    /// lengths and chunks of the same block without going back through `step`.
    fn chunk(
        &mut self,
        input: &mut Input<'_>,
        target: Target,
        mut remaining: u64,
    ) -> Result<(), StatsError> {
        loop {
            let data = input.take(usize::try_from(remaining).unwrap_or(usize::MAX));
            remaining -= data.len() as u64;
            match target {
                Target::Table(table) => {
                    let stats = &mut self.tables[table];
                    stats.rows += count_newlines(data);
                    stats.raw_bytes += data.len() as u64;
                    self.block_bytes += data.len() as u64;
                    self.tail.push(data);
                }
                Target::LargeObject => self.large_object_bytes += data.len() as u64,
            }
            if remaining > 0 {
                self.state = State::Chunk { target, remaining };
                return Ok(());
            }
            // Fast path: the next length is whole in this input and is not the end marker.
            let int_len = 1 + self.int_size;
            if input.bytes.len() >= int_len {
                let len = self.decode_int(&input.bytes[..int_len], input.offset)?;
                if len > 0 {
                    input.take(int_len);
                    remaining = len as u64;
                    continue;
                }
            }
            self.state = State::ChunkLen { target };
            return Ok(());
        }
    }

    fn start_block(&mut self, kind: u8, id: i64, at: u64) -> Result<(), StatsError> {
        let entry = i32::try_from(id)
            .ok()
            .and_then(|id| self.entries.get_mut(&id));
        let Some(entry) = entry else {
            return Err(self.malformed(format!(
                "data block for dump id {id}, which no TOC entry with data has"
            )));
        };
        if entry.seen {
            return Err(self.malformed(format!("second data block for dump id {id}")));
        }
        entry.seen = true;
        entry.block_at = at;
        self.state = match (kind, entry.kind) {
            (BLK_DATA, DataKind::Table(table)) => {
                self.block_bytes = 0;
                self.tail = Tail::default();
                State::ChunkLen {
                    target: Target::Table(table),
                }
            }
            (BLK_BLOBS, DataKind::LargeObjects) => State::LargeObjectOid,
            (_, other) => {
                let what = format!(
                    "data block of type {kind} for dump id {id}, which is {}",
                    self.describe_kind(other)
                );
                return Err(self.malformed(what));
            }
        };
        Ok(())
    }

    /// Takes pg_dump's trailer off the table's counts and checks the data ends a row.
    fn end_table_block(&mut self, table: usize) -> Result<(), StatsError> {
        let tail = self.tail.bytes();
        let before_trailer = tail
            .len()
            .checked_sub(COPY_TRAILER.len() + 1)
            .map(|i| tail[i]);
        let has_trailer = tail.ends_with(COPY_TRAILER)
            && (self.block_bytes == COPY_TRAILER.len() as u64 || before_trailer == Some(b'\n'));
        let last = if has_trailer {
            before_trailer
        } else {
            tail.last().copied()
        };
        let stats = &mut self.tables[table];
        if has_trailer {
            stats.rows -= COPY_TRAILER_LINES;
            stats.raw_bytes -= COPY_TRAILER.len() as u64;
        }
        if last.is_some_and(|b| b != b'\n') {
            let what = format!(
                "the COPY data of table {}.{} does not end with a newline",
                stats.schema, stats.name
            );
            return Err(self.malformed(what));
        }
        Ok(())
    }

    fn header_field(&mut self, field: Field, value: Value) -> Result<(), StatsError> {
        match (field, value) {
            (IntSize, Value::Byte(size)) => {
                if size == 0 || size > MAX_INT_SIZE {
                    return Err(self.malformed(format!("integer size {size} in the header")));
                }
                self.int_size = usize::from(size);
            }
            (OffSize, Value::Byte(size)) => {
                if size == 0 || size > MAX_OFF_SIZE {
                    return Err(self.malformed(format!("offset size {size} in the header")));
                }
                self.off_size = usize::from(size);
            }
            (Format, Value::Byte(format)) if format != FORMAT_CUSTOM => {
                return Err(StatsError::NotCustomFormat {
                    found: format!("its header says archive format {format}, 1 being custom"),
                });
            }
            (CompressionAlgorithm, Value::Byte(algorithm)) if algorithm != 0 => {
                let algorithm = match algorithm {
                    1 => "gzip".to_owned(),
                    2 => "lz4".to_owned(),
                    3 => "zstd".to_owned(),
                    other => format!("algorithm {other}"),
                };
                return Err(StatsError::Compressed { algorithm });
            }
            (CompressionLevel, Value::Int(level)) if level != 0 => {
                return Err(StatsError::Compressed {
                    algorithm: format!("gzip, level {level}"),
                });
            }
            (ServerVersion, Value::Str(_)) => self.server_version = self.take_string(),
            (DumpVersion, Value::Str(_)) => self.pg_dump_version = self.take_string(),
            (TocCount, Value::Int(count)) => {
                self.toc_count = u64::try_from(count)
                    .map_err(|_| self.malformed(format!("TOC entry count {count}")))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Records a TOC field; false while more of the same field follow (dependencies).
    fn toc_field(&mut self, field: Field, value: Value) -> Result<bool, StatsError> {
        match (field, value) {
            (DumpId, Value::Int(id)) => {
                self.entry = EntryScratch::default();
                self.entry.dump_id = i32::try_from(id)
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or_else(|| self.malformed(format!("TOC entry dump id {id}")))?;
            }
            (HadDumper, Value::Int(had)) => self.entry.had_dumper = had != 0,
            (Tag, Value::Str(_)) => self.entry.tag = self.take_string(),
            (Desc, Value::Str(_)) => self.entry.desc = self.take_string(),
            (Namespace, Value::Str(_)) => self.entry.namespace = self.take_string(),
            (CopyStmt, Value::Str(len)) => self.entry.has_copy = len.is_some_and(|len| len > 0),
            (Dependencies, Value::Str(Some(_))) => return Ok(false),
            (DataOffset, Value::Offset(flag)) if !OFFSET_FLAGS.contains(&flag) => {
                return Err(self.malformed(format!("data offset flag {flag}")));
            }
            (DataOffset, Value::Offset(OFFSET_POS_NOT_SET)) => {
                self.entry.offset_field = Some(self.item_start);
            }
            _ => {}
        }
        Ok(true)
    }

    /// Remembers the entry just read if data for it follows in the data section.
    fn end_entry(&mut self) -> Result<(), StatsError> {
        self.toc_read += 1;
        let entry = std::mem::take(&mut self.entry);
        if !entry.had_dumper {
            return Ok(());
        }
        let kind = match entry.desc.as_str() {
            "TABLE DATA" => {
                if !entry.has_copy {
                    return Err(StatsError::NotCopyData {
                        schema: entry.namespace,
                        name: entry.tag,
                    });
                }
                self.tables.push(TableStats {
                    schema: entry.namespace,
                    name: entry.tag,
                    rows: 0,
                    raw_bytes: 0,
                });
                DataKind::Table(self.tables.len() - 1)
            }
            "BLOBS" => DataKind::LargeObjects,
            _ => {
                return Err(StatsError::UnsupportedEntry {
                    dump_id: entry.dump_id,
                    desc: entry.desc,
                })
            }
        };
        let data = DataEntry {
            kind,
            seen: false,
            offset_field: entry.offset_field,
            block_at: 0,
        };
        if self.entries.insert(entry.dump_id, data).is_some() {
            let what = format!("two TOC entries with data have dump id {}", entry.dump_id);
            return Err(self.malformed(what));
        }
        Ok(())
    }

    fn next_entry(&self) -> State {
        if self.toc_read < self.toc_count {
            State::Toc { idx: 0 }
        } else {
            State::BlockType
        }
    }

    /// Reads one field's value, or `None` until the input holds all of it.
    fn read_field(
        &mut self,
        input: &mut Input<'_>,
        field: Field,
    ) -> Result<Option<Value>, StatsError> {
        Ok(match field {
            IntSize | OffSize | Format | CompressionAlgorithm => {
                self.take_fixed(input, 1).map(|fixed| Value::Byte(fixed[0]))
            }
            CompressionLevel | CreateDate | TocCount | DumpId | HadDumper | Section | Relkind => {
                self.take_int(input)?.map(Value::Int)
            }
            DataOffset => self
                .take_fixed(input, 1 + self.off_size)
                .map(|fixed| Value::Offset(fixed[0])),
            ServerVersion | DumpVersion => self.take_str(input, true)?.map(Value::Str),
            Tag | Desc | Namespace => {
                let keep = self.entry.had_dumper;
                self.take_str(input, keep)?.map(Value::Str)
            }
            DbName | TableOid | Oid | Defn | DropStmt | CopyStmt | Tablespace | TableAm | Owner
            | WithOids | Dependencies => self.take_str(input, false)?.map(Value::Str),
        })
    }

    /// Collects `n` (at most `MAX_FIXED`) bytes, across calls if need be.
    fn take_fixed(&mut self, input: &mut Input<'_>, n: usize) -> Option<[u8; MAX_FIXED]> {
        let mut out = [0; MAX_FIXED];
        if self.partial_len == 0 {
            self.item_start = input.offset;
            if input.bytes.len() >= n {
                out[..n].copy_from_slice(input.take(n));
                return Some(out);
            }
        }
        let got = input.take(n - self.partial_len);
        self.partial[self.partial_len..self.partial_len + got.len()].copy_from_slice(got);
        self.partial_len += got.len();
        if self.partial_len < n {
            return None;
        }
        self.partial_len = 0;
        out[..n].copy_from_slice(&self.partial[..n]);
        Some(out)
    }

    fn take_int(&mut self, input: &mut Input<'_>) -> Result<Option<i64>, StatsError> {
        let n = 1 + self.int_size;
        match self.take_fixed(input, n) {
            Some(fixed) => self.decode_int(&fixed[..n], self.item_start).map(Some),
            None => Ok(None),
        }
    }

    /// `ReadInt`: a sign byte, then the magnitude, least significant byte first.
    fn decode_int(&self, bytes: &[u8], at_offset: u64) -> Result<i64, StatsError> {
        let magnitude = bytes[1..]
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let magnitude = i64::try_from(magnitude).map_err(|_| StatsError::Malformed {
            at_offset,
            what: format!("integer magnitude {magnitude} out of range"),
        })?;
        match bytes[0] {
            0 => Ok(magnitude),
            1 => Ok(-magnitude),
            sign => Err(StatsError::Malformed {
                at_offset,
                what: format!("integer sign byte {sign}, not 0 or 1"),
            }),
        }
    }

    /// Reads a string: its length (`None` for NULL) once whole, its bytes in `str_buf` if
    /// `keep`, skipped otherwise.
    fn take_str(
        &mut self,
        input: &mut Input<'_>,
        keep: bool,
    ) -> Result<Option<Option<usize>>, StatsError> {
        let remaining = match self.str_remaining {
            Some(remaining) => remaining,
            None => {
                let Some(len) = self.take_int(input)? else {
                    return Ok(None);
                };
                if len == -1 {
                    self.str_buf.clear();
                    return Ok(Some(None));
                }
                let cap = if keep {
                    MAX_KEPT_STRING
                } else {
                    MAX_TOC_STRING
                };
                let len = usize::try_from(len)
                    .ok()
                    .filter(|len| *len <= cap)
                    .ok_or_else(|| {
                        self.malformed(format!("string length {len} (at most {cap} accepted here)"))
                    })?;
                self.str_buf.clear();
                self.str_len = len;
                len
            }
        };
        let bytes = input.take(remaining);
        if keep {
            self.str_buf.extend_from_slice(bytes);
        }
        let remaining = remaining - bytes.len();
        if remaining > 0 {
            self.str_remaining = Some(remaining);
            return Ok(None);
        }
        self.str_remaining = None;
        Ok(Some(Some(self.str_len)))
    }

    /// The string last read with `keep`, as UTF-8.
    fn take_string(&mut self) -> String {
        let bytes = std::mem::take(&mut self.str_buf);
        String::from_utf8(bytes)
            .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
    }

    fn malformed(&self, what: String) -> StatsError {
        StatsError::Malformed {
            at_offset: self.item_start,
            what,
        }
    }

    fn describe_kind(&self, kind: DataKind) -> String {
        match kind {
            DataKind::Table(table) => {
                let stats = &self.tables[table];
                format!("the TABLE DATA of {}.{}", stats.schema, stats.name)
            }
            DataKind::LargeObjects => "a BLOBS entry (large objects)".to_owned(),
        }
    }

    fn describe_position(&self) -> String {
        match self.state {
            State::Magic | State::Version | State::Header { .. } => "the archive header".to_owned(),
            State::Toc { .. } => format!(
                "the table of contents (entry {} of {})",
                self.toc_read + 1,
                self.toc_count
            ),
            State::BlockType | State::BlockId { .. } => "a data block header".to_owned(),
            State::ChunkLen {
                target: Target::Table(table),
            }
            | State::Chunk {
                target: Target::Table(table),
                ..
            } => self.describe_kind(DataKind::Table(table)),
            State::ChunkLen { .. } | State::Chunk { .. } | State::LargeObjectOid => {
                "large object data".to_owned()
            }
            State::Failed => "a stream already found malformed".to_owned(),
        }
    }
}

/// Rows in a piece of COPY text.
fn count_newlines(data: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', data).count() as u64
}

/// The backup pipeline feeds every raw byte of the dump stream through the tap.
/// Something that looks at the raw (uncompressed) stream as it passes through the backup
/// pipeline, such as [`DumpStatsTap`]. It runs on the compressor thread, so it must be cheap.
pub trait RawTap: Send + 'static {
    fn feed(&mut self, bytes: &[u8]);
}

/// A tap that looks at nothing.
impl RawTap for () {
    fn feed(&mut self, _: &[u8]) {}
}

impl RawTap for DumpStatsTap {
    fn feed(&mut self, bytes: &[u8]) {
        DumpStatsTap::feed(self, bytes);
    }
}

#[cfg(test)]
mod tests;
