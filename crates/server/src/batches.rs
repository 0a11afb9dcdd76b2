//! OpenAI's Files and Batch APIs: `/v1/files` and `/v1/batches`, and the worker that runs batches.
//!
//! Files and batches belong to the key that made them (another key gets 404) and live in the database
//! (`ledger::batches`). A batch's input file is checked whole when it is created (JSON, method, url,
//! unique custom ids, and every body against the synchronous endpoint's own validation): one bad line
//! fails the batch with every line's error, and nothing runs or is charged.
//!
//! Lines run on any instance sharing the database ([`worker`]): each claimed line is sent through this
//! server's own router as the batch owner's request ([`LineOwner`]), at the `batch` tier (background
//! priority, half price), with the Idempotency-Key `batch:BATCH:LINE`. So a line is admitted, held,
//! run and charged exactly as the same synchronous request (one code path), and a line whose instance
//! died after charging it replays its stored answer instead of running and charging again.

use std::sync::Arc;
use std::time::Duration;

use api::ApiError;
use api::batch::{BATCH_ENDPOINTS, COMPLETION_WINDOWS, FILE_PURPOSES, MAX_BATCH_FILE_BYTES};
use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use domain::JobKind;
use ledger::{BatchRecord, FileContent, FileRecord, Ledger, NewBatch};
use serde::Deserialize;
use serde_json::{Map, Value};
use tower::ServiceExt;

use crate::accounts::Caller;
use crate::{AppState, HttpError};

/// Marks an in-process request as a batch line of the key `owner` (or [`ledger::batches::ANONYMOUS`]):
/// authentication takes it as that key's request. Only the worker sets it (a client cannot set a
/// request extension).
#[derive(Debug, Clone)]
pub struct LineOwner(pub String);

/// Lines one instance runs at once (each still waits for its provider's capacity at background
/// priority).
const LINES_AT_ONCE: usize = 4;
/// How often the worker looks for lines when nothing wakes it.
const POLL: Duration = Duration::from_millis(500);
/// How long a line that could not run yet waits before it is tried again.
const CAPACITY_BACKOFF: Duration = Duration::from_secs(1);

type Result<T> = std::result::Result<T, HttpError>;

fn owner(caller: Option<&Caller>) -> String {
    caller.map_or_else(|| ledger::batches::ANONYMOUS.to_owned(), |c| c.0.id.clone())
}

fn ledger(state: &AppState) -> Result<&Ledger> {
    state.ledger.as_ref().ok_or_else(|| {
        HttpError(ApiError::new(
            501,
            "invalid_request_error",
            None,
            Some("not_available"),
            "Files and batches need the server's database; this server runs without one.".to_owned(),
        ))
    })
}

fn unavailable(e: ledger::LedgerError) -> HttpError {
    tracing::error!(error = %e, "files and batches: the database failed");
    HttpError(ApiError::new(
        503,
        "server_error",
        None,
        Some("ledger_unavailable"),
        "The database is unavailable; please retry shortly.".to_owned(),
    ))
}

fn not_found(what: &str, id: &str) -> HttpError {
    HttpError(ApiError::new(
        404,
        "invalid_request_error",
        Some("id"),
        Some("not_found"),
        format!("No {what} with the id '{id}' found."),
    ))
}

fn file_json(f: &FileRecord) -> Value {
    api::batch::file_json(&api::batch::FileObject {
        id: &f.id,
        bytes: f.bytes,
        created_at: f.created_at,
        filename: &f.filename,
        purpose: &f.purpose,
    })
}

fn batch_json(b: &BatchRecord) -> Value {
    api::batch::batch_json(&api::batch::BatchObject {
        id: &b.id,
        endpoint: &b.endpoint,
        input_file_id: &b.input_file_id,
        completion_window: &b.completion_window,
        status: &b.status,
        metadata: b.metadata.as_deref(),
        errors: b.errors.as_deref(),
        output_file_id: b.output_file_id.as_deref(),
        error_file_id: b.error_file_id.as_deref(),
        created_at: b.created_at,
        in_progress_at: b.in_progress_at,
        expires_at: b.expires_at,
        finalizing_at: b.finalizing_at,
        completed_at: b.completed_at,
        failed_at: b.failed_at,
        expired_at: b.expired_at,
        cancelling_at: b.cancelling_at,
        cancelled_at: b.cancelled_at,
        total: b.counts.total,
        completed: b.counts.completed,
        failed: b.counts.failed,
    })
}

