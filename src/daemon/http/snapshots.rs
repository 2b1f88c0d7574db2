//! `GET /api/v1/snapshots?source=&database=&limit=&cursor=`: the catalog, a page at a time.
//!
//! A page walks database folders in key order through their indexes (`Read::Indexed`) and
//! streams each snapshot as it comes; it stops after `limit` snapshots or
//! [`MAX_FOLDERS_PER_PAGE`] folders, whichever comes first, and ends with `next_cursor`
//! (`null` at the end). The cursor is opaque to clients: it names the folder and the last
//! snapshot sent, so a walk that follows it sees every snapshot that exists for the whole walk
//! exactly once, whatever is added or pruned meanwhile. At most [`MAX_CONCURRENT_PAGES`] pages
//! are read at once (429 beyond), so no client can make the daemon read the whole fleet at once.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::App;
use crate::storage::catalog::{Filter, Read, SnapshotEntry};

/// Snapshots in a page when the request does not say.
pub const DEFAULT_LIMIT: usize = 100;
/// The most snapshots one page holds (about 1 KiB of JSON each).
pub const MAX_LIMIT: usize = 1000;
/// The most database folders one page reads (one LIST and one GET of the index each, more
/// when an index is stale): the hard cap on the work one request causes. A page that hits
/// it has fewer than `limit` snapshots and a cursor.
pub const MAX_FOLDERS_PER_PAGE: usize = 64;
/// Pages being read at once; more requests get 429 and `Retry-After`.
pub const MAX_CONCURRENT_PAGES: usize = 2;
/// Chunks of the response queued ahead of a slow client.
const BODY_QUEUE: usize = 4;

#[derive(Debug, Deserialize)]
pub struct SnapshotQuery {
    source: Option<String>,
    database: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Where the next page starts: the folder (relative key), and the last snapshot sent from it
/// (its data time and id: the order within a folder), if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Cursor {
    folder: String,
    after: Option<(DateTime<Utc>, String)>,
}

impl Cursor {
    fn encode(&self) -> String {
        hex::encode(serde_json::to_vec(self).expect("a cursor serializes"))
    }

    fn decode(s: &str) -> Option<Cursor> {
        serde_json::from_slice(&hex::decode(s).ok()?).ok()
    }

    /// Whether `s` (of this cursor's folder) comes after the last one sent.
    fn is_before(&self, s: &SnapshotEntry) -> bool {
        match &self.after {
            None => true,
            Some((t, id)) => (s.data_time(), s.id()) < (*t, id.as_str()),
        }
    }
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": message })),
    )
        .into_response()
}

