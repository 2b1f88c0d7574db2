//! What the verbs print for machines, and the shell completions and man page.
//!
//! With `--json`, every verb's last line of stdout is one compact JSON object with at least
//! a `result` field (`success`, `failure`, `cancelled`, or `error` for a usage or config
//! problem), so a runbook or a Job's log collector can read `tail -n1` whatever happened.
//! A verb prints its own report with [`json_line`]; when it fails before it could, [`run`]
//! prints the error object instead (see [`error_line`]). Human text goes to stdout without
//! `--json` and warnings always go to stderr, so they never break the last line.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, CliError};

/// Whether this process already printed its final JSON object (a verb that fails after its
/// report must not get a second one from the error path).
static JSON_PRINTED: AtomicBool = AtomicBool::new(false);

/// Prints `value` as one compact line: the verb's final report.
pub(crate) fn json_line(value: &serde_json::Value) {
    let text = serde_json::to_string(value).expect("JSON values serialize");
    let mut out = std::io::stdout().lock();
    // A closed stdout (`| head`) is not worth a panic; the exit code still tells.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
    JSON_PRINTED.store(true, Ordering::SeqCst);
}

/// Writes the final JSON object of a verb in pieces, on one line: an array streamed element
/// by element (`list` of a fleet), then the other fields. Memory is one element's.
pub(crate) struct JsonArrayLine {
    out: std::io::BufWriter<std::io::Stdout>,
    first: bool,
}

impl JsonArrayLine {
    /// Starts `{"<field>":[`.
    pub(crate) fn start(field: &str) -> JsonArrayLine {
        let mut out = std::io::BufWriter::new(std::io::stdout());
        let _ = write!(out, "{{{}:[", serde_json::Value::from(field));
        JsonArrayLine { out, first: true }
    }

    pub(crate) fn push(&mut self, item: &impl serde::Serialize) {
        if !self.first {
            let _ = self.out.write_all(b",");
        }
        self.first = false;
        let _ = serde_json::to_writer(&mut self.out, item);
    }

    /// Closes the array, adds `rest`'s fields (an object) and ends the line.
    pub(crate) fn finish(mut self, rest: serde_json::Map<String, serde_json::Value>) {
        let _ = self.out.write_all(b"]");
        for (k, v) in rest {
            let _ = write!(self.out, ",{}:{}", serde_json::Value::from(k), v);
        }
        let _ = writeln!(self.out, "}}");
        let _ = self.out.flush();
        JSON_PRINTED.store(true, Ordering::SeqCst);
    }
}

/// The final object of a verb that failed before printing its report.
pub(crate) fn error_line(e: &CliError) {
    if JSON_PRINTED.load(Ordering::SeqCst) {
        return;
    }
    let result = match e {
        CliError::Config(_) | CliError::Usage(_) => "error",
        CliError::Failed(_) => "failure",
    };
    json_line(&serde_json::json!({
        "result": result,
        "error": e.to_string(),
        "exit_code": e.exit_code(),
    }));
}

/// One database's entry in `backup --json`.
pub(crate) fn backup_entry(
    snapshot: &crate::storage::key::SnapshotKey,
    r: &Result<crate::backup::SlotOutcome, crate::backup::BackupError>,
    min_targets: usize,
) -> serde_json::Value {
    use crate::backup::SlotOutcome;
    let mut v = serde_json::json!({
        "source": snapshot.source,
        "database": snapshot.database,
        "snapshot_id": snapshot.id.to_string(),
    });
    let extra = match r {
        Ok(SlotOutcome::Committed(report)) => serde_json::json!({
            "result": "success",
            "raw_bytes": report.manifest.raw_size,
            "stored_bytes": report.manifest.stored_size,
            "duration_seconds": report.duration.as_secs_f64(),
            "targets": report.manifest.targets,
            "files": report.manifest.files_archive().map(|a| serde_json::json!({"file_count": a.file_count, "file_bytes": a.file_bytes, "stored_bytes": a.stored_size, "skipped": a.skipped})),
            "failed_targets": report.failed_targets.iter().map(|f| serde_json::json!({"target": f.target, "error": f.error.to_string()})).collect::<Vec<_>>(),
        }),
        Ok(SlotOutcome::AlreadyCommitted(p)) => serde_json::json!({
            "result": if p.is_degraded(min_targets) { "failure" } else { "success" },
            "already_committed": true,
            "targets": p.holding,
        }),
        Ok(SlotOutcome::LockedElsewhere) => serde_json::json!({
            "result": "failure",
            "error": "another pgferry is backing this database up right now; try again when it is done",
        }),
        Err(e) => serde_json::json!({
            "result": if e.is_cancelled() { "cancelled" } else { "failure" },
            "error": e.to_string(),
        }),
    };
    if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v
}

/// `pgferry completions SHELL`: the completion script on stdout.
pub(crate) fn completions(shell: Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "pgferry", &mut std::io::stdout());
}

/// `pgferry man`: the man page (roff) on stdout, `man -l -` renders it.
pub(crate) fn man() -> Result<(), CliError> {
    clap_mangen::Man::new(Cli::command())
        .render(&mut std::io::stdout())
        .map_err(|e| CliError::Failed(format!("cannot write the man page: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of every verb says what it does in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && !matches!(arg.get_id().as_str(), "help" | "version")
                {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "pgferry", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    #[test]
    fn man_page_and_completions_name_every_verb() {
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        let mut bash = Vec::new();
        clap_complete::generate(Shell::Bash, &mut Cli::command(), "pgferry", &mut bash);
        let bash = String::from_utf8(bash).unwrap();
        for verb in [
            "backup", "list", "restore", "verify", "prune", "daemon", "config",
        ] {
            assert!(man.contains(verb), "man page lacks {verb}");
            assert!(bash.contains(verb), "bash completion lacks {verb}");
        }
    }

    #[test]
    fn a_backup_entry_shows_its_companion_files() {
        use crate::backup::{BackupReport, SlotOutcome};
        use crate::storage::key::{SnapshotId, SnapshotKey};
        use crate::storage::manifest::{Files, FilesArchive, Manifest};
        let key = SnapshotKey::new(
            "prod",
            "acme",
            SnapshotId::parse("20261206T160000Z").unwrap(),
        );
        let entry = |manifest: Manifest| {
            let report = BackupReport {
                manifest,
                failed_targets: Vec::new(),
                duration: std::time::Duration::from_secs(1),
            };
            backup_entry(&key, &Ok(SlotOutcome::Committed(report)), 1)
        };
        let mut m = crate::storage::manifest::tests::sample();
        m.files = Some(Files::Archive(FilesArchive {
            object_key: "x.files.tar.zst".into(),
            stored_size: 300,
            raw_size: 4096,
            sha256: "0".repeat(64),
            file_count: 3,
            file_bytes: 1000,
            skipped: 1,
        }));
        let v = entry(m);
        assert_eq!(v["files"]["file_count"], 3, "{v}");
        assert_eq!(v["files"]["file_bytes"], 1000, "{v}");
        assert_eq!(v["files"]["stored_bytes"], 300, "{v}");
        assert_eq!(v["files"]["skipped"], 1, "{v}");
        // No `files` configured, or `"none"`: null.
        assert!(entry(crate::storage::manifest::tests::sample())["files"].is_null());
    }
}
