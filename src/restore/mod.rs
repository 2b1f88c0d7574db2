//! Restore: load a chosen snapshot into a configured staging database, verified,
//! neutralized by hooks, and swapped in only when all of that succeeded.
//!
//! The steps follow DESIGN.md "Restore": [`choose`] picks the snapshot, [`guard`] refuses any
//! destination that is not a configured restore target or that is production, [`load`] reads
//! one target's copy into a temporary database (sha256 + size + pg_restore's exit status),
//! falling back to the next target that holds the snapshot, and [`swap`] runs the hooks and
//! renames the result into place. Until the swap, the existing destination is never touched;
//! temporary databases and spool files are removed on every failure, and by the next run
//! when this one was killed. This module does not print: the CLI renders [`RestoreReport`].

pub mod choose;
pub mod files;
pub mod guard;
pub mod hookvars;
pub mod identity;
pub mod load;
pub mod swap;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::metrics::Outcome;
use crate::source::{self, SourceError};
use crate::storage::catalog::Filter;
use choose::{ChooseError, SnapshotChoice};
use files::{FilesError, FilesReport};
use guard::{Destination, GuardError};
use load::{LoadError, LoadProgress, RestoreInto};
use swap::{Server, SwapError};

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub source: String,
    pub database: String,
    /// `--to`: a namespace served by a `[[restore_target]]`.
    pub namespace: String,
    pub snapshot: SnapshotChoice,
    /// `--as`; default: the source database's name.
    pub as_database: Option<String>,
    /// `--jobs`; above 1, the archive is spooled and restored with `pg_restore -j`.
    pub jobs: u32,
    pub keep_old: bool,
}

/// One target that could not provide a good copy.
pub type TargetFailure = crate::storage::target::TargetFailure<LoadError>;

/// What a successful restore did.
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub source: String,
    pub database: String,
    pub snapshot_id: String,
    /// When the snapshot's data was read (its time for `--at` and "latest").
    pub data_read_at: chrono::DateTime<Utc>,
    /// Which snapshot was picked and why, for the operator (see `choose::describe`).
    pub chosen: String,
    pub namespace: String,
    pub destination: String,
    /// The target whose copy was restored.
    pub target: String,
    /// Targets tried before, and why they failed.
    pub failed_targets: Vec<TargetFailure>,
    pub stored_bytes: u64,
    pub raw_bytes: u64,
    pub tables: u64,
    pub jobs: u32,
    /// Whether an existing database was replaced.
    pub replaced: bool,
    /// With `--keep-old`: the name the previous database is kept under.
    pub kept_old: Option<String>,
    /// Leftovers of earlier, interrupted restores that were dropped (databases) or settled
    /// (companion files' directories) first.
    pub cleaned_leftovers: Vec<String>,
    /// The companion files: restored, or why not (absent when neither the snapshot nor the
    /// restore target has any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesReport>,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no source named {name:?} in the config; configured: {configured}")]
    UnknownSource { name: String, configured: String },
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error(transparent)]
    Choose(#[from] ChooseError),
    #[error("snapshot {snapshot_id} of {source_name}/{database} cannot be restored: it has no readable manifest on any target ({}); restore another snapshot, available (newest first): {}; see `pgferry list --source {source_name} --database {database}`", .damage.join("; "), choose::list_ids(.available))]
    Damaged {
        source_name: String,
        database: String,
        snapshot_id: String,
        /// One line per unreadable manifest or dump object without one.
        damage: Vec<String>,
        available: Vec<String>,
    },
    #[error("no target could be listed ({details}); check the targets' credentials and endpoints")]
    NoTargets { details: String },
    #[error("restore target {namespace:?}: {source}")]
    Destination {
        namespace: String,
        source: SourceError,
    },
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error(
        "snapshot {snapshot_id}: {source}. The destination database and its files are untouched"
    )]
    Files {
        snapshot_id: String,
        source: FilesError,
    },
    #[error(transparent)]
    Key(#[from] crate::encryption::KeyError),
    #[error("snapshot {snapshot_id} of {source_name}/{database}: no target gave a good copy: {}. The destination is untouched; check the targets, or restore an older snapshot (`pgferry list --source {source_name} --database {database}`)", crate::storage::target::describe_failures(failures))]
    AllTargetsFailed {
        source_name: String,
        database: String,
        snapshot_id: String,
        failures: Vec<TargetFailure>,
    },
    #[error("loading snapshot {snapshot_id} (from target {target}) into {destination:?} failed; the destination is untouched: {source}")]
    Load {
        snapshot_id: String,
        target: String,
        destination: String,
        source: LoadError,
    },
    #[error(
        "restore cancelled; the destination is untouched and the temporary database was dropped"
    )]
    Cancelled,
}

