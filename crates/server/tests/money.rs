//! Money that cannot leak, proven over HTTP in front of the fake upstream (which bills what it
//! generates, read or not): clients that hang up pay what the upstream produced for them, a hold lives
//! as long as its request, input is billed once, the cost shown is the cost charged, nothing is ever
//! billed as free, and nothing of the client reaches the upstream. Every scenario runs on SQLite and,
//! when `IMAGEGATE_TEST_DATABASE_URL` is set, on PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Setup, gateway, gateway_with, medium};
use ledger::testing::TestDatabase;
use ledger::{CostSource, Ledger, LedgerOptions, RequestStatus};
use rust_decimal::Decimal;
use serde_json::{Value, json};

on_both_databases!(
    an_abandoned_stream_pays_for_every_image_the_upstream_made,
    an_abandoned_request_pays_what_the_upstream_billed_and_its_retry_is_a_replay,
    a_stream_longer_than_the_hold_ttl_keeps_its_hold,
    streamed_and_unstreamed_jobs_cost_the_same,
    the_cost_shown_is_the_cost_charged,
    an_unpricable_result_is_charged_its_worst_case_not_given_away,
    nothing_of_the_client_reaches_the_upstream,
    internal_failures_answer_in_the_envelope,
    random_requests_hang_ups_and_faults_never_leak_or_overspend,
    a_retried_stream_is_told_it_succeeded_not_run_again,
);

fn stream_body(prompt: &str, n: u32) -> Value {
    json!({"model": "gpt-image-1-mini", "prompt": prompt, "quality": "low", "size": "1024x1024", "n": n, "stream": true})
}

/// Finding 1: a key whose budget fits one worst case streams n=10, reads 9 completed images and hangs
/// up. The upstream still made (and bills) all ten: all ten are charged, once, within the budget, and
/// the same trick cannot be repeated.
async fn an_abandoned_stream_pays_for_every_image_the_upstream_made(db: &TestDatabase) {
    let g = gateway(db).await;
    let prompt = "[fault:gap=200] ten otters, nine read";
    let body = stream_body(prompt, 10);
    let worst = g.worst_case_of(body.clone()).await;
    let (id, key) = g.capped_key("hangs-up", worst).await;

    let mut events = g.stream(&key, body.clone(), None).await;
    let request_id = events.response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut seen = Vec::new();
    while seen.len() < 9 {
        let e = events.next().await.expect("the stream ended early");
        if e.is_completed() {
            seen.push(e.cost());
        }
    }
    drop(events); // hang up after nine images

    let row = g.row_of(&request_id).await;
    assert_eq!(g.fake.billed_images(), 10, "the upstream made all ten");
    assert_eq!(row.entry.error_code.as_deref(), Some("client_disconnected"));
    assert_eq!((row.status, row.entry.n), (RequestStatus::Succeeded, 10), "every image made is charged");
    assert_eq!(row.entry.cost_source, Some(CostSource::Priced));
    let nine: Decimal = seen.iter().sum();
    assert!(row.cost_usd > nine, "charged {} for ten images, the nine read cost {nine}", row.cost_usd);
    assert_eq!(g.money(&id).await, (row.cost_usd, Decimal::ZERO));
    assert!(row.cost_usd <= worst);

    // The same job read to the end by another key costs exactly the same.
    let (_, other) = g.capped_key("reads-all", worst).await;
    let mut events = g.stream(&other, body.clone(), None).await;
    let mut total = Decimal::ZERO;
    while let Some(e) = events.next().await {
        if e.is_completed() {
            total += e.cost();
        }
    }
    assert_eq!(total, row.cost_usd);

    // No second free round: what is left of the budget does not hold another worst case.
    let again = g
        .generate_with(
            Some(&key),
            json!({"model": "gpt-image-1-mini", "prompt": prompt, "quality": "low",
        "size": "1024x1024", "n": 10}),
            None,
        )
        .await;
    assert_eq!(again.status, 429, "{}", again.body);
}

