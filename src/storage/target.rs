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
                    _ => AmazonS3Builder::from_env(),
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
