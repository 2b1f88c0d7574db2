//! Targets: the object stores snapshots are written to, and the key layout inside them.
//!
//! A [`Target`] is an `object_store` client (S3 with endpoint/region/credentials, or a plain
//! directory) plus the key prefix from its URL. This module owns the object layout of
//! DESIGN.md (`<source>/<database>/<snapshot_id>.{dump.zst,manifest.json,verify.json}`, plus
//! the `.upload.json` marker of an unfinished multipart upload, see `upload`) and the
//! part-size rule. It does not decide what is committed: that is `backup`'s job.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::{Path, PathPart};
use object_store::{Certificate, ClientOptions, ObjectStore, RetryConfig};

use crate::config::{Sse, TargetConfig, TargetKind, MIN_PART_SIZE};

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
    #[error(
        "target {target}: AWS_PROFILE={profile:?} is set, but pgferry does not read AWS profiles \
         (~/.aws/config, ~/.aws/credentials: object_store 0.12 has no profile provider), so \
         it would silently use other credentials; put the profile's keys in \
         access_key_id/secret_access_key (as ${{VARS}}) or in AWS_ACCESS_KEY_ID/\
         AWS_SECRET_ACCESS_KEY, or use web identity (IRSA), and unset AWS_PROFILE"
    )]
    ProfileUnsupported { target: String, profile: String },
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
                options: s3,
            } => {
                let mut options = ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(300));
                if let Some(path) = ca_file {
                    for cert in ca_certificates(&cfg.name, path)? {
                        options = options.with_root_certificate(cert);
                    }
                }
                // Keys in the config win and nothing is read from the environment; without
                // them, the standard chain: AWS_* variables, web identity (IRSA), container
                // credentials (ECS, EKS Pod Identity), then instance metadata.
                let mut b = match (access_key_id, secret_access_key) {
                    (Some(k), Some(secret)) => {
                        let b = AmazonS3Builder::new()
                            .with_access_key_id(k.expose())
                            .with_secret_access_key(secret.expose());
                        match &s3.session_token {
                            Some(t) => b.with_token(t.expose()),
                            None => b,
                        }
                    }
                    _ => {
                        if let Some(profile) = unsupported_profile(|k| std::env::var(k).ok()) {
                            return Err(TargetError::ProfileUnsupported {
                                target: cfg.name.clone(),
                                profile,
                            });
                        }
                        AmazonS3Builder::from_env()
                    }
                };
                b = b
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_retry(retry_config())
                    .with_client_options(options)
                    .with_virtual_hosted_style_request(s3.virtual_hosted_style);
                if let Some(endpoint) = endpoint {
                    let endpoint = if s3.virtual_hosted_style {
                        bucket_endpoint(endpoint, bucket)
                    } else {
                        endpoint.clone()
                    };
                    b = b
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_endpoint(endpoint);
                }
                match &s3.sse {
                    None => {}
                    Some(Sse::Kms { key_id }) => {
                        b = b.with_sse_kms_encryption(key_id.clone().unwrap_or_default());
                    }
                    Some(sse @ Sse::Aes256) => {
                        let key: AmazonS3ConfigKey = "aws_server_side_encryption"
                            .parse()
                            .expect("object_store knows its own config key");
                        b = b.with_config(key, sse.as_str());
                    }
                }
                let s3 = Arc::new(b.build().map_err(|source| TargetError::Build {
                    target: cfg.name.clone(),
                    source,
                })?);
                Target::new(&cfg.name, s3.clone(), &cfg.prefix, cfg.max_parts).with_multipart(s3)
            }
            TargetKind::File { root } => {
                use std::os::unix::fs::DirBuilderExt;
                // Owner only, whatever the umask (main sets 0077 for the objects below).
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(root)
                    .map_err(|source| TargetError::CreateDir {
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

    /// The full key of one object of a snapshot (prefix + [`snapshot_path`]): a shorthand for
    /// tests; the code derives keys from [`crate::storage::key::SnapshotKey`].
    #[cfg(test)]
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
#[cfg(test)]
pub fn snapshot_path(source: &str, database: &str, snapshot_id: &str, suffix: &str) -> Path {
    Path::from_iter([
        PathPart::from(source),
        PathPart::from(database),
        PathPart::from(format!("{snapshot_id}{suffix}").as_str()),
    ])
}

/// The endpoint of a bucket in virtual-hosted style: object_store wants the bucket in the
/// endpoint's host then (`https://bucket.s3.example.net`), operators write the service's.
fn bucket_endpoint(endpoint: &str, bucket: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut u) => {
            let host = u.host_str().unwrap_or_default().to_string();
            if !host.starts_with(&format!("{bucket}."))
                && u.set_host(Some(&format!("{bucket}.{host}"))).is_err()
            {
                return endpoint.to_string();
            }
            u.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => endpoint.to_string(),
    }
}

/// Where an S3 target's credentials come from, in object_store's order (`config check` prints
/// it; it names variables and files, never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// `access_key_id`/`secret_access_key` in the config file.
    Config,
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`).
    Environment,
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (EKS IRSA): STS AssumeRoleWithWebIdentity.
    WebIdentity { role_arn: String },
    /// `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (ECS task role).
    Container,
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI` + `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
    PodIdentity,
    /// The instance metadata service (EC2 instance role), the last resort.
    InstanceMetadata,
    /// A local directory: no credentials.
    None,
}

impl std::fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialSource::Config => f.write_str("config (access_key_id/secret_access_key)"),
            CredentialSource::Environment => {
                f.write_str("environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
            }
            CredentialSource::WebIdentity { role_arn } => write!(
                f,
                "web identity (AWS_WEB_IDENTITY_TOKEN_FILE, role {role_arn})"
            ),
            CredentialSource::Container => {
                f.write_str("container credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)")
            }
            CredentialSource::PodIdentity => {
                f.write_str("EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI)")
            }
            CredentialSource::InstanceMetadata => {
                f.write_str("instance metadata (no keys in the config or the environment)")
            }
            CredentialSource::None => f.write_str("none (a directory)"),
        }
    }
}

