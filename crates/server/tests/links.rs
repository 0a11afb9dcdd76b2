//! `response_format=url` for every model, through HTTP in front of the fake upstream: the URLs serve the
//! images without a key until they expire, then answer 404 in OpenAI's envelope; upstreams are asked
//! only what they take. On SQLite and, with `IMAGEGATE_TEST_DATABASE_URL`, PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::gateway;
use ledger::NewKey;
use ledger::testing::TestDatabase;
use serde_json::{Value, json};

on_both_databases!(image_urls_serve_the_images_until_they_expire, local_models_answer_with_urls_too);

/// A local model (a tiny checkpoint) behind a server with a database: `response_format=url` there too.
async fn local_models_answer_with_urls_too(db: &TestDatabase) {
    let dir = tempfile::tempdir().unwrap();
    engine::testing::write_checkpoint(dir.path(), &engine::testing::TinySpec::default()).unwrap();
    let toml = format!("[models.tiny]\npath = {:?}\nprofile = \"turbo\"\n", dir.path().to_str().unwrap());
    let data = common::DataDir::new();
    let config = server::config::Config::from_toml(&toml, &data).unwrap();
    let ledger = ledger::Ledger::connect_with(&db.url, ledger::LedgerOptions::default()).await.unwrap();
    let state = server::AppState::from_config(&config).unwrap().with_ledger(ledger).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));
    let http = reqwest::Client::new();
    let body = json!({"model": "tiny", "prompt": "otter", "size": "64x64", "seed": 1, "response_format": "url"});
    let r = http.post(format!("{url}/images/generations")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let link = body["data"][0]["url"].as_str().unwrap();
    assert!(link.starts_with(&format!("{url}/images/img_")), "{link}");
    let image = http.get(link).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(image::load_from_memory(&image).unwrap().width(), 64);
    // Served by URL, the image is the signed one: its Content Credentials validate.
    let found = provenance::verify(&image, provenance::MediaType::Png, None).unwrap().expect("no manifest");
    assert!(found.valid, "{:?}", found.failures);
    assert_eq!(found.assertion(provenance::GENERATION_ASSERTION).unwrap()["model"], "tiny");
}

async fn image_urls_serve_the_images_until_they_expire(db: &TestDatabase) {
    let gw = gateway(db).await;
    let key = gw.key(NewKey::user("u")).await;
    let get = |url: String| {
        let http = gw.http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            let content_type = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
            (status, content_type, r.bytes().await.unwrap())
        }
    };

    // A GPT image model, which OpenAI answers only inline: here it can answer with URLs.
    let body = json!({"model": "gpt-image-1-mini", "prompt": "otter", "quality": "low", "size": "1024x1024",
                      "n": 2, "response_format": "url"});
    let r = gw.generate_with(Some(&key), body, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let urls: Vec<String> =
        r.body["data"].as_array().unwrap().iter().map(|d| d["url"].as_str().unwrap().into()).collect();
    assert_eq!(urls.len(), 2);
    for (d, url) in r.body["data"].as_array().unwrap().iter().zip(&urls) {
        assert!(d.get("b64_json").is_none(), "{d}");
        assert!(url.starts_with(&format!("{}/images/img_", gw.url)) && url.ends_with("/content"), "{url}");
    }
    assert_ne!(urls[0], urls[1]);
    // The upstream was not asked for a format it refuses.
    let sent = gw.fake.requests().last().unwrap().json.clone().unwrap();
    assert!(sent.get("response_format").is_none(), "{sent}");
    // Fetched without a key, as a browser would.
    for url in &urls {
        let (status, content_type, bytes) = get(url.clone()).await;
        assert_eq!((status, content_type.as_deref()), (200, Some("image/png")));
        image::load_from_memory(&bytes).unwrap();
    }

    // DALL-E's default is a URL: imagegate's own, the upstream asked for base64.
    let r =
        gw.generate_with(Some(&key), json!({"model": "dall-e-2", "prompt": "otter", "size": "256x256"}), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let dalle_url = r.body["data"][0]["url"].as_str().unwrap().to_owned();
    assert!(dalle_url.starts_with(&gw.url), "{dalle_url}");
    assert_eq!(gw.fake.requests().last().unwrap().json.as_ref().unwrap()["response_format"], "b64_json");
    assert_eq!(get(dalle_url.clone()).await.0, 200);

    // b64_json is answered inline for every model.
    for model in ["dall-e-2", "gpt-image-1-mini"] {
        let body = json!({"model": model, "prompt": "otter", "size": "1024x1024", "response_format": "b64_json"});
        let r = gw.generate_with(Some(&key), body, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body["data"][0]["b64_json"].is_string() && r.body["data"][0].get("url").is_none(), "{}", r.body);
    }
    // Streams carry their images in the events: a URL cannot be asked for there.
    let body = json!({"model": "gpt-image-1-mini", "prompt": "otter", "stream": true, "response_format": "url"});
    let r = gw.generate_with(Some(&key), body, None).await;
    assert_eq!((r.status, r.body["error"]["param"].clone()), (400, Value::from("response_format")), "{}", r.body);

    // At 60 minutes they are gone, in OpenAI's envelope; the sweep deletes them.
    gw.clock.advance(chrono::TimeDelta::minutes(60));
    for url in urls.iter().chain([&dalle_url]) {
        let (status, _, bytes) = get(url.clone()).await;
        assert_eq!(status, 404);
        let error: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(error["error"]["code"], "image_not_found", "{error}");
    }
    assert_eq!(gw.ledger.delete_expired_images().await.unwrap(), 3);
    assert_eq!(get(format!("{}/images/img_nothing/content", gw.url)).await.0, 404);
}
