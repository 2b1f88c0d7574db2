//! Sources: PostgreSQL connections, database discovery, and the PostgreSQL client tools.
//!
//! This module knows how to reach a server (tokio-postgres, with the password from the URL,
//! `PGPASSWORD` or a passfile), which databases a source selects, which `pg_dump`/`pg_restore`
//! matches a server, and how to start them so that no password ever appears in their argv.
//! TLS follows the URL's `sslmode` (see `conninfo::tls`), for our connections and the tools alike.
//! It does not read the dump stream: that is `pipeline`'s job.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_postgres::config::Host;
use tokio_postgres::Client;

use crate::config::PgUrl;

use crate::conninfo::tls::SslMode;

pub mod select;

pub use select::discover;

/// How much of a child's stderr is kept for the error message (its tail).
const STDERR_TAIL_BYTES: usize = 8 * 1024;

/// Where Debian (and our image) install each major's client tools.
pub const PG_LIB_DIR: &str = "/usr/lib/postgresql";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to {url}: {}", pg_message(source))]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {url}: the server does not support TLS but sslmode={mode}; turn ssl on in the server's postgresql.conf, or lower sslmode in the URL")]
    NoServerTls { url: String, mode: SslMode },
    #[error("cannot connect to {url}: {message}")]
    TlsSetup { url: String, message: String },
    #[error("query on {url} failed: {}", pg_message(source))]
    Query {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("{tool} not found at {path}; install the PostgreSQL {major} client tools (Debian: postgresql-client-{major}) or set pg_bin_dir")]
    ToolMissing {
        tool: &'static str,
        path: PathBuf,
        major: u32,
    },
    #[error("cannot run {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{tool} at {path} is version {tool_version}, older than the server ({server_version}); it cannot dump a newer server: install postgresql-client-{server_major} or point pg_bin_dir at it")]
    ToolTooOld {
        tool: &'static str,
        path: PathBuf,
        tool_version: String,
        server_version: String,
        server_major: u32,
    },
    #[error("cannot read the version of {path}: it printed {printed:?}")]
    ToolVersion { path: PathBuf, printed: String },
    #[error("{path} --version printed nothing for {after:?}; it was killed. Check that the binary is a working PostgreSQL client tool")]
    ToolVersionTimeout { path: PathBuf, after: Duration },
}

impl SourceError {
    /// Whether trying again later may succeed (network, server restart), as opposed to a
    /// configuration problem a human must fix.
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Connect { source, .. } | SourceError::Query { source, .. } => {
                source.code().is_none()
                    || source
                        .code()
                        .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57"))
            }
            _ => false,
        }
    }
}

/// The useful text of a tokio-postgres error: the server's message for database errors
/// (tokio-postgres displays only "db error"), else the error with its causes.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// A PostgreSQL server version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    /// `server_version_num`, e.g. 150018.
    pub num: u32,
    /// `server_version`, e.g. "15.18 (Debian 15.18-0+deb12u1)"; only the first word is kept.
    pub text: String,
}

impl ServerVersion {
    pub fn major(&self) -> u32 {
        self.num / 10_000
    }
}

/// The password for a connection: the URL's own, else `PGPASSWORD`, else the passfile
/// (`PGPASSFILE` or `~/.pgpass`), as libpq does.
pub fn resolve_password(cfg: &tokio_postgres::Config) -> Option<Vec<u8>> {
    if let Some(p) = cfg.get_password() {
        return Some(p.to_vec());
    }
    if let Ok(p) = std::env::var("PGPASSWORD") {
        return Some(p.into_bytes());
    }
    let file = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    let text = std::fs::read_to_string(file).ok()?;
    let host = match cfg.get_hosts().first()? {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let db = cfg.get_dbname().unwrap_or("postgres");
    let user = cfg.get_user().unwrap_or("postgres");
    passfile_lookup(&text, &host, &port, db, user).map(String::into_bytes)
}

/// One lookup in a `.pgpass` text: `host:port:db:user:password`, `*` matches anything,
/// `\:` and `\\` escape.
fn passfile_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let ok = |f: &str, v: &str| f == "*" || f == v;
        if ok(&fields[0], host)
            && ok(&fields[1], port)
            && ok(&fields[2], db)
            && ok(&fields[3], user)
        {
            return fields.pop();
        }
    }
    None
}

/// A copy of `url` connecting to `database` instead.
pub fn with_database(url: &PgUrl, database: &str) -> tokio_postgres::Config {
    let mut cfg = url.parsed.clone();
    cfg.dbname(database);
    cfg
}

