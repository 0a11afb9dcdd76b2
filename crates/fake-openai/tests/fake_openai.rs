//! Spins the fake up and talks to it over real HTTP with reqwest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt as _;
use serde_json::{Value, json};

const KEY: &str = "Bearer sk-upstream";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn generate(fake: &fake_openai::FakeOpenAi, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/images/generations", fake.base_url()))
        .header("Authorization", KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn decode_b64(item: &Value) -> Vec<u8> {
    B64.decode(item["b64_json"].as_str().unwrap()).unwrap()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_pixel(w, h, image::Rgba([10, 20, 30, 255]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn png_has_requested_size_and_openai_fields() {
    let fake = fake_openai::spawn().await.unwrap();
    assert!(fake.base_url().starts_with("http://127.0.0.1:"));
    assert!(fake.base_url().ends_with("/v1"));
    let resp = generate(
        &fake,
        json!({"model": "gpt-image-1", "prompt": "a small red fox", "size": "1024x1536", "quality": "low", "n": 2}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let bytes = decode_b64(&body["data"][0]);
    assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::Png);
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (1024, 1536));
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["size"], "1024x1536");
    assert_eq!(body["quality"], "low");
    assert_eq!(body["background"], "opaque");
    assert_eq!(body["output_format"], "png");
    // 4 words + 3; 2 images x 408 (low, 1024x1536).
    assert_eq!(
        body["usage"],
        json!({"total_tokens": 7 + 816, "input_tokens": 7, "output_tokens": 816,
               "input_tokens_details": {"text_tokens": 7, "image_tokens": 0}})
    );
    assert_eq!(fake.count("red fox"), 1);
    let rec = &fake.requests()[0];
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.path, "/v1/images/generations");
    assert_eq!(rec.authorization.as_deref(), Some(KEY));
    assert_eq!(rec.json.as_ref().unwrap()["size"], "1024x1536");
}

#[tokio::test]
async fn auto_size_and_quality_resolve() {
    let fake = fake_openai::spawn().await.unwrap();
    let body: Value = generate(
        &fake,
        json!({"model": "gpt-image-1-mini", "prompt": "x", "size": "auto", "quality": "auto", "background": "auto"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["size"], "1024x1024");
    assert_eq!(body["quality"], "medium");
    assert_eq!(body["background"], "opaque");
    assert_eq!(body["usage"]["output_tokens"], 1056);
    let img = image::load_from_memory(&decode_b64(&body["data"][0])).unwrap();
    assert_eq!((img.width(), img.height()), (1024, 1024));
}

#[tokio::test]
async fn jpeg_and_webp_formats_are_honoured() {
    let fake = fake_openai::spawn().await.unwrap();
    for (fmt, want) in [("jpeg", image::ImageFormat::Jpeg), ("webp", image::ImageFormat::WebP)] {
        let body: Value = generate(
            &fake,
            json!({"model": "gpt-image-1", "prompt": "p", "size": "96x64", "output_format": fmt, "output_compression": 50}),
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(body["output_format"], fmt);
        let bytes = decode_b64(&body["data"][0]);
        assert_eq!(image::guess_format(&bytes).unwrap(), want);
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (96, 64));
    }
    // Transparent backgrounds come back with alpha; jpeg cannot have one.
    let body: Value =
        generate(&fake, json!({"model": "gpt-image-1", "prompt": "p", "size": "32x32", "background": "transparent"}))
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(body["background"], "transparent");
    let img = image::load_from_memory(&decode_b64(&body["data"][0])).unwrap();
    assert!(img.color().has_alpha());
    let resp = generate(
        &fake,
        json!({"model": "gpt-image-1", "prompt": "p", "background": "transparent", "output_format": "jpeg"}),
    )
    .await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn missing_key_is_401_envelope() {
    let fake = fake_openai::spawn().await.unwrap();
    let resp = client()
        .post(format!("{}/images/generations", fake.base_url()))
        .json(&json!({"model": "gpt-image-1", "prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(body["error"]["message"].is_string());
    // Recorded all the same.
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.requests()[0].authorization, None);
}

/// Only the fake's own key is accepted: a gateway forwarding its client's key would fail.
#[tokio::test]
async fn another_key_is_401_and_bills_nothing() {
    let fake = fake_openai::spawn_with_key("sk-own").await.unwrap();
    let send = |key: &'static str| {
        client()
            .post(format!("{}/images/generations", fake.base_url()))
            .header("Authorization", key)
            .json(&json!({"model": "gpt-image-1", "prompt": "p"}))
            .send()
    };
    let resp = send("Bearer sk-upstream").await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(!body["error"]["message"].as_str().unwrap().contains("sk-upstream"), "{body}");
    assert_eq!(fake.billed_images(), 0);
    assert_eq!(send("Bearer sk-own").await.unwrap().status(), 200);
    assert_eq!(fake.billed_images(), 1);
}

/// Streams bill every completed image they produce; the faults shape what answers report.
#[tokio::test]
async fn streams_bill_completed_images_and_faults_shape_reports() {
    let fake = fake_openai::spawn().await.unwrap();
    let body = json!({"model": "gpt-image-1", "prompt": "three [fault:gap=10] [fault:usage-x=5] [fault:size=4096x4096]",
        "n": 3, "stream": true, "quality": "low", "size": "1024x1024", "partial_images": 1});
    let text = client()
        .post(format!("{}/images/generations", fake.base_url()))
        .header("Authorization", KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let completed: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|v| v["type"] == "image_generation.completed")
        .collect();
    assert_eq!(completed.len(), 3);
    assert_eq!(fake.billed_images(), 3);
    assert_eq!(completed[0]["usage"]["output_tokens"], 272 * 5);
    assert_eq!(completed[0]["size"], "4096x4096");
}

#[tokio::test]
async fn validation_errors_use_the_envelope() {
    let fake = fake_openai::spawn().await.unwrap();
    let resp = generate(&fake, json!({"model": "gpt-image-1", "prompt": "p", "size": "big"})).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "size");
    assert_eq!(body["error"]["code"], "invalid_value");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let resp = generate(&fake, json!({"model": "nope", "prompt": "p"})).await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    let resp = client().get(format!("{}/nothing-here", fake.base_url())).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn fault_500_once_then_success() {
    let fake = fake_openai::spawn().await.unwrap();
    let req = json!({"model": "gpt-image-1", "prompt": "cat [fault:500-once]", "size": "16x16"});
    let first = generate(&fake, req.clone()).await;
    assert_eq!(first.status(), 500);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    let second = generate(&fake, req.clone()).await;
    assert_eq!(second.status(), 200);
    // A different prompt with the same directive has its own count.
    let other =
        generate(&fake, json!({"model": "gpt-image-1", "prompt": "dog [fault:500-once]", "size": "16x16"})).await;
    assert_eq!(other.status(), 500);
    assert_eq!(fake.count("[fault:500-once]"), 3);
    assert_eq!(fake.count("cat"), 2);
}

#[tokio::test]
async fn other_faults() {
    let fake = fake_openai::spawn().await.unwrap();
    let req = |p: &str| json!({"model": "gpt-image-1", "prompt": p, "size": "16x16"});

    let r = generate(&fake, req("[fault:429-once]")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(generate(&fake, req("[fault:429-once]")).await.status(), 200);

    for _ in 0..2 {
        assert_eq!(generate(&fake, req("[fault:500-always]")).await.status(), 500);
    }

    let r = generate(&fake, req("[fault:502-html]")).await;
    assert_eq!(r.status(), 502);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(serde_json::from_str::<Value>(&r.text().await.unwrap()).is_err());

    let r = generate(&fake, req("bad [fault:400]")).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"],
        json!({"message": "Your request was rejected as a result of our safety system.",
               "type": "image_generation_user_error", "param": "prompt", "code": "moderation_blocked"})
    );

    let r = generate(&fake, req("[fault:malformed]")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(serde_json::from_str::<Value>(&r.text().await.unwrap()).is_err());

    let t = Instant::now();
    let r = generate(&fake, req("[fault:slow=300]")).await;
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
}

/// `[fault:drop]` (and `drop-mid`): the client sees a transport error, not a response.
#[tokio::test]
async fn drop_gives_a_client_error() {
    let fake = fake_openai::spawn().await.unwrap();
    for prompt in ["[fault:drop]", "[fault:drop-mid]"] {
        let sent = client()
            .post(format!("{}/images/generations", fake.base_url()))
            .header("Authorization", KEY)
            .json(&json!({"model": "gpt-image-1", "prompt": prompt, "size": "16x16"}))
            .send()
            .await;
        match sent {
            Err(_) => {}
            Ok(resp) => assert!(resp.bytes().await.is_err(), "{prompt}: body should fail"),
        }
    }
    // The server is still fine afterwards.
    let ok = generate(&fake, json!({"model": "gpt-image-1", "prompt": "p", "size": "8x8"})).await;
    assert_eq!(ok.status(), 200);
}

/// Reads an SSE body, noting when each event arrived.
async fn read_events(resp: reqwest::Response) -> Vec<(Instant, String, Value)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut kind = String::new();
            let mut data = Value::Null;
            for line in block.lines() {
                if let Some(k) = line.strip_prefix("event: ") {
                    kind = k.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            out.push((Instant::now(), kind, data));
        }
    }
    assert!(buf.is_empty(), "trailing bytes: {buf:?}");
    out
}

#[tokio::test]
async fn stream_arrives_as_separate_events() {
    let fake = fake_openai::spawn().await.unwrap();
    let resp = generate(
        &fake,
        json!({"model": "gpt-image-1-mini", "prompt": "a b c", "size": "64x48", "stream": true, "partial_images": 2}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = read_events(resp).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(
        kinds,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    for (i, (_, kind, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], kind.as_str());
        assert_eq!(data["size"], "64x48");
        assert_eq!(data["quality"], "medium");
        assert_eq!(data["background"], "opaque");
        assert_eq!(data["output_format"], "png");
        assert!(data["created_at"].as_u64().is_some());
        let img = image::load_from_memory(&decode_b64(data)).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48));
        if i < 2 {
            assert_eq!(data["partial_image_index"], i);
            assert!(data.get("usage").is_none());
        } else {
            assert!(data.get("partial_image_index").is_none());
            assert_eq!(data["usage"]["input_tokens_details"]["text_tokens"], 6);
            assert_eq!(data["usage"]["output_tokens"], 1056);
        }
    }
    // Events were read as they were written, ~100 ms apart, not in one buffered lump.
    let gap1 = events[1].0 - events[0].0;
    let gap2 = events[2].0 - events[1].0;
    assert!(gap1 >= Duration::from_millis(60), "gap1 {gap1:?}");
    assert!(gap2 >= Duration::from_millis(60), "gap2 {gap2:?}");
}

#[tokio::test]
async fn multipart_edit_is_recorded_with_its_parts() {
    let fake = fake_openai::spawn().await.unwrap();
    let (a, b, mask) = (png(40, 30), png(20, 20), png(40, 30));
    let part = |bytes: &Vec<u8>, name: &str| {
        reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.to_owned()).mime_str("image/png").unwrap()
    };
    let form = reqwest::multipart::Form::new()
        .part("image[]", part(&a, "a.png"))
        .part("image[]", part(&b, "b.png"))
        .part("mask", part(&mask, "mask.png"))
        .text("prompt", "add a hat")
        .text("model", "gpt-image-1")
        .text("size", "1536x1024")
        .text("quality", "high")
        .text("n", "1");
    let resp = client()
        .post(format!("{}/images/edits", fake.base_url()))
        .header("Authorization", KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let img = image::load_from_memory(&decode_b64(&body["data"][0])).unwrap();
    assert_eq!((img.width(), img.height()), (1536, 1024));
    // 3 words + 3 text tokens, 2 x 194 image tokens, 6208 output tokens.
    assert_eq!(
        body["usage"],
        json!({"total_tokens": 6 + 388 + 6208, "input_tokens": 394, "output_tokens": 6208,
               "input_tokens_details": {"text_tokens": 6, "image_tokens": 388}})
    );

    let rec = fake.requests().pop().unwrap();
    assert_eq!(rec.path, "/v1/images/edits");
    assert!(rec.content_type.as_deref().unwrap().starts_with("multipart/form-data"));
    assert!(rec.json.is_none());
    let names: Vec<&str> = rec.parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["image[]", "image[]", "mask", "prompt", "model", "size", "quality", "n"]);
    assert_eq!(rec.parts[0].filename.as_deref(), Some("a.png"));
    assert_eq!(rec.parts[0].content_type.as_deref(), Some("image/png"));
    assert_eq!(rec.parts[0].bytes.as_ref(), a.as_slice());
    assert_eq!(rec.parts[1].bytes.as_ref(), b.as_slice());
    assert_eq!(rec.part("prompt").unwrap().bytes.as_ref(), b"add a hat");
    assert_eq!(rec.part("prompt").unwrap().filename, None);
    assert_eq!(rec.prompt().as_deref(), Some("add a hat"));
    assert_eq!(fake.count("hat"), 1);
}

#[tokio::test]
async fn multipart_edit_streams_image_edit_events() {
    let fake = fake_openai::spawn().await.unwrap();
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(png(8, 8)).file_name("a.png"))
        .text("prompt", "p")
        .text("model", "gpt-image-1")
        .text("size", "32x32")
        .text("stream", "true")
        .text("partial_images", "1");
    let resp = client()
        .post(format!("{}/images/edits", fake.base_url()))
        .header("Authorization", KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = read_events(resp).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(kinds, ["image_edit.partial_image", "image_edit.completed"]);
    assert_eq!(events[1].2["usage"]["input_tokens_details"]["image_tokens"], 194);
}

#[tokio::test]
async fn json_edit_with_data_urls() {
    let fake = fake_openai::spawn().await.unwrap();
    let url = format!("data:image/png;base64,{}", B64.encode(png(8, 8)));
    let resp = client()
        .post(format!("{}/images/edits", fake.base_url()))
        .header("Authorization", KEY)
        .json(&json!({"model": "gpt-image-1", "prompt": "p", "size": "16x16",
                      "images": [{"image_url": url}, {"file_id": "file-1"}], "mask": {"image_url": url}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["input_tokens_details"]["image_tokens"], 388);

    let resp = client()
        .post(format!("{}/images/edits", fake.base_url()))
        .header("Authorization", KEY)
        .json(&json!({"model": "gpt-image-1", "prompt": "p", "images": [{"image_url": "data:image/png;base64,@@@"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn dall_e_url_and_b64() {
    let fake = fake_openai::spawn().await.unwrap();
    let body: Value =
        generate(&fake, json!({"model": "dall-e-2", "prompt": "p", "size": "256x256"})).await.json().await.unwrap();
    for k in ["usage", "quality", "background", "output_format", "size"] {
        assert!(body.get(k).is_none(), "{k} should be absent");
    }
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("http://{}/files/", fake.addr)));
    assert!(url.ends_with(".png"));
    let bytes = client().get(url).send().await.unwrap().bytes().await.unwrap();
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (256, 256));

    let body: Value = generate(
        &fake,
        json!({"model": "dall-e-3", "prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["data"][0]["revised_prompt"], "revised: a lighthouse");
    assert!(body["data"][0].get("url").is_none());
    assert!(image::load_from_memory(&decode_b64(&body["data"][0])).is_ok());
    assert!(body.get("usage").is_none());
}

#[tokio::test]
async fn drop_mid_stream_sends_one_event_then_breaks() {
    let fake = fake_openai::spawn().await.unwrap();
    let resp = generate(
        &fake,
        json!({"model": "gpt-image-1", "prompt": "[fault:drop-mid]", "size": "8x8", "stream": true, "partial_images": 2}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut chunks = resp.bytes_stream();
    let mut got = Vec::new();
    let mut failed = false;
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body should end with an error");
    let text = String::from_utf8(got).unwrap();
    assert!(text.starts_with("event: image_generation.partial_image\ndata: {"));
    assert_eq!(text.matches("\n\n").count(), 1);
}

/// The binary prints exactly one `listening on http://ADDR` line and serves there.
#[tokio::test]
async fn binary_prints_its_address_and_serves() {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fake-openai"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line).unwrap();
    let base =
        line.trim_end().strip_prefix("listening on http://127.0.0.1:").map(|port| format!("http://127.0.0.1:{port}"));
    let result = async {
        let base = base.unwrap_or_else(|| panic!("unexpected line {line:?}"));
        client()
            .post(format!("{base}/v1/images/generations"))
            .header("Authorization", KEY)
            .json(&json!({"model": "gpt-image-1", "prompt": "p", "size": "8x8"}))
            .send()
            .await
            .unwrap()
            .status()
    }
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(result, 200);
}
