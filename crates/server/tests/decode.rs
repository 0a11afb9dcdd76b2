//! Decoding edit inputs within bounds: the pixel limit read from the header before anything is decoded,
//! and the process's decode budget (`Limits::max_decode_bytes`), held from the test through the state's
//! `decode_budget` so that every outcome is decided by what the test holds, not by timing.

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Cursor;
use std::time::Duration;

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgba};
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use server::config::{Config, Env};
use server::decode::DecodeBudget;

struct TestEnv;
impl Env for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "FAKE_UPSTREAM_KEY").then(|| "sk-upstream".to_owned())
    }
}

/// 64x64 at 16-bit RGBA: the largest image the test servers accept, 32 KiB decoded.
const SIDE: u32 = 64;
const MAX_PIXELS: u64 = (SIDE * SIDE) as u64;
const LARGEST: u64 = MAX_PIXELS * 8;

struct Gateway {
    _fake: fake_openai::FakeOpenAi,
    url: String,
    http: reqwest::Client,
    budget: DecodeBudget,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

fn config(fake_url: &str, max_decode_bytes: u64) -> Config {
    let toml = format!(
        "[providers.openai]\nbase_url = \"{fake_url}\"\nmodels = [\"gpt-image-1\"]\napi_key_env = \"FAKE_UPSTREAM_KEY\"\n"
    );
    let mut config = Config::from_toml(&toml, &TestEnv).unwrap();
    config.limits.max_image_pixels = MAX_PIXELS;
    config.limits.max_decode_bytes = max_decode_bytes;
    // Every wait in these tests ends in a refusal decided by what the test holds: keep it short.
    config.limits.decode_wait = Duration::from_millis(20);
    config
}

async fn gateway(max_decode_bytes: u64) -> Gateway {
    let fake = fake_openai::spawn().await.unwrap();
    let state = server::AppState::from_config(&config(&fake.base_url(), max_decode_bytes)).unwrap();
    let budget = state.decode_budget.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::run(listener, server::app(state), async move {
        let _ = rx.await;
    }));
    Gateway { _fake: fake, url: format!("http://{addr}/v1"), http: reqwest::Client::new(), budget, _shutdown: tx }
}

impl Gateway {
    /// An edit of `images` (and `mask`), gpt-image-1: status, Retry-After, body.
    async fn edit(&self, images: &[Vec<u8>], mask: Option<Vec<u8>>) -> (u16, Option<String>, Value) {
        let mut form = Form::new().text("model", "gpt-image-1").text("prompt", "p");
        let field = if images.len() == 1 { "image" } else { "image[]" };
        for (i, img) in images.iter().enumerate() {
            form =
                form.part(field, Part::bytes(img.clone()).file_name(format!("{i}.png")).mime_str("image/png").unwrap());
        }
        if let Some(m) = mask {
            form = form.part("mask", Part::bytes(m).file_name("mask.png").mime_str("image/png").unwrap());
        }
        let r = self.http.post(format!("{}/images/edits", self.url)).multipart(form).send().await.unwrap();
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        (status, retry_after, r.json().await.unwrap())
    }
}

/// A `side`x`side` 16-bit RGBA PNG (half transparent): `side * side * 8` bytes decoded.
fn png16(side: u32) -> Vec<u8> {
    let img = ImageBuffer::from_fn(side, side, |x, y| {
        Rgba([(x * 1000) as u16, (y * 1000) as u16, 0, if x < side / 2 { 0 } else { 65_535 }])
    });
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgba16(img).write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A PNG chunk with its CRC-32.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = 0xffff_ffffu32;
    for &b in kind.iter().chain(data) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&(!crc).to_be_bytes());
    out
}

/// A PNG whose header says `side`x`side` 16-bit RGBA and whose image data is not zlib data: a few
/// hundred bytes, whatever the canvas.
fn png_with_garbage_data(side: u32) -> Vec<u8> {
    let mut ihdr = side.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[16, 6, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0xff; 200]));
    png.extend(chunk(b"IEND", &[]));
    png
}