/// Connects to `database` on the server of `url` (its own database when None), with TLS as
/// the URL's `sslmode` says. Every connection pgferry makes goes through here.
pub async fn connect(url: &PgUrl, database: Option<&str>) -> Result<Client, SourceError> {
    let mut cfg = match database {
        Some(db) => with_database(url, db),
        None => url.parsed.clone(),
    };
    if cfg.get_password().is_none() {
        if let Some(p) = resolve_password(&cfg) {
            cfg.password(p);
        }
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("pgferry");
    }
    cfg.connect_timeout(Duration::from_secs(15));
    let tls = url
        .tls
        .connector()
        .map_err(|message| SourceError::TlsSetup {
            url: url.redacted(),
            message,
        })?;
    let (client, connection) = cfg.connect(tls).await.map_err(|source| {
        // tokio-postgres' own words when the server answers "no" to the TLS request.
        if url.tls.mode.requires_tls()
            && pg_message(&source).contains("server does not support TLS")
        {
            SourceError::NoServerTls {
                url: url.redacted(),
                mode: url.tls.mode,
            }
        } else {
            SourceError::Connect {
                url: url.redacted(),
                source,
            }
        }
    })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(message = "PostgreSQL connection ended.", error = %error);
        }
    });
    Ok(client)
}

/// The server's version.
pub async fn server_version(client: &Client, url: &PgUrl) -> Result<ServerVersion, SourceError> {
    let row = query_one(
        client,
        url,
        "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
        &[],
    )
    .await?;
    let num: i32 = row.get(0);
    let text: String = row.get(1);
    Ok(ServerVersion {
        num: num as u32,
        text: text.split_whitespace().next().unwrap_or("").to_string(),
    })
}

/// The server's `system_identifier` (`pg_control_system()`): the same for every address,
/// alias or port that reaches one cluster, and different for every other cluster (a
/// physical replica shares its primary's). Text, since it is an unsigned 64-bit number.
pub async fn system_identifier(client: &Client, url: &PgUrl) -> Result<String, SourceError> {
    let row = query_one(
        client,
        url,
        "SELECT system_identifier::text FROM pg_control_system()",
        &[],
    )
    .await?;
    Ok(row.get(0))
}

/// One row of `sql`; a failure names the (redacted) server.
async fn query_one(
    client: &Client,
    url: &PgUrl,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<tokio_postgres::Row, SourceError> {
    client
        .query_one(sql, params)
        .await
        .map_err(|source| SourceError::Query {
            url: url.redacted(),
            source,
        })
}

/// On-disk size of a database, to size upload parts.
pub async fn database_size(
    client: &Client,
    url: &PgUrl,
    database: &str,
) -> Result<u64, SourceError> {
    let row = query_one(client, url, "SELECT pg_database_size($1)", &[&database]).await?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

/// A PostgreSQL client tool of a known version.
#[derive(Debug, Clone)]
pub struct PgTool {
    pub path: PathBuf,
    /// e.g. "15.18"
    pub version: String,
    pub major: u32,
}

/// Finds `tool` (pg_dump, pg_restore) for a server: in `bin_dir` when configured, else
/// `/usr/lib/postgresql/<server major>/bin`. A tool older than the server is refused.
pub async fn find_tool(
    tool: &'static str,
    bin_dir: Option<&Path>,
    server: &ServerVersion,
) -> Result<PgTool, SourceError> {
    find_tool_within(tool, bin_dir, server, TOOL_VERSION_TIMEOUT).await
}

/// How long `<tool> --version` may take: a stopped or hung binary must not hold a run (and
/// its `max_concurrent_backups` permit) forever.
const TOOL_VERSION_TIMEOUT: Duration = Duration::from_secs(30);

async fn find_tool_within(
    tool: &'static str,
    bin_dir: Option<&Path>,
    server: &ServerVersion,
    timeout: Duration,
) -> Result<PgTool, SourceError> {
    let dir = bin_dir.map(Path::to_path_buf).unwrap_or_else(|| {
        Path::new(PG_LIB_DIR)
            .join(server.major().to_string())
            .join("bin")
    });
    let path = dir.join(tool);
    if !path.exists() {
        return Err(SourceError::ToolMissing {
            tool,
            path,
            major: server.major(),
        });
    }
    // kill_on_drop: on timeout the future is dropped, and with it the child.
    let probe = tokio::process::Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| SourceError::ToolVersionTimeout {
            path: path.clone(),
            after: timeout,
        })?
        .map_err(|source| SourceError::Spawn {
            path: path.clone(),
            source,
        })?;
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (version, major) =
        parse_tool_version(&printed).ok_or_else(|| SourceError::ToolVersion {
            path: path.clone(),
            printed: printed.clone(),
        })?;
    if major < server.major() {
        return Err(SourceError::ToolTooOld {
            tool,
            path,
            tool_version: version,
            server_version: server.text.clone(),
            server_major: server.major(),
        });
    }
    Ok(PgTool {
        path,
        version,
        major,
    })
}

/// "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" → ("15.18", 15).
fn parse_tool_version(printed: &str) -> Option<(String, u32)> {
    let word = printed
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let major = word
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((word.to_string(), major))
}

/// libpq environment for a child tool connecting to `database` on the server of `url`: host,
/// port, user, database and password travel in the environment, never in argv (where `ps`
/// would show them); so do the TLS settings, the same our own connections use.
pub fn libpq_env(url: &PgUrl, database: &str) -> Vec<(&'static str, String)> {
    let cfg = &with_database(url, database);
    let info = url.info();
    let mut env = Vec::new();
    // Every host, port and hostaddr of the list, as libpq reads them: the tools reach the
    // same servers, in the same order, as our own connections.
    for (var, key) in [
        ("PGHOST", "host"),
        ("PGPORT", "port"),
        ("PGHOSTADDR", "hostaddr"),
        ("PGUSER", "user"),
        ("PGOPTIONS", "options"),
        ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ] {
        if let Some(v) = info.get(key).filter(|v| !v.is_empty()) {
            let v = if key == "host" {
                info.hosts().join(",")
            } else {
                v.to_string()
            };
            env.push((var, v));
        }
    }
    env.push(("PGDATABASE", database.to_string()));
    if let Some(p) = resolve_password(cfg) {
        env.push(("PGPASSWORD", String::from_utf8_lossy(&p).into_owned()));
    }
    env.extend(url.tls.libpq_env());
    env.push(("PGAPPNAME", "pgferry".to_string()));
    env.push(("PGCONNECT_TIMEOUT", "15".to_string()));
    env
}

/// Starts `pg_dump -Fc -Z0` of `database`; stdout is the archive, stderr is captured.
/// `lock_wait_timeout` becomes `--lock-wait-timeout`: pg_dump fails instead of waiting
/// forever for a table lock another session holds (see [`lock_blockers`]).
pub fn spawn_pg_dump(
    tool: &PgTool,
    url: &PgUrl,
    database: &str,
    lock_wait_timeout: std::time::Duration,
) -> Result<tokio::process::Child, SourceError> {
    let mut cmd = tokio::process::Command::new(&tool.path);
    cmd.args(["--format=custom", "--compress=0", "--no-password"])
        .arg(format!(
            "--lock-wait-timeout={}",
            lock_wait_timeout.as_millis().max(1)
        ))
        .env_clear()
        .envs(libpq_env(url, database))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| SourceError::Spawn {
        path: tool.path.clone(),
        source,
    })?;
    if let Some(stdout) = &child.stdout {
        enlarge_pipe(stdout);
    }
    Ok(child)
}

