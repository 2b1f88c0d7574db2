//! The status page at `/`: databases, last backup age, target health. Plain HTML, no
//! scripts, every value escaped.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use crate::daemon::readiness::Readiness;
use crate::daemon::state::DbStatus;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn age(now: DateTime<Utc>, t: Option<DateTime<Utc>>) -> String {
    let Some(t) = t else { return "never".into() };
    let s = (now - t).num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

pub fn render(dbs: &[DbStatus], ready: &Readiness, now: DateTime<Utc>) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>pgferry</title>\
         <style>body{font-family:sans-serif}td,th{padding:2px 10px;text-align:left}\
         .bad{color:#b00}</style></head><body><h1>pgferry</h1>",
    );
    let _ = write!(
        h,
        "<p>{} — version {}</p><h2>Databases</h2><table><tr><th>source</th><th>database</th>\
         <th>last backup</th><th>snapshot</th><th>failures</th><th>last error</th><th>running</th>\
         <th>next run</th></tr>",
        if ready.all_up {
            "every source and target reachable"
        } else {
            "<span class=\"bad\">a source or target is unreachable</span>"
        },
        env!("CARGO_PKG_VERSION")
    );
    for d in dbs {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.source),
            esc(&d.database),
            age(now, d.last_success),
            esc(d.last_snapshot_id.as_deref().unwrap_or("-")),
            if d.consecutive_failures > 0 { " class=\"bad\"" } else { "" },
            d.consecutive_failures,
            esc(d.last_error.as_deref().unwrap_or("")),
            esc(d.running.as_ref().map(|r| r.snapshot_id.as_str()).unwrap_or("")),
            d.next_run.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_default(),
        );
    }
    h.push_str("</table><h2>Targets</h2><table><tr><th>target</th><th>health</th></tr>");
    for t in &ready.targets {
        let _ = write!(
            h,
            "<tr><td>{}</td><td{}>{}</td></tr>",
            esc(&t.name),
            if t.ok { "" } else { " class=\"bad\"" },
            esc(t.error.as_deref().unwrap_or("ok"))
        );
    }
    h.push_str("</table><h2>Sources</h2><table><tr><th>source</th><th>health</th></tr>");
    for t in &ready.sources {
        let _ = write!(
            h,
            "<tr><td>{}</td><td{}>{}</td></tr>",
            esc(&t.name),
            if t.ok { "" } else { " class=\"bad\"" },
            esc(t.error.as_deref().unwrap_or("ok"))
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_names_and_errors() {
        let d = DbStatus {
            source: "prod".into(),
            database: "<script>".into(),
            last_error: Some("a & b".into()),
            ..DbStatus::default()
        };
        let html = render(&[d], &Readiness::default(), Utc::now());
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("a &amp; b"));
        assert!(!html.contains("<script>"));
    }
}
