//! Local models through the OpenAI HTTP API: tiny checkpoints with random weights, written by the test in
//! the diffusers layout, loaded by the real loader and served by `imagegate`'s server on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Cursor;
use std::time::Duration;

use base64::Engine as _;
use engine::testing::{TinyDecoderSpec, TinySpec, write_checkpoint};
use image::{DynamicImage, ImageFormat, Rgba, RgbaImage};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use server::config::{Config, Env};

/// No environment but a data dir of the test's own (where the server keeps its signing identity).
struct NoEnv(tempfile::TempDir);
impl NoEnv {
    fn new() -> NoEnv {
        NoEnv(tempfile::tempdir().unwrap())
    }
}
impl Env for NoEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "IMAGEGATE_DATA_DIR").then(|| self.0.path().to_string_lossy().into_owned())
    }
}

struct Local {
    url: String,
    http: reqwest::Client,
    /// The API key requests carry, when the server has a ledger.
    key: Option<String>,
    _dirs: Vec<tempfile::TempDir>,
}

/// A server with the tiny model `tiny` (and `tiny-inpaint`, a 9-channel one), `extra` appended to the
/// config.
async fn serve(extra: &str) -> Local {
    let plain = tempfile::tempdir().unwrap();
    write_checkpoint(plain.path(), &TinySpec::default()).unwrap();
    let inpaint = tempfile::tempdir().unwrap();
    write_checkpoint(inpaint.path(), &TinySpec { in_channels: 9, ..TinySpec::default() }).unwrap();
    let toml = format!(
        "[models.tiny]\npath = {:?}\nprofile = \"turbo\"\n[models.tiny-inpaint]\npath = {:?}\n[aliases]\n\"gpt-image-1-mini\" = \"tiny\"\n{extra}",
        plain.path().to_str().unwrap(),
        inpaint.path().to_str().unwrap(),
    );
    start(&toml, vec![plain, inpaint]).await
}

async fn start(toml: &str, mut dirs: Vec<tempfile::TempDir>) -> Local {
    // The data dir lives as long as the server: its signing identity and checkpoint digests go there.
    let env = NoEnv::new();
    let config = Config::from_toml(toml, &env).unwrap();
    let state = server::AppState::from_config(&config).unwrap();
    dirs.push(env.0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));
    Local { url: format!("http://{addr}/v1"), http: reqwest::Client::new(), key: None, _dirs: dirs }
}

/// [`serve`] with keys, budgets and the ledger on `db`; requests carry a key with a $1 budget.
async fn serve_with_ledger(db: &ledger::testing::TestDatabase) -> (Local, ledger::Ledger) {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
    let toml = format!("[models.tiny]\npath = {:?}\nprofile = \"turbo\"\n", dir.path().to_str().unwrap());
    let env = NoEnv::new();
    let config = Config::from_toml(&toml, &env).unwrap();
    let ledger = ledger::Ledger::connect(&db.url).await.unwrap();
    let budget = ledger::Budget::capped(ledger::Period::Total, rust_decimal::Decimal::ONE);
    let key =
        ledger.create_key(ledger::NewKey { budget: Some(budget), ..ledger::NewKey::user("local") }).await.unwrap();
    let state = server::AppState::from_config(&config).unwrap().with_ledger(ledger.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));
    let local = Local {
        url: format!("http://{addr}/v1"),
        http: reqwest::Client::new(),
        key: Some(key.secret),
        _dirs: vec![dir, env.0],
    };
    (local, ledger)
}

impl Local {
    async fn generate(&self, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self.post("generations").json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap())
    }
}

impl Local {
    /// A streamed generation's events, whole.
    async fn stream_events(&self, body: Value) -> Vec<Value> {
        let r = self.post("generations").json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(|d| serde_json::from_str(d.trim()).unwrap())
            .collect()
    }

    fn post(&self, endpoint: &str) -> reqwest::RequestBuilder {
        let r = self.http.post(format!("{}/images/{endpoint}", self.url));
        match &self.key {
            Some(key) => r.bearer_auth(key),
            None => r,
        }
    }