/// Whether pg_dump's stderr says it gave up waiting for a table lock.
/// pg_dump implements `--lock-wait-timeout` with `statement_timeout` around its `LOCK TABLE`.
pub fn is_lock_timeout(stderr: &str) -> bool {
    stderr.contains("could not obtain lock on relation")
        || (stderr.contains("LOCK TABLE")
            && (stderr.contains("statement timeout") || stderr.contains("lock timeout")))
}

/// Sessions holding or waiting-before-us for a lock that conflicts with pg_dump's
/// `ACCESS SHARE`, in `database`: who blocks a dump, and since when.
const LOCK_BLOCKERS_SQL: &str = "\
SELECT DISTINCT ON (a.pid) \
       coalesce(n.nspname || '.' || c.relname, l.relation::text), a.pid, \
       coalesce(a.usename::text, ''), coalesce(a.application_name, ''), coalesce(a.state, ''), \
       coalesce(to_char(coalesce(a.xact_start, a.query_start) AT TIME ZONE 'UTC', \
                'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '') \
FROM pg_locks l \
JOIN pg_database d ON d.oid = l.database AND d.datname = $1 \
JOIN pg_stat_activity a ON a.pid = l.pid \
LEFT JOIN pg_class c ON c.oid = l.relation \
LEFT JOIN pg_namespace n ON n.oid = c.relnamespace \
WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'AccessExclusiveLock' \
  AND a.pid <> pg_backend_pid() \
ORDER BY a.pid";

/// One session that holds a lock a dump cannot get past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockBlocker {
    pub table: String,
    pub pid: i32,
    pub user: String,
    pub application_name: String,
    pub state: String,
    /// When its transaction (or else its query) started, UTC.
    pub since: String,
}

impl std::fmt::Display for LockBlocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table {} is locked by pid {} (user {:?}, application {:?}, state {:?}, since {})",
            self.table, self.pid, self.user, self.application_name, self.state, self.since
        )
    }
}

