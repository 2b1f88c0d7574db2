//! Notifications to the operator's own tools, for installations without Alertmanager: a JSON
//! POST to `[notify] webhook` after every finished backup, restore and verify, and
//! healthchecks.io-style pings of `[[source]] ping` (`<url>/start`, `<url>`, `<url>/fail`).
//!
//! A notification never changes a run's outcome: it is sent after the run has finished, each
//! request is bounded by `[notify] timeout`, failures are retried [`MAX_ATTEMPTS`] times with
//! a capped backoff and then logged as a warning. URLs are secrets (a ping UUID or a webhook
//! token is enough to forge or silence reports): logs show the host only. This module does
//! not decide what a run's result is; callers hand it a finished [`RunReport`].

use std::time::Duration;

use serde::Serialize;

use crate::config::{redact_http_url, NotifyConfig, Secret};

/// Attempts per notification: rides out a receiver's restart or a dropped connection
/// without holding a backup slot for long (worst case ≈ attempts × timeout + backoffs).
pub const MAX_ATTEMPTS: u32 = 3;
/// Wait before the first retry; doubled for each next one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Cap of the wait between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What kind of run a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    Backup,
    Restore,
    Verify,
}

/// The JSON body POSTed to the webhook, one per finished run and database.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Always `pgferry`, so one receiver can tell its senders apart.
    pub sender: &'static str,
    pub kind: RunKind,
    pub source: String,
    pub database: String,
    pub snapshot_id: Option<String>,
    /// `success`, `failure` or `cancelled`.
    pub result: &'static str,
    pub raw_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    /// Backups with companion files: the files archived and their bytes.
    pub file_count: Option<u64>,
    pub file_bytes: Option<u64>,
    pub duration_seconds: f64,
    pub error: Option<String>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}

impl RunReport {
    pub fn new(kind: RunKind, source: &str, database: &str, result: &'static str) -> RunReport {
        RunReport {
            sender: "pgferry",
            kind,
            source: source.to_string(),
            database: database.to_string(),
            snapshot_id: None,
            result,
            raw_bytes: None,
            stored_bytes: None,
            file_count: None,
            file_bytes: None,
            duration_seconds: 0.0,
            error: None,
            finished_at: chrono::Utc::now(),
        }
    }
}

/// One ping of a dead-man's switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ping {
    Start,
    Success,
    Fail,
}

impl Ping {
    /// The URL of this ping under the configured base (healthchecks.io's convention).
    pub fn url(self, base: &str) -> String {
        let base = base.trim_end_matches('/');
        match self {
            Ping::Start => format!("{base}/start"),
            Ping::Success => base.to_string(),
            Ping::Fail => format!("{base}/fail"),
        }
    }
}

/// Sends notifications; cheap to clone. The default sends nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    client: reqwest::Client,
    webhook: Option<Secret>,
}

impl Notifier {
    pub fn new(cfg: &NotifyConfig) -> Notifier {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .build()
            .unwrap_or_default();
        Notifier {
            client,
            webhook: cfg.webhook.clone(),
        }
    }

    /// POSTs `report` to the webhook, if one is configured. Never fails: see the module doc.
    pub async fn report(&self, report: &RunReport) {
        let Some(url) = &self.webhook else {
            return;
        };
        let body = serde_json::to_vec(report).expect("reports serialize");
        if let Err(error) = self.send(url.expose(), Some(body)).await {
            tracing::warn!(
                message = "Webhook failed; the run's result stands.",
                webhook = %redact_http_url(url.expose()),
                kind = ?report.kind,
                source = %report.source,
                database = %report.database,
                error = %error
            );
        }
    }

    /// Pings a source's dead-man's switch, if it has one. Never fails.
    pub async fn ping(&self, base: Option<&Secret>, ping: Ping) {
        let Some(base) = base else {
            return;
        };
        if let Err(error) = self.send(&ping.url(base.expose()), None).await {
            tracing::warn!(
                message = "Ping failed; the run's result stands.",
                ping = %redact_http_url(base.expose()),
                kind = ?ping,
                error = %error
            );
        }
    }

    /// One POST, retried; the error of the last attempt, without the URL.
    async fn send(&self, url: &str, body: Option<Vec<u8>>) -> Result<(), String> {
        let mut backoff = FIRST_BACKOFF;
        let mut last = String::new();
        for attempt in 1..=MAX_ATTEMPTS {
            let mut req = self.client.post(url);
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                // A 4xx other than 429 will not get better by retrying.
                Ok(resp)
                    if resp.status().is_client_error()
                        && resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS =>
                {
                    return Err(format!("the receiver answered {}", resp.status()));
                }
                Ok(resp) => last = format!("the receiver answered {}", resp.status()),
                // reqwest's error text includes the URL: keep only what went wrong.
                Err(e) => last = describe(&e),
            }
            if attempt < MAX_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        Err(format!("{last} (after {MAX_ATTEMPTS} attempts)"))
    }
}

/// A reqwest error in words, without the URL it carries.
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut cause = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(c) = cause {
        detail = c.to_string();
        cause = c.source();
    }
    if detail.is_empty() {
        what.to_string()
    } else {
        format!("{what}: {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_urls_follow_healthchecks() {
        let base = "https://hc.example/0b5e-uuid/";
        assert_eq!(Ping::Start.url(base), "https://hc.example/0b5e-uuid/start");
        assert_eq!(Ping::Success.url(base), "https://hc.example/0b5e-uuid");
        assert_eq!(Ping::Fail.url(base), "https://hc.example/0b5e-uuid/fail");
    }

    #[tokio::test]
    async fn a_dead_receiver_is_retried_then_given_up_without_its_url() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let n = Notifier::new(&NotifyConfig {
            webhook: Some(Secret::new(format!("http://127.0.0.1:{port}/T0K3N"))),
            timeout: Duration::from_secs(2),
        });
        let err = n
            .send(
                &format!("http://127.0.0.1:{port}/T0K3N"),
                Some(b"{}".to_vec()),
            )
            .await
            .unwrap_err();
        assert!(err.contains("after 3 attempts"), "{err}");
        assert!(!err.contains("T0K3N"), "{err}");
    }
}