    /// Starts a streamed job of `steps` steps with three partial images, and returns once the first
    /// partial image has arrived: the job is running on the engine then.
    async fn running_stream(&self, steps: u32) -> reqwest::Response {
        let mut r = self
            .post("generations")
            .json(&json!({"model": "tiny", "prompt": "otter", "size": "64x64", "steps": steps, "stream": true, "partial_images": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let mut seen = String::new();
        while !seen.contains("partial_image") {
            let chunk = r.chunk().await.unwrap().expect("the stream ended before its first partial image");
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        r
    }
}

/// The local models' price per CPU hour, from the built-in catalog.
fn cpu_price() -> rust_decimal::Decimal {
    pricing::Catalog::builtin().unwrap().local.cpu_usd_per_hour.0
}

/// The compute line of a billed body: the milliseconds it reports and its amount.
fn compute_line(body: &Value) -> (u64, rust_decimal::Decimal) {
    let line = &body["imagegate"]["lines"][0];
    let item = line["item"].as_str().unwrap();
    let ms = item.strip_prefix("compute time, ").and_then(|r| r.strip_suffix(" ms")).unwrap().parse().unwrap();
    (ms, line["amount_usd"].as_str().unwrap().parse().unwrap())
}

fn header_cost(headers: &reqwest::header::HeaderMap) -> rust_decimal::Decimal {
    headers["x-imagegate-cost-usd"].to_str().unwrap().parse().unwrap()
}

fn image_bytes(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap()
}

fn decode(v: &Value) -> DynamicImage {
    image::load_from_memory(&image_bytes(v)).unwrap()
}

#[tokio::test]
async fn a_generation_has_the_requested_size_format_usage_and_cost() {
    let s = serve("").await;
    for (format, expect) in [("png", ImageFormat::Png), ("jpeg", ImageFormat::Jpeg), ("webp", ImageFormat::WebP)] {
        let (status, headers, body) = s
            .generate(json!({"model": "tiny", "prompt": "a cute baby sea otter", "size": "96x64", "output_format": format, "seed": 1}))
            .await;
        assert_eq!(status, 200, "{body}");
        let bytes = image_bytes(&body["data"][0]["b64_json"]);
        assert_eq!(image::guess_format(&bytes).unwrap(), expect);
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (96, 64));
        assert_eq!(body["size"], "96x64");
        assert_eq!(body["quality"], "medium");
        assert_eq!(body["background"], "opaque");
        assert_eq!(body["output_format"], format);
        // Usage on the GPT image scale: 1056 medium tokens per 1024x1024, by area, rounded up.
        assert_eq!(body["usage"]["output_tokens"], json!((1056u64 * 96 * 64).div_ceil(1024 * 1024)));
        assert!(body["usage"]["input_tokens_details"]["text_tokens"].as_u64().unwrap() > 0);
        // Billed by measured compute time: the catalog's CPU price times the time the line reports,
        // never free.
        assert_eq!(body["imagegate"]["billing_basis"], "compute", "{}", body["imagegate"]);
        let (ms, amount) = compute_line(&body);
        assert!(ms > 0, "a generation takes time");
        assert_eq!(amount, pricing::compute_cost(cpu_price(), ms).unwrap());
        assert_eq!(header_cost(&headers), amount);
        assert!(headers.contains_key("x-request-id"));
    }
    // Compression really changes the size of lossy formats.
    let sized = |c: u8| {
        let s = &s;
        async move {
            let (_, _, b) = s
                .generate(json!({"model": "tiny", "prompt": "a red cat", "size": "128x128", "output_format": "jpeg", "output_compression": c, "seed": 3}))
                .await;
            image_bytes(&b["data"][0]["b64_json"]).len()
        }
    };
    assert!(sized(10).await < sized(95).await);
}

#[tokio::test]
async fn the_seed_reproduces_pixels_and_n_images_come_back() {
    let s = serve("").await;
    let body = |seed: u64| json!({"model": "tiny", "prompt": "a cute baby sea otter", "size": "64x64", "seed": seed});
    let pixels = |v: &Value| decode(&v["data"][0]["b64_json"]).to_rgb8();
    let (_, _, a) = s.generate(body(7)).await;
    let (_, _, b) = s.generate(body(7)).await;
    let (_, _, c) = s.generate(body(8)).await;
    // The pixels, not the bytes: each image's manifest is its own (its ids, its signature).
    assert_eq!(pixels(&a), pixels(&b), "same seed, same image");
    assert_ne!(pixels(&a), pixels(&c), "another seed, another image");

    let (status, _, three) =
        s.generate(json!({"model": "tiny", "prompt": "otter", "size": "64x64", "n": 3, "seed": 1})).await;
    assert_eq!(status, 200, "{three}");
    let data = three["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_ne!(data[0]["b64_json"], data[1]["b64_json"]);
    // The alias points an OpenAI model name at the local model.
    let (status, _, aliased) = s
        .generate(json!({"model": "gpt-image-1-mini", "prompt": "a cute baby sea otter", "size": "64x64", "seed": 7}))
        .await;
    assert_eq!(status, 200, "{aliased}");
    assert_eq!(pixels(&aliased), pixels(&a));
}

#[tokio::test]
async fn an_sdxl_checkpoint_serves_with_its_native_size_and_seeds() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec { sdxl: true, ..TinySpec::default() }).unwrap();
    let toml = format!("[models.tiny-xl]\npath = {:?}\nprofile = \"turbo\"\n", dir.path().to_str().unwrap());
    let s = start(&toml, vec![dir]).await;
    let body = |seed: u64| json!({"model": "tiny-xl", "prompt": "a cute baby sea otter", "seed": seed});
    let (status, _, a) = s.generate(body(5)).await;
    assert_eq!(status, 200, "{a}");
    // `auto` is the native size: sample_size 32 latents x the tiny VAE's factor 2.
    assert_eq!(a["size"], "64x64");
    let img = decode(&a["data"][0]["b64_json"]);
    assert_eq!((img.width(), img.height()), (64, 64));
    let (_, _, again) = s.generate(body(5)).await;
    let (_, _, other) = s.generate(body(6)).await;
    let pixels = |v: &Value| decode(&v["data"][0]["b64_json"]).to_rgb8();
    assert_eq!(pixels(&a), pixels(&again));
    assert_ne!(pixels(&a), pixels(&other));
}

#[tokio::test]
async fn invalid_sizes_and_options_get_clear_errors_and_never_panic() {
    let s = serve("").await;
    for size in ["65x64", "4096x4096", "8x8", "abc", "0x64", "64x"] {
        let (status, _, body) = s.generate(json!({"model": "tiny", "prompt": "otter", "size": size})).await;
        assert_eq!(status, 400, "{size}: {body}");
        assert_eq!(body["error"]["param"], "size", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(size), "{body}");
    }
    let (status, _, body) = s.generate(json!({"model": "tiny", "prompt": "otter", "background": "transparent"})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "background");
    let (status, _, body) = s.generate(json!({"model": "tiny", "prompt": "otter", "steps": 0})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("steps")));
    // The server still serves after all that.
    let (status, _, _) = s.generate(json!({"model": "tiny", "prompt": "otter", "size": "64x64", "steps": 1})).await;
    assert_eq!(status, 200);
}

fn png(img: &RgbaImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn inpainting_over_http_keeps_every_unmasked_pixel() {
    let s = serve("").await;
    let input = RgbaImage::from_fn(64, 64, |x, y| Rgba([(x * 4) as u8, (y * 4) as u8, 100, 255]));
    // Transparent (edited) square in the middle, opaque (kept) elsewhere.
    let mask = RgbaImage::from_fn(64, 64, |x, y| {
        let inside = (16..48).contains(&x) && (16..48).contains(&y);
        Rgba([0, 0, 0, if inside { 0 } else { 255 }])
    });
    for model in ["tiny", "tiny-inpaint"] {
        let form = Form::new()
            .text("model", model)
            .text("prompt", "a red cat")
            .text("seed", "5")
            .part("image", Part::bytes(png(&input)).file_name("in.png").mime_str("image/png").unwrap())
            .part("mask", Part::bytes(png(&mask)).file_name("mask.png").mime_str("image/png").unwrap());
        let r = s.http.post(format!("{}/images/edits", s.url)).multipart(form).send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{model}: {body}");
        let out = decode(&body["data"][0]["b64_json"]).to_rgba8();
        assert_eq!(out.dimensions(), (64, 64), "auto size is the input's");
        let mut repainted = false;
        for (x, y, m) in mask.enumerate_pixels() {
            if m.0[3] == 255 {
                assert_eq!(out.get_pixel(x, y), input.get_pixel(x, y), "{model}: kept pixel {x},{y} changed");
            } else if out.get_pixel(x, y) != input.get_pixel(x, y) {
                repainted = true;
            }
        }
        assert!(repainted, "{model}: nothing repainted");
    }
    // Without a mask, image-to-image: the input matters, and reference images are accepted.
    let form = Form::new()
        .text("model", "tiny")
        .text("prompt", "a photo")
        .part("image[]", Part::bytes(png(&input)).file_name("a.png").mime_str("image/png").unwrap())
        .part("image[]", Part::bytes(png(&mask)).file_name("b.png").mime_str("image/png").unwrap());
    let r = s.http.post(format!("{}/images/edits", s.url)).multipart(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn variations_of_a_local_model_are_seeded_images_like_the_input() {
    let s = serve("").await;
    let input = RgbaImage::from_fn(64, 64, |x, y| Rgba([(x * 4) as u8, (y * 4) as u8, 100, 255]));
    let vary = |seed: &'static str, image: RgbaImage| {
        let form = Form::new()
            .text("model", "tiny")
            .text("n", "2")
            .text("seed", seed)
            .text("response_format", "b64_json")
            .part("image", Part::bytes(png(&image)).file_name("in.png").mime_str("image/png").unwrap());
        let url = format!("{}/images/variations", s.url);
        let http = s.http.clone();
        async move {
            let r = http.post(url).multipart(form).send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            assert_eq!(status, 200, "{body}");
            body["data"].as_array().unwrap().iter().map(|d| decode(&d["b64_json"]).to_rgb8()).collect::<Vec<_>>()
        }
    };
    let a = vary("3", input.clone()).await;
    assert_eq!(a.len(), 2);
    assert_eq!(a[0].dimensions(), (64, 64), "auto size is the input's");
    assert_ne!(a[0], a[1], "each image of n has its own seed");
    assert_eq!(a, vary("3", input.clone()).await, "the seed decides the pixels");
    // The input decides what they are like.
    let other = RgbaImage::from_fn(64, 64, |_, _| Rgba([10, 200, 10, 255]));
    assert_ne!(a[0], vary("3", other).await[0]);
    // A variation has no prompt, and only dall-e-2 and local models make them.
    let form = Form::new()
        .text("model", "tiny")
        .text("prompt", "x")
        .part("image", Part::bytes(png(&input)).file_name("in.png").mime_str("image/png").unwrap());
    let r = s.http.post(format!("{}/images/variations", s.url)).multipart(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "prompt");
}

#[tokio::test]
async fn streaming_sends_partial_images_from_intermediate_steps_then_the_image() {
    let s = serve("").await;
    let events = s
        .stream_events(json!({"model": "tiny", "prompt": "otter", "size": "64x64", "stream": true, "partial_images": 2, "steps": 4, "seed": 2}))
        .await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap_or("?")).collect();
    assert_eq!(
        kinds,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"],
        "{events:?}"
    );
    assert_eq!(events[1]["partial_image_index"], 1);
    assert_eq!(decode(&events[0]["b64_json"]).width(), 64);
    assert!(events[2]["usage"]["output_tokens"].as_u64().unwrap() > 0);

    // With n = 2 each image has its partial images (not only the first), so the partial-image tokens
    // counted on each completed image were streamed.
    let events = s.stream_events(json!({"model": "tiny", "prompt": "otter", "size": "64x64", "stream": true, "partial_images": 2, "steps": 4, "seed": 2, "n": 2})).await;
    let kinds: Vec<String> = events.iter().map(|e| e["type"].as_str().unwrap_or("?").to_owned()).collect();
    let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count();
    assert_eq!(count("image_generation.partial_image"), 4, "{kinds:?}");
    assert_eq!(count("image_generation.completed"), 2, "{kinds:?}");
}

/// The Content Credentials of a local image, validated by the C2PA SDK's reader.
fn credentials(v: &Value, media: provenance::MediaType) -> provenance::Verification {
    let bytes = image_bytes(v);
    let found = provenance::verify(&bytes, media, None).unwrap().expect("a local image without a C2PA manifest");
    assert!(found.valid, "{:?}", found.failures);
    found
}

fn generation(v: &provenance::Verification) -> &Value {
    v.assertion(provenance::GENERATION_ASSERTION).expect("no org.imagegate.generation assertion")
}

fn action_names(v: &provenance::Verification) -> Vec<String> {
    v.actions().iter().map(|a| a["action"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn every_local_image_carries_content_credentials_naming_its_model() {
    use provenance::MediaType;
    let s = serve("").await;
    let digest = provenance::digest(s._dirs[0].path()).unwrap();
    let data_dir = s._dirs.last().unwrap().path();
    for (format, media) in [("png", MediaType::Png), ("jpeg", MediaType::Jpeg), ("webp", MediaType::Webp)] {
        // Asked for by an OpenAI name: the manifest names the model that ran.
        let (status, _, body) = s
            .generate(json!({"model": "gpt-image-1-mini", "prompt": "a private prompt", "size": "64x64", "output_format": format, "n": 2}))
            .await;
        assert_eq!(status, 200, "{body}");
        for d in body["data"].as_array().unwrap() {
            let v = credentials(&d["b64_json"], media);
            assert_eq!(action_names(&v), ["c2pa.created"]);
            assert!(v.actions()[0]["digitalSourceType"].as_str().unwrap().ends_with("/trainedAlgorithmicMedia"));
            let g = generation(&v);
            assert_eq!(g["model"], "tiny", "the model that ran, not the name asked for");
            assert_eq!(g["checkpoint"]["files_sha256"], digest.as_str(), "the weights that ran");
            assert!(g.get("prompt").is_none(), "prompts stay out of manifests unless configured");
            assert_eq!(v.active_manifest().unwrap()["claim_generator_info"][0]["name"], "imagegate");
        }
    }
    // The digest is remembered in the data dir, so the next start reads no weights for it.
    let cache = std::fs::read_to_string(data_dir.join("provenance").join(provenance::DIGEST_CACHE)).unwrap();
    assert!(cache.contains(&digest), "{cache}");

    // An edit with a mask: the input is the parent, the mask an input, the result a composite.
    let input = RgbaImage::from_fn(64, 64, |x, y| Rgba([(x * 4) as u8, (y * 4) as u8, 100, 255]));
    let mask = RgbaImage::from_fn(64, 64, |x, _| Rgba([0, 0, 0, if x < 32 { 0 } else { 255 }]));
    let form = Form::new()
        .text("model", "tiny")
        .text("prompt", "a red cat")
        .text("output_format", "jpeg")
        .part("image", Part::bytes(png(&input)).file_name("in.png").mime_str("image/png").unwrap())
        .part("mask", Part::bytes(png(&mask)).file_name("mask.png").mime_str("image/png").unwrap());
    let r = s.http.post(format!("{}/images/edits", s.url)).multipart(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    let v = credentials(&body["data"][0]["b64_json"], MediaType::Jpeg);
    assert_eq!(action_names(&v), ["c2pa.opened", "c2pa.edited"]);
    assert!(v.actions()[1]["digitalSourceType"].as_str().unwrap().ends_with("/compositeWithTrainedAlgorithmicMedia"));
    let ingredients = v.active_manifest().unwrap()["ingredients"].as_array().unwrap().clone();
    let relations: Vec<_> = ingredients.iter().map(|i| i["relationship"].as_str().unwrap()).collect();
    assert_eq!(relations, ["parentOf", "inputTo"]);
    assert_eq!(ingredients[0]["format"], "image/png");

    // A stream: every partial image and the final one are signed, the partials saying so.
    let events = s.stream_events(json!({"model": "tiny", "prompt": "otter", "size": "64x64", "stream": true, "partial_images": 2, "steps": 4, "output_format": "webp"})).await;
    assert_eq!(events.len(), 3, "{events:?}");
    for (i, e) in events.iter().enumerate() {
        let v = credentials(&e["b64_json"], MediaType::Webp);
        let partial = generation(&v).get("partial_image").cloned();
        if i < 2 {
            assert_eq!(partial, Some(json!(i)), "partial image {i}");
        } else {
            assert_eq!(e["type"], "image_generation.completed");
            assert_eq!(partial, None, "the completed image is no preview");
        }
    }
}

#[tokio::test]
async fn provenance_is_configured_per_server_and_per_model() {
    let model = tempfile::tempdir().unwrap();
    write_checkpoint(model.path(), &TinySpec::default()).unwrap();
    let m = model.path().to_str().unwrap();
    let first = |body: &Value| image_bytes(&body["data"][0]["b64_json"]);
    let request = json!({"model": "tiny", "prompt": "a lighthouse", "size": "64x64"});

    // Off for one model.
    let toml = format!(
        r#"[models.tiny]
path = {m:?}
profile = "turbo"
provenance = false
[models.signed]
path = {m:?}
profile = "turbo"
"#
    );
    let s = start(&toml, Vec::new()).await;
    let (_, _, body) = s.generate(request.clone()).await;
    assert!(provenance::verify(&first(&body), provenance::MediaType::Png, None).unwrap().is_none());
    let (_, _, body) = s.generate(json!({"model": "signed", "prompt": "a lighthouse", "size": "64x64"})).await;
    assert!(provenance::verify(&first(&body), provenance::MediaType::Png, None).unwrap().is_some());

    // Off for the server.
    let toml = format!(
        r#"[models.tiny]
path = {m:?}
profile = "turbo"
[provenance]
enabled = false
"#
    );
    let s = start(&toml, Vec::new()).await;
    let (_, _, body) = s.generate(request.clone()).await;
    assert!(provenance::verify(&first(&body), provenance::MediaType::Png, None).unwrap().is_none());

    // A configured certificate chain (made here as an operator's would be) signs, with the prompt
    // when asked to.
    let certs = tempfile::tempdir().unwrap();
    let (chain, key, root) = operator_chain(certs.path());
    let toml = format!(
        r#"[models.tiny]
path = {m:?}
profile = "turbo"
[provenance]
cert_chain = {:?}
private_key = {:?}
include_prompt = true
"#,
        chain.to_str().unwrap(),
        key.to_str().unwrap()
    );
    let s = start(&toml, Vec::new()).await;
    let (_, _, body) = s.generate(request.clone()).await;
    let v = provenance::verify(&first(&body), provenance::MediaType::Png, Some(&root)).unwrap().unwrap();
    assert!(v.valid, "{:?}", v.failures);
    assert_eq!(v.trust, provenance::Trust::Trusted, "it chains to the operator's root");
    assert_eq!(v.active_manifest().unwrap()["signature_info"]["common_name"], "Example Images Signer");
    assert_eq!(generation(&v)["prompt"], "a lighthouse");

    // Half a pair is refused at start, naming both keys.
    let toml = format!(
        r#"[models.tiny]
path = {m:?}
[provenance]
cert_chain = {:?}
"#,
        chain.to_str().unwrap()
    );
    let e = Config::from_toml(&toml, &NoEnv::new()).err().unwrap().to_string();
    assert!(e.contains("cert_chain") && e.contains("private_key"), "{e}");
    // A remote signer needs the chain and the key's algorithm, and is not a second key.
    let c = chain.to_str().unwrap();
    let remote = |extra: &str| {
        let toml = format!(
            "[models.tiny]\npath = {m:?}\n[provenance]\nremote_signer_url = \"https://signer.example/c2pa\"\n{extra}"
        );
        Config::from_toml(&toml, &NoEnv::new()).err().map(|e| e.to_string())
    };
    let e = remote(&format!("cert_chain = {c:?}\n")).unwrap();
    assert!(e.contains("remote_signer_url") && e.contains("algorithm"), "{e}");
    let e = remote(&format!("cert_chain = {c:?}\nalgorithm = \"es256\"\nprivate_key = {c:?}\n")).unwrap();
    assert!(e.contains("not both"), "{e}");
    assert!(remote(&format!("cert_chain = {c:?}\nalgorithm = \"es256\"\n")).is_none());
    // A key that is no key is refused at start, naming it.
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    let toml = format!(
        r#"[models.tiny]
path = {m:?}
[provenance]
cert_chain = {:?}
private_key = {:?}
"#,
        chain.to_str().unwrap(),
        key.to_str().unwrap()
    );
    let e = server::AppState::from_config(&Config::from_toml(&toml, &NoEnv::new()).unwrap()).err().unwrap().to_string();
    assert!(e.contains("provenance") && e.contains("private_key"), "{e}");
}

/// A chain an operator would bring, written to `dir`: (chain file, key file, the root as PEM).
fn operator_chain(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let issued = provenance::testing::issued_chain(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        "Example Images Signer",
        Some("Example Corp"),
        false,
    )
    .unwrap();
    let (chain, key_file) = (dir.join("chain.pem"), dir.join("key.pem"));
    std::fs::write(&chain, issued.chain_pem).unwrap();
    std::fs::write(&key_file, issued.key_pem).unwrap();
    (chain, key_file, issued.root_pem)
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = serve("[engine]\nqueue_capacity = 1\n").await;
    // A job is surely running once its first partial image arrives.
    let slow = s.running_stream(25).await;
    let (status, headers, body) = s.generate(json!({"model": "tiny", "prompt": "otter", "size": "64x64"})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "engine_busy");
    assert!(headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let rest = slow.text().await.unwrap();
    assert!(rest.contains("image_generation.completed"), "{rest}");
    // Once the queue drains, requests are served again.
    let (status, _, _) = s.generate(json!({"model": "tiny", "prompt": "otter", "size": "64x64", "steps": 1})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn broken_checkpoints_give_clear_errors() {
    // A missing weight file is refused at start, naming it.
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
    std::fs::remove_file(dir.path().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let toml = format!("[models.tiny]\npath = {:?}\n", dir.path().to_str().unwrap());
    let env = NoEnv::new();
    let config = Config::from_toml(&toml, &env).unwrap();
    let msg = server::AppState::from_config(&config).err().unwrap().to_string();
    assert!(msg.contains("vae") && msg.contains("missing file"), "{msg}");

    // A tensor of the wrong shape is found when the model loads: the client hears that it failed, the
    // log what and where (no server path reaches the client).
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
    engine::testing::replace_tensor(&dir.path().join("unet/diffusion_pytorch_model.safetensors"), "conv_out.weight")
        .unwrap();
    let toml = format!("[models.tiny]\npath = {:?}\n", dir.path().to_str().unwrap());
    let s = start(&toml, vec![dir]).await;
    let (status, _, body) = s.generate(json!({"model": "tiny", "prompt": "otter", "size": "64x64"})).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "model_load_failed");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("'tiny' could not be loaded") && msg.contains("server log"), "{msg}");
    assert!(!msg.contains('/') && !msg.contains("conv_out"), "{msg}");

    // A built-in model that was never pulled: the error says how to get it.
    let toml = "[models.sd-turbo]\n";
    let err = Config::from_toml(toml, &DataDirEnv(tempfile::tempdir().unwrap())).err().unwrap().to_string();
    assert!(err.contains("imagegate models pull sd-turbo"), "{err}");
}

struct DataDirEnv(tempfile::TempDir);
impl Env for DataDirEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "IMAGEGATE_DATA_DIR").then(|| self.0.path().to_string_lossy().into_owned())
    }
}

#[tokio::test]
async fn a_client_that_goes_away_frees_the_engine() {
    let s = serve("[engine]\nqueue_capacity = 1\n").await;
    let slow = s.running_stream(150).await;
    // The slow job holds the only slot.
    let (status, _, _) = s.generate(json!({"model": "tiny", "prompt": "otter", "size": "64x64", "steps": 1})).await;
    assert_eq!(status, 429);
    // The client hangs up: the run stops at its next step and the slot frees long before 150 steps.
    drop(slow);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) =
            s.generate(json!({"model": "tiny", "prompt": "otter", "size": "64x64", "steps": 1})).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(std::time::Instant::now() < deadline, "the abandoned run still holds the engine");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Installs the test tiny decoder as `imagegate models pull taesd` would: hub-cache layout under
/// `data_dir/models`.
fn install_taesd(data_dir: &std::path::Path) {
    let repo = data_dir.join("models/models--madebyollin--taesd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    engine::testing::write_tiny_decoder(&repo.join("snapshots/abc123"), &TinyDecoderSpec::default()).unwrap();
}

#[tokio::test]
async fn quality_low_and_the_decoder_field_pick_the_tiny_decoder_when_there_is_one() {
    let model = tempfile::tempdir().unwrap();
    write_checkpoint(model.path(), &TinySpec::default()).unwrap();
    let tiny = tempfile::tempdir().unwrap();
    engine::testing::write_tiny_decoder(tiny.path(), &TinyDecoderSpec::default()).unwrap();
    let data = tempfile::tempdir().unwrap();
    install_taesd(data.path());
    // `tiny`: its own tiny decoder; `plain`: none (nothing installed where NoEnv points); `found`: the
    // pulled taesd of the data dir.
    let (m, t) = (model.path().to_str().unwrap(), tiny.path().to_str().unwrap());
    let toml = format!(
        "[models.tiny]\npath = {m:?}\nprofile = \"turbo\"\ntiny_decoder = {t:?}\n[models.plain]\npath = {m:?}\nprofile = \"turbo\"\n"
    );
    let s = start(&toml, vec![]).await;
    let env = DataDirEnv(data);
    let found = Config::from_toml(&format!("[models.found]\npath = {m:?}\nprofile = \"turbo\"\n"), &env).unwrap();
    let state = server::AppState::from_config(&found).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let found_url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));
    let found = Local { url: found_url, http: reqwest::Client::new(), key: None, _dirs: vec![] };

    let body = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "prompt": "otter", "size": "64x64", "steps": 2, "seed": 3});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let image = |r: &(u16, reqwest::header::HeaderMap, Value)| {
        assert_eq!(r.0, 200, "{}", r.2);
        decode(&r.2["data"][0]["b64_json"]).to_rgb8()
    };
    let low = image(&s.generate(body("tiny", json!({"quality": "low"}))).await);
    let low_full = image(&s.generate(body("tiny", json!({"quality": "low", "decoder": "full"}))).await);
    let medium = image(&s.generate(body("tiny", json!({"quality": "medium"}))).await);
    let medium_tiny = image(&s.generate(body("tiny", json!({"quality": "medium", "decoder": "tiny"}))).await);
    let plain_low = image(&s.generate(body("plain", json!({"quality": "low"}))).await);
    let found_low = image(&found.generate(body("found", json!({"quality": "low"}))).await);
    assert_eq!(low.dimensions(), (64, 64));
    // The same latents each time (steps and seed fixed): only the decoder differs.
    assert_eq!(low, medium_tiny, "quality=low decodes with the tiny decoder");
    assert_eq!(low_full, medium, "decoder=full and quality=medium decode with the model's own");
    assert_ne!(low, medium);
    assert_eq!(plain_low, medium, "without a tiny decoder, low quality keeps the full one");
    assert_eq!(found_low, low, "the pulled taesd is found in the models directory");

    // Asking for one a model lacks says what to pull; upstream models do not take the field at all.
    let (status, _, err) = s.generate(body("plain", json!({"decoder": "tiny"}))).await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("decoder")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("imagegate models pull taesd"), "{err}");

    // A tiny decoder is not a model to serve, and a tiny decoder of the wrong shape stops the start.
    let e = Config::from_toml("[models.taesd]\n", &NoEnv::new()).err().unwrap().to_string();
    assert!(e.contains("models.taesd") && e.contains("tiny decoder"), "{e}");
    let eight = tempfile::tempdir().unwrap();
    engine::testing::write_tiny_decoder(eight.path(), &TinyDecoderSpec::taesd()).unwrap();
    let toml = format!("[models.bad]\npath = {m:?}\ntiny_decoder = {:?}\n", eight.path().to_str().unwrap());
    let msg =
        server::AppState::from_config(&Config::from_toml(&toml, &NoEnv::new()).unwrap()).err().unwrap().to_string();
    assert!(msg.contains("config.json") && msg.contains("upsampling_scaling_factor"), "{msg}");
}

/// A local job whose client goes away stops at its next step and is charged the compute time it used
/// (the catalog's price times the time it reports): never free, never the whole hold.
async fn an_abandoned_local_job_pays_for_the_compute_it_used(db: &ledger::testing::TestDatabase) {
    let (s, ledger) = serve_with_ledger(db).await;
    let slow = s.running_stream(150).await;
    let request_id = slow.headers()["x-request-id"].to_str().unwrap().to_owned();
    drop(slow);
    let row = loop {
        if let Some(row) = ledger.entries_for_request(&request_id).await.unwrap().into_iter().next() {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(row.status, ledger::RequestStatus::Failed);
    assert_eq!(row.entry.error_code.as_deref(), Some("client_disconnected"));
    assert_eq!(row.entry.cost_source, Some(ledger::CostSource::Priced));
    let breakdown: Value = serde_json::from_str(row.entry.cost_breakdown.as_deref().unwrap()).unwrap();
    let (ms, amount) = compute_line(&json!({"imagegate": breakdown}));
    assert!(ms > 0);
    assert_eq!(row.cost_usd, amount);
    assert_eq!(amount, pricing::compute_cost(cpu_price(), ms).unwrap());
    let usage = ledger.key_budget_usage(&row.key_id.unwrap()).await.unwrap().unwrap();
    assert_eq!((usage.spent_usd, usage.reserved_usd), (amount, rust_decimal::Decimal::ZERO));
}

#[tokio::test]
async fn an_abandoned_local_job_pays_for_the_compute_it_used_sqlite() {
    let db = ledger::testing::TestDatabase::sqlite().unwrap();
    an_abandoned_local_job_pays_for_the_compute_it_used(&db).await;
}

#[tokio::test]
async fn an_abandoned_local_job_pays_for_the_compute_it_used_postgres() {
    let Some(db) = ledger::testing::TestDatabase::postgres().await.unwrap() else { return };
    an_abandoned_local_job_pays_for_the_compute_it_used(&db).await;
    db.finish().await.unwrap();
}

impl Local {
    async fn metrics(&self) -> String {
        let base = self.url.trim_end_matches("/v1");
        self.http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// Waits until the metrics show `line` (a series and its value).
    async fn until_metric(&self, line: &str) {
        for _ in 0..400 {
            if self.metrics().await.lines().any(|l| l == line) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the metrics never showed {line}:\n{}", self.metrics().await);
    }
}

/// With the engine busy with default work, a flex request waits, and default work that arrives after
/// it runs first; a flex request beyond the flex queue is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flex_work_waits_behind_default_work_and_a_full_flex_queue_refuses_at_once() {
    let s = std::sync::Arc::new(serve("[engine]\nflex_queue = 1\n").await);
    let busy = s.running_stream(150).await;
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let spawn = |body: Value, label: &'static str| {
        let (s, done) = (std::sync::Arc::clone(&s), done_tx.clone());
        tokio::spawn(async move {
            let r = s.generate(body).await;
            done.send(label).unwrap();
            r
        })
    };
    let flex =
        spawn(json!({"model": "tiny", "prompt": "flex", "size": "64x64", "steps": 2, "service_tier": "flex"}), "flex");
    s.until_metric("imagegate_queue_waiting{provider=\"local\",class=\"background\"} 1").await;
    let (status, headers, body) =
        s.generate(json!({"model": "tiny", "prompt": "more", "size": "64x64", "service_tier": "flex"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("resource_unavailable")), "{body}");
    assert!(headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // Default work sent after the flex request runs before it.
    let default = spawn(json!({"model": "tiny", "prompt": "default", "size": "64x64", "steps": 2}), "default");
    let rest = busy.text().await.unwrap();
    assert!(rest.contains("image_generation.completed"), "{rest}");
    assert_eq!((done.recv().await, done.recv().await), (Some("default"), Some("flex")));
    let (flex, default) = (flex.await.unwrap(), default.await.unwrap());
    assert_eq!((flex.0, default.0), (200, 200), "{}", flex.2);
    assert_eq!(flex.1["x-imagegate-service-tier"], "flex");
    assert_eq!(flex.2["imagegate"]["service_tier"], "flex");
    let lines = flex.2["imagegate"]["lines"].as_array().unwrap();
    assert!(lines.iter().any(|l| l["item"] == "service tier 'flex' (x0.5)"), "{lines:?}");
    assert!(s.metrics().await.contains("imagegate_engine_step_seconds_count{model=\"tiny\"}"));
}

/// A default request that arrives while a long flex job runs is served between two of its steps: it
/// finishes while the flex job is still running, and the flex job then finishes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_work_runs_between_the_steps_of_a_running_flex_job() {
    let s = serve("").await;
    let mut flex = s
        .post("generations")
        .json(&json!({"model": "tiny", "prompt": "otter", "size": "64x64", "steps": 150, "stream": true,
            "partial_images": 3, "service_tier": "flex"}))
        .send()
        .await
        .unwrap();
    assert_eq!(flex.headers()["x-imagegate-service-tier"], "flex");
    let mut seen = String::new();
    while !seen.contains("partial_image") {
        let chunk = flex.chunk().await.unwrap().expect("the stream ended before its first partial image");
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let (status, _, body) = s.generate(json!({"model": "tiny", "prompt": "now", "size": "64x64", "steps": 2})).await;
    assert_eq!(status, 200, "{body}");
    // The flex job is still on the engine.
    let m = s.metrics().await;
    assert!(m.contains("imagegate_queue_running{provider=\"local\",class=\"background\"} 1"), "{m}");
    let rest = flex.text().await.unwrap();
    assert!(rest.contains("image_generation.completed"), "{rest}");
}
