//! The manifest: the JSON document whose presence commits a snapshot on a target.
//!
//! It is written last, after the dump object's upload completed, and says everything needed
//! to restore by hand (`sha256sum`, `zstd -d`, `pg_restore`). Parsing is strict about the
//! version: a manifest from a newer pgferry is refused with a clear error rather than
//! misread. This module does no I/O.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The format written by this build. Version 2 adds `tables` and `large_objects`; version 3
/// names a write-once object per attempt (`<snapshot_id>-<run>.dump.zst`, older ones name
/// `<snapshot_id>.dump.zst`) and records the source's `system_identifier`. An older pgferry
/// refuses a version-3 manifest ("upgrade pgferry") instead of looking for the wrong object.
pub const FORMAT_VERSION: u32 = 3;

/// The format of a manifest that names a companion-files archive (`files` is an object): an
/// older pgferry refuses it rather than restore, repair or prune the dump without its files.
/// Manifests without an archive stay at [`FORMAT_VERSION`], which every replica of a rolling
/// upgrade reads. The newest version this build reads.
pub const FILES_FORMAT_VERSION: u32 = 4;

/// Manifests larger than this are refused unread (a real one is a few KiB per 100 tables).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {key} is not valid JSON or misses fields ({source}); it was probably truncated or written by something else")]
    Invalid {
        key: String,
        source: serde_json::Error,
    },
    #[error("manifest {key} has format_version {version}, newer than this pgferry understands ({FILES_FORMAT_VERSION}); upgrade pgferry")]
    FutureVersion { key: String, version: u32 },
    #[error("manifest {key} is {size} bytes, more than {MAX_MANIFEST_BYTES}; refusing to read it")]
    TooLarge { key: String, size: usize },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    pub algorithm: String,
    pub level: i32,
}

/// Rows and bytes of one table, read from the dump stream itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    pub schema: String,
    pub name: String,
    pub rows: u64,
    pub raw_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub snapshot_id: String,
    pub source: String,
    pub database: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub server_version: String,
    pub pg_dump_version: String,
    pub compression: Compression,
    /// Key of the dump object, relative to the target's prefix.
    pub object_key: String,
    /// Bytes of the stored (compressed) object.
    pub stored_size: u64,
    /// Bytes of the uncompressed pg_dump custom-format archive.
    pub raw_size: u64,
    /// sha256 of the stored object, lowercase hex: `sha256sum` of the downloaded file.
    pub sha256: String,
    pub part_size: u64,
    /// Targets the snapshot was committed on, as known when this manifest was written.
    pub targets: Vec<String>,
    /// Per-table statistics (format 2 on); absent in older manifests, and `None` in a
    /// summary ([`Manifest::summary_from_json`]): what listing reads.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "tables_unless_skipped"
    )]
    pub tables: Option<Vec<TableEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large_objects: Option<u64>,
    /// Version of pgferry that wrote it.
    #[serde(default)]
    pub pgferry_version: String,
    /// The source server's `system_identifier` (format 3 on): restore and verify refuse a
    /// destination with the same identifier, whatever address reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    /// How the object is encrypted (algorithm and recipients' public keys); absent: not
    /// encrypted (and in manifests written before encryption existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::encryption::Encryption>,
    /// The companion files (`[[source]] files`, see `crate::files`): absent when the source
    /// has none configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Files>,
}

/// A snapshot's companion files: the archive committed with the dump, or `"none"` when the
/// source has `files` configured but the database's directory did not exist at backup time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Files {
    Archive(FilesArchive),
    Missing(NoFiles),
}

/// The `"none"` of [`Files::Missing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoFiles {
    #[serde(rename = "none")]
    None,
}

/// The archive of a database's companion files: `tar`, zstd, then age when the manifest's
/// `encryption` is set (same recipients as the dump). Same checks as the dump's object:
/// `sha256` and `stored_size` are of the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesArchive {
    /// `<snapshot_id>-<run>.files.tar.zst[.age]`, in the snapshot's folder.
    pub object_key: String,
    pub stored_size: u64,
    /// Bytes of the tar stream.
    pub raw_size: u64,
    pub sha256: String,
    /// Regular files archived.
    pub file_count: u64,
    /// Bytes of those files' contents.
    pub file_bytes: u64,
    /// Entries not archived: special files (sockets, devices, FIFOs) and symlinks.
    #[serde(default)]
    pub skipped: u64,
}

