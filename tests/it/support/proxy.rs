//! [`Proxy`]: a loopback TCP proxy in front of a real server (a Garage S3 endpoint) whose
//! behaviour a test changes while pgferry runs through it.
//!
//! - **Throttle** ([`Proxy::throttle_up`], [`Proxy::throttle_down`]): at most N bytes per
//!   second in one direction, shared by every connection (a token bucket without burst).
//! - **Stall** ([`Proxy::stall`]): connections are accepted, but nothing is read or
//!   forwarded in either direction until the stall is lifted; a new connection is not even
//!   connected upstream. To the client, the server hangs.
//! - **S3 errors** ([`Proxy::fail_requests`]): the proxy speaks HTTP/1.1 one request at a
//!   time (clients do not pipeline): it reads each request head and, while a fault plan
//!   matches, answers itself with an S3-style XML error (`503 SlowDown`, `500
//!   InternalError`) after reading and discarding the request body (`Content-Length` or
//!   chunked), so the client never sees a reset while it still sends, and the connection
//!   stays usable (keep-alive). Other requests go upstream on one upstream connection per
//!   client connection, and their responses come back framed the same way.
//!
//! Counters say what the proxy did: bytes each way, requests inspected, errors served by
//! status. Everything stops when the proxy is dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes forwarded per write: small enough that a throttle is smooth at a few hundred KiB/s.
const CHUNK: usize = 16 * 1024;

/// A request head longer than this is not HTTP we understand: the connection is just piped.
const MAX_HEAD: usize = 64 * 1024;

/// Which requests a fault plan answers with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    /// Every request.
    Any,
    /// S3 UploadPart: a `PUT` whose query has `partNumber=`.
    UploadPart,
    /// A `PUT` of a snapshot manifest (`….manifest.json`).
    ManifestPut,
    /// A `DELETE` of an upload marker (`….upload.json`).
    MarkerDelete,
    /// Requests with this method on a key ending with `suffix` whose query holds `query`:
    /// e.g. a companion-files archive's part uploads (`PUT`, `partNumber=`) or its
    /// completion (`POST`, `uploadId=`).
    Object {
        method: &'static str,
        suffix: &'static str,
        query: &'static str,
    },
}

