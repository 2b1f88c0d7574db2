//! Checks on where targets put things, spanning several `[[target]]` entries or keys:
//! overlapping target locations and the orphan grace's floor.
//!
//! Two targets whose locations overlap (the same bucket on the same endpoint with one prefix
//! inside the other, or one directory inside another) are one copy, not two, and each would
//! list the other's objects as its own. A grace shorter than a backup lets `prune` abort an
//! upload still in progress. Pure: no I/O.

use std::path::Path;
use std::time::Duration;

use super::{TargetConfig, TargetKind};

/// The shortest `pipeline.orphan_grace` accepted: a dump or upload marker younger than this
/// may belong to a backup still uploading (the grace must exceed the longest backup), and
/// prune would abort it. An hour is the floor; the default is a day.
pub const MIN_ORPHAN_GRACE: Duration = Duration::from_secs(60 * 60);

/// `Err(message)` when `grace` is below [`MIN_ORPHAN_GRACE`].
pub(super) fn check_orphan_grace(grace: Duration) -> Result<(), String> {
    if grace < MIN_ORPHAN_GRACE {
        return Err(format!(
            "{} is too short: a dump or upload younger than the grace may belong to a backup still running, which prune would then abort; use at least 1h, and more than your longest backup (default 24h)",
            humantime::format_duration(grace)
        ));
    }
    Ok(())
}

