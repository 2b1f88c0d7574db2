//! `restore` and `verify`: the verbs that load snapshots into a database.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{cancel_on_signals, human_bytes, spawn_ticker, CliError, RestoreArgs, VerifyArgs};
use crate::app::App;
use crate::notify;
use crate::restore;

pub(crate) async fn restore_cmd(app: &App, args: RestoreArgs) -> Result<(), CliError> {
    let snapshot =
        restore::choose::SnapshotChoice::from_flags(args.snapshot.as_deref(), args.at.as_deref())
            .map_err(CliError::Usage)?;
    let req = restore::RestoreRequest {
        source: args.source,
        database: args.database,
        namespace: args.to,
        snapshot,
        as_database: args.as_database,
        jobs: args.jobs,
        keep_old: args.keep_old,
    };
    let cancel = cancel_on_signals();
    let progress = Arc::new(restore::load::LoadProgress::default());
    let ticker = {
        let progress = progress.clone();
        spawn_ticker(
            format!("{}/{} → {}", req.source, req.database, req.namespace),
            move |secs| {
                let stored = progress.stored_bytes.load(Ordering::Relaxed);
                let raw = progress.raw_bytes.load(Ordering::Relaxed);
                let total = progress.total_stored_bytes.load(Ordering::Relaxed);
                // The size is known from the manifest: say how far along the download is.
                let percent = if total > 0 {
                    format!(" ({:.0}%)", 100.0 * stored as f64 / total as f64)
                } else {
                    String::new()
                };
                format!(
                    "{} read{percent}, {} restored, {}/s",
                    human_bytes(stored),
                    human_bytes(raw),
                    human_bytes((stored as f64 / secs) as u64)
                )
            },
        )
    };
    let started = std::time::Instant::now();
    let r = restore::restore(app, &req, progress, cancel).await;
    ticker.cancel();
    notify_restore(app, &req, &r, started.elapsed()).await;
    match r {
        Ok(report) => {
            if args.json {
                let out = serde_json::json!({"result": "success", "restore": report});
                super::output::json_line(&out);
            } else {
                eprintln!("{}", report.chosen);
                println!("{}", restore_line(&report));
            }
            Ok(())
        }
        Err(e) => {
            if args.json {
                let out = serde_json::json!({"result": if e.is_cancelled() { "cancelled" } else { "failure" }, "error": e.to_string()});
                super::output::json_line(&out);
            }
            if e.is_usage() {
                Err(CliError::Usage(e.to_string()))
            } else {
                Err(CliError::Failed(e.to_string()))
            }
        }
    }
}

