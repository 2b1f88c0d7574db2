//! `backup`, `list` and `prune`: the verbs over sources and the snapshot catalog.

use std::collections::BTreeSet;
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
use crate::config::SourceConfig;
use crate::source;
use crate::storage::catalog::{Filter, Read, SnapshotEntry};
use crate::storage::key::{SnapshotId, SnapshotKey};

pub(crate) async fn backup_cmd(app: &App, args: BackupArgs) -> Result<(), CliError> {
    let sources: Vec<_> = match &args.source {
        Some(name) => vec![known_source(app, name)?],
        None => app.config.sources.iter().collect(),
    };
    // Resolve the databases of each source first, so a typo fails before any dump starts. A
    // source that cannot be reached does not stop the others: it fails the run at the end.
    let mut jobs = Vec::new();
    let mut unreachable: Vec<String> = Vec::new();
    let mut found: BTreeSet<&str> = BTreeSet::new();
    let mut refused = Vec::new();
    let mut missing = Vec::new();
    for source in sources {
        let selection = match select_databases(source, &args.database).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "error: source {}: {e}; its databases are not backed up this run",
                    source.name
                );
                unreachable.push(format!("{} ({e})", source.name));
                continue;
            }
        };
        for skipped in &selection.skipped {
            eprintln!(
                "skipped {}/{}: {}",
                source.name, skipped.database, skipped.reason
            );
        }
        for r in &selection.refused {
            refused.push(format!("{}/{}: {}", source.name, r.database, r.reason));
        }
        found.extend(
            args.database
                .iter()
                .filter(|d| !selection.missing.contains(d))
                .map(String::as_str),
        );
        if !selection.missing.is_empty() {
            missing.push(format!(
                "source {} has no database {}; it has: {}",
                source.name,
                selection.missing.join(", "),
                names(selection.available.iter().map(String::as_str))
            ));
        }
        for d in selection.databases {
            jobs.push((source, d));
        }
    }
    if !refused.is_empty() {
        return Err(CliError::Usage(format!(
            "cannot back up {}",
            refused.join("; ")
        )));
    }
    let unknown: Vec<&str> = args
        .database
        .iter()
        .map(String::as_str)
        .filter(|d| !found.contains(d))
        .collect();
    // An explicit name no source has is a typo: nothing is dumped. With --source, it must be on
    // that source. (A source that could not be asked may have it: that fails at the end.)
    if (!unknown.is_empty() && unreachable.is_empty())
        || (args.source.is_some() && !missing.is_empty())
    {
        return Err(CliError::Usage(format!(
            "--database {}: no such database; {}",
            unknown.join(", --database "),
            missing.join("; ")
        )));
    }
    if jobs.is_empty() && unreachable.is_empty() {
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
    let min_targets = app.config.pipeline.min_targets;
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
                print_backup_line(&snapshot, &r, min_targets);
            }
            let ok = match &r {
                Ok(SlotOutcome::Committed(_)) => true,
                Ok(SlotOutcome::AlreadyCommitted(p)) => !p.is_degraded(min_targets),
                _ => false,
            };
            (ok, output::backup_entry(&snapshot, &r, min_targets))
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
    let mut problems = Vec::new();
    if failed > 0 {
        problems.push(format!(
            "{failed} of {total} database backup(s) failed; see above"
        ));
    }
    if !unreachable.is_empty() {
        problems.push(format!(
            "could not reach source(s) {}, so nothing of them was backed up; fix the connection and run `pgferry backup --source NAME` for each",
            unreachable.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(problems.join("; ")))
    }
}

/// The databases of `source` to back up: its globs' selection, or the explicit names.
async fn select_databases(
    source: &SourceConfig,
    explicit: &[String],
) -> Result<source::select::Selection, source::SourceError> {
    let client = source::connect(&source.url, None).await?;
    source::discover(&client, source, explicit).await
}

