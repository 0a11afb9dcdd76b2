//! `imagegate batch`: OpenAI's Batch API from the command line, against a running server (batches
//! live in its database and run there): submit a JSONL file (and wait for it, with a progress bar),
//! see a batch's status, list batches, write a finished batch's images named by their `custom_id`,
//! cancel one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args)]
pub struct BatchArgs {
    #[command(subcommand)]
    command: BatchCommand,
    /// The imagegate server the batches live on.
    #[arg(long, env = "IMAGEGATE_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
    /// API key for --server (batches belong to the key that submits them).
    #[arg(long, env = "IMAGEGATE_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Upload a JSONL file of requests and start a batch; prints the batch id on its last line.
    Submit {
        /// One request per line: {"custom_id", "method": "POST", "url", "body"}.
        file: PathBuf,
        /// The endpoint every line calls.
        #[arg(long, default_value = "/v1/images/generations")]
        endpoint: String,
        /// Wait until the batch is finished, showing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// A batch's status and counts (`--json`: OpenAI's batch object).
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The key's batches, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Write a finished batch's images to DIR, named by custom_id (`-2`, `-3`... for more images of a
    /// line); failed lines are listed, and kept in DIR/errors.jsonl.
    Results {
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Cancel a batch: lines not started never run (running ones finish and are charged).
    Cancel { id: String },
}

struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl Client {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}/{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        let response = request.send().await.map_err(|e| format!("cannot reach {}: {e}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        Err(format!("the server answered {status}: {message}"))
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value, String> {
        self.send(request).await?.json().await.map_err(|e| format!("the server's answer is not JSON: {e}"))
    }

    async fn batch(&self, id: &str) -> Result<Value, String> {
        self.json(self.request(reqwest::Method::GET, &format!("batches/{id}"))).await
    }

    async fn file_text(&self, id: &str) -> Result<String, String> {
        let r = self.send(self.request(reqwest::Method::GET, &format!("files/{id}/content"))).await?;
        r.text().await.map_err(|e| format!("cannot read the file {id}: {e}"))
    }
}

pub async fn run(args: BatchArgs) -> Result<(), String> {
    let base = args.server.trim_end_matches('/');
    let base = if base.ends_with("/v1") { base.to_owned() } else { format!("{base}/v1") };
    let client = Client { base, key: args.api_key, http: reqwest::Client::new() };
    match args.command {
        BatchCommand::Submit { file, endpoint, wait } => submit(&client, &file, &endpoint, wait).await,
        BatchCommand::Status { id, json } => {
            let batch = client.batch(&id).await?;
            if json {
                say(&serde_json::to_string_pretty(&batch).unwrap_or_default());
            } else {
                say(&summary(&batch));
            }
            Ok(())
        }
        BatchCommand::List { limit } => {
            let list = client.json(client.request(reqwest::Method::GET, &format!("batches?limit={limit}"))).await?;
            for batch in list["data"].as_array().into_iter().flatten() {
                say(&summary(batch));
            }
            Ok(())
        }
        BatchCommand::Results { id, out } => results(&client, &id, &out).await,
        BatchCommand::Cancel { id } => {
            let batch = client.json(client.request(reqwest::Method::POST, &format!("batches/{id}/cancel"))).await?;
            say(&summary(&batch));
            Ok(())
        }
    }
}

#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

/// `ID  STATUS  DONE/TOTAL (N failed)  ENDPOINT`.
fn summary(batch: &Value) -> String {
    let counts = &batch["request_counts"];
    let (total, completed, failed) = (
        counts["total"].as_u64().unwrap_or(0),
        counts["completed"].as_u64().unwrap_or(0),
        counts["failed"].as_u64().unwrap_or(0),
    );
    format!(
        "{}  {}  {}/{} done ({} failed)  {}",
        batch["id"].as_str().unwrap_or("?"),
        batch["status"].as_str().unwrap_or("?"),
        completed + failed,
        total,
        failed,
        batch["endpoint"].as_str().unwrap_or("")
    )
}

fn finished(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "expired" | "cancelled")
}

async fn submit(client: &Client, file: &Path, endpoint: &str, wait: bool) -> Result<(), String> {
    let content = tokio::fs::read(file).await.map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let name = file.file_name().map_or_else(|| "batch.jsonl".to_owned(), |n| n.to_string_lossy().into_owned());
    let part = reqwest::multipart::Part::bytes(content).file_name(name);
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
    let uploaded = client.json(client.request(reqwest::Method::POST, "files").multipart(form)).await?;
    let file_id = uploaded["id"].as_str().ok_or("the server gave the upload no id")?;
    let body = json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"});
    let mut batch = client.json(client.request(reqwest::Method::POST, "batches").json(&body)).await?;
    let id = batch["id"].as_str().ok_or("the server gave the batch no id")?.to_owned();
    if batch["status"] == "failed" {
        for e in batch["errors"]["data"].as_array().into_iter().flatten() {
            eprintln!("line {}: {}", e["line"], e["message"].as_str().unwrap_or(""));
        }
        say(&id);
        return Err(format!("the batch {id} failed validation: nothing ran or was charged"));
    }
    if wait {
        let total = batch["request_counts"]["total"].as_u64().unwrap_or(0);
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} lines ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        while !finished(batch["status"].as_str().unwrap_or("")) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            batch = client.batch(&id).await?;
            let counts = &batch["request_counts"];
            bar.set_position(counts["completed"].as_u64().unwrap_or(0) + counts["failed"].as_u64().unwrap_or(0));
            bar.set_message(batch["status"].as_str().unwrap_or("").to_owned());
        }
        bar.finish_and_clear();
        eprintln!("{}", summary(&batch));
    }
    say(&id);
    Ok(())
}

async fn results(client: &Client, id: &str, out: &Path) -> Result<(), String> {
    let batch = client.batch(id).await?;
    let status = batch["status"].as_str().unwrap_or("");
    if !finished(status) {
        return Err(format!("the batch {id} is {status}: its results come when it is finished (batch submit --wait)"));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut written = 0;
    if let Some(output) = batch["output_file_id"].as_str() {
        for line in client.file_text(output).await?.lines() {
            let v: Value = serde_json::from_str(line).map_err(|e| format!("a malformed output line: {e}"))?;
            let stem = file_stem(v["custom_id"].as_str().unwrap_or("line"));
            for (i, image) in v["response"]["body"]["data"].as_array().into_iter().flatten().enumerate() {
                let Some(b64) = image["b64_json"].as_str() else { continue };
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| format!("{stem}: the image is not base64: {e}"))?;
                let suffix = if i == 0 { String::new() } else { format!("-{}", i + 1) };
                let path = out.join(format!("{stem}{suffix}.{}", extension(&bytes)));
                std::fs::write(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                written += 1;
            }
        }
    }
    let mut failed = 0;
    if let Some(errors) = batch["error_file_id"].as_str() {
        let text = client.file_text(errors).await?;
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            let message = v["response"]["body"]["error"]["message"].as_str().or(v["error"]["message"].as_str());
            eprintln!("{}: {}", v["custom_id"].as_str().unwrap_or("?"), message.unwrap_or("failed"));
            failed += 1;
        }
        let path = out.join("errors.jsonl");
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    say(&format!("{written} images written to {}; {failed} lines failed", out.display()));
    Ok(())
}

/// A custom id as a file name: letters, digits, `-`, `_` and `.` kept, the rest `_`.
fn file_stem(custom_id: &str) -> String {
    let stem: String =
        custom_id.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if stem.trim_matches('.').is_empty() { "line".to_owned() } else { stem }
}

/// The extension an image's bytes call for.
fn extension(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        "jpeg"
    } else if bytes.len() > 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        "webp"
    } else {
        "png"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_become_safe_file_names() {
        assert_eq!(file_stem("req-1"), "req-1");
        assert_eq!(file_stem("../../etc/passwd"), ".._.._etc_passwd");
        assert_eq!(file_stem(".."), "line");
        assert_eq!(file_stem("a b/c"), "a_b_c");
    }
}
