//! `pgferry check` and `pgferry repair`: what they print and how they exit.
//!
//! Both exit 1 when something is wrong (a problem found, a copy not repaired, a target
//! unreachable), and every line says what to do. The work is `check` and `repair`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clap::builder::TypedValueParser;
use clap::Args;

use super::CliError;
use crate::app::App;
use crate::check::{self, CheckOptions, CheckReport, DEFAULT_READ_JOBS};
use crate::repair::{Copied, CopyResult, RepairOptions};
use crate::storage::catalog::Filter;

/// The snapshots a verb covers: `--source`, `--database` (every one without them).
#[derive(Debug, Args)]
pub struct Scope {
    /// Only this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only these databases (repeatable).
    #[arg(long)]
    pub database: Vec<String>,
}

impl From<Scope> for Filter {
    fn from(scope: Scope) -> Filter {
        Filter {
            source: scope.source,
            databases: scope.database,
            target: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also read every copy and compare its sha256 with the manifest's (else: listings only).
    #[arg(long)]
    pub read_data: bool,
    /// Copies read at once with --read-data.
    #[arg(long, default_value_t = DEFAULT_READ_JOBS, value_parser = clap::value_parser!(u64).range(1..=64).map(|n| n as usize))]
    pub jobs: usize,
    #[command(flatten)]
    pub scope: Scope,
    /// Print one JSON object (result, counts, problems) as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Print what would be copied, copy nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub scope: Scope,
    /// Copy only from this target.
    #[arg(long)]
    pub from: Option<String>,
    /// Repair only this target.
    #[arg(long)]
    pub to: Option<String>,
    /// Copies read at once to find damaged ones.
    #[arg(long, default_value_t = DEFAULT_READ_JOBS, value_parser = clap::value_parser!(u64).range(1..=64).map(|n| n as usize))]
    pub jobs: usize,
    /// Print one JSON object (result, every copy handled, unreachable targets) as the last
    /// line of stdout instead of one line per copy.
    #[arg(long)]
    pub json: bool,
}

fn known_target(app: &App, name: &Option<String>, flag: &str) -> Result<(), CliError> {
    match name {
        Some(n) if app.target(n).is_none() => Err(CliError::Usage(format!(
            "{flag} {n}: no such target; configured: {}",
            super::names(app.targets.iter().map(|t| t.name.as_str()))
        ))),
        _ => Ok(()),
    }
}

fn print_unclean(report: &CheckReport) {
    for (t, e) in &report.unreachable {
        println!("target {t}: cannot be listed, nothing on it was checked: {e}; check the target's endpoint and credentials, then run `pgferry check` again");
    }
    for w in &report.warnings {
        println!("{w}; delete that manifest or repair it from another target");
    }
}

pub(super) async fn check_cmd(app: &App, args: CheckArgs) -> Result<(), CliError> {
    let opts = CheckOptions {
        filter: args.scope.into(),
        read_data: args.read_data,
        jobs: args.jobs,
    };
    let report = check::check(app, &opts).await;
    if args.json {
        // One compact object on the last line, like every verb's --json.
        let mut v = serde_json::to_value(&report).expect("a report serializes");
        v["result"] = serde_json::json!(if report.is_clean() {
            "success"
        } else {
            "failure"
        });
        super::output::json_line(&v);
    } else {
        for p in &report.problems {
            println!("{p}");
        }
        print_unclean(&report);
        println!(
            "checked {} snapshots, {} copies ({}): {} problems",
            report.snapshots,
            report.copies,
            if args.read_data {
                "read and hashed"
            } else {
                "listings"
            },
            report.problems.len() + report.unreachable.len() + report.warnings.len()
        );
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(CliError::Failed(
            "check found problems (above); each line says what to do".into(),
        ))
    }
}

pub(super) async fn repair_cmd(app: &App, args: RepairArgs) -> Result<(), CliError> {
    known_target(app, &args.from, "--from")?;
    known_target(app, &args.to, "--to")?;
    let opts = CheckOptions {
        filter: args.scope.into(),
        // Reading every copy is what finds a damaged one; the daemon's scheduled repair
        // checks listings only.
        read_data: true,
        jobs: args.jobs,
    };
    let report = check::check(app, &opts).await;
    let copied = Arc::new(AtomicU64::new(0));
    let ticker = {
        let copied = copied.clone();
        super::spawn_ticker("repair".into(), move |secs| {
            let n = copied.load(Ordering::Relaxed);
            format!(
                "{} copied ({}/s)",
                super::human_bytes(n),
                super::human_bytes((n as f64 / secs) as u64)
            )
        })
    };
    let cancel = super::cancel_on_signals();
    let ropts = RepairOptions {
        from: args.from,
        to: args.to,
        dry_run: args.dry_run,
    };
    let done = crate::repair::repair(app, &report, &ropts, copied, cancel.clone()).await;
    ticker.cancel();
    let failed = done.failed();
    if args.json {
        // One compact object on the last line, like every verb's --json.
        let result = match (
            failed > 0 || !report.unreachable.is_empty(),
            cancel.is_cancelled(),
        ) {
            (_, true) => "cancelled",
            (true, false) => "failure",
            (false, false) => "success",
        };
        super::output::json_line(&serde_json::json!({
            "result": result,
            "dry_run": args.dry_run,
            "copies": done.copies,
            "failed": failed,
            "unreachable": report.unreachable.iter().map(|(t, e)| serde_json::json!({"target": t, "error": e})).collect::<Vec<_>>(),
            "warnings": report.warnings,
        }));
    } else {
        print_copies(&done.copies);
        print_unclean(&report);
        println!(
            "repair: {} copies {}, {failed} failed",
            done.copies.len() - failed,
            if args.dry_run { "planned" } else { "handled" }
        );
    }
    if failed > 0 || !report.unreachable.is_empty() {
        return Err(CliError::Failed(format!(
            "{failed} copies could not be repaired (above); run `pgferry repair` again once the cause is fixed"
        )));
    }
    Ok(())
}

fn print_copies(copies: &[Copied]) {
    for c in copies {
        let from = c.from.as_deref().unwrap_or("(none)");
        match &c.result {
            CopyResult::Planned | CopyResult::Copied => {
                let done = if matches!(c.result, CopyResult::Planned) {
                    "would copy"
                } else {
                    "copied"
                };
                let size = super::human_bytes(c.bytes);
                println!("{done} {} to {} from {from} ({size})", c.snapshot, c.target)
            }
            CopyResult::LeftAlone(why) => {
                println!("left {} on {} alone: {why}", c.snapshot, c.target)
            }
            CopyResult::Failed(e) => println!("failed {} to {}: {e}", c.snapshot, c.target),
        }
    }
}