/// Finding 2: a request abandoned while the upstream works is charged what the upstream billed (its
/// answer is read to the end); its ledger row says the client went away; a retry with the same
/// Idempotency-Key gets the images it paid for instead of running (and paying) again.
async fn an_abandoned_request_pays_what_the_upstream_billed_and_its_retry_is_a_replay(db: &TestDatabase) {
    let g = gateway(db).await;
    let prompt = "[fault:slow=1500] an otter nobody waits for";
    let (id, key) = g.capped_key("impatient", Decimal::ONE).await;
    let url = format!("{}/images/generations", g.url);
    let http = g.http.clone();
    let k = key.clone();
    let abandoned = tokio::spawn(async move {
        http.post(url).bearer_auth(k).header("Idempotency-Key", "retry-me").json(&medium(prompt)).send().await
    });
    while g.fake.count("nobody waits") == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    abandoned.abort(); // the client hangs up while the upstream works
    let _ = abandoned.await;

    let row = loop {
        if let Some(row) = g.rows_of(&id).await.into_iter().next() {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(g.fake.billed_images(), 1);
    assert_eq!(row.entry.error_code.as_deref(), Some("client_disconnected"));
    assert_eq!((row.status, row.entry.cost_source), (RequestStatus::Succeeded, Some(CostSource::Priced)));
    let (_, control) = g.capped_key("control", Decimal::ONE).await;
    let served = g.generate(&control, prompt).await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(row.cost_usd, served.cost(), "charged what the same request costs when read");
    assert_eq!(g.money(&id).await, (row.cost_usd, Decimal::ZERO));

    // The retry gets the response that was paid for: not run, not charged again.
    let retry = g.generate_with(Some(&key), medium(prompt), Some("retry-me")).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert!(retry.body["data"][0]["b64_json"].is_string());
    assert_eq!(retry.cost(), row.cost_usd);
    assert_eq!(g.fake.count("nobody waits"), 2, "the control only");
    assert_eq!(g.money(&id).await, (row.cost_usd, Decimal::ZERO));
}

/// Finding 3: a stream that runs longer than the reservation TTL keeps its hold (the heartbeat renews
/// it), so a second request on the same budget is refused while it runs, and the budget is never
/// overrun. (Without the heartbeat the sweep released the live hold after the TTL, the second request
/// was admitted, and both were charged: 2x the budget.)
async fn a_stream_longer_than_the_hold_ttl_keeps_its_hold(db: &TestDatabase) {
    // The shortest TTL the server accepts with a 2 s upstream timeout: 12 s.
    let setup = Setup {
        provider_toml: "api_key_env = \"FAKE_UPSTREAM_KEY\"\ntimeout_secs = 2\nmax_retries = 0".into(),
        reservation_ttl: Duration::from_secs(12),
        real_clock: true,
        ..Setup::default()
    };
    let g = gateway_with(db, setup).await;
    // Ten images with a partial image each, 0.8 s apart: 15.2 s, past the TTL. (The upstream's idle
    // timeout, 2 s, leaves each gap room on a loaded machine; with 1 s, 0.3 s was too little.)
    let mut body = stream_body("[fault:gap=800] a slow stream", 10);
    body["partial_images"] = json!(1);
    let worst = g.worst_case_of(body.clone()).await;
    let budget = worst * Decimal::new(15, 1);
    let (id, key) = g.capped_key("long-stream", budget).await;

    let started = std::time::Instant::now();
    let mut events = g.stream(&key, body.clone(), None).await;
    let mut completed = 0;
    let mut tried_during = false;
    while let Some(e) = events.next().await {
        completed += usize::from(e.is_completed());
        // Past the TTL, with the stream still running: the hold is still there.
        if !tried_during && started.elapsed() > Duration::from_secs(13) && completed < 10 {
            tried_during = true;
            // Another instance sweeps now, past the TTL since the hold was taken: a live hold is not
            // expired (this instance's heartbeat renews it), so nothing is released.
            let other = Ledger::connect_with(&db.url, LedgerOptions::default()).await.unwrap();
            assert_eq!(other.release_expired(other.now()).await.unwrap(), 0, "a live hold was released");
            other.close().await;
            let second = g.generate_with(Some(&key), stream_body("a second request", 10), None).await;
            assert_eq!(second.status, 429, "the live hold expired: {}", second.body);
            let (spent, held) = g.money(&id).await;
            assert!(held > Decimal::ZERO, "the live request's hold was released");
            assert!(spent + held <= budget);
        }
    }
    assert!(tried_during, "the stream ended before the TTL passed ({:?})", started.elapsed());
    assert_eq!(completed, 10);
    let (spent, held) = g.money(&id).await;
    assert_eq!(held, Decimal::ZERO);
    assert!(spent <= budget, "spent {spent} of {budget}");
}

/// Finding 4: n=3 with a 400-word prompt costs the same streamed or not: the input tokens are billed
/// once (403, not 1209), and the stream's events add up to the ledger's charge.
async fn streamed_and_unstreamed_jobs_cost_the_same(db: &TestDatabase) {
    let g = gateway(db).await;
    let (_, key) = g.capped_key("same", Decimal::ONE).await;
    let prompt = vec!["otter"; 400].join(" ");
    let whole = json!({"model": "gpt-image-1-mini", "prompt": prompt, "quality": "low", "size": "1024x1024", "n": 3});
    let plain = g.generate_with(Some(&key), whole.clone(), None).await;
    assert_eq!(plain.status, 200, "{}", plain.body);
    let plain_row = g.row_of(&plain.request_id()).await;

    let mut streamed = whole.clone();
    streamed["stream"] = json!(true);
    let mut events = g.stream(&key, streamed, None).await;
    let request_id = events.response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut total = Decimal::ZERO;
    while let Some(e) = events.next().await {
        if e.is_completed() {
            total += e.cost();
        }
    }
    let row = g.row_of(&request_id).await;
    assert_eq!(row.entry.tokens.input_text, 403, "the prompt's tokens, once");
    assert_eq!(plain_row.entry.tokens.input_text, 403);
    assert_eq!(row.cost_usd, plain.cost(), "streamed {} vs unstreamed {}", row.cost_usd, plain.cost());
    assert_eq!(total, row.cost_usd, "the events add up to the charge");
    assert_eq!(plain_row.cost_usd, plain.cost());
}

/// A streamed response is delivered once and not stored: a retry with the same Idempotency-Key gets a
/// 409 naming the request that succeeded and what it was charged (not a 200 without images, and not a
/// second run and charge).
async fn a_retried_stream_is_told_it_succeeded_not_run_again(db: &TestDatabase) {
    let g = gateway(db).await;
    let (id, key) = g.capped_key("retries", Decimal::ONE).await;
    let body = stream_body("an otter streamed once", 2);
    let mut events = g.stream(&key, body.clone(), Some("stream-once")).await;
    let request_id = events.response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut images = 0;
    while let Some(e) = events.next().await {
        images += usize::from(e.is_completed());
    }
    assert_eq!(images, 2);
    let row = g.row_of(&request_id).await;

    let retry = g.generate_with(Some(&key), body, Some("stream-once")).await;
    assert_eq!(retry.status, 409, "{}", retry.body);
    let error = &retry.body["error"];
    assert_eq!(error["code"], "idempotent_response_not_stored", "{}", retry.body);
    assert_eq!(error["param"], "idempotency-key");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(&request_id) && message.contains(&row.cost_usd.normalize().to_string()), "{message}");
    assert_eq!(g.fake.count("streamed once"), 1, "not run again");
    assert_eq!(g.money(&id).await, (row.cost_usd, Decimal::ZERO), "not charged again");
}

/// Finding 5: an upstream that reports more usage than the worst case is charged the hold, never more,
/// and the header, the body and the ledger all say the same amount.
async fn the_cost_shown_is_the_cost_charged(db: &TestDatabase) {
    let g = gateway(db).await;
    let prompt = "[fault:usage-x=50] a greedy upstream";
    let worst = g.worst_case(prompt).await;
    let (id, key) = g.capped_key("capped", Decimal::ONE).await;
    let r = g.generate(&key, prompt).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let row = g.row_of(&r.request_id()).await;
    assert_eq!(r.cost(), worst, "charged the hold");
    assert_eq!(row.cost_usd, r.cost());
    assert_eq!(r.body["imagegate"]["cost_usd"].as_str().unwrap(), r.headers["x-imagegate-cost-usd"]);
    let lines: Decimal = r.body["imagegate"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["amount_usd"].as_str().unwrap().parse::<Decimal>().unwrap())
        .sum();
    assert_eq!(lines, r.cost(), "the lines add up to what is shown");
    assert_eq!(row.entry.cost_source, Some(CostSource::Capped));
    assert_eq!(g.money(&id).await, (worst, Decimal::ZERO));

    // Streamed: every event's cost is charged, and all of them together never pass the hold.
    let body = stream_body("[fault:usage-x=50] [fault:gap=10] a greedy stream", 3);
    let worst = g.worst_case_of(body.clone()).await;
    let (id, key) = g.capped_key("capped-stream", Decimal::ONE).await;
    let mut events = g.stream(&key, body, None).await;
    let request_id = events.response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut shown = Decimal::ZERO;
    while let Some(e) = events.next().await {
        if e.is_completed() {
            shown += e.cost();
        }
    }
    let row = g.row_of(&request_id).await;
    assert_eq!((shown, row.cost_usd), (worst, worst));
    assert_eq!(g.money(&id).await, (worst, Decimal::ZERO));
}

/// A result the catalog cannot price (no usage, and a size the output-token table lacks) is charged
/// its worst case, said so in the response and the ledger: never recorded as free.
async fn an_unpricable_result_is_charged_its_worst_case_not_given_away(db: &TestDatabase) {
    let g = gateway(db).await;
    let prompt = "[fault:no-usage] [fault:size=4096x4096] an odd answer";
    let worst = g.worst_case(prompt).await;
    let (id, key) = g.capped_key("odd", Decimal::ONE).await;
    let r = g.generate(&key, prompt).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.cost(), worst);
    let row = g.row_of(&r.request_id()).await;
    assert_eq!((row.cost_usd, row.entry.cost_source), (worst, Some(CostSource::WorstCase)));
    assert_eq!(g.money(&id).await, (worst, Decimal::ZERO));
    let line = r.body["imagegate"]["lines"][0]["item"].as_str().unwrap();
    assert!(line.contains("worst case"), "{line}");
}

