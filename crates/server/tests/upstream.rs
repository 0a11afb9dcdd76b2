//! imagegate in front of a fake OpenAI upstream, both speaking real HTTP on 127.0.0.1. Each test
//! asserts what a client sees: images that decode, statuses and envelopes, retries that happened.

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fake_openai::FakeOpenAi;
use futures_util::StreamExt;
use image::{DynamicImage, ImageFormat, RgbaImage};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use server::config::{Config, Env};

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// The environment the test config sees: only the upstream key.
struct TestEnv;
impl Env for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "FAKE_UPSTREAM_KEY").then(|| "sk-upstream".to_owned())
    }
}

struct Gateway {
    fake: FakeOpenAi,
    url: String,
    http: reqwest::Client,
    key: Option<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

#[derive(Default)]
struct Setup {
    extra_toml: &'static str,
    provider_toml: &'static str,
    keys: &'static [&'static str],
    max_body_bytes: Option<usize>,
    max_image_pixels: Option<u64>,
}

async fn gateway(setup: Setup) -> Gateway {
    let fake = fake_openai::spawn().await.unwrap();
    let toml = format!(
        r#"{extra}
[providers.openai]
base_url = "{base}"
models = ["gpt-image-1-mini", "gpt-image-1", "gpt-image-1.5", "dall-e-3", "dall-e-2"]
{provider}
[aliases]
mini = "openai/gpt-image-1-mini"
"#,
        extra = setup.extra_toml,
        base = fake.base_url(),
        provider = if setup.provider_toml.is_empty() {
            "api_key_env = \"FAKE_UPSTREAM_KEY\"\ntimeout_secs = 2"
        } else {
            setup.provider_toml
        },
    );
    let mut config = Config::from_toml(&toml, &TestEnv).unwrap();
    if let Some(b) = setup.max_body_bytes {
        config.limits.max_body_bytes = b;
    }
    if let Some(p) = setup.max_image_pixels {
        config.limits.max_image_pixels = p;
    }
    let mut state = server::AppState::from_config(&config).unwrap();
    let mut keys = server::KeySet::new(vec![]);
    keys.add_plain(setup.keys.iter().copied());
    state.keys = std::sync::Arc::new(keys);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, server::app(state), async move {
        let _ = rx.await;
    }));
    Gateway {
        fake,
        url: format!("http://{addr}/v1"),
        http: reqwest::Client::new(),
        key: setup.keys.first().map(|k| (*k).to_owned()),
        shutdown: Some(tx),
        server,
    }
}

impl Gateway {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.post(format!("{}/{path}", self.url));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn generate(&self, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self.post("images/generations").json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap())
    }

    async fn edit(&self, form: Form) -> (u16, Value) {
        let r = self.post("images/edits").multipart(form).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
}

fn decode_b64(v: &Value) -> DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
    image::load_from_memory(&bytes).unwrap()
}

fn format_of_b64(v: &Value) -> ImageFormat {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
    image::guess_format(&bytes).unwrap()
}

fn png(width: u32, height: u32, alpha: bool) -> Vec<u8> {
    let img = RgbaImage::from_fn(width, height, |x, y| {
        image::Rgba([x as u8, y as u8, 90, if alpha && x < width / 2 { 0 } else { 255 }])
    });
    let img = if alpha {
        DynamicImage::ImageRgba8(img)
    } else {
        DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(img).to_rgb8())
    };
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn file(bytes: Vec<u8>, name: &str) -> Part {
    Part::bytes(bytes).file_name(name.to_owned()).mime_str("image/png").unwrap()
}

#[tokio::test]
async fn variations_go_to_dall_e_2_as_openai_takes_them() {
    let g = gateway(Setup::default()).await;
    let form = Form::new()
        .text("n", "2")
        .text("size", "256x256")
        .text("response_format", "b64_json")
        .part("image", file(png(64, 64, false), "square.png"));
    let r = g.post("images/variations").multipart(form).send().await.unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let sent = g.fake.requests().into_iter().last().unwrap();
    assert_eq!(sent.path, "/v1/images/variations");
    let text = |name: &str| String::from_utf8(sent.part(name).unwrap().bytes.to_vec()).unwrap();
    assert_eq!((text("model"), text("n"), text("size")), ("dall-e-2".into(), "2".into(), "256x256".into()));
    assert!(sent.part("prompt").is_none() && sent.part("image").is_some());

    // OpenAI's rules, before the upstream sees anything.
    let before = g.fake.requests().len();
    for (form, param, code) in [
        (
            Form::new().text("model", "dall-e-3").part("image", file(png(64, 64, false), "a.png")),
            "model",
            "invalid_value",
        ),
        (Form::new().part("image", file(png(64, 32, false), "a.png")), "image", "invalid_image"),
        (
            Form::new().text("prompt", "p").part("image", file(png(64, 64, false), "a.png")),
            "prompt",
            "unknown_parameter",
        ),
        (
            Form::new().text("size", "1024x1536").part("image", file(png(64, 64, false), "a.png")),
            "size",
            "invalid_value",
        ),
        (Form::new().text("n", "2"), "image", "missing_required_parameter"),
    ] {
        let r = g.post("images/variations").multipart(form).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{param}");
        assert_error(&r.json().await.unwrap(), Some(param), code);
    }
    assert_eq!(g.fake.requests().len(), before);
}

