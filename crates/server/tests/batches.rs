//! The Files and Batch APIs against the fake upstream: a batch runs every line once at the batch tier
//! (half price) and its output file has every answer; a batch with one bad line fails whole with that
//! line's error and runs nothing; another key finds nothing of someone else's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::batch::{create, get, jsonl, line, until_done, upload};
use common::{Gateway, gateway, medium};
use ledger::testing::TestDatabase;
use ledger::{Budget, NewKey, Period, RequestStatus};
use rust_decimal::Decimal;
use serde_json::{Value, json};

async fn funded_key(g: &Gateway, name: &str) -> (String, String) {
    let created = g
        .ledger
        .create_key(NewKey { budget: Some(Budget::capped(Period::Total, Decimal::TEN)), ..NewKey::user(name) })
        .await
        .unwrap();
    (created.secret, created.key.id)
}

async fn a_batch_runs_each_line_once_at_half_price(db: &TestDatabase) {
    let g = gateway(db).await;
    let (key, key_id) = funded_key(&g, "batcher").await;
    let lines: Vec<Value> = (0..20).map(|i| line(&format!("req-{i}"), medium(&format!("a fox <{i}>")))).collect();
    let file = upload(&g, &key, jsonl(&lines)).await;
    assert_eq!((file["object"].as_str(), file["purpose"].as_str()), (Some("file"), Some("batch")));
    let batch = create(&g, &key, file["id"].as_str().unwrap()).await;
    assert_eq!((batch["object"].as_str(), batch["metadata"]["job"].as_str()), (Some("batch"), Some("test")));
    let id = batch["id"].as_str().unwrap();
    let done = until_done(&g, &key, id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"], json!({"total": 20, "completed": 20, "failed": 0}));
    assert!(done["error_file_id"].is_null());
    let (status, output) = get(&g, &key, &format!("files/{}/content", done["output_file_id"].as_str().unwrap())).await;
    assert_eq!(status, 200);
    let out: Vec<Value> = output.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(out.len(), 20);
    let one_default = g.generate_with(Some(&key), medium("a fox <0>"), None).await;
    let mut charged = Decimal::ZERO;
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o["custom_id"], format!("req-{i}"));
        assert_eq!(o["response"]["status_code"], 200);
        assert!(o["response"]["body"]["data"][0]["b64_json"].as_str().unwrap().len() > 100);
        assert_eq!(o["response"]["body"]["imagegate"]["service_tier"], "batch");
        let row = g.row_of(o["response"]["request_id"].as_str().unwrap()).await;
        assert_eq!((row.status, row.entry.tier.as_str()), (RequestStatus::Succeeded, "batch"));
        charged += row.cost_usd;
    }
    // Every line ran once upstream, and each cost half the same request at the default tier.
    for i in 0..20 {
        let expected = if i == 0 { 2 } else { 1 };
        assert_eq!(g.fake.count(&format!("<{i}>")), expected, "line {i}");
    }
    let first = g.row_of(out[0]["response"]["request_id"].as_str().unwrap()).await;
    assert_eq!(first.cost_usd * Decimal::TWO, one_default.cost());
    let (spent, held) = g.money(&key_id).await;
    assert_eq!((spent, held), (charged + one_default.cost(), Decimal::ZERO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_runs_each_line_once_at_half_price_sqlite() {
    a_batch_runs_each_line_once_at_half_price(&TestDatabase::sqlite().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_runs_each_line_once_at_half_price_postgres() {
    let Some(db) = TestDatabase::postgres().await.unwrap() else { return };
    a_batch_runs_each_line_once_at_half_price(&db).await;
    db.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_with_a_bad_line_fails_whole_and_runs_nothing() {
    let db = TestDatabase::sqlite().unwrap();
    let g = gateway(&db).await;
    let (key, key_id) = funded_key(&g, "batcher").await;
    let mut bad = medium("a bad fox");
    bad["size"] = json!("999x999");
    let lines = [line("a", medium("a good fox")), line("b", bad), line("a", medium("a twin fox"))];
    let file = upload(&g, &key, jsonl(&lines)).await;
    let batch = create(&g, &key, file["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "failed", "{batch}");
    let errors = batch["errors"]["data"].as_array().unwrap();
    let got: Vec<(u64, &str, Option<&str>)> = errors
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap(), e["param"].as_str()))
        .collect();
    assert_eq!(got, [(2, "invalid_value", Some("body.size")), (3, "duplicate_custom_id", Some("custom_id"))]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(g.fake.count("fox"), 0);
    assert_eq!(g.money(&key_id).await, (Decimal::ZERO, Decimal::ZERO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_key_finds_nothing_of_someone_elses_files_and_batches() {
    let db = TestDatabase::sqlite().unwrap();
    let g = gateway(&db).await;
    let (key, _) = funded_key(&g, "owner").await;
    let (other, _) = funded_key(&g, "other").await;
    let file = upload(&g, &key, jsonl(&[line("a", medium("a private fox"))])).await;
    let file_id = file["id"].as_str().unwrap();
    let batch = create(&g, &key, file_id).await;
    let id = batch["id"].as_str().unwrap();
    let done = until_done(&g, &key, id).await;
    let output = done["output_file_id"].as_str().unwrap();
    for path in [
        format!("files/{file_id}"),
        format!("files/{file_id}/content"),
        format!("batches/{id}"),
        format!("files/{output}/content"),
    ] {
        let (status, text) = get(&g, &other, &path).await;
        assert_eq!(status, 404, "{path}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["code"], "not_found");
    }
    let r = g
        .http
        .post(format!("{}/batches", g.url))
        .bearer_auth(&other)
        .json(&json!({"input_file_id": file_id, "endpoint": "/v1/images/generations", "completion_window": "24h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let (_, list) = get(&g, &other, "batches").await;
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["data"], json!([]));
    let (_, list) = get(&g, &key, "files?purpose=batch").await;
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["data"][0]["id"], file_id);
    let r = g.http.delete(format!("{}/files/{file_id}", g.url)).bearer_auth(&other).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = g.http.delete(format!("{}/files/{file_id}", g.url)).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"id": file_id, "object": "file", "deleted": true}));
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(w, h, image::Rgb([200, 80, 40])).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// JSON edits name their images by `file_id`: the caller's uploaded files, and no one else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_edits_take_their_images_from_the_callers_files() {
    let db = TestDatabase::sqlite().unwrap();
    let g = gateway(&db).await;
    let (key, _) = funded_key(&g, "owner").await;
    let (other, _) = funded_key(&g, "other").await;
    let part = reqwest::multipart::Part::bytes(png(64, 64)).file_name("photo.png");
    let form = reqwest::multipart::Form::new().text("purpose", "vision").part("file", part);
    let r = g.http.post(format!("{}/files", g.url)).bearer_auth(&key).multipart(form).send().await.unwrap();
    let file: Value = r.json().await.unwrap();
    let id = file["id"].as_str().unwrap();
    let edit =
        json!({"model": "gpt-image-1-mini", "prompt": "make it blue", "images": [{"file_id": id}], "quality": "low"});
    let send = |key: &str| g.http.post(format!("{}/images/edits", g.url)).bearer_auth(key).json(&edit).send();
    let r = send(&key).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert!(body["data"][0]["b64_json"].as_str().unwrap().len() > 100);
    let upstream = g.fake.requests().into_iter().last().unwrap();
    assert_eq!(upstream.part("image").map(|p| p.bytes.len()), Some(png(64, 64).len()));
    let r = send(&other).await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let error: Value = r.json().await.unwrap();
    assert_eq!(
        (error["error"]["code"].as_str(), error["error"]["param"].as_str()),
        (Some("file_not_found"), Some("images[0].file_id"))
    );
}

/// Waits until the batch has at least `n` lines done.
async fn until_some_done(g: &Gateway, key: &str, id: &str, n: u64) {
    for _ in 0..600 {
        let (_, text) = get(g, key, &format!("batches/{id}")).await;
        let batch: Value = serde_json::from_str(&text).unwrap();
        if batch["request_counts"]["completed"].as_u64().unwrap() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the batch {id} made no progress");
}

/// (Expiry takes the same path: `ledger/tests/ledger.rs::batch_lines_are_claimed_once_and_batches_expire`.)
/// What a stopped batch shows once the lines that were running when it stopped have finished (they
/// run to their end and are charged): the lines that ran in the output, each charged once; every other
/// line in the error file with `code`, never sent upstream.
async fn stopped_batch_is_honest(g: &Gateway, key: &str, key_id: &str, id: &str, code: &str, prefix: &str) {
    let mut last = String::new();
    for _ in 0..500 {
        let (_, text) = get(g, key, &format!("batches/{id}")).await;
        let done: Value = serde_json::from_str(&text).unwrap();
        let counts = &done["request_counts"];
        let (total, completed, failed) = (
            counts["total"].as_u64().unwrap(),
            counts["completed"].as_u64().unwrap(),
            counts["failed"].as_u64().unwrap(),
        );
        let (_, output) = get(g, key, &format!("files/{}/content", done["output_file_id"].as_str().unwrap())).await;
        let (_, errors) = get(g, key, &format!("files/{}/content", done["error_file_id"].as_str().unwrap())).await;
        let (spent, held) = g.money(key_id).await;
        let ran = g.fake.count(prefix) as u64;
        let settled = held.is_zero()
            && completed + failed == total
            && (output.lines().count() as u64, errors.lines().count() as u64, ran) == (completed, failed, completed);
        if !settled {
            last = format!("{done}\nran upstream: {ran}, held: {held}");
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert!(completed >= 1 && completed < total, "{done}");
        let mut charged = Decimal::ZERO;
        for line in output.lines() {
            let o: Value = serde_json::from_str(line).unwrap();
            charged += g.row_of(o["response"]["request_id"].as_str().unwrap()).await.cost_usd;
        }
        for line in errors.lines() {
            let e: Value = serde_json::from_str(line).unwrap();
            assert_eq!((e["error"]["code"].as_str(), &e["response"]), (Some(code), &Value::Null), "{e}");
        }
        assert_eq!(spent, charged, "the key paid for the lines in the output, once each");
        return;
    }
    panic!("the stopped batch never showed each line once, in its output or its error file: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_batch_charges_what_ran_and_runs_nothing_more() {
    let db = TestDatabase::sqlite().unwrap();
    let g = gateway(&db).await;
    let (key, key_id) = funded_key(&g, "stopper").await;
    let lines: Vec<Value> =
        (0..16).map(|i| line(&format!("c-{i}"), medium(&format!("[fault:slow=300] cancelled <{i}>")))).collect();
    let file = upload(&g, &key, jsonl(&lines)).await;
    let batch = create(&g, &key, file["id"].as_str().unwrap()).await;
    let id = batch["id"].as_str().unwrap();
    until_some_done(&g, &key, id, 1).await;
    let r = g.http.post(format!("{}/batches/{id}/cancel", g.url)).bearer_auth(&key).send().await.unwrap();
    let cancelling: Value = r.json().await.unwrap();
    assert!(["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap()), "{cancelling}");
    let done = until_done(&g, &key, id).await;
    assert_eq!(done["status"], "cancelled");
    assert!(done["cancelled_at"].as_i64().is_some());
    stopped_batch_is_honest(&g, &key, &key_id, id, "batch_cancelled", "cancelled <").await;
}

/// Lines that do not fit the key's budget fail with `insufficient_quota` in the error file; the budget
/// is never overrun.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lines_beyond_the_budget_fail_with_insufficient_quota() {
    let db = TestDatabase::sqlite().unwrap();
    let g = gateway(&db).await;
    let mut body = medium("a budget fox");
    body["service_tier"] = json!("flex");
    // Room for one line's worst case and a half.
    let worst = g.worst_case_of(body.clone()).await;
    let budget = worst * Decimal::new(15, 1);
    let created = g
        .ledger
        .create_key(NewKey { budget: Some(Budget::capped(Period::Total, budget)), ..NewKey::user("tight") })
        .await
        .unwrap();
    let (key, key_id) = (created.secret, created.key.id);
    let lines: Vec<Value> = (0..6).map(|i| line(&format!("b-{i}"), medium("a budget fox"))).collect();
    let file = upload(&g, &key, jsonl(&lines)).await;
    let batch = create(&g, &key, file["id"].as_str().unwrap()).await;
    let done = until_done(&g, &key, batch["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "completed");
    let failed = done["request_counts"]["failed"].as_u64().unwrap();
    assert!(failed >= 1, "{done}");
    let (_, errors) = get(&g, &key, &format!("files/{}/content", done["error_file_id"].as_str().unwrap())).await;
    for line in errors.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        assert_eq!(e["response"]["status_code"], 429);
        assert_eq!(e["response"]["body"]["error"]["code"], "insufficient_quota", "{e}");
    }
    let (spent, held) = g.money(&key_id).await;
    assert!(spent <= budget && held.is_zero(), "spent {spent} of {budget}");
}
