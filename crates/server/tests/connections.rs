//! The HTTP layer under hostile or broken clients, on real sockets: slow or idle connections are closed
//! after the header timeout, a stalled or trickled body is answered 408, the connection cap holds new
//! connections back until one closes, bad header lines and handler panics still get OpenAI's envelope,
//! and request ids are always the server's own.
//!
//! Timeouts are tiny so that the server acts quickly, but nothing here measures time: each test waits
//! for an event (an answer, the server closing the socket) under a generous outer limit that only a
//! server that never acts would reach.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use fake_openai::FakeOpenAi;
use ledger::testing::TestDatabase;
use ledger::{Ledger, LedgerOptions, NewKey};
use serde_json::{Value, json};
use server::ServeOptions;
use server::config::{Config, Env};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any one event may take before the test gives up: far beyond what a working server needs.
const OUTER_LIMIT: Duration = Duration::from_secs(60);

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(OUTER_LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing happened within {OUTER_LIMIT:?}"),
    }
}

fn options(header_ms: u64, body_ms: u64, max_connections: usize) -> ServeOptions {
    ServeOptions {
        header_timeout: Duration::from_millis(header_ms),
        body_timeout: Duration::from_millis(body_ms),
        write_timeout: Duration::from_secs(3600),
        max_connections,
    }
}

/// The real application, open (no keys) and with no provider: enough for bodies, errors and ids.
fn plain_app() -> Router {
    let config = Config::from_toml("", &NoEnv).unwrap();
    server::app(server::AppState::from_config(&config).unwrap())
}

async fn serve(app: Router, options: ServeOptions) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::run_with(listener, app, options, std::future::pending()));
    addr
}

/// One HTTP response as read off the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The envelope's `error` object, checked to have OpenAI's four fields.
    fn envelope(&self) -> Value {
        let error = self.json()["error"].clone();
        for field in ["message", "type", "param", "code"] {
            assert!(error.get(field).is_some(), "no '{field}' in the envelope: {error}");
        }
        error
    }
}

