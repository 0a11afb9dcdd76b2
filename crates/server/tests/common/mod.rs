//! The gateway the account and money tests run against: `imagegate`'s app on a real socket with a
//! ledger (SQLite, or PostgreSQL when `IMAGEGATE_TEST_DATABASE_URL` is set), in front of the fake
//! upstream on 127.0.0.1. The ledger's clock stands still (at the start of the current minute), so
//! rate-limit windows and budget periods never turn under a test, unless a test needs real time.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod batch;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DurationRound, TimeDelta, Utc};
use fake_openai::FakeOpenAi;
use ledger::testing::TestDatabase;
use ledger::{Budget, Ledger, LedgerOptions, LedgerRow, ManualClock, NewKey, Period, UsageQuery};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use server::config::{Config, Env};

pub struct TestEnv;
impl Env for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "FAKE_UPSTREAM_KEY").then(|| fake_openai::DEFAULT_KEY.to_owned())
    }
}

/// [`TestEnv`] with a data dir of the test's own (where a server with local models keeps its signing
/// identity).
pub struct DataDir(pub tempfile::TempDir);
impl DataDir {
    pub fn new() -> DataDir {
        DataDir(tempfile::tempdir().unwrap())
    }
}
impl Env for DataDir {
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "IMAGEGATE_DATA_DIR" => Some(self.0.path().to_string_lossy().into_owned()),
            _ => TestEnv.var(name),
        }
    }
}

/// How to build a gateway.
pub struct Setup {
    /// Lines for `[providers.openai]` after its base URL and models.
    pub provider_toml: String,
    /// Anything after the provider (prices, ...).
    pub extra_toml: String,
    pub reservation_ttl: Duration,
    /// The ledger's clock stands still unless this is set (then it is the system clock).
    pub real_clock: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            provider_toml: "api_key_env = \"FAKE_UPSTREAM_KEY\"\ntimeout_secs = 20\nmax_retries = 0".into(),
            extra_toml: String::new(),
            reservation_ttl: Duration::from_secs(600),
            real_clock: false,
        }
    }
}

pub struct Gateway {
    pub fake: FakeOpenAi,
    pub url: String,
    pub http: reqwest::Client,
    pub ledger: Ledger,
    pub clock: Arc<ManualClock>,
}

pub async fn gateway(db: &TestDatabase) -> Gateway {
    gateway_with(db, Setup::default()).await
}

pub async fn gateway_with(db: &TestDatabase, setup: Setup) -> Gateway {
    let fake = fake_openai::spawn().await.unwrap();
    let toml = format!(
        "[providers.openai]\nbase_url = \"{}\"\nmodels = [\"gpt-image-1-mini\", \"dall-e-2\"]\n{}\n{}\n",
        fake.base_url(),
        setup.provider_toml,
        setup.extra_toml,
    );
    let config = Config::from_toml(&toml, &TestEnv).unwrap();
    let minute = Utc::now().duration_trunc(TimeDelta::minutes(1)).unwrap();
    let clock = Arc::new(ManualClock::new(minute));
    let ledger_clock: Arc<dyn ledger::Clock> =
        if setup.real_clock { Arc::new(ledger::SystemClock) } else { clock.clone() };
    let options = LedgerOptions {
        clock: ledger_clock,
        reservation_ttl: setup.reservation_ttl,
        idempotency_in_flight_ttl: setup.reservation_ttl,
        ..LedgerOptions::default()
    };
    let ledger = Ledger::connect_with(&db.url, options).await.unwrap();
    let state = server::AppState::from_config(&config).unwrap().with_ledger(ledger.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::run(listener, server::app(state), std::future::pending()));
    Gateway { fake, url: format!("http://{addr}/v1"), http: reqwest::Client::new(), ledger, clock }
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The `x-imagegate-cost-usd` header.
    pub fn cost(&self) -> Decimal {
        Decimal::from_str(self.headers["x-imagegate-cost-usd"].to_str().unwrap()).unwrap()
    }

    pub fn request_id(&self) -> String {
        self.headers["x-request-id"].to_str().unwrap().to_owned()
    }
}

impl Gateway {
    pub async fn generate_with(&self, key: Option<&str>, body: Value, idempotency: Option<&str>) -> Reply {
        let mut r = self.http.post(format!("{}/images/generations", self.url)).json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        if let Some(i) = idempotency {
            r = r.header("Idempotency-Key", i);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        // A response that is not JSON (a stream where a refusal was expected) shows as its text.
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, headers, body }
    }

    pub async fn generate(&self, key: &str, prompt: &str) -> Reply {
        self.generate_with(Some(key), medium(prompt), None).await
    }