impl RequestClass {
    fn matches(self, method: &str, target: &str) -> bool {
        match self {
            RequestClass::Any => true,
            RequestClass::UploadPart => method == "PUT" && target.contains("partNumber="),
            RequestClass::ManifestPut => {
                method == "PUT"
                    && target
                        .split('?')
                        .next()
                        .unwrap_or("")
                        .ends_with(".manifest.json")
            }
            RequestClass::Object {
                method: m,
                suffix,
                query,
            } => {
                let (path, q) = target.split_once('?').unwrap_or((target, ""));
                method == m && path.ends_with(suffix) && q.contains(query)
            }
            RequestClass::MarkerDelete => {
                method == "DELETE"
                    && target
                        .split('?')
                        .next()
                        .unwrap_or("")
                        .ends_with(".upload.json")
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct FaultPlan {
    status: u16,
    class: RequestClass,
    /// Errors still to serve; `None`: until [`Proxy::stop_failing`].
    remaining: Option<u64>,
    /// The request goes upstream (and is applied there) before the error is served: an
    /// ambiguous failure, like a timeout after the server stored the object.
    after_forward: bool,
}

/// Direction of a byte stream through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client to server (requests, uploads).
    Up,
    /// Server to client (responses, downloads).
    Down,
}

struct State {
    upstream: SocketAddr,
    /// Bytes per second per direction; 0 means unlimited.
    rate_up: AtomicU64,
    rate_down: AtomicU64,
    /// The earliest instant the next byte may pass, per direction.
    next_up: Mutex<Instant>,
    next_down: Mutex<Instant>,
    stalled: watch::Sender<bool>,
    faults: Mutex<Option<FaultPlan>>,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    requests: AtomicU64,
    connections: AtomicU64,
    served: Mutex<BTreeMap<u16, u64>>,
    shutdown: CancellationToken,
}

/// A proxy on `127.0.0.1:<port>` in front of one upstream address; stops on drop.
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}

impl Proxy {
    /// Starts a proxy in front of `upstream`, an `http://host:port` endpoint or `host:port`.
    pub async fn start(upstream: &str) -> Proxy {
        let bare = upstream.trim_start_matches("http://").trim_end_matches('/');
        let upstream: SocketAddr = bare
            .parse()
            .unwrap_or_else(|e| panic!("proxy upstream {upstream:?} is not ip:port: {e}"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy address");
        let now = Instant::now();
        let state = Arc::new(State {
            upstream,
            rate_up: AtomicU64::new(0),
            rate_down: AtomicU64::new(0),
            next_up: Mutex::new(now),
            next_down: Mutex::new(now),
            stalled: watch::channel(false).0,
            faults: Mutex::new(None),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            served: Mutex::new(BTreeMap::new()),
            shutdown: CancellationToken::new(),
        });
        let accept_state = state.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = accept_state.shutdown.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((client, _)) = accepted else { continue };
                accept_state.connections.fetch_add(1, Ordering::Relaxed);
                let state = accept_state.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = state.shutdown.cancelled() => {}
                        _ = serve(&state, client) => {}
                    }
                });
            }
        });
        Proxy { addr, state }
    }

    /// `http://127.0.0.1:<port>`: the endpoint to give pgferry instead of the upstream's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `[[target]]` TOML (from `env::s3_target*`) with its endpoint pointed at this proxy.
    #[track_caller]
    pub fn reroute(&self, target_toml: &str) -> String {
        let upstream = format!("endpoint = \"http://{}\"", self.state.upstream);
        assert!(
            target_toml.contains(&upstream),
            "the target does not use this proxy's upstream {upstream}:\n{target_toml}"
        );
        target_toml.replace(&upstream, &format!("endpoint = \"{}\"", self.endpoint()))
    }

    /// Limits client → server traffic to `bytes_per_second` (0: unlimited).
    pub fn throttle_up(&self, bytes_per_second: u64) {
        self.state.rate_up.store(bytes_per_second, Ordering::SeqCst);
    }

    /// Limits server → client traffic to `bytes_per_second` (0: unlimited).
    pub fn throttle_down(&self, bytes_per_second: u64) {
        self.state
            .rate_down
            .store(bytes_per_second, Ordering::SeqCst);
    }

    /// Stalls (`true`) or resumes (`false`) every connection, current and new.
    pub fn stall(&self, stalled: bool) {
        self.state.stalled.send_replace(stalled);
    }

    /// Answers requests of `class` with `status` (503 SlowDown or 500 InternalError): the
    /// next `count` of them, or every one until [`stop_failing`](Self::stop_failing) when
    /// `count` is `None`.
    pub fn fail_requests(&self, status: u16, class: RequestClass, count: Option<u64>) {
        assert!(
            matches!(status, 500 | 503),
            "the proxy serves 500 and 503 only"
        );
        *self.state.faults.lock().unwrap() = Some(FaultPlan {
            status,
            class,
            remaining: count,
            after_forward: false,
        });
    }

    /// Like [`fail_requests`](Self::fail_requests), but each failed request is first
    /// forwarded and applied upstream: the client sees an error for a request that took
    /// effect (an ambiguous failure).
    pub fn fail_after_forwarding(&self, status: u16, class: RequestClass, count: Option<u64>) {
        self.fail_requests(status, class, count);
        if let Some(p) = self.state.faults.lock().unwrap().as_mut() {
            p.after_forward = true;
        }
    }

    /// Forwards every request again.
    pub fn stop_failing(&self) {
        *self.state.faults.lock().unwrap() = None;
    }

    /// How many error responses with `status` the proxy served itself.
    pub fn served(&self, status: u16) -> u64 {
        self.state
            .served
            .lock()
            .unwrap()
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    /// Request heads the proxy read (each served an error or opened a pipe).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Bytes forwarded client → server.
    pub fn bytes_up(&self) -> u64 {
        self.state.bytes_up.load(Ordering::SeqCst)
    }

    /// Bytes forwarded server → client.
    pub fn bytes_down(&self) -> u64 {
        self.state.bytes_down.load(Ordering::SeqCst)
    }
}

