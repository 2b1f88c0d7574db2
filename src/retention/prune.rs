//! The retention executor: applies `retention::plan` to the snapshots on the targets.
//!
//! Per source, database and target: read the catalog, ask [`retention::prune_allowed`],
//! plan, then delete each expired snapshot manifest first (so a crash leaves an orphan dump,
//! never a manifest pointing at nothing), then its verify report, then its dump; finally remove
//! the dumps without a manifest older than the orphan grace, and abort the multipart uploads
//! whose markers (see `upload`) are that old without a manifest. The decisions are
//! `retention`'s; this module only lists, aborts and deletes. A target that cannot be listed
//! is skipped and reported.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use object_store::ObjectStore;
use serde::Serialize;

use crate::app::App;
use crate::retention::{self, BackupOutcome, KeepReason, SkipReason, SnapshotRef};
use crate::schedule;
use crate::storage::catalog::{self, Filter};
use crate::storage::target::{Target, DUMP_SUFFIX, MANIFEST_SUFFIX, UPLOAD_SUFFIX, VERIFY_SUFFIX};
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
    /// Snapshots of sources no longer in the config: never touched.
    pub unknown_sources: BTreeSet<String>,
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
    let catalog = catalog::load(&app.targets, &filter).await;
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
        let Some(source) = app.config.source(&source_name) else {
            report.unknown_sources.insert(source_name);
            continue;
        };
        for t in app.targets.iter() {
            if catalog.unreachable.iter().any(|(n, _)| n == &t.name) {
                continue;
            }
            let refs: Vec<SnapshotRef> = catalog
                .of(&source_name, &database)
                .filter(|s| s.targets.contains(&t.name))
                .map(|s| SnapshotRef {
                    id: s.id().to_string(),
                    time: schedule::parse_snapshot_id(s.id()).unwrap_or(s.manifest.started_at),
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
                        retention::held_for_repair(
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
                    let object = catalog
                        .of(&source_name, &database)
                        .find(|s| s.id() == id)
                        .map(|s| s.manifest.object_key.clone());
                    match delete_snapshot(t, &source_name, &database, id, object.as_deref()).await {
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
            match delete(t, &object_store::path::Path::from(key.as_str())).await {
                Ok(()) => {
                    report.deleted_orphans += 1;
                    tracing::info!(message = "Retention removed a dump left without a manifest.", target = %t.name, key = %key);
                }
                Err(e) => report.errors.push(e),
            }
        }
        clean_uploads(t, &catalog, now, orphan_grace, dry_run, &mut report).await;
        clean_staging_files(t, selection, now, orphan_grace, dry_run, &mut report).await;
    }
    report
}

/// Removes the staging files that killed uploads left in a directory target, past the grace:
/// under the selected source's folder, or the whole target.
async fn clean_staging_files(
    t: &Target,
    selection: &Selection,
    now: DateTime<Utc>,
    orphan_grace: Duration,
    dry_run: bool,
    report: &mut PruneReport,
) {
    let Some(root) = &t.root else { return };
    let root = root.join(t.folder(selection.source.as_deref(), None).as_ref());
    let listed = tokio::task::spawn_blocking(move || upload::staging_files(&root)).await;
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

/// Deletes one snapshot from a target: manifest first, then verify report and the object the
/// manifest names (`object`, relative to the prefix; write-once keys), and the format-2 dump
/// key and an upload marker its completed upload may have left.
pub async fn delete_snapshot(
    t: &Target,
    source: &str,
    database: &str,
    snapshot_id: &str,
    object: Option<&str>,
) -> Result<(), PruneError> {
    for suffix in [MANIFEST_SUFFIX, VERIFY_SUFFIX] {
        delete(t, &t.key(source, database, snapshot_id, suffix)).await?;
    }
    if let Some(object) = object.and_then(crate::storage::key::object_path) {
        delete(t, &t.at(&object)).await?;
    }
    for suffix in [DUMP_SUFFIX, UPLOAD_SUFFIX] {
        delete(t, &t.key(source, database, snapshot_id, suffix)).await?;
    }
    Ok(())
}

/// Deletes one object; one that is already gone is fine.
async fn delete(t: &Target, key: &object_store::path::Path) -> Result<(), PruneError> {
    match t.store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(source) => Err(PruneError::Delete {
            target: t.name.clone(),
            key: key.to_string(),
            source,
        }),
    }
}

/// The plan as `pgferry prune` prints it.
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
        let _ = writeln!(
            out,
            "orphan dump on {t} (no manifest, older than the grace): {verb} {key}"
        );
    }
    let abort = if dry_run { "would abort" } else { "abort" };
    for (t, key) in &report.unfinished_uploads {
        let _ = writeln!(
            out,
            "unfinished upload on {t} (no manifest, older than the grace): {abort} the upload of {key}"
        );
    }
    for s in &report.unknown_sources {
        let _ = writeln!(
            out,
            "source {s} is not in the config: its snapshots are left alone"
        );
    }
    if report.plans.is_empty() && report.orphans.is_empty() && report.unfinished_uploads.is_empty()
    {
        let _ = writeln!(out, "nothing to prune: no committed snapshot selected");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::storage::manifest::tests::sample;
    use crate::storage::target::Target;
    use object_store::memory::InMemory;
    use object_store::PutPayload;
    use std::sync::Arc;

    fn app(targets: Vec<Target>) -> App {
        let text = r#"
[[source]]
name = "prod"
url = "postgres://pgferry@127.0.0.1:1/postgres"
retention = { keep_last = 2, hourly = 0, daily = 0, weekly = 0, monthly = 0 }

[[target]]
name = "a"
url = "file:///nonexistent/a"
"#;
        let config =
            Config::from_str_at(text, std::path::Path::new("/etc/pgferry/x.toml")).unwrap();
        App {
            config: Arc::new(config),
            targets: Arc::new(targets),
            metrics: crate::metrics::Metrics::new(),
        }
    }

    async fn put_snapshot(t: &Target, id: &str) {
        let mut m = sample();
        m.snapshot_id = id.into();
        m.object_key =
            crate::storage::target::snapshot_path("prod", "acme", id, DUMP_SUFFIX).to_string();
        for (suffix, body) in [
            (DUMP_SUFFIX, b"dump".to_vec()),
            (
                VERIFY_SUFFIX,
                br#"{"result":"ok","finished_at":"2026-11-27T15:00:00Z"}"#.to_vec(),
            ),
            (MANIFEST_SUFFIX, m.to_json().to_vec()),
        ] {
            t.store
                .put(&t.key("prod", "acme", id, suffix), PutPayload::from(body))
                .await
                .unwrap();
        }
    }

    async fn keys(t: &Target) -> Vec<String> {
        use futures::TryStreamExt;
        let mut v: Vec<String> = t
            .store
            .list(None)
            .map_ok(|o| o.location.to_string())
            .try_collect()
            .await
            .unwrap();
        v.sort();
        v
    }

    const IDS: [&str; 4] = [
        "20261127T110000Z",
        "20261127T120000Z",
        "20261127T130000Z",
        "20261127T140000Z",
    ];

    #[tokio::test]
    async fn the_last_copies_another_target_lacks_are_held_for_the_repair_grace() {
        let a = Target::new("a", Arc::new(InMemory::new()), "pg", 10_000);
        let b = Target::new("b", Arc::new(InMemory::new()), "", 10_000);
        for id in IDS {
            put_snapshot(&a, id).await;
        }
        // b holds the two newest and the oldest: it lacks IDS[1], which a's plan expires.
        for id in [IDS[0], IDS[2], IDS[3]] {
            put_snapshot(&b, id).await;
        }
        let app = app(vec![a.clone(), b.clone()]);
        let finished = sample().finished_at;
        let grace = app.config.repair.grace;
        let run = |now| {
            let app = app.clone();
            async move {
                prune(
                    &app,
                    &Selection::default(),
                    &|_, _| None,
                    now,
                    Duration::ZERO,
                    false,
                )
                .await
            }
        };

        // An hour after it finished: a keeps IDS[1] for repair; IDS[0] is on both, so it goes
        // from a (and from b, whose plan expires it too).
        let r = run(finished + chrono::TimeDelta::hours(1)).await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let plan_a = r.plans.iter().find(|p| p.target == "a").unwrap();
        assert_eq!(plan_a.delete, vec![IDS[0]]);
        assert!(plan_a
            .keep
            .contains(&(IDS[1].to_string(), vec![KeepReason::RepairSource])));
        assert!(keys(&a).await.iter().any(|k| k.contains(IDS[1])));

        // Past the grace the lack counts as permanent: retention goes on.
        let r = run(finished + chrono::TimeDelta::from_std(grace).unwrap()).await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(keys(&a).await.iter().all(|k| !k.contains(IDS[1])));
    }

    #[tokio::test]
    async fn deletes_expired_snapshots_on_every_target_and_old_orphans() {
        let a = Target::new("a", Arc::new(InMemory::new()), "pg", 10_000);
        let b = Target::new("b", Arc::new(InMemory::new()), "", 10_000);
        for id in IDS {
            put_snapshot(&a, id).await;
        }
        for id in &IDS[2..] {
            put_snapshot(&b, id).await;
        }
        // A dump without a manifest on b.
        let orphan = b.key("prod", "acme", "20261126T000000Z", DUMP_SUFFIX);
        b.store
            .put(&orphan, PutPayload::from_static(b"x"))
            .await
            .unwrap();
        let app = app(vec![a.clone(), b.clone()]);
        let now = Utc::now();

        // Dry run: plans, deletes nothing; the orphan is younger than the grace.
        let r = prune(
            &app,
            &Selection::default(),
            &|_, _| None,
            now,
            retention::DEFAULT_ORPHAN_GRACE,
            true,
        )
        .await;
        assert_eq!(r.plans.len(), 2);
        assert_eq!(r.plans[0].delete, vec![IDS[1], IDS[0]]);
        assert!(r.plans[1].delete.is_empty());
        assert!(r.orphans.is_empty());
        assert_eq!(keys(&a).await.len(), 12);
        assert!(render(&r, true).contains("would delete 20261127T110000Z"));

        // For real, with a grace that makes the orphan old.
        let r = prune(
            &app,
            &Selection::default(),
            &|_, _| None,
            now,
            Duration::ZERO,
            false,
        )
        .await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.deleted_snapshots, 2);
        assert_eq!(r.deleted_orphans, 1);
        let left = keys(&a).await;
        assert_eq!(left.len(), 6, "{left:?}");
        assert!(left
            .iter()
            .all(|k| k.contains("T130000Z") || k.contains("T140000Z")));
        assert_eq!(keys(&b).await.len(), 6);
        assert_eq!(
            app.metrics
                .retention_deleted_total
                .with_label_values(&["a"])
                .get(),
            2
        );
        // Idempotent.
        let r = prune(
            &app,
            &Selection::default(),
            &|_, _| None,
            now,
            Duration::ZERO,
            false,
        )
        .await;
        assert_eq!(r.deleted_snapshots, 0);
    }

    #[tokio::test]
    async fn unfinished_uploads_past_the_grace_are_aborted_and_stale_markers_removed() {
        use object_store::multipart::MultipartStore;
        let store = Arc::new(InMemory::new());
        let a = Target::new("a", store.clone(), "pg", 10_000).with_multipart(store.clone());
        put_snapshot(&a, IDS[0]).await;
        // A marker left beside a committed snapshot (its deletion failed after completion).
        let stale = a.key(
            "prod",
            "acme",
            IDS[0],
            crate::storage::target::UPLOAD_SUFFIX,
        );
        a.store
            .put(&stale, PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        // An upload whose process died after one part.
        let dump = a.key("prod", "acme", IDS[1], DUMP_SUFFIX);
        let mut open = crate::storage::upload::start(&a, &dump).await.unwrap();
        open.put_part(PutPayload::from_static(b"part"))
            .await
            .unwrap();
        drop(open);
        let marker = a.key(
            "prod",
            "acme",
            IDS[1],
            crate::storage::target::UPLOAD_SUFFIX,
        );
        let id: crate::storage::upload::UploadMarker =
            serde_json::from_slice(&a.store.get(&marker).await.unwrap().bytes().await.unwrap())
                .unwrap();
        let app = app(vec![a.clone()]);
        let all = Selection::default();
        let run = |grace, dry_run| prune(&app, &all, &|_, _| None, Utc::now(), grace, dry_run);

        // Within the grace it may be a live upload: left alone, not even reported.
        let r = run(retention::DEFAULT_ORPHAN_GRACE, false).await;
        assert!(r.unfinished_uploads.is_empty());
        assert_eq!(r.aborted_uploads, 0);
        assert_eq!(keys(&a).await.len(), 5);

        let r = run(Duration::ZERO, true).await;
        assert_eq!(
            r.unfinished_uploads,
            vec![("a".to_string(), marker.to_string())]
        );
        assert!(render(&r, true).contains(&format!("would abort the upload of {marker}")));
        assert_eq!(keys(&a).await.len(), 5, "a dry run touches nothing");

        let r = run(Duration::ZERO, false).await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.aborted_uploads, 1);
        let left = keys(&a).await;
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left
            .iter()
            .all(|k| k.contains(IDS[0]) && !k.ends_with(".upload.json")));
        assert!(
            store.abort_multipart(&dump, &id.upload_id).await.is_err(),
            "the upload is still open"
        );
    }

    #[tokio::test]
    async fn a_failed_last_backup_blocks_pruning_and_the_newest_always_stays() {
        let a = Target::new("a", Arc::new(InMemory::new()), "", 10_000);
        for id in IDS {
            put_snapshot(&a, id).await;
        }
        let app = app(vec![a.clone()]);
        let failed = |_: &str, _: &str| Some(BackupOutcome::Failed);
        let r = prune(
            &app,
            &Selection::default(),
            &failed,
            Utc::now(),
            Duration::ZERO,
            false,
        )
        .await;
        assert_eq!(r.deleted_snapshots, 0);
        assert_eq!(r.plans[0].skipped, Some(SkipReason::LastBackupFailed));
        assert_eq!(keys(&a).await.len(), 12);

        let mut cfg = (*app.config).clone();
        cfg.sources[0].retention = crate::config::RetentionPolicy {
            keep_last: 0,
            hourly: 0,
            daily: 0,
            weekly: 0,
            monthly: 0,
        };
        let app = App {
            config: Arc::new(cfg),
            ..app
        };
        let sel = Selection {
            source: Some("prod".into()),
            database: Some("acme".into()),
        };
        let r = prune(
            &app,
            &sel,
            &|_, _| Some(BackupOutcome::Committed),
            Utc::now(),
            Duration::ZERO,
            false,
        )
        .await;
        assert_eq!(r.deleted_snapshots, 3);
        let left = keys(&a).await;
        assert_eq!(left.len(), 3);
        assert!(left.iter().all(|k| k.contains(IDS[3])));
        assert_eq!(r.plans[0].keep[0].1, vec![KeepReason::Newest]);
    }
}
