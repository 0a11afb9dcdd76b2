//! What imagegate adds to a request, with keys, budgets and the ledger on: a canned upstream answers
//! every generation with the same real-size body (a 1024x1024 PNG, about 2.8 MB of JSON); requests go
//! alternately straight to it and through imagegate (SQLite ledger, a key with a budget), one at a time,
//! and the difference of the medians is the gateway's overhead.
//!
//!     cargo run --release -p server --example gateway_overhead -- [--runs 200] [--no-ledger]

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use axum::routing::post;
use base64::Engine as _;
use ledger::{Budget, Decimal, Ledger, LedgerOptions, NewKey, Period};
use rand::{Rng, SeedableRng};
use server::config::{Config, Env};

struct BenchEnv;
impl Env for BenchEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "BENCH_UPSTREAM_KEY").then(|| "sk-bench".to_owned())
    }
}

/// A 1024x1024 PNG that compresses like a photograph (a gradient with noise), as OpenAI's JSON.
fn canned_body() -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let img = image::RgbImage::from_fn(1024, 1024, |x, y| {
        let n: i32 = rng.random_range(-9..=9);
        let c = |v: u32| (v as i32 + n).clamp(0, 255) as u8;
        image::Rgb([c(x / 4), c(y / 4), c((x + y) / 8)])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
    serde_json::to_vec(&serde_json::json!({
        "created": 1_700_000_000,
        "data": [{"b64_json": b64}],
        "background": "opaque", "output_format": "png", "quality": "medium", "size": "1024x1024",
        "usage": {"input_tokens": 9, "output_tokens": 1056, "total_tokens": 1065,
                  "input_tokens_details": {"text_tokens": 9, "image_tokens": 0}},
    }))
    .unwrap()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize =
        args.iter().position(|a| a == "--runs").and_then(|i| args.get(i + 1)).map_or(200, |v| v.parse().unwrap());

    let body = bytes::Bytes::from(canned_body());
    let size = body.len();
    let upstream = axum::Router::new().route(
        "/v1/images/generations",
        post(move || {
            let body = body.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, upstream).await });

    let dir = tempfile::tempdir().unwrap();
    let ledger =
        Ledger::connect_with(&ledger::sqlite_url(dir.path()).unwrap(), LedgerOptions::default()).await.unwrap();
    let key = ledger
        .create_key(NewKey {
            budget: Some(Budget::capped(Period::Month, Decimal::from(1_000_000))),
            ..NewKey::user("bench")
        })
        .await
        .unwrap()
        .secret;
    let toml = format!(
        "[providers.openai]\nbase_url = \"{upstream_url}\"\nmodels = [\"gpt-image-1-mini\"]\napi_key_env = \"BENCH_UPSTREAM_KEY\"\n"
    );
    let config = Config::from_toml(&toml, &BenchEnv).unwrap();
    let state = server::AppState::from_config(&config).unwrap();
    // `--no-ledger`: the same gateway without keys, budgets or ledger, to see what they cost.
    let with_ledger = !args.iter().any(|a| a == "--no-ledger");
    let state = if with_ledger { state.with_ledger(ledger).await.unwrap() } else { state };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));

    let client = reqwest::Client::new();
    let request = serde_json::json!({"model": "gpt-image-1-mini", "prompt": "a cute baby sea otter", "quality": "medium", "size": "1024x1024"});
    let time = |url: String| {
        let (client, request, key) = (client.clone(), request.clone(), key.clone());
        async move {
            let t = Instant::now();
            let r =
                client.post(format!("{url}/images/generations")).bearer_auth(key).json(&request).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let bytes = r.bytes().await.unwrap();
            assert!(bytes.len() >= size);
            t.elapsed().as_secs_f64() * 1000.0
        }
    };
    // Warm both paths (connections, the ledger's pool, page cache).
    for _ in 0..10 {
        time(upstream_url.clone()).await;
        time(gateway_url.clone()).await;
    }
    let (mut direct, mut through) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        direct.push(time(upstream_url.clone()).await);
        through.push(time(gateway_url.clone()).await);
    }
    let (d50, g50) = (median(&mut direct), median(&mut through));
    let (d90, g90) = (percentile(&mut direct, 0.9), percentile(&mut through, 0.9));
    println!("response body: {:.2} MB of JSON; {runs} requests each, alternating", size as f64 / 1e6);
    println!("| path | median ms | p90 ms |\n|---|---:|---:|");
    println!("| straight to the upstream | {d50:.2} | {d90:.2} |");
    let what = if with_ledger { "key, budget, ledger on SQLite" } else { "no ledger" };
    println!("| through imagegate ({what}) | {g50:.2} | {g90:.2} |");
    println!("overhead (difference of medians): {:.2} ms", g50 - d50);
}
