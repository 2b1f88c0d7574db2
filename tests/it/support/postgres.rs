//! [`PgCluster`]: a throwaway PostgreSQL cluster for one test.
//!
//! `initdb` into a temp dir under `/tmp`, a server on a free 127.0.0.1 port with a random
//! superuser password (scram-sha-256 over TCP), durability turned off for speed. The cluster
//! can be stopped and restarted on the same port with the same data, to inject faults; it is
//! stopped and deleted on drop. PostgreSQL refuses to run as root, so when the tests run as
//! root every server binary runs as the `postgres` OS user through `runuser`.
//!
//! It also computes [`PgCluster::table_fingerprints`], the per-table row count and content
//! hash that restore tests compare between a source database and its restored copy.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio_postgres::{Client, NoTls};

use super::{free_port, log_tail, random_hex, running_as_root, POLL_INTERVAL, READY_TIMEOUT};

/// Where Debian's `postgresql-<major>` packages install their binaries, one dir per major.
const PG_LIB_DIR: &str = "/usr/lib/postgresql";

/// Environment variable that overrides the server binary directory (must hold `initdb`,
/// `pg_ctl` and `postgres`), e.g. to test against an older major version.
pub const PG_BIN_DIR_ENV: &str = "PGFERRY_PG_BIN_DIR";

/// OS user that runs the server binaries when the tests run as root.
const POSTGRES_OS_USER: &str = "postgres";

/// Attempts to start the server on a fresh port when the chosen one turns out to be taken.
const START_ATTEMPTS: usize = 3;

/// Lines of the server log quoted in start errors.
const LOG_TAIL_LINES: usize = 30;

/// One `initdb`'d PostgreSQL cluster in a temp dir; stopped and removed on drop.
pub struct PgCluster {
    /// Owns the temp dir; dropping it deletes the cluster's files.
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    password: String,
    /// Run the server binaries through `runuser -u postgres` (we are root).
    as_postgres_user: bool,
    running: bool,
    /// Where the server's Unix socket is.
    socket_dir: PathBuf,
    /// Started with [`start_with_tls`](Self::start_with_tls): TCP takes TLS only, so the
    /// helper's own connections go through the Unix socket.
    tls: bool,
}

/// The server certificate of a TLS cluster: PEM files, copied into the data directory.
pub struct ServerTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    /// When set, TCP clients must also present a certificate from this CA whose CN is their
    /// user name (`clientcert=verify-full`), besides the password.
    pub client_ca: Option<&'a Path>,
}

impl PgCluster {
    /// The superuser role created by `initdb -U`.
    pub const SUPERUSER: &str = "postgres";

    /// Creates a cluster with the newest installed PostgreSQL, starts it on a free port of
    /// 127.0.0.1 and waits until it accepts a superuser connection.
    pub async fn start() -> Result<PgCluster> {
        Self::start_inner(None).await
    }

    /// Like [`start`](Self::start), with `ssl = on` and the given certificate, and a
    /// `pg_hba.conf` that accepts TCP connections only over TLS (`hostssl`): a client that
    /// connects over TCP at all used TLS.
    pub async fn start_with_tls(tls: ServerTls<'_>) -> Result<PgCluster> {
        Self::start_inner(Some(tls)).await
    }

