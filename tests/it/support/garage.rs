//! [`Garage`]: a throwaway single-node Garage S3 server for one test.
//!
//! The server runs from `$PGFERRY_TOOLS/bin/garage` (see [`garage_binary`]) with its
//! metadata (sqlite) and data in a temp dir, and its S3, RPC and admin APIs on free
//! 127.0.0.1 ports. It starts with `garage server --single-node --default-access-key`, so the
//! one-node layout and an S3 key with a random id and secret exist before the APIs open: no
//! CLI round trips at startup. Buckets are created through the admin API (a bearer token,
//! plain HTTP/1.1 over loopback); [`Garage::cli`] runs any other `garage` command against it.
//!
//! The server can be killed and started again with the same ports, data and key, to inject
//! faults mid-upload; it is killed and its files removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{free_port, log_tail, random_hex, unique_name, POLL_INTERVAL, READY_TIMEOUT};

/// Environment variable naming the tools prefix that `scripts/install-garage.sh` installs to.
pub const TOOLS_ENV: &str = "PGFERRY_TOOLS";

/// Default tools prefix, as in `scripts/install-garage.sh`.
pub const DEFAULT_TOOLS_DIR: &str = "/opt/pgferry-tools";

/// The Garage release the tests are written against (its CLI changed between majors).
pub const GARAGE_VERSION: &str = "2.5.0";

/// The `s3_region` of every test server; S3 clients must sign with it.
pub const REGION: &str = "garage";

/// Attempts to start the server on fresh ports when a chosen one turns out to be taken.
const START_ATTEMPTS: usize = 3;

/// Limit for one readiness probe: a healthy local server answers in milliseconds, and a
/// port held by something that never answers must not stall the startup loop.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Limit for one admin API call (bucket creation); generous for a loaded CI machine.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the OS error says when a port is taken (EADDRINUSE).
const ADDR_IN_USE: &str = "Address already in use";

/// Lines of the server log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// One single-node Garage server in a temp dir; killed and removed on drop.
pub struct Garage {
    /// Owns the temp dir; dropping it deletes the server's files.
    dir: tempfile::TempDir,
    binary: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    s3_port: u16,
    admin_port: u16,
    admin_token: String,
    access_key_id: String,
    secret_access_key: String,
    child: Option<Child>,
}

impl Garage {
    /// Starts a fresh single-node server and waits until its S3 API answers.
    ///
    /// Fails, saying how to install it, when the `garage` binary is missing.
    pub async fn start() -> Result<Garage> {
        // Garage's own key format: "GK" + 24 hex digits, and a 64-hex-digit secret.
        Self::start_with_key(&format!("GK{}", random_hex(12)), &random_hex(32)).await
    }