/// Which credentials [`Target::from_config`] will use for `cfg`, given the environment
/// `env` (the process's in production; a map in tests). Mirrors `AmazonS3Builder::build`.
pub fn credential_source(
    cfg: &TargetConfig,
    env: impl Fn(&str) -> Option<String>,
) -> CredentialSource {
    let TargetKind::S3 { access_key_id, .. } = &cfg.kind else {
        return CredentialSource::None;
    };
    let set = |k: &str| env(k).is_some_and(|v| !v.is_empty());
    if access_key_id.is_some() {
        CredentialSource::Config
    } else if set("AWS_ACCESS_KEY_ID") || set("AWS_SECRET_ACCESS_KEY") {
        CredentialSource::Environment
    } else if let (true, Some(role_arn)) = (set("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN"))
    {
        CredentialSource::WebIdentity { role_arn }
    } else if set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        CredentialSource::Container
    } else if set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        && set("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    {
        CredentialSource::PodIdentity
    } else {
        CredentialSource::InstanceMetadata
    }
}

/// The profile `AWS_PROFILE` names when the environment would otherwise decide a keyless S3
/// target's credentials. The AWS SDKs read that profile before web identity and instance
/// metadata; object_store 0.12 cannot, so building the target is refused rather than
/// quietly falling through to another identity. `AWS_ACCESS_KEY_ID` wins over a profile in
/// the SDKs too, so with it set the profile does not matter.
fn unsupported_profile(env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |k: &str| env(k).is_some_and(|v| !v.is_empty());
    if set("AWS_ACCESS_KEY_ID") {
        return None;
    }
    env("AWS_PROFILE").filter(|p| !p.is_empty())
}

