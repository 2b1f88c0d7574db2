//! The destination server's side of a restore: the per-destination lock, leftover cleanup,
//! the temporary database's life, the hooks, and the swap.
//!
//! Everything runs over one maintenance connection (the restore target URL's own database)
//! that holds a session advisory lock keyed on the destination name for the whole restore:
//! two restores to one destination never overlap, and the lock vanishes with the connection
//! if the process is killed. Only databases named with our prefixes for this destination
//! (`pgferry_tmp_<hash>_…`, `pgferry_old_<hash>_…`) are ever dropped, and the swap renames
//! the old destination aside and the temporary database into place in one transaction, so
//! the destination name always points at a complete database. This module does not read
//! snapshots (see `load`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::files::{DirSwap, FilesError};
use super::guard::{kept_name, lock_key, old_like, old_name, quote_ident, quote_literal, tmp_like};
use super::hookvars::HookVars;
use crate::config::PgUrl;
use crate::source::{self, SourceError};

/// Advisory-lock class id of restore locks ("pgfr"), so they never collide with the
/// single-key locks of backups or of the applications on that server.
pub const LOCK_CLASS: i32 = 0x7067_6672;

/// How long the swap waits for terminated sessions of the old destination to go away.
/// pg_terminate_backend returns before the backend exits; a few seconds is plenty.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Polling interval while waiting for terminated sessions to exit.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// How long cancelling a hook's query may take: a signal must end a restore within seconds.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// PostgreSQL 13 added `DROP DATABASE … WITH (FORCE)`.
const FORCE_DROP_MIN_VERSION: u32 = 130_000;

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(transparent)]
    Connect(#[from] SourceError),
    #[error("{what} on {url} failed: {}", source::pg_message(.source))]
    Sql {
        what: String,
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("another restore into {database:?} on {url} is running (advisory lock held{}); wait for it or stop it (a restore that was just killed keeps it until its server session ends: try again in a moment)", .holder.map(|pid| format!(" by server process {pid}")).unwrap_or_default())]
    Locked {
        database: String,
        url: String,
        /// The PID of the server session holding the lock, when it could be read.
        holder: Option<i32>,
    },
    #[error("cannot read hook {path}: {source}")]
    HookRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hook {path} failed in the temporary database, so nothing was swapped in (fix the hook or the database): {}", source::pg_message(.source))]
    Hook {
        path: PathBuf,
        source: tokio_postgres::Error,
    },
    #[error("cancelled while hook {path} ran; its query was cancelled (pg_cancel_backend)")]
    HookCancelled { path: PathBuf },
    #[error("sessions of {database:?} did not end within {DRAIN_TIMEOUT:?} after pg_terminate_backend; the old database is untouched")]
    Busy { database: String },
    #[error("swapping the companion files in: {source}; the old database is untouched")]
    Files { source: FilesError },
}

impl SwapError {
    /// Whether trying again later may succeed (server unreachable, lock busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            SwapError::Connect(e) => e.is_retryable(),
            SwapError::Locked { .. } | SwapError::Busy { .. } => true,
            _ => false,
        }
    }
}

/// The maintenance connection to the destination server, holding the destination's lock.
pub struct Server {
    pub client: Client,
    pub url: PgUrl,
    pub version_num: u32,
}

