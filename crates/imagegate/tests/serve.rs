//! `imagegate serve` as separate processes sharing one database, in front of the fake upstream: the
//! budget, the rate limit and revocations hold across instances, and a killed instance leaves no
//! money locked for longer than the reservation TTL, and a ledger row for what it was doing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger::testing::TestDatabase;
use ledger::{Budget, Decimal, Ledger, LedgerOptions, NewKey, Period, RateLimits, Scope};

use serde_json::{Value, json};

/// One `imagegate serve` process; killed on drop.
struct Instance {
    child: Child,
    url: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How an instance is started: the zero-config upstream (`OPENAI_API_KEY`, 10 minute timeout) and the
/// default hold TTL, or a config file whose upstream times out after `upstream_timeout_secs`, which
/// allows a hold TTL as short as that plus 10 s.
#[derive(Clone, Copy, Default)]
struct Options {
    ttl_secs: Option<u64>,
    upstream_timeout_secs: Option<u64>,
    /// More lines for the config file's provider (with `upstream_timeout_secs`).
    provider_toml: &'static str,
}

async fn serve(db: &str, upstream: &str, data_dir: &std::path::Path, options: Options) -> Instance {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_imagegate"));
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database-url", db])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("IMAGEGATE_API_KEYS")
        .env_remove("IMAGEGATE_DATABASE_URL")
        .env_remove("IMAGEGATE_RESERVATION_TTL_SECS")
        .env("OPENAI_API_KEY", fake_openai::DEFAULT_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(ttl) = options.ttl_secs {
        command.args(["--reservation-ttl-secs", &ttl.to_string()]);
    }
    match options.upstream_timeout_secs {
        Some(timeout) => {
            let config = data_dir.join(format!("imagegate-{port}.toml"));
            let toml = format!(
                "[providers.openai]\nbase_url = \"{upstream}\"\napi_key_env = \"OPENAI_API_KEY\"\nmodels = [\"gpt-image-2\"]\ntimeout_secs = {timeout}\nmax_retries = 0\n{}\n",
                options.provider_toml
            );
            std::fs::write(&config, toml).unwrap();
            command.arg("--config").arg(config).env_remove("OPENAI_BASE_URL");
        }
        None => {
            command.env("OPENAI_BASE_URL", upstream);
        }
    }
    let child = command.spawn().unwrap();
    let mut instance = Instance { child, url: format!("http://127.0.0.1:{port}/v1") };
    let started = Instant::now();
    while reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_err() {
        if let Some(status) = instance.child.try_wait().unwrap() {
            panic!("imagegate serve exited at start ({status}); its error is above");
        }
        assert!(started.elapsed() < Duration::from_secs(30), "imagegate serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    instance
}

async fn generate(url: &str, key: &str, prompt: &str) -> (u16, Value) {
    let body = json!({"model": "gpt-image-2", "prompt": prompt, "quality": "low", "size": "1024x1024"});
    let r = reqwest::Client::new()
        .post(format!("{url}/images/generations"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The worst case an instance holds for `prompt`, from the refusal of a key with no budget left.
async fn worst_case(ledger: &Ledger, url: &str, prompt: &str) -> Decimal {
    let body = json!({"model": "gpt-image-2", "prompt": prompt, "quality": "low", "size": "1024x1024"});
    worst_case_of(ledger, url, body).await
}

/// The worst case an instance holds for a request with `body`.
async fn worst_case_of(ledger: &Ledger, url: &str, request: Value) -> Decimal {
    let broke = NewKey { budget: Some(Budget::capped(Period::Total, Decimal::ZERO)), ..NewKey::user("broke") };
    let broke = ledger.create_key(broke).await.unwrap().secret;
    let r = reqwest::Client::new()
        .post(format!("{url}/images/generations"))
        .bearer_auth(&broke)
        .json(&request)
        .send()
        .await
        .unwrap();
    let (status, body): (u16, Value) = (r.status().as_u16(), r.json().await.unwrap());
    assert_eq!(status, 429, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    let after = message.split("could cost up to $").nth(1).unwrap();
    Decimal::from_str(after.split(' ').next().unwrap()).unwrap()
}

async fn key(ledger: &Ledger, new: NewKey) -> (String, String) {
    let created = ledger.create_key(new).await.unwrap();
    (created.key.id, created.secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_share_budgets_limits_and_revocations() {
    let Some(db) = TestDatabase::postgres().await.unwrap() else { return };
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    let a = serve(&db.url, &fake.base_url(), data.path(), Options::default()).await;
    let b = serve(&db.url, &fake.base_url(), data.path(), Options::default()).await;

    // A budget for exactly three slow requests, eight sent to the two instances at once.
    let prompt = "[fault:slow=1500] two instances";
    let worst = worst_case(&ledger, &a.url, prompt).await;
    let (_, shared) = key(
        &ledger,
        NewKey { budget: Some(Budget::capped(Period::Day, worst * Decimal::from(3))), ..NewKey::user("shared") },
    )
    .await;
    let urls = Arc::new([a.url.clone(), b.url.clone()]);
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (urls, shared) = (urls.clone(), shared.clone());
            tokio::spawn(async move { generate(&urls[i % 2], &shared, prompt).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().0);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429, 429, 429]);
    assert_eq!(fake.count("two instances"), 3);

    // Two requests a minute, counted across both instances.
    let limits = RateLimits { requests_per_minute: Some(2), images_per_minute: None };
    let (_, limited) = key(&ledger, NewKey { rate_limits: limits, ..NewKey::user("limited") }).await;
    assert_eq!(generate(&a.url, &limited, "rate one").await.0, 200);
    assert_eq!(generate(&b.url, &limited, "rate two").await.0, 200);
    let (status, body) = generate(&a.url, &limited, "rate three").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    // Revoked through one instance's admin API: the other refuses the key on the next request.
    let (_, admin) = key(&ledger, NewKey { scope: Scope::Admin, ..NewKey::user("admin") }).await;
    let (victim_id, victim) = key(&ledger, NewKey::user("victim")).await;
    assert_eq!(generate(&b.url, &victim, "before revoking").await.0, 200);
    let r = reqwest::Client::new()
        .delete(format!("{}/admin/keys/{victim_id}", a.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(generate(&b.url, &victim, "after revoking").await.0, 401);

    drop((a, b));
    ledger.close().await;
    db.finish().await.unwrap();
}

/// An instance killed (SIGKILL) in the middle of a stream: what it had delivered stays charged, the
/// rest of its hold stays until the TTL passes without a heartbeat, then another instance releases it,
/// writes the request's row (`failed`, `instance_died`, what it charged) and forgets its
/// Idempotency-Key, so the client's retry runs instead of getting 409 for an hour.
async fn killed_instance_leaves_no_money_locked(db: TestDatabase) {
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    // The shortest hold the server accepts with a 1 s upstream timeout: 11 s.
    let options = Options { ttl_secs: Some(11), upstream_timeout_secs: Some(1), ..Options::default() };
    let doomed = serve(&db.url, &fake.base_url(), data.path(), options).await;
    let body = json!({"model": "gpt-image-2", "prompt": "[fault:gap=500] doomed", "quality": "low",
        "size": "1024x1024", "n": 10, "stream": true});
    let worst = worst_case_of(&ledger, &doomed.url, body.clone()).await;
    let budget = worst * Decimal::new(15, 1);
    let (id, secret) =
        key(&ledger, NewKey { budget: Some(Budget::capped(Period::Month, budget)), ..NewKey::user("crash") }).await;
    let money = || async {
        let u = ledger.key_budget_usage(&id).await.unwrap().unwrap();
        (u.spent_usd, u.reserved_usd)
    };
    let stream = |url: String| {
        reqwest::Client::new()
            .post(format!("{url}/images/generations"))
            .bearer_auth(&secret)
            .header("Idempotency-Key", "crash-retry")
            .json(&body)
            .send()
    };

    // The first image is delivered (and charged), then the instance is killed.
    let mut r = stream(doomed.url.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut seen = String::new();
    let completed = loop {
        let event = seen.split("event: image_generation.completed\ndata: ").nth(1).and_then(|d| d.split_once("\n\n"));
        if let Some((data, _)) = event {
            break data.to_owned();
        }
        seen.push_str(std::str::from_utf8(&r.chunk().await.unwrap().unwrap()).unwrap());
    };
    let first_cost: Decimal = {
        let event: Value = serde_json::from_str(&completed).unwrap();
        Decimal::from_str(event["imagegate"]["cost_usd"].as_str().unwrap()).unwrap()
    };
    drop(doomed); // SIGKILL: no settle, no release, no row.
    drop(r);
    let (spent, held) = money().await;
    assert_eq!(spent, first_cost, "the delivered image stays charged");
    assert!(held > Decimal::ZERO, "the hold outlives the process until it expires");

    let survivor = serve(&db.url, &fake.base_url(), data.path(), options).await;
    // Another request of the same size does not fit while the dead instance's hold is there.
    let mut unstreamed = body.clone();
    unstreamed["stream"] = json!(false);
    let r = reqwest::Client::new()
        .post(format!("{}/images/generations", survivor.url))
        .bearer_auth(&secret)
        .json(&unstreamed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429, "the held budget is not spendable yet");
    assert_eq!(stream(survivor.url.clone()).await.unwrap().status().as_u16(), 409, "the retry waits for the hold");
    let started = Instant::now();
    while money().await.1 > Decimal::ZERO {
        assert!(started.elapsed() < Duration::from_secs(60), "the dead instance's hold was never released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = ledger.entries_for_request(&request_id).await.unwrap();
    assert_eq!(rows.len(), 1, "one row for the killed request");
    assert_eq!((rows[0].status, rows[0].cost_usd, rows[0].entry.n), (ledger::RequestStatus::Failed, first_cost, 1));
    assert_eq!(rows[0].entry.error_code.as_deref(), Some("instance_died"));
    assert_eq!(money().await, (first_cost, Decimal::ZERO));

    // The retry with the same Idempotency-Key runs now.
    let retry = stream(survivor.url.clone()).await.unwrap();
    assert_eq!(retry.status().as_u16(), 200);
    assert!(retry.text().await.unwrap().contains("image_generation.completed"));
    let (spent, held) = money().await;
    assert!(spent <= budget && held == Decimal::ZERO, "spent {spent}, held {held} of {budget}");
    drop(survivor);
    ledger.close().await;
    db.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_instance_leaves_no_money_locked_sqlite() {
    killed_instance_leaves_no_money_locked(TestDatabase::sqlite().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_instance_leaves_no_money_locked_postgres() {
    let Some(db) = TestDatabase::postgres().await.unwrap() else { return };
    killed_instance_leaves_no_money_locked(db).await;
}

fn cli(args: &[&str], data: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("IMAGEGATE_DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The acceptance: a month budget of four and a half times the catalog cost of one medium
/// 1024x1024 gpt-image-2 image (the issue said gpt-image-1-mini, since shut down) buys four such images; the fifth is refused before the upstream is
/// called, and `imagegate usage` shows exactly the four costs and how they were billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_of_four_and_a_half_images_buys_four() {
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let prompt = "a cute baby sea otter";
    let estimate: Value = serde_json::from_str(&cli(
        &[
            "estimate",
            "--model",
            "gpt-image-2",
            "--quality",
            "medium",
            "--size",
            "1024x1024",
            "--count",
            "1",
            "--prompt-words",
            "5",
            "--json",
        ],
        data.path(),
    ))
    .unwrap();
    let one = Decimal::from_str(estimate["total_usd"].as_str().unwrap()).unwrap();
    let budget = (one * Decimal::new(45, 1)).normalize().to_string();
    let created = cli(&["keys", "create", "--name", "demo", "--budget-usd", &budget, "--period", "month"], data.path());
    let secret = created.lines().last().unwrap().trim().to_owned();

    let url = format!("sqlite://{}/imagegate.db?mode=rwc", data.path().display());
    let server = serve(&url, &fake.base_url(), data.path(), Options::default()).await;
    let client = reqwest::Client::new();
    let mut costs = Vec::new();
    for i in 0..5 {
        let r = client
            .post(format!("{}/images/generations", server.url))
            .bearer_auth(&secret)
            .json(&json!({"model": "gpt-image-2", "prompt": prompt, "quality": "medium", "size": "1024x1024"}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let cost = r.headers().get("x-imagegate-cost-usd").map(|v| v.to_str().unwrap().to_owned());
        let body: Value = r.json().await.unwrap();
        if i < 4 {
            assert_eq!(status, 200, "request {i}: {body}");
            costs.push(Decimal::from_str(&cost.unwrap()).unwrap());
        } else {
            assert_eq!(status, 429, "{body}");
            assert_eq!(body["error"]["code"], "insufficient_quota");
            assert!(body["error"]["message"].as_str().unwrap().contains("could cost up to $"), "{body}");
        }
    }
    assert_eq!(fake.count("sea otter"), 4, "the fifth never reached the upstream");
    drop(server);

    // usage --csv: model,requests,succeeded,images,...,cost_usd,billing_basis
    let csv = cli(&["usage", "--by", "model", "--csv"], data.path());
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines.find(|l| l.starts_with("gpt-image-2,")).unwrap().split(',').collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!((col("requests"), col("succeeded"), col("images")), ("5", "4", "4"));
    let total: Decimal = costs.iter().sum();
    assert_eq!(Decimal::from_str(col("cost_usd")).unwrap(), total);
    assert_eq!(col("billing_basis"), "tokens");
    let table = cli(&["usage"], data.path());
    assert!(table.contains(&total.normalize().to_string()) && table.contains("tokens"), "{table}");
}

/// Uploads `lines` of gpt-image-2 requests (prompts `PREFIX <i>`) as a batch file and creates the batch.
async fn submit_batch(url: &str, secret: &str, prefix: &str, lines: usize) -> String {
    let http = reqwest::Client::new();
    let content: String = (0..lines)
        .map(|i| {
            let body = json!({"model": "gpt-image-2", "prompt": format!("{prefix} <{i}>"), "quality": "low", "size": "1024x1024"});
            format!("{}\n", json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/images/generations", "body": body}))
        })
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part("file", reqwest::multipart::Part::text(content).file_name("batch.jsonl"));
    let file: Value = http
        .post(format!("{url}/files"))
        .bearer_auth(secret)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let body = json!({"input_file_id": file["id"], "endpoint": "/v1/images/generations", "completion_window": "24h"});
    let batch: Value =
        http.post(format!("{url}/batches")).bearer_auth(secret).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(batch["status"], "in_progress", "{batch}");
    batch["id"].as_str().unwrap().to_owned()
}

async fn batch_status(url: &str, secret: &str, id: &str) -> Value {
    let r = reqwest::Client::new().get(format!("{url}/batches/{id}")).bearer_auth(secret).send().await.unwrap();
    r.json().await.unwrap()
}

/// Polls until the batch is finished (within `limit`).
async fn finished_batch(url: &str, secret: &str, id: &str, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        let batch = batch_status(url, secret, id).await;
        if batch["status"] == "completed" {
            return batch;
        }
        assert!(started.elapsed() < limit, "the batch did not finish: {batch}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The output file's lines, checked: every line of the batch exactly once, each answered 200.
async fn output_lines(url: &str, secret: &str, batch: &Value, lines: usize) -> Vec<Value> {
    let output = batch["output_file_id"].as_str().unwrap();
    let r =
        reqwest::Client::new().get(format!("{url}/files/{output}/content")).bearer_auth(secret).send().await.unwrap();
    let out: Vec<Value> = r.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut ids: Vec<&str> = out.iter().map(|o| o["custom_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut expected: Vec<String> = (0..lines).map(|i| format!("line-{i}")).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
    assert!(out.iter().all(|o| o["response"]["status_code"] == 200));
    out
}

/// Exactly one succeeded, batch-tier ledger row per line, and their charges are what the key spent.
async fn one_charge_per_line(ledger: &Ledger, key_id: &str, out: &[Value]) {
    let mut charged = Decimal::ZERO;
    for o in out {
        let rows = ledger.entries_for_request(o["response"]["request_id"].as_str().unwrap()).await.unwrap();
        assert_eq!(rows.len(), 1, "the request that answered {}", o["custom_id"]);
        assert_eq!((rows[0].status, rows[0].entry.tier.as_str()), (ledger::RequestStatus::Succeeded, "batch"));
        charged += rows[0].cost_usd;
    }
    let started = Instant::now();
    loop {
        let u = ledger.key_budget_usage(key_id).await.unwrap().unwrap();
        if u.reserved_usd.is_zero() {
            assert_eq!(u.spent_usd, charged, "the key paid for each line once");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "holds were never released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Kill -9 an instance mid-batch and start another: the batch completes, every line appears once in
/// the output, and the ledger has one charge per line.
async fn a_batch_survives_its_instance_being_killed(db: TestDatabase) {
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    let options = Options { ttl_secs: Some(11), upstream_timeout_secs: Some(1), ..Options::default() };
    let (id, secret) =
        key(&ledger, NewKey { budget: Some(Budget::capped(Period::Month, Decimal::TEN)), ..NewKey::user("batch") })
            .await;
    let doomed = serve(&db.url, &fake.base_url(), data.path(), options).await;
    let lines = 16;
    let batch = submit_batch(&doomed.url, &secret, "[fault:slow=300] crash", lines).await;
    let started = Instant::now();
    while batch_status(&doomed.url, &secret, &batch).await["request_counts"]["completed"].as_u64().unwrap() < 4 {
        assert!(started.elapsed() < Duration::from_secs(60), "the batch made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(doomed); // SIGKILL, with lines running.
    let survivor = serve(&db.url, &fake.base_url(), data.path(), options).await;
    let done = finished_batch(&survivor.url, &secret, &batch, Duration::from_secs(90)).await;
    assert_eq!(done["request_counts"], json!({"total": lines, "completed": lines, "failed": 0}));
    let out = output_lines(&survivor.url, &secret, &done, lines).await;
    one_charge_per_line(&ledger, &id, &out).await;
    drop(survivor);
    ledger.close().await;
    db.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_survives_its_instance_being_killed_sqlite() {
    a_batch_survives_its_instance_being_killed(TestDatabase::sqlite().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_survives_its_instance_being_killed_postgres() {
    let Some(db) = TestDatabase::postgres().await.unwrap() else { return };
    a_batch_survives_its_instance_being_killed(db).await;
}

/// Two instances on one PostgreSQL split one batch: every line runs upstream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_split_one_batch_and_run_no_line_twice() {
    let Some(db) = TestDatabase::postgres().await.unwrap() else { return };
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    let (id, secret) =
        key(&ledger, NewKey { budget: Some(Budget::capped(Period::Month, Decimal::TEN)), ..NewKey::user("batch") })
            .await;
    let a = serve(&db.url, &fake.base_url(), data.path(), Options::default()).await;
    let b = serve(&db.url, &fake.base_url(), data.path(), Options::default()).await;
    let lines = 24;
    let batch = submit_batch(&a.url, &secret, "[fault:slow=150] shared", lines).await;
    let done = finished_batch(&b.url, &secret, &batch, Duration::from_secs(90)).await;
    let out = output_lines(&b.url, &secret, &done, lines).await;
    for i in 0..lines {
        assert_eq!(fake.count(&format!("shared <{i}>")), 1, "line {i} ran upstream once");
    }
    one_charge_per_line(&ledger, &id, &out).await;
    drop((a, b));
    ledger.close().await;
    db.finish().await.unwrap();
}

/// `imagegate batch` against a running server: submit --wait, status, list, results, cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_batch_commands_submit_wait_for_and_write_a_batch() {
    let db = TestDatabase::sqlite().unwrap();
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    let (_, secret) = key(&ledger, NewKey::user("cli")).await;
    let server = serve(&db.url, &fake.base_url(), data.path(), Options::default()).await;
    let mut content = String::new();
    for (i, id) in ["front view", "side/view", "back view"].iter().enumerate() {
        let mut body =
            json!({"model": "gpt-image-2", "prompt": format!("a car, {id}"), "quality": "low", "size": "1024x1024"});
        if i == 2 {
            body["output_format"] = json!("jpeg");
            body["n"] = json!(2);
        }
        content.push_str(&format!(
            "{}\n",
            json!({"custom_id": id, "method": "POST", "url": "/v1/images/generations", "body": body})
        ));
    }
    let file = data.path().join("cars.jsonl");
    std::fs::write(&file, content).unwrap();
    let batch = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
            .arg("batch")
            .args(args)
            .args(["--server", &server.url, "--api-key", &secret])
            .output()
            .unwrap();
        assert!(out.status.success(), "batch {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let submitted = batch(&["submit", file.to_str().unwrap(), "--wait"]);
    let id = submitted.lines().last().unwrap().trim().to_owned();
    assert!(id.starts_with("batch_"), "{submitted}");
    let status = batch(&["status", &id]);
    assert!(status.contains("completed") && status.contains("3/3 done (0 failed)"), "{status}");
    assert!(batch(&["list"]).contains(&id));
    let out = data.path().join("cars");
    let written = batch(&["results", &id, "--out", out.to_str().unwrap()]);
    assert!(written.starts_with("4 images written"), "{written}");
    for name in ["front_view.png", "side_view.png", "back_view.jpeg", "back_view-2.jpeg"] {
        let img = image::open(out.join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (1024, 1024), "{name}");
    }
    // Cancelling a finished batch changes nothing.
    assert!(batch(&["cancel", &id]).contains("completed"));
    drop(server);
    ledger.close().await;
}

/// A flex request costs half the same default request, and a flex request refused for capacity costs
/// nothing: both in `imagegate usage --by tier,basis`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flex_and_its_refusals_show_in_usage_by_tier_and_basis() {
    let db = TestDatabase::sqlite().unwrap();
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    let (_, secret) = key(&ledger, NewKey::user("flex")).await;
    let options = Options {
        upstream_timeout_secs: Some(5),
        provider_toml: "concurrency = 1\nflex_queue = 0",
        ..Options::default()
    };
    let server = serve(&db.url, &fake.base_url(), data.path(), options).await;
    let post = |prompt: &str, tier: &str| {
        let body = json!({"model": "gpt-image-2", "prompt": prompt, "quality": "low", "size": "1024x1024", "service_tier": tier});
        reqwest::Client::new()
            .post(format!("{}/images/generations", server.url))
            .bearer_auth(&secret)
            .json(&body)
            .send()
    };
    let cost =
        |r: &reqwest::Response| Decimal::from_str(r.headers()["x-imagegate-cost-usd"].to_str().unwrap()).unwrap();
    let default_cost = cost(&post("a fox", "default").await.unwrap());
    let flex_cost = cost(&post("a fox", "flex").await.unwrap());
    assert_eq!(flex_cost * Decimal::TWO, default_cost);
    let busy = tokio::spawn(post("[fault:slow=1500] a busy fox", "default"));
    // Once the slow request runs, the upstream has no room.
    let metrics = format!("{}/metrics", server.url.trim_end_matches("/v1"));
    let started = Instant::now();
    while !reqwest::get(&metrics)
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("imagegate_queue_running{provider=\"openai\",class=\"interactive\"} 1")
    {
        assert!(started.elapsed() < Duration::from_secs(10), "the slow request never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = post("a refused fox", "flex").await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"]["code"], "resource_unavailable");
    let busy_cost = cost(&busy.await.unwrap().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["usage", "--by", "tier,basis", "--csv", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let header = &rows[0];
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("{name} in {csv}"));
    let (tier, requests, succeeded, cost_col, basis) =
        (col("tier"), col("requests"), col("succeeded"), col("cost_usd"), col("billing_basis"));
    let row = |t: &str| rows.iter().find(|r| r[tier] == t).unwrap_or_else(|| panic!("no {t} row in {csv}"));
    let (default, flex) = (row("default"), row("flex"));
    assert_eq!((default[requests], default[succeeded], default[basis]), ("2", "2", "tokens"));
    // The flex tier: one served (half of one default request) and one refused, charged nothing.
    assert_eq!((flex[requests], flex[succeeded], flex[basis]), ("2", "1", "tokens"));
    assert_eq!(Decimal::from_str(flex[cost_col]).unwrap(), flex_cost);
    assert_eq!(Decimal::from_str(default[cost_col]).unwrap(), default_cost + busy_cost);
    drop(server);
    ledger.close().await;
}
