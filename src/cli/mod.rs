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
mod output;
mod repair_verbs;
mod restore_verbs;

use crate::app::App;
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

/// How often a long backup or restore prints its progress on a terminal.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// How often it logs its progress off a terminal (a Job's log): often enough that a stalled
/// multi-hour restore shows within a minute, rarely enough not to flood the log.
pub(crate) const LOG_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

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
    #[command(
        after_help = "Examples:\n  pgferry backup                                  every database of every source\n  pgferry backup --source prod --database acme    one database\n  pgferry backup --database acme --database globex\n\nA source that cannot be reached does not stop the others; the run then exits 1 naming it.\nAn unknown --database is an error (exit 2) before anything is dumped."
    )]
    Backup(BackupArgs),
    /// Committed snapshots, newest data first.
    #[command(
        after_help = "Examples:\n  pgferry list\n  pgferry list --source prod --database acme\n  pgferry list --target ovh --json\n\nDATA READ is when pg_dump took the snapshot: what --at and \"latest\" go by."
    )]
    List(ListArgs),
    /// Scheduler + HTTP server (/metrics, /healthz, /readyz, /api/v1/...); runs until SIGTERM.
    #[command(
        after_help = "Example:\n  pgferry daemon --config /etc/pgferry/pgferry.toml --log-format json"
    )]
    Daemon,
    /// Apply retention on every target and print the plan.
    #[command(
        after_help = "Examples:\n  pgferry prune --dry-run                         print the plan, delete nothing\n  pgferry prune --source prod --database acme\n\nOnly objects pgferry wrote, in the configured sources' folders, are ever deleted."
    )]
    Prune(PruneArgs),
    /// Load a snapshot into a configured staging target, verified, hooks applied, swapped in.
    #[command(
        after_help = "Examples:\n  pgferry restore --source prod --database acme --to staging-acme\n  pgferry restore --source prod --database acme --to staging-acme --at \"2026-11-27 09:00\"\n  pgferry restore --source prod --database acme --to sandbox-x --snapshot 20261127T090000Z --as acme_copy --jobs 4\n\n--at picks the newest snapshot whose data was read at or before the time (UTC unless an offset is given)."
    )]
    Restore(RestoreArgs),
    /// Restore the latest snapshot(s) into a scratch database and prove them complete.
    #[command(
        after_help = "Databases go oldest verification first, [verify] concurrency at a time; once [verify] window has passed, no other is started: those are listed as skipped and go first next time. Exit 0 when every database verified passed (skipped ones do not count), 1 when one failed.\n\nExamples:\n  pgferry verify\n  pgferry verify --source prod --database acme --json\n  pgferry verify --pushgateway http://pushgateway:9091"
    )]
    Verify(VerifyArgs),
    /// Prove every copy of every snapshot is there (and with --read-data, intact).
    #[command(
        after_help = "Examples:\n  pgferry check\n  pgferry check --read-data --database acme\n  pgferry check --json"
    )]
    Check(repair_verbs::CheckArgs),
    /// Copy snapshots a target lacks or holds damaged from a target with a good copy.
    #[command(
        after_help = "Examples:\n  pgferry repair --dry-run\n  pgferry repair --to scaleway --database acme\n  pgferry repair --json"
    )]
    Repair(repair_verbs::RepairArgs),
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the shell completion script.
    #[command(
        after_help = "Example:\n  pgferry completions bash > /etc/bash_completion.d/pgferry"
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(after_help = "Example:\n  pgferry man | man -l -")]
    Man,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub scope: repair_verbs::Scope,
    /// Push the verify metrics to this Prometheus Pushgateway (e.g. http://pushgateway:9091).
    #[arg(long)]
    pub pushgateway: Option<String>,
    /// Print one JSON object (result and the reports) as the last line of stdout.
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
    /// Print one JSON object (result and one entry per database) as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only snapshots of this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only snapshots of these databases (repeatable).
    #[arg(long)]
    pub database: Vec<String>,
    /// Only snapshots on this target.
    #[arg(long)]
    pub target: Option<String>,
    /// Print one JSON object (result, snapshots, warnings) as the last line of stdout.
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
    /// Print one JSON object (result, counts, errors) as the last line of stdout.
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
    /// Print one JSON object (result and the restore report) as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and print it with every secret redacted, and where each target's
    /// credentials come from.
    #[command(after_help = "Example:\n  pgferry config check --config ./pgferry.toml")]
    Check {
        /// Print one JSON object (result, targets and their credential source) as the last
        /// line of stdout instead of the TOML.
        #[arg(long)]
        json: bool,
    },
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