impl Server {
    fn sql_err(&self, what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SwapError {
        let what = what.into();
        let url = self.url.redacted();
        move |source| SwapError::Sql { what, url, source }
    }

    /// Connects to the maintenance database and takes the destination's lock (no waiting).
    pub async fn lock(url: &PgUrl, database: &str) -> Result<Server, SwapError> {
        let client = source::connect(url, None).await?;
        let version = source::server_version(&client, url).await?;
        let server = Server {
            client,
            url: url.clone(),
            version_num: version.num,
        };
        let got: bool = server
            .client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&LOCK_CLASS, &lock_key(database)],
            )
            .await
            .map_err(server.sql_err("taking the restore lock"))?
            .get(0);
        if !got {
            // Who holds it, for the operator (best effort: pg_locks shows the two int4 keys
            // as oids, the bits unchanged).
            let holder = server
                .client
                .query_opt(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                     AND classid = $1::int4::oid AND objid = $2::int4::oid AND objsubid = 2",
                    &[&LOCK_CLASS, &lock_key(database)],
                )
                .await
                .ok()
                .flatten()
                .map(|row| row.get::<_, i32>(0));
            return Err(SwapError::Locked {
                database: database.into(),
                url: url.redacted(),
                holder,
            });
        }
        Ok(server)
    }

    async fn exec(&self, what: &str, sql: &str) -> Result<(), SwapError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(self.sql_err(what))
    }

    pub async fn exists(&self, database: &str) -> Result<bool, SwapError> {
        Ok(self
            .client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await
            .map_err(self.sql_err("looking up a database"))?
            .is_some())
    }

    /// Whether a temporary database of a restore into `database` exists (`guard::tmp_like`):
    /// under the destination's lock, one a killed run left before its swap committed.
    pub async fn has_tmp(&self, database: &str) -> Result<bool, SwapError> {
        Ok(self
            .client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname LIKE $1",
                &[&tmp_like(database)],
            )
            .await
            .map_err(self.sql_err("looking up temporary databases"))?
            .is_some())
    }

    /// Whether `database` exists and is a template (`datistemplate`).
    pub async fn is_template(&self, database: &str) -> Result<bool, SwapError> {
        Ok(self
            .client
            .query_opt(
                "SELECT datistemplate FROM pg_database WHERE datname = $1",
                &[&database],
            )
            .await
            .map_err(self.sql_err("looking up a database"))?
            .is_some_and(|r| r.get::<_, bool>(0)))
    }

    /// Drops a database of ours if it exists, ending any session still in it.
    pub async fn drop_database(&self, database: &str) -> Result<(), SwapError> {
        if !self.exists(database).await? {
            return Ok(());
        }
        let q = quote_ident(database);
        if self.version_num >= FORCE_DROP_MIN_VERSION {
            self.exec(
                &format!("dropping {database}"),
                &format!("DROP DATABASE IF EXISTS {q} WITH (FORCE)"),
            )
            .await
        } else {
            self.terminate(database).await?;
            self.exec(
                &format!("dropping {database}"),
                &format!("DROP DATABASE IF EXISTS {q}"),
            )
            .await
        }
    }

    /// Drops temporary and set-aside databases a killed run left for this destination, and
    /// reopens the destination itself if a run was killed between closing it to connections
    /// and the rename. Returns the names dropped.
    pub async fn clean_leftovers(&self, database: &str) -> Result<Vec<String>, SwapError> {
        let closed = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = $1 AND NOT datallowconn AND NOT datistemplate",
                &[&database],
            )
            .await
            .map_err(self.sql_err("looking up the destination"))?
            .is_some();
        if closed {
            tracing::warn!(message = "The destination was left closed to connections by an interrupted restore; reopening it.", database = %database);
            self.exec(
                &format!("reopening {database}"),
                &format!(
                    "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                    quote_ident(database)
                ),
            )
            .await?;
        }
        let rows = self
            .client
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE $1 OR datname LIKE $2 ORDER BY 1",
                &[&tmp_like(database), &old_like(database)],
            )
            .await
            .map_err(self.sql_err("listing leftover temporary databases"))?;
        let mut dropped = Vec::new();
        for row in rows {
            let name: String = row.get(0);
            tracing::warn!(message = "Dropping a leftover of an interrupted restore.", database = %name);
            self.drop_database(&name).await?;
            dropped.push(name);
        }
        Ok(dropped)
    }

    /// Creates the temporary database, owned by `owner`, tagged with a comment.
    pub async fn create_tmp(&self, tmp: &str, owner: &str, comment: &str) -> Result<(), SwapError> {
        self.exec(
            &format!("creating the temporary database {tmp}"),
            &format!(
                "CREATE DATABASE {} TEMPLATE template0 OWNER {}",
                quote_ident(tmp),
                quote_ident(owner)
            ),
        )
        .await?;
        self.exec(
            "tagging the temporary database",
            &format!(
                "COMMENT ON DATABASE {} IS {}",
                quote_ident(tmp),
                quote_literal(comment)
            ),
        )
        .await
    }

    /// Ends every other session in `database`.
    async fn terminate(&self, database: &str) -> Result<(), SwapError> {
        self.client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type IS DISTINCT FROM 'autovacuum worker'",
                &[&database],
            )
            .await
            .map_err(self.sql_err(format!("ending the sessions of {database}")))?;
        Ok(())
    }

    /// Waits until no session is left in `database`. Autovacuum workers are not waited for
    /// (nor terminated: they are not the owner's to signal): a freshly restored database
    /// gets one as soon as its tables are loaded, analyzing a large table takes minutes, and
    /// `ALTER DATABASE … RENAME` / `DROP DATABASE` end them themselves (PostgreSQL signals
    /// the autovacuum workers of the database and waits for them).
    async fn wait_idle(&self, database: &str) -> Result<(), SwapError> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let n: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type IS DISTINCT FROM 'autovacuum worker'",
                    &[&database],
                )
                .await
                .map_err(self.sql_err("counting sessions"))?
                .get(0);
            if n == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SwapError::Busy {
                    database: database.into(),
                });
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Puts `tmp` in place of `dest`. The old destination, if any, is renamed aside in the
    /// same transaction, then dropped, or kept under a dated name with `keep_old` (returned).
    /// With `files`, the companion files' directories are swapped just before the databases'
    /// rename (with the old database closed to connections) and put back if it fails (see
    /// `restore::files`).
    pub async fn swap(
        &self,
        tmp: &str,
        dest: &str,
        stamp: &str,
        keep_old: bool,
        comment: &str,
        files: Option<&mut DirSwap>,
    ) -> Result<Option<String>, SwapError> {
        let (qt, qd) = (quote_ident(tmp), quote_ident(dest));
        self.wait_idle(tmp).await?;
        let comment = quote_literal(comment);
        if !self.exists(dest).await? {
            let sql = format!(
                "BEGIN; ALTER DATABASE {qt} RENAME TO {qd}; COMMENT ON DATABASE {qd} IS {comment}; COMMIT"
            );
            self.rename_in(
                tmp,
                async { Ok(()) },
                "renaming the temporary database into place",
                &sql,
                files,
            )
            .await?;
            return Ok(None);
        }
        let aside = if keep_old {
            kept_name(dest, stamp)
        } else {
            old_name(dest, stamp)
        };
        let qa = quote_ident(&aside);
        // No new sessions from here on; existing ones are ended.
        self.exec(
            &format!("closing {dest} to new connections"),
            &format!("ALTER DATABASE {qd} ALLOW_CONNECTIONS false"),
        )
        .await?;
        let closed = async {
            self.terminate(dest).await?;
            self.wait_idle(dest).await
        };
        // ALTER DATABASE … RENAME is transactional: both renames or neither.
        let sql = format!(
            "BEGIN; ALTER DATABASE {qd} RENAME TO {qa}; ALTER DATABASE {qt} RENAME TO {qd}; COMMENT ON DATABASE {qd} IS {comment}; COMMIT"
        );
        let renamed = self
            .rename_in(
                tmp,
                closed,
                "swapping the restored database in",
                &sql,
                files,
            )
            .await;
        if let Err(e) = renamed {
            // The maintenance connection may be what failed: reopen from a fresh one.
            if let Err(reopen) = reopen_connections(&self.url, dest).await {
                tracing::error!(message = "Cannot reopen the old destination to connections; the next restore of it will, or run ALTER DATABASE … ALLOW_CONNECTIONS true.", database = %dest, error = %reopen);
            }
            return Err(e);
        }
        if keep_old {
            self.exec(
                "reopening the kept old database",
                &format!("ALTER DATABASE {qa} ALLOW_CONNECTIONS true"),
            )
            .await?;
            Ok(Some(aside))
        } else {
            if let Err(error) = self.drop_database(&aside).await {
                // The swap is done; the next restore of this destination drops it.
                tracing::warn!(message = "Cannot drop the old database; the next restore will.", database = %aside, error = %error);
            }
            Ok(None)
        }
    }
}