/// The first pair of targets whose locations overlap: `Err((index of the later one,
/// message))`.
pub(super) fn check_target_overlap(targets: &[TargetConfig]) -> Result<(), (usize, String)> {
    for (i, later) in targets.iter().enumerate() {
        for earlier in &targets[..i] {
            if overlap(earlier, later) {
                return Err((
                    i,
                    format!(
                        "{:?} overlaps target {:?} ({:?}): one location inside the other is one copy, not two, and each target would take the other's objects for its own; give each target its own bucket, prefix or directory, neither inside the other",
                        later.url, earlier.name, earlier.url
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn overlap(a: &TargetConfig, b: &TargetConfig) -> bool {
    match (&a.kind, &b.kind) {
        (
            TargetKind::S3 {
                bucket: ba,
                endpoint: ea,
                ..
            },
            TargetKind::S3 {
                bucket: bb,
                endpoint: eb,
                ..
            },
        ) => {
            ba == bb
                && same_endpoint(ea.as_deref(), eb.as_deref())
                && nested(&segments(&a.prefix), &segments(&b.prefix))
        }
        (TargetKind::File { root: ra }, TargetKind::File { root: rb }) => {
            let (ra, rb) = (resolve(ra), resolve(rb));
            ra.starts_with(&rb) || rb.starts_with(&ra)
        }
        _ => false,
    }
}

/// An endpoint as a comparable string: scheme and host lowercased, no trailing slash.
fn endpoint_id(endpoint: Option<&str>) -> String {
    endpoint
        .unwrap_or("")
        .trim_end_matches('/')
        .to_ascii_lowercase()
}

/// Whether two endpoints reach the same server: the same text, or the same scheme and port
/// with host names that resolve to a common address (`localhost` and `127.0.0.1`; any two
/// loopback addresses count as one machine). A name that does not resolve here is compared
/// as written.
fn same_endpoint(a: Option<&str>, b: Option<&str>) -> bool {
    if endpoint_id(a) == endpoint_id(b) {
        return true;
    }
    let (Some(a), Some(b)) = (
        a.and_then(|e| url::Url::parse(e).ok()),
        b.and_then(|e| url::Url::parse(e).ok()),
    ) else {
        return false;
    };
    if a.scheme() != b.scheme() || a.port_or_known_default() != b.port_or_known_default() {
        return false;
    }
    let (ips_a, ips_b) = (addresses(&a), addresses(&b));
    ips_a.iter().any(|x| {
        ips_b
            .iter()
            .any(|y| x == y || (x.is_loopback() && y.is_loopback()))
    })
}

fn addresses(u: &url::Url) -> Vec<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let Some(host) = u.host_str() else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = u.port_or_known_default().unwrap_or(0);
    (host, port)
        .to_socket_addrs()
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .unwrap_or_default()
}

/// `dir` as the file system sees it: its longest existing ancestor with symlinks resolved
/// (`canonicalize`), then the rest lexically (the directory may not exist yet).
fn resolve(dir: &Path) -> std::path::PathBuf {
    let lexical = normalize(dir);
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return rest
                .iter()
                .rev()
                .fold(real, |p: std::path::PathBuf, c| p.join(c));
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return lexical,
        }
    }
}

fn segments(prefix: &str) -> Vec<&str> {
    prefix.split('/').filter(|s| !s.is_empty()).collect()
}

/// Whether one segment list is a prefix of the other (equal included).
fn nested(a: &[&str], b: &[&str]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// `dir` without `.` segments and with `..` applied, lexically (the directories may not exist
/// yet).
fn normalize(dir: &Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for c in dir.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn check(targets: &str) -> Result<Config, String> {
        let text =
            format!("[[source]]\nname = \"prod\"\nurl = \"postgres://u@h/postgres\"\n{targets}");
        Config::from_str_at(&text, std::path::Path::new("/etc/pgferry/x.toml"))
            .map_err(|e| e.to_string())
    }

    fn s3(name: &str, url: &str, endpoint: &str) -> String {
        format!("[[target]]\nname = \"{name}\"\nurl = \"{url}\"\nendpoint = \"{endpoint}\"\n")
    }

    fn file(name: &str, dir: &str) -> String {
        format!("[[target]]\nname = \"{name}\"\nurl = \"file://{dir}\"\n")
    }

    #[test]
    fn aliases_of_one_location_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("files");
        std::fs::create_dir_all(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        for (a, b) in [
            (real.clone(), link.clone()),
            (real.clone(), link.join("inner")),
        ] {
            let text = file("a", a.to_str().unwrap()) + &file("b", b.to_str().unwrap());
            assert!(check(&text).is_err(), "{a:?} and {b:?}");
        }
        let text = s3("a", "s3://bkt/p", "http://127.0.0.1:3900")
            + &s3("b", "s3://bkt/p", "http://localhost:3900");
        assert!(
            check(&text).is_err(),
            "localhost and 127.0.0.1 are one server"
        );
        let text = s3("a", "s3://bkt/p", "http://127.0.0.1:3900")
            + &s3("b", "s3://bkt/p", "http://127.0.0.1:3901");
        assert!(check(&text).is_ok(), "another port is another server");
    }

    #[test]
    fn overlapping_targets_are_refused() {
        let e1 = "http://s3.one:3900";
        let e2 = "https://s3.two";
        // Targets a and b: both on S3 at e1, or both directories.
        let s3s = |a: &str, b: &str| (s3("a", a, e1), s3("b", b, e1));
        let dirs = |a: &str, b: &str| (file("a", a), file("b", b));
        for (a, b) in [
            s3s("s3://bkt/nest", "s3://bkt/nest/eu"),
            s3s("s3://bkt/nest/eu/", "s3://bkt/nest"),
            s3s("s3://bkt/pg", "s3://bkt/pg"),
            s3s("s3://bkt", "s3://bkt/pg"),
            dirs("/var/lib/pgferry", "/var/lib/pgferry/eu"),
            dirs("/var/lib/pgferry", "/var/lib/pgferry/"),
            dirs("/var/lib/x/../pgferry/a", "/var/lib/pgferry"),
        ] {
            let err = check(&format!("{a}{b}")).unwrap_err();
            assert!(err.contains("target[1].url"), "{err}");
            assert!(err.contains("overlaps target \"a\""), "{err}");
        }
        for (a, b) in [
            s3s("s3://bkt/nest", "s3://bkt/nesting"),
            s3s("s3://bkt/pg", "s3://other/pg"),
            (s3("a", "s3://bkt/pg", e1), s3("b", "s3://bkt/pg", e2)),
            dirs("/var/lib/pgferry", "/var/lib/pgferry2"),
            (s3("a", "s3://bkt/pg", e1), file("b", "/bkt/pg")),
        ] {
            check(&format!("{a}{b}")).unwrap();
        }
    }

    #[test]
    fn orphan_grace_below_an_hour_is_refused() {
        let t = file("a", "/var/lib/pgferry");
        for bad in ["0s", "59m"] {
            let err = check(&format!("[pipeline]\norphan_grace = \"{bad}\"\n{t}")).unwrap_err();
            assert!(err.contains("pipeline.orphan_grace"), "{err}");
            assert!(err.contains("at least 1h"), "{err}");
        }
        check(&format!("[pipeline]\norphan_grace = \"1h\"\n{t}")).unwrap();
    }
}
