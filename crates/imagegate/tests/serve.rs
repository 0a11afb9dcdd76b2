//! `imagegate serve` as separate processes sharing one database, in front of the fake upstream: the
//! budget, the rate limit and revocations hold across instances, and a killed instance leaves no
//! money locked for longer than the reservation lifetime.

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

async fn serve(db: &str, upstream: &str, data_dir: &std::path::Path, ttl_secs: u64) -> Instance {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_imagegate"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database-url", db])
        .args(["--reservation-ttl-secs", &ttl_secs.to_string()])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("IMAGEGATE_API_KEYS")
        .env_remove("IMAGEGATE_DATABASE_URL")
        .env("OPENAI_API_KEY", "sk-upstream")
        .env("OPENAI_BASE_URL", upstream)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let instance = Instance { child, url: format!("http://127.0.0.1:{port}/v1") };
    let started = Instant::now();
    while reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "imagegate serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    instance
}

async fn generate(url: &str, key: &str, prompt: &str) -> (u16, Value) {
    let body = json!({"model": "gpt-image-1-mini", "prompt": prompt, "quality": "low", "size": "1024x1024"});
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
    let broke = NewKey { budget: Some(Budget::capped(Period::Total, Decimal::ZERO)), ..NewKey::user("broke") };
    let broke = ledger.create_key(broke).await.unwrap().secret;
    let (status, body) = generate(url, &broke, prompt).await;
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
    let a = serve(&db.url, &fake.base_url(), data.path(), 600).await;
    let b = serve(&db.url, &fake.base_url(), data.path(), 600).await;

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

/// An instance killed between reserve and settle: its hold stays until the reservation expires, then
/// another instance releases it and the key can spend again.
async fn killed_instance_leaves_no_money_locked(db: TestDatabase) {
    let fake = fake_openai::spawn().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
    let doomed = serve(&db.url, &fake.base_url(), data.path(), 3).await;
    let worst = worst_case(&ledger, &doomed.url, "[fault:slow=20000] doomed").await;
    let budget = Budget::capped(Period::Month, worst * Decimal::new(15, 1));
    let (id, secret) = key(&ledger, NewKey { budget: Some(budget), ..NewKey::user("crash") }).await;

    let url = doomed.url.clone();
    let s = secret.clone();
    let in_flight = tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .post(format!("{url}/images/generations"))
            .bearer_auth(&s)
            .json(&json!({"model": "gpt-image-1-mini", "prompt": "[fault:slow=20000] doomed", "quality": "low", "size": "1024x1024"}))
            .send()
            .await;
    });
    let held = || async { ledger.key_budget_usage(&id).await.unwrap().map(|u| u.reserved_usd).unwrap_or_default() };
    let started = Instant::now();
    while held().await.is_zero() {
        assert!(started.elapsed() < Duration::from_secs(10), "the request never reserved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(doomed); // SIGKILL: no settle, no release.
    in_flight.await.unwrap();
    assert!(held().await > Decimal::ZERO, "the hold outlives the process until it expires");

    let survivor = serve(&db.url, &fake.base_url(), data.path(), 3).await;
    let (status, body) = generate(&survivor.url, &secret, "while held").await;
    assert_eq!(status, 429, "the held budget is not spendable yet: {body}");
    let started = Instant::now();
    while !held().await.is_zero() {
        assert!(started.elapsed() < Duration::from_secs(15), "the expired hold was never released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = generate(&survivor.url, &secret, "after release").await;
    assert_eq!(status, 200, "{body}");
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
/// 1024x1024 gpt-image-1-mini image buys four such images; the fifth is refused before the upstream is
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
            "gpt-image-1-mini",
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
    let server = serve(&url, &fake.base_url(), data.path(), 600).await;
    let client = reqwest::Client::new();
    let mut costs = Vec::new();
    for i in 0..5 {
        let r = client
            .post(format!("{}/images/generations", server.url))
            .bearer_auth(&secret)
            .json(&json!({"model": "gpt-image-1-mini", "prompt": prompt, "quality": "medium", "size": "1024x1024"}))
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
    let row: Vec<&str> = lines.find(|l| l.starts_with("gpt-image-1-mini,")).unwrap().split(',').collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!((col("requests"), col("succeeded"), col("images")), ("5", "4", "4"));
    let total: Decimal = costs.iter().sum();
    assert_eq!(Decimal::from_str(col("cost_usd")).unwrap(), total);
    assert_eq!(col("billing_basis"), "tokens");
    let table = cli(&["usage"], data.path());
    assert!(table.contains(&total.normalize().to_string()) && table.contains("tokens"), "{table}");
}