    pub async fn key(&self, new: NewKey) -> String {
        self.ledger.create_key(new).await.unwrap().secret
    }

    /// A key capped at `usd` for good; its id and secret.
    pub async fn capped_key(&self, name: &str, usd: Decimal) -> (String, String) {
        let created = self
            .ledger
            .create_key(NewKey { budget: Some(Budget::capped(Period::Total, usd)), ..NewKey::user(name) })
            .await
            .unwrap();
        (created.key.id, created.secret)
    }

    /// What the ledger charged, over every row.
    pub async fn charged(&self) -> Decimal {
        let rows = self.ledger.usage(&UsageQuery::since(chrono::DateTime::UNIX_EPOCH, &[])).await.unwrap();
        rows.iter().map(|r| r.cost_usd).sum()
    }

    /// The ledger rows of one key.
    pub async fn rows_of(&self, key_id: &str) -> Vec<LedgerRow> {
        let rows = self.ledger.entries(chrono::DateTime::UNIX_EPOCH, 10_000).await.unwrap();
        rows.into_iter().filter(|r| r.key_id.as_deref() == Some(key_id)).collect()
    }

    /// Waits for the ledger row of `request_id` (written when the request ends, which for an
    /// abandoned request is after its client left).
    pub async fn row_of(&self, request_id: &str) -> LedgerRow {
        for _ in 0..600 {
            let rows = self.ledger.entries_for_request(request_id).await.unwrap();
            if let Some(row) = rows.into_iter().next() {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no ledger row for {request_id} after 30 s")
    }

    /// (spent, reserved) of a key's budget.
    pub async fn money(&self, key_id: &str) -> (Decimal, Decimal) {
        let u = self.ledger.key_budget_usage(key_id).await.unwrap().unwrap();
        (u.spent_usd, u.reserved_usd)
    }

    /// The worst case the server holds for a request with `body`, read from the refusal of a key with
    /// a zero budget.
    pub async fn worst_case_of(&self, body: Value) -> Decimal {
        let broke = self
            .key(NewKey { budget: Some(Budget::capped(Period::Total, Decimal::ZERO)), ..NewKey::user("broke") })
            .await;
        let r = self.generate_with(Some(&broke), body, None).await;
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "insufficient_quota");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("has $0 left"), "{message}");
        let after = message.split("could cost up to $").nth(1).unwrap();
        Decimal::from_str(after.split(' ').next().unwrap()).unwrap()
    }

    /// [`Gateway::worst_case_of`] one medium 1024x1024 request with `prompt`.
    pub async fn worst_case(&self, prompt: &str) -> Decimal {
        self.worst_case_of(medium(prompt)).await
    }
}

/// One medium 1024x1024 gpt-image-1-mini request.
pub fn medium(prompt: &str) -> Value {
    json!({"model": "gpt-image-1-mini", "prompt": prompt, "quality": "medium", "size": "1024x1024"})
}

/// Each scenario `NAME(&TestDatabase)` becomes `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = ledger::testing::TestDatabase::sqlite().unwrap();
                    super::$name(&db).await;
                    db.finish().await.unwrap();
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(db) = ledger::testing::TestDatabase::postgres().await.unwrap() else { return };
                    super::$name(&db).await;
                    db.finish().await.unwrap();
                }
            )*
        }
    };
}

/// A streamed response read event by event.
pub struct Events {
    pub response: reqwest::Response,
    buffer: String,
}

/// One server-sent event: its name and its data as JSON.
#[derive(Debug)]
pub struct SseEvent {
    pub name: String,
    pub data: Value,
}

impl SseEvent {
    pub fn is_completed(&self) -> bool {
        self.name.ends_with(".completed")
    }

    /// The cost the event carries (completed events).
    pub fn cost(&self) -> Decimal {
        Decimal::from_str(self.data["imagegate"]["cost_usd"].as_str().unwrap()).unwrap()
    }
}

impl Events {
    pub fn new(response: reqwest::Response) -> Events {
        Events { response, buffer: String::new() }
    }

    /// The next event, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(SseEvent { name, data: serde_json::from_str(&data).unwrap() });
            }
            let chunk = self.response.chunk().await.unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

impl Gateway {
    /// Starts a streamed generation; the response is read with [`Events::next`].
    pub async fn stream(&self, key: &str, body: Value, idempotency: Option<&str>) -> Events {
        let mut r = self.http.post(format!("{}/images/generations", self.url)).bearer_auth(key).json(&body);
        if let Some(i) = idempotency {
            r = r.header("Idempotency-Key", i);
        }
        let response = r.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        Events::new(response)
    }
}
