//! The Files and Batch APIs' wire format (OpenAI's `OpenAIFile`, `Batch`, `BatchRequestInput` and
//! `BatchRequestOutput`): the objects, the input file's lines and the output and error files' lines.

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::ApiError;

/// The endpoints a batch may run.
pub const BATCH_ENDPOINTS: &[&str] = &["/v1/images/generations", "/v1/images/edits"];
/// The only completion window OpenAI offers.
pub const COMPLETION_WINDOWS: &[&str] = &["24h"];
/// File purposes accepted on upload.
pub const FILE_PURPOSES: &[&str] = &["batch", "vision", "user_data"];
/// OpenAI's limits on a batch input file.
pub const MAX_BATCH_LINES: usize = 50_000;
pub const MAX_BATCH_FILE_BYTES: usize = 200 << 20;

/// A file as `OpenAIFile`.
pub struct FileObject<'a> {
    pub id: &'a str,
    pub bytes: u64,
    pub created_at: i64,
    pub filename: &'a str,
    pub purpose: &'a str,
}

pub fn file_json(f: &FileObject<'_>) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "expires_at": null,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

pub fn file_deleted_json(id: &str) -> Value {
    json!({"id": id, "object": "file", "deleted": true})
}

/// A list page (`ListFilesResponse`, `ListBatchesResponse`).
pub fn list_json(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().and_then(|d| d["id"].as_str().map(str::to_owned));
    let last = data.last().and_then(|d| d["id"].as_str().map(str::to_owned));
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})
}

/// A batch as OpenAI's `Batch`.
pub struct BatchObject<'a> {
    pub id: &'a str,
    pub endpoint: &'a str,
    pub input_file_id: &'a str,
    pub completion_window: &'a str,
    pub status: &'a str,
    /// JSON object text, as given.
    pub metadata: Option<&'a str>,
    /// The validation errors' JSON (`[{code, message, param, line}]`).
    pub errors: Option<&'a str>,
    pub output_file_id: Option<&'a str>,
    pub error_file_id: Option<&'a str>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

pub fn batch_json(b: &BatchObject<'_>) -> Value {
    let parse = |text: Option<&str>| text.and_then(|t| serde_json::from_str::<Value>(t).ok());
    let errors = parse(b.errors).map(|data| json!({"object": "list", "data": data}));
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": parse(b.metadata).unwrap_or(Value::Null),
    })
}

/// One request of a batch input file.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLine {
    /// Its line in the file, from 1.
    pub line: usize,
    pub custom_id: String,
    pub body: Map<String, Value>,
}

/// Why a line of a batch input file is refused (`line` counts from 1, as OpenAI's errors do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

impl LineError {
    fn new(line: usize, code: &str, param: Option<&str>, message: String) -> LineError {
        LineError { line, code: code.to_owned(), message, param: param.map(str::to_owned) }
    }

    /// A line whose body the endpoint refuses, with the endpoint's own error.
    pub fn from_api(line: usize, e: &ApiError) -> LineError {
        LineError {
            line,
            code: e.body.code.clone().unwrap_or_else(|| e.body.kind.clone()),
            message: e.body.message.clone(),
            param: e.body.param.clone().map(|p| format!("body.{p}")),
        }
    }
}

/// The errors of a failed batch, as stored and shown (`errors.data`).
pub fn line_errors_json(errors: &[LineError]) -> String {
    let data: Vec<Value> = errors
        .iter()
        .map(|e| json!({"code": e.code, "message": e.message, "param": e.param, "line": e.line}))
        .collect();
    Value::Array(data).to_string()
}

/// Reads a batch input file for `endpoint`: every line a JSON object with a unique `custom_id`,
/// `method` `POST`, `url` the batch's endpoint and an object `body`. Blank lines are skipped. Returns
/// the good lines and every other line's error (a batch with any error fails whole, after its good
/// lines' bodies are checked too, so that it reports them all).
pub fn parse_batch_input(content: &[u8], endpoint: &str) -> (Vec<BatchLine>, Vec<LineError>) {
    let text = match std::str::from_utf8(content) {
        Ok(t) => t,
        Err(_) => {
            return (
                Vec::new(),
                vec![LineError::new(1, "invalid_json_line", None, "The file is not UTF-8 text.".into())],
            );
        }
    };
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                errors.push(LineError::new(n, "invalid_json_line", None, format!("Line {n} is not valid JSON: {e}.")));
                continue;
            }
        };
        let Value::Object(mut obj) = value else {
            errors.push(LineError::new(n, "invalid_json_line", None, format!("Line {n} is not a JSON object.")));
            continue;
        };
        let custom_id = match obj.get("custom_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                let msg = format!("Line {n} has no 'custom_id' (a non-empty string).");
                errors.push(LineError::new(n, "missing_required_parameter", Some("custom_id"), msg));
                continue;
            }
        };
        if !seen.insert(custom_id.clone()) {
            let msg =
                format!("The custom_id '{custom_id}' of line {n} is used by an earlier line; each must be unique.");
            errors.push(LineError::new(n, "duplicate_custom_id", Some("custom_id"), msg));
            continue;
        }
        if obj.get("method").and_then(Value::as_str) != Some("POST") {
            let msg = format!("Line {n}: 'method' must be 'POST'.");
            errors.push(LineError::new(n, "invalid_value", Some("method"), msg));
            continue;
        }
        let url = obj.get("url").and_then(Value::as_str).unwrap_or_default();
        if url != endpoint {
            let msg = format!("Line {n}: 'url' is '{url}', but this batch's endpoint is '{endpoint}'.");
            errors.push(LineError::new(n, "mismatched_url", Some("url"), msg));
            continue;
        }
        let Some(Value::Object(body)) = obj.remove("body") else {
            let msg = format!("Line {n} has no 'body' object: the request, as the endpoint takes it.");
            errors.push(LineError::new(n, "missing_required_parameter", Some("body"), msg));
            continue;
        };
        lines.push(BatchLine { line: n, custom_id, body });
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(LineError::new(1, "empty_file", None, "The input file has no requests.".into()));
    }
    if lines.len() + errors.len() > MAX_BATCH_LINES {
        let msg = format!("The input file has more than {MAX_BATCH_LINES} requests.");
        errors.push(LineError::new(MAX_BATCH_LINES + 1, "too_many_lines", None, msg));
    }
    (lines, errors)
}

