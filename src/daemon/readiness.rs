//! Dependency health and readiness.
//!
//! Readiness means "this process can do its work": the config is loaded (it is, or the daemon
//! would not have started), the scheduler's loops are alive and not shutting down, and the
//! HTTP server answers (it does, if `/readyz` is being served). It deliberately does not
//! depend on the sources and targets: one provider's blip must not make every replica
//! unready (and block node drains through the PodDisruptionBudget).
//!
//! Whether each source server and target answers is still checked, by a background loop
//! (a connect plus `SELECT 1` per source, a small listing per target, each under a timeout),
//! and exported as `pgferry_source_up` / `pgferry_target_up` for alerts, on `/readyz` as
//! information and on the status page; a probe never waits on a slow server. Like every
//! background loop here, it does its work, idles until due, and exposes its last error and
//! consecutive failures. It never writes anything.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::source;

/// How often the checks run: Kubernetes probes every 10 s by default, so a change shows on the
/// next probe or the one after.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How long one check may take before its server counts as unreachable: well under the
/// interval, and longer than a healthy S3 round trip across providers.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(4);

/// Health of one source or target.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Health {
    pub name: String,
    pub ok: bool,
    /// Why not, without secrets (URLs are redacted by the source module).
    pub error: Option<String>,
}

/// The cached result of the last round of dependency checks.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Readiness {
    /// Every source and target answered in the last round (not the same as ready: see the
    /// module doc; `/readyz` decides from the scheduler).
    pub all_up: bool,
    /// What is unreachable, without secrets.
    pub reasons: Vec<String>,
    pub sources: Vec<Health>,
    pub targets: Vec<Health>,
    pub checked_at: Option<DateTime<Utc>>,
    /// Rounds in a row that found something unreachable.
    pub consecutive_failures: u32,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ReadinessCache(Arc<RwLock<Readiness>>);

impl ReadinessCache {
    pub fn get(&self) -> Readiness {
        let r = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        if r.checked_at.is_none() {
            return Readiness {
                reasons: vec!["the first dependency check has not finished".into()],
                ..r
            };
        }
        r
    }

    fn set(&self, r: Readiness) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = r;
    }
}

/// One round of checks.
pub async fn check(app: &App) -> Readiness {
    let sources = futures::future::join_all(app.config.sources.iter().map(|s| async move {
        let r = tokio::time::timeout(CHECK_TIMEOUT, async {
            let client = source::connect(&s.url, None)
                .await
                .map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| format!("SELECT 1 on {} failed: {e}", s.url.redacted()))
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")));
        health(&s.name, r)
    }));
    let targets = futures::future::join_all(app.targets.iter().map(|t| async move {
        let folder = t.folder(None, None);
        let r = tokio::time::timeout(CHECK_TIMEOUT, t.store.list_with_delimiter(Some(&folder)))
            .await
            .map_err(|_| format!("no answer within {CHECK_TIMEOUT:?}"))
            .and_then(|r| {
                r.map(|_| ())
                    .map_err(|e| crate::storage::target::error_text(&e))
            });
        health(&t.name, r)
    }));
    let (sources, targets) = tokio::join!(sources, targets);
    let mut reasons = Vec::new();
    for h in &sources {
        if let Some(e) = &h.error {
            reasons.push(format!("source {} unreachable: {e}", h.name));
        }
    }
    for h in &targets {
        if let Some(e) = &h.error {
            reasons.push(format!("target {} unreachable: {e}", h.name));
        }
    }
    Readiness {
        all_up: reasons.is_empty(),
        reasons,
        sources,
        targets,
        checked_at: Some(Utc::now()),
        consecutive_failures: 0,
    }
}

fn health(name: &str, r: Result<(), String>) -> Health {
    Health {
        name: name.to_string(),
        ok: r.is_ok(),
        error: r.err(),
    }
}

/// Sets `pgferry_source_up` and `pgferry_target_up` from one round of checks.
fn export(app: &App, r: &Readiness) {
    for h in &r.sources {
        app.metrics
            .source_up
            .with_label_values(&[&h.name])
            .set(i64::from(h.ok));
    }
    for h in &r.targets {
        app.metrics
            .target_up
            .with_label_values(&[&h.name])
            .set(i64::from(h.ok));
    }
}

/// Checks every [`CHECK_INTERVAL`] until `stop`.
pub async fn run(app: App, cache: ReadinessCache, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let mut r = tokio::select! {
            r = check(&app) => r,
            _ = stop.cancelled() => return,
        };
        export(&app, &r);
        if r.all_up {
            if failures > 0 {
                tracing::info!(message = "Every source and target is reachable again.");
            }
            failures = 0;
        } else {
            failures += 1;
            if failures == 1 {
                tracing::warn!(message = "A source or target is unreachable.", error = %r.reasons.join("; "));
            }
        }
        r.consecutive_failures = failures;
        cache.set(r);
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}
