//! Refusals reach clients that write their whole upload before reading the answer (Node's undici, which
//! the official Node SDK uses, and most HTTP clients): 401, 404, 413 and 415 on multi-megabyte
//! multipart uploads arrive as the status, not as a broken pipe, and the connection stays usable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use server::config::{Config, Env};
use sha2::{Digest, Sha256};

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

const KEY: &str = "sk-refusals";
const LIMIT: usize = 1024 * 1024;

async fn serve() -> SocketAddr {
    let hash: String = Sha256::digest(KEY.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let mut config = Config::from_toml(&format!("api_keys = [\"sha256:{hash}\"]\n"), &NoEnv).unwrap();
    config.limits.max_body_bytes = LIMIT;
    let state = server::AppState::from_config(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));
    addr
}

/// A multipart edit body with a `bytes`-long image part.
fn multipart(bytes: usize) -> (String, Vec<u8>) {
    let boundary = "XbOuNdArYx";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nan otter\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend(std::iter::repeat_n(7u8, bytes));
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Writes one request whole (failing on a broken pipe), then reads its answer: the status and the
/// body. The connection is kept for the next request.
fn exchange(conn: &mut BufReader<TcpStream>, path: &str, content_type: &str, body: &[u8], key: bool) -> (u16, String) {
    let auth = if key { format!("Authorization: Bearer {KEY}\r\n") } else { String::new() };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let stream = conn.get_mut();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap_or_else(|e| panic!("{path}: the upload broke before the answer was read: {e}"));
    let mut status = String::new();
    let read = conn.read_line(&mut status).unwrap_or_else(|e| panic!("{path}: no answer: {e}"));
    assert!(read > 0, "{path}: the connection closed without an answer");
    let mut length = 0;
    loop {
        let mut line = String::new();
        assert!(conn.read_line(&mut line).unwrap() > 0, "{path}: the answer's head was cut short");
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut text = vec![0; length];
    conn.read_exact(&mut text).unwrap();
    let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, String::from_utf8(text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_large_uploads_arrive_as_their_status_on_a_usable_connection() {
    let addr = serve().await;
    tokio::task::spawn_blocking(move || {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut conn = BufReader::new(stream);
        let (multipart_type, small) = multipart(LIMIT / 2);
        let (_, large) = multipart(2 * LIMIT);
        // Several megabytes each, more than the socket buffers hold: the server must read them.
        for (path, content_type, body, key, want, code) in [
            ("/v1/images/edits", multipart_type.as_str(), &small, false, 401, serde_json::Value::Null),
            ("/v1/images/nothing", multipart_type.as_str(), &small, true, 404, "unknown_url".into()),
            ("/v1/images/edits", "text/plain", &small, true, 415, "unsupported_media_type".into()),
            ("/v1/images/edits", multipart_type.as_str(), &large, true, 413, "payload_too_large".into()),
        ] {
            let (status, text) = exchange(&mut conn, path, content_type, body, key);
            assert_eq!(status, want, "{path}: {text}");
            let error: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(error["error"]["code"], code, "{text}");
        }
    })
    .await
    .unwrap();
}
