//! Request bodies within bounds over all requests (`Limits::max_body_bytes_in_flight`): a body's bytes
//! count from the moment they arrive until the request lets go of them, so a client that sends part of
//! a large body and stalls holds its part, and the next large body finds no room and gets a 503 to
//! retry. Outcomes are decided by what the stalled client has sent (read from the state's
//! `body_budget`), never by timing.

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use server::body::BodyBudget;
use server::config::{Config, Env};
use tokio::io::AsyncWriteExt;

struct TestEnv;
impl Env for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "FAKE_UPSTREAM_KEY").then(|| "sk-upstream".to_owned())
    }
}

const LIMIT: usize = 256 * 1024;

struct Gateway {
    _fake: fake_openai::FakeOpenAi,
    addr: std::net::SocketAddr,
    http: reqwest::Client,
    budget: BodyBudget,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn gateway(max_body_bytes: usize, in_flight: u64) -> Gateway {
    let fake = fake_openai::spawn().await.unwrap();
    let toml = format!(
        "[providers.openai]\nbase_url = \"{}\"\nmodels = [\"gpt-image-1\"]\napi_key_env = \"FAKE_UPSTREAM_KEY\"\n",
        fake.base_url()
    );
    let mut config = Config::from_toml(&toml, &TestEnv).unwrap();
    config.limits.max_body_bytes = max_body_bytes;
    config.limits.max_body_bytes_in_flight = in_flight;
    // Every wait here ends in a refusal decided by what the stalled client holds: keep it short.
    config.limits.decode_wait = Duration::from_millis(20);
    let state = server::AppState::from_config(&config).unwrap();
    let budget = state.body_budget.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::run(listener, server::app(state), async move {
        let _ = rx.await;
    }));
    Gateway { _fake: fake, addr, http: reqwest::Client::new(), budget, _shutdown: tx }
}

/// A PNG of noise (it does not compress): about `4 * side * side` bytes.
fn png(side: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let img = image::RgbaImage::from_fn(side, side, |_, _| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        image::Rgba((state >> 8).to_le_bytes())
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

impl Gateway {
    async fn edit(&self, image: Vec<u8>, prompt: &str) -> (u16, Option<String>, Value) {
        let form = Form::new()
            .text("model", "gpt-image-1")
            .text("prompt", prompt.to_owned())
            .part("image", Part::bytes(image).file_name("a.png").mime_str("image/png").unwrap());
        let r = self.http.post(format!("http://{}/v1/images/edits", self.addr)).multipart(form).send().await.unwrap();
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (status, retry_after, r.json().await.unwrap())
    }

    async fn generate(&self, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("http://{}/v1/images/generations", self.addr))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// Waits until exactly `free` bytes of the budget are free (a stalled client's bytes have been let
    /// go).
    async fn wait_for_free(&self, free: u64) {
        for _ in 0..1000 {
            if self.budget.available_bytes() == free {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the budget has {} bytes free, not {free}", self.budget.available_bytes());
    }
}

/// A multipart edit whose image part is `image_bytes` long, of which only the first `sent` bytes are
/// written before the client stalls.
async fn stalled_upload(addr: std::net::SocketAddr, image_bytes: usize, sent: usize) -> tokio::net::TcpStream {
    let boundary = "stalledboundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let length = head.len() + image_bytes + tail.len();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n{head}"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(&vec![0x5a; sent]).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

#[tokio::test]
async fn bodies_in_memory_are_bounded_over_all_requests() {
    let g = gateway(LIMIT, LIMIT as u64).await;
    let whole = g.budget.available_bytes();
    assert_eq!(whole, LIMIT as u64);

    // A client sends 200 KiB of a 250 KiB image and stalls: its 200 KiB are held (the parser may keep
    // the last few bytes back, looking for the boundary).
    let stalled = stalled_upload(g.addr, 250 * 1024, 200 * 1024).await;
    for _ in 0..1000 {
        if g.budget.available_bytes() <= whole - 199 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let free = g.budget.available_bytes();
    assert!(free <= whole - 199 * 1024, "{free} bytes free");

    // A 90 KiB image (a real PNG) does not fit beside it: a 503 to retry, in OpenAI's envelope.
    let image = png(150);
    assert!(image.len() > 60 * 1024 && image.len() < 120 * 1024, "{} bytes", image.len());
    let (status, retry_after, body) = g.edit(image.clone(), "an otter").await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")), "{body}");
    assert_eq!(body["error"]["code"], "server_busy", "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    // Nor does a large JSON body, on any endpoint.
    let big = json!({"model": "gpt-image-1", "prompt": "x".repeat(100 * 1024)}).to_string().into_bytes();
    let (status, body) = g.generate(big.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(g.budget.available_bytes(), free, "refused bodies gave back what they took");

    // The stalled client goes away: its bytes are let go, and the same requests are served.
    drop(stalled);
    g.wait_for_free(whole).await;
    let (status, _, body) = g.edit(image, "an otter").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = g.generate(big).await;
    assert_eq!(status, 400, "read, then refused for its prompt: {body}");
    assert_eq!(body["error"]["param"], "prompt", "{body}");
    g.wait_for_free(whole).await;
}

#[tokio::test]
async fn a_body_budget_smaller_than_one_body_is_refused_at_start() {
    let mut config = Config::from_toml("", &TestEnv).unwrap();
    config.limits.max_body_bytes = LIMIT;
    config.limits.max_body_bytes_in_flight = LIMIT as u64 - 1;
    let Err(e) = server::AppState::from_config(&config) else { panic!("accepted") };
    let message = e.to_string();
    assert!(message.contains("--max-body-bytes-in-flight") && message.contains("--max-body-bytes "), "{message}");
}

#[tokio::test]
async fn a_text_field_longer_than_any_prompt_is_refused_naming_it() {
    let g = gateway(8 << 20, 8 << 20).await;
    let (status, _, body) = g.edit(png(8), &"y".repeat(1_100_000)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "prompt", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("1100000 bytes"), "{message}");
    g.wait_for_free(8 << 20).await;
}
