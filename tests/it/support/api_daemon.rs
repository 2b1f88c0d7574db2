//! A `pgferry daemon` for tests that only talk to its HTTP API: its output discarded, killed
//! when dropped. (`daemon.rs` has its own, which keeps the daemon's log.)

use std::path::Path;
use std::time::{Duration, Instant};

use super::env::TestEnv;

/// A running daemon listening on `127.0.0.1:port`.
pub struct ApiDaemon {
    _child: tokio::process::Child,
    pub port: u16,
}

impl ApiDaemon {
    /// Starts `pgferry daemon` with `config` (whose `[daemon]` listens on `port`) and returns
    /// once `/healthz` answers 200 (within 30 s).
    pub async fn start(env: &TestEnv, config: &Path, port: u16) -> ApiDaemon {
        let child = env
            .command(config, &["daemon"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pgferry daemon");
        let d = ApiDaemon {
            _child: child,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.get("/healthz", None).await.0 != 200 {
            assert!(Instant::now() < deadline, "the daemon never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d
    }

    /// `GET path`, with `token` as the bearer token; (0, "") when the request failed.
    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        self.request("GET", path, token).await
    }

    /// `method path` (`POST` sends `{}`), with `token` as the bearer token; (0, "") when the
    /// request failed.
    pub async fn request(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let client = reqwest::Client::new();
        let mut req = match method {
            "POST" => client.post(url).json(&serde_json::json!({})),
            _ => client.get(url),
        };
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        match req.send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }
}
