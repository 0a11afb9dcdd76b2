//! Models have lives: code that still names a model OpenAI shut down (`gpt-image-1-mini`, shut down
//! 2026-12-01) keeps working here, served by its replacement (a local model, or another upstream
//! model), said so in `x-imagegate-served-by` and the ledger and billed at what ran; or it gets a
//! refusal that names the shutdown date, OpenAI's replacements and how to configure one. The fake
//! upstream answers a shut-down model as OpenAI does (404 `model_not_found`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::str::FromStr;

use base64::Engine as _;
use chrono::NaiveDate;
use engine::testing::{TinySpec, write_checkpoint};
use ledger::{LedgerRow, RequestStatus};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use server::config::{Config, Env};

struct TestEnv {
    vars: Vec<(&'static str, String)>,
    today: Option<NaiveDate>,
}

impl Env for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    }

    fn today(&self) -> NaiveDate {
        self.today.unwrap_or_else(server::routing::today)
    }
}

fn upstream_env() -> TestEnv {
    TestEnv { vars: vec![("FAKE_UPSTREAM_KEY", fake_openai::DEFAULT_KEY.to_owned())], today: None }
}

struct Gateway {
    fake: fake_openai::FakeOpenAi,
    url: String,
    http: reqwest::Client,
    ledger: ledger::Ledger,
    key: String,
    _db: ledger::testing::TestDatabase,
    _model: Option<tempfile::TempDir>,
    _data: tempfile::TempDir,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

/// A server with a ledger, in front of the fake upstream serving `models`; with the tiny local model
/// `tiny` (turbo profile) when `local`; `extra` appended to the config.
async fn gateway(models: &[&str], local: bool, extra: &str) -> Gateway {
    let fake = fake_openai::spawn().await.unwrap();
    let dir = local.then(|| {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &TinySpec::default()).unwrap();
        dir
    });
    let mut toml = format!(
        "[providers.openai]\nbase_url = \"{}\"\napi_key_env = \"FAKE_UPSTREAM_KEY\"\nmodels = {models:?}\nmax_retries = 0\n",
        fake.base_url()
    );
    if let Some(d) = &dir {
        toml.push_str(&format!("[models.tiny]\npath = {:?}\nprofile = \"turbo\"\n", d.path().to_str().unwrap()));
    }
    toml.push_str(extra);
    // The server's own data dir (its signing identity for the local model's images).
    let data = tempfile::tempdir().unwrap();
    let mut env = upstream_env();
    env.vars.push(("IMAGEGATE_DATA_DIR", data.path().to_string_lossy().into_owned()));
    let config = Config::from_toml(&toml, &env).unwrap();
    let db = ledger::testing::TestDatabase::sqlite().unwrap();
    let ledger = ledger::Ledger::connect(&db.url).await.unwrap();
    let key = ledger.create_key(ledger::NewKey::user("lifecycle")).await.unwrap().secret;
    let state = server::AppState::from_config(&config).unwrap().with_ledger(ledger.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));
    Gateway {
        fake,
        url: format!("http://{addr}/v1"),
        http: reqwest::Client::new(),
        ledger,
        key,
        _db: db,
        _model: dir,
        _data: data,
    }
}

impl Gateway {
    async fn post(&self, path: &str, body: Value) -> Reply {
        let r = self.http.post(format!("{}/{path}", self.url)).bearer_auth(&self.key).json(&body).send().await.unwrap();
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        Reply { status, headers, body: r.json().await.unwrap() }
    }

    async fn get(&self, path: &str) -> Value {
        self.http.get(format!("{}/{path}", self.url)).bearer_auth(&self.key).send().await.unwrap().json().await.unwrap()
    }

    async fn row(&self, reply: &Reply) -> LedgerRow {
        let id = reply.headers["x-request-id"].to_str().unwrap();
        self.ledger.entries_for_request(id).await.unwrap().remove(0)
    }

    /// How many requests for `model` reached the upstream.
    fn upstream_requests_for(&self, model: &str) -> usize {
        self.fake.requests().iter().filter(|r| r.json.as_ref().is_some_and(|j| j["model"] == model)).count()
    }
}

fn cost(reply: &Reply) -> Decimal {
    Decimal::from_str(reply.headers["x-imagegate-cost-usd"].to_str().unwrap()).unwrap()
}

/// A request as code written for gpt-image-1-mini makes it (its size `auto`, OpenAI's default).
fn mini(prompt: &str) -> Value {
    json!({"model": "gpt-image-1-mini", "prompt": prompt, "quality": "low"})
}

