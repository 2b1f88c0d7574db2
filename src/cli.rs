//! The command line: verbs, flags, and what each verb prints.
//!
//! Parsing is clap's; each verb loads the config, builds an [`App`] and calls into the
//! library. Errors come back as [`CliError`], whose kind decides the exit code (2 for usage
//! and configuration, 1 for a failed operation). Nothing here knows how a backup works.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::backup::{self, BackupReport};
use crate::catalog::{self, Filter};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::pipeline::Progress;
use crate::restore;
use crate::source;

/// How often a long backup or restore prints its progress on a terminal.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Parser)]
#[command(
    name = "pgferry",
    version,
    about = "PostgreSQL backup and restore for Kubernetes"
)]
pub struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "PGFERRY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format; default: text on a terminal, json otherwise.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One backup run now; exit 0 only if every database committed.
    Backup(BackupArgs),
    /// Committed snapshots, newest first.
    List(ListArgs),
    /// Load a snapshot into a configured staging target, verified, hooks applied, swapped in.
    Restore(RestoreArgs),
    /// Restore the latest snapshot(s) into a scratch database and prove them complete.
    Verify(VerifyArgs),
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only these databases (repeatable).
    #[arg(long)]
    pub database: Vec<String>,
    /// Push the verify metrics to this Prometheus Pushgateway (e.g. http://pushgateway:9091).
    #[arg(long)]
    pub pushgateway: Option<String>,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Only this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only these databases (repeatable); they must exist on the selected sources.
    #[arg(long)]
    pub database: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    pub source: Option<String>,
    #[arg(long)]
    pub database: Vec<String>,
    /// Only snapshots on this target.
    #[arg(long)]
    pub target: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The source the snapshot was taken from.
    #[arg(long)]
    pub source: String,
    /// The database the snapshot is of.
    #[arg(long)]
    pub database: String,
    /// The namespace to restore into; must match a [[restore_target]].
    #[arg(long = "to")]
    pub to: String,
    /// `latest` or a snapshot id (see `pgferry list`).
    #[arg(long, conflicts_with = "at")]
    pub snapshot: Option<String>,
    /// The newest snapshot at or before this time: RFC 3339, or UTC "2026-11-27 09:00".
    #[arg(long)]
    pub at: Option<String>,
    /// Name of the restored database; default: the source database's name.
    #[arg(long = "as")]
    pub as_database: Option<String>,
    /// Parallel pg_restore jobs; above 1 the archive is spooled to [restore] spool_dir first.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
    /// Keep the replaced database under a dated name instead of dropping it.
    #[arg(long)]
    pub keep_old: bool,
    /// Print a JSON summary instead of the summary line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and print it with every secret redacted.
    Check,
}

/// How a verb failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

/// Runs a parsed command to completion.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Config(ConfigCommand::Check) => {
            // Building the targets checks what can be checked offline (credentials shape, dirs).
            App::new(config.clone()).map_err(|e| CliError::Usage(e.to_string()))?;
            print!("{}", config.redacted_toml());
            eprintln!("config OK: {}", config.path.display());
            Ok(())
        }
        Command::Backup(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            backup_cmd(&app, args).await
        }
        Command::List(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            list_cmd(&app, args).await
        }
        Command::Restore(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            restore_cmd(&app, args).await
        }
        Command::Verify(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            verify_cmd(&app, args).await
        }
    }
}

async fn verify_cmd(app: &App, args: VerifyArgs) -> Result<(), CliError> {
    let req = crate::verify::VerifyRequest {
        source: args.source.clone(),
        databases: args.database.clone(),
    };
    let cancel = cancel_on_ctrl_c();
    let results = crate::verify::verify_all(app, &req, cancel)
        .await
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if results.is_empty() {
        return Err(CliError::Failed(
            "no committed snapshot to verify; run `pgferry list`".into(),
        ));
    }
    let mut failed = 0;
    let mut reports = Vec::new();
    for (source, database, r) in &results {
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
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).expect("JSON values serialize")
        );
    }
    if let Some(gateway) = &args.pushgateway {
        crate::verify::push_metrics(app, gateway)
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

/// A token cancelled on Ctrl-C / SIGTERM, so a run stops without leaving anything behind.
fn cancel_on_ctrl_c() -> CancellationToken {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        eprintln!("interrupted: cancelling; nothing half-done is kept");
        c.cancel();
    });
    cancel
}

