//! Keys, budgets, rate limits, idempotency and the ledger through the HTTP API, in front of a fake
//! upstream that speaks real HTTP on 127.0.0.1. Every scenario runs on SQLite and, when
//! `IMAGEGATE_TEST_DATABASE_URL` is set, on PostgreSQL (a schema of its own).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::str::FromStr;

use common::gateway;
use ledger::testing::TestDatabase;
use ledger::{Budget, Dimension, NewKey, Period, RateLimits, Scope, UsageQuery};
use rust_decimal::Decimal;
use serde_json::{Value, json};

on_both_databases!(
    a_burst_never_overspends,
    refusals_failures_and_retries_cost_nothing_extra,
    keys_limits_and_revocation_hold_at_once,
    admins_manage_keys_and_read_usage_and_costs,
);

/// 50 concurrent requests on a budget that affords exactly 10: 10 succeed, 40 are refused before the
/// upstream sees them, and the ledger never passes the budget.
async fn a_burst_never_overspends(db: &TestDatabase) {
    let g = gateway(db).await;
    let prompt = "[fault:slow=1500] a cute baby sea otter";
    let worst = g.worst_case(prompt).await;
    let budget = worst * Decimal::from(10);
    let key = g.key(NewKey { budget: Some(Budget::capped(Period::Month, budget)), ..NewKey::user("burst") }).await;
    let g = std::sync::Arc::new(g);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (g, key) = (g.clone(), key.clone());
            tokio::spawn(async move { g.generate(&key, prompt).await })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.body["error"]["code"], "insufficient_quota", "{}", r.body);
                assert_eq!(r.body["error"]["type"], "insufficient_quota");
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert_eq!((ok, refused), (10, 40));
    assert_eq!(g.fake.count("sea otter"), 10, "refused requests never reach the upstream");
    let charged = g.charged().await;
    assert!(charged > Decimal::ZERO && charged <= budget, "charged {charged} of {budget}");
    let keys = g.ledger.list_keys().await.unwrap();
    let burst = keys.iter().find(|k| k.name == "burst").unwrap();
    let usage = g.ledger.key_budget_usage(&burst.id).await.unwrap().unwrap();
    assert_eq!(usage.reserved_usd, Decimal::ZERO, "no reservation is left behind");
    assert_eq!(usage.spent_usd, charged);
    // One ledger row per request: 10 succeeded, 40 refused (and the zero-budget probe).
    let rows = g.ledger.usage(&UsageQuery::since(chrono::DateTime::UNIX_EPOCH, &[Dimension::Key])).await.unwrap();
    let row = rows.iter().find(|r| r.key_id.as_deref() == Some(burst.id.as_str())).unwrap();
    assert_eq!((row.requests, row.succeeded), (50, 10));
}