/// One target that failed its part of a run (a backup's upload, a restore's or verify's
/// download, a repair's copy), and why: the one failure type of every stage, typed by the
/// stage's error (`backup::pipeline::UploadError`, `restore::load::LoadError`). Each is logged
/// once, where it is handled; reports serialize it as `{"target", "error"}` (the error's text).
#[derive(Debug)]
pub struct TargetFailure<E> {
    pub target: String,
    pub error: E,
}

impl<E: std::fmt::Display> std::fmt::Display for TargetFailure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.target, self.error)
    }
}

impl<E: std::fmt::Display> serde::Serialize for TargetFailure<E> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("TargetFailure", 2)?;
        st.serialize_field("target", &self.target)?;
        st.serialize_field("error", &self.error.to_string())?;
        st.end()
    }
}

/// `a: why; b: why`, for error messages.
pub fn describe_failures<E: std::fmt::Display>(failures: &[TargetFailure<E>]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
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

/// S3's largest object (5 TiB): no dump object can be larger, so no sizing aims higher.
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024 * 1024;

/// The smallest object size the sizing keeps room for, whatever the history says: a
/// database that grows tenfold between two runs still fits without giant parts.
const MIN_GOAL: u64 = 64 * 1024 * 1024 * 1024;

/// The sizing keeps room for this many times the expected stored size (the previous
/// snapshot's), and for twice what was actually written so far.
const GOAL_FACTOR: u64 = 4;

/// The part size when nothing is known yet, and the floor: twice S3's minimum, so a part
/// never falls under it and small databases take few requests.
pub const DEFAULT_FIRST_PART: u64 = 2 * MIN_PART_SIZE;

/// Sizes the parts of one object: they start at `first` (from the previous snapshot's stored
/// size, else the database's size, else [`DEFAULT_FIRST_PART`]) and double only when the
/// parts left (up to `max_parts`) could otherwise no longer hold the goal — `GOAL_FACTOR` ×
/// the expected size, at least [`MIN_GOAL`], at most [`MAX_OBJECT_SIZE`] — even if every
/// later part doubled until [`MAX_PART_SIZE`]. Parts stay small for as long as the limit
/// allows, so memory follows the part size, not the database; S3 allows parts of different
/// sizes. An object larger than the goal keeps doubling its parts up to the cap, which may
/// still not fit `max_parts`: the goal is what is guaranteed. (Guaranteeing 5 TB whatever
/// the expectation is possible only by ramping up within the first ~60 parts of a
/// 1000-part target, which would give a 6 GB database parts of hundreds of MiB.)
#[derive(Debug, Clone)]
pub struct PartSizer {
    size: u64,
    max_parts: u32,
    /// The size the parts left must always be able to hold.
    expected_goal: u64,
    parts: u32,
    written: u64,
}

impl PartSizer {
    /// A sizer for an object expected to be about `expected_stored` bytes (None: unknown)
    /// on targets allowing `max_parts` parts (the smallest limit of the targets written to).
    pub fn new(expected_stored: Option<u64>, max_parts: u32) -> PartSizer {
        let max_parts = max_parts.max(1);
        let size = match expected_stored {
            Some(bytes) => {
                let needed = (bytes as f64 * SIZE_HEADROOM / f64::from(max_parts)) as u64;
                round_mib(needed).clamp(DEFAULT_FIRST_PART, MAX_PART_SIZE)
            }
            None => DEFAULT_FIRST_PART,
        };
        let expected_goal = expected_stored
            .unwrap_or(0)
            .saturating_mul(GOAL_FACTOR)
            .clamp(MIN_GOAL, MAX_OBJECT_SIZE);
        PartSizer {
            size,
            max_parts,
            expected_goal,
            parts: 0,
            written: 0,
        }
    }

    /// A sizer whose first part is `first` bytes (tests and benchmarks pick it).
    pub fn with_first(first: u64, max_parts: u32) -> PartSizer {
        PartSizer {
            size: first.max(1),
            ..PartSizer::new(None, max_parts)
        }
    }

    /// The size of the first part (for logs and the manifest's `part_size`).
    pub fn first(&self) -> u64 {
        self.size
    }

    /// The size of the next part; call [`PartSizer::advance`] once it is cut.
    pub fn next_size(&mut self) -> u64 {
        let goal = self.expected_goal;
        while self.size < MAX_PART_SIZE {
            let left_after = self.max_parts.saturating_sub(self.parts + 1);
            let reachable = self
                .written
                .saturating_add(self.size)
                .saturating_add(fastest(left_after, self.size.saturating_mul(2)));
            if reachable >= goal {
                break;
            }
            self.size = (self.size * 2).min(MAX_PART_SIZE);
        }
        self.size
    }

    /// Records a part of `bytes` as cut.
    pub fn advance(&mut self, bytes: u64) {
        self.parts += 1;
        self.written += bytes;
    }
}

/// The most `parts` parts can hold when the first is `size` and each doubles up to
/// [`MAX_PART_SIZE`].
fn fastest(parts: u32, mut size: u64) -> u64 {
    let mut total = 0u64;
    for i in 0..parts {
        if size >= MAX_PART_SIZE {
            // Every remaining part is at the cap.
            return total.saturating_add(u64::from(parts - i).saturating_mul(MAX_PART_SIZE));
        }
        total = total.saturating_add(size);
        size = size.saturating_mul(2).min(MAX_PART_SIZE);
    }
    total
}

fn round_mib(bytes: u64) -> u64 {
    let mib = 1024 * 1024;
    bytes.div_ceil(mib) * mib
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

    /// Cuts an object of `total` bytes with `sizer`; returns the part sizes.
    fn cut(mut sizer: PartSizer, total: u64) -> Vec<u64> {
        let mut parts = Vec::new();
        let mut left = total;
        while left > 0 {
            let size = sizer.next_size().min(left);
            sizer.advance(size);
            parts.push(size);
            left -= size;
        }
        parts
    }

    #[test]
    fn sizing_reaches_5_tb_within_1000_and_10000_parts() {
        let five_tb = 5_000_000_000_000u64;
        for max_parts in [1_000u32, 10_000] {
            // With an expectation of 5 TB, and of a quarter of it (the database grew
            // fourfold since the last snapshot).
            for expected in [Some(five_tb), Some(five_tb / GOAL_FACTOR)] {
                let parts = cut(PartSizer::new(expected, max_parts), five_tb);
                assert!(
                    parts.len() <= max_parts as usize,
                    "{max_parts} parts, expected {expected:?}: {} parts",
                    parts.len()
                );
                assert!(parts.iter().all(|p| *p <= MAX_PART_SIZE));
                let n = parts.len();
                assert!(parts[..n - 1].iter().all(|p| *p >= MIN_PART_SIZE));
                assert!(parts
                    .windows(2)
                    .all(|w| w[0] <= w[1] || w[1] == *parts.last().unwrap()));
            }
        }
    }

    fn s3_target(keys: bool) -> TargetConfig {
        let keys = if keys {
            "access_key_id = \"AKIA\"\nsecret_access_key = \"s3cret\"\n"
        } else {
            ""
        };
        let text = format!(
            "[[source]]\nname = \"p\"\nurl = \"postgres://u@h/postgres\"\n\
             [[target]]\nname = \"t\"\nurl = \"s3://b/p\"\nendpoint = \"http://127.0.0.1:1\"\n{keys}"
        );
        crate::config::Config::from_str_at(&text, std::path::Path::new("/x.toml"))
            .unwrap()
            .targets
            .remove(0)
    }

    #[test]
    fn an_aws_profile_is_refused_unless_keys_decide() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            unsupported_profile(env(&[("AWS_PROFILE", "backup")])),
            Some("backup".into())
        );
        // Web identity in the environment too: the SDKs would still take the profile first.
        assert_eq!(
            unsupported_profile(env(&[
                ("AWS_PROFILE", "backup"),
                ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
                ("AWS_ROLE_ARN", "arn:r"),
            ])),
            Some("backup".into())
        );
        assert_eq!(
            unsupported_profile(env(&[
                ("AWS_PROFILE", "backup"),
                ("AWS_ACCESS_KEY_ID", "AKIA"),
                ("AWS_SECRET_ACCESS_KEY", "x"),
            ])),
            None
        );
        assert_eq!(unsupported_profile(env(&[("AWS_PROFILE", "")])), None);
        assert_eq!(unsupported_profile(env(&[])), None);
    }

    #[test]
    fn credential_source_follows_object_stores_order() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let web: &'static [(&str, &str)] = &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/eks/token"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/pgferry"),
        ];
        // Keys in the config win over everything in the environment.
        assert_eq!(
            credential_source(&s3_target(true), env(web)),
            CredentialSource::Config
        );
        assert_eq!(
            credential_source(&s3_target(false), env(web)),
            CredentialSource::WebIdentity {
                role_arn: "arn:aws:iam::1:role/pgferry".into()
            }
        );
        assert_eq!(
            credential_source(
                &s3_target(false),
                env(&[
                    ("AWS_ACCESS_KEY_ID", "AKIA"),
                    ("AWS_SECRET_ACCESS_KEY", "x"),
                    ("AWS_ROLE_ARN", "arn:r"),
                    ("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"),
                ])
            ),
            CredentialSource::Environment
        );
        // A role without a token file is not web identity.
        assert_eq!(
            credential_source(&s3_target(false), env(&[("AWS_ROLE_ARN", "arn:r")])),
            CredentialSource::InstanceMetadata
        );
        assert_eq!(
            credential_source(
                &s3_target(false),
                env(&[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/creds")])
            ),
            CredentialSource::Container
        );
        assert_eq!(
            credential_source(
                &s3_target(false),
                env(&[
                    (
                        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                        "http://169.254.170.23/v1/credentials"
                    ),
                    ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "/t"),
                ])
            ),
            CredentialSource::PodIdentity
        );
        // What config check prints names the variables, never a value.
        let shown = credential_source(&s3_target(true), env(web)).to_string();
        assert!(
            !shown.contains("s3cret") && !shown.contains("AKIA"),
            "{shown}"
        );
    }

    #[test]
    fn virtual_hosted_style_puts_the_bucket_in_the_endpoint_host() {
        assert_eq!(
            bucket_endpoint("https://s3.example.net", "acme"),
            "https://acme.s3.example.net"
        );
        assert_eq!(
            bucket_endpoint("https://acme.s3.example.net/", "acme"),
            "https://acme.s3.example.net"
        );
        assert_eq!(
            bucket_endpoint("http://127.0.0.1:3900", "b"),
            "http://127.0.0.1:3900",
            "an IP address cannot take a bucket label: left as written"
        );
    }

    #[test]
    fn parts_stay_small_while_the_limit_allows() {
        // A 6 GB database stores about 1 GB: every part stays at the first size on a target
        // of 1000 parts and on one of 10 000, with or without history.
        for max_parts in [1_000u32, 10_000] {
            for expected in [Some(1_000_000_000u64), None] {
                let parts = cut(PartSizer::new(expected, max_parts), 1_200_000_000);
                assert!(
                    parts
                        .iter()
                        .all(|p| *p == DEFAULT_FIRST_PART || p == parts.last().unwrap()),
                    "{max_parts}: {:?}",
                    &parts[..4]
                );
            }
        }
        // As a 60 GB database at 1000 parts would: 100 parts for ~10 GB stored. Parts grow,
        // but only as far as needed.
        let parts = cut(PartSizer::new(Some(10_000_000_000), 100), 10_000_000_000);
        assert!(parts.len() <= 100);
        assert!(
            *parts.iter().max().unwrap() <= 1024 * 1024 * 1024,
            "{parts:?}"
        );
        // History decides the first part: 5 TB over 10 000 parts starts at ~750 MB.
        let s = PartSizer::new(Some(5_000_000_000_000), 10_000);
        assert!(s.first() >= 700 * 1024 * 1024, "{}", s.first());
        assert_eq!(s.first() % (1024 * 1024), 0);
    }
}
