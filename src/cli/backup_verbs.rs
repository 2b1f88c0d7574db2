//! `backup`, `list` and `prune`: the verbs over sources and the snapshot catalog.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::StreamExt;

use super::output;
use super::{
    cancel_on_signals, human_age, human_bytes, names, spawn_ticker, BackupArgs, CliError, ListArgs,
    PruneArgs,
};
use crate::app::App;
use crate::backup::pipeline::Progress;
use crate::backup::{self, SlotOutcome};
use crate::source;
use crate::storage::catalog::{self, Filter};
use crate::storage::key::{SnapshotId, SnapshotKey};

pub(crate) async fn backup_cmd(app: &App, args: BackupArgs) -> Result<(), CliError> {
    let sources: Vec<_> = match &args.source {
        Some(name) => vec![app.config.source(name).ok_or_else(|| {
            CliError::Usage(format!(
                "no source named {name:?} in {}; configured: {}",
                app.config.path.display(),
                names(app.config.sources.iter().map(|s| s.name.as_str()))
            ))
        })?],
        None => app.config.sources.iter().collect(),
    };
    // Resolve the databases of each source first, so a typo fails before any dump starts.
    let mut jobs = Vec::new();
    for source in sources {
        let client = source::connect(&source.url, None)
            .await
            .map_err(|e| CliError::Failed(format!("source {}: {e}", source.name)))?;
        let selected = source::discover(&client, source)
            .await
            .map_err(|e| CliError::Failed(format!("source {}: {e}", source.name)))?;
        let dbs = if args.database.is_empty() {
            selected
        } else {
            let all: Vec<String> = client
                .query(
                    "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1",
                    &[],
                )
                .await
                .map_err(|e| CliError::Failed(format!("source {}: {e}", source.name)))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut dbs = Vec::new();
            for d in &args.database {
                if all.contains(d) {
                    dbs.push(d.clone());
                } else if args.source.is_some() {
                    return Err(CliError::Failed(format!(
                        "database {d:?} does not exist on source {}; it has: {}",
                        source.name,
                        names(all.iter().map(String::as_str))
                    )));
                }
            }
            dbs
        };
        for d in dbs {
            jobs.push((source, d));
        }
    }
    if jobs.is_empty() {
        return Err(CliError::Failed(
            "no database selected: check the sources' databases/exclude globs and --database"
                .into(),
        ));
    }
    // Without --force, the current slot of the source's schedule: the same id the daemon
    // uses, so a committed slot is not dumped again and a replica skips what this run did.
    let now = chrono::Utc::now();
    let cancel = cancel_on_signals();
    let total = jobs.len();
    let force = args.force;
    let results: Vec<_> = futures::stream::iter(jobs.into_iter().map(|(source, database)| {
        let cancel = cancel.clone();
        let id = match source.schedule.slot_at_or_before(now) {
            Some(slot) if !force => SnapshotId::from_time(slot),
            _ => SnapshotId::from_time(now),
        };
        let snapshot = SnapshotKey::new(&source.name, &database, id);
        async move {
            let progress = Arc::new(Progress::default());
            let ticker = {
                let progress = progress.clone();
                spawn_ticker(format!("{}/{}", source.name, database), move |secs| {
                    let raw = progress.raw_bytes.load(Ordering::Relaxed);
                    let stored = progress.stored_bytes.load(Ordering::Relaxed);
                    format!(
                        "{} dumped, {} stored, {}/s",
                        human_bytes(raw),
                        human_bytes(stored),
                        human_bytes((raw as f64 / secs) as u64)
                    )
                })
            };
            let r = backup::backup_slot(app, source, &snapshot, force, progress, cancel).await;
            ticker.cancel();
            if !args.json {
                print_backup_line(&snapshot, &r);
            }
            let ok = matches!(
                r,
                Ok(SlotOutcome::Committed(_) | SlotOutcome::AlreadyCommitted(_))
            );
            (ok, output::backup_entry(&snapshot, &r))
        }
    }))
    .buffer_unordered(app.config.daemon.max_concurrent_backups)
    .collect()
    .await;
    let failed = results.iter().filter(|(ok, _)| !*ok).count();
    if args.json {
        output::json_line(&serde_json::json!({
            "result": if failed == 0 { "success" } else { "failure" },
            "databases": results.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
        }));
    }
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} of {total} database backup(s) failed; see above"
        )));
    }
    Ok(())
}