fn error_of(body: &Value) -> (&str, Option<&str>, Option<&str>, &str) {
    let e = &body["error"];
    (e["type"].as_str().unwrap(), e["param"].as_str(), e["code"].as_str(), e["message"].as_str().unwrap())
}

#[tokio::test]
async fn a_tiny_file_claiming_a_huge_canvas_is_refused_by_its_header() {
    let g = gateway(LARGEST).await;
    let bomb = png_with_garbage_data(100_000);
    assert!(bomb.len() < 400);
    let (status, _, body) = g.edit(&[bomb], None).await;
    assert_eq!(status, 400, "{body}");
    let (kind, param, code, message) = error_of(&body);
    assert_eq!((kind, param, code), ("invalid_request_error", Some("image"), Some("invalid_image")));
    assert_eq!(
        message,
        "Invalid input image 'image': 100000x100000 is 10000000000 pixels, more than this server's limit of 4096."
    );
    // The same data under a canvas within the limit does not decode: decoding the bomb before
    // checking its pixels would have answered this instead.
    let (status, _, body) = g.edit(&[png_with_garbage_data(8)], None).await;
    assert_eq!(status, 400, "{body}");
    let (_, param, _, message) = error_of(&body);
    assert_eq!(param, Some("image"));
    assert!(message.starts_with("Invalid input image 'image': it does not decode ("), "{message}");
    assert_eq!(g.budget.available_bytes(), g.budget.total_bytes());
}

#[tokio::test]
async fn an_edit_without_room_in_the_decode_budget_gets_503_and_succeeds_once_there_is() {
    let g = gateway(LARGEST).await;
    assert_eq!(g.budget.total_bytes(), LARGEST);

    // Room for anything but the largest image: an 8x8 one (512 bytes, one KiB reserved) decodes, the
    // 64x64 one (32 KiB) waits, then is refused.
    let held = g.budget.try_reserve(LARGEST - 1024).unwrap();
    let (status, _, body) = g.edit(&[png16(8)], None).await;
    assert_eq!(status, 200, "{body}");
    let (status, retry_after, body) = g.edit(&[png16(SIDE)], None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let (kind, param, code, message) = error_of(&body);
    assert_eq!((kind, param, code), ("server_error", None, Some("server_busy")));
    assert!(message.contains("decoding too many large input images") && message.contains("retry"), "{message}");
    // The refused request holds nothing.
    assert_eq!(g.budget.available_bytes(), 1024);

    drop(held);
    let (status, _, body) = g.edit(&[png16(SIDE)], None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(g.budget.available_bytes(), LARGEST);
}

/// A request decodes its inputs one after another, each holding only its own size: images and a mask
/// whose sum is over the budget, each within it, are served.
#[tokio::test]
async fn a_request_holds_one_decode_at_a_time() {
    let g = gateway(LARGEST).await;
    let images = vec![png16(SIDE), png16(SIDE), png16(SIDE)];
    let (status, _, body) = g.edit(&images, Some(png16(SIDE))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(g.budget.available_bytes(), LARGEST);

    // The budget is checked for every image: the first would fit, the second would not.
    let _held = g.budget.try_reserve(LARGEST - 1024).unwrap();
    let (status, _, body) = g.edit(&[png16(8), png16(SIDE)], None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(g.budget.available_bytes(), 1024);
}

#[tokio::test]
async fn the_decode_budget_must_hold_one_image_at_the_pixel_limit() {
    let base = "http://127.0.0.1:9/v1";
    let e = server::AppState::from_config(&config(base, LARGEST - 1)).err().unwrap();
    assert!(e.0.contains("--max-decode-bytes") && e.0.contains("--max-image-pixels"), "{}", e.0);
    assert!(e.0.contains(&LARGEST.to_string()), "{}", e.0);
    assert!(server::AppState::from_config(&config(base, LARGEST)).is_ok());
}
