//! Helpers that start real services for the integration tests: a PostgreSQL cluster from
//! `initdb` ([`postgres::PgCluster`]) and a single-node Garage S3 server
//! ([`garage::Garage`]), each in its own temp dir on free loopback ports, torn down on drop;
//! [`env::TestEnv`] bundles one of each with a way to run the `pgferry` binary, and
//! [`Staging`] adds a second cluster as restore destination.
//!
//! Every test starts its own servers, so tests stay isolated and may run in parallel. A
//! helper that cannot start its service returns an error that says how to fix the machine
//! (install PostgreSQL, run `scripts/install-garage.sh`); tests `expect()` it, so a missing
//! tool fails the test loudly instead of skipping it.

#![allow(dead_code)] // Each test module uses a different subset of the helpers.

pub mod api_daemon;
pub mod env;
pub mod garage;
pub mod postgres;
pub mod prometheus;
pub mod proxy;
pub mod rusage;
pub mod staging;
pub mod tls;

pub use staging::Staging;

use std::collections::HashSet;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The argv of `pgferry restore` of source `prod`'s `database` into namespace `to`, then
/// `extra` (`--as`, `--snapshot`, `--json`, …): every test's restore starts this way.
pub fn restore_argv<'a>(database: &'a str, to: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec![
        "restore",
        "--source",
        "prod",
        "--database",
        database,
        "--to",
        to,
    ];
    argv.extend_from_slice(extra);
    argv
}

/// Every regular file and directory under `dir` (relative path → contents, `None` for a
/// directory); anything else is listed as `Some(b"<other>")`.
pub fn tree_of(dir: &std::path::Path) -> std::collections::BTreeMap<String, Option<Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    let mut pending = vec![std::path::PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in std::fs::read_dir(dir.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            let kind = entry.file_type().unwrap();
            let key = rel.to_string_lossy().into_owned();
            if kind.is_dir() {
                out.insert(key, None);
                pending.push(rel);
            } else if kind.is_file() {
                out.insert(key, Some(std::fs::read(entry.path()).unwrap()));
            } else {
                out.insert(key, Some(b"<other>".to_vec()));
            }
        }
    }
    out
}

/// The names in a directory, sorted.
pub fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// How long a helper waits for a server to become ready before giving up with its log.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval between two readiness probes: short, because startup is on every test's path.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Returns once the wall clock's whole second has changed (polled, bounded): forced manual
/// snapshots are named by the current second.
pub async fn next_second() {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let start = now();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while now() == start {
        assert!(std::time::Instant::now() < deadline, "the clock stopped");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// SIGKILLs `child` (a pgferry run) `delay` after a name starting with `prefix` appears in
/// `parent` (polled for up to 120 s); waits for it (≤ 180 s) and returns whether it died of
/// that kill (else it finished first).
pub async fn kill_when_appears(
    mut child: tokio::process::Child,
    parent: std::path::PathBuf,
    prefix: String,
    delay: Duration,
) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pid = child.id().unwrap() as i32;
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let watcher = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline && !finished.load(Ordering::Relaxed) {
            let seen = std::fs::read_dir(&parent).is_ok_and(|rd| {
                rd.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            });
            if seen {
                std::thread::sleep(delay);
                // SAFETY: kill(2) of the child this test started (maybe already gone).
                return unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
            }
        }
        false
    });
    let status = tokio::time::timeout(Duration::from_secs(180), child.wait())
        .await
        .expect("the restore hung")
        .unwrap();
    done.store(true, Ordering::Relaxed);
    let killed = tokio::task::spawn_blocking(move || watcher.join().unwrap())
        .await
        .unwrap();
    killed && status.code().is_none()
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and dropping the listener, so another process may
/// take it before the caller binds it; the helpers retry with a new port when a server fails
/// to start. Within this process, a port is never handed out twice.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("cannot bind 127.0.0.1:0 to find a free port: is the loopback interface up?");
        let mut handed_out = handed_out.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Returns `<prefix>-<12 random hex digits>`, lowercased and limited to `[a-z0-9-]`, at most
/// 63 characters: valid as an S3 bucket name, a PostgreSQL identifier and a path segment.
pub fn unique_name(prefix: &str) -> String {
    const MAX_LEN: usize = 63; // S3 bucket names and PostgreSQL identifiers (NAMEDATALEN - 1).
    let suffix = random_hex(6);
    let mut clean: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(MAX_LEN - suffix.len() - 1);
    let clean = clean.trim_matches('-');
    if clean.is_empty() {
        format!("t-{suffix}")
    } else {
        format!("{clean}-{suffix}")
    }
}

/// Returns `bytes` random bytes from the kernel, hex-encoded (`2 * bytes` characters).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("cannot read /dev/urandom for test randomness");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Returns the last `max_lines` lines of a log file, or a note saying why it can't be read.
pub(crate) fn log_tail(path: &std::path::Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// True when this process runs with effective uid 0 (read from `/proc/self/status`).
pub(crate) fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            // "Uid:\treal\teffective\tsaved\tfs"
            uids.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_name_is_bucket_safe() {
        let name = unique_name("My_Test Bucket!");
        assert!(name.starts_with("my-test-bucket-"), "{name}");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert_ne!(unique_name("x"), unique_name("x"));
        assert_eq!(unique_name(&"a".repeat(100)).len(), 63);
        assert!(unique_name("--").starts_with("t-"));
    }

    #[test]
    fn free_port_is_not_repeated() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
    }
}