/// Runs a parsed command to completion. With `--json`, a failure's last line of stdout is
/// its JSON object too (see [`output`]).
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let json = cli.command.json();
    let r = run_command(cli).await;
    if let (true, Err(e)) = (json, &r) {
        output::error_line(e);
    }
    r
}

impl Command {
    /// Whether `--json` was given to this verb.
    fn json(&self) -> bool {
        match self {
            Command::Backup(a) => a.json,
            Command::List(a) => a.json,
            Command::Prune(a) => a.json,
            Command::Restore(a) => a.json,
            Command::Verify(a) => a.json,
            Command::Config(ConfigCommand::Check { json }) => *json,
            Command::Check(a) => a.json,
            Command::Repair(a) => a.json,
            Command::Daemon | Command::Completions { .. } | Command::Man => false,
        }
    }
}

async fn run_command(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Completions { shell } => {
            output::completions(shell);
            return Ok(());
        }
        Command::Man => return output::man(),
        _ => {}
    }
    let config = Config::load(&cli.config)?;
    if !matches!(cli.command, Command::Config(ConfigCommand::Check { .. })) {
        for w in &config.warnings {
            tracing::warn!(message = "Suspicious configuration.", warning = %w);
        }
    }
    match cli.command {
        Command::Completions { .. } | Command::Man => Ok(()),
        Command::Config(ConfigCommand::Check { json }) => config_check(config, json),
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

/// `config check`: builds the targets (what can be checked offline: credentials' shape,
/// directories), then prints the redacted config and each target's credential source.
fn config_check(config: Config, json: bool) -> Result<(), CliError> {
    App::new(config.clone()).map_err(|e| CliError::Usage(e.to_string()))?;
    let env = |k: &str| std::env::var(k).ok();
    let creds: Vec<(String, String)> = config
        .targets
        .iter()
        .map(|t| {
            let source = crate::storage::target::credential_source(t, env);
            (t.name.clone(), source.to_string())
        })
        .collect();
    if json {
        output::json_line(&serde_json::json!({
            "result": "success",
            "config": config.path.display().to_string(),
            "warnings": config.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "targets": creds.iter().map(|(name, c)| serde_json::json!({"name": name, "credentials": c})).collect::<Vec<_>>(),
        }));
    } else {
        print!("{}", config.redacted_toml());
        println!();
        for (name, c) in &creds {
            println!("# target {name}: credentials from {c}");
        }
        for w in &config.warnings {
            eprintln!("warning: {w}");
        }
        match config.warnings.len() {
            0 => eprintln!("config OK: {}", config.path.display()),
            n => eprintln!(
                "config OK: {} ({n} warning(s) above)",
                config.path.display()
            ),
        }
    }
    Ok(())
}

/// Reports a long run's progress while it goes on: `label: line(seconds elapsed)` on stderr
/// every [`PROGRESS_INTERVAL`] on a terminal, else an INFO log line every
/// [`LOG_PROGRESS_INTERVAL`] (a Job's log then shows a multi-hour restore moving). Cancel
/// the returned token to stop it.
pub(crate) fn spawn_ticker(
    label: String,
    line: impl Fn(f64) -> String + Send + 'static,
) -> CancellationToken {
    let token = CancellationToken::new();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let period = if terminal {
        PROGRESS_INTERVAL
    } else {
        LOG_PROGRESS_INTERVAL
    };
    let stop = token.clone();
    tokio::spawn(async move {
        let start = std::time::Instant::now();
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let elapsed = start.elapsed().as_secs_f64().max(0.001);
                    let progress = line(elapsed);
                    if terminal {
                        eprintln!("{label}: {progress}");
                    } else {
                        tracing::info!(message = "Progress.", task = %label, progress = %progress, elapsed_seconds = elapsed.round() as u64);
                    }
                }
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

    #[test]
    fn every_verb_has_examples() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let mut verbs: Vec<clap::Command> = Vec::new();
        for c in cli.get_subcommands_mut() {
            verbs.extend(c.get_subcommands().cloned());
            if c.get_subcommands().next().is_none() {
                verbs.push(c.clone());
            }
        }
        for mut v in verbs {
            let help = v.render_long_help().to_string();
            assert!(help.contains("Example"), "{} --help: {help}", v.get_name());
        }
    }
}