/// A raw client connection: exact bytes out, responses parsed by hand.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn { stream: TcpStream::connect(addr).await.unwrap(), buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes into the buffer; false at end of stream (or a reset, which also ends it).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next response (with a Content-Length body), or `None` if the server closed first.
    async fn response(&mut self) -> Option<Reply> {
        loop {
            if let Some(reply) = take_response(&mut self.buf) {
                return Some(reply);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Waits until the server closes the connection; what it sent first, if anything, is returned.
    async fn closed(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// Whether any byte has arrived, without waiting.
    fn has_data(&mut self) -> bool {
        let mut chunk = [0u8; 1];
        !self.buf.is_empty() || matches!(self.stream.try_read(&mut chunk), Ok(n) if n > 0)
    }
}

/// The first response in `buf` (with a Content-Length body), removed from it, once it is all there.
fn take_response(buf: &mut Vec<u8>) -> Option<Reply> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .expect("a response with a Content-Length");
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        return None;
    }
    let body = buf[body_start..body_start + length].to_vec();
    buf.drain(..body_start + length);
    Some(Reply { status, headers, body })
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n";

async fn health_on_new_connection(addr: SocketAddr) -> Reply {
    let mut conn = Conn::open(addr).await;
    conn.send(HEALTH).await;
    conn.response().await.expect("an answer to GET /health")
}

#[tokio::test]
async fn half_a_request_line_is_closed_after_the_header_timeout_while_others_are_served() {
    let addr = serve(plain_app(), options(300, 60_000, 64)).await;
    let mut slow = Conn::open(addr).await;
    slow.send(b"GET /hea").await;
    // Another client is served while the slow one holds its connection.
    let ok = within("a normal request", health_on_new_connection(addr)).await;
    assert_eq!(ok.status, 200);
    let sent = within("the slow connection to be closed", slow.closed()).await;
    // hyper closes a header timeout without an answer: there is no request to answer.
    assert!(sent.is_empty(), "unexpected bytes: {:?}", String::from_utf8_lossy(&sent));
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let addr = serve(plain_app(), options(300, 60_000, 64)).await;
    let mut conn = Conn::open(addr).await;
    conn.send(HEALTH).await;
    let first = within("the first response", conn.response()).await.unwrap();
    assert_eq!(first.status, 200);
    assert_ne!(first.header("connection"), Some("close"), "the connection should be kept alive");
    let sent = within("the idle connection to be closed", conn.closed()).await;
    assert!(sent.is_empty(), "unexpected bytes: {:?}", String::from_utf8_lossy(&sent));
}

fn assert_body_timeout(reply: &Reply) {
    assert_eq!(reply.status, 408, "{reply:?}");
    let error = reply.envelope();
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["code"], "request_timeout");
    assert!(error["message"].as_str().unwrap().contains("request body"), "{error}");
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(reply.header("x-request-id").is_some());
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_the_connection_closed() {
    let addr = serve(plain_app(), options(60_000, 300, 64)).await;
    let mut conn = Conn::open(addr).await;
    conn.send(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"an ot",
    )
    .await;
    let reply = within("an answer to the stalled body", conn.response()).await.expect("an answer before closing");
    assert_body_timeout(&reply);
    within("the connection to close", conn.closed()).await;
}

#[tokio::test]
async fn a_trickled_body_is_answered_408() {
    let addr = serve(plain_app(), options(60_000, 300, 64)).await;
    let mut conn = Conn::open(addr).await;
    conn.send(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
    )
    .await;
    let (mut read, mut write) = conn.stream.into_split();
    // A byte every 20 ms: never a pause the length of the body timeout, so only a deadline for the
    // whole body (not one between chunks) stops it.
    let trickle = tokio::spawn(async move {
        for _ in 0..100_000 {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // The answer, then the close (or a reset, the server having left trickled bytes unread).
    let mut sent = within("an answer to the trickled body", async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = read.read(&mut chunk).await {
            buf.extend_from_slice(&chunk[..n]);
        }
        buf
    })
    .await;
    let reply = take_response(&mut sent).expect("an answer before closing");
    assert_body_timeout(&reply);
    trickle.abort();
}

#[tokio::test]
async fn at_the_connection_cap_a_new_connection_waits_until_one_closes() {
    let addr = serve(plain_app(), options(3_600_000, 60_000, 2)).await;
    // Two connections, each known to be accepted (it answered), then left open and idle.
    let mut first = Conn::open(addr).await;
    first.send(HEALTH).await;
    assert_eq!(within("the first connection", first.response()).await.unwrap().status, 200);
    let mut second = Conn::open(addr).await;
    second.send(HEALTH).await;
    assert_eq!(within("the second connection", second.response()).await.unwrap().status, 200);

    let mut third = Conn::open(addr).await;
    third.send(HEALTH).await;
    // Round trips on an accepted connection give the server every chance to answer the third, had it
    // accepted it.
    for _ in 0..3 {
        second.send(HEALTH).await;
        assert_eq!(within("the second connection again", second.response()).await.unwrap().status, 200);
    }
    assert!(!third.has_data(), "a third connection was served beyond the cap of two");

    drop(first);
    let reply = within("the third connection, once the first closed", third.response()).await.unwrap();
    assert_eq!(reply.status, 200);
}

/// A client that pipelines requests and never reads the answers fills the socket buffers, and the
/// server's writes wait: after the write timeout the connection is closed, so it cannot hold its slot
/// (here the only one) forever. Found by scripts/hostile.py: without it twenty such clients held every
/// slot of a server capped at twenty, indefinitely.
#[tokio::test]
async fn a_client_that_never_reads_loses_its_connection_after_the_write_timeout() {
    let options = ServeOptions { write_timeout: Duration::from_millis(300), ..options(60_000, 60_000, 1) };
    let addr = serve(plain_app(), options).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut greedy = socket.connect(addr).await.unwrap();
    let writer = tokio::spawn(async move {
        let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        // Until the server closes the connection: requests out, nothing ever read.
        while greedy.write_all(&request).await.is_ok() {}
    });
    // The only slot is the greedy client's until the server gives up writing to it.
    let reply = within("a request while a client never reads", health_on_new_connection(addr)).await;
    assert_eq!(reply.status, 200);
    within("the greedy client's connection to close", writer).await.unwrap();
}

#[tokio::test]
async fn a_header_with_control_bytes_is_dropped_and_the_request_answered_with_an_envelope() {
    let addr = serve(plain_app(), options(60_000, 60_000, 64)).await;
    let mut conn = Conn::open(addr).await;
    conn.send(b"GET /v1/no-such-route HTTP/1.1\r\nHost: test\r\nX-Foo: a\x01b\r\n\r\n").await;
    let reply = within("an answer", conn.response()).await.expect("an answer, not a closed connection");
    // hyper's parser drops the bad line; the request is routed as usual (to the 404 fallback).
    assert_eq!(reply.status, 404, "{reply:?}");
    let error = reply.envelope();
    assert_eq!(error["code"], "unknown_url");
    assert!(reply.header("x-request-id").is_some());

    // The request really was served: the same connection takes another.
    conn.send(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Bar: \x7f\r\n\r\n").await;
    let reply = within("a second answer", conn.response()).await.unwrap();
    assert_eq!(reply.status, 200);
}

async fn boom() -> &'static str {
    panic!("secret detail: /etc/imagegate/key")
}

/// Log lines, as the fmt subscriber writes them, for tests to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// One thread: the server's tasks run where the test's log subscriber is installed.
#[tokio::test(flavor = "current_thread")]
async fn a_panicking_handler_is_a_500_envelope_with_the_request_id() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::ERROR)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let boom = Router::new().route("/boom", get(boom)).route("/health", get(|| async { "ok" }));
    let addr = serve(server::with_layers(boom), options(60_000, 60_000, 64)).await;
    let mut conn = Conn::open(addr).await;
    conn.send(b"GET /boom HTTP/1.1\r\nHost: test\r\nX-Request-Id: mine\r\n\r\n").await;
    let reply = within("an answer to the panicking route", conn.response()).await.expect("an answer, not a drop");
    assert_eq!(reply.status, 500);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let error = reply.envelope();
    assert_eq!(error["type"], "server_error");
    let message = error["message"].as_str().unwrap();
    assert!(!message.contains("secret") && !message.contains("/etc"), "internals leaked: {message}");
    let id = reply.header("x-request-id").expect("an x-request-id header");
    assert_ne!(id, "mine");
    assert!(message.contains(id), "the message should name the request id {id}: {message}");
    let logged = log.text();
    let line = logged.lines().find(|l| l.contains("a handler panicked")).expect("the panic logged");
    assert!(line.contains("ERROR") && line.contains(id) && line.contains("secret detail"), "{line}");
    // The server, and even this connection, go on.
    conn.send(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n").await;
    assert_eq!(within("the next request", conn.response()).await.unwrap().status, 200);
}

#[tokio::test]
async fn the_request_id_is_always_the_servers_own() {
    // A handler sees the same id the client gets back (handlers key the ledger on what they see).
    let echo = Router::new().route(
        "/echo",
        get(|headers: HeaderMap| async move {
            headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned()
        }),
    );
    let addr = serve(server::with_layers(echo), options(60_000, 60_000, 64)).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut conn = Conn::open(addr).await;
        conn.send(b"GET /echo HTTP/1.1\r\nHost: test\r\nX-Request-Id: client-chosen\r\n\r\n").await;
        let reply = within("an echo", conn.response()).await.unwrap();
        let id = reply.header("x-request-id").unwrap().to_owned();
        assert_eq!(String::from_utf8(reply.body.clone()).unwrap(), id, "the handler saw another id");
        assert_ne!(id, "client-chosen");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);

    // And the real application.
    let addr = serve(plain_app(), ServeOptions::default()).await;
    let mut conn = Conn::open(addr).await;
    conn.send(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Request-Id: client-chosen\r\n\r\n").await;
    let reply = within("/health", conn.response()).await.unwrap();
    let id = reply.header("x-request-id").unwrap();
    assert_ne!(id, "client-chosen");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "not a UUID: {id}");
}

struct TestEnv;
impl Env for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "FAKE_UPSTREAM_KEY").then(|| "sk-upstream".to_owned())
    }
}

