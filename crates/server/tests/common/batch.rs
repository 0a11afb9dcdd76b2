//! The Files and Batch APIs over HTTP, for the tests that run batches.

use std::time::Duration;

use serde_json::{Value, json};

use super::Gateway;

pub fn jsonl(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

pub fn line(custom_id: &str, body: Value) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/images/generations", "body": body})
}

pub async fn upload(g: &Gateway, key: &str, content: String) -> Value {
    let part = reqwest::multipart::Part::text(content).file_name("batch.jsonl");
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
    let r = g.http.post(format!("{}/files", g.url)).bearer_auth(key).multipart(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

pub async fn get(g: &Gateway, key: &str, path: &str) -> (u16, String) {
    let r = g.http.get(format!("{}/{path}", g.url)).bearer_auth(key).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

pub async fn create(g: &Gateway, key: &str, file_id: &str) -> Value {
    let body = json!({"input_file_id": file_id, "endpoint": "/v1/images/generations", "completion_window": "24h",
        "metadata": {"job": "test"}});
    let r = g.http.post(format!("{}/batches", g.url)).bearer_auth(key).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.unwrap()
}

pub async fn until_done(g: &Gateway, key: &str, id: &str) -> Value {
    for _ in 0..600 {
        let (status, text) = get(g, key, &format!("batches/{id}")).await;
        assert_eq!(status, 200, "{text}");
        let batch: Value = serde_json::from_str(&text).unwrap();
        if ["completed", "failed", "expired", "cancelled"].contains(&batch["status"].as_str().unwrap()) {
            return batch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the batch {id} never finished");
}
