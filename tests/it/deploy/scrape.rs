//! The dashboard's and the alert rules' queries on a real Prometheus that scrapes pgferry's
//! own metrics exposition (`metrics::Metrics::render`, what `GET /metrics` serves): every
//! query must parse and evaluate, and the backed-up databases must show up. The same against
//! a running `pgferry daemon` comes with the daemon's tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgferry::metrics::{now_seconds, Metrics, Outcome};
use serde_json::Value;

use super::tools::{repo, yaml_doc};
use crate::support::prometheus::Prometheus;

/// Serves `metrics.render()` over HTTP on a loopback port until dropped.
struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl MetricsServer {
    fn start(metrics: Metrics) -> MetricsServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let body = metrics.render();
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        MetricsServer { addr, stop }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a daemon that backed up two databases to two targets and verified one exports.
fn busy_metrics() -> Metrics {
    let m = Metrics::new();
    let now = now_seconds();
    for (db, raw, stored) in [
        ("acme", 900_000_000, 180_000_000),
        ("globex", 50_000_000, 12_000_000),
    ] {
        m.backup_last_success
            .with_label_values(&["prod", db])
            .set(now - 600.0);
        m.backups_total
            .with_label_values(&["prod", db, Outcome::Success.as_str()])
            .inc();
        m.backups_total
            .with_label_values(&["prod", db, Outcome::Failure.as_str()])
            .inc_by(0);
        m.backup_duration
            .with_label_values(&["prod", db])
            .observe(42.0);
        m.backup_raw_bytes.with_label_values(&["prod", db]).set(raw);
        m.backup_stored_bytes
            .with_label_values(&["prod", db])
            .set(stored);
    }
    for target in ["ovh", "scaleway"] {
        m.target_uploads_total
            .with_label_values(&[target, Outcome::Success.as_str()])
            .inc_by(2);
        m.target_uploaded_bytes_total
            .with_label_values(&[target])
            .inc_by(192_000_000);
        m.target_last_success
            .with_label_values(&[target])
            .set(now - 600.0);
    }
    m.verify_last_success
        .with_label_values(&["prod", "acme"])
        .set(now - 3600.0);
    m.verifies_total
        .with_label_values(&[Outcome::Success.as_str()])
        .inc();
    m.restores_total
        .with_label_values(&[Outcome::Success.as_str()])
        .inc();
    m
}

/// A dashboard query as Grafana would send it, with the variables set to "All".
fn as_grafana_sends_it(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$source", ".*")
        .replace("$database", ".*")
}

#[test]
fn a_real_prometheus_scrapes_pgferry_metrics_and_runs_every_dashboard_and_alert_query() {
    let server = MetricsServer::start(busy_metrics());
    let prom = Prometheus::start("pgferry", &[server.addr]);

    let series = prom.wait_for(
        "pgferry_backup_last_success_timestamp_seconds",
        Duration::from_secs(60),
    );
    let mut databases: Vec<&str> = series
        .iter()
        .map(|s| s["metric"]["database"].as_str().unwrap())
        .collect();
    databases.sort();
    assert_eq!(databases, ["acme", "globex"]);

    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docker/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| as_grafana_sends_it(t["expr"].as_str().unwrap()))
        .collect();
    let rules = yaml_doc(&repo().join("docker/alerts/pgferry-rules.yaml"));
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    for expr in &exprs {
        if let Err(e) = prom.try_query(expr) {
            panic!("Prometheus rejects {expr:?}: {e}");
        }
    }
    // The fresh backups of this scrape must not look stale to the alert.
    let stale = prom
        .try_query("time() - max by (source, database) (pgferry_backup_last_success_timestamp_seconds) > 2 * 3600")
        .unwrap();
    assert!(stale.is_empty(), "{stale:?}");
    let ratio = prom.wait_for(
        "max by (source, database) (pgferry_backup_raw_bytes{database=\"acme\"}) / max by (source, database) (pgferry_backup_stored_bytes)",
        Duration::from_secs(10),
    );
    assert_eq!(ratio[0]["value"][1], "5");
}
