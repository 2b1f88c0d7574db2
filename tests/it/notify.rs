//! `[notify] webhook` and `[[source]] ping`: a receiver started by the test gets one POST per
//! finished run (and the start/success pings), and a dead receiver never fails a backup.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::Router;

use crate::support::env::{bucket_of, TestEnv};

/// One request the receiver got: its path and body.
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// An HTTP server on 127.0.0.1 that records every POST and answers 200.
struct Receiver {
    port: u16,
    got: Received,
    _server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let got: Received = Default::default();
        let app = Router::new()
            .route(
                "/{*path}",
                post(
                    |State(got): State<Received>, Path(path): Path<String>, body: Bytes| async move {
                        got.lock().unwrap().push((path, body));
                        "ok"
                    },
                ),
            )
            .with_state(got.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            port,
            got,
            _server: server,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    fn paths(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn bodies(&self, path: &str) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| serde_json::from_slice(b).expect("the webhook body is JSON"))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_one_post_per_run_and_the_ping_start_and_success() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    let rx = Receiver::start().await;
    let hook_token = "hook-token-7d1f";
    let ping_uuid = "ping-uuid-31c2";
    env.add_secret_var("PGFERRY_HOOK_TOKEN", hook_token);
    env.add_secret_var("PGFERRY_PING_UUID", ping_uuid);
    let (target, _store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "[notify]\nwebhook = \"{}\"\n{}databases = [\"acme\"]\nping = \"{}\"\n{target}",
        rx.url("hook/${PGFERRY_HOOK_TOKEN}"),
        env.source_toml("prod"),
        rx.url("ping/${PGFERRY_PING_UUID}"),
    ));

    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(0);
    let id = run.snapshot_id();
    let hook = format!("hook/{hook_token}");
    let posts = rx.bodies(&hook);
    assert_eq!(posts.len(), 1, "one POST per run: {:?}", rx.paths());
    let p = &posts[0];
    assert_eq!(p["kind"], "backup", "{p}");
    assert_eq!(p["result"], "success", "{p}");
    assert_eq!(p["source"], "prod");
    assert_eq!(p["database"], "acme");
    assert_eq!(p["snapshot_id"], id.as_str());
    assert!(p["stored_bytes"].as_u64().unwrap() > 0, "{p}");
    assert!(p["raw_bytes"].as_u64().unwrap() > 0, "{p}");
    assert!(p["duration_seconds"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["error"].is_null(), "{p}");
    let pings: Vec<String> = rx
        .paths()
        .into_iter()
        .filter(|p| p.starts_with("ping/"))
        .collect();
    assert_eq!(
        pings,
        [
            format!("ping/{ping_uuid}/start"),
            format!("ping/{ping_uuid}")
        ],
        "start, then success"
    );

    // A failed run (its only target's bucket does not exist): one POST with the error, and
    // the fail ping.
    let broken = target.replace(&bucket_of(&target), "pgferry-no-such-bucket");
    let config = env.write_config(&format!(
        "[notify]\nwebhook = \"{}\"\n{}databases = [\"acme\"]\nping = \"{}\"\n{broken}",
        rx.url("hook/${PGFERRY_HOOK_TOKEN}"),
        env.source_toml("prod"),
        rx.url("ping/${PGFERRY_PING_UUID}"),
    ));
    rx.got.lock().unwrap().clear();
    let run = env.pgferry(&config, &["backup"]).await;
    run.assert_code(1);
    let posts = rx.bodies(&hook);
    assert_eq!(posts.len(), 1, "{:?}", rx.paths());
    assert_eq!(posts[0]["result"], "failure", "{}", posts[0]);
    assert!(posts[0]["error"].as_str().is_some(), "{}", posts[0]);
    assert!(
        rx.paths().contains(&format!("ping/{ping_uuid}/fail")),
        "{:?}",
        rx.paths()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_does_not_fail_the_backup() {
    let env = TestEnv::start().await;
    env.small_database("acme").await;
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let token = "dead-hook-token-5a90";
    env.add_secret_var("PGFERRY_HOOK_TOKEN", token);
    let (target, _store) = env.s3_target("s3").await;
    let config = env.write_config(&format!(
        "[notify]\nwebhook = \"http://127.0.0.1:{port}/hook/${{PGFERRY_HOOK_TOKEN}}\"\ntimeout = \"2s\"\n{}databases = [\"acme\"]\nping = \"http://127.0.0.1:{port}/ping/${{PGFERRY_HOOK_TOKEN}}\"\n{target}",
        env.source_toml("prod"),
    ));
    let run = env.pgferry(&config, &["backup", "--json"]).await;
    run.assert_code(0);
    let last: serde_json::Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["result"], "success", "{last}");
    assert!(
        run.stderr.contains("Webhook failed") && run.stderr.contains("Ping failed"),
        "the failure is logged: {}",
        run.stderr
    );
    // env.pgferry already checked that the token appears nowhere in the output.
}