impl Server {
    /// The commit point of a swap: once `ready` (the old destination closed, if any), the
    /// companion files' directories are swapped in and the renaming transaction `sql` runs
    /// (`what` names it in errors). On failure the transaction is rolled back and the
    /// directories settled, so that database and files still match.
    async fn rename_in(
        &self,
        tmp: &str,
        ready: impl std::future::Future<Output = Result<(), SwapError>>,
        what: &str,
        sql: &str,
        mut files: Option<&mut DirSwap>,
    ) -> Result<(), SwapError> {
        let renamed = async {
            ready.await?;
            if let Some(f) = files.as_deref_mut() {
                f.swap_in()
                    .await
                    .map_err(|source| SwapError::Files { source })?;
            }
            self.exec(what, sql).await
        }
        .await;
        if let Err(e) = renamed {
            let _ = self.client.batch_execute("ROLLBACK").await;
            self.settle_files(tmp, files).await;
            return Err(e);
        }
        if let Some(f) = files {
            f.finish().await;
        }
        Ok(())
    }

    /// After a failed rename: the companion files go back unless the rename committed after
    /// all (the temporary database is gone, asked over a fresh connection: this one may be
    /// what failed). Unknown: left for the next restore, which settles by the same rule.
    async fn settle_files(&self, tmp: &str, files: Option<&mut DirSwap>) {
        let Some(f) = files else { return };
        match still_exists(&self.url, tmp).await {
            Ok(true) => {
                if let Err(error) = f.roll_back().await {
                    tracing::error!(message = "Cannot put the previous companion files back; the next restore of this destination will.", error = %error);
                }
            }
            Ok(false) => {
                tracing::warn!(message = "The databases' rename reported an error but took place; the companion files stay swapped in.");
                f.finish().await;
            }
            Err(error) => {
                tracing::error!(message = "Cannot tell whether the databases' rename took place; the next restore of this destination settles the companion files.", error = %error);
            }
        }
    }
}

