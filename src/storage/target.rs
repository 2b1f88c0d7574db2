//! Targets: the object stores snapshots are written to, and the key layout inside them.
//!
//! A [`Target`] is an `object_store` client (S3 with endpoint/region/credentials, or a plain
//! directory) plus the key prefix from its URL. This module owns the object layout of
//! DESIGN.md (`<source>/<database>/<snapshot_id>.{dump.zst,manifest.json,verify.json}`, plus
//! the `.upload.json` marker of an unfinished multipart upload, see `upload`) and the
//! part-size rule. It does not decide what is committed: that is `backup`'s job.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::{Path, PathPart};
use object_store::{Certificate, ClientOptions, ObjectStore, RetryConfig};

use crate::config::{TargetConfig, TargetKind, MIN_PART_SIZE};

pub use crate::storage::key::{DUMP_SUFFIX, MANIFEST_SUFFIX, UPLOAD_SUFFIX, VERIFY_SUFFIX};

/// S3 allows parts up to 5 GiB.
const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// Parts are sized for this much more than the database's on-disk size, so a dump that grows
/// while it runs (or compresses badly) still fits in `max_parts`.
const SIZE_HEADROOM: f64 = 1.5;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target {target}: cannot set up the object store: {source}")]
    Build {
        target: String,
        source: object_store::Error,
    },
    #[error("target {target}: ca_file {path}: {source}; it must hold PEM CA certificates")]
    CaFile {
        target: String,
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("target {target}: cannot create directory {dir}: {source}")]
    CreateDir {
        target: String,
        dir: String,
        source: std::io::Error,
    },
}

/// One configured target, ready to use.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    pub store: Arc<dyn ObjectStore>,
    /// The same store's multipart API with visible upload ids, where it has one (S3): uploads
    /// then get a marker and can be aborted after a crash. `None`: the generic
    /// `put_multipart`, whose upload id stays hidden (a directory).
    pub multipart: Option<Arc<dyn MultipartStore>>,
    /// A directory target's root: where a killed upload leaves its staging file (see
    /// `upload::staging_files`).
    pub root: Option<std::path::PathBuf>,
    prefix: Vec<String>,
    pub max_parts: u32,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("store", &self.store)
            .field("multipart", &self.multipart.is_some())
            .field("root", &self.root)
            .field("prefix", &self.prefix)
            .field("max_parts", &self.max_parts)
            .finish()
    }
}

impl Target {
    /// Builds the client for a configured target. Creates a file target's directory.
    pub fn from_config(cfg: &TargetConfig) -> Result<Target, TargetError> {
        let target = match &cfg.kind {
            TargetKind::S3 {
                bucket,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                ca_file,
            } => {
                let mut options = ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(300));
                if let Some(path) = ca_file {
                    for cert in ca_certificates(&cfg.name, path)? {
                        options = options.with_root_certificate(cert);
                    }
                }
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_retry(retry_config())
                    .with_client_options(options);
                if let Some(endpoint) = endpoint {
                    b = b
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                if let (Some(k), Some(s)) = (access_key_id, secret_access_key) {
                    b = b
                        .with_access_key_id(k.expose())
                        .with_secret_access_key(s.expose());
                }
                let s3 = Arc::new(b.build().map_err(|source| TargetError::Build {
                    target: cfg.name.clone(),
                    source,
                })?);
                Target::new(&cfg.name, s3.clone(), &cfg.prefix, cfg.max_parts).with_multipart(s3)
            }
            TargetKind::File { root } => {
                std::fs::create_dir_all(root).map_err(|source| TargetError::CreateDir {
                    target: cfg.name.clone(),
                    dir: root.display().to_string(),
                    source,
                })?;
                let store = LocalFileSystem::new_with_prefix(root)
                    .map_err(|source| TargetError::Build {
                        target: cfg.name.clone(),
                        source,
                    })?
                    .with_automatic_cleanup(true);
                let mut t = Target::new(&cfg.name, Arc::new(store), &cfg.prefix, cfg.max_parts);
                t.root = Some(root.clone());
                t
            }
        };
        Ok(target)
    }

    /// A target over any store (tests use an in-memory one).
    pub fn new(name: &str, store: Arc<dyn ObjectStore>, prefix: &str, max_parts: u32) -> Target {
        Target {
            name: name.to_string(),
            store,
            multipart: None,
            root: None,
            prefix: prefix
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            max_parts,
        }
    }

    /// Uploads through `multipart`, the same store as `store` seen through its multipart API,
    /// so that every upload is marked and can be aborted after a crash.
    pub fn with_multipart(mut self, multipart: Arc<dyn MultipartStore>) -> Target {
        self.multipart = Some(multipart);
        self
    }