impl Manifest {
    /// The companion-files archive, when the snapshot has one.
    pub fn files_archive(&self) -> Option<&FilesArchive> {
        match &self.files {
            Some(Files::Archive(a)) => Some(a),
            _ => None,
        }
    }

    /// The format version this manifest needs ([`FILES_FORMAT_VERSION`] with an archive).
    pub fn required_version(&self) -> u32 {
        if self.files_archive().is_some() {
            FILES_FORMAT_VERSION
        } else {
            FORMAT_VERSION
        }
    }
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        v.push(b'\n');
        v
    }

    /// Parses a manifest read from `key` (the key is only used in error messages).
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                key: key.into(),
                size: bytes.len(),
            });
        }
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let version: Version =
            serde_json::from_slice(bytes).map_err(|source| ManifestError::Invalid {
                key: key.into(),
                source,
            })?;
        if version.format_version > FILES_FORMAT_VERSION {
            return Err(ManifestError::FutureVersion {
                key: key.into(),
                version: version.format_version,
            });
        }
        serde_json::from_slice(bytes).map_err(|source| ManifestError::Invalid {
            key: key.into(),
            source,
        })
    }

    /// Parses a manifest without its `tables` (skipped unread, never materialised): the small
    /// facts listing needs. Same checks as [`Manifest::from_json`]; `tables` is `None`, so
    /// whatever needs the table statistics (verify) reads the manifest again in full.
    pub fn summary_from_json(key: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        SKIP_TABLES.with(|skip| skip.set(true));
        let parsed = Manifest::from_json(key, bytes);
        SKIP_TABLES.with(|skip| skip.set(false));
        parsed
    }

    /// Compression ratio, raw / stored.
    pub fn ratio(&self) -> f64 {
        if self.stored_size == 0 {
            0.0
        } else {
            self.raw_size as f64 / self.stored_size as f64
        }
    }
}