async fn ledger_gateway(db: &TestDatabase) -> (FakeOpenAi, SocketAddr, Ledger) {
    let fake = fake_openai::spawn().await.unwrap();
    let toml = format!(
        "[providers.openai]\nbase_url = \"{}\"\nmodels = [\"gpt-image-1-mini\"]\napi_key_env = \"FAKE_UPSTREAM_KEY\"\ntimeout_secs = 20\nmax_retries = 0\n",
        fake.base_url()
    );
    let config = Config::from_toml(&toml, &TestEnv).unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    let state = server::AppState::from_config(&config).unwrap().with_ledger(ledger.clone()).await.unwrap();
    let addr = serve(server::app(state), ServeOptions::default()).await;
    (fake, addr, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_sending_one_request_id_get_ledger_rows_under_the_servers_ids() {
    let db = TestDatabase::sqlite().unwrap();
    let (_fake, addr, ledger) = ledger_gateway(&db).await;
    let http = reqwest::Client::new();
    let mut seen = Vec::new();
    for name in ["alice", "mallory"] {
        let created = ledger.create_key(NewKey::user(name)).await.unwrap();
        let r = http
            .post(format!("http://{addr}/v1/images/generations"))
            .bearer_auth(&created.secret)
            .header("x-request-id", "shared-id")
            .json(&json!({"model": "gpt-image-1-mini", "prompt": "an otter", "quality": "low", "size": "1024x1024"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(id, "shared-id");
        let rows = ledger.entries_for_request(&id).await.unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].key_id.as_deref(), Some(created.key.id.as_str()));
        seen.push(id);
    }
    assert_ne!(seen[0], seen[1]);
    assert!(ledger.entries_for_request("shared-id").await.unwrap().is_empty(), "the client's id reached the ledger");
    db.finish().await.unwrap();
}