    /// The folder holding every snapshot of one database (or one source, with `database` None,
    /// or the whole target, with both None).
    pub fn folder(&self, source: Option<&str>, database: Option<&str>) -> Path {
        let parts = self
            .prefix
            .iter()
            .map(|p| PathPart::from(p.as_str()))
            .chain(source.map(PathPart::from))
            .chain(source.and(database).map(PathPart::from));
        Path::from_iter(parts)
    }

    /// The full key of `relative` (a key from [`crate::storage::key`], or a manifest's
    /// `object_key`) on this target: its prefix, then `relative`.
    pub fn at(&self, relative: &Path) -> Path {
        Path::from_iter(
            self.prefix
                .iter()
                .map(|p| PathPart::from(p.as_str()))
                .chain(relative.parts()),
        )
    }

    /// The full key of one object of a snapshot (prefix + [`snapshot_path`]).
    pub fn key(&self, source: &str, database: &str, snapshot_id: &str, suffix: &str) -> Path {
        Path::from_iter(
            self.prefix
                .iter()
                .map(|p| PathPart::from(p.as_str()))
                .chain(snapshot_path(source, database, snapshot_id, suffix).parts()),
        )
    }
}

/// The key of one object of a snapshot relative to a target's prefix: `suffix` is one of the
/// `*_SUFFIX` constants. Database names may hold `/`, spaces or anything else: each segment
/// is encoded on its own, so a name never splits into two levels.
pub fn snapshot_path(source: &str, database: &str, snapshot_id: &str, suffix: &str) -> Path {
    Path::from_iter([
        PathPart::from(source),
        PathPart::from(database),
        PathPart::from(format!("{snapshot_id}{suffix}").as_str()),
    ])
}

/// An object store error with its causes: object_store shows only the outermost ("HTTP
/// error: error sending request"), while the reason (a refused certificate, a reset
/// connection) is further down the chain. Causes already quoted by an outer error are skipped.
pub fn error_text(e: &object_store::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

/// The certificates of a target's `ca_file`, trusted besides the system's roots.
fn ca_certificates(target: &str, path: &std::path::Path) -> Result<Vec<Certificate>, TargetError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| TargetError::CaFile {
        target: target.to_string(),
        path: path.display().to_string(),
        source,
    };
    let pem = std::fs::read(path).map_err(|e| err(Box::new(e)))?;
    let certs = Certificate::from_pem_bundle(&pem).map_err(|e| err(Box::new(e)))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// Retries for transient S3 errors (5xx, timeouts, connection resets) inside each request.
fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 5,
        retry_timeout: Duration::from_secs(120),
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
    }
}

/// The part size for a database of `estimated_raw_size` bytes on a target allowing
/// `max_parts` parts: at least `MIN_PART_SIZE` (S3's minimum, and few enough requests), and
/// big enough that the whole dump fits, with headroom. Rounded up to a whole MiB.
pub fn part_size(estimated_raw_size: u64, max_parts: u32) -> u64 {
    let needed = (estimated_raw_size as f64 * SIZE_HEADROOM / f64::from(max_parts.max(1))) as u64;
    let mib = 1024 * 1024;
    let rounded = needed.div_ceil(mib) * mib;
    rounded.clamp(MIN_PART_SIZE * 2, MAX_PART_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[test]
    fn keys_follow_the_design_layout() {
        let t = Target::new("t", Arc::new(InMemory::new()), "/acme-backups/pg/", 10_000);
        assert_eq!(
            t.key("prod", "acme", "20261127T140000Z", DUMP_SUFFIX)
                .as_ref(),
            "acme-backups/pg/prod/acme/20261127T140000Z.dump.zst"
        );
        let odd = t.key("prod", "a/b c\"é", "20261127T140000Z", MANIFEST_SUFFIX);
        // One segment per level: the slash in the name is encoded, not a new level.
        assert_eq!(odd.parts().count(), 5);
        let no_prefix = Target::new("t", Arc::new(InMemory::new()), "", 10_000);
        assert_eq!(
            no_prefix.key("s", "d", "x", VERIFY_SUFFIX).as_ref(),
            "s/d/x.verify.json"
        );
    }

    #[test]
    fn part_size_fits_large_databases_in_max_parts() {
        assert_eq!(part_size(0, 10_000), 10 * 1024 * 1024);
        assert_eq!(part_size(1 << 30, 10_000), 10 * 1024 * 1024);
        let two_tb = 2u64 << 40;
        for max_parts in [1_000, 10_000] {
            let p = part_size(two_tb, max_parts);
            assert!(p * u64::from(max_parts) >= two_tb, "{max_parts}: {p}");
            assert_eq!(p % (1024 * 1024), 0);
        }
        assert_eq!(part_size(u64::MAX / 2, 1), MAX_PART_SIZE);
    }
}