/// The upstream gets its own key and OpenAI's fields only: never the client's key, never imagegate's
/// extension fields, for generations, multipart edits and streams.
async fn nothing_of_the_client_reaches_the_upstream(db: &TestDatabase) {
    let g = gateway(db).await;
    let (_, key) = g.capped_key("private", Decimal::ONE).await;
    let extensions = json!({"seed": 7, "service_tier": "default"});
    let mut body = medium("a private otter");
    body.as_object_mut().unwrap().extend(extensions.as_object().unwrap().clone());
    assert_eq!(g.generate_with(Some(&key), body.clone(), None).await.status, 200);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let mut events = g.stream(&key, streamed, None).await;
    while events.next().await.is_some() {}

    let png = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(32, 32, image::Rgb([1, 2, 3])).write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let form = reqwest::multipart::Form::new()
        .text("model", "gpt-image-1-mini")
        .text("prompt", "a private edit")
        .text("seed", "7")
        .text("service_tier", "default")
        .part("image", reqwest::multipart::Part::bytes(png).file_name("a.png").mime_str("image/png").unwrap());
    let r = g.http.post(format!("{}/images/edits", g.url)).bearer_auth(&key).multipart(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let sent = g.fake.requests();
    assert_eq!(sent.len(), 3);
    for r in &sent {
        assert_eq!(r.authorization.as_deref(), Some("Bearer sk-upstream"), "{}", r.path);
        assert!(!format!("{r:?}").contains(&key), "the client's key reached the upstream: {r:?}");
        for field in ["seed", "service_tier", "decoder", "steps"] {
            assert!(r.json.as_ref().is_none_or(|j| j.get(field).is_none()), "{field} reached the upstream");
            assert!(r.part(field).is_none(), "{field} reached the upstream as a part");
        }
    }
}

/// Failures inside the server answer in OpenAI's envelope: a ledger that is gone (503
/// `ledger_unavailable`, nothing spent) and a request the catalog cannot price (500 `unpriced_model`,
/// the upstream never called).
async fn internal_failures_answer_in_the_envelope(db: &TestDatabase) {
    // A catalog whose gpt-image-1-mini knows output tokens for low 1024x1024 only.
    let prices = r#"
[prices."gpt-image-1-mini"]
billing_basis = "tokens"
[prices."gpt-image-1-mini".tokens]
text_input = "2"
image_input = "2.5"
image_output = "8"
[prices."gpt-image-1-mini".output_tokens]
low = { "1024x1024" = 272 }
"#;
    let g = gateway_with(db, Setup { extra_toml: prices.into(), ..Setup::default() }).await;
    let (_, key) = g.capped_key("unpriced", Decimal::ONE).await;
    let r = g.generate(&key, "a medium otter nobody priced").await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(
        (r.body["error"]["code"].as_str(), r.body["error"]["type"].as_str()),
        (Some("unpriced_model"), Some("server_error"))
    );
    assert_eq!(r.body["error"]["param"], "model");
    assert_eq!(g.fake.count("nobody priced"), 0, "never sent upstream");

    g.ledger.close().await;
    let r = g.generate(&key, "an otter with no ledger").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "ledger_unavailable");
    assert!(!r.body["error"]["message"].as_str().unwrap().contains("sqlx"), "{}", r.body);
    assert_eq!(g.fake.count("no ledger"), 0);
}