/// One line: snapshot, target used, sizes, duration, tables; and the copies that failed.
fn restore_line(r: &restore::RestoreReport) -> String {
    let mut line = format!(
        "{}/{} {} restored into {} ({}) from target {}: stored {} raw {} tables {} in {:.1}s",
        r.source,
        r.database,
        r.snapshot_id,
        r.destination,
        r.namespace,
        r.target,
        human_bytes(r.stored_bytes),
        human_bytes(r.raw_bytes),
        r.tables,
        r.duration.as_secs_f64()
    );
    if let Some(k) = &r.kept_old {
        line.push_str(&format!("; previous database kept as {k}"));
    }
    match &r.files {
        Some(restore::files::FilesReport::Restored {
            directory,
            file_count,
            file_bytes,
            kept_old,
            ..
        }) => {
            line.push_str(&format!(
                "; companion files: {file_count} ({}) into {}",
                human_bytes(*file_bytes),
                directory.display()
            ));
            if let Some(k) = kept_old {
                line.push_str(&format!(", previous files kept as {}", k.display()));
            }
        }
        Some(restore::files::FilesReport::Skipped { warning }) => {
            line.push_str(&format!("\nwarning: {warning}"));
        }
        None => {}
    }
    if !r.failed_targets.is_empty() {
        line.push_str(&format!(
            " (failed first: {})",
            r.failed_targets
                .iter()
                .map(|f| format!("{}: {}", f.target, f.error))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    line
}

/// The webhook report of one finished restore.
async fn notify_restore(
    app: &App,
    req: &restore::RestoreRequest,
    r: &Result<restore::RestoreReport, restore::RestoreError>,
    elapsed: std::time::Duration,
) {
    let result = match r {
        Ok(_) => "success",
        Err(e) if e.is_cancelled() => "cancelled",
        Err(_) => "failure",
    };
    let mut n =
        notify::RunReport::new(notify::RunKind::Restore, &req.source, &req.database, result);
    n.duration_seconds = elapsed.as_secs_f64();
    match r {
        Ok(rep) => {
            n.snapshot_id = Some(rep.snapshot_id.clone());
            n.raw_bytes = Some(rep.raw_bytes);
            n.stored_bytes = Some(rep.stored_bytes);
        }
        Err(e) => n.error = Some(e.to_string()),
    }
    app.notifier.report(&n).await;
}

pub(crate) async fn verify_cmd(app: &App, args: VerifyArgs) -> Result<(), CliError> {
    let req = crate::verify::VerifyRequest {
        source: args.scope.source.clone(),
        databases: args.scope.database.clone(),
    };
    let cancel = cancel_on_signals();
    let run = crate::verify::verify_all(app, &req, cancel)
        .await
        .map_err(|e| match &e {
            crate::verify::VerifyError::Guard(g) if !g.is_usage() => {
                CliError::Failed(e.to_string())
            }
            _ => CliError::Usage(e.to_string()),
        })?;
    let results = &run.results;
    if results.is_empty() && run.skipped.is_empty() {
        return Err(CliError::Failed(
            "no committed snapshot to verify; run `pgferry list`".into(),
        ));
    }
    crate::verify::notify_reports(app, results).await;
    let mut failed = 0;
    let mut reports = Vec::new();
    for (source, database, r) in results {
        match r {
            Ok(rep) => {
                if !rep.passed() {
                    failed += 1;
                }
                if !args.json {
                    let from = rep.restored_from.as_deref().unwrap_or("-");
                    let mut line = format!(
                        "{source}/{database} {} {}: {} tables, {} checks, restored from {from} in {:.1}s",
                        rep.snapshot_id,
                        if rep.passed() { "verified" } else { "FAILED" },
                        rep.tables.len(),
                        rep.checks.len(),
                        rep.total_seconds
                    );
                    if !rep.failed_targets.is_empty() {
                        line.push_str(&format!(
                            " (bad copies: {})",
                            rep.failed_targets
                                .iter()
                                .map(|f| format!("{}: {}", f.target, f.error))
                                .collect::<Vec<_>>()
                                .join("; ")
                        ));
                    }
                    if !rep.cleaned_leftovers.is_empty() {
                        line.push_str(&format!(
                            "\n  dropped the scratch database(s) of an interrupted verify: {}",
                            rep.cleaned_leftovers.join(", ")
                        ));
                    }
                    for p in &rep.problems {
                        line.push_str(&format!("\n  - {p}"));
                    }
                    println!("{line}");
                }
                reports.push(serde_json::to_value(rep).expect("reports serialize"));
            }
            Err(e) => {
                failed += 1;
                if !args.json {
                    println!("{source}/{database} FAILED: {e}");
                }
                reports.push(serde_json::json!({"source": source, "database": database, "result": "error", "error": e.to_string()}));
            }
        }
    }
    // Databases the window left for the next run: reported, never a failure of this one.
    if !args.json {
        for s in &run.skipped {
            println!(
                "{}/{} {} skipped: the verify window ran out before its turn (last verified {}); it goes first next time",
                s.source,
                s.database,
                s.snapshot_id,
                s.last_verified
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_else(|| "never".into())
            );
        }
        for (source, n) in run.overdue.iter().filter(|(_, n)| **n > 0) {
            println!(
                "{source}: {n} database(s) overdue (no verify report within verify.max_age = {})",
                humantime::format_duration(app.config.verify.max_age)
            );
        }
    }
    if args.json {
        super::output::json_line(&serde_json::json!({
            "result": if failed == 0 { "success" } else { "failure" },
            "reports": reports,
            "skipped": run.skipped,
            "overdue": run.overdue,
        }));
    }
    if let Some(gateway) = &args.pushgateway {
        let databases: Vec<(String, String)> = results
            .iter()
            .map(|(s, d, _)| (s.clone(), d.clone()))
            .collect();
        crate::verify::push_metrics(app, gateway, &databases, &run.overdue)
            .await
            .map_err(CliError::Failed)?;
    }
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} of {} database(s) failed verification; see above",
            results.len()
        )));
    }
    Ok(())
}
