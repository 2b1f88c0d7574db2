//! The command line: verbs, flags, and what each verb prints.
//!
//! Parsing is clap's; each verb loads the config, builds an [`App`] and calls into the
//! library. Errors come back as [`CliError`], whose kind decides the exit code (2 for usage
//! and configuration, 1 for a failed operation). Nothing here knows how a backup works.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

mod backup_verbs;
mod repair_verbs;
mod restore_verbs;

use crate::app::App;
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

/// How often a long backup or restore prints its progress on a terminal.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

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
    /// Scheduler + HTTP server (/metrics, /healthz, /readyz, /api/v1/...); runs until SIGTERM.
    Daemon,
    /// Apply retention on every target and print the plan.
    Prune(PruneArgs),
    /// Load a snapshot into a configured staging target, verified, hooks applied, swapped in.
    Restore(RestoreArgs),
    /// Restore the latest snapshot(s) into a scratch database and prove them complete.
    Verify(VerifyArgs),
    /// Prove every copy of every snapshot is there (and with --read-data, intact).
    Check(repair_verbs::CheckArgs),
    /// Copy snapshots a target lacks or holds damaged from a target with a good copy.
    Repair(repair_verbs::RepairArgs),
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
    /// Take a new snapshot now, under the current second's id, even when the current
    /// schedule slot is already committed (without it, a committed slot is left alone).
    #[arg(long)]
    pub force: bool,
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
pub struct PruneArgs {
    /// Print the plan, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Only this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only this database.
    #[arg(long)]
    pub database: Option<String>,
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
            backup_verbs::backup_cmd(&app, args).await
        }
        Command::List(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            backup_verbs::list_cmd(&app, args).await
        }
        Command::Restore(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            restore_verbs::restore_cmd(&app, args).await
        }
        Command::Verify(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            restore_verbs::verify_cmd(&app, args).await
        }
        Command::Daemon => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            crate::daemon::run(app)
                .await
                .map_err(|e| CliError::Failed(e.to_string()))
        }
        Command::Check(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            repair_verbs::check_cmd(&app, args).await
        }
        Command::Repair(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            repair_verbs::repair_cmd(&app, args).await
        }
        Command::Prune(args) => {
            let app = App::new(config).map_err(|e| CliError::Failed(e.to_string()))?;
            backup_verbs::prune_cmd(&app, args).await
        }
    }
}

/// Prints `label: line(seconds elapsed)` to stderr every [`PROGRESS_INTERVAL`] while a long run
/// goes on, on a TTY only. Cancel the returned token to stop it.
pub(crate) fn spawn_ticker(
    label: String,
    line: impl Fn(f64) -> String + Send + 'static,
) -> CancellationToken {
    let token = CancellationToken::new();
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return token;
    }
    let stop = token.clone();
    tokio::spawn(async move {
        let start = std::time::Instant::now();
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => eprintln!("{label}: {}", line(start.elapsed().as_secs_f64().max(0.001))),
            }
        }
    });
    token
}

/// A token cancelled on SIGINT or SIGTERM (Ctrl-C, or a Kubernetes Job being deleted), so a
/// run stops without leaving anything half-done behind.
pub(crate) fn cancel_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
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
        eprintln!("interrupted: cancelling; nothing half-done is kept");
        cancel.cancel();
    });
    token
}

pub(crate) fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
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

pub(crate) fn human_age(d: chrono::TimeDelta) -> String {
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