impl RestoreError {
    /// A usage or configuration problem (exit 2), as opposed to a failed operation (exit 1).
    pub fn is_usage(&self) -> bool {
        match self {
            RestoreError::UnknownSource { .. } => true,
            // No identity, a wrong one, an unreadable identity file: fixed in the config.
            RestoreError::Key(_) => true,
            RestoreError::Guard(e) => e.is_usage(),
            _ => false,
        }
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self, RestoreError::Cancelled)
    }

    /// Whether running the same restore again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RestoreError::NoTargets { .. } | RestoreError::AllTargetsFailed { .. } => true,
            RestoreError::Files { source, .. } => {
                matches!(source, FilesError::AllTargetsFailed { .. })
            }
            RestoreError::Destination { source, .. } => source.is_retryable(),
            RestoreError::Swap(e) => e.is_retryable(),
            RestoreError::Guard(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Runs one restore to completion, counting it in `restores_total`.
pub async fn restore(
    app: &App,
    req: &RestoreRequest,
    progress: Arc<LoadProgress>,
    cancel: CancellationToken,
) -> Result<RestoreReport, RestoreError> {
    let span = tracing::info_span!("restore", source = %req.source, database = %req.database, namespace = %req.namespace, snapshot_id = tracing::field::Empty);
    let r = run(app, req, progress, cancel).instrument(span).await;
    let outcome = match &r {
        Ok(_) => Outcome::Success,
        Err(e) if e.is_cancelled() => Outcome::Cancelled,
        Err(_) => Outcome::Failure,
    };
    app.metrics
        .restores_total
        .with_label_values(&[outcome.as_str()])
        .inc();
    r
}

async fn run(
    app: &App,
    req: &RestoreRequest,
    progress: Arc<LoadProgress>,
    cancel: CancellationToken,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let config = &app.config;
    if config.source(&req.source).is_none() {
        return Err(RestoreError::UnknownSource {
            name: req.source.clone(),
            configured: config
                .sources
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    // 1. The destination, checked before anything is read or written.
    let dest_db = req.as_database.as_deref().unwrap_or(&req.database);
    let dest = guard::resolve(config, &req.namespace, dest_db)?;
    guard::check_destination(config, &dest).await?;

    // 2. The snapshot.
    let filter = Filter {
        source: Some(req.source.clone()),
        databases: vec![req.database.clone()],
        target: None,
    };
    let cat = app.catalog(&filter).await;
    if cat.unreachable.len() == app.targets.len() && !app.targets.is_empty() {
        return Err(RestoreError::NoTargets {
            details: cat
                .unreachable
                .iter()
                .map(|(t, e)| format!("{t}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    for (t, e) in &cat.unreachable {
        tracing::warn!(message = "A target could not be listed; its copies are not considered.", target = %t, error = %e);
    }
    let entries: Vec<_> = cat.of(&req.source, &req.database).collect();
    let entry = match choose::choose(&entries, &req.snapshot, &req.source, &req.database) {
        Ok(entry) => entry,
        Err(error) => {
            // A snapshot asked for by id that exists only as damaged objects: say so.
            if let SnapshotChoice::Id(id) = &req.snapshot {
                let damage = cat.damage_of(&app.targets, &req.source, &req.database, id);
                if !damage.is_empty() {
                    return Err(RestoreError::Damaged {
                        source_name: req.source.clone(),
                        database: req.database.clone(),
                        snapshot_id: id.clone(),
                        damage,
                        available: entries.iter().map(|e| e.id().to_string()).collect(),
                    });
                }
            }
            return Err(error.into());
        }
    };
    let manifest = &entry.manifest;
    tracing::Span::current().record("snapshot_id", manifest.snapshot_id.as_str());
    tracing::info!(message = "Snapshot chosen.", chosen = %choose::describe(entry, &req.snapshot), targets = %entry.targets.join(","), destination = %dest.database);

    // Companion files: the snapshot's and the target's must both have them; the directory's
    // parent must exist when they are restored (said before anything is touched).
    let files_template = dest.target.files.as_ref();
    let files_error = |source| RestoreError::Files {
        snapshot_id: manifest.snapshot_id.clone(),
        source,
    };
    let mut files_report = None;
    if let Some(warning) = files::mismatch(manifest, files_template) {
        tracing::warn!(message = "Companion files not restored.", reason = %warning);
        files_report = Some(FilesReport::Skipped { warning });
    }
    let dirs = match (files_template, manifest.files_archive()) {
        (Some(t), Some(_)) => Some(
            files::Dirs::new(t, &dest.database)
                .await
                .map_err(files_error)?,
        ),
        // Only to settle what an interrupted restore left, when it can be found.
        (Some(t), None) => files::Dirs::new(t, &dest.database).await.ok(),
        _ => None,
    };

    // An encrypted snapshot needs a key that opens it: said before the destination is touched.
    if let Err(e) = crate::encryption::identities_for(
        &manifest.snapshot_id,
        manifest.encryption.as_ref(),
        config.restore_identity_file(&dest.target),
    ) {
        if entry.targets.iter().any(|t| entry.encryption_disagrees(t)) {
            tracing::warn!(message = "The targets' manifests of this snapshot disagree about its encryption: a bucket was changed outside pgferry; run `pgferry check` and see the runbook.", first_target = %entry.targets.first().map(String::as_str).unwrap_or_default());
        }
        return Err(e.into());
    }

    // 3. The destination server: not production (by identity), not a template; then lock,
    //    clean leftovers, the right pg_restore.
    let server = Server::lock(&dest.url, &dest.database).await?;
    let snapshot_label = format!(
        "the server snapshot {} of {}/{} was taken from",
        manifest.snapshot_id, manifest.source, manifest.database
    );
    identity::check(
        config,
        &server.client,
        &dest.url,
        &format!("restore target {:?}", dest.namespace),
        manifest
            .system_identifier
            .as_deref()
            .map(|id| (snapshot_label.as_str(), id)),
    )
    .await
    .map_err(GuardError::from)?;
    if server.is_template(&dest.database).await? {
        return Err(GuardError::Template {
            database: dest.database.clone(),
        }
        .into());
    }
    // The directories first: their settling asks whether a temporary database is left.
    let mut cleaned = match &dirs {
        Some(d) => files::settle(d, &server).await.map_err(files_error)?,
        None => Vec::new(),
    };
    cleaned.extend(server.clean_leftovers(&dest.database).await?);
    let version = source::server_version(&server.client, &dest.url)
        .await
        .map_err(|source| RestoreError::Destination {
            namespace: dest.namespace.clone(),
            source,
        })?;
    let tool = source::find_tool("pg_restore", dest.target.pg_bin_dir.as_deref(), &version)
        .await
        .map_err(|source| RestoreError::Destination {
            namespace: dest.namespace.clone(),
            source,
        })?;
    let tmp = guard::tmp_name(&dest.database, &manifest.snapshot_id);
    let stamp = crate::schedule::snapshot_id(Utc::now());

    // 4. Each target holding the snapshot, in config order, until one copy loads.
    let mut failures = Vec::new();
    let mut used = None;
    for target_name in &entry.targets {
        let Some(target) = app.target(target_name) else {
            continue;
        };
        if cancel.is_cancelled() {
            return Err(RestoreError::Cancelled);
        }
        // Each copy is read with its own target's manifest (see `load::manifest_for`).
        let own = load::manifest_for(entry, target_name);
        let attempt = match own {
            Ok(own) => attempt(
                app,
                &server,
                &dest,
                &tmp,
                &tool,
                target,
                own,
                req,
                progress.clone(),
                &cancel,
                &stamp,
            )
            .instrument(tracing::info_span!("load", target = %target.name))
            .await
            .map(|loaded| (loaded, own)),
            Err(e) => Err(AttemptError::Load(e)),
        };
        match attempt {
            Ok((loaded, own)) => {
                used = Some((target.name.clone(), loaded, own));
                break;
            }
            Err(e) => {
                drop_tmp(&server, &tmp).await;
                match e {
                    AttemptError::Load(LoadError::Cancelled) => {
                        return Err(RestoreError::Cancelled)
                    }
                    AttemptError::Load(e) if e.is_bad_copy() => {
                        tracing::warn!(message = "This target's copy failed; trying the next target.", target = %target.name, error = %e);
                        failures.push(TargetFailure {
                            target: target.name.clone(),
                            error: e,
                        });
                        progress
                            .stored_bytes
                            .store(0, std::sync::atomic::Ordering::Relaxed);
                        progress
                            .raw_bytes
                            .store(0, std::sync::atomic::Ordering::Relaxed);
                    }
                    AttemptError::Load(source) => {
                        return Err(RestoreError::Load {
                            snapshot_id: manifest.snapshot_id.clone(),
                            target: target.name.clone(),
                            destination: dest.database.clone(),
                            source,
                        })
                    }
                    AttemptError::Swap(e) => return Err(e.into()),
                }
            }
        }
    }
    let Some((target_used, loaded, manifest)) = used else {
        return Err(RestoreError::AllTargetsFailed {
            source_name: req.source.clone(),
            database: req.database.clone(),
            snapshot_id: manifest.snapshot_id.clone(),
            failures,
        });
    };

    tracing::info!(message = "Snapshot loaded into the temporary database.", target = %target_used, database = %tmp, raw_bytes = loaded.raw_bytes);

    // 5. Hooks, the companion files, then the swap; any failure drops the temporary database
    //    and removes the files' temporary directory.
    let mut staged: Option<files::DirSwap> = None;
    let finish = async {
        if cancel.is_cancelled() {
            return Err(RestoreError::Cancelled);
        }
        let vars = hookvars::HookVars::for_restore(
            &dest.target,
            &dest.namespace,
            &dest.database,
            &manifest.snapshot_id,
        );
        swap::run_hooks(&dest.url, &tmp, &dest.target.hooks, &vars, &cancel)
            .await
            .map_err(|e| match e {
                SwapError::HookCancelled { .. } => RestoreError::Cancelled,
                e => e.into(),
            })?;
        let tables = swap::count_tables(&dest.url, &tmp).await?;
        let extracted = match (&dirs, manifest.files_archive()) {
            (Some(d), Some(_)) => {
                let (s, owner) = files::DirSwap::stage(d, &stamp, req.keep_old)
                    .await
                    .map_err(files_error)?;
                let s = staged.insert(s);
                let extracted = files::extract(
                    app,
                    entry,
                    &target_used,
                    config.restore_identity_file(&dest.target),
                    s,
                    owner,
                    &cancel,
                )
                .await
                .map_err(|e| match e {
                    FilesError::Cancelled => RestoreError::Cancelled,
                    e => files_error(e),
                })?;
                tracing::info!(message = "Companion files extracted.", files = extracted.counts.files, bytes = extracted.counts.bytes, target = %extracted.target);
                Some(extracted)
            }
            _ => None,
        };
        if cancel.is_cancelled() {
            return Err(RestoreError::Cancelled);
        }
        let existed = server.exists(&dest.database).await?;
        let comment = format!(
            "restored by pgferry from {}/{} snapshot {} (target {}) at {}",
            req.source,
            req.database,
            manifest.snapshot_id,
            target_used,
            Utc::now().to_rfc3339()
        );
        let kept = server
            .swap(
                &tmp,
                &dest.database,
                &stamp,
                req.keep_old,
                &comment,
                staged.as_mut(),
            )
            .await?;
        Ok::<_, RestoreError>((tables, existed, kept, extracted))
    }
    .await;
    let (tables, replaced, kept_old, extracted) = match finish {
        Ok(v) => v,
        Err(e) => {
            if let Some(s) = &staged {
                if s.is_swapped_in() {
                    // Whether the databases' rename took place is unknown: the temporary
                    // database is what tells the next restore (see `files`), so it stays.
                    tracing::error!(message = "The swap's outcome is unknown; the temporary database is left for the next restore of this destination to settle.", database = %tmp);
                    return Err(e);
                }
                if let Err(error) = s.discard().await {
                    tracing::error!(message = "Cannot remove the companion files' temporary directory; the next restore of this destination will.", path = %s.staged().display(), error = %error);
                }
            }
            drop_tmp(&server, &tmp).await;
            return Err(e);
        }
    };
    if let (Some(ex), Some(s), Some(d)) = (extracted, &staged, &dirs) {
        files_report = Some(FilesReport::Restored {
            directory: d.dest().to_path_buf(),
            file_count: ex.counts.files,
            file_bytes: ex.counts.bytes,
            stored_bytes: ex.stored_bytes,
            target: ex.target,
            failed_targets: ex.failed_targets,
            replaced: s.replaced(),
            kept_old: s.kept().map(|p| p.to_path_buf()),
        });
    }
    tracing::info!(message = "Restore swapped in.", target = %target_used, destination = %dest.database, tables, files = ?files_report);
    Ok(RestoreReport {
        source: req.source.clone(),
        database: req.database.clone(),
        snapshot_id: manifest.snapshot_id.clone(),
        data_read_at: manifest.started_at,
        chosen: choose::describe(entry, &req.snapshot),
        namespace: dest.namespace.clone(),
        destination: dest.database.clone(),
        target: target_used,
        failed_targets: failures,
        stored_bytes: loaded.stored_bytes,
        raw_bytes: loaded.raw_bytes,
        tables,
        jobs: req.jobs.max(1),
        replaced,
        kept_old,
        cleaned_leftovers: cleaned,
        files: files_report,
        duration: started.elapsed(),
    })
}

/// Drops the temporary database after a failure; a failure to drop is logged (the next run
/// drops it) rather than hiding the error that caused it.
async fn drop_tmp(server: &Server, tmp: &str) {
    if let Err(error) = server.drop_database(tmp).await {
        tracing::error!(message = "Cannot drop the temporary database; the next restore of this destination will.", database = %tmp, error = %error);
    }
}

enum AttemptError {
    Load(LoadError),
    Swap(SwapError),
}

/// One target's attempt: a fresh temporary database, then the copy loaded into it.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    app: &App,
    server: &Server,
    dest: &Destination,
    tmp: &str,
    tool: &source::PgTool,
    target: &crate::storage::target::Target,
    manifest: &crate::storage::manifest::Manifest,
    req: &RestoreRequest,
    progress: Arc<LoadProgress>,
    cancel: &CancellationToken,
    stamp: &str,
) -> Result<load::Loaded, AttemptError> {
    let comment = format!(
        "pgferry temporary restore of {}/{} snapshot {} into {:?}, started {stamp} by pid {}; safe to drop when no restore runs",
        manifest.source,
        manifest.database,
        manifest.snapshot_id,
        dest.database,
        std::process::id()
    );
    server
        .drop_database(tmp)
        .await
        .map_err(AttemptError::Swap)?;
    server
        .create_tmp(tmp, &dest.target.owner, &comment)
        .await
        .map_err(AttemptError::Swap)?;
    let into = RestoreInto {
        tool,
        url: &dest.url,
        tmp_database: tmp,
        owner: &dest.target.owner,
        identity_file: app.config.restore_identity_file(&dest.target),
    };
    let r = if req.jobs > 1 {
        load::spooled(
            target,
            manifest,
            &into,
            req.jobs,
            &app.config.restore.spool_dir,
            progress,
            cancel,
        )
        .await
    } else {
        load::stream(target, manifest, &into, progress, cancel).await
    };
    r.map_err(AttemptError::Load)
}