impl State {
    async fn wait_unstalled(&self) {
        let mut rx = self.stalled.subscribe();
        // An error means the sender is gone: the proxy is shutting down.
        let _ = rx.wait_for(|stalled| !*stalled).await;
    }

    /// Takes one fault for this request, if the plan has one for it.
    fn take_fault(&self, method: &str, target: &str) -> Option<(u16, bool)> {
        let mut plan = self.faults.lock().unwrap();
        let p = plan.as_mut()?;
        if !p.class.matches(method, target) {
            return None;
        }
        let (status, after_forward) = (p.status, p.after_forward);
        match &mut p.remaining {
            None => {}
            Some(0) => return None,
            Some(n) => *n -= 1,
        }
        *self.served.lock().unwrap().entry(status).or_default() += 1;
        Some((status, after_forward))
    }

    /// Waits until `len` more bytes may pass in `dir`.
    async fn throttle(&self, dir: Dir, len: usize) {
        let (rate, next) = match dir {
            Dir::Up => (self.rate_up.load(Ordering::SeqCst), &self.next_up),
            Dir::Down => (self.rate_down.load(Ordering::SeqCst), &self.next_down),
        };
        if rate == 0 {
            return;
        }
        let until = {
            let mut next = next.lock().unwrap();
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(len as f64 / rate as f64);
            *next
        };
        tokio::time::sleep_until(until).await;
    }

