//! The flex tier against the fake upstream: half the default price, said in the header, the body and
//! the ledger; and when the upstream has no room, queued behind default work or refused at once with
//! OpenAI's 429 "Resource Unavailable", with nothing held or charged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Gateway, Setup, gateway, gateway_with, medium};
use ledger::testing::TestDatabase;
use ledger::{Budget, NewKey, Period, RequestStatus};
use rust_decimal::Decimal;
use serde_json::{Value, json};

async fn funded_key(g: &Gateway) -> (String, String) {
    let created = g
        .ledger
        .create_key(NewKey { budget: Some(Budget::capped(Period::Total, Decimal::TEN)), ..NewKey::user("flex") })
        .await
        .unwrap();
    (created.secret, created.key.id)
}

fn with_tier(prompt: &str, tier: &str) -> Value {
    let mut body = medium(prompt);
    body["service_tier"] = json!(tier);
    body
}

async fn metrics(g: &Gateway) -> String {
    let base = g.url.trim_end_matches("/v1");
    let r = g.http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    r.text().await.unwrap()
}

/// Waits until the metrics show `line` (a series and its value).
async fn until_metric(g: &Gateway, line: &str) {
    for _ in 0..400 {
        if metrics(g).await.lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the metrics never showed {line}:\n{}", metrics(g).await);
}

async fn flex_costs_half_of_default_and_says_so(db: &TestDatabase) {
    let g = gateway(db).await;
    let (key, key_id) = funded_key(&g).await;
    let default = g.generate_with(Some(&key), medium("a red fox"), None).await;
    let flex = g.generate_with(Some(&key), with_tier("a red fox", "flex"), None).await;
    let auto = g.generate_with(Some(&key), with_tier("a red fox", "auto"), None).await;
    for r in [&default, &flex, &auto] {
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(flex.cost() * Decimal::TWO, default.cost());
    assert_eq!(auto.cost(), default.cost());
    for (r, tier) in [(&default, "default"), (&flex, "flex"), (&auto, "default")] {
        assert_eq!(r.headers["x-imagegate-service-tier"], tier);
        assert_eq!(r.body["imagegate"]["service_tier"], tier);
        let row = g.row_of(&r.request_id()).await;
        assert_eq!((row.entry.tier.as_str(), row.cost_usd), (tier, r.cost()));
    }
    let lines = flex.body["imagegate"]["lines"].as_array().unwrap();
    assert!(lines.iter().any(|l| l["item"] == "service tier 'flex' (x0.5)"), "{lines:?}");
    let (spent, held) = g.money(&key_id).await;
    assert_eq!((spent, held), (default.cost() * Decimal::from(2) + flex.cost(), Decimal::ZERO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flex_costs_half_of_default_and_says_so_sqlite() {
    flex_costs_half_of_default_and_says_so(&TestDatabase::sqlite().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flex_costs_half_of_default_and_says_so_postgres() {
    let Some(db) = TestDatabase::postgres().await.unwrap() else { return };
    flex_costs_half_of_default_and_says_so(&db).await;
    db.finish().await.unwrap();
}

/// One request at a time upstream and room for one waiting flex request: a flex request waits behind
/// default work and then runs; the next is refused at once, charged nothing, and never reaches the
/// upstream.
async fn flex_waits_for_room_or_is_refused_at_once(db: &TestDatabase) {
    let setup = Setup {
        provider_toml: format!("{}\nconcurrency = 1\nflex_queue = 1", Setup::default().provider_toml),
        ..Setup::default()
    };
    let g = std::sync::Arc::new(gateway_with(db, setup).await);
    let (key, key_id) = funded_key(&g).await;
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let spawn = |body: Value, label: &'static str| {
        let (g, key, done) = (std::sync::Arc::clone(&g), key.clone(), done_tx.clone());
        tokio::spawn(async move {
            let r = g.generate_with(Some(&key), body, None).await;
            done.send(label).unwrap();
            r
        })
    };
    let busy = spawn(medium("[fault:slow=1500] a busy upstream"), "default");
    until_metric(&g, "imagegate_queue_running{provider=\"openai\",class=\"interactive\"} 1").await;
    let waiting = spawn(with_tier("a patient fox", "flex"), "flex");
    until_metric(&g, "imagegate_queue_waiting{provider=\"openai\",class=\"background\"} 1").await;

    let refused = g.generate_with(Some(&key), with_tier("an impatient fox", "flex"), None).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    let error = &refused.body["error"];
    assert_eq!((error["code"].as_str(), error["type"].as_str()), (Some("resource_unavailable"), Some("requests")));
    assert!(error["message"].as_str().unwrap().starts_with("Resource Unavailable"), "{error}");
    assert!(refused.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert!(refused.headers.get("x-imagegate-cost-usd").is_none());
    let row = g.row_of(&refused.request_id()).await;
    assert_eq!((row.status, row.cost_usd, row.entry.tier.as_str()), (RequestStatus::Refused, Decimal::ZERO, "flex"));
    assert_eq!(row.entry.error_code.as_deref(), Some("resource_unavailable"));
    assert_eq!(g.fake.count("an impatient fox"), 0);

    let busy = busy.await.unwrap();
    let waited = waiting.await.unwrap();
    assert_eq!((busy.status, waited.status), (200, 200), "{}", waited.body);
    assert_eq!(waited.headers["x-imagegate-service-tier"], "flex");
    // The flex request ran only after the default one had finished.
    assert_eq!((done.recv().await, done.recv().await), (Some("default"), Some("flex")));
    let (spent, held) = g.money(&key_id).await;
    assert_eq!((spent, held), (busy.cost() + waited.cost(), Decimal::ZERO));
    let m = metrics(&g).await;
    assert!(
        m.contains("imagegate_capacity_refusals_total{provider=\"openai\",tier=\"flex\",reason=\"queue_full\"} 1"),
        "{m}"
    );
    assert!(m.contains("imagegate_requests_total{provider=\"openai\",model=\"gpt-image-1-mini\",tier=\"flex\",status=\"refused\"} 1"), "{m}");
    assert!(m.contains("imagegate_requests_total{provider=\"openai\",model=\"gpt-image-1-mini\",tier=\"flex\",status=\"succeeded\"} 1"), "{m}");
    assert!(m.contains("imagegate_queue_wait_seconds_count{provider=\"openai\",class=\"background\"} 1"), "{m}");
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flex_waits_for_room_or_is_refused_at_once_sqlite() {
    flex_waits_for_room_or_is_refused_at_once(&TestDatabase::sqlite().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flex_waits_for_room_or_is_refused_at_once_postgres() {
    let Some(db) = TestDatabase::postgres().await.unwrap() else { return };
    flex_waits_for_room_or_is_refused_at_once(&db).await;
    db.finish().await.unwrap();
}

/// A key set to the flex tier runs the requests that leave the tier to the server (`auto`, or no
/// `service_tier`) at flex; a request that asks for `default` gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flex_key_runs_auto_requests_at_flex() {
    let db = TestDatabase::sqlite().unwrap();
    let g = gateway(&db).await;
    let flex_key = g.key(NewKey { service_tier: Some("flex".into()), ..NewKey::user("evals") }).await;
    let plain = g.generate_with(Some(&flex_key), medium("an otter"), None).await;
    let auto = g.generate_with(Some(&flex_key), with_tier("an otter", "auto"), None).await;
    let asked = g.generate_with(Some(&flex_key), with_tier("an otter", "default"), None).await;
    assert_eq!(
        [&plain, &auto, &asked].map(|r| r.headers["x-imagegate-service-tier"].to_str().unwrap().to_owned()),
        ["flex", "flex", "default"]
    );
    assert_eq!(plain.cost() * Decimal::TWO, asked.cost());
}
