//! The retention executor: applies `retention::plan` to the snapshots on the targets.
//!
//! Per source, database and target: read the catalog (only the selected, configured source
//! and database folders; only manifests that belong at their key, see `catalog`), ask
//! [`retention::prune_allowed`], plan by when each snapshot's data was read, then delete each
//! expired snapshot's manifest first (so a crash leaves an orphan dump, never a manifest
//! pointing at nothing), then its verify report, then the objects that manifest names (its
//! dump, then its companion-files archive; never a key derived from the id); finally remove
//! the dumps and files archives no manifest names that are older than the orphan grace, and
//! abort the multipart uploads (dump or files) whose markers (see `upload`) are that old
//! without a manifest. Only keys of the shapes pgferry writes, inside the selected folders, are
//! ever deleted; nothing a manifest names is deleted except with that manifest's snapshot. The
//! decisions are `retention`'s; this module only lists, aborts and deletes. A target that
//! cannot be listed is skipped and reported.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use object_store::path::Path;
use serde::Serialize;

use crate::app::App;
use crate::retention::{self, BackupOutcome, KeepReason, SkipReason, SnapshotRef};
use crate::storage::catalog::{self, Filter, SnapshotEntry};
use crate::storage::key::{self, OwnedName, SnapshotId, SnapshotKey};
use crate::storage::target::Target;
use crate::storage::upload::{self, CleanError, Cleaned};

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("target {target}: cannot delete {key}: {source}; the next prune retries")]
    Delete {
        target: String,
        key: String,
        source: object_store::Error,
    },
    #[error("target {target} could not be listed, so nothing on it was pruned: {error}")]
    Unreachable { target: String, error: String },
    #[error("target {target}: {source}")]
    Upload { target: String, source: CleanError },
    #[error("target {target}: cannot clean the staging files of killed uploads: {error}; the next prune retries")]
    Staging { target: String, error: String },
}

/// Which databases to prune.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub source: Option<String>,
    pub database: Option<String>,
}

/// The plan for one database on one target, and what was done.
#[derive(Debug, Clone, Serialize)]
pub struct DatabasePlan {
    pub source: String,
    pub database: String,
    pub target: String,
    /// Kept snapshot ids, newest first, with every rule that keeps them.
    pub keep: Vec<(String, Vec<KeepReason>)>,
    /// Expired snapshot ids, newest first.
    pub delete: Vec<String>,
    /// Why nothing was deleted, if retention left the database alone.
    #[serde(serialize_with = "ser_skip")]
    pub skipped: Option<SkipReason>,
}

fn ser_skip<S: serde::Serializer>(v: &Option<SkipReason>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(r) => s.serialize_some(&r.to_string()),
        None => s.serialize_none(),
    }
}

/// What a prune run planned and did.
#[derive(Debug, Default)]
pub struct PruneReport {
    pub plans: Vec<DatabasePlan>,
    /// (target, key) of the dumps without a manifest that are past the grace period.
    pub orphans: Vec<(String, String)>,
    /// Snapshots deleted (their manifest is gone), orphans removed.
    pub deleted_snapshots: usize,
    pub deleted_orphans: usize,
    /// (target, marker key) of the unfinished uploads without a manifest past the grace period.
    pub unfinished_uploads: Vec<(String, String)>,
    /// Unfinished uploads aborted (with their marker and any dump object deleted).
    pub aborted_uploads: usize,
    pub errors: Vec<PruneError>,
}