    async fn start_inner(tls: Option<ServerTls<'_>>) -> Result<PgCluster> {
        let bin_dir = find_bin_dir()?;
        let as_postgres_user = running_as_root();
        // /tmp, not $TMPDIR: the postgres OS user must be able to traverse every parent.
        let tmp_root = if as_postgres_user {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("pgferry-pg-")
            .tempdir_in(&tmp_root)
            .with_context(|| format!("cannot create a temp dir in {}", tmp_root.display()))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .context("cannot chmod the cluster temp dir")?;

        let password = random_hex(16);
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).context("cannot write the pwfile")?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))
            .context("cannot chmod the pwfile")?;
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).context("cannot create the socket dir")?;
        if as_postgres_user {
            chown_to_postgres(dir.path())?;
            chown_to_postgres(&pwfile)?;
            chown_to_postgres(&socket_dir)?;
        }

        let mut cluster = PgCluster {
            data_dir: dir.path().join("data"),
            log_file: dir.path().join("server.log"),
            dir,
            bin_dir,
            port: 0,
            password,
            as_postgres_user,
            running: false,
            socket_dir: socket_dir.clone(),
            tls: tls.is_some(),
        };

        let out = cluster
            .pg_command("initdb")
            .arg("-D")
            .arg(&cluster.data_dir)
            .args(["-A", "scram-sha-256", "-E", "UTF8", "--locale=C"])
            // Speed: no fsync, and a 1 MiB WAL segment to zero-fill instead of 16 MiB
            // (pg_dump and pg_restore don't care about the segment size).
            .args(["--no-sync", "--wal-segsize=1"])
            .arg("-U")
            .arg(Self::SUPERUSER)
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .await
            .with_context(|| {
                format!(
                    "cannot run {}/initdb: is PostgreSQL installed (apt-get install postgresql)?",
                    cluster.bin_dir.display()
                )
            })?;
        check_output("initdb", &out)?;
        std::fs::remove_file(&pwfile).context("cannot remove the pwfile")?;

        // Settings the port doesn't depend on; the port goes in on each start attempt.
        append_conf(
            &cluster.data_dir,
            &format!(
                "\n# pgferry test cluster\n\
                 listen_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{}'\n\
                 max_connections = 100\n\
                 fsync = off\n\
                 synchronous_commit = off\n\
                 full_page_writes = off\n",
                socket_dir.display()
            ),
        )?;

        if let Some(tls) = tls {
            cluster.set_up_tls(&tls)?;
        }

        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            cluster.port = free_port();
            append_conf(&cluster.data_dir, &format!("port = {}\n", cluster.port))?;
            match cluster.start_server().await {
                Ok(()) => return Ok(cluster),
                // Another process may have taken the port between free_port() and the bind.
                Err(e) if format!("{e:#}").contains("could not bind") => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("PostgreSQL did not start")))
    }

    /// TCP port the server listens on (127.0.0.1), stable across [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the server binaries; `pg_dump`, `pg_restore` and `psql` are there too.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file; its tail is included in start errors.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Random password of [`SUPERUSER`](Self::SUPERUSER), different for each cluster.
    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// `postgres://user:password@127.0.0.1:port/db`, each part percent-encoded.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(db)
        )
    }

    /// [`url`](Self::url) for the superuser.
    pub fn superuser_url(&self, db: &str) -> String {
        self.url(Self::SUPERUSER, &self.password, db)
    }

    /// Connects to `db` as the superuser; the connection task runs on the current runtime.
    pub async fn client(&self, db: &str) -> Result<Client> {
        self.connect(Self::SUPERUSER, &self.password, db).await
    }

    /// Connects to `db` as `user` (over the Unix socket for a TLS cluster, else over TCP);
    /// the connection task runs on the current runtime.
    pub async fn connect(&self, user: &str, password: &str, db: &str) -> Result<Client> {
        let mut config = tokio_postgres::Config::new();
        if self.tls {
            config.host_path(&self.socket_dir);
        } else {
            config.host("127.0.0.1");
        }
        let (client, connection) = config
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10))
            .connect(NoTls)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to database {db:?} as {user:?} on 127.0.0.1:{} (server log: {})",
                    self.port,
                    self.log_file.display()
                )
            })?;
        tokio::spawn(async move {
            // The error surfaces on the client's next call; nothing to do with it here.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// The names of all databases on the cluster, sorted.
    pub async fn databases(&self) -> Vec<String> {
        let c = self.client("postgres").await.unwrap();
        c.query("SELECT datname FROM pg_database ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Creates database `name` (any name: it is quoted as an identifier).
    pub async fn create_database(&self, name: &str) -> Result<()> {
        self.execute(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
        .await
        .with_context(|| format!("cannot create database {name:?}"))
    }

    /// Creates a login role `name` with `password` (both quoted); `attributes` is raw SQL
    /// appended to `CREATE ROLE`, e.g. `""`, `"CREATEDB"` or `"SUPERUSER"`.
    pub async fn create_role(&self, name: &str, password: &str, attributes: &str) -> Result<()> {
        let sql = format!(
            "CREATE ROLE {} LOGIN PASSWORD {} {attributes}",
            quote_ident(name),
            quote_literal(password)
        );
        self.execute("postgres", &sql)
            .await
            .with_context(|| format!("cannot create role {name:?}"))
    }

    /// Runs `sql` (one or more statements) in `db` as the superuser.
    pub async fn execute(&self, db: &str, sql: &str) -> Result<()> {
        let client = self.client(db).await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("SQL failed in database {db:?}: {}", abbreviate(sql)))
    }

    /// Stops the server (fast shutdown: clients are disconnected); the data and port are kept.
    pub async fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let out = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .output()
            .await
            .context("cannot run pg_ctl stop")?;
        check_output("pg_ctl stop", &out)?;
        self.running = false;
        Ok(())
    }

    /// Stops the server if it runs, then starts it again on the same port with the same data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.start_server().await
    }

    /// Every table's `(row count, md5 of its rows)`, keyed `"schema.name"`, for comparing a
    /// database with a restored copy of it.
    ///
    /// Covers ordinary tables (partitions included) and materialized views in every
    /// non-system schema; an unpopulated materialized view is `(-1, "unpopulated")`. Large
    /// objects appear as the pseudo-table `"pg_largeobject"`: their count and an md5 over
    /// their contents that does not depend on their oids. Rows are hashed as their text form
    /// sorted bytewise, with output settings pinned so two servers agree.
    /// Every table of `db` here has the rows of `of_db` on `of` (same fingerprints).
    pub async fn assert_same_tables(&self, db: &str, of: &PgCluster, of_db: &str) {
        assert_eq!(
            self.table_fingerprints(db).await.unwrap(),
            of.table_fingerprints(of_db).await.unwrap(),
            "tables of {db:?} differ from those of {of_db:?}"
        );
    }

    pub async fn table_fingerprints(&self, db: &str) -> Result<BTreeMap<String, (i64, String)>> {
        let client = self.client(db).await?;
        // Pin every setting that changes a value's text form, so two clusters agree.
        client
            .batch_execute(
                "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
                 SET IntervalStyle = 'postgres'; SET extra_float_digits = 1; \
                 SET bytea_output = 'hex'; SET search_path = pg_catalog",
            )
            .await
            .context("cannot set up the fingerprint session")?;
        let relations = client
            .query(
                "SELECT n.nspname, c.relname, c.relispopulated \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'm') \
                   AND n.nspname <> 'information_schema' \
                   AND n.nspname !~ '^pg_' \
                 ORDER BY 1, 2",
                &[],
            )
            .await
            .with_context(|| format!("cannot list the tables of database {db:?}"))?;

        let mut fingerprints = BTreeMap::new();
        for row in relations {
            let (schema, name, populated): (String, String, bool) =
                (row.get(0), row.get(1), row.get(2));
            let key = format!("{schema}.{name}");
            if !populated {
                fingerprints.insert(key, (-1, "unpopulated".to_owned()));
                continue;
            }
            let sql = format!(
                "SELECT count(*), \
                        md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\"), '')) \
                 FROM {}.{} AS t",
                quote_ident(&schema),
                quote_ident(&name)
            );
            let row = client
                .query_one(&sql, &[])
                .await
                .with_context(|| format!("cannot fingerprint table {key} in database {db:?}"))?;
            fingerprints.insert(key, (row.get(0), row.get(1)));
        }

        let row = client
            .query_one(
                "SELECT count(*), \
                        md5(coalesce(string_agg(h, E'\\n' ORDER BY h COLLATE \"C\"), '')) \
                 FROM (SELECT md5(lo_get(oid)) AS h FROM pg_largeobject_metadata) AS lo",
                &[],
            )
            .await
            .with_context(|| format!("cannot fingerprint the large objects of {db:?}"))?;
        fingerprints.insert("pg_largeobject".to_owned(), (row.get(0), row.get(1)));
        Ok(fingerprints)
    }

    /// Copies the certificate into the data directory (owned by the server's user, key 0600
    /// as PostgreSQL demands), turns `ssl` on and allows TCP only with TLS.
    fn set_up_tls(&self, tls: &ServerTls<'_>) -> Result<()> {
        let mut files = vec![
            (tls.cert, "server.crt", 0o644),
            (tls.key, "server.key", 0o600),
        ];
        let mut conf =
            String::from("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        if let Some(ca) = tls.client_ca {
            files.push((ca, "client-ca.crt", 0o644));
            conf.push_str("ssl_ca_file = 'client-ca.crt'\n");
        }
        for (from, name, mode) in files {
            let to = self.data_dir.join(name);
            std::fs::copy(from, &to)
                .with_context(|| format!("cannot copy {} into the data dir", from.display()))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot chmod {}", to.display()))?;
            if self.as_postgres_user {
                chown_to_postgres(&to)?;
            }
        }
        append_conf(&self.data_dir, &conf)?;
        let client_cert = if tls.client_ca.is_some() {
            " clientcert=verify-full"
        } else {
            ""
        };
        let hba = self.data_dir.join("pg_hba.conf");
        std::fs::write(
            &hba,
            format!(
                "# pgferry test cluster with TLS: TCP only over TLS\n\
                 local all all scram-sha-256\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256{client_cert}\n"
            ),
        )
        .with_context(|| format!("cannot write {}", hba.display()))
    }

    /// `pg_ctl start` on `self.port`, then waits until a superuser connection succeeds.
    async fn start_server(&mut self) -> Result<()> {
        let out = self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t"])
            .arg(READY_TIMEOUT.as_secs().to_string())
            .arg("start")
            .output()
            .await
            .context("cannot run pg_ctl start")?;
        if !out.status.success() {
            let error = anyhow!(
                "PostgreSQL did not start on 127.0.0.1:{} ({}).\npg_ctl said: {}\nserver log {} ends with:\n{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_file.display(),
                log_tail(&self.log_file, LOG_TAIL_LINES)
            );
            // pg_ctl may have given up waiting on a server that is still starting.
            if self.data_dir.join("postmaster.pid").exists() {
                self.stop_immediately();
            }
            return Err(error);
        }
        self.running = true;

        // pg_ctl -w checked the Unix socket; the tests use TCP with a password, so check that
        // (a TLS cluster: the socket with a password, the way the helpers connect to it).
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.client("postgres").await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "PostgreSQL started but refused TCP connections for {READY_TIMEOUT:?}; \
                         server log ends with:\n{}",
                        log_tail(&self.log_file, LOG_TAIL_LINES)
                    )))
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// `pg_ctl stop -m immediate`, synchronously (for drop and failed starts): nothing
    /// here needs to survive, and it must be quick. Failures are only printed.
    fn stop_immediately(&mut self) {
        let program = self.bin_dir.join("pg_ctl");
        let mut cmd = if self.as_postgres_user {
            let mut cmd = std::process::Command::new(runuser());
            cmd.args(["-u", POSTGRES_OS_USER, "--"]).arg(program);
            cmd
        } else {
            std::process::Command::new(program)
        };
        let result = cmd
            .current_dir(self.dir.path())
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: pg_ctl stop failed for the test cluster in {}: {}",
                self.data_dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: cannot run pg_ctl stop: {e}"),
        }
        self.running = false;
    }

    /// A command for server binary `program`, run as the postgres OS user when we are root.
    fn pg_command(&self, program: &str) -> tokio::process::Command {
        let program = self.bin_dir.join(program);
        let mut cmd = if self.as_postgres_user {
            let mut cmd = tokio::process::Command::new(runuser());
            cmd.args(["-u", POSTGRES_OS_USER, "--"]).arg(program);
            cmd
        } else {
            tokio::process::Command::new(program)
        };
        // The postgres user may not be able to enter the test's working directory.
        cmd.current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .kill_on_drop(true);
        cmd
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            self.stop_immediately();
        }
    }
}

