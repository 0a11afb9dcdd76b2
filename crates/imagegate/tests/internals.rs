//! No internals reach a client, whatever the environment: `imagegate serve` runs with
//! `RUST_BACKTRACE=1` and `RUST_LIB_BACKTRACE=1`, and every 5xx it can give is provoked (upstream
//! failures of each kind, credentials the upstream rejects, an unreachable upstream, a local model whose
//! files are broken, a ledger that fails). Each answer is OpenAI's envelope with a message free of
//! backtraces, source paths, the server's file paths and library error chains; the details go to the
//! server's log with the request id, which the client gets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// One `imagegate serve` process, its stderr in a file; killed on drop.
struct Server {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log(&self) -> String {
        let mut text = String::new();
        std::fs::File::open(&self.log).unwrap().read_to_string(&mut text).unwrap();
        text
    }
}

async fn serve(data: &Path, config: &Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = data.join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(config)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("IMAGEGATE_API_KEYS")
        .env_remove("IMAGEGATE_DATABASE_URL")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env("GOOD_KEY", fake_openai::DEFAULT_KEY)
        .env("WRONG_KEY", "sk-not-the-upstreams")
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server { child, url: format!("http://127.0.0.1:{port}/v1"), log };
    let started = Instant::now();
    while reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_err() {
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("imagegate serve exited at start ({status}): {}", server.log());
        }
        assert!(started.elapsed() < Duration::from_secs(30), "imagegate serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server
}

/// What must never be in a message a client reads.
fn assert_no_internals(message: &str, private: &[&str]) {
    let lower = message.to_lowercase();
    for marker in [
        "backtrace",
        "panicked",
        "/rustc/",
        ".rs:",
        "src/",
        "cargo",
        "sqlx",
        "sqlite",
        "no such table",
        "os error",
        "caused by",
        "hyper",
        "reqwest",
        "candle",
        "safetensors",
    ] {
        assert!(!lower.contains(marker), "'{marker}' reached the client: {message}");
    }
    for path in private {
        assert!(!message.contains(path), "the server's path {path} reached the client: {message}");
    }
}

struct Answer {
    status: u16,
    request_id: String,
    body: Value,
}

async fn post(server: &Server, key: &str, body: Value) -> Answer {
    let r = reqwest::Client::new()
        .post(format!("{}/images/generations", server.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    Answer { status, request_id, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_5xx_shows_a_client_the_servers_internals() {
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let private = dir.to_str().unwrap();

    // A local model whose weights are cut short: its configs read, its weights do not load.
    let broken = dir.join("broken-model");
    engine::testing::write_checkpoint(&broken, &engine::testing::TinySpec::default()).unwrap();
    let weights = broken.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("imagegate.toml");
    let toml = format!(
        r#"[providers.openai]
base_url = "{base}"
api_key_env = "GOOD_KEY"
models = ["gpt-image-1"]
max_retries = 0
timeout_secs = 2

[providers.wrongkey]
base_url = "{base}"
api_key_env = "WRONG_KEY"
models = ["dall-e-3"]
max_retries = 0

[providers.down]
base_url = "http://127.0.0.1:{closed}/v1"
api_key_env = "GOOD_KEY"
models = ["dall-e-2"]
max_retries = 0

[models.broken]
path = "{model}"
"#,
        base = fake.base_url(),
        model = broken.display(),
    );
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["keys", "create", "--name", "internals"])
        .arg("--data-dir")
        .arg(dir)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("IMAGEGATE_DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_owned();
    let server = serve(dir, &config).await;

    let cases = [
        (json!({"model": "gpt-image-1", "prompt": "otter [fault:malformed]"}), 502, "upstream_invalid_response"),
        (json!({"model": "gpt-image-1", "prompt": "otter [fault:502-html]"}), 502, "upstream_error"),
        (json!({"model": "gpt-image-1", "prompt": "otter [fault:drop]"}), 502, "upstream_unavailable"),
        (json!({"model": "gpt-image-1", "prompt": "otter [fault:slow=3000]"}), 504, "upstream_timeout"),
        (json!({"model": "dall-e-3", "prompt": "otter"}), 502, "upstream_auth_failed"),
        (json!({"model": "dall-e-2", "prompt": "otter"}), 502, "upstream_unavailable"),
        (json!({"model": "broken", "prompt": "otter", "size": "64x64"}), 500, "model_load_failed"),
    ];
    for (request, status, code) in cases {
        let a = post(&server, &key, request.clone()).await;
        assert_eq!((a.status, a.body["error"]["code"].as_str()), (status, Some(code)), "{request}: {}", a.body);
        assert_eq!(a.body["error"]["type"], "server_error", "{}", a.body);
        assert_no_internals(a.body["error"]["message"].as_str().unwrap(), &[private, "127.0.0.1"]);
    }

    // A stream that breaks after its first event ends with an error event, as plain as the rest.
    let r = reqwest::Client::new()
        .post(format!("{}/images/generations", server.url))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-image-1", "prompt": "otter [fault:drop-mid]", "stream": true, "partial_images": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let error = text.split("event: error\ndata: ").nth(1).unwrap_or_else(|| panic!("no error event: {text}"));
    let error: Value = serde_json::from_str(error.lines().next().unwrap()).unwrap();
    assert_no_internals(error["error"]["message"].as_str().unwrap(), &[private, "127.0.0.1"]);

    // The ledger fails under the server: the client gets a plain 503 and its request id; the log has
    // the cause, under that id.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}/imagegate.db", dir.display())).await.unwrap();
    sqlx::query("DROP TABLE reservations").execute(&pool).await.unwrap();
    pool.close().await;
    let a = post(&server, &key, json!({"model": "gpt-image-1", "prompt": "otter"})).await;
    assert_eq!((a.status, a.body["error"]["code"].as_str()), (503, Some("ledger_unavailable")), "{}", a.body);
    let message = a.body["error"]["message"].as_str().unwrap();
    assert_no_internals(message, &[private]);
    assert!(message.contains(&a.request_id), "the client is given its request id: {message}");
    let log = server.log();
    let line = log.lines().find(|l| l.contains(&a.request_id)).unwrap_or_else(|| panic!("no log line: {log}"));
    assert!(line.contains("reservations"), "the log says what failed: {line}");
}
