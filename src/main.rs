//! The `pgferry` binary: parse the command line, set up logging, run, map errors to exit
//! codes (0 success, 1 the operation failed, 2 usage or configuration error).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use pgferry::cli::{self, Cli, LogFormat};

/// Everything pgferry writes locally (file-target objects, the `--jobs` spool: production data)
/// is private to its user: files 0600, directories 0700.
const PRIVATE_UMASK: libc::mode_t = 0o077;

fn main() -> ExitCode {
    // SAFETY: umask(2) only sets the process's file-creation mask; no thread exists yet.
    unsafe { libc::umask(PRIVATE_UMASK) };
    let cli = Cli::parse();
    let json = match cli.log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in files, pipes and Kubernetes logs they
    // are noise that breaks grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_target(false)
            .init();
    } else {
        builder.with_target(false).init();
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