/// The test: the upstream answers gpt-image-1-mini as shut down; the request is served by the
/// local replacement (the default, and one named in [replacements]), and says so everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shut_down_upstream_model_is_served_by_its_local_replacement() {
    for extra in ["", "[replacements]\n\"gpt-image-1-mini\" = \"tiny\"\n"] {
        let g = gateway(&["gpt-image-1-mini", "gpt-image-2"], true, extra).await;
        g.fake.shut_down("gpt-image-1-mini");
        let r = g.post("images/generations", mini("a cute baby sea otter")).await;
        assert_eq!(r.status, 200, "{extra}: {}", r.body);
        assert_eq!(r.headers["x-imagegate-served-by"], "tiny@local");
        let png = base64::engine::general_purpose::STANDARD.decode(r.body["data"][0]["b64_json"].as_str().unwrap());
        let img = image::load_from_memory(&png.unwrap()).unwrap();
        // Size `auto` on the local model: its native size, as a request for it names.
        let own = g.post("images/generations", json!({"model": "tiny", "prompt": "otter", "quality": "low"})).await;
        assert_eq!(own.status, 200, "{}", own.body);
        assert_eq!(json!(format!("{}x{}", img.width(), img.height())), own.body["size"]);
        assert_eq!(g.upstream_requests_for("gpt-image-1-mini"), 1, "the configured provider was asked first");
        // Billed at the local price (compute time), recorded as what ran, for the model asked.
        let row = g.row(&r).await;
        assert_eq!(row.status, RequestStatus::Succeeded);
        assert_eq!(
            (row.entry.model.as_str(), row.entry.requested_model.as_deref(), row.entry.provider.as_str()),
            ("tiny", Some("gpt-image-1-mini"), "local")
        );
        assert_eq!(row.entry.billing_basis, "compute");
        assert!(cost(&r) > Decimal::ZERO);
        assert_eq!(row.cost_usd, cost(&r));
        assert_eq!(
            (&r.body["imagegate"]["provider"], &r.body["imagegate"]["model"]),
            (&json!("local"), &json!("tiny"))
        );
    }
}

/// Without a replacement, a request for a shut-down model is refused with the date, what OpenAI names
/// instead and how to configure a replacement; whether the upstream answered so or the model is not
/// listed here at all (the zero-config upstream lists live models only).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_replacement_the_refusal_names_the_date_and_what_to_do() {
    for listed in [true, false] {
        let models: &[&str] = if listed { &["gpt-image-1-mini", "gpt-image-2"] } else { &["gpt-image-2"] };
        let g = gateway(models, false, "").await;
        g.fake.shut_down("gpt-image-1-mini");
        let r = g.post("images/generations", mini("otter")).await;
        assert_eq!(r.status, 404, "{}", r.body);
        let e = &r.body["error"];
        assert_eq!(
            (&e["type"], &e["param"], &e["code"]),
            (&json!("invalid_request_error"), &json!("model"), &json!("model_not_found"))
        );
        let message = e["message"].as_str().unwrap();
        for needle in ["'gpt-image-1-mini'", "2026-12-01", "gpt-image-2.6-sunburst", "[replacements]", "gpt-image-2"] {
            assert!(message.contains(needle), "{needle}: {message}");
        }
        assert_eq!(g.upstream_requests_for("gpt-image-1-mini"), usize::from(listed));
        assert!(!r.headers.contains_key("x-imagegate-cost-usd"));
        let model = g.get("models/gpt-image-1-mini").await;
        match listed {
            true => assert_eq!(model["shutdown_date"], "2026-12-01", "{model}"),
            false => assert!(model["error"]["message"].as_str().unwrap().contains("2026-12-01"), "{model}"),
        }
        // An operator may refuse it on purpose, even with a local model installed.
        let g = gateway(models, true, "[replacements]\n\"gpt-image-1-mini\" = \"refuse\"\n").await;
        g.fake.shut_down("gpt-image-1-mini");
        let r = g.post("images/generations", mini("otter")).await;
        assert_eq!(r.status, 404, "{}", r.body);
        assert!(r.body["error"]["message"].as_str().unwrap().contains("chose to refuse"), "{}", r.body);
    }
}

/// A replacement upstream model (gpt-image-2) serves the request, billed at its own prices; the
/// estimate for the old name shows what it runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replacement_upstream_model_is_billed_at_its_own_price() {
    let g = gateway(&["gpt-image-2"], false, "[replacements]\n\"gpt-image-1-mini\" = \"gpt-image-2\"\n").await;
    let asked = json!({"model": "gpt-image-1-mini", "prompt": "a lighthouse", "size": "1024x1024", "quality": "low"});
    let r = g.post("images/generations", asked).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-imagegate-served-by"], "gpt-image-2@openai");
    assert_eq!(g.upstream_requests_for("gpt-image-2"), 1);
    assert_eq!(g.upstream_requests_for("gpt-image-1-mini"), 0);
    // The upstream's usage (196 output tokens: gpt-image-2, low, 1024x1024) at gpt-image-2's prices.
    assert_eq!(r.body["usage"]["output_tokens"], 196);
    // The same on gpt-image-2 by its own name, at the flex tier: half the price, and says so.
    let direct = json!({"model": "gpt-image-2", "prompt": "a lighthouse", "size": "1024x1024", "quality": "low",
        "service_tier": "flex"});
    let d = g.post("images/generations", direct).await;
    assert_eq!(cost(&r), cost(&d) * rust_decimal::Decimal::TWO);
    assert_eq!(r.headers["x-imagegate-service-tier"], "default");
    assert_eq!(d.headers["x-imagegate-service-tier"], "flex");
    let row = g.row(&r).await;
    assert_eq!(
        (row.entry.model.as_str(), row.entry.requested_model.as_deref()),
        ("gpt-image-2", Some("gpt-image-1-mini"))
    );
    assert_eq!(g.row(&d).await.entry.requested_model, None);
    let plan = json!({"requests": [{"model": "gpt-image-1-mini", "quality": "low", "size": "1024x1024", "count": 1, "prompt_words": 2}]});
    let e = g.post("images/estimates", plan).await;
    assert_eq!(
        (&e.body["items"][0]["model"], &e.body["items"][0]["provider"]),
        (&json!("gpt-image-2"), &json!("openai")),
        "{}",
        e.body
    );
}