/// The sessions holding `ACCESS EXCLUSIVE` table locks in `database` (what makes pg_dump's
/// `--lock-wait-timeout` expire), read from `pg_locks` and `pg_stat_activity`.
pub async fn lock_blockers(url: &PgUrl, database: &str) -> Result<Vec<LockBlocker>, SourceError> {
    let client = connect(url, None).await?;
    let rows = client
        .query(LOCK_BLOCKERS_SQL, &[&database])
        .await
        .map_err(|source| SourceError::Query {
            url: url.redacted(),
            source,
        })?;
    Ok(rows
        .iter()
        .map(|r| LockBlocker {
            table: r.get(0),
            pid: r.get(1),
            user: r.get(2),
            application_name: r.get(3),
            state: r.get(4),
            since: r.get(5),
        })
        .collect())
}

/// Pipe buffer we ask the kernel for between pg_dump and us (Linux's default is 64 KiB;
/// 1 MiB is the default `pipe-max-size`, so no privilege is needed). pg_dump writes in small
/// pieces; a larger pipe lets it run ahead while we compress, with fewer wake-ups on both sides.
const PIPE_BYTES: libc::c_int = 1024 * 1024;

fn enlarge_pipe(stdout: &tokio::process::ChildStdout) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own; failure only leaves the default size.
    let rc = unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    if rc < 0 {
        tracing::debug!(message = "Could not enlarge the pg_dump pipe.", error = %std::io::Error::last_os_error());
    }
}

/// Reads a child's stderr to the end, keeping the last `STDERR_TAIL_BYTES`, with the
/// connection's password scrubbed in case a tool ever echoes it.
pub async fn read_stderr_tail(
    mut stderr: tokio::process::ChildStderr,
    password: Option<Vec<u8>>,
) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL_BYTES {
                    tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                }
            }
        }
    }
    if tail.len() > STDERR_TAIL_BYTES {
        tail.drain(..tail.len() - STDERR_TAIL_BYTES);
    }
    let mut text = String::from_utf8_lossy(&tail).trim().to_string();
    if let Some(p) = password.filter(|p| !p.is_empty()) {
        text = text.replace(&*String::from_utf8_lossy(&p), "<redacted>");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_versions() {
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(("15.18".into(), 15))
        );
        assert_eq!(
            parse_tool_version("pg_restore (PostgreSQL) 17beta1"),
            Some(("17beta1".into(), 17))
        );
        assert_eq!(parse_tool_version("garbage"), None);
    }

    #[test]
    fn passfile() {
        let text = "# comment\nother:5432:*:u:no\n127.0.0.1:*:*:u:pa\\:ss\n";
        assert_eq!(
            passfile_lookup(text, "127.0.0.1", "5433", "db", "u").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(passfile_lookup(text, "x", "5432", "db", "v"), None);
    }

    #[test]
    fn env_carries_the_password_not_argv() {
        let url = PgUrl::parse("postgres://u:p%40ss@127.0.0.1:5433/postgres").unwrap();
        let env = libpq_env(&url, "acme");
        let get = |k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PGPASSWORD"), Some("p@ss"));
        assert_eq!(get("PGDATABASE"), Some("acme"));
        assert_eq!(get("PGPORT"), Some("5433"));
        assert_eq!(get("PGSSLMODE"), Some("prefer"));
        assert_eq!(get("PGSSLROOTCERT"), None);
    }

    #[test]
    fn env_carries_the_tls_settings_tokio_postgres_cannot_parse() {
        let url = PgUrl::parse(
            "postgres://u@db.svc/postgres?sslmode=verify-full&sslrootcert=/etc/pgferry/ca.pem",
        )
        .unwrap();
        assert_eq!(
            url.parsed.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let env = libpq_env(&url, "acme");
        let get = |k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PGSSLMODE"), Some("verify-full"));
        assert_eq!(get("PGSSLROOTCERT"), Some("/etc/pgferry/ca.pem"));
        // Unix sockets never use TLS (libpq ignores sslmode there).
        let socket = PgUrl::parse("host=/run/postgresql sslmode=require").unwrap();
        assert_eq!(
            socket.parsed.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    /// A tool whose `--version` never answers (a stopped or hung binary) fails the lookup
    /// within the timeout, and the probe is killed, instead of holding the run forever.
    #[tokio::test]
    async fn a_hung_version_probe_is_bounded_and_killed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pid");
        let tool = dir.path().join("pg_dump");
        std::fs::write(
            &tool,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 300\n",
                marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let server = ServerVersion {
            num: 150000,
            text: "15.0".into(),
        };
        let started = std::time::Instant::now();
        let err = find_tool_within(
            "pg_dump",
            Some(dir.path()),
            &server,
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(err, SourceError::ToolVersionTimeout { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("--version printed nothing"),
            "{err}"
        );
        // The probe is gone (killed on drop, then reaped by tokio's orphan reaper).
        let pid = std::fs::read_to_string(&marker).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
            // Gone, or a zombie awaiting the reaper: either way it no longer runs.
            if state.as_ref().map_or(true, |s| s.contains(") Z ")) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the probe still runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