    /// Like [`start`](Self::start), with a chosen S3 key instead of a random one, e.g. to
    /// give several servers the same credentials. Garage wants an id of at least 8
    /// characters from `[A-Za-z0-9._-]` and a secret of at least 16 printable ASCII ones.
    pub async fn start_with_key(access_key_id: &str, secret_access_key: &str) -> Result<Garage> {
        let mut garage = Self::prepare(access_key_id, secret_access_key)?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            garage.s3_port = free_port();
            garage.admin_port = free_port();
            garage.write_config(free_port())?;
            // A failed attempt may have left state behind: start each one from nothing.
            for sub in ["meta", "data"] {
                let _ = std::fs::remove_dir_all(garage.dir.path().join(sub));
            }
            match garage.start_again().await {
                Ok(()) => return Ok(garage),
                // Another process may have taken a port between free_port() and the bind.
                Err(e) if format!("{e:#}").contains(ADDR_IN_USE) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("Garage did not start")))
    }

    /// A stopped server with its temp dir and credentials, but no ports or config yet.
    fn prepare(access_key_id: &str, secret_access_key: &str) -> Result<Garage> {
        let binary = garage_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("pgferry-garage-")
            .tempdir()
            .context("cannot create a temp dir for Garage")?;
        Ok(Garage {
            config_path: dir.path().join("garage.toml"),
            log_path: dir.path().join("garage.log"),
            dir,
            binary,
            s3_port: 0,
            admin_port: 0,
            admin_token: random_hex(16),
            access_key_id: access_key_id.to_owned(),
            secret_access_key: secret_access_key.to_owned(),
            child: None,
        })
    }

    /// S3 endpoint, `http://127.0.0.1:<port>`; use path-style requests.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The `s3_region` of the server ([`REGION`]).
    pub fn region(&self) -> &str {
        REGION
    }

    /// Access key id of the server's S3 key, which may create buckets.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// Secret of the server's S3 key.
    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// An `object_store` client for `bucket` on this server (path-style, plain HTTP), for
    /// looking at or tampering with what the code under test wrote.
    pub fn object_store(&self, bucket: &str) -> Result<object_store::aws::AmazonS3> {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region(REGION)
            .with_access_key_id(&self.access_key_id)
            .with_secret_access_key(&self.secret_access_key)
            .with_bucket_name(bucket)
            .build()
            .with_context(|| format!("cannot build an S3 client for bucket {bucket:?}"))
    }

    /// Admin API endpoint, `http://127.0.0.1:<port>`, with [`admin_token`](Self::admin_token).
    pub fn admin_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// Bearer token of the admin API.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The server's config file, for `garage -c <path> ...`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The server's log file (stdout and stderr); its tail is included in errors.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Process id of the server, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Creates bucket `name` and gives the server's key read, write and owner rights on it.
    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        let created = self
            .admin_post(
                "/v2/CreateBucket",
                &serde_json::json!({ "globalAlias": name }),
            )
            .await
            .with_context(|| format!("cannot create bucket {name:?}"))?;
        let bucket_id = created["id"]
            .as_str()
            .ok_or_else(|| anyhow!("CreateBucket answered without a bucket id: {created}"))?;
        self.admin_post(
            "/v2/AllowBucketKey",
            &serde_json::json!({
                "bucketId": bucket_id,
                "accessKeyId": self.access_key_id,
                "permissions": { "read": true, "write": true, "owner": true },
            }),
        )
        .await
        .with_context(|| format!("cannot allow the test key on bucket {name:?}"))?;
        Ok(())
    }

    /// The admin API's `GetBucketInfo` of bucket `name` (objects, bytes, and the
    /// `unfinishedMultipartUploads`/`…Parts`/`…Bytes` counters of open multipart uploads).
    pub async fn bucket_info(&self, name: &str) -> Result<serde_json::Value> {
        let path = format!("/v2/GetBucketInfo?globalAlias={name}");
        let (status, answer) = http_request(
            self.admin_port,
            "GET",
            &path,
            Some(&self.admin_token),
            None,
            ADMIN_TIMEOUT,
        )
        .await
        .with_context(|| format!("admin API request {path} failed"))?;
        let answer = String::from_utf8_lossy(&answer);
        if !(200..300).contains(&status) {
            bail!("admin API {path} answered HTTP {status}: {answer}");
        }
        serde_json::from_str(&answer)
            .with_context(|| format!("admin API {path} answered non-JSON: {answer}"))
    }

    /// Bucket `name`'s counter `field` of [`bucket_info`](Self::bucket_info); an error if
    /// Garage does not report it.
    pub async fn bucket_counter(&self, name: &str, field: &str) -> Result<u64> {
        let info = self.bucket_info(name).await?;
        info[field]
            .as_u64()
            .ok_or_else(|| anyhow!("GetBucketInfo of {name} has no counter {field:?}: {info}"))
    }

    /// Creates a bucket with a fresh name `<prefix>-<random>` and returns the name.
    pub async fn unique_bucket(&self, prefix: &str) -> Result<String> {
        let name = unique_name(prefix);
        self.create_bucket(&name).await?;
        Ok(name)
    }

    /// Kills the server (SIGKILL, like a crash); ports, data and key are kept for
    /// [`start_again`](Self::start_again).
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("cannot kill the Garage server")?;
            tokio::task::spawn_blocking(move || child.wait())
                .await
                .context("the task waiting for Garage panicked")?
                .context("cannot wait for the killed Garage server")?;
        }
        Ok(())
    }

    /// Starts the server again on the same ports with the same data and key, and waits until
    /// it is ready. Does nothing if it is running.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        // Only what this run logs counts when looking for startup errors.
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = std::process::Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config_path)
            .args(["server", "--single-node", "--default-access-key"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_access_key)
            .env("RUST_LOG", "garage=info,garage_api_common=warn")
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .context("cannot clone the log file handle")?,
            )
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        self.child = Some(child);
        if let Err(e) = self.wait_ready(log_start).await {
            self.stop().await.ok();
            return Err(e);
        }
        Ok(())
    }

    /// Runs `garage -c <config> <args>` against this server and returns its stdout.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config_path)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        if !out.status.success() {
            bail!(
                "`garage {}` failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8(out.stdout).context("garage printed non-UTF-8 output")
    }

    fn write_config(&self, rpc_port: u16) -> Result<()> {
        let dir = self.dir.path();
        let config = format!(
            r#"# pgferry test server
metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "{admin_token}"
"#,
            meta = dir.join("meta").display(),
            data = dir.join("data").display(),
            rpc_secret = random_hex(32),
            s3_port = self.s3_port,
            admin_port = self.admin_port,
            admin_token = self.admin_token,
        );
        std::fs::write(&self.config_path, config)
            .with_context(|| format!("cannot write {}", self.config_path.display()))
    }

    /// Polls until the admin API reports a healthy cluster and the S3 API answers HTTP;
    /// fails early if the server exits or logs that a port is taken.
    async fn wait_ready(&mut self, log_start: u64) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut admin_healthy = false;
        loop {
            self.check_startup(log_start)?;
            if !admin_healthy {
                // 200 once the layout is applied and every partition has a live node.
                admin_healthy = matches!(
                    http_request(self.admin_port, "GET", "/health", None, None, PROBE_TIMEOUT)
                        .await,
                    Ok((200, _))
                );
            }
            // Any HTTP answer (403 without a signature) means the S3 API is serving.
            if admin_healthy
                && http_request(self.s3_port, "GET", "/", None, None, PROBE_TIMEOUT)
                    .await
                    .is_ok()
            {
                // Garage logs a failed S3 bind but keeps running: make sure it's not us.
                return self.check_startup(log_start);
            }
            if Instant::now() >= deadline {
                bail!(
                    "Garage was not ready after {READY_TIMEOUT:?} (admin health ok: \
                     {admin_healthy}); {} ends with:\n{}",
                    self.log_path.display(),
                    log_tail(&self.log_path, LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Fails if the server exited, or if its log since `log_start` says a port is taken.
    fn check_startup(&mut self, log_start: u64) -> Result<()> {
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        let this_run = log.get(log_start as usize..).unwrap_or_default();
        if String::from_utf8_lossy(this_run).contains(ADDR_IN_USE) {
            bail!(
                "Garage could not bind one of its ports; {} ends with:\n{}",
                self.log_path.display(),
                log_tail(&self.log_path, LOG_TAIL_LINES)
            );
        }
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait().context("cannot poll the Garage server")? {
                self.child = None;
                bail!(
                    "Garage exited during startup ({status}); {} ends with:\n{}",
                    self.log_path.display(),
                    log_tail(&self.log_path, LOG_TAIL_LINES)
                );
            }
        }
        Ok(())
    }

    /// POSTs JSON to the admin API and returns the JSON answer; non-2xx is an error.
    async fn admin_post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let (status, answer) = http_request(
            self.admin_port,
            "POST",
            path,
            Some(&self.admin_token),
            Some(body.to_string().as_bytes()),
            ADMIN_TIMEOUT,
        )
        .await
        .with_context(|| format!("admin API request {path} failed"))?;
        let answer = String::from_utf8_lossy(&answer);
        if !(200..300).contains(&status) {
            bail!("admin API {path} answered HTTP {status}: {answer}");
        }
        serde_json::from_str(&answer)
            .with_context(|| format!("admin API {path} answered non-JSON: {answer}"))
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Path of the `garage` binary: `$PGFERRY_TOOLS/bin/garage` (default
/// `/opt/pgferry-tools/bin/garage`), else `garage` on `$PATH`.
pub fn garage_binary() -> Result<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_garage_binary().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn find_garage_binary() -> Result<PathBuf> {
    let tools = std::env::var_os(TOOLS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TOOLS_DIR));
    let in_tools = tools.join("bin").join("garage");
    let candidate = if in_tools.is_file() {
        Some(in_tools.clone())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("garage"))
                .find(|p| p.is_file())
        })
    };
    let Some(binary) = candidate else {
        bail!(
            "the S3 tests need Garage {GARAGE_VERSION}, but there is no {} and no `garage` on \
             $PATH: run `scripts/install-garage.sh` (cargo install, ~30 min; installs to \
             ${TOOLS_ENV}, default {DEFAULT_TOOLS_DIR})",
            in_tools.display()
        );
    };
    let out = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", binary.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    // `garage cargo:2.5.0 [features: ...]` when built by cargo install.
    let has_version = version
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .any(|token| token == GARAGE_VERSION);
    if !out.status.success() || !has_version {
        bail!(
            "{} reports {:?}, but the tests need Garage {GARAGE_VERSION}: run \
             `scripts/install-garage.sh`",
            binary.display(),
            version.trim()
        );
    }
    Ok(binary)
}