/// `POST /v1/files`: multipart with `file` and `purpose`.
pub async fn upload(State(state): State<AppState>, request: Request) -> Result<Response> {
    let ledger = ledger(&state)?.clone();
    let owner = owner(request.extensions().get::<Caller>());
    let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| {
        HttpError(ApiError::malformed_body(format!(
            "The request must be multipart/form-data with 'file' and 'purpose': {e}"
        )))
    })?;
    let (mut purpose, mut file) = (None, None);
    let deadline = tokio::time::Instant::now() + state.limits.decode_wait;
    while let Some(mut field) = multipart.next_field().await.map_err(|e| malformed(&e.to_string()))? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(|e| malformed(&e.to_string()))?),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_owned();
                // The file's bytes are held in the server's body budget while they are in memory.
                let mut bytes = state.body_budget.collector(MAX_BATCH_FILE_BYTES, deadline);
                while let Some(chunk) = field.chunk().await.map_err(|e| malformed(&e.to_string()))? {
                    bytes.push(&chunk).await.map_err(|e| match e {
                        crate::body::BodyError::TooLarge => {
                            HttpError(ApiError::payload_too_large(MAX_BATCH_FILE_BYTES))
                        }
                        crate::body::BodyError::Busy(e) => HttpError(e),
                        crate::body::BodyError::Read(t) => malformed(&t),
                    })?;
                }
                file = Some((name, bytes.finish()));
            }
            Some(other) => return Err(HttpError(ApiError::unknown_parameter(other))),
            None => {}
        }
    }
    let purpose = purpose.ok_or_else(|| HttpError(ApiError::missing("purpose")))?;
    if !FILE_PURPOSES.contains(&purpose.as_str()) {
        return Err(HttpError(ApiError::invalid_value("purpose", &purpose, FILE_PURPOSES)));
    }
    let (filename, bytes) = file.ok_or_else(|| HttpError(ApiError::missing("file")))?;
    let record = ledger.create_file(&owner, &purpose, &filename, &bytes).await.map_err(unavailable)?;
    Ok(Json(file_json(&record)).into_response())
}

fn malformed(detail: &str) -> HttpError {
    HttpError(ApiError::malformed_body(format!("The upload could not be read: {detail}")))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
    order: Option<String>,
}

fn page_limit(limit: Option<u32>, max: u32) -> Result<u32> {
    match limit {
        None => Ok(20.min(max)),
        Some(l) if (1..=max).contains(&l) => Ok(l),
        Some(l) => Err(HttpError(ApiError::invalid_value_msg(
            "limit",
            format!("'limit' must be between 1 and {max}; it was {l}."),
        ))),
    }
}

/// The bytes of the caller's uploaded file `id`, an image input of a JSON edit (`param` names it in
/// errors).
pub async fn image_file(state: &AppState, caller: Option<&Caller>, param: &str, id: &str) -> Result<bytes::Bytes> {
    let ledger = ledger(state)?;
    let not_found = || {
        HttpError(ApiError::new(
            404,
            "invalid_request_error",
            Some(param),
            Some("file_not_found"),
            format!("No file with the id '{id}' found among this API key's files."),
        ))
    };
    match ledger.file_content(&owner(caller), id).await.map_err(unavailable)? {
        Some(FileContent::Stored(bytes)) => Ok(bytes::Bytes::from(bytes)),
        Some(FileContent::Lines(_)) => Err(HttpError(ApiError::invalid_value_msg(
            param,
            format!("The file '{id}' is a batch's output, not an image."),
        ))),
        None => Err(not_found()),
    }
}

/// `GET /v1/files`.
pub async fn list_files(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    Query(q): Query<ListQuery>,
) -> Result<Response> {
    let ledger = ledger(&state)?;
    let owner = owner(caller.as_ref().map(|c| &c.0));
    let limit = page_limit(q.limit, 10_000)?;
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => return Err(HttpError(ApiError::invalid_value("order", o, &["asc", "desc"]))),
    };
    let mut files = ledger
        .list_files(&owner, q.purpose.as_deref(), q.after.as_deref(), limit + 1, ascending)
        .await
        .map_err(unavailable)?;
    let has_more = files.len() > limit as usize;
    files.truncate(limit as usize);
    Ok(Json(api::batch::list_json(files.iter().map(file_json).collect(), has_more)).into_response())
}