/// Random requests (streamed or not, one to three images, upstream faults: slow, failing once,
/// dropping mid-answer, billing more than the table) and random hang-ups, six at a time, against one
/// budget: spent never passes it, spent is exactly the ledger's rows, every request leaves one row,
/// and every image the upstream made and billed is charged (no free image), however the client
/// behaved.
async fn random_requests_hang_ups_and_faults_never_leak_or_overspend(db: &TestDatabase) {
    use rand::{Rng, SeedableRng};
    let g = std::sync::Arc::new(gateway(db).await);
    let budget = Decimal::new(5, 2);
    let (id, key) = g.capped_key("random", budget).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let faults =
        ["", "[fault:slow=300]", "[fault:500-once]", "[fault:drop-mid]", "[fault:usage-x=3]", "[fault:gap=50]"];
    let total = 24;
    let mut tasks = Vec::new();
    for i in 0..total {
        let fault = faults[rng.random_range(0..faults.len())];
        let stream = rng.random_bool(0.5);
        let n = rng.random_range(1..=3u32);
        let hang_up_after = rng.random_bool(0.4).then(|| rng.random_range(0..3usize));
        let body = json!({"model": "gpt-image-1-mini", "prompt": format!("{fault} random {i}"), "quality": "low",
            "size": "1024x1024", "n": n, "stream": stream});
        let (g, key) = (g.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let r = g.http.post(format!("{}/images/generations", g.url)).bearer_auth(&key).json(&body);
            match hang_up_after {
                // Hang up once the upstream has the request (or after a few events of a stream).
                Some(events) if stream => {
                    let Ok(mut r) = r.send().await else { return };
                    for _ in 0..events {
                        if r.chunk().await.ok().flatten().is_none() {
                            break;
                        }
                    }
                }
                Some(_) => {
                    let prompt = format!("random {i}");
                    let pending = tokio::spawn(r.send());
                    while g.fake.count(&prompt) == 0 && !pending.is_finished() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    pending.abort();
                }
                None => {
                    if let Ok(r) = r.send().await {
                        let _ = r.bytes().await;
                    }
                }
            }
        }));
        if tasks.len() == 6 {
            for t in tasks.drain(..) {
                t.await.unwrap();
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Abandoned requests finish in the background: wait for every row.
    let rows = loop {
        let rows = g.rows_of(&id).await;
        if rows.len() >= total {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), total, "one row per request");
    let (spent, held) = g.money(&id).await;
    assert_eq!(held, Decimal::ZERO, "nothing is left held");
    assert!(spent <= budget, "spent {spent} of {budget}");
    assert_eq!(spent, rows.iter().map(|r| r.cost_usd).sum::<Decimal>(), "spent is the rows");
    let charged_images: u64 = rows.iter().map(|r| u64::from(r.entry.n)).sum();
    assert_eq!(charged_images, g.fake.billed_images(), "every image the upstream billed is charged, once");
    assert!(rows.iter().any(|r| r.status == RequestStatus::Refused), "the budget ran out: the test reached it");
}

/// A hold TTL that an upstream attempt could outlast is refused at start, naming both settings.
#[tokio::test]
async fn a_hold_ttl_shorter_than_the_upstream_timeout_is_refused() {
    let db = TestDatabase::sqlite().unwrap();
    let toml = "[providers.openai]\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"gpt-image-1-mini\"]\napi_key_env = \"FAKE_UPSTREAM_KEY\"\ntimeout_secs = 30\n";
    let config = server::config::Config::from_toml(toml, &common::TestEnv).unwrap();
    for (ttl, accepted) in [(39, false), (40, true)] {
        let options = LedgerOptions { reservation_ttl: Duration::from_secs(ttl), ..LedgerOptions::default() };
        let ledger = Ledger::connect_with(&db.url, options).await.unwrap();
        let state = server::AppState::from_config(&config).unwrap().with_ledger(ledger).await;
        match state {
            Ok(_) => assert!(accepted, "a {ttl} s TTL was accepted with a 30 s upstream timeout"),
            Err(e) => {
                assert!(!accepted, "{e}");
                let message = e.to_string();
                assert!(message.contains("--reservation-ttl-secs") && message.contains("timeout_secs"), "{message}");
            }
        }
    }
}