/// One HTTP/1.1 request to 127.0.0.1:`port` (`Connection: close`) that must complete
/// within `timeout`; returns the status and the body.
async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    tokio::time::timeout(
        timeout,
        http_request_inner(port, method, path, bearer, body),
    )
    .await
    .map_err(|_| anyhow!("no HTTP answer from 127.0.0.1:{port} within {timeout:?}"))?
}

async fn http_request_inner(
    port: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    if let Some(body) = body {
        stream.write_all(body).await?;
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;

    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP answer from 127.0.0.1:{port}"))?;
    let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line from 127.0.0.1:{port}: {head}"))?;
    let body = answer.split_off(head_end + 4);
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&body)?
    } else {
        body
    };
    Ok((status, body))
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunked HTTP body"))?;
        let size_field = String::from_utf8_lossy(&data[..line_end]);
        let size_hex = size_field.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunked HTTP body");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn start_fails_fast_when_a_port_is_taken() {
        let mut garage = Garage::prepare("GKtest-port-taken", &random_hex(32)).expect("binary");
        // Accepts connections into its backlog but never answers, like a hung server.
        let squatter = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        garage.s3_port = squatter.local_addr().unwrap().port();
        garage.admin_port = free_port();
        garage.write_config(free_port()).unwrap();
        let t0 = Instant::now();
        let err = garage.start_again().await.expect_err("S3 port is taken");
        assert!(format!("{err:#}").contains(ADDR_IN_USE), "{err:#}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(garage.pid().is_none());
    }

    #[test]
    fn dechunk_decodes() {
        let body = b"4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n";
        assert_eq!(dechunk(body).unwrap(), b"Wikipedia");
    }
}