    /// Writes `bytes` to `w` in `dir`, honouring stall and throttle.
    async fn forward<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        dir: Dir,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        for piece in bytes.chunks(self.piece_len(dir)) {
            self.wait_unstalled().await;
            self.throttle(dir, piece.len()).await;
            w.write_all(piece).await?;
            let counter = match dir {
                Dir::Up => &self.bytes_up,
                Dir::Down => &self.bytes_down,
            };
            counter.fetch_add(piece.len() as u64, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Pieces of at most [`CHUNK`], and about 1/20 s of traffic when throttled.
    fn piece_len(&self, dir: Dir) -> usize {
        let rate = match dir {
            Dir::Up => self.rate_up.load(Ordering::SeqCst),
            Dir::Down => self.rate_down.load(Ordering::SeqCst),
        };
        if rate == 0 {
            CHUNK
        } else {
            ((rate / 20) as usize).clamp(1, CHUNK)
        }
    }
}

/// One side of a connection with what was read from it but not yet used.
struct Side {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Side {
    fn new(stream: TcpStream) -> Side {
        Side {
            stream,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    /// Reads more bytes into the buffer; `false` at EOF or on an error.
    async fn fill(&mut self) -> bool {
        matches!(self.stream.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// Reads one HTTP head (through the blank line) and removes it from the buffer.
    /// `None` when the peer closed first or the head is too long to be HTTP we understand.
    async fn head(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                return Some(self.buf.drain(..i + 4).collect());
            }
            if self.buf.len() > MAX_HEAD || !self.fill().await {
                return None;
            }
        }
    }

    /// Reads one line (through CRLF) and removes it from the buffer.
    async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                return Some(self.buf.drain(..i + 2).collect());
            }
            if self.buf.len() > MAX_HEAD || !self.fill().await {
                return None;
            }
        }
    }

    /// Moves exactly `n` bytes to `to` (or discards them when `to` is `None`).
    async fn copy(
        &mut self,
        state: &State,
        mut to: Option<&mut TcpStream>,
        dir: Dir,
        mut n: usize,
    ) -> Option<()> {
        while n > 0 {
            if self.buf.is_empty() && !self.fill().await {
                return None;
            }
            let take = n.min(self.buf.len());
            let piece: Vec<u8> = self.buf.drain(..take).collect();
            if let Some(to) = to.as_deref_mut() {
                state.forward(to, dir, &piece).await.ok()?;
            }
            n -= take;
        }
        Some(())
    }

    /// Moves everything until EOF to `to`.
    async fn copy_to_end(&mut self, state: &State, to: &mut TcpStream, dir: Dir) {
        loop {
            let piece = std::mem::take(&mut self.buf);
            if state.forward(to, dir, &piece).await.is_err() || !self.fill().await {
                return;
            }
        }
    }

    /// Moves a message body described by `head` to `to` (or discards it).
    async fn body(
        &mut self,
        state: &State,
        mut to: Option<&mut TcpStream>,
        dir: Dir,
        framing: Framing,
    ) -> Option<()> {
        match framing {
            Framing::Length(n) => self.copy(state, to, dir, n).await,
            Framing::Chunked => loop {
                let line = self.line().await?;
                if let Some(to) = to.as_deref_mut() {
                    state.forward(to, dir, &line).await.ok()?;
                }
                let size_text = String::from_utf8_lossy(&line);
                let size_hex = size_text.trim().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size_hex, 16).ok()?;
                if size == 0 {
                    // Trailers, then the blank line.
                    loop {
                        let t = self.line().await?;
                        if let Some(to) = to.as_deref_mut() {
                            state.forward(to, dir, &t).await.ok()?;
                        }
                        if t == b"\r\n" {
                            return Some(());
                        }
                    }
                }
                self.copy(state, to.as_deref_mut(), dir, size + 2).await?;
            },
            Framing::UntilClose => {
                let to = to?;
                self.copy_to_end(state, to, dir).await;
                None
            }
        }
    }
}

/// How a message body ends.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// The parts of an HTTP head the proxy needs.
struct Head {
    /// Method (request) or status code (response).
    first: String,
    /// Request target (request) or reason (response).
    second: String,
    content_length: Option<usize>,
    chunked: bool,
}

fn parse_head(raw: &[u8]) -> Head {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let start = lines.next().unwrap_or("");
    let mut words = start.split(' ');
    let a = words.next().unwrap_or("");
    let b = words.next().unwrap_or("");
    // Requests: "METHOD target HTTP/1.1"; responses: "HTTP/1.1 status reason".
    let (first, second) = if a.starts_with("HTTP/") {
        (b.to_string(), words.collect::<Vec<_>>().join(" "))
    } else {
        (a.to_string(), b.to_string())
    };
    let mut head = Head {
        first,
        second,
        content_length: None,
        chunked: false,
    };
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            head.content_length = v.parse().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = v.to_ascii_lowercase().contains("chunked");
        }
    }
    head
}

