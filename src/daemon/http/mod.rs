//! The daemon's HTTP server (axum): metrics, health, readiness, the JSON API and a small
//! status page.
//!
//! Routes: `GET /metrics`, `GET /healthz`, `GET /readyz`, `GET /api/v1/status`,
//! `GET /api/v1/snapshots?source=&database=&limit=&cursor=` (paginated, see [`snapshots`]),
//! `POST /api/v1/backups` (bearer token, see [`auth`]) and `GET /`. With
//! `daemon.read_token_file` set, the read endpoints (`/api/v1/status`, `/api/v1/snapshots`,
//! `/`) need a bearer token too; `/metrics`, `/healthz` and `/readyz` stay open. Handlers only
//! read the daemon's state, the readiness cache and the catalog, or ask the scheduler to start
//! a run; the status answers come from the daemon's state, with the "still held?" checks cached
//! ([`STATUS_CHECK_TTL`]), so they cost the same with 300 databases. No response carries a
//! secret (URLs are redacted, the token is never echoed).

pub mod auth;
mod page;
pub mod snapshots;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::daemon::readiness::ReadinessCache;
use crate::daemon::scheduler::Runner;
use crate::daemon::state::{DbStatus, StartError};
use crate::daemon::DaemonScheduler;
use crate::storage::key::{SnapshotId, SnapshotKey};
use crate::storage::target::Target;
use futures::StreamExt;

use auth::{AuthError, TokenFile};

/// Manifests checked at once by `/api/v1/status` (one HEAD per database per target at most).
const STATUS_CHECK_CONCURRENCY: usize = 16;

/// How long `/api/v1/status` trusts that a database's last snapshot is still held (or gone):
/// within it, repeated status calls send no request to the targets.
pub const STATUS_CHECK_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The Prometheus text format's content type.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What every handler may use; cheap to clone.
#[derive(Clone)]
pub struct HttpState {
    app: App,
    scheduler: DaemonScheduler,
    readiness: ReadinessCache,
    token: Arc<TokenFile>,
    /// `daemon.read_token_file`, when set.
    read_token: Option<Arc<TokenFile>>,
    /// Snapshot pages being read (see `snapshots`).
    pages: Arc<tokio::sync::Semaphore>,
    /// Whether a (source, database, snapshot id) was still held, and when that was checked.
    held: Arc<tokio::sync::Mutex<HeldCache>>,
}

type HeldCache = std::collections::HashMap<(String, String, String), (std::time::Instant, bool)>;

impl HttpState {
    pub fn new(app: App, scheduler: DaemonScheduler, readiness: ReadinessCache) -> HttpState {
        let token = Arc::new(TokenFile::new(app.config.daemon.api_token_file.clone()));
        let read_token = app
            .config
            .daemon
            .read_token_file
            .clone()
            .map(|f| Arc::new(TokenFile::new(f)));
        HttpState {
            app,
            scheduler,
            readiness,
            token,
            read_token,
            pages: Arc::new(tokio::sync::Semaphore::new(snapshots::MAX_CONCURRENT_PAGES)),
            held: Arc::default(),
        }
    }