fn assert_error(body: &Value, param: Option<&str>, code: &str) {
    let e = &body["error"];
    assert_eq!(e["code"], code, "{body}");
    assert_eq!(e["param"].as_str(), param, "{body}");
    assert!(e["type"].is_string() && e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[tokio::test]
async fn generation_returns_a_real_png_with_resolved_fields() {
    let g = gateway(Setup::default()).await;
    let (status, headers, body) =
        g.generate(json!({"model": "gpt-image-1-mini", "prompt": "a cute baby sea otter", "size": "1024x1024"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.contains_key("x-request-id"));
    let img = decode_b64(&body["data"][0]["b64_json"]);
    assert_eq!((img.width(), img.height()), (1024, 1024));
    assert_eq!(format_of_b64(&body["data"][0]["b64_json"]), ImageFormat::Png);
    assert_eq!(body["size"], "1024x1024");
    for field in ["quality", "background", "output_format"] {
        assert!(body[field].is_string() && body[field] != "auto", "{field}: {}", body[field]);
    }
    assert_eq!(body["usage"]["output_tokens"], 1056, "upstream usage passes through unchanged");
    // The upstream got imagegate's upstream key, not the client's, and only the fields the client sent.
    let sent = &g.fake.requests()[0];
    assert_eq!(sent.authorization.as_deref(), Some("Bearer sk-upstream"));
    assert_eq!(
        sent.json,
        Some(json!({"model": "gpt-image-1-mini", "prompt": "a cute baby sea otter", "size": "1024x1024"}))
    );
}

/// The cost header is the upstream's usage priced by the catalog, and the body's breakdown sums to it.
#[tokio::test]
async fn responses_carry_their_exact_cost() {
    let g = gateway(Setup::default()).await;
    let (status, headers, body) =
        g.generate(json!({"model": "gpt-image-1-mini", "prompt": "a cute baby sea otter", "quality": "high"})).await;
    assert_eq!(status, 200, "{body}");
    let prices = pricing::Catalog::builtin().unwrap();
    let t = prices.model("gpt-image-1-mini").unwrap().tokens.clone().unwrap();
    let u = &body["usage"];
    let tokens = |v: &Value| pricing::Decimal::from(v.as_u64().unwrap());
    let million = pricing::Decimal::from(1_000_000);
    let expected = (tokens(&u["input_tokens_details"]["text_tokens"]) * t.text_input.0
        + tokens(&u["input_tokens_details"]["image_tokens"]) * t.image_input.0
        + tokens(&u["output_tokens"]) * t.image_output.0)
        / million;
    let header: pricing::Decimal = headers["x-imagegate-cost-usd"].to_str().unwrap().parse().unwrap();
    assert_eq!(header, expected);
    assert!(header > pricing::Decimal::ZERO);
    let ext = &body["imagegate"];
    assert_eq!(ext["billing_basis"], "tokens");
    assert_eq!(ext["usage_source"], "provider");
    assert_eq!(ext["cost_usd"].as_str().unwrap().parse::<pricing::Decimal>().unwrap(), header);
    let sum: pricing::Decimal = ext["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["amount_usd"].as_str().unwrap().parse::<pricing::Decimal>().unwrap())
        .sum();
    assert_eq!(sum, header);
}

/// A gateway that reports no usage: imagegate counts the tokens (o200k prompt, the output table) and
/// says so; the image is never billed as free.
#[tokio::test]
async fn usage_is_counted_when_the_upstream_reports_none() {
    let g = gateway(Setup::default()).await;
    let prompt = "a quiet harbour at dawn [fault:no-usage]";
    let (status, headers, body) =
        g.generate(json!({"model": "gpt-image-1-mini", "prompt": prompt, "quality": "low", "size": "1024x1024"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["imagegate"]["usage_source"], "counted");
    let text = pricing::count_text_tokens(prompt);
    assert_eq!(body["usage"]["input_tokens_details"]["text_tokens"], text);
    assert_eq!(body["usage"]["output_tokens"], 272);
    let expected = pricing::Decimal::from(text) * pricing::Decimal::new(2, 6)
        + pricing::Decimal::from(272) * pricing::Decimal::new(8, 6);
    let header: pricing::Decimal = headers["x-imagegate-cost-usd"].to_str().unwrap().parse().unwrap();
    assert_eq!(header, expected);
}

#[tokio::test]
async fn per_image_models_and_provider_discounts() {
    let g = gateway(Setup {
        provider_toml: "api_key_env = \"FAKE_UPSTREAM_KEY\"\ndiscount_percent = \"20\"",
        ..Setup::default()
    })
    .await;
    let (status, headers, body) =
        g.generate(json!({"model": "dall-e-3", "prompt": "p", "quality": "hd", "size": "1792x1024"})).await;
    assert_eq!(status, 200, "{body}");
    // dall-e-3 hd 1792x1024 is $0.12 a image, 20% off.
    assert_eq!(headers["x-imagegate-cost-usd"], "0.096");
    assert_eq!(body["imagegate"]["billing_basis"], "per_image");
    assert_eq!(body["imagegate"]["lines"].as_array().unwrap().len(), 2, "the image line and the discount line");
}

#[tokio::test]
async fn output_format_size_and_n_are_honoured() {
    let g = gateway(Setup::default()).await;
    let (status, _, body) = g
        .generate(json!({"model": "mini", "prompt": "p", "output_format": "jpeg", "output_compression": 40, "size": "1536x1024", "n": 2}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    for d in body["data"].as_array().unwrap() {
        assert_eq!(format_of_b64(&d["b64_json"]), ImageFormat::Jpeg);
        let img = decode_b64(&d["b64_json"]);
        assert_eq!((img.width(), img.height()), (1536, 1024));
    }
    assert_eq!(body["output_format"], "jpeg");
}

#[tokio::test]
async fn invalid_values_are_refused_before_the_upstream() {
    let g = gateway(Setup::default()).await;
    let (status, headers, body) =
        g.generate(json!({"model": "gpt-image-1-mini", "prompt": "p", "size": "1254x836"})).await;
    assert_eq!(status, 400);
    assert!(headers.contains_key("x-request-id"));
    assert_error(&body, Some("size"), "invalid_value");
    assert!(body["error"]["message"].as_str().unwrap().contains("'1024x1536'"));
    assert!(g.fake.requests().is_empty());
}

#[tokio::test]
async fn models_aliases_and_unknown_models() {
    let g = gateway(Setup { extra_toml: "default_model = \"mini\"", ..Setup::default() }).await;
    let (status, _, body) = g.generate(json!({"model": "no-such-model", "prompt": "p"})).await;
    assert_eq!(status, 404);
    assert_error(&body, Some("model"), "model_not_found");

    let (status, _, body) = g.generate(json!({"model": "openai/gpt-image-1", "prompt": "p"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(g.fake.requests().last().unwrap().json.as_ref().unwrap()["model"], "gpt-image-1");

    // No model in the request: the configured default (an alias) is used.
    let (status, _, body) = g.generate(json!({"prompt": "p"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(g.fake.requests().last().unwrap().json.as_ref().unwrap()["model"], "gpt-image-1-mini");

    let list: Value = g.http.get(format!("{}/models", g.url)).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in ["gpt-image-1-mini", "openai/dall-e-3", "mini"] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    assert_eq!(list["object"], "list");
    let one: Value =
        g.http.get(format!("{}/models/openai/gpt-image-1", g.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(one["id"], "openai/gpt-image-1");
    assert_eq!(one["object"], "model");
}

#[tokio::test]
async fn dall_e_urls_and_revised_prompts_pass_through() {
    let g = gateway(Setup::default()).await;
    let (status, _, body) = g.generate(json!({"model": "dall-e-3", "prompt": "otter", "style": "natural"})).await;
    assert_eq!(status, 200, "{body}");
    let url = body["data"][0]["url"].as_str().unwrap();
    assert_eq!(body["data"][0]["revised_prompt"], "revised: otter");
    let bytes = g.http.get(url).send().await.unwrap().bytes().await.unwrap();
    assert!(image::load_from_memory(&bytes).is_ok());
    // As OpenAI's DALL-E responses: created and data only (no GPT-only fields, no invented quality).
    for field in ["quality", "size", "background", "output_format"] {
        assert!(body.get(field).is_none(), "{field}: {body}");
    }
}

#[tokio::test]
async fn settings_an_upstream_leaves_out_are_not_invented() {
    let g = gateway(Setup::default()).await;
    let body = json!({"model": "gpt-image-1-mini", "prompt": "otter [fault:bare]", "quality": "auto"});
    let (status, headers, body) = g.generate(body).await;
    assert_eq!(status, 200, "{body}");
    for field in ["quality", "size", "background", "output_format"] {
        assert!(body.get(field).is_none(), "{field}: {body}");
    }
    // The bill still assumes the worst of what it was not told (quality auto: high), and says so.
    assert!(headers.contains_key("x-imagegate-cost-usd"));
    let (_, _, told) = g.generate(json!({"model": "gpt-image-1-mini", "prompt": "otter", "quality": "low"})).await;
    assert_eq!(told["quality"], "low", "{told}");

    // A stream's events must carry the settings: what the request asked stands where the upstream said
    // nothing, and `auto` stays `auto` (not the 1024x1024 / high the bill assumes).
    let asked = json!({"model": "gpt-image-1", "prompt": "otter [fault:bare] [fault:no-usage]", "stream": true, "partial_images": 1,
        "quality": "auto", "size": "1024x1536", "output_format": "jpeg"});
    let text = g.post("images/generations").json(&asked).send().await.unwrap().text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.len(), 2, "{text}");
    for (_, data) in &events {
        assert_eq!(
            (&data["size"], &data["quality"], &data["background"], &data["output_format"]),
            (&json!("1024x1536"), &json!("auto"), &json!("auto"), &json!("jpeg")),
            "{data}"
        );
    }
    let cost = |events: &[(String, Value)]| events[1].1["imagegate"]["cost_usd"].as_str().unwrap().to_owned();
    let mut high = asked.clone();
    high["quality"] = json!("high");
    let text = g.post("images/generations").json(&high).send().await.unwrap().text().await.unwrap();
    let (auto, high) = (cost(&events), cost(&sse_events(&text)));
    assert_eq!(auto, high, "an unreported quality auto is billed as high");
}

#[tokio::test]
async fn edits_are_reencoded_upstream_faithfully() {
    let g = gateway(Setup::default()).await;
    let (a, b, mask) = (png(64, 48, false), png(32, 32, false), png(64, 48, true));
    let form = Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "add a hat")
        .text("input_fidelity", "high")
        .text("size", "1024x1536")
        .part("image[]", file(a.clone(), "first.png"))
        .part("image[]", file(b.clone(), "second.png"))
        .part("mask", file(mask.clone(), "mask.png"));
    let (status, body) = g.edit(form).await;
    assert_eq!(status, 200, "{body}");
    let img = decode_b64(&body["data"][0]["b64_json"]);
    assert_eq!((img.width(), img.height()), (1024, 1536));
    assert_eq!(body["usage"]["input_tokens_details"]["image_tokens"], 388);

    let sent = &g.fake.requests()[0];
    assert!(sent.content_type.as_deref().unwrap().starts_with("multipart/form-data"));
    let images: Vec<_> = sent.parts.iter().filter(|p| p.name == "image[]").collect();
    assert_eq!(images.len(), 2);
    assert_eq!((images[0].bytes.as_ref(), images[0].filename.as_deref()), (&a[..], Some("first.png")));
    assert_eq!((images[1].bytes.as_ref(), images[1].filename.as_deref()), (&b[..], Some("second.png")));
    assert_eq!(images[0].content_type.as_deref(), Some("image/png"));
    assert_eq!(sent.part("mask").unwrap().bytes.as_ref(), &mask[..]);
    for (name, value) in
        [("prompt", "add a hat"), ("model", "gpt-image-1"), ("input_fidelity", "high"), ("size", "1024x1536")]
    {
        assert_eq!(sent.part(name).unwrap().bytes.as_ref(), value.as_bytes(), "{name}");
    }
}

#[tokio::test]
async fn json_edits_with_data_urls() {
    let g = gateway(Setup::default()).await;
    let data_url =
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png(16, 16, false)));
    let r = g
        .post("images/edits")
        .json(&json!({"model": "gpt-image-1-mini", "prompt": "p", "images": [{"image_url": data_url}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent = &g.fake.requests()[0];
    assert_eq!(sent.part("image").unwrap().bytes.as_ref(), &png(16, 16, false)[..]);

    let r = g
        .post("images/edits")
        .json(&json!({"model": "gpt-image-1-mini", "prompt": "p", "images": [{"image_url": "https://example.com/a.png"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_error(&r.json().await.unwrap(), Some("images[0].image_url"), "invalid_value");
}

/// An image host on 127.0.0.1: `/a.png` (a 16x16 PNG), `/moved` (a redirect to it), `/big` (too large).
async fn image_host() -> String {
    let app = axum::Router::new()
        .route("/a.png", axum::routing::get(|| async { ([("content-type", "image/png")], png(16, 16, false)) }))
        .route("/moved", axum::routing::get(|| async { (axum::http::StatusCode::FOUND, [("location", "/a.png")], "") }))
        .route("/big", axum::routing::get(|| async { vec![0u8; 300_000] }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn image_urls_are_fetched_only_from_allowed_hosts_and_never_from_private_addresses() {
    let host = image_host().await;
    let edit = |g: &Gateway, url: String| {
        let body = json!({"model": "gpt-image-1-mini", "prompt": "p", "images": [{"image_url": url}]});
        let request = g.post("images/edits").json(&body);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let message = |body: &Value| body["error"]["message"].as_str().unwrap().to_owned();

    // Allowed (insecure: the host is on loopback), fetched and sent on as if uploaded.
    let toml: &'static str = Box::leak(
        "[remote_images]\nallow_hosts = [\"127.0.0.1\"]\nallow_insecure = true\nmax_bytes = 100000\n"
            .to_owned()
            .into_boxed_str(),
    );
    let g = gateway(Setup { extra_toml: toml, ..Setup::default() }).await;
    let (status, body) = edit(&g, format!("{host}/a.png")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(g.fake.requests()[0].part("image").unwrap().bytes.as_ref(), &png(16, 16, false)[..]);
    // Redirects are not followed; bodies past max_bytes are refused; other hosts are refused.
    for (url, says) in [
        (format!("{host}/moved"), "redirect"),
        (format!("{host}/big"), "larger than 100000 bytes"),
        ("http://localhost:1/a.png".to_owned(), "not a host this server fetches"),
        ("ftp://127.0.0.1/a.png".to_owned(), "expected a base64 data: URL"),
    ] {
        let (status, body) = edit(&g, url.clone()).await;
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(body["error"]["param"], "images[0].image_url", "{body}");
        assert!(message(&body).contains(says), "{url}: {body}");
    }
    assert_eq!(g.fake.requests().len(), 1);

    // The same host allowed without `allow_insecure`: http is refused, and so is a private address.
    let g = gateway(Setup {
        extra_toml: "[remote_images]\nallow_hosts = [\"127.0.0.1\", \"localhost\"]\n",
        ..Setup::default()
    })
    .await;
    let (status, body) = edit(&g, format!("{host}/a.png")).await;
    assert_eq!(status, 400);
    assert!(message(&body).contains("use https://"), "{body}");
    let (status, body) = edit(&g, "https://localhost:1/a.png".to_owned()).await;
    assert_eq!(status, 400);
    assert!(message(&body).contains("private or reserved address"), "{body}");
    // Without [remote_images], nothing is fetched and the message says how to send the image.
    let g = gateway(Setup::default()).await;
    let (status, body) = edit(&g, format!("{host}/a.png")).await;
    assert_eq!(status, 400);
    assert!(message(&body).contains("does not fetch image URLs"), "{body}");
}

#[tokio::test]
async fn bad_edit_inputs_are_named() {
    let g = gateway(Setup { max_image_pixels: Some(1_000_000), ..Setup::default() }).await;
    let base = || Form::new().text("model", "gpt-image-1").text("prompt", "p");

    // Not an image.
    let form = base()
        .part("image[]", file(png(8, 8, false), "a.png"))
        .part("image[]", file(b"GIF89a nonsense".to_vec(), "b.png"));
    let (status, body) = g.edit(form).await;
    assert_eq!(status, 400);
    assert_error(&body, Some("image[1]"), "invalid_image");

    // A truncated PNG: the header is fine, the data is not.
    let mut cut = png(64, 64, false);
    cut.truncate(cut.len() / 2);
    let (status, body) = g.edit(base().part("image", file(cut, "cut.png"))).await;
    assert_eq!(status, 400);
    assert_error(&body, Some("image"), "invalid_image");

    // Mask of the wrong size, and without alpha.
    let (status, body) = g
        .edit(base().part("image", file(png(8, 8, false), "a.png")).part("mask", file(png(9, 8, true), "m.png")))
        .await;
    assert_eq!(status, 400);
    assert_error(&body, Some("mask"), "invalid_image");
    let (status, body) = g
        .edit(base().part("image", file(png(8, 8, false), "a.png")).part("mask", file(png(8, 8, false), "m.png")))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("alpha"), "{body}");

    // More pixels than allowed: refused from the header, before decoding.
    let (status, body) = g.edit(base().part("image", file(png(1200, 1000, false), "big.png"))).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("1200000 pixels"), "{body}");

    // Seventeen images.
    let mut form = base();
    for i in 0..17 {
        form = form.part("image[]", file(png(4, 4, false), &format!("{i}.png")));
    }
    let (status, body) = g.edit(form).await;
    assert_eq!(status, 400);
    assert_error(&body, Some("image"), "invalid_value");

    // dall-e-2 wants one square PNG.
    let form = Form::new().text("model", "dall-e-2").text("prompt", "p").part("image", file(png(8, 4, false), "a.png"));
    let (status, body) = g.edit(form).await;
    assert_eq!(status, 400);
    assert_error(&body, Some("image"), "invalid_image");

    // No image at all.
    let (status, body) = g.edit(base()).await;
    assert_eq!(status, 400);
    assert_error(&body, Some("image"), "missing_required_parameter");
    assert!(g.fake.requests().is_empty(), "nothing bad reached the upstream");
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let g = gateway(Setup { max_body_bytes: Some(10_000), ..Setup::default() }).await;
    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "x".repeat(20_000)})).await;
    assert_eq!(status, 413);
    assert_error(&body, None, "payload_too_large");
    let form = Form::new().text("prompt", "p").part("image", file(vec![0u8; 20_000], "a.png"));
    let (status, body) = g.edit(form).await;
    assert_eq!(status, 413);
    assert_error(&body, None, "payload_too_large");
}

#[tokio::test]
async fn malformed_bodies_and_wrong_content_types() {
    let g = gateway(Setup::default()).await;
    let r = g.post("images/generations").header("content-type", "application/json").body("{nope").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_error(&r.json().await.unwrap(), None, "invalid_body");
    let r = g.post("images/generations").header("content-type", "application/json").body("[1]").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = g.post("images/edits").header("content-type", "text/plain").body("hi").send().await.unwrap();
    assert_eq!(r.status(), 415);
    assert_error(&r.json().await.unwrap(), None, "unsupported_media_type");
    let r = g
        .post("images/edits")
        .header("content-type", "multipart/form-data; boundary=X")
        .body("--X\r\nbroken")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = g.http.get(format!("{}/images/generations", g.url)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_error(&r.json().await.unwrap(), None, "method_not_allowed");
    let r = g.http.get(format!("{}/nothing/here", g.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_error(&r.json().await.unwrap(), None, "unknown_url");
}

#[tokio::test]
async fn transient_upstream_failures_are_retried() {
    let g =
        gateway(Setup { provider_toml: "api_key_env = \"FAKE_UPSTREAM_KEY\"\nmax_retries = 2", ..Setup::default() })
            .await;

    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "once [fault:500-once]"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(g.fake.count("once [fault:500-once]"), 2);

    let started = Instant::now();
    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "limited [fault:429-once]"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(g.fake.count("limited [fault:429-once]"), 2);
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After: 1 was honoured");

    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "down [fault:500-always]"})).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(g.fake.count("down [fault:500-always]"), 3, "one try and two retries");

    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "html [fault:502-html]"})).await;
    assert_eq!(status, 502);
    assert_error(&body, None, "upstream_error");
    assert_eq!(g.fake.count("html [fault:502-html]"), 3);

    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "dropped [fault:drop]"})).await;
    assert_eq!(status, 502);
    assert_error(&body, None, "upstream_unavailable");
    assert_eq!(g.fake.count("dropped [fault:drop]"), 3);
}

#[tokio::test]
async fn final_upstream_errors_pass_through_without_retry() {
    let g = gateway(Setup::default()).await;
    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "bad [fault:400]"})).await;
    assert_eq!(status, 400);
    assert_error(&body, Some("prompt"), "moderation_blocked");
    assert_eq!(body["error"]["type"], "image_generation_user_error");
    assert_eq!(g.fake.count("bad [fault:400]"), 1);

    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "junk [fault:malformed]"})).await;
    assert_eq!(status, 502);
    assert_error(&body, None, "upstream_invalid_response");
    assert_eq!(g.fake.count("junk [fault:malformed]"), 1);
}

#[tokio::test]
async fn slow_upstreams_time_out() {
    let g =
        gateway(Setup { provider_toml: "api_key_env = \"FAKE_UPSTREAM_KEY\"\ntimeout_secs = 1", ..Setup::default() })
            .await;
    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "zzz [fault:slow=3000]"})).await;
    assert_eq!(status, 504);
    assert_error(&body, None, "upstream_timeout");
    assert_eq!(g.fake.count("zzz [fault:slow=3000]"), 1, "a timeout is not retried");
}

#[tokio::test]
async fn upstream_credential_failures_are_the_servers_fault() {
    // No api_key_env: the upstream gets no key and answers 401.
    let g = gateway(Setup { provider_toml: "max_retries = 0", ..Setup::default() }).await;
    let (status, _, body) = g.generate(json!({"model": "mini", "prompt": "p"})).await;
    assert_eq!(status, 502);
    assert_error(&body, None, "upstream_auth_failed");
}

/// Parses an SSE body into (event name, data JSON) pairs.
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            Some((name?, serde_json::from_str(&data).ok()?))
        })
        .collect()
}

#[tokio::test]
async fn streams_are_forwarded_event_by_event() {
    let g = gateway(Setup::default()).await;
    let r = g
        .post("images/generations")
        .json(&json!({"model": "gpt-image-1", "prompt": "p", "stream": true, "partial_images": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut body = r.bytes_stream();
    let mut text = String::new();
    let mut first_event_at = None;
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        if first_event_at.is_none() && text.contains("\n\n") {
            first_event_at = Some(Instant::now());
        }
    }
    // The fake pauses 100 ms between events: the first one arrived long before the last.
    assert!(first_event_at.unwrap().elapsed() >= Duration::from_millis(150), "events were buffered");
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
        decode_b64(&data["b64_json"]);
    }
    assert_eq!(events[1].1["partial_image_index"], 1);
    assert!(events[2].1["usage"]["output_tokens"].as_u64().unwrap() > 0);
    let cost = &events[2].1["imagegate"];
    assert!(cost["cost_usd"].as_str().unwrap().parse::<pricing::Decimal>().unwrap() > pricing::Decimal::ZERO, "{cost}");
    assert!(events[0].1.get("imagegate").is_none(), "partial images carry no cost of their own");

    let form = Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "p")
        .text("stream", "true")
        .text("partial_images", "1")
        .part("image", file(png(8, 8, false), "a.png"));
    let text = g.post("images/edits").multipart(form).send().await.unwrap().text().await.unwrap();
    let names: Vec<String> = sse_events(&text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["image_edit.partial_image", "image_edit.completed"]);
}

#[tokio::test]
async fn a_stream_that_breaks_ends_with_an_error_event() {
    let g = gateway(Setup::default()).await;
    let r = g
        .post("images/generations")
        .json(&json!({"model": "gpt-image-1", "prompt": "cut [fault:drop-mid]", "stream": true, "partial_images": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.unwrap());
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "error");
    assert_eq!(last["type"], "error");
    assert_eq!(last["error"]["code"], "upstream_unavailable");
}

#[tokio::test]
async fn a_stream_that_ends_before_its_images_ends_with_an_error_event() {
    // The upstream answers a stream request with a truncated JSON body: no event at all. The client
    // hears why instead of a stream that ends with nothing.
    let g = gateway(Setup::default()).await;
    let r = g
        .post("images/generations")
        .json(&json!({"model": "gpt-image-1", "prompt": "cut [fault:malformed]", "stream": true, "n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.len(), 1, "{events:?}");
    let (name, error) = &events[0];
    assert_eq!(name, "error");
    assert_eq!(error["error"]["code"], "upstream_stream_incomplete", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("0 of 2"), "{error}");
}

#[tokio::test]
async fn keys_are_required_when_configured() {
    let g = gateway(Setup { keys: &["sk-client-1", "sk-client-2"], ..Setup::default() }).await;
    let body = json!({"model": "mini", "prompt": "p"});
    let url = format!("{}/images/generations", g.url);
    let r = g.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "invalid_request_error");
    let r = g.http.post(&url).bearer_auth("sk-client-3").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_error(&e, None, "invalid_api_key");
    assert!(!e["error"]["message"].as_str().unwrap().contains("sk-client-3"));
    let r = g.http.post(&url).bearer_auth("sk-client-2").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = g.http.get(format!("{}/models", g.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let health = g.url.replace("/v1", "/health");
    assert_eq!(g.http.get(health).send().await.unwrap().status(), 200);
    assert!(g.fake.requests().len() == 1);
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let mut g = gateway(Setup::default()).await;
    let request = g.post("images/generations").json(&json!({"model": "mini", "prompt": "p [fault:slow=500]"})).send();
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(200)).await;
    g.shutdown.take().unwrap().send(()).unwrap();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    tokio::time::timeout(Duration::from_secs(5), &mut g.server).await.unwrap().unwrap().unwrap();
}

#[test]
fn no_keys_means_loopback_only() {
    assert!(server::check_listen_address(&"127.0.0.1:8080".parse().unwrap(), true).is_ok());
    assert!(server::check_listen_address(&"[::1]:8080".parse().unwrap(), true).is_ok());
    let e = server::check_listen_address(&"0.0.0.0:8080".parse().unwrap(), true).unwrap_err();
    assert!(e.0.contains("imagegate keys create"), "{}", e.0);
    assert!(server::check_listen_address(&"0.0.0.0:8080".parse().unwrap(), false).is_ok());
    let _ = Config::from_toml("", &NoEnv).unwrap();
}

#[tokio::test]
async fn estimates_price_the_published_campaign_and_its_alternatives() {
    let g = gateway(Setup {
        provider_toml: "api_key_env = \"FAKE_UPSTREAM_KEY\"\ndiscount_percent = \"20\"",
        ..Setup::default()
    })
    .await;
    let campaign = json!({"requests": [{"model": "gpt-image-1-mini", "quality": "medium", "size": "1024x1024",
        "count": 100, "prompt_words": 30, "provider": "list price"}]});
    let r: Value = g.post("images/estimates").json(&campaign).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["total_usd"], "0.8528", "{r}");
    let item = &r["items"][0];
    assert_eq!(item["usage"]["text_input_tokens"], 4000);
    assert_eq!(item["usage"]["image_output_tokens"], 105_600);
    assert_eq!(item["per_image_view"]["per_image_total_usd"], "1.1");
    assert_eq!(item["per_image_view"]["naive_sum_usd"], "1.9528");
    let note = r["notes"][0].as_str().unwrap();
    assert!(note.contains("$1.948") && note.contains("twice") && note.contains("$0.8528"), "{note}");
    let totals: Vec<pricing::Decimal> = r["alternatives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["total_usd"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(totals.windows(2).all(|w| w[0] <= w[1]), "cheapest first: {totals:?}");
    // The served provider sells 20% off, and flex halves it: 0.8528 x 0.8 x 0.5.
    assert!(r["alternatives"].as_array().unwrap().iter().any(|a| a["provider"] == "openai"
        && a["model"] == "gpt-image-1-mini"
        && a["service_tier"] == "flex"
        && a["total_usd"] == "0.34112"));

    // Without a provider, the model's route here is used, with its discount.
    let routed = json!({"requests": [{"model": "mini", "quality": "medium", "size": "1024x1024", "count": 100, "prompt_words": 30}]});
    let r: Value = g.post("images/estimates").json(&routed).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["total_usd"], "0.68224", "{r}");
    assert_eq!(r["items"][0]["provider"], "openai");
    assert!(g.fake.requests().is_empty(), "an estimate spends nothing");

    for (body, param) in [
        (
            json!({"requests": [{"model": "gpt-image-1-mini", "prompt_words": 3, "quality": "hd"}]}),
            "requests[0].quality",
        ),
        (
            json!({"requests": [{"model": "gpt-image-1-mini", "prompt_words": 3, "size": "999x999"}]}),
            "requests[0].size",
        ),
        (json!({"requests": [{"model": "gpt-image-1-mini"}]}), "requests[0].prompt"),
        (json!({"requests": [{"model": "nope", "prompt_words": 3}]}), "requests[0].model"),
        (
            json!({"requests": [{"model": "mini", "prompt_words": 3, "service_tier": "gold"}]}),
            "requests[0].service_tier",
        ),
        (json!({"requests": [{"model": "mini", "prompt_words": 3, "count": 0}]}), "requests[0].count"),
        (json!({"requests": []}), "requests"),
        (json!({"plans": []}), "plans"),
    ] {
        let r = g.post("images/estimates").json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let e: Value = r.json().await.unwrap();
        assert!(status == 400 || status == 404, "{body}: {status}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
}

/// Issue 17: unbounded counts wrapped the estimate (a million requests of i64::MAX prompt tokens priced
/// two requests' worth) and any prompt was tokenized. Now they are refused, and the largest plan allowed
/// is priced exactly.
#[tokio::test]
async fn estimates_refuse_unbounded_inputs_and_price_the_largest_plan_exactly() {
    let g = gateway(Setup::default()).await;
    let mini = |fields: Value| {
        let mut item = json!({"model": "gpt-image-1-mini", "quality": "medium", "size": "1024x1024",
            "provider": "list price"});
        for (k, v) in fields.as_object().unwrap() {
            item[k] = v.clone();
        }
        json!({ "requests": [item] })
    };
    for (body, param, code) in [
        (
            mini(json!({"prompt_tokens": 9_223_372_036_854_775_807u64, "count": 1_000_000})),
            "requests[0].prompt_tokens",
            "integer_above_max_value",
        ),
        (
            mini(json!({"prompt_words": 9_223_372_036_854_775_807u64})),
            "requests[0].prompt_words",
            "integer_above_max_value",
        ),
        (mini(json!({"prompt": "a".repeat(2_000_000)})), "requests[0].prompt", "string_above_max_length"),
        (mini(json!({"prompt_words": 3, "count": 1_000_001})), "requests[0].count", "integer_above_max_value"),
    ] {
        let r = g.post("images/estimates").json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{param}");
        let e: Value = r.json().await.unwrap();
        assert_eq!((e["error"]["param"].as_str(), e["error"]["code"].as_str()), (Some(param), Some(code)), "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }

    // The largest allowed: a million requests of 128,000 prompt tokens, or of the 96,000 words that count
    // as many. One request is 128,000 x $2/M + 1056 x $8/M = $0.264448.
    for prompt in [json!({"prompt_tokens": 128_000}), json!({"prompt_words": 96_000})] {
        let mut fields = prompt.clone();
        fields["count"] = json!(1_000_000);
        let r = g.post("images/estimates").json(&mini(fields)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{prompt}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["total_usd"], "264448", "{prompt}: {v}");
        assert_eq!(v["items"][0]["usage"]["text_input_tokens"], 128_000_000_000u64);
    }
    assert!(g.fake.requests().is_empty(), "an estimate spends nothing");
}

/// An upstream that signs its images (as OpenAI signs every gpt-image output): the gateway hands them
/// on with the upstream's manifest intact and adds none of its own, streamed or not.
#[tokio::test]
async fn upstream_images_keep_the_upstream_content_credentials() {
    use provenance::MediaType;
    let g = gateway(Setup::default()).await;
    let identity = provenance::Identity::generate("Upstream Images Inc").unwrap();
    let signer = provenance::Signer::new(&identity, ("fake-openai", "1.0")).unwrap();
    g.fake.state().sign_images(std::sync::Arc::new(signer));
    let root = identity.root_pem().unwrap();
    let check = |v: &Value, media: MediaType| {
        let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
        let found = provenance::verify(&bytes, media, Some(&root)).unwrap().expect("the upstream's manifest is gone");
        // Valid: the bytes are the ones the upstream signed (its hashes cover all but the manifest).
        assert!(found.valid, "{media:?}: {:?}", found.failures);
        assert_eq!(found.trust, provenance::Trust::Trusted, "signed by the upstream's identity");
        assert_eq!(found.report["manifests"].as_object().unwrap().len(), 1, "no manifest added to it");
        let generator = &found.active_manifest().unwrap()["claim_generator_info"][0]["name"];
        assert_eq!(generator, "fake-openai");
    };
    for (format, media) in [("png", MediaType::Png), ("jpeg", MediaType::Jpeg), ("webp", MediaType::Webp)] {
        let (status, _, body) = g
            .generate(json!({"model": "gpt-image-1", "prompt": "p", "size": "1024x1024", "output_format": format}))
            .await;
        assert_eq!(status, 200, "{body}");
        check(&body["data"][0]["b64_json"], media);
    }
    let r = g
        .post("images/generations")
        .json(&json!({"model": "gpt-image-1", "prompt": "p", "size": "1024x1024", "stream": true, "partial_images": 1}))
        .send()
        .await
        .unwrap();
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.len(), 2);
    for (_, data) in &events {
        check(&data["b64_json"], MediaType::Png);
    }
}