/// Plans and (unless `dry_run`) applies retention to the selected databases on every target.
/// `last` says how each database's last backup ended, as far as the caller knows.
pub async fn prune(
    app: &App,
    selection: &Selection,
    last: &(dyn Fn(&str, &str) -> Option<BackupOutcome> + Sync),
    now: DateTime<Utc>,
    orphan_grace: Duration,
    dry_run: bool,
) -> PruneReport {
    let filter = Filter {
        source: selection.source.clone(),
        databases: selection.database.iter().cloned().collect(),
        target: None,
    };
    let catalog = app.catalog(&filter).await;
    let mut report = PruneReport::default();
    for (target, error) in &catalog.unreachable {
        report.errors.push(PruneError::Unreachable {
            target: target.clone(),
            error: error.clone(),
        });
    }
    let databases: BTreeSet<(String, String)> = catalog
        .snapshots
        .iter()
        .map(|s| (s.manifest.source.clone(), s.manifest.database.clone()))
        .collect();
    for (source_name, database) in databases {
        // The catalog holds configured sources only.
        let Some(source) = app.config.source(&source_name) else {
            continue;
        };
        // What the policy keeps over every target's snapshots together: only those are worth
        // holding for repair (repair copies exactly these; a snapshot the policy expires
        // everywhere is not held because a target lacks it).
        let everywhere: Vec<SnapshotRef> = catalog
            .of(&source_name, &database)
            .map(|s| SnapshotRef {
                id: s.id().to_string(),
                time: s.data_time(),
            })
            .collect();
        let kept_overall: std::collections::HashSet<String> =
            retention::plan(&source.retention, &everywhere)
                .keep
                .into_iter()
                .map(|(r, _)| r.id)
                .collect();
        for t in app.targets.iter() {
            if catalog.unreachable.iter().any(|(n, _)| n == &t.name) {
                continue;
            }
            let held: Vec<&SnapshotEntry> = catalog
                .of(&source_name, &database)
                .filter(|s| s.objects.contains_key(&t.name))
                .collect();
            let refs: Vec<SnapshotRef> = held
                .iter()
                .map(|s| SnapshotRef {
                    id: s.id().to_string(),
                    time: s.data_time(),
                })
                .collect();
            if refs.is_empty() {
                continue;
            }
            let mut plan = DatabasePlan {
                source: source_name.clone(),
                database: database.clone(),
                target: t.name.clone(),
                keep: Vec::new(),
                delete: Vec::new(),
                skipped: None,
            };
            if let Err(reason) = retention::prune_allowed(last(&source_name, &database)) {
                plan.skipped = Some(reason);
                plan.keep = refs.into_iter().map(|r| (r.id, Vec::new())).collect();
                report.plans.push(plan);
                continue;
            }
            let p = retention::plan(&source.retention, &refs);
            plan.keep = p.keep.into_iter().map(|(r, why)| (r.id, why)).collect();
            plan.delete = p.delete.into_iter().map(|r| r.id).collect();
            // The repair hold (`retention::held_for_repair`): copies another target lacks stay
            // until repair has had `[repair] grace` to copy them.
            let configured: Vec<String> = app.targets.iter().map(|t| t.name.clone()).collect();
            plan.delete.retain(|id| {
                let held = catalog
                    .of(&source_name, &database)
                    .find(|s| s.id() == id)
                    .is_some_and(|s| {
                        kept_overall.contains(id)
                            && retention::held_for_repair(
                                &s.targets,
                                &configured,
                                s.manifest.finished_at,
                                now,
                                app.config.repair.grace,
                            )
                    });
                if held {
                    plan.keep.push((id.clone(), vec![KeepReason::RepairSource]));
                }
                !held
            });
            if !dry_run {
                for id in &plan.delete {
                    let Some(entry) = held.iter().find(|s| s.id() == id) else {
                        continue;
                    };
                    match delete_snapshot(t, entry).await {
                        Ok(()) => {
                            report.deleted_snapshots += 1;
                            app.metrics
                                .retention_deleted_total
                                .with_label_values(&[&t.name])
                                .inc();
                            tracing::info!(message = "Retention deleted a snapshot.", target = %t.name, source = %source_name, database = %database, snapshot_id = %id);
                        }
                        Err(e) => {
                            tracing::warn!(message = "Retention could not delete a snapshot.", error = %e);
                            report.errors.push(e);
                        }
                    }
                }
            }
            report.plans.push(plan);
        }
    }

    // Dumps without a manifest, past the grace period.
    for t in app.targets.iter() {
        let candidates: Vec<(String, DateTime<Utc>)> = catalog
            .orphans
            .iter()
            .filter(|o| o.target == t.name)
            .map(|o| (o.key.to_string(), o.last_modified))
            .collect();
        for key in retention::orphan_dumps(&candidates, now, orphan_grace) {
            report.orphans.push((t.name.clone(), key.clone()));
            if dry_run {
                continue;
            }
            let Some(orphan) = catalog
                .orphans
                .iter()
                .find(|o| o.target == t.name && o.key.as_ref() == key)
            else {
                continue;
            };
            match delete(t, &orphan.key).await {
                Ok(()) => {
                    report.deleted_orphans += 1;
                    tracing::info!(message = "Retention removed a dump left without a manifest.", target = %t.name, key = %key);
                }
                Err(e) => report.errors.push(e),
            }
        }
        clean_uploads(t, &catalog, now, orphan_grace, dry_run, &mut report).await;
        let sources: Vec<String> = app
            .config
            .sources
            .iter()
            .filter(|s| selection.source.as_ref().is_none_or(|n| *n == s.name))
            .map(|s| s.name.clone())
            .collect();
        clean_staging_files(
            t,
            sources,
            selection.database.clone(),
            now,
            orphan_grace,
            dry_run,
            &mut report,
        )
        .await;
    }
    report
}