/// Quotes `name` as a PostgreSQL identifier: `a "b"` → `"a ""b"""`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes `value` as a PostgreSQL string literal (standard_conforming_strings on).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for a URL component.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The newest `/usr/lib/postgresql/<major>/bin`, or `$PGFERRY_PG_BIN_DIR`.
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(PG_BIN_DIR_ENV) {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").exists() {
            bail!("{PG_BIN_DIR_ENV}={} has no initdb", dir.display());
        }
        return Ok(dir);
    }
    let entries = std::fs::read_dir(PG_LIB_DIR).with_context(|| {
        format!(
            "no PostgreSQL server in {PG_LIB_DIR}: install one with `apt-get install postgresql`"
        )
    })?;
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
        .ok_or_else(|| {
            anyhow!(
                "no <major>/bin/initdb under {PG_LIB_DIR}: install the server with \
                 `apt-get install postgresql`"
            )
        })
}

/// `runuser` from util-linux; /usr/sbin may be missing from a non-login root's `$PATH`.
fn runuser() -> &'static str {
    ["/usr/sbin/runuser", "/sbin/runuser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("runuser")
}

fn append_conf(data_dir: &Path, lines: &str) -> Result<()> {
    use std::io::Write;
    let path = data_dir.join("postgresql.conf");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(lines.as_bytes()))
        .with_context(|| format!("cannot append to {}", path.display()))
}

fn chown_to_postgres(path: &Path) -> Result<()> {
    let (uid, gid) = postgres_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).with_context(|| {
        format!(
            "cannot chown {} to the {POSTGRES_OS_USER} user",
            path.display()
        )
    })
}

/// uid and gid of the postgres OS user, from `/etc/passwd`.
fn postgres_ids() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&POSTGRES_OS_USER) && fields.len() > 3)
        .and_then(|fields| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
        .ok_or_else(|| {
            anyhow!(
                "running as root, but there is no `{POSTGRES_OS_USER}` OS user to run \
                 PostgreSQL as: install the postgresql package, or run the tests as a \
                 non-root user"
            )
        })
}

fn check_output(what: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn abbreviate(sql: &str) -> String {
    const MAX: usize = 200;
    match sql.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &sql[..i]),
        None => sql.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident(r#"a "b""#), r#""a ""b""""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(percent_encode("a b/é@:"), "a%20b%2F%C3%A9%40%3A");
    }
}