pub async fn page(
    app: App,
    pages: std::sync::Arc<tokio::sync::Semaphore>,
    q: SnapshotQuery,
) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return bad_request(format!("limit must be 1 to {MAX_LIMIT}"));
    }
    let cursor = match q.cursor.as_deref().map(Cursor::decode) {
        None => None,
        Some(Some(c)) => Some(c),
        Some(None) => {
            return bad_request(
                "invalid cursor: pass the next_cursor of the previous page as it was".into(),
            )
        }
    };
    let Ok(permit) = pages.try_acquire_owned() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            axum::Json(json!({ "error": "too many snapshot pages being read; retry" })),
        )
            .into_response();
    };
    let filter = Filter {
        source: q.source,
        databases: q.database.into_iter().collect(),
        target: None,
    };
    let (mut tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
    tokio::spawn(async move {
        let _permit = permit;
        // A closed channel is a client that went away: stop reading.
        let _ = write_page(&app, &filter, cursor, limit, &mut tx).await;
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(rx.map(Ok::<_, Infallible>)),
    )
        .into_response()
}

async fn write_page(
    app: &App,
    filter: &Filter,
    cursor: Option<Cursor>,
    limit: usize,
    tx: &mut mpsc::Sender<Bytes>,
) -> Result<(), mpsc::SendError> {
    let plan = app.catalog_plan(filter).await;
    let folders: Vec<String> = plan.folders().iter().map(|f| f.to_string()).collect();
    let start = match &cursor {
        Some(c) => folders.partition_point(|f| f.as_str() < c.folder.as_str()),
        None => 0,
    };
    let mut unreachable: Vec<(String, String)> = plan.unreachable().to_vec();
    let mut warnings: Vec<String> = Vec::new();
    tx.send(Bytes::from_static(b"{\"snapshots\":[")).await?;
    let mut sent = 0usize;
    let mut next: Option<Cursor> = None;
    let mut pieces = std::pin::pin!(plan.stream_range(start, MAX_FOLDERS_PER_PAGE, Read::Indexed));
    let mut i = start;
    'folders: while let Some(piece) = pieces.next().await {
        let folder = &folders[i];
        i += 1;
        warnings.extend(piece.warnings);
        for (t, e) in piece.unreachable {
            if !unreachable.iter().any(|(n, _)| *n == t) {
                unreachable.push((t, e));
            }
        }
        let resume = cursor.as_ref().filter(|c| c.folder == *folder);
        // The last snapshot sent from this folder: where the next page resumes inside it.
        let mut last = resume.and_then(|c| c.after.clone());
        for s in piece
            .snapshots
            .iter()
            .filter(|s| resume.is_none_or(|c| c.is_before(s)))
        {
            if sent == limit {
                next = Some(Cursor {
                    folder: folder.clone(),
                    after: last,
                });
                break 'folders;
            }
            let mut chunk = if sent == 0 { Vec::new() } else { vec![b','] };
            serde_json::to_writer(&mut chunk, s).expect("a snapshot serializes");
            tx.send(Bytes::from(chunk)).await?;
            sent += 1;
            last = Some((s.data_time(), s.id().to_string()));
        }
    }
    if next.is_none() && i < folders.len() {
        next = Some(Cursor {
            folder: folders[i].clone(),
            after: None,
        });
    }
    let tail = json!({
        "next_cursor": next.map(|c| c.encode()),
        "warnings": warnings,
        "unreachable_targets": unreachable.iter().map(|(t, e)| json!({"target": t, "error": e})).collect::<Vec<_>>(),
    });
    let mut end = b"],".to_vec();
    let tail = serde_json::to_vec(&tail).expect("JSON values serialize");
    // `tail` is an object: its fields follow the array in the same object.
    end.extend_from_slice(&tail[1..]);
    tx.send(Bytes::from(end)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::key::{RunId, SnapshotId, SnapshotKey};
    use crate::storage::manifest::tests::sample;
    use crate::storage::target::Target;
    use crate::test_support::app_over;
    use object_store::memory::InMemory;
    use object_store::PutPayload;
    use std::sync::Arc;

    async fn put_snapshot(t: &Target, database: &str, id: &str) {
        let run = RunId::random();
        let sk = SnapshotKey::new("prod", database, SnapshotId::parse(id).unwrap());
        let mut m = sample();
        m.database = database.into();
        m.snapshot_id = id.into();
        m.started_at = sk.id.time();
        m.object_key = sk.dump(&run).to_string();
        t.store
            .put(&t.at(&sk.dump(&run)), PutPayload::from_static(b"x"))
            .await
            .unwrap();
        t.store
            .put(&t.at(&sk.manifest()), PutPayload::from(m.to_json()))
            .await
            .unwrap();
    }

    /// One page as a client gets it.
    async fn get_page(
        app: &App,
        filter: &Filter,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> serde_json::Value {
        let (tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
        let writer = async move {
            let mut tx = tx;
            write_page(app, filter, cursor, limit, &mut tx).await
        };
        let (written, chunks) = futures::join!(writer, rx.collect::<Vec<Bytes>>());
        written.unwrap();
        let body: Vec<u8> = chunks.concat();
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)))
    }

    #[tokio::test]
    async fn chained_pages_give_every_snapshot_once_whatever_the_limit() {
        let a = Target::new("a", Arc::new(InMemory::new()), "pg", 10_000);
        let hours = ["10", "11", "12", "13", "14"];
        let mut want = Vec::new();
        for (db, n) in [("acme", 5), ("empty", 0), ("globex", 1), ("initech", 3)] {
            for h in &hours[..n] {
                let id = format!("20261127T{h}0000Z");
                put_snapshot(&a, db, &id).await;
                want.push((db.to_string(), id));
            }
        }
        // A folder with no snapshot at all (only an unrelated object).
        a.store
            .put(
                &a.at(&object_store::path::Path::from("prod/empty/notes.txt")),
                PutPayload::from_static(b"x"),
            )
            .await
            .unwrap();
        want.sort();
        let app = app_over("", vec![a]);
        for limit in [1, 2, 3, 4, 5, 9, 100] {
            let mut got = Vec::new();
            let mut cursor = None;
            for _ in 0..20 {
                let page = get_page(&app, &Filter::default(), cursor.clone(), limit).await;
                let snaps = page["snapshots"].as_array().unwrap();
                assert!(snaps.len() <= limit);
                got.extend(snaps.iter().map(|s| {
                    (
                        s["manifest"]["database"].as_str().unwrap().to_string(),
                        s["manifest"]["snapshot_id"].as_str().unwrap().to_string(),
                    )
                }));
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(Cursor::decode(c).unwrap()),
                    None => {
                        cursor = None;
                        break;
                    }
                }
            }
            assert!(cursor.is_none(), "limit {limit}: the walk did not end");
            let n = got.len();
            got.sort();
            got.dedup();
            assert_eq!(got.len(), n, "limit {limit}: a snapshot came twice");
            assert_eq!(got, want, "limit {limit}");
        }
    }

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let c = Cursor {
            folder: "prod/acme".into(),
            after: Some((Utc::now(), "20261127T140000Z".into())),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("zz"), None);
        assert_eq!(Cursor::decode(&hex::encode(b"{}")), None);
    }
}