/// The database folders of a directory target in which prune may remove staging files: the
/// selected database's, or every folder directly under each selected configured source's.
/// Blocking (reads directories): call it off the async threads.
fn staging_folders(
    sources: &[String],
    root: &std::path::Path,
    t: &Target,
    database: Option<&str>,
) -> Vec<std::path::PathBuf> {
    let mut folders = Vec::new();
    for source in sources {
        match database {
            Some(d) => folders.push(root.join(t.at(&key::database_folder(source, d)).as_ref())),
            None => {
                let dir = root.join(t.folder(Some(source), None).as_ref());
                for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|k| k.is_dir()) {
                        folders.push(e.path());
                    }
                }
            }
        }
    }
    folders
}

/// Removes the staging files that killed uploads left in a directory target's selected
/// database folders (see [`staging_folders`]), past the grace: only those of dump names
/// pgferry writes, directly in a database folder.
async fn clean_staging_files(
    t: &Target,
    sources: Vec<String>,
    database: Option<String>,
    now: DateTime<Utc>,
    orphan_grace: Duration,
    dry_run: bool,
    report: &mut PruneReport,
) {
    let Some(root) = t.root.clone() else { return };
    let target = t.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        for folder in staging_folders(&sources, &root, &target, database.as_deref()) {
            for (path, modified) in upload::staging_files(&folder)? {
                let owned_here = path.parent() == Some(folder.as_path())
                    && path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.rsplit_once('#'))
                        .and_then(|(stem, _)| key::parse_name(stem))
                        .is_some_and(|n| matches!(n, OwnedName::Dump(..) | OwnedName::Files(..)));
                if owned_here {
                    found.push((path, modified));
                }
            }
        }
        Ok::<_, std::io::Error>(found)
    })
    .await;
    let files = match listed {
        Ok(Ok(files)) => files,
        Ok(Err(error)) => {
            report.errors.push(PruneError::Staging {
                target: t.name.clone(),
                error: error.to_string(),
            });
            return;
        }
        Err(panicked) => {
            report.errors.push(PruneError::Staging {
                target: t.name.clone(),
                error: panicked.to_string(),
            });
            return;
        }
    };
    let candidates: Vec<(String, DateTime<Utc>)> = files
        .into_iter()
        .map(|(p, m)| (p.display().to_string(), m))
        .collect();
    for path in retention::orphan_dumps(&candidates, now, orphan_grace) {
        report.orphans.push((t.name.clone(), path.clone()));
        if dry_run {
            continue;
        }
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {
                report.deleted_orphans += 1;
                tracing::info!(message = "Retention removed the staging file of an upload a killed run left.", target = %t.name, path = %path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.errors.push(PruneError::Staging {
                target: t.name.clone(),
                error: format!("cannot remove {path}: {e}"),
            }),
        }
    }
}