/// One client connection, one request at a time (HTTP/1.1 clients do not pipeline): answer
/// the requests the fault plan wants failed, forward the others and their responses.
async fn serve(state: &State, client: TcpStream) {
    state.wait_unstalled().await;
    let mut client = Side::new(client);
    let mut upstream: Option<Side> = None;
    loop {
        let Some(raw) = client.head().await else {
            return;
        };
        state.requests.fetch_add(1, Ordering::SeqCst);
        let req = parse_head(&raw);
        let framing = if req.chunked {
            Framing::Chunked
        } else {
            Framing::Length(req.content_length.unwrap_or(0))
        };
        if let Some((status, after_forward)) = state.take_fault(&req.first, &req.second) {
            if after_forward {
                // Apply the request upstream on a connection of its own, drop the answer.
                let Ok(s) = TcpStream::connect(state.upstream).await else {
                    return;
                };
                let mut up = Side::new(s);
                if state.forward(&mut up.stream, Dir::Up, &raw).await.is_err()
                    || client
                        .body(state, Some(&mut up.stream), Dir::Up, framing)
                        .await
                        .is_none()
                {
                    return;
                }
                let Some(head) = up.head().await else {
                    return;
                };
                let resp = parse_head(&head);
                let framing = match resp.content_length {
                    Some(n) => Framing::Length(n),
                    None if resp.chunked => Framing::Chunked,
                    None => Framing::Length(0),
                };
                if up.body(state, None, Dir::Down, framing).await.is_none() {
                    return;
                }
            } else if client.body(state, None, Dir::Up, framing).await.is_none() {
                // Read (and drop) the whole body before answering.
                return;
            }
            let n = state.requests.load(Ordering::SeqCst);
            let response = error_response(status, &req.first, &req.second, n);
            if client.stream.write_all(&response).await.is_err() {
                return;
            }
            continue;
        }
        if upstream.is_none() {
            state.wait_unstalled().await;
            match TcpStream::connect(state.upstream).await {
                Ok(s) => upstream = Some(Side::new(s)),
                Err(_) => return, // the server is down: the client sees the connection close
            }
        }
        let up = upstream.as_mut().expect("connected above");
        if state.forward(&mut up.stream, Dir::Up, &raw).await.is_err()
            || client
                .body(state, Some(&mut up.stream), Dir::Up, framing)
                .await
                .is_none()
        {
            return;
        }
        // The response (after any 1xx interim ones).
        loop {
            let Some(raw) = up.head().await else {
                return;
            };
            let resp = parse_head(&raw);
            if state
                .forward(&mut client.stream, Dir::Down, &raw)
                .await
                .is_err()
            {
                return;
            }
            let status: u16 = resp.first.parse().unwrap_or(0);
            if (100..200).contains(&status) {
                continue;
            }
            let framing = if req.first == "HEAD" || status == 204 || status == 304 {
                Framing::Length(0)
            } else if resp.chunked {
                Framing::Chunked
            } else if let Some(n) = resp.content_length {
                Framing::Length(n)
            } else {
                Framing::UntilClose
            };
            if up
                .body(state, Some(&mut client.stream), Dir::Down, framing)
                .await
                .is_none()
            {
                let _ = client.stream.shutdown().await;
                return;
            }
            break;
        }
    }
}

/// An S3-style error response, as AWS sends it.
fn error_response(status: u16, method: &str, target: &str, request_no: u64) -> Vec<u8> {
    let (reason, code, message) = match status {
        503 => ("Slow Down", "SlowDown", "Please reduce your request rate."),
        _ => (
            "Internal Server Error",
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
    };
    let resource = target.split('?').next().unwrap_or("");
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource><RequestId>pgferry-proxy-{request_no}</RequestId></Error>"
    );
    let (length, body) = if method == "HEAD" {
        (0, String::new())
    } else {
        (body.len(), body)
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {length}\r\nx-amz-request-id: pgferry-proxy-{request_no}\r\n\r\n{body}"
    )
    .into_bytes()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny HTTP/1.1 server: answers every request `200 ok` after reading its body.
    async fn ok_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(end) = find(&buf, b"\r\n\r\n") else {
                            match s.read_buf(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => continue,
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        while buf.len() < end + 4 + len {
                            if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        buf.drain(..end + 4 + len);
                        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn serves_errors_then_forwards_and_counts() {
        let upstream = ok_server().await;
        let proxy = Proxy::start(&format!("http://{upstream}")).await;
        proxy.fail_requests(503, RequestClass::UploadPart, Some(2));
        let client = reqwest::Client::new();
        let put = |q: &str| {
            client
                .put(format!("{}/bucket/key{q}", proxy.endpoint()))
                .body(vec![b'x'; 100_000])
                .send()
        };
        // Not an UploadPart: forwarded.
        let r = put("").await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        for _ in 0..2 {
            let r = put("?partNumber=1&uploadId=u").await.unwrap();
            assert_eq!(r.status().as_u16(), 503);
            let body = r.text().await.unwrap();
            assert!(body.contains("<Code>SlowDown</Code>"), "{body}");
        }
        let r = put("?partNumber=1&uploadId=u").await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
        assert_eq!(proxy.served(503), 2);
        assert!(proxy.bytes_up() >= 200_000, "{}", proxy.bytes_up());

        proxy.fail_requests(500, RequestClass::Any, None);
        for _ in 0..3 {
            let r = client
                .get(format!("{}/bucket/other", proxy.endpoint()))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 500);
        }
        assert_eq!(proxy.served(500), 3);
        proxy.stop_failing();
    }
}
