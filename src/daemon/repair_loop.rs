//! The daemon's check-and-repair loop: at each slot of `[repair] schedule`, and at the next
//! [`PROBE_INTERVAL`] tick after a target that could not be listed answers again, it runs
//! `check` (listings only) and `repair` over every configured source, and sets
//! `pgferry_target_missing_snapshots`. A run in progress at shutdown is cancelled: its upload
//! is aborted, and no manifest is written for a partial copy.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::check::{self, CheckOptions, DEFAULT_READ_JOBS};
use crate::repair::{self, RepairOptions};

/// How often the targets are probed (one LIST of the prefix each) to notice one coming back:
/// the daemon's other bucket refresh runs this often too.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(300);

/// Runs until `stop` is cancelled.
pub async fn run(app: App, stop: CancellationToken) {
    let schedule = app.config.repair.schedule.clone();
    let mut down: HashSet<String> = HashSet::new();
    loop {
        let now = Utc::now();
        let slot_wait = schedule
            .next_after(now)
            .and_then(|next| (next - now).to_std().ok())
            .unwrap_or(PROBE_INTERVAL);
        let (wait, scheduled) = if slot_wait <= PROBE_INTERVAL {
            (slot_wait, true)
        } else {
            (PROBE_INTERVAL, false)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let now_down = probe(&app).await;
        let back: Vec<&String> = down.difference(&now_down).collect();
        let comeback = !back.is_empty();
        if comeback {
            tracing::info!(message = "A target answers again: checking and repairing.", targets = ?back);
        }
        down = now_down;
        if scheduled || comeback {
            run_once(&app, stop.child_token()).await;
        }
    }
}

/// The targets whose listing fails now.
async fn probe(app: &App) -> HashSet<String> {
    use futures::StreamExt;
    let probes = app.targets.iter().map(|t| async move {
        let prefix = t.folder(None, None);
        let mut listing = t.store.list(Some(&prefix));
        match listing.next().await {
            Some(Err(_)) => Some(t.name.clone()),
            _ => None,
        }
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// One listing-level check and repair of everything; sets the missing-snapshots gauge.
pub async fn run_once(app: &App, cancel: CancellationToken) {
    let report = check::check(
        app,
        &CheckOptions {
            jobs: DEFAULT_READ_JOBS,
            ..CheckOptions::default()
        },
    )
    .await;
    let missing = report.missing_per_target(&app.targets);
    let done = repair::repair(
        app,
        &report,
        &RepairOptions::default(),
        Arc::new(AtomicU64::new(0)),
        cancel,
    )
    .await;
    // What is still missing after the repair: the check's count minus the copies made.
    for (target, n) in missing {
        let fixed = done
            .copies
            .iter()
            .filter(|c| {
                c.target == target
                    && matches!(
                        c.result,
                        repair::CopyResult::Copied | repair::CopyResult::LeftAlone(_)
                    )
            })
            .count();
        app.metrics
            .target_missing_snapshots
            .with_label_values(&[&target])
            .set(n.saturating_sub(fixed) as i64);
    }
    tracing::info!(
        message = "Check and repair finished.",
        problems = report.problems.len(),
        copied = done.copies.len() - done.failed(),
        failed = done.failed(),
        unreachable = report.unreachable.len()
    );
}