thread_local! {
    /// Set only for the duration of one synchronous parse by [`Manifest::summary_from_json`].
    static SKIP_TABLES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `tables` as written, or skipped without building it when a summary is being parsed.
fn tables_unless_skipped<'de, D>(d: D) -> Result<Option<Vec<TableEntry>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    if SKIP_TABLES.with(|skip| skip.get()) {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(None)
    } else {
        Option::<Vec<TableEntry>>::deserialize(d)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let t = DateTime::parse_from_rfc3339("2026-11-27T14:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        Manifest {
            format_version: FORMAT_VERSION,
            snapshot_id: "20261127T140000Z".into(),
            source: "prod".into(),
            database: "acme".into(),
            started_at: t,
            finished_at: t,
            server_version: "15.18".into(),
            pg_dump_version: "15.18".into(),
            compression: Compression {
                algorithm: "zstd".into(),
                level: 3,
            },
            object_key: "prod/acme/20261127T140000Z.dump.zst".into(),
            // One byte, as the test fixtures' dump objects (`b"x"`).
            stored_size: 1,
            raw_size: 3,
            sha256: "00".repeat(32),
            part_size: 10 << 20,
            targets: vec!["a".into(), "b".into()],
            tables: Some(vec![TableEntry {
                schema: "public".into(),
                name: "t".into(),
                rows: 3,
                raw_bytes: 12,
            }]),
            large_objects: Some(0),
            pgferry_version: "0.1.0".into(),
            system_identifier: Some("7300000000000000001".into()),
            encryption: None,
            files: None,
        }
    }

    #[test]
    fn files_are_an_archive_or_none() {
        let mut m = sample();
        m.files = Some(Files::Missing(NoFiles::None));
        let json: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(json["files"], "none");
        assert_eq!(Manifest::from_json("k", &m.to_json()).unwrap(), m);
        assert_eq!(m.required_version(), FORMAT_VERSION);
        m.files = Some(Files::Archive(FilesArchive {
            object_key: "prod/acme/20261127T140000Z-0123456789ab.files.tar.zst".into(),
            stored_size: 10,
            raw_size: 20,
            sha256: "11".repeat(32),
            file_count: 2,
            file_bytes: 5,
            skipped: 1,
        }));
        m.format_version = m.required_version();
        assert_eq!(m.format_version, FILES_FORMAT_VERSION);
        let back = Manifest::from_json("k", &m.to_json()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.files_archive().unwrap().file_count, 2);
        let mut v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        v["files"] = serde_json::json!("some");
        assert!(Manifest::from_json("k", &serde_json::to_vec(&v).unwrap()).is_err());
        v["format_version"] = serde_json::json!(FILES_FORMAT_VERSION + 1);
        v["files"] = serde_json::json!("none");
        assert!(matches!(
            Manifest::from_json("k", &serde_json::to_vec(&v).unwrap()),
            Err(ManifestError::FutureVersion { .. })
        ));
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::from_json("k", &m.to_json()).unwrap(), m);
        assert_eq!(m.ratio(), 3.0);
    }

    #[test]
    fn a_summary_skips_the_tables_and_nothing_else() {
        let m = sample();
        let summary = Manifest::summary_from_json("k", &m.to_json()).unwrap();
        assert_eq!(summary.tables, None);
        assert_eq!(
            summary,
            Manifest {
                tables: None,
                ..m.clone()
            }
        );
        // The switch is only for that one parse: a full read after it has the tables.
        assert_eq!(Manifest::from_json("k", &m.to_json()).unwrap(), m);
        // Malformed tables are skipped too, but the rest is as strict.
        let mut v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        v["tables"] = serde_json::json!([{"weird": true}]);
        assert!(Manifest::summary_from_json("k", v.to_string().as_bytes()).is_ok());
        assert!(Manifest::from_json("k", v.to_string().as_bytes()).is_err());
        v["format_version"] = 99.into();
        assert!(matches!(
            Manifest::summary_from_json("k", v.to_string().as_bytes()),
            Err(ManifestError::FutureVersion { .. })
        ));
    }

    #[test]
    fn encryption_round_trips_and_is_absent_when_plain() {
        let mut m = sample();
        assert!(!String::from_utf8(m.to_json())
            .unwrap()
            .contains("encryption"));
        m.encryption = Some(crate::encryption::Encryption {
            algorithm: "age".into(),
            recipients: vec!["age1xyz".into()],
        });
        assert_eq!(Manifest::from_json("k", &m.to_json()).unwrap(), m);
    }

    #[test]
    fn version_2_naming_the_slot_key_still_reads() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["format_version"] = 2.into();
        v.as_object_mut().unwrap().remove("system_identifier");
        let m = Manifest::from_json("k", v.to_string().as_bytes()).unwrap();
        assert_eq!(m.object_key, "prod/acme/20261127T140000Z.dump.zst");
        assert_eq!(m.system_identifier, None);
    }

    #[test]
    fn version_1_without_tables_still_reads() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["format_version"] = 1.into();
        v.as_object_mut().unwrap().remove("tables");
        v.as_object_mut().unwrap().remove("large_objects");
        let m = Manifest::from_json("k", v.to_string().as_bytes()).unwrap();
        assert_eq!(m.tables, None);
    }

    #[test]
    fn bad_manifests_are_clear_errors() {
        let json = sample().to_json();
        let truncated = &json[..json.len() / 2];
        assert!(matches!(
            Manifest::from_json("k", truncated),
            Err(ManifestError::Invalid { .. })
        ));
        assert!(matches!(
            Manifest::from_json("k", b"not json"),
            Err(ManifestError::Invalid { .. })
        ));
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["format_version"] = 99.into();
        let err = Manifest::from_json("k", v.to_string().as_bytes()).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::FutureVersion { version: 99, .. }
        ));
        assert!(err.to_string().contains("upgrade pgferry"));
    }

    /// The fuzz corpus (seeds and past crashes of `fuzz/fuzz_targets/manifest.rs`) runs in
    /// every `cargo test`: no input may panic the parser, and what parses round-trips.
    #[test]
    fn fuzz_corpus_does_not_panic() {
        let mut parsed = 0;
        for (path, bytes) in crate::test_support::fuzz_corpus("manifest") {
            let outcome = std::panic::catch_unwind(|| {
                Manifest::from_json("fuzz", &bytes).map(|m| {
                    assert_eq!(Manifest::from_json("again", &m.to_json()).unwrap(), m);
                })
            });
            match outcome {
                Ok(result) => parsed += usize::from(result.is_ok()),
                Err(_) => panic!("{} panicked the manifest parser", path.display()),
            }
        }
        assert!(parsed >= 2, "the corpus should hold valid manifests too");
    }
}