async fn refusals_failures_and_retries_cost_nothing_extra(db: &TestDatabase) {
    let g = gateway(db).await;
    let key = g.key(NewKey { budget: Some(Budget::capped(Period::Day, Decimal::ONE)), ..NewKey::user("retry") }).await;

    // A failed upstream call costs nothing and releases its hold.
    let r = g.generate(&key, "[fault:500-always] a red cat").await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(g.charged().await, Decimal::ZERO);

    // The same Idempotency-Key twice: one upstream call, one charge, the stored response replayed.
    let body = json!({"model": "gpt-image-1-mini", "prompt": "an otter, once", "quality": "low", "size": "1024x1024"});
    let first = g.generate_with(Some(&key), body.clone(), Some("idem-1")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let cost = Decimal::from_str(first.headers["x-imagegate-cost-usd"].to_str().unwrap()).unwrap();
    let again = g.generate_with(Some(&key), body.clone(), Some("idem-1")).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.cost(), cost, "a replay says what the request was charged, once");
    assert_eq!(again.body["data"][0]["b64_json"], first.body["data"][0]["b64_json"]);
    assert_eq!(g.fake.count("an otter, once"), 1);
    assert_eq!(g.charged().await, cost);
    // The same key for another request is a clear 409, not a replay.
    let other = json!({"model": "gpt-image-1-mini", "prompt": "something else", "quality": "low"});
    let clash = g.generate_with(Some(&key), other, Some("idem-1")).await;
    assert_eq!(clash.status, 409, "{}", clash.body);
    assert_eq!(clash.body["error"]["code"], "idempotency_key_reused");
    // Edits too: the form and its image bytes are the fingerprint.
    let png = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(64, 64, image::Rgb([9, 99, 199]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    let edit = |image: Vec<u8>| {
        let form = reqwest::multipart::Form::new()
            .text("model", "gpt-image-1-mini")
            .text("prompt", "an edited otter")
            .text("quality", "low")
            .part("image", reqwest::multipart::Part::bytes(image).file_name("a.png").mime_str("image/png").unwrap());
        g.http
            .post(format!("{}/images/edits", g.url))
            .bearer_auth(&key)
            .header("Idempotency-Key", "idem-edit")
            .multipart(form)
            .send()
    };
    assert_eq!(edit(png.clone()).await.unwrap().status().as_u16(), 200);
    let replay = edit(png.clone()).await.unwrap();
    assert_eq!((replay.status().as_u16(), replay.headers()["idempotent-replayed"].to_str().unwrap()), (200, "true"));
    let mut other = png;
    other.extend_from_slice(b"trailing bytes");
    assert_eq!(edit(other).await.unwrap().status().as_u16(), 409, "another image under the same key");
    assert_eq!(g.fake.count("an edited otter"), 1);

    // A failed request does not keep its key: the retry runs.
    let flaky = json!({"model": "gpt-image-1-mini", "prompt": "[fault:500-once] flaky otter", "quality": "low"});
    assert_eq!(g.generate_with(Some(&key), flaky.clone(), Some("idem-2")).await.status, 500);
    assert_eq!(g.generate_with(Some(&key), flaky, Some("idem-2")).await.status, 200);
    assert_eq!(g.fake.count("flaky otter"), 2);
}

async fn keys_limits_and_revocation_hold_at_once(db: &TestDatabase) {
    let g = gateway(db).await;
    // With keys in the ledger, no key (or a wrong one) is a 401.
    let limited = g
        .key(NewKey {
            allowed_models: Some(vec!["dall-e-2".into()]),
            rate_limits: RateLimits { requests_per_minute: Some(2), images_per_minute: None },
            budget: Some(Budget {
                soft_limit_usd: Some(Decimal::new(1, 3)),
                ..Budget::capped(Period::Week, Decimal::ONE)
            }),
            ..NewKey::user("limited")
        })
        .await;
    let body = json!({"model": "dall-e-2", "prompt": "a red cat", "size": "256x256"});
    assert_eq!(g.generate_with(None, body.clone(), None).await.status, 401);
    assert_eq!(g.generate_with(Some("ig-wrong"), body.clone(), None).await.status, 401);

    // Models outside the key's list: 403 naming the model.
    let r = g.generate(&limited, "a red cat").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body["error"]["param"], "model");

    // Two requests a minute: the third is a 429 with Retry-After. The second passes the soft budget
    // ($0.016 each against $0.001): a warning header.
    let first = g.generate_with(Some(&limited), body.clone(), None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let second = g.generate_with(Some(&limited), body.clone(), None).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert!(second.headers.contains_key("x-imagegate-budget-warning"));
    let third = g.generate_with(Some(&limited), body.clone(), None).await;
    assert_eq!(third.status, 429, "{}", third.body);
    assert_eq!(third.body["error"]["code"], "rate_limit_exceeded");
    let wait: u64 = third.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");

    // Revoked: the next request fails, here and (same database) on every instance.
    let admin = g.key(NewKey { scope: Scope::Admin, ..NewKey::user("admin") }).await;
    assert_eq!(g.generate_with(Some(&admin), body.clone(), None).await.status, 200);
    let id = g.ledger.list_keys().await.unwrap().into_iter().find(|k| k.name == "admin").unwrap().id;
    g.ledger.revoke_key(&id).await.unwrap();
    let r = g.generate_with(Some(&admin), body, None).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "invalid_api_key");
}

async fn admins_manage_keys_and_read_usage_and_costs(db: &TestDatabase) {
    let g = gateway(db).await;
    let admin = g.key(NewKey { scope: Scope::Admin, ..NewKey::user("admin") }).await;
    let created: Value = g
        .http
        .post(format!("{}/admin/keys", g.url))
        .bearer_auth(&admin)
        .json(&json!({"name": "team", "budget_usd": "2.5", "period": "month", "models": ["dall-e-2"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["value"].as_str().unwrap().to_owned();
    assert_eq!(created["budget"]["limit_usd"], json!(2.5));
    let body = json!({"model": "dall-e-2", "prompt": "a red cat", "size": "256x256", "n": 2});
    let r = g.generate_with(Some(&secret), body, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let cost = r.headers["x-imagegate-cost-usd"].to_str().unwrap().to_owned();

    let get = |path: String, key: String| {
        let http = g.http.clone();
        async move {
            let r = http.get(path).bearer_auth(key).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    // The ledger's clock stands still: move it past the request, so that "until now" includes it.
    g.clock.advance(chrono::TimeDelta::seconds(1));
    let start = g.ledger.now().timestamp() - 3600;
    let (status, text) =
        get(format!("{}/organization/costs?start_time={start}&group_by=line_item", g.url), admin.clone()).await;
    assert_eq!(status, 200, "{text}");
    // The amount is the exact decimal of the cost header, written as a JSON number.
    assert!(text.contains(&format!("\"value\":{cost},\"currency\":\"usd\"")), "{text} lacks {cost}");
    assert!(text.contains("\"line_item\":\"dall-e-2\""), "{text}");
    let (status, text) = get(
        format!("{}/organization/usage/images?start_time={start}&bucket_width=1h&group_by=model,size", g.url),
        admin.clone(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let results: Vec<&Value> =
        v["data"].as_array().unwrap().iter().flat_map(|b| b["results"].as_array().unwrap()).collect();
    assert_eq!(results.len(), 1, "{text}");
    assert_eq!((results[0]["images"].as_u64(), results[0]["size"].as_str()), (Some(2), Some("256x256")));

    // Clear errors: a bucket width OpenAI has but we do not, a user key, no key.
    let (status, text) =
        get(format!("{}/organization/usage/images?start_time={start}&bucket_width=1m", g.url), admin.clone()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("bucket_width"), "{text}");
    let (status, _) = get(format!("{}/organization/costs?start_time={start}", g.url), secret.clone()).await;
    assert_eq!(status, 403);

    // Updating through the API: a merge patch; null removes.
    let id = created["id"].as_str().unwrap();
    let patch = json!({"models": null, "budget": {"budget_usd": "5", "period": "day"}, "requests_per_minute": 30});
    let r = g.http.post(format!("{}/admin/keys/{id}", g.url)).bearer_auth(&admin).json(&patch).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let updated: Value = r.json().await.unwrap();
    assert_eq!((updated["allowed_models"].is_null(), &updated["budget"]["period"]), (true, &json!("day")));
    assert_eq!((&updated["budget"]["limit_usd"], &updated["requests_per_minute"]), (&json!(5), &json!(30)));
    let r = g
        .http
        .post(format!("{}/admin/keys/{id}", g.url))
        .bearer_auth(&admin)
        .json(&json!({"colour": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let mini = g.generate(&secret, "now any model").await;
    assert_eq!(mini.status, 200, "{}", mini.body);

    // Revoking through the API.
    let r = g.http.delete(format!("{}/admin/keys/{id}", g.url)).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = json!({"model": "dall-e-2", "prompt": "a red cat", "size": "256x256"});
    assert_eq!(g.generate_with(Some(&secret), body, None).await.status, 401);
}