/// Whether `database` exists, asked over a fresh connection, bounded in time.
async fn still_exists(url: &PgUrl, database: &str) -> Result<bool, String> {
    let ask = async {
        let client = source::connect(url, None)
            .await
            .map_err(|e| e.to_string())?;
        client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await
            .map(|r| r.is_some())
            .map_err(|e| source::pg_message(&e))
    };
    tokio::time::timeout(CANCEL_TIMEOUT, ask)
        .await
        .map_err(|_| format!("no answer within {CANCEL_TIMEOUT:?}"))?
}

/// `ALTER DATABASE … ALLOW_CONNECTIONS true` over a fresh connection, bounded in time.
async fn reopen_connections(url: &PgUrl, database: &str) -> Result<(), String> {
    let reopen = async {
        let client = source::connect(url, None)
            .await
            .map_err(|e| e.to_string())?;
        client
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                quote_ident(database)
            ))
            .await
            .map_err(|e| source::pg_message(&e))
    };
    tokio::time::timeout(CANCEL_TIMEOUT, reopen)
        .await
        .map_err(|_| format!("no answer within {CANCEL_TIMEOUT:?}"))?
}

/// Runs the hook files, in order, each in one transaction, in the temporary database, with
/// `vars` substituted psql-style and set as `pgferry.<name>` for the transaction (see
/// [`super::hookvars`]). When
/// `cancel` fires, the running hook's query is cancelled (`pg_cancel_backend` from a fresh
/// connection) and [`SwapError::HookCancelled`] returned at once; the caller drops the
/// temporary database.
pub async fn run_hooks(
    url: &PgUrl,
    tmp: &str,
    hooks: &[PathBuf],
    vars: &HookVars,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), SwapError> {
    if hooks.is_empty() {
        return Ok(());
    }
    let mut client = source::connect(url, Some(tmp)).await?;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|source| SwapError::Sql {
            what: "reading the hook session's pid".into(),
            url: url.redacted(),
            source,
        })?
        .get(0);
    for path in hooks {
        let sql = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| SwapError::HookRead {
                path: path.clone(),
                source,
            })?;
        let hook_err = |source| SwapError::Hook {
            path: path.clone(),
            source,
        };
        let (sql, unset) = vars.substitute(&sql);
        if !unset.is_empty() {
            // psql leaves them as written too; the server will most likely refuse the `:`.
            tracing::warn!(message = "The hook names variables that are not set; they are left as written.", hook = %path.display(), variables = %unset.join(", "));
        }
        let run = async {
            let tx = client.transaction().await?;
            for (name, value) in vars.iter() {
                tx.execute(
                    "SELECT set_config($1, $2, true)",
                    &[&format!("pgferry.{name}"), &value],
                )
                .await?;
            }
            tx.batch_execute(&sql).await?;
            tx.commit().await
        };
        tokio::select! {
            r = run => r.map_err(hook_err)?,
            _ = cancel.cancelled() => {
                cancel_backend(url, pid).await;
                return Err(SwapError::HookCancelled { path: path.clone() });
            }
        }
        tracing::info!(message = "Hook applied.", hook = %path.display());
    }
    Ok(())
}

/// Cancels the query of backend `pid` from a fresh connection, bounded in time: the caller
/// drops the database (ending the session) whatever happens here.
async fn cancel_backend(url: &PgUrl, pid: i32) {
    let cancel = async {
        let client = source::connect(url, None)
            .await
            .map_err(|e| e.to_string())?;
        client
            .query_one("SELECT pg_cancel_backend($1)", &[&pid])
            .await
            .map_err(|e| source::pg_message(&e))
    };
    match tokio::time::timeout(CANCEL_TIMEOUT, cancel).await {
        Ok(Ok(_)) => tracing::info!(message = "Hook query cancelled.", pid),
        Ok(Err(error)) => {
            tracing::warn!(message = "Cannot cancel the hook's query; dropping the database ends it.", pid, error = %error)
        }
        Err(_) => tracing::warn!(
            message = "Cancelling the hook's query timed out; dropping the database ends it.",
            pid
        ),
    }
}

/// Counts the user tables of a database (for the summary line).
pub async fn count_tables(url: &PgUrl, database: &str) -> Result<u64, SwapError> {
    let client = source::connect(url, Some(database)).await?;
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg\\_toast%'",
            &[],
        )
        .await
        .map_err(|source| SwapError::Sql {
            what: "counting restored tables".into(),
            url: url.redacted(),
            source,
        })?
        .get(0);
    Ok(n.max(0) as u64)
}