fn print_backup_line(
    snapshot: &SnapshotKey,
    r: &Result<SlotOutcome, backup::BackupError>,
    min_targets: usize,
) {
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
            if let Some(a) = m.files_archive() {
                line.push_str(&format!(
                    "; files {} ({}, stored {}{})",
                    a.file_count,
                    human_bytes(a.file_bytes),
                    human_bytes(a.stored_size),
                    if a.skipped > 0 {
                        format!(", {} skipped: links or special files", a.skipped)
                    } else {
                        String::new()
                    }
                ));
            }
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
        Ok(SlotOutcome::AlreadyCommitted(p)) if p.is_degraded(min_targets) => println!(
            "{source}/{database} {id} FAILED: committed on {} only, fewer than pipeline.min_targets = {min_targets}; {} could not be reached. Run again once they are back (or `pgferry repair`)",
            p.holding.join(","),
            p.unknown.join(",")
        ),
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
    if let Some(name) = &args.source {
        known_source(app, name)?;
    }
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
    // One database folder at a time (through the folders' indexes): memory stays flat in the
    // fleet's size. Rows are grouped by source and database, each newest data first.
    let plan = app.catalog_plan(&filter).await;
    let mut unreachable: Vec<(String, String)> = plan.unreachable().to_vec();
    for (t, e) in &unreachable {
        eprintln!("warning: target {t} could not be listed: {e}");
    }
    let mut warnings: Vec<String> = Vec::new();
    let mut json = args.json.then(|| output::JsonArrayLine::start("snapshots"));
    if !args.json {
        println!(
            "{:<18} {:<20} {:<12} {:<24} {:>10} {:>10} {:>8}  {:<20} VERIFIED",
            "SNAPSHOT", "DATA READ", "SOURCE", "DATABASE", "STORED", "RAW", "AGE", "TARGETS"
        );
    }
    let now = chrono::Utc::now();
    let mut listed = 0usize;
    let mut pieces = std::pin::pin!(plan.stream(Read::Indexed));
    while let Some(piece) = pieces.next().await {
        for w in &piece.warnings {
            eprintln!("warning: {w}");
        }
        for (t, e) in piece.unreachable {
            if !unreachable.iter().any(|(n, _)| *n == t) {
                eprintln!("warning: target {t} could not be listed: {e}");
                unreachable.push((t, e));
            }
        }
        for o in &piece.orphans {
            eprintln!(
                "warning: target {}: {} has no manifest (an upload in progress, or left by a crash or a deleted manifest); it cannot be restored",
                o.target, o.key
            );
        }
        for u in piece.uploads.iter().filter(|u| !u.committed) {
            eprintln!(
                "warning: target {}: {} marks an unfinished upload (in progress, or left by a crash; prune aborts it after pipeline.orphan_grace)",
                u.target, u.key
            );
        }
        warnings.extend(piece.warnings);
        listed += piece.snapshots.len();
        for s in &piece.snapshots {
            match json.as_mut() {
                Some(json) => json.push(s),
                None => {
                    use std::io::Write;
                    // A closed stdout (`| head`) ends the listing, without a panic.
                    if writeln!(std::io::stdout(), "{}", list_row(s, now)).is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
    let failed = !unreachable.is_empty() && listed == 0;
    if let Some(json) = json {
        let mut rest = serde_json::Map::new();
        rest.insert("warnings".into(), serde_json::json!(warnings));
        rest.insert(
            "unreachable_targets".into(),
            unreachable
                .iter()
                .map(|(t, e)| serde_json::json!({"target": t, "error": e}))
                .collect(),
        );
        rest.insert(
            "result".into(),
            if failed { "failure" } else { "success" }.into(),
        );
        json.finish(rest);
    } else if listed == 0 {
        eprintln!("no committed snapshot found");
    }
    if failed {
        return Err(CliError::Failed("no target could be listed".into()));
    }
    Ok(())
}

/// One line of `pgferry list`.
fn list_row(s: &SnapshotEntry, now: chrono::DateTime<chrono::Utc>) -> String {
    let m = &s.manifest;
    let verified = match &s.verify {
        Some(v) => format!("{} {}", v.result, v.finished_at.format("%Y-%m-%d %H:%M")),
        None => "-".into(),
    };
    format!(
        "{:<18} {:<20} {:<12} {:<24} {:>10} {:>10} {:>8}  {:<20} {}",
        m.snapshot_id,
        m.started_at.format("%Y-%m-%d %H:%M:%SZ"),
        m.source,
        m.database,
        human_bytes(m.stored_size),
        human_bytes(m.raw_size),
        human_age(now - m.started_at),
        s.targets.join(","),
        verified
    )
}

pub(crate) async fn prune_cmd(app: &App, args: PruneArgs) -> Result<(), CliError> {
    if let Some(name) = &args.source {
        known_source(app, name)?;
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

/// The configured source `name`, or the usage error (exit 2) naming the configured ones.
fn known_source<'a>(app: &'a App, name: &str) -> Result<&'a SourceConfig, CliError> {
    app.config.source(name).ok_or_else(|| {
        CliError::Usage(format!(
            "no source named {name:?} in {}; configured: {}",
            app.config.path.display(),
            names(app.config.sources.iter().map(|s| s.name.as_str()))
        ))
    })
}