/// Aborts the uploads whose markers are older than the grace without a manifest (left by a run
/// that died), and deletes stale markers of committed snapshots.
async fn clean_uploads(
    t: &Target,
    catalog: &catalog::Catalog,
    now: DateTime<Utc>,
    orphan_grace: Duration,
    dry_run: bool,
    report: &mut PruneReport,
) {
    let markers: Vec<_> = catalog
        .uploads
        .iter()
        .filter(|u| u.target == t.name)
        .collect();
    let candidates: Vec<(String, DateTime<Utc>)> = markers
        .iter()
        .map(|u| (u.key.to_string(), u.last_modified))
        .collect();
    let old = retention::orphan_dumps(&candidates, now, orphan_grace);
    for u in markers
        .into_iter()
        .filter(|u| old.contains(&u.key.to_string()))
    {
        if !u.committed {
            report
                .unfinished_uploads
                .push((t.name.clone(), u.key.to_string()));
        }
        if dry_run {
            continue;
        }
        match upload::clean(t, &u.key, u.committed).await {
            Ok(Cleaned::Aborted { upload_id }) => {
                report.aborted_uploads += 1;
                tracing::info!(message = "Retention aborted an upload left unfinished by a run that died.", target = %t.name, key = %u.key, upload_id = %upload_id);
            }
            Ok(Cleaned::StaleMarker) => {
                tracing::info!(message = "Retention deleted the marker of a completed upload.", target = %t.name, key = %u.key);
            }
            Err(source) => {
                tracing::warn!(message = "Retention could not clean an unfinished upload.", target = %t.name, key = %u.key, error = %source);
                report.errors.push(PruneError::Upload {
                    target: t.name.clone(),
                    source,
                });
            }
        }
    }
}

/// Deletes one snapshot from a target: its manifest first (a crash after it leaves orphans,
/// never a manifest naming a missing object), then its verify report, then the objects that
/// target's manifest names (dump, companion files) and the markers their completed uploads
/// may have left.
pub async fn delete_snapshot(t: &Target, entry: &SnapshotEntry) -> Result<(), PruneError> {
    let Some(id) = SnapshotId::parse(entry.id()) else {
        return Ok(());
    };
    let sk = SnapshotKey::new(&entry.manifest.source, &entry.manifest.database, id);
    delete(t, &t.at(&sk.manifest())).await?;
    delete(t, &t.at(&sk.verify())).await?;
    if let Some(objects) = entry.objects.get(&t.name) {
        delete(t, &objects.dump).await?;
        if let Some(marker) = upload::marker_key(&objects.dump) {
            delete(t, &marker).await?;
        }
        if let Some(files) = &objects.files {
            delete(t, files).await?;
            if let Some(marker) = upload::marker_key(files) {
                delete(t, &marker).await?;
            }
        }
    }
    Ok(())
}

/// Deletes one object; one that is already gone is fine.
async fn delete(t: &Target, key: &Path) -> Result<(), PruneError> {
    match t.store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(PruneError::Delete {
            target: t.name.clone(),
            key: key.to_string(),
            source,
        }),
    }
}

/// The plan as `pgferry prune` prints it, and (unless `dry_run`) what was done.
pub fn render(report: &PruneReport, dry_run: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let verb = if dry_run { "would delete" } else { "delete" };
    for p in &report.plans {
        let _ = writeln!(
            out,
            "{}/{} on {}: keep {}, {verb} {}",
            p.source,
            p.database,
            p.target,
            p.keep.len(),
            p.delete.len()
        );
        if let Some(reason) = &p.skipped {
            let _ = writeln!(out, "  skipped: {reason}");
        }
        for (id, why) in &p.keep {
            let why: Vec<String> = why.iter().map(|w| w.to_string()).collect();
            let _ = writeln!(out, "  keep    {id}  {}", why.join(", "));
        }
        for id in &p.delete {
            let _ = writeln!(out, "  {verb:<7} {id}");
        }
    }
    for (t, key) in &report.orphans {
        let what = if key.ends_with(key::FILES_SUFFIX) || key.ends_with(key::ENCRYPTED_FILES_SUFFIX)
        {
            "orphan files archive"
        } else {
            "orphan dump"
        };
        let _ = writeln!(
            out,
            "{what} on {t} (no manifest, older than the grace): {verb} {key}"
        );
    }
    let abort = if dry_run { "would abort" } else { "abort" };
    for (t, key) in &report.unfinished_uploads {
        let _ = writeln!(
            out,
            "unfinished upload on {t} (no manifest, older than the grace): {abort} the upload of {key}"
        );
    }
    if report.plans.is_empty() && report.orphans.is_empty() && report.unfinished_uploads.is_empty()
    {
        let _ = writeln!(out, "nothing to prune: no committed snapshot selected");
    }
    if !dry_run {
        let _ = writeln!(
            out,
            "deleted {} snapshot(s) and {} orphan dump(s), aborted {} unfinished upload(s)",
            report.deleted_snapshots, report.deleted_orphans, report.aborted_uploads
        );
    }
    out
}

#[cfg(test)]
#[path = "prune_tests.rs"]
mod tests;