/// `GET /v1/files/{id}`.
pub async fn get_file(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response> {
    let owner = owner(caller.as_ref().map(|c| &c.0));
    let file = ledger(&state)?.file(&owner, &id).await.map_err(unavailable)?.ok_or_else(|| not_found("file", &id))?;
    Ok(Json(file_json(&file)).into_response())
}

/// `DELETE /v1/files/{id}`.
pub async fn delete_file(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response> {
    let owner = owner(caller.as_ref().map(|c| &c.0));
    if !ledger(&state)?.delete_file(&owner, &id).await.map_err(unavailable)? {
        return Err(not_found("file", &id));
    }
    Ok(Json(api::batch::file_deleted_json(&id)).into_response())
}

/// `GET /v1/files/{id}/content`: an upload's bytes, or a batch's output or error file (JSONL).
pub async fn file_content(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response> {
    let owner = owner(caller.as_ref().map(|c| &c.0));
    let content =
        ledger(&state)?.file_content(&owner, &id).await.map_err(unavailable)?.ok_or_else(|| not_found("file", &id))?;
    let bytes = match content {
        FileContent::Stored(bytes) => bytes,
        FileContent::Lines(lines) => {
            let mut out = String::new();
            for l in &lines {
                let id = format!("batch_req_{}_{}", l.batch_id.trim_start_matches("batch_"), l.line);
                let text = if l.status_code == 0 {
                    api::batch::never_ran_line(&id, &l.custom_id, &l.response)
                } else {
                    api::batch::output_line(&id, &l.custom_id, l.status_code, l.request_id.as_deref(), &l.response)
                };
                out.push_str(&text);
                out.push('\n');
            }
            out.into_bytes()
        }
    };
    Ok(([(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], bytes)
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    metadata: Option<Map<String, Value>>,
}

/// `POST /v1/batches`.
pub async fn create_batch(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    body: std::result::Result<Json<CreateBatch>, axum::extract::rejection::JsonRejection>,
) -> Result<Response> {
    let ledger = ledger(&state)?;
    let owner = owner(caller.as_ref().map(|c| &c.0));
    let Json(req) = body.map_err(|e| HttpError(ApiError::malformed_body(e.body_text())))?;
    let input_file_id = req.input_file_id.ok_or_else(|| HttpError(ApiError::missing("input_file_id")))?;
    let endpoint = req.endpoint.ok_or_else(|| HttpError(ApiError::missing("endpoint")))?;
    if !BATCH_ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(HttpError(ApiError::invalid_value("endpoint", &endpoint, BATCH_ENDPOINTS)));
    }
    let window = req.completion_window.ok_or_else(|| HttpError(ApiError::missing("completion_window")))?;
    if !COMPLETION_WINDOWS.contains(&window.as_str()) {
        return Err(HttpError(ApiError::invalid_value("completion_window", &window, COMPLETION_WINDOWS)));
    }
    if let Some(m) = &req.metadata
        && (m.len() > 16 || m.values().any(|v| !v.is_string()))
    {
        return Err(HttpError(ApiError::invalid_value_msg(
            "metadata",
            "'metadata' holds at most 16 string values.".to_owned(),
        )));
    }
    let file = ledger
        .file_content(&owner, &input_file_id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| not_found("file", &input_file_id))?;
    let FileContent::Stored(content) = file else {
        return Err(HttpError(ApiError::invalid_value_msg(
            "input_file_id",
            format!("The file '{input_file_id}' is a batch's output, not a batch input file."),
        )));
    };
    let new = NewBatch {
        owner,
        endpoint: endpoint.clone(),
        input_file_id,
        completion_window: window,
        metadata: req.metadata.map(|m| Value::Object(m).to_string()),
        window: chrono::Duration::hours(24),
    };
    let checked = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || check_input(&state, &content, &endpoint))
            .await
            .map_err(|_| HttpError(ApiError::internal("batch")))?
    };
    let record = match checked {
        Ok(lines) => ledger.create_batch(&new, &lines).await.map_err(unavailable)?,
        Err(errors) => {
            ledger.create_failed_batch(&new, &api::batch::line_errors_json(&errors)).await.map_err(unavailable)?
        }
    };
    state.batch_wakeup.notify_one();
    Ok(Json(batch_json(&record)).into_response())
}

/// The input file's lines as (custom id, body), or every line's error: the file's shape, then each
/// body against its endpoint's validation (model, sizes, options), as the endpoint itself would check it.
fn check_input(
    state: &AppState,
    content: &[u8],
    endpoint: &str,
) -> std::result::Result<Vec<(String, String)>, Vec<api::batch::LineError>> {
    let (lines, mut errors) = api::batch::parse_batch_input(content, endpoint);
    let kind = if endpoint.ends_with("/edits") { JobKind::Edit } else { JobKind::Generate };
    let mut out = Vec::with_capacity(lines.len());
    for line in lines {
        match crate::handlers::check_json_request(state, kind, &line.body) {
            Ok(()) => out.push((line.custom_id, Value::Object(line.body).to_string())),
            Err(e) => errors.push(api::batch::LineError::from_api(line.line, &e)),
        }
    }
    errors.sort_by_key(|e| e.line);
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// `GET /v1/batches/{id}`.
pub async fn get_batch(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response> {
    let owner = owner(caller.as_ref().map(|c| &c.0));
    let batch =
        ledger(&state)?.batch(&owner, &id).await.map_err(unavailable)?.ok_or_else(|| not_found("batch", &id))?;
    Ok(Json(batch_json(&batch)).into_response())
}

/// `GET /v1/batches`.
pub async fn list_batches(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    Query(q): Query<ListQuery>,
) -> Result<Response> {
    let owner = owner(caller.as_ref().map(|c| &c.0));
    let limit = page_limit(q.limit, 100)?;
    let mut batches = ledger(&state)?.list_batches(&owner, q.after.as_deref(), limit + 1).await.map_err(unavailable)?;
    let has_more = batches.len() > limit as usize;
    batches.truncate(limit as usize);
    Ok(Json(api::batch::list_json(batches.iter().map(batch_json).collect(), has_more)).into_response())
}

/// `POST /v1/batches/{id}/cancel`.
pub async fn cancel_batch(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response> {
    let owner = owner(caller.as_ref().map(|c| &c.0));
    let batch =
        ledger(&state)?.cancel_batch(&owner, &id).await.map_err(unavailable)?.ok_or_else(|| not_found("batch", &id))?;
    Ok(Json(batch_json(&batch)).into_response())
}

/// Runs batch lines on this instance until `stop`: claims what it has room for, sends each through
/// the router, records its answer; moves batches on (expiry, completion) as it goes.
pub async fn worker(state: AppState, stop: tokio_util::sync::CancellationToken) {
    let Some(ledger) = state.ledger.clone() else { return };
    let app = crate::app(state.clone());
    let running = Arc::new(tokio::sync::Semaphore::new(LINES_AT_ONCE));
    loop {
        if let Err(e) = ledger.advance_batches().await {
            tracing::warn!(error = %e, "could not move batches on");
        }
        let room = running.available_permits();
        if room > 0 {
            match ledger.claim_lines(u32::try_from(room).unwrap_or(1)).await {
                Ok(lines) => {
                    for line in lines {
                        let Ok(permit) = Arc::clone(&running).try_acquire_owned() else { break };
                        let (app, ledger, wakeup) = (app.clone(), ledger.clone(), Arc::clone(&state.batch_wakeup));
                        tokio::spawn(async move {
                            run_line(app, &ledger, line).await;
                            drop(permit);
                            wakeup.notify_one();
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not claim batch lines"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = state.batch_wakeup.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Sends one line through the router as its owner's request and records the answer. A line that could
/// not run yet (no capacity, its earlier run still in flight, no database) goes back to wait.
async fn run_line(app: axum::Router, ledger: &Ledger, line: ledger::ClaimedLine) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(&line.endpoint)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .header(crate::accounts::IDEMPOTENCY_HEADER, format!("batch:{}:{}", line.batch_id, line.line))
        .extension(LineOwner(line.owner.clone()))
        .body(Body::from(line.body.clone()));
    let Ok(request) = request else { return };
    let response = match app.oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = response.status().as_u16();
    // A replay (the line ran and was charged before its instance died) names the request that ran.
    let request_id = [crate::accounts::REPLAY_OF_HEADER, crate::REQUEST_ID_HEADER]
        .iter()
        .find_map(|name| response.headers().get(*name).and_then(|v| v.to_str().ok()).map(str::to_owned));
    let body = match axum::body::to_bytes(response.into_body(), usize::MAX).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => {
            tracing::warn!(batch = %line.batch_id, line = line.line, error = %e, "a batch line's answer broke");
            return;
        }
    };
    // Not the line's answer, but a reason to try again shortly: no capacity now (the refusal cost
    // nothing); the line's earlier run on an instance that died is still in flight (until the sweep
    // frees it); the database is unavailable.
    let code = api::parse_error_body(body.as_bytes()).and_then(|e| e.code);
    let again = matches!(
        (status, code.as_deref()),
        (429, Some("resource_unavailable")) | (409, Some("idempotency_key_in_use")) | (503, Some("ledger_unavailable"))
    );
    if again {
        tokio::time::sleep(CAPACITY_BACKOFF).await;
        if let Err(e) = ledger.requeue_line(&line.batch_id, line.line).await {
            tracing::warn!(error = %e, "could not put a batch line back; its claim lapses instead");
        }
        return;
    }
    match ledger.finish_line(&line.batch_id, line.line, status, request_id.as_deref(), &body).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(batch = %line.batch_id, line = line.line, "a batch line was already answered by another run of it; the first answer stands")
        }
        Err(e) => {
            tracing::error!(batch = %line.batch_id, line = line.line, error = %e, "could not record a batch line")
        }
    }
}