/// A line of a batch's output or error file for a request that ran: what it answered. The body (JSON
/// text, megabytes of base64 images) goes in as it is, checked but not parsed and written again.
pub fn output_line(id: &str, custom_id: &str, status_code: u16, request_id: Option<&str>, body: &str) -> String {
    #[derive(serde::Serialize)]
    struct Response<'a> {
        status_code: u16,
        request_id: Option<&'a str>,
        /// `None` (null) for a body that is not JSON.
        body: Option<&'a RawValue>,
    }
    #[derive(serde::Serialize)]
    struct Line<'a> {
        id: &'a str,
        custom_id: &'a str,
        response: Response<'a>,
        error: Option<()>,
    }
    let body = serde_json::from_str::<&RawValue>(body).ok();
    let line = Line { id, custom_id, response: Response { status_code, request_id, body }, error: None };
    serde_json::to_string(&line).unwrap_or_default()
}

/// A line of a batch's error file for a request that never ran (`code`: why).
pub fn never_ran_line(id: &str, custom_id: &str, code: &str) -> String {
    let message = match code {
        "batch_expired" => "This request was not run: the batch expired before it started.",
        "batch_cancelled" => "This request was not run: the batch was cancelled before it started.",
        _ => "This request was not run.",
    };
    json!({"id": id, "custom_id": custom_id, "response": null, "error": {"code": code, "message": message}}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEN: &str = "/v1/images/generations";

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let file = [
            r#"{"custom_id":"a","method":"POST","url":"/v1/images/generations","body":{"prompt":"x"}}"#,
            r#"not json"#,
            r#"{"custom_id":"a","method":"POST","url":"/v1/images/generations","body":{"prompt":"x"}}"#,
            r#"{"custom_id":"b","method":"GET","url":"/v1/images/generations","body":{}}"#,
            r#"{"custom_id":"c","method":"POST","url":"/v1/images/edits","body":{}}"#,
            r#"{"custom_id":"d","method":"POST","url":"/v1/images/generations"}"#,
            "",
            r#"{"method":"POST","url":"/v1/images/generations","body":{}}"#,
        ]
        .join("\n");
        let (lines, errors) = parse_batch_input(file.as_bytes(), GEN);
        assert_eq!(lines.iter().map(|l| l.line).collect::<Vec<_>>(), [1]);
        let got: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.code.as_str())).collect();
        assert_eq!(
            got,
            [
                (2, "invalid_json_line"),
                (3, "duplicate_custom_id"),
                (4, "invalid_value"),
                (5, "mismatched_url"),
                (6, "missing_required_parameter"),
                (8, "missing_required_parameter"),
            ]
        );
    }

    #[test]
    fn output_lines_carry_the_body_as_it_was() {
        let body = r#"{"data":[{"b64_json":"AAAA"}],"created":1}"#;
        let line: Value = serde_json::from_str(&output_line("r1", "c1", 200, Some("req"), body)).unwrap();
        assert_eq!(
            line,
            json!({"id": "r1", "custom_id": "c1", "error": null,
                "response": {"status_code": 200, "request_id": "req", "body": {"data": [{"b64_json": "AAAA"}], "created": 1}}})
        );
        let broken: Value = serde_json::from_str(&output_line("r2", "c2", 502, None, "<html>")).unwrap();
        assert_eq!(broken["response"]["body"], Value::Null);
    }

    #[test]
    fn good_lines_come_back_in_order() {
        let file = "{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/images/generations\",\"body\":{\"prompt\":\"x\"}}\n\n{\"custom_id\":\"b\",\"method\":\"POST\",\"url\":\"/v1/images/generations\",\"body\":{\"prompt\":\"y\"}}\n";
        let (lines, errors) = parse_batch_input(file.as_bytes(), GEN);
        assert!(errors.is_empty());
        assert_eq!(lines.iter().map(|l| (l.line, l.custom_id.as_str())).collect::<Vec<_>>(), [(1, "a"), (3, "b")]);
        assert_eq!(lines[1].body["prompt"], "y");
        assert_eq!(parse_batch_input(b"\n", GEN).1[0].code, "empty_file");
    }
}