async fn restore_cmd(app: &App, args: RestoreArgs) -> Result<(), CliError> {
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
    let cancel = CancellationToken::new();
    spawn_signal_cancel(cancel.clone());
    let progress = Arc::new(restore::load::LoadProgress::default());
    let ticker = spawn_restore_progress(
        format!("{}/{} → {}", req.source, req.database, req.namespace),
        progress.clone(),
    );
    let r = restore::restore(app, &req, progress, cancel).await;
    ticker.cancel();
    match r {
        Ok(report) => {
            if args.json {
                let out = serde_json::json!({"result": "success", "restore": report});
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).expect("JSON values serialize")
                );
            } else {
                println!("{}", restore_line(&report));
            }
            Ok(())
        }
        Err(e) => {
            if args.json {
                let out = serde_json::json!({"result": if e.is_cancelled() { "cancelled" } else { "failure" }, "error": e.to_string()});
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).expect("JSON values serialize")
                );
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

/// Cancels `token` on SIGINT or SIGTERM (a Kubernetes Job being deleted).
fn spawn_signal_cancel(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term => {},
        }
        eprintln!("interrupted: cancelling; the destination stays untouched");
        token.cancel();
    });
}

/// Bytes read and their rate, every few seconds on a TTY.
fn spawn_restore_progress(
    label: String,
    progress: Arc<restore::load::LoadProgress>,
) -> CancellationToken {
    let token = CancellationToken::new();
    if !std::io::stderr().is_terminal() {
        return token;
    }
    let stop = token.clone();
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let stored = progress.stored_bytes.load(Ordering::Relaxed);
                    let raw = progress.raw_bytes.load(Ordering::Relaxed);
                    let rate = stored as f64 / start.elapsed().as_secs_f64().max(0.001);
                    eprintln!("{label}: {} read, {} restored, {}/s", human_bytes(stored), human_bytes(raw), human_bytes(rate as u64));
                }
            }
        }
    });
    token
}

async fn backup_cmd(app: &App, args: BackupArgs) -> Result<(), CliError> {
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
    let snapshot_id = crate::schedule::snapshot_id(chrono::Utc::now());
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: cancelling; nothing half-done will be committed");
                cancel.cancel();
            }
        });
    }
    let total = jobs.len();
    let results: Vec<_> = futures::stream::iter(jobs.into_iter().map(|(source, database)| {
        let cancel = cancel.clone();
        let snapshot_id = snapshot_id.clone();
        async move {
            let progress = Arc::new(Progress::default());
            let ticker = spawn_progress(format!("{}/{}", source.name, database), progress.clone());
            let r = backup::backup_database(app, source, &database, &snapshot_id, progress, cancel)
                .await;
            ticker.cancel();
            print_backup_line(&source.name, &database, &snapshot_id, &r);
            r.is_ok()
        }
    }))
    .buffer_unordered(app.config.daemon.max_concurrent_backups)
    .collect()
    .await;
    let failed = results.iter().filter(|ok| !**ok).count();
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{failed} of {total} database backup(s) failed; see above"
        )));
    }
    Ok(())
}

fn print_backup_line(
    source: &str,
    database: &str,
    snapshot_id: &str,
    r: &Result<BackupReport, backup::BackupError>,
) {
    match r {
        Ok(report) => {
            let m = &report.manifest;
            let mut line = format!(
                "{source}/{database} {snapshot_id} committed: raw {} stored {} ratio {:.2}x in {:.1}s on {}",
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
                        .map(|(t, e)| format!("{t}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            println!("{line}");
        }
        Err(e) => println!("{source}/{database} {snapshot_id} FAILED: {e}"),
    }
}

/// Prints a progress line to stderr every few seconds while a long dump runs, on a TTY only.
fn spawn_progress(label: String, progress: Arc<Progress>) -> CancellationToken {
    let token = CancellationToken::new();
    if !std::io::stderr().is_terminal() {
        return token;
    }
    let stop = token.clone();
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let raw = progress.raw_bytes.load(Ordering::Relaxed);
                    let stored = progress.stored_bytes.load(Ordering::Relaxed);
                    let rate = raw as f64 / start.elapsed().as_secs_f64().max(0.001);
                    eprintln!("{label}: {} dumped, {} stored, {}/s", human_bytes(raw), human_bytes(stored), human_bytes(rate as u64));
                }
            }
        }
    });
    token
}

async fn list_cmd(app: &App, args: ListArgs) -> Result<(), CliError> {
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
    if args.json {
        let out = serde_json::json!({
            "snapshots": catalog.snapshots,
            "warnings": catalog.warnings,
            "unreachable_targets": catalog.unreachable.iter().map(|(t, e)| serde_json::json!({"target": t, "error": e})).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("JSON values serialize")
        );
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

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_age(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_age(chrono::TimeDelta::seconds(7300)), "2h");
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