    /// Whether a read endpoint may answer: always without `daemon.read_token_file`; else with
    /// the read token or the API token.
    fn may_read(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let Some(read_token) = &self.read_token else {
            return Ok(());
        };
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match auth::authorize(read_token.token().as_deref(), header) {
            Ok(()) => Ok(()),
            Err(_) if auth::authorize(self.token.token().as_deref(), header).is_ok() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// 403 when no token is configured, 401 (with `WWW-Authenticate`) for a missing or wrong one.
fn refusal(e: AuthError) -> Response {
    match e {
        AuthError::Disabled => error(StatusCode::FORBIDDEN, e.to_string()),
        e => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .route("/api/v1/snapshots", get(snapshots))
        .route("/api/v1/backups", post(start_backup))
        .with_state(state)
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        s.app.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready = this process can do its work: config loaded (it is, or the daemon would not run),
/// HTTP serving (this answer) and the scheduler alive. Sources and targets are reported but
/// do not count: they have `pgferry_source_up`/`pgferry_target_up` and alerts.
async fn readyz(State(s): State<HttpState>) -> Response {
    let mut reasons = Vec::new();
    if s.scheduler.is_shutting_down() {
        reasons.push("shutting down: finishing the running backups".to_string());
    } else if let Some(why) = s.scheduler.not_alive() {
        reasons.push(why);
    }
    let ready = reasons.is_empty();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "reasons": reasons,
        "dependencies": s.readiness.get(),
    });
    (code, Json(body)).into_response()
}

async fn status(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(e) = s.may_read(&headers) {
        return refusal(e);
    }
    let mut databases = s.scheduler.state().snapshot();
    forget_pruned_cached(&s, &mut databases).await;
    Json(json!({
        "databases": databases,
        "shutting_down": s.scheduler.is_shutting_down(),
    }))
    .into_response()
}

/// [`forget_pruned`], asking the targets only about the databases whose answer is older than
/// [`STATUS_CHECK_TTL`]; one status call checks at a time (the others wait, then hit the cache).
async fn forget_pruned_cached(s: &HttpState, databases: &mut [DbStatus]) {
    let mut cache = s.held.lock().await;
    let now = std::time::Instant::now();
    cache.retain(|_, (at, _)| now.duration_since(*at) < STATUS_CHECK_TTL);
    let key = |d: &DbStatus| {
        d.last_snapshot_id
            .clone()
            .map(|id| (d.source.clone(), d.database.clone(), id))
    };
    let mut unknown: Vec<DbStatus> = databases
        .iter()
        .filter(|d| key(d).is_some_and(|k| !cache.contains_key(&k)))
        .cloned()
        .collect();
    let asked: Vec<_> = unknown.iter().filter_map(key).collect();
    forget_pruned(&s.app.targets, &mut unknown).await;
    for (k, d) in asked.into_iter().zip(&unknown) {
        cache.insert(k, (now, d.last_snapshot_id.is_some()));
    }
    for d in databases.iter_mut() {
        if let Some(k) = key(d) {
            if cache.get(&k).is_some_and(|(_, held)| !held) {
                d.last_snapshot_id = None;
            }
        }
    }
}

/// Clears `last_snapshot_id` where no target holds that snapshot's manifest any more: retention
/// (this daemon's, another replica's or `pgferry prune`) deleted it. A target that cannot
/// answer counts as holding it.
async fn forget_pruned(targets: &[Target], databases: &mut [DbStatus]) {
    let keys: Vec<Option<object_store::path::Path>> = databases
        .iter()
        .map(|d| {
            let id = SnapshotId::parse(d.last_snapshot_id.as_deref()?)?;
            Some(SnapshotKey::new(&d.source, &d.database, id).manifest())
        })
        .collect();
    let checks = keys.into_iter().map(|key| async move {
        let Some(key) = key else { return true };
        for t in targets {
            match t.store.head(&t.at(&key)).await {
                Err(object_store::Error::NotFound { .. }) => continue,
                _ => return true,
            }
        }
        false
    });
    let held: Vec<bool> = futures::stream::iter(checks)
        .buffered(STATUS_CHECK_CONCURRENCY)
        .collect()
        .await;
    for (d, held) in databases.iter_mut().zip(held) {
        if !held {
            d.last_snapshot_id = None;
        }
    }
}

async fn snapshots(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<snapshots::SnapshotQuery>,
) -> Response {
    if let Err(e) = s.may_read(&headers) {
        return refusal(e);
    }
    snapshots::page(s.app.clone(), s.pages.clone(), q).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupRequest {
    source: String,
    database: String,
}

async fn start_backup(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = auth::authorize(s.token.token().as_deref(), header) {
        return refusal(e);
    }
    let req: BackupRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"source\": ..., \"database\": ...}}: {e}"),
            )
        }
    };
    if s.scheduler.is_shutting_down() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let Some(idx) = s
        .scheduler
        .sources()
        .iter()
        .position(|x| x.name == req.source)
    else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no source named {:?}", req.source),
        );
    };
    let source = &s.scheduler.sources()[idx];
    match s.scheduler.runner().discover(source).await {
        Ok(dbs) if dbs.contains(&req.database) => {}
        Ok(_) => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "source {} has no database {:?} selected for backup",
                    req.source, req.database
                ),
            )
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    match s.scheduler.start_manual(idx, &req.database) {
        Ok(id) => {
            tracing::info!(message = "Manual backup requested.", source = %req.source, database = %req.database, snapshot_id = %id);
            (
                StatusCode::ACCEPTED,
                Json(json!({
                    "source": req.source,
                    "database": req.database,
                    "snapshot_id": id,
                    "status": "started",
                })),
            )
                .into_response()
        }
        Err(e @ StartError::AlreadyRunning { .. }) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn index(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(e) = s.may_read(&headers) {
        return refusal(e);
    }
    Html(page::render(
        &s.scheduler.state().snapshot(),
        &s.readiness.get(),
        chrono::Utc::now(),
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::PutPayload;

    #[tokio::test]
    async fn status_never_names_a_pruned_snapshot() {
        let (a, b) = (
            Target::new("a", Arc::new(InMemory::new()), "pg", 10_000),
            Target::new("b", Arc::new(InMemory::new()), "", 10_000),
        );
        let status = |db: &str, id: Option<&str>| DbStatus {
            source: "prod".into(),
            database: db.into(),
            last_snapshot_id: id.map(String::from),
            ..DbStatus::default()
        };
        let kept = SnapshotKey::new(
            "prod",
            "acme",
            SnapshotId::parse("20261127T140000Z").unwrap(),
        );
        b.store
            .put(&b.at(&kept.manifest()), PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        let mut dbs = vec![
            status("acme", Some("20261127T140000Z")),
            status("globex", Some("20261127T140000Z")),
            status("initech", None),
        ];
        forget_pruned(&[a, b], &mut dbs).await;
        let ids: Vec<Option<&str>> = dbs.iter().map(|d| d.last_snapshot_id.as_deref()).collect();
        assert_eq!(ids, vec![Some("20261127T140000Z"), None, None]);
    }
}
