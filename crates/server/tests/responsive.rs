//! CPU work stays off the async runtime: with the server on a runtime of one thread, `/health` answers
//! while heavy requests are being priced (the largest estimates the endpoint accepts, two at once),
//! before they return. On the runtime, their token counting would hold that one thread until done.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::{Value, json};
use server::config::{Config, Env};

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// Serves the app (no providers: estimates need only the catalog) on a one-thread runtime of its own.
fn serve_on_one_thread() -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let config = Config::from_toml("", &NoEnv).unwrap();
            let state = server::AppState::from_config(&config).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            server::run(listener, server::app(state), std::future::pending()).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// Sends one HTTP/1.1 request on a fresh connection and returns once it is written.
fn send(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

/// The response's status line and body.
fn response(mut s: TcpStream) -> (String, String) {
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.lines().next().unwrap_or("").to_owned(), body.to_owned())
}

#[test]
fn health_answers_while_the_largest_estimates_are_priced() {
    let addr = serve_on_one_thread();
    // The largest estimate accepted: 100 items of 32,000 characters of prose (about 3 MB to tokenize).
    let prompt: String =
        "a cute baby sea otter floating on its back in a kelp forest, ".repeat(600).chars().take(32_000).collect();
    let items: Vec<Value> = (0..100).map(|_| json!({"model": "gpt-image-1-mini", "prompt": prompt})).collect();
    let body = serde_json::to_vec(&json!({"requests": items})).unwrap();
    // Several rounds: in each, /health is asked once both estimates have been sent whole, and must
    // answer before either returns.
    for round in 0..5 {
        let (sent_tx, sent_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        for _ in 0..2 {
            let (body, sent, done) = (body.clone(), sent_tx.clone(), done_tx.clone());
            std::thread::spawn(move || {
                let s = send(addr, "POST", "/v1/images/estimates", &body);
                sent.send(()).unwrap();
                let (status, text) = response(s);
                done.send((Instant::now(), status, text)).unwrap();
            });
        }
        sent_rx.recv().unwrap();
        sent_rx.recv().unwrap();
        let (status, health) = response(send(addr, "GET", "/health", b""));
        let health_at = Instant::now();
        assert!(status.contains("200"), "{status} {health}");
        for _ in 0..2 {
            let (at, status, text) = done_rx.recv().unwrap();
            assert!(status.contains("200"), "{status}: {}", &text[..text.len().min(300)]);
            assert!(health_at < at, "round {round}: /health waited for an estimate to be priced");
        }
    }
}

/// A body of tiny JSON values (`[0,0,0,...]`, which would grow twentyfold when parsed) is refused
/// before it is parsed, and a generation body is held to a size a prompt can need. Found by
/// scripts/hostile.py: two 60 MiB bodies of zeros took the server from 0.4 to 4 GB.
#[test]
fn bodies_of_tiny_json_values_are_refused_unparsed() {
    let addr = serve_on_one_thread();
    let junk = format!("{{\"requests\":[{{\"model\":\"gpt-image-1-mini\"}}],\"junk\":[{}0]}}", "0,".repeat(5_000_000));
    let (status, text) = response(send(addr, "POST", "/v1/images/estimates", junk.as_bytes()));
    assert!(status.contains("400"), "{status}: {}", &text[..text.len().min(300)]);
    let error: Value = serde_json::from_str(&text).unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("JSON values"), "{text}");

    let big = format!("{{\"prompt\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let (status, text) = response(send(addr, "POST", "/v1/images/generations", big.as_bytes()));
    assert!(status.contains("413"), "{status}: {text}");
    assert!(text.contains("1048576"), "the limit is named: {text}");
}
