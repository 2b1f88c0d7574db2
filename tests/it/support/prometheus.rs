//! A real Prometheus (Debian's `prometheus` package, /usr/bin/prometheus) that scrapes given
//! loopback targets, with its storage in a temp dir, listening on a free loopback port; and a
//! blocking client for its query API. Dropping it stops the server.
//!
//! Wire it into `support/mod.rs` with `pub mod prometheus;` (until then tests/it/deploy.rs
//! includes this file by path).
#![allow(dead_code)] // each test uses a part of it

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Scrapes every second, so a test sees its first samples within a few seconds.
const SCRAPE_INTERVAL: &str = "1s";
/// Startup of an empty Prometheus takes about a second; this leaves room on a loaded machine.
const READY_DEADLINE: Duration = Duration::from_secs(60);

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (host:port on loopback, path /metrics) as `job`,
    /// and waits until it is ready.
    pub fn start(job: &str, targets: &[SocketAddr]) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).is_file(),
            "{PROMETHEUS} not found (Debian package prometheus): run scripts/setup.sh as root"
        );
        for t in targets {
            assert!(t.ip().is_loopback(), "only loopback targets: {t}");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n\
             scrape_configs:\n  - job_name: '{job}'\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = free_loopback_addr();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PROMETHEUS}: {e}"));
        let mut prom = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_DEADLINE;
        while !matches!(http_get(addr, "/-/ready"), Ok((200, _))) {
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", prom.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prom.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prom
    }

    /// Prometheus' own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates an instant query; Err carries Prometheus' error (e.g. a parse error).
    pub fn try_query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let query: String = url::form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={query}"))
            .map_err(|e| format!("query API: {e}"))?;
        let reply: Value =
            serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
        if reply["status"] != "success" {
            return Err(format!("{}: {}", reply["errorType"], reply["error"]));
        }
        Ok(match &reply["data"]["result"] {
            Value::Array(series) => series.clone(),
            scalar => vec![scalar.clone()],
        })
    }

    /// Polls an instant query until it returns at least one series.
    pub fn wait_for(&self, expr: &str, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_query(expr) {
                Ok(series) if !series.is_empty() => return series,
                Err(e) => panic!("query {expr:?} failed: {e}"),
                Ok(_) => {}
            }
            assert!(
                Instant::now() < deadline,
                "no result for {expr:?} in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port free right now (the kernel picks it).
pub fn free_loopback_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], super::free_port()))
}

/// A minimal HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}