fn print_backup_line(snapshot: &SnapshotKey, r: &Result<SlotOutcome, backup::BackupError>) {
    let (source, database, id) = (&snapshot.source, &snapshot.database, &snapshot.id);
    match r {
        Ok(SlotOutcome::Committed(report)) => {
            let m = &report.manifest;
            let mut line = format!(
                "{source}/{database} {id} committed: raw {} stored {} ratio {:.2}x in {:.1}s on {}",
                human_bytes(m.raw_size),
                human_bytes(m.stored_size),
                m.ratio(),
                report.duration.as_secs_f64(),
                m.targets.join(",")
            );
            if !report.failed_targets.is_empty() {
                line.push_str(&format!(
                    " (not on: {})",
                    report
                        .failed_targets
                        .iter()
                        .map(|f| format!("{}: {}", f.target, f.error))
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            println!("{line}");
        }
        Ok(SlotOutcome::AlreadyCommitted(p)) => println!(
            "{source}/{database} {id} already committed (on {}); nothing to do. Use --force for a new snapshot now",
            p.holding.join(",")
        ),
        Ok(SlotOutcome::LockedElsewhere) => println!(
            "{source}/{database} {id} FAILED: another pgferry (a daemon replica or a manual run) is backing it up right now; try again when it is done"
        ),
        Err(e) => println!("{source}/{database} {id} FAILED: {e}"),
    }
}

pub(crate) async fn list_cmd(app: &App, args: ListArgs) -> Result<(), CliError> {
    if let Some(t) = &args.target {
        if app.target(t).is_none() {
            return Err(CliError::Usage(format!(
                "no target named {t:?}; configured: {}",
                names(app.targets.iter().map(|t| t.name.as_str()))
            )));
        }
    }
    let filter = Filter {
        source: args.source.clone(),
        databases: args.database.clone(),
        target: args.target.clone(),
    };
    let catalog = catalog::load(&app.targets, &filter).await;
    for w in &catalog.warnings {
        eprintln!("warning: {w}");
    }
    for (t, e) in &catalog.unreachable {
        eprintln!("warning: target {t} could not be listed: {e}");
    }
    for o in &catalog.orphans {
        eprintln!(
            "warning: target {}: {} has no manifest (an upload in progress, or left by a crash or a deleted manifest); it cannot be restored",
            o.target, o.key
        );
    }
    for u in catalog.uploads.iter().filter(|u| !u.committed) {
        eprintln!(
            "warning: target {}: {} marks an unfinished upload (in progress, or left by a crash; prune aborts it after pipeline.orphan_grace)",
            u.target, u.key
        );
    }
    if args.json {
        let out = serde_json::json!({
            "result": if !catalog.unreachable.is_empty() && catalog.snapshots.is_empty() { "failure" } else { "success" },
            "snapshots": catalog.snapshots,
            "warnings": catalog.warnings,
            "unreachable_targets": catalog.unreachable.iter().map(|(t, e)| serde_json::json!({"target": t, "error": e})).collect::<Vec<_>>(),
        });
        output::json_line(&out);
    } else {
        println!(
            "{:<18} {:<12} {:<24} {:>10} {:>10} {:>8}  {:<20} VERIFIED",
            "SNAPSHOT", "SOURCE", "DATABASE", "STORED", "RAW", "AGE", "TARGETS"
        );
        let now = chrono::Utc::now();
        for s in &catalog.snapshots {
            let m = &s.manifest;
            let verified = match &s.verify {
                Some(v) => format!("{} {}", v.result, v.finished_at.format("%Y-%m-%d %H:%M")),
                None => "-".into(),
            };
            println!(
                "{:<18} {:<12} {:<24} {:>10} {:>10} {:>8}  {:<20} {}",
                m.snapshot_id,
                m.source,
                m.database,
                human_bytes(m.stored_size),
                human_bytes(m.raw_size),
                human_age(now - m.finished_at),
                s.targets.join(","),
                verified
            );
        }
        if catalog.snapshots.is_empty() {
            eprintln!("no committed snapshot found");
        }
    }
    if !catalog.unreachable.is_empty() && catalog.snapshots.is_empty() {
        return Err(CliError::Failed("no target could be listed".into()));
    }
    Ok(())
}

pub(crate) async fn prune_cmd(app: &App, args: PruneArgs) -> Result<(), CliError> {
    if let Some(name) = &args.source {
        if app.config.source(name).is_none() {
            return Err(CliError::Usage(format!(
                "no source named {name:?} in {}; configured: {}",
                app.config.path.display(),
                names(app.config.sources.iter().map(|s| s.name.as_str()))
            )));
        }
    }
    let selection = crate::retention::prune::Selection {
        source: args.source.clone(),
        database: args.database.clone(),
    };
    // A standalone prune knows no backup outcome: the manifests are the truth, and the
    // planner never deletes the newest of them.
    let report = crate::retention::prune::prune(
        app,
        &selection,
        &|_, _| None,
        chrono::Utc::now(),
        app.config.pipeline.orphan_grace,
        args.dry_run,
    )
    .await;
    if args.json {
        output::json_line(&serde_json::json!({
            "result": if report.errors.is_empty() { "success" } else { "failure" },
            "dry_run": args.dry_run,
            "deleted_snapshots": report.deleted_snapshots,
            "deleted_orphans": report.deleted_orphans,
            "aborted_uploads": report.aborted_uploads,
            "errors": report.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        }));
    } else {
        print!("{}", crate::retention::prune::render(&report, args.dry_run));
    }
    if !args.dry_run && !args.json {
        println!(
            "deleted {} snapshot(s) and {} orphan dump(s), aborted {} unfinished upload(s)",
            report.deleted_snapshots, report.deleted_orphans, report.aborted_uploads
        );
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if report.errors.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "prune incomplete: {} error(s); see above",
            report.errors.len()
        )))
    }
}