/// `GET /v1/models` carries OpenAI's `shutdown_date`: the date for a shut-down model served here by a
/// replacement, null for a live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_model_list_says_when_models_shut_down() {
    let g = gateway(&["gpt-image-2"], true, "").await;
    let list = g.get("models").await;
    let find = |id: &str| list["data"].as_array().unwrap().iter().find(|m| m["id"] == id).cloned();
    let mini = find("gpt-image-1-mini").unwrap_or_else(|| panic!("{list}"));
    assert_eq!((&mini["shutdown_date"], &mini["owned_by"]), (&json!("2026-12-01"), &json!("local")));
    assert_eq!(find("gpt-image-2").unwrap()["shutdown_date"], Value::Null);
    assert!(find("tiny").unwrap().get("shutdown_date").is_some());
    assert_eq!(g.get("models/gpt-image-1-mini").await["shutdown_date"], "2026-12-01");
    assert_eq!(g.get("models/dall-e-3").await["shutdown_date"], "2026-05-12");
}

/// With only `OPENAI_API_KEY`, the upstream serves the models OpenAI still serves on the day: the
/// catalog's dates decide, so the same build served gpt-image-1-mini before its shutdown.
#[test]
fn zero_config_serves_the_live_models_of_the_day() {
    let env = |today: &str| TestEnv {
        vars: vec![("OPENAI_API_KEY", "sk-test".to_owned())],
        today: Some(NaiveDate::from_str(today).unwrap()),
    };
    let models = |today: &str| -> Vec<String> {
        let config = Config::from_toml("", &env(today)).unwrap();
        config.providers[0].models.iter().map(|(m, _)| m.clone()).collect()
    };
    assert_eq!(models("2026-12-06"), ["gpt-image-2", "gpt-image-2-2026-04-21"]);
    assert!(models("2026-11-30").contains(&"gpt-image-1-mini".to_owned()));
    assert!(!models("2026-11-30").contains(&"gpt-image-1".to_owned()), "shut down on 2026-10-23");

    // Configured upstream models past or near their shutdown are named at start, with what happens
    // (the zero-config upstream's too: on 2026-10-01 its gpt-image-1 shuts down within 30 days).
    let warnings_on = |toml: &str, today: &str| {
        let day = NaiveDate::from_str(today).unwrap();
        let env = TestEnv { vars: Vec::new(), today: Some(day) };
        Config::from_toml(toml, &env).unwrap().lifecycle_warnings(day)
    };
    let toml = "[providers.comet]\nbase_url = \"https://api.cometapi.com/v1\"\nmodels = [\"gpt-image-1-mini\", \"gpt-image-2\"]\n";
    let warnings = warnings_on(toml, "2026-12-06");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    for needle in ["'gpt-image-1-mini'", "'comet'", "was shut down on 2026-12-01", "[replacements]"] {
        assert!(warnings[0].contains(needle), "{needle}: {}", warnings[0]);
    }
    assert!(warnings_on(toml, "2026-11-15")[0].contains("shuts down on 2026-12-01"));
    assert!(warnings_on(toml, "2026-10-01").is_empty());
    let early = Config::from_toml("", &env("2026-10-01"))
        .unwrap()
        .lifecycle_warnings(NaiveDate::from_str("2026-10-01").unwrap());
    assert!(
        early.iter().any(|w| w.contains("'gpt-image-1' of provider 'openai' shuts down on 2026-10-23")),
        "{early:?}"
    );
    let replaced = format!("{toml}[replacements]\n\"gpt-image-1-mini\" = \"gpt-image-2\"\n");
    assert!(warnings_on(&replaced, "2026-12-06")[0].contains("served by 'gpt-image-2'"));
    // A replacement must be a model served here, and not the model itself.
    for target in ["nothing", "comet/gpt-image-1-mini"] {
        let bad = format!("{toml}[replacements]\n\"gpt-image-1-mini\" = \"{target}\"\n");
        let state = server::AppState::from_config(&Config::from_toml(&bad, &env("2026-12-06")).unwrap());
        assert!(state.err().unwrap().0.contains("replacements.\"gpt-image-1-mini\""), "{target}");
    }
}
