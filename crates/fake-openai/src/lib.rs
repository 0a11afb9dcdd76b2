//! A fake OpenAI Images API upstream that speaks real HTTP on 127.0.0.1, for tests.
//!
//! [`spawn`] binds `127.0.0.1:0` and serves in a background tokio task; the returned
//! [`FakeOpenAi`] gives the base URL to point a client (or a gateway) at, and records every
//! request it received ([`FakeOpenAi::requests`], [`FakeOpenAi::count`]).
//!
//! # Endpoints
//!
//! - `POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart with `image`
//!   or repeated `image[]` parts, optional `mask`, text fields; or JSON with
//!   `images: [{"image_url": "data:..."}]`). Both need `Authorization: Bearer <the fake's key>`
//!   ([`DEFAULT_KEY`] unless [`spawn_with_key`] names another), else 401 (`invalid_api_key`), so a
//!   gateway that forwards its client's key instead of its own fails.
//! - `POST /v1/images/variations` (multipart with one `image`, no prompt; dall-e-2 only, as OpenAI).
//! - `GET /files/<id>.png`: the bytes behind the `url`s handed out for DALL-E
//!   `response_format=url` (the DALL-E default).
//! - Anything else: 404 with OpenAI's error envelope.
//!
//! Every failure answers OpenAI's envelope `{"error":{"message","type","param","code"}}`.
//!
//! # Answers
//!
//! Images are real, generated with the `image` crate (a gradient), at the resolved size
//! (`size` "WxH" if given, else 1024x1024 for `auto`/absent; any WxH up to 4096x4096 is
//! accepted) and in the requested `output_format` (png default, jpeg using
//! `output_compression` as quality, lossless webp). `n` images (default 1).
//!
//! The model decides the shape, as with OpenAI: a model starting with `gpt-image` answers
//! `b64_json` plus the resolved `background` (auto -> opaque), `output_format`, `size`,
//! `quality` (auto/absent -> medium) and `usage`; `dall-e-2`/`dall-e-3` answer only
//! `created` and `data`, with `url` (default) or `b64_json` per `response_format`, always PNG;
//! dall-e-3 adds `revised_prompt` = `"revised: " + prompt`. Other models answer 404
//! `model_not_found`. An absent `model` means `dall-e-2`, unless a GPT-only field
//! (`output_format`, `output_compression`, `background`, `moderation`, `stream`,
//! `partial_images`, `input_fidelity`, or `quality` low/medium/high) is present, in which case
//! it means `gpt-image-1`.
//!
//! Usage (deterministic):
//! - `text_tokens` = number of whitespace-separated words in the prompt + 3;
//! - `image_tokens` = 194 per input image (edits; the mask is not counted), else 0;
//! - `input_tokens` = `text_tokens` + `image_tokens`;
//! - `output_tokens` = `n` x the per-image value of OpenAI's table (low 272/408/400,
//!   medium 1056/1584/1568, high 4160/6240/6208 for 1024x1024/1024x1536/1536x1024; the
//!   1024x1024 value for any other size); for gpt-image-2 models, OpenAI's calculator formula
//!   (16/48/96 tiles along the long side for low/medium/high, any size within its rule: sides
//!   multiples of 16 up to 3840, 3:1 at most, 655,360 to 8,294,400 pixels; no transparency).
//!   Partial images add nothing;
//! - `total_tokens` = `input_tokens` + `output_tokens`.
//!
//! Shut-down models ([`FakeState::shut_down`], `--shut-down MODEL`) are answered as OpenAI answers a
//! model it no longer serves: 404, code `model_not_found`.
//!
//! # Streaming
//!
//! With `stream` true (JSON bool, or the multipart text `"true"`), GPT image models answer
//! `text/event-stream`: for each of the `n` images, `partial_images` (0..=3) partial events
//! then one completed event, each written as `event: <type>\ndata: <json>\n\n` with types
//! `image_generation.partial_image`/`image_generation.completed` (edits:
//! `image_edit.partial_image`/`image_edit.completed`). The body is produced lazily, with a
//! 100 ms pause between events. Each completed event carries the request's input tokens and
//! the output tokens of its own image.
//!
//! # Faults
//!
//! Directives inside the prompt (so they survive a gateway) select faults:
//!
//! | directive | effect |
//! |---|---|
//! | `[fault:500-once]` | the first request with that exact prompt gets 500 (`server_error`), later ones succeed |
//! | `[fault:500-always]` | every request gets 500 (`server_error`) |
//! | `[fault:502-html]` | 502 with a `text/html` body that is not JSON |
//! | `[fault:429-once]` | the first request with that exact prompt gets 429, `Retry-After: 1`, `rate_limit_exceeded`; later ones succeed |
//! | `[fault:400]` | 400, type `image_generation_user_error`, param `prompt`, code `moderation_blocked` |
//! | `[fault:slow=MS]` | sleeps MS milliseconds before answering (combines with the others) |
//! | `[fault:drop]` | status 200 then the body fails at once: the client gets a connection/body error |
//! | `[fault:drop-mid]` | status 200, part of the body (for a stream: the first event), then the body fails |
//! | `[fault:malformed]` | 200, `Content-Type: application/json`, a truncated JSON body |
//! | `[fault:no-usage]` | a normal JSON answer (or completed event) without `usage`, like some gateways |
//! | `[fault:bare]` | a JSON answer (or stream events) without `background`, `output_format`, `size` and `quality` |
//! | `[fault:gap=MS]` | streams pause MS milliseconds between events (instead of 100) |
//! | `[fault:usage-x=K]` | `usage` reports K times the output tokens (an upstream billing more than its table) |
//! | `[fault:size=WxH]` | the answer reports this `size` (images stay at the requested size) |
//!
//! What the fake "bills" is counted ([`FakeState::billed_images`]): every image of a JSON answer sent
//! whole, every completed event of a stream produced, whether or not the client reads it.
//!
//! The authorization check comes first; faults come before the request's fields are
//! validated. "Once" counting is per exact prompt string and per directive.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use image::ExtendedColorType;
use image::ImageEncoder as _;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

/// Largest request body accepted (edits carry images).
const BODY_LIMIT: usize = 256 * 1024 * 1024;
/// The API key [`spawn`] and the binary accept unless told another.
pub const DEFAULT_KEY: &str = "sk-upstream";
/// Largest width or height accepted in `size`.
const MAX_SIDE: u32 = 4096;
/// Pause between two streamed events.
const EVENT_GAP: Duration = Duration::from_millis(100);
/// Image input tokens charged per input image of an edit.
const IMAGE_TOKENS_PER_INPUT: u64 = 194;

/// Binds `127.0.0.1:0` and serves the fake in a background tokio task.
///
/// The server stops when the returned [`FakeOpenAi`] is dropped.
pub async fn spawn() -> io::Result<FakeOpenAi> {
    spawn_with_key(DEFAULT_KEY).await
}

/// [`spawn`], accepting only `Authorization: Bearer <key>`.
pub async fn spawn_with_key(key: &str) -> io::Result<FakeOpenAi> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let state = FakeState::with_key(addr, key);
    let task = tokio::spawn(serve(listener, state.clone()));
    Ok(FakeOpenAi { addr, state, task: task.abort_handle() })
}

/// Serves the fake on `listener` until the task is dropped or an I/O error ends it.
pub async fn serve(listener: TcpListener, state: FakeState) -> io::Result<()> {
    axum::serve(listener, router(state)).await
}

/// The fake's routes, for callers that want to serve it themselves.
pub fn router(state: FakeState) -> Router {
    Router::new()
        .route("/v1/images/generations", any(generations))
        .route("/v1/images/edits", any(edits))
        .route("/v1/images/variations", any(variations))
        .route("/files/{file}", any(file))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// A running fake (see [`spawn`]).
#[derive(Debug)]
pub struct FakeOpenAi {
    /// The address it listens on (127.0.0.1 and an ephemeral port).
    pub addr: SocketAddr,
    state: FakeState,
    task: AbortHandle,
}

impl FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1`, the base URL an OpenAI client expects.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests()
    }

    /// Answers `model` from now on as OpenAI answers a model it shut down (see [`FakeState::shut_down`]).
    pub fn shut_down(&self, model: &str) {
        self.state.shut_down(model);
    }

    /// How many image requests (generations or edits) had a prompt containing `prompt_substring`.
    pub fn count(&self, prompt_substring: &str) -> usize {
        self.state.count(prompt_substring)
    }

    /// Images the fake has billed so far (see [`FakeState::billed_images`]).
    pub fn billed_images(&self) -> u64 {
        self.state.billed_images()
    }

    /// The shared state behind the server.
    pub fn state(&self) -> &FakeState {
        &self.state
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Request path, without the query string.
    pub path: String,
    /// The `Authorization` header, as sent.
    pub authorization: Option<String>,
    /// The `Content-Type` header, as sent.
    pub content_type: Option<String>,
    /// The body, when it was JSON that parsed.
    pub json: Option<Value>,
    /// The multipart parts, in order (text fields included, as bytes).
    pub parts: Vec<RecordedPart>,
}

impl Recorded {
    /// The prompt of an image request (JSON field or multipart text part).
    pub fn prompt(&self) -> Option<String> {
        if let Some(p) = self.json.as_ref().and_then(|j| j.get("prompt")).and_then(Value::as_str) {
            return Some(p.to_owned());
        }
        self.parts.iter().find(|p| p.name == "prompt").map(|p| String::from_utf8_lossy(&p.bytes).into_owned())
    }

    /// The first multipart part with this name.
    pub fn part(&self, name: &str) -> Option<&RecordedPart> {
        self.parts.iter().find(|p| p.name == name)
    }
}

/// One multipart part of a recorded request.
#[derive(Debug, Clone)]
pub struct RecordedPart {
    /// The part's field name, e.g. `image[]` or `prompt`.
    pub name: String,
    /// The part's file name, for files.
    pub filename: Option<String>,
    /// The part's own `Content-Type`, when given.
    pub content_type: Option<String>,
    /// The part's bytes.
    pub bytes: Bytes,
}

/// The fake's shared state: the address it advertises, the recorded requests, fault counters
/// and the files served under `/files/`.
#[derive(Debug, Clone)]
pub struct FakeState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    key: String,
    billed_images: AtomicU64,
    requests: Mutex<Vec<Recorded>>,
    seen: Mutex<HashMap<(String, String), u64>>,
    files: Mutex<HashMap<String, Bytes>>,
    next_file: AtomicU64,
    /// Models answered with OpenAI's "does not exist" (shut down), whatever the request.
    shut_down: Mutex<Vec<String>>,
    /// Signs GPT image models' images with a C2PA manifest, as OpenAI does ([`FakeState::sign_images`]).
    signer: Mutex<Option<Arc<provenance::Signer>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeState {
    /// Fresh state for a fake reachable at `addr` (used to build DALL-E file URLs) that accepts
    /// [`DEFAULT_KEY`].
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_key(addr, DEFAULT_KEY)
    }

    /// Fresh state accepting only `Authorization: Bearer <key>`.
    pub fn with_key(addr: SocketAddr, key: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                addr,
                key: key.to_owned(),
                billed_images: AtomicU64::new(0),
                requests: Mutex::new(Vec::new()),
                seen: Mutex::new(HashMap::new()),
                files: Mutex::new(HashMap::new()),
                next_file: AtomicU64::new(1),
                shut_down: Mutex::new(Vec::new()),
                signer: Mutex::new(None),
            }),
        }
    }

    /// From now on the images of GPT image models carry a C2PA manifest signed by `signer` (OpenAI
    /// signs every gpt-image output: a `c2pa.created` action, `trainedAlgorithmicMedia`), with the
    /// model the request named.
    pub fn sign_images(&self, signer: Arc<provenance::Signer>) {
        *lock(&self.inner.signer) = Some(signer);
    }

    /// From now on `model` is answered as OpenAI answers a model it shut down: 404 `model_not_found`.
    pub fn shut_down(&self, model: &str) {
        lock(&self.inner.shut_down).push(model.to_owned());
    }

    fn is_shut_down(&self, model: &str) -> bool {
        lock(&self.inner.shut_down).iter().any(|m| m == model)
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.inner.requests).clone()
    }

    /// How many image requests had a prompt containing `prompt_substring`.
    pub fn count(&self, prompt_substring: &str) -> usize {
        lock(&self.inner.requests)
            .iter()
            .filter(|r| r.path.starts_with("/v1/images/"))
            .filter_map(Recorded::prompt)
            .filter(|p| p.contains(prompt_substring))
            .count()
    }

    /// Images billed so far: every image of a JSON answer sent whole, and every completed event of a
    /// stream produced (a real upstream bills what it generated, read or not).
    pub fn billed_images(&self) -> u64 {
        self.inner.billed_images.load(Ordering::SeqCst)
    }

    fn bill(&self, images: u64) {
        self.inner.billed_images.fetch_add(images, Ordering::SeqCst);
    }

    fn record(&self, r: Recorded) {
        lock(&self.inner.requests).push(r);
    }

    /// How many times this (directive, prompt) pair was seen before this call.
    fn seen_before(&self, directive: &str, prompt: &str) -> u64 {
        let mut seen = lock(&self.inner.seen);
        let n = seen.entry((directive.to_owned(), prompt.to_owned())).or_insert(0);
        let before = *n;
        *n += 1;
        before
    }

    fn store_file(&self, bytes: Bytes) -> String {
        let id = format!("img-{}", self.inner.next_file.fetch_add(1, Ordering::Relaxed));
        lock(&self.inner.files).insert(id.clone(), bytes);
        format!("http://{}/files/{id}.png", self.inner.addr)
    }
}

// ---------------------------------------------------------------------------------------
// Errors

/// An OpenAI-style error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message.into())
        }
    }

    fn bad_value(param: &'static str, value: &str, supported: &str) -> Self {
        Self::invalid(param, format!("Invalid value: '{value}'. Supported values are: {supported}."))
    }

    fn missing(param: &'static str) -> Self {
        Self {
            param: Some(param),
            code: Some("missing_required_parameter"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("Missing required parameter: '{param}'."),
            )
        }
    }

    fn bad_json() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON.)",
        )
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        resp
    }
}

// ---------------------------------------------------------------------------------------
// Handlers

fn header_string(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn bare_record(method: &Method, path: &str, headers: &HeaderMap) -> Recorded {
    Recorded {
        method: method.to_string(),
        path: path.to_owned(),
        authorization: header_string(headers, header::AUTHORIZATION),
        content_type: header_string(headers, header::CONTENT_TYPE),
        json: None,
        parts: Vec::new(),
    }
}

fn invalid_url(method: &Method, path: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("Invalid URL ({method} {path})"))
        .with_code("unknown_url")
}

async fn not_found(State(state): State<FakeState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut rec = bare_record(&parts.method, parts.uri.path(), &parts.headers);
    if let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await {
        rec.json = serde_json::from_slice(&bytes).ok();
    }
    state.record(rec);
    invalid_url(&parts.method, parts.uri.path()).into_response()
}

async fn file(
    State(state): State<FakeState>,
    Path(file): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let path = format!("/files/{file}");
    state.record(bare_record(&method, &path, &headers));
    if method != Method::GET {
        return invalid_url(&method, &path).into_response();
    }
    let id = file.strip_suffix(".png").unwrap_or(&file);
    let bytes = lock(&state.inner.files).get(id).cloned();
    match bytes {
        Some(b) => ([(header::CONTENT_TYPE, "image/png")], b).into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("No such file: {file}"))
            .into_response(),
    }
}

async fn generations(State(state): State<FakeState>, req: Request) -> Response {
    handle(state, Endpoint::Generations, req).await
}

async fn edits(State(state): State<FakeState>, req: Request) -> Response {
    handle(state, Endpoint::Edits, req).await
}

async fn variations(State(state): State<FakeState>, req: Request) -> Response {
    handle(state, Endpoint::Variations, req).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Generations,
    Edits,
    /// dall-e-2 only, multipart with one `image`, no prompt.
    Variations,
}

impl Endpoint {
    fn event_prefix(self) -> &'static str {
        match self {
            Endpoint::Generations => "image_generation",
            Endpoint::Edits | Endpoint::Variations => "image_edit",
        }
    }
}

/// What a request body was, after parsing.
struct Parsed {
    fields: Map<String, Value>,
    input_images: u64,
}

async fn handle(state: FakeState, endpoint: Endpoint, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut rec = bare_record(&method, &path, req.headers());
    let parsed = read_body(&state, endpoint, req, &mut rec).await;
    let prompt = rec.prompt();
    state.record(rec.clone());

    if method != Method::POST {
        return invalid_url(&method, &path).into_response();
    }
    let token = rec.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).map(str::trim).unwrap_or("");
    if !token.is_empty() && token != state.inner.key {
        let shown: String = token.chars().take(4).collect();
        return ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                format!(
                    "Incorrect API key provided: {shown}****. You can find your API key at https://platform.openai.com/account/api-keys."
                ),
            )
        }
        .into_response();
    }
    if token.is_empty() {
        return ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        }
        .into_response();
    }

    let faults = prompt.as_deref().map(Faults::parse).unwrap_or_default();
    if let Some(ms) = faults.slow_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(resp) = faults.respond(&state, prompt.as_deref().unwrap_or("")) {
        return resp;
    }

    let result = async {
        let parsed = parsed?;
        if let Ok(Some(model)) = get_str(&parsed.fields, "model")
            && state.is_shut_down(model)
        {
            return Err(model_not_found(model));
        }
        let mut job = Job::resolve(endpoint, &parsed)?;
        if job.family == Family::Gpt {
            job.signer = lock(&state.inner.signer).clone();
        }
        if job.stream { Ok(stream_response(&state, job, &faults)) } else { respond_json(&state, job, &faults).await }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn read_body(
    state: &FakeState,
    endpoint: Endpoint,
    req: Request,
    rec: &mut Recorded,
) -> Result<Parsed, ApiError> {
    let ct = rec.content_type.clone().unwrap_or_default().to_lowercase();
    if endpoint != Endpoint::Generations && ct.starts_with("multipart/form-data") {
        return read_multipart(state, req, rec).await;
    }
    if endpoint == Endpoint::Variations {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Unsupported content type: expected multipart/form-data.",
        ));
    }
    let bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT).await.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("could not read the body: {e}"))
    })?;
    let value: Option<Value> = serde_json::from_slice(&bytes).ok();
    rec.json = value.clone();
    let Some(Value::Object(fields)) = value else {
        if endpoint == Endpoint::Edits && !ct.starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "Unsupported content type: expected multipart/form-data or application/json.",
            ));
        }
        return Err(ApiError::bad_json());
    };
    let mut input_images = 0;
    if endpoint == Endpoint::Edits {
        let images = match fields.get("images") {
            Some(Value::Array(a)) => a,
            Some(_) => return Err(ApiError::invalid("images", "'images' must be an array.")),
            None => return Err(ApiError::missing("images")),
        };
        if images.is_empty() || images.len() > 16 {
            return Err(ApiError::invalid("images", "'images' must hold 1 to 16 images."));
        }
        for img in images {
            check_image_ref(img, "images")?;
        }
        if let Some(mask) = fields.get("mask") {
            check_image_ref(mask, "mask")?;
        }
        input_images = images.len() as u64;
    }
    Ok(Parsed { fields, input_images })
}

/// Checks a JSON `{image_url}` / `{file_id}` reference; a `data:` URL must hold base64.
fn check_image_ref(v: &Value, param: &'static str) -> Result<(), ApiError> {
    if v.get("file_id").and_then(Value::as_str).is_some() {
        return Ok(());
    }
    let Some(url) = v.get("image_url").and_then(Value::as_str) else {
        return Err(ApiError::invalid(param, format!("Each entry of '{param}' needs an 'image_url' or a 'file_id'.")));
    };
    if let Some(rest) = url.strip_prefix("data:") {
        let b64 = rest.split_once(";base64,").map(|(_, d)| d);
        let ok = b64.is_some_and(|d| B64.decode(d).is_ok());
        if !ok {
            return Err(ApiError::invalid(param, "Invalid base64 image data URL.").with_code("invalid_image_url"));
        }
    }
    Ok(())
}

async fn read_multipart(state: &FakeState, req: Request, rec: &mut Recorded) -> Result<Parsed, ApiError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("Could not parse multipart form: {e}"))
    };
    let mut mp = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", e.body_text()))?;
    let mut fields = Map::new();
    let mut input_images = 0u64;
    while let Some(field) = mp.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_owned();
        let filename = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(str::to_owned);
        let bytes = field.bytes().await.map_err(bad)?;
        rec.parts.push(RecordedPart { name: name.clone(), filename, content_type, bytes: bytes.clone() });
        match name.as_str() {
            "image" | "image[]" => {
                check_image_bytes(&bytes, "image")?;
                input_images += 1;
            }
            "mask" => check_image_bytes(&bytes, "mask")?,
            _ => {
                fields.insert(name, Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
    }
    if input_images == 0 {
        return Err(ApiError::missing("image"));
    }
    if input_images > 16 {
        return Err(ApiError::invalid("image", "At most 16 images are allowed."));
    }
    Ok(Parsed { fields, input_images })
}

/// An uploaded image must look like PNG, JPEG or WebP (checked by its magic bytes).
fn check_image_bytes(bytes: &[u8], param: &'static str) -> Result<(), ApiError> {
    match image::guess_format(bytes) {
        Ok(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => Ok(()),
        _ => Err(ApiError::invalid(param, "Invalid image file or mode for image, please check your image file.")
            .with_code("invalid_image_format")),
    }
}

// ---------------------------------------------------------------------------------------
// Faults

#[derive(Debug, Default)]
struct Faults {
    slow_ms: Option<u64>,
    gap_ms: Option<u64>,
    usage_times: Option<u64>,
    size: Option<(u32, u32)>,
    once_500: bool,
    always_500: bool,
    html_502: bool,
    once_429: bool,
    moderation: bool,
    drop: bool,
    drop_mid: bool,
    malformed: bool,
}

impl Faults {
    fn parse(prompt: &str) -> Self {
        let mut f = Faults::default();
        let mut rest = prompt;
        while let Some(start) = rest.find("[fault:") {
            let after = &rest[start + "[fault:".len()..];
            let Some(end) = after.find(']') else { break };
            let directive = after[..end].trim();
            match directive {
                "500-once" => f.once_500 = true,
                "500-always" => f.always_500 = true,
                "502-html" => f.html_502 = true,
                "429-once" => f.once_429 = true,
                "400" => f.moderation = true,
                "drop" => f.drop = true,
                "drop-mid" => f.drop_mid = true,
                "malformed" => f.malformed = true,
                d => {
                    if let Some(ms) = d.strip_prefix("slow=").and_then(|m| m.parse().ok()) {
                        f.slow_ms = Some(ms);
                    }
                    if let Some(ms) = d.strip_prefix("gap=").and_then(|m| m.parse().ok()) {
                        f.gap_ms = Some(ms);
                    }
                    if let Some(k) = d.strip_prefix("usage-x=").and_then(|m| m.parse().ok()) {
                        f.usage_times = Some(k);
                    }
                    if let Some(size) = d.strip_prefix("size=").and_then(parse_size) {
                        f.size = Some(size);
                    }
                }
            }
            rest = &after[end..];
        }
        f
    }

    /// The `size` an answer reports: the job's, unless `[fault:size=WxH]` says otherwise.
    fn reported_size(&self, job: &Job) -> String {
        self.size.map_or_else(|| job.size(), |(w, h)| format!("{w}x{h}"))
    }

    /// The fault answer, if one applies to this request.
    fn respond(&self, state: &FakeState, prompt: &str) -> Option<Response> {
        let server_error = || {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "The server had an error while processing your request. Sorry about that!",
            )
            .into_response()
        };
        if self.always_500 {
            return Some(server_error());
        }
        if self.once_500 && state.seen_before("500-once", prompt) == 0 {
            return Some(server_error());
        }
        if self.once_429 && state.seen_before("429-once", prompt) == 0 {
            return Some(
                ApiError {
                    code: Some("rate_limit_exceeded"),
                    retry_after: Some("1"),
                    ..ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "requests",
                        "Rate limit reached for images per minute. Please try again in 1s.",
                    )
                }
                .into_response(),
            );
        }
        if self.html_502 {
            return Some(
                (
                    StatusCode::BAD_GATEWAY,
                    [(header::CONTENT_TYPE, "text/html")],
                    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
                     <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n\
                     </body>\r\n</html>\r\n",
                )
                    .into_response(),
            );
        }
        if self.moderation {
            return Some(
                ApiError {
                    param: Some("prompt"),
                    code: Some("moderation_blocked"),
                    ..ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "image_generation_user_error",
                        "Your request was rejected as a result of our safety system.",
                    )
                }
                .into_response(),
            );
        }
        if self.drop {
            let body = stream::iter([Err::<Bytes, io::Error>(io::Error::other("fake-openai: dropped connection"))]);
            return Some(([(header::CONTENT_TYPE, "application/json")], Body::from_stream(body)).into_response());
        }
        if self.malformed {
            return Some(
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"created": 1713833628, "data": [{"b64_json": "iVBORw0KGgoAAAANSUhEUgAA"#,
                )
                    .into_response(),
            );
        }
        None
    }
}

// ---------------------------------------------------------------------------------------
// Requests resolved

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Gpt,
    DallE2,
    DallE3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Webp,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Jpeg => "jpeg",
            Format::Webp => "webp",
        }
    }
}

/// A request with every field resolved.
#[derive(Debug, Clone)]
struct Job {
    endpoint: Endpoint,
    family: Family,
    prompt: String,
    n: u32,
    width: u32,
    height: u32,
    quality: &'static str,
    transparent: bool,
    format: Format,
    jpeg_quality: u8,
    want_url: bool,
    stream: bool,
    partial_images: u32,
    input_images: u64,
    /// gpt-image-2: any size within its rule, output tokens from its calculator's formula.
    gpt2: bool,
    /// The model named, for signed images' manifests.
    model: String,
    signer: Option<Arc<provenance::Signer>>,
}

fn get_str<'a>(f: &'a Map<String, Value>, k: &'static str) -> Result<Option<&'a str>, ApiError> {
    match f.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(ApiError::invalid(k, format!("'{k}' must be a string."))),
    }
}

fn get_u64(f: &Map<String, Value>, k: &'static str) -> Result<Option<u64>, ApiError> {
    let bad = || ApiError::invalid(k, format!("'{k}' must be an integer."));
    match f.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(bad),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

fn get_bool(f: &Map<String, Value>, k: &'static str) -> Result<Option<bool>, ApiError> {
    let bad = || ApiError::invalid(k, format!("'{k}' must be a boolean."));
    match f.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => match s.trim() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

fn parse_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    let (w, h) = (w.parse::<u32>().ok()?, h.parse::<u32>().ok()?);
    ((1..=MAX_SIDE).contains(&w) && (1..=MAX_SIDE).contains(&h)).then_some((w, h))
}

const GPT_ONLY: [&str; 7] =
    ["output_format", "output_compression", "background", "moderation", "stream", "partial_images", "input_fidelity"];

impl Job {
    fn resolve(endpoint: Endpoint, p: &Parsed) -> Result<Job, ApiError> {
        let f = &p.fields;
        if endpoint == Endpoint::Variations {
            if let Some(field) = ["prompt", "quality", "stream", "mask"].into_iter().find(|k| f.contains_key(*k)) {
                return Err(ApiError::invalid(field, format!("Unrecognized request argument supplied: {field}")));
            }
            if !matches!(get_str(f, "model")?, None | Some("dall-e-2")) {
                return Err(ApiError::invalid("model", "Invalid model: variations are made with dall-e-2 only."));
            }
            if p.input_images != 1 {
                return Err(ApiError::invalid("image", "A variation takes exactly one image."));
            }
        }
        let prompt = match get_str(f, "prompt")? {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ if endpoint == Endpoint::Variations => String::new(),
            _ => return Err(ApiError::missing("prompt")),
        };
        let quality_in = get_str(f, "quality")?;
        let family = match get_str(f, "model")? {
            Some(m) if m.starts_with("gpt-image") => Family::Gpt,
            Some("dall-e-2") => Family::DallE2,
            Some("dall-e-3") => Family::DallE3,
            Some(m) => return Err(model_not_found(m)),
            None => {
                let gpt_field = GPT_ONLY.iter().any(|k| f.get(*k).is_some_and(|v| !v.is_null()))
                    || matches!(quality_in, Some("low" | "medium" | "high"));
                if gpt_field { Family::Gpt } else { Family::DallE2 }
            }
        };
        let gpt2 = get_str(f, "model")?.is_some_and(|m| m.starts_with("gpt-image-2"));
        if gpt2 && get_str(f, "background")? == Some("transparent") {
            return Err(ApiError::invalid("background", "Transparent background is not supported for this model."));
        }
        let n = get_u64(f, "n")?.unwrap_or(1);
        if !(1..=10).contains(&n) {
            return Err(ApiError::invalid("n", format!("Invalid 'n': integer between 1 and 10 expected, got {n}.")));
        }
        if family == Family::DallE3 && n != 1 {
            return Err(ApiError::invalid("n", "dall-e-3 supports only n=1."));
        }
        let (width, height) = match get_str(f, "size")? {
            None | Some("auto") => (1024, 1024),
            Some(s) => parse_size(s)
                .ok_or_else(|| ApiError::bad_value("size", s, "'auto' or 'WxH' with each side between 1 and 4096"))?,
        };
        let stream = get_bool(f, "stream")?.unwrap_or(false);
        let partial_images = get_u64(f, "partial_images")?.unwrap_or(0);
        if partial_images > 3 {
            return Err(ApiError::invalid(
                "partial_images",
                format!("Invalid 'partial_images': integer between 0 and 3 expected, got {partial_images}."),
            ));
        }
        let mut job = Job {
            endpoint,
            family,
            prompt,
            n: n as u32,
            width,
            height,
            quality: "medium",
            transparent: false,
            format: Format::Png,
            jpeg_quality: 100,
            want_url: false,
            stream,
            partial_images: partial_images as u32,
            input_images: p.input_images,
            gpt2,
            model: get_str(f, "model")?.unwrap_or("gpt-image-1").to_owned(),
            signer: None,
        };
        if gpt2 && !gpt2_size_ok(width, height) {
            return Err(ApiError::invalid(
                "size",
                "Invalid size: sides must be multiples of 16, at most 3840, within 3:1, 655,360 to 8,294,400 pixels.",
            ));
        }
        if family != Family::Gpt {
            if stream {
                return Err(ApiError::invalid("stream", "Streaming is only supported for GPT image models."));
            }
            job.want_url = match get_str(f, "response_format")? {
                None | Some("url") => true,
                Some("b64_json") => false,
                Some(v) => {
                    return Err(ApiError::bad_value("response_format", v, "'url' and 'b64_json'"));
                }
            };
            return Ok(job);
        }
        job.quality = match quality_in {
            None | Some("auto") | Some("medium") => "medium",
            Some("low") => "low",
            Some("high") => "high",
            Some(v) => {
                return Err(ApiError::bad_value("quality", v, "'low', 'medium', 'high', and 'auto'"));
            }
        };
        job.format = match get_str(f, "output_format")? {
            None | Some("png") => Format::Png,
            Some("jpeg") => Format::Jpeg,
            Some("webp") => Format::Webp,
            Some(v) => {
                return Err(ApiError::bad_value("output_format", v, "'png', 'jpeg', and 'webp'"));
            }
        };
        if let Some(c) = get_u64(f, "output_compression")? {
            if c > 100 {
                return Err(ApiError::invalid(
                    "output_compression",
                    format!("Invalid 'output_compression': integer between 0 and 100 expected, got {c}."),
                ));
            }
            job.jpeg_quality = c.max(1) as u8;
        }
        job.transparent = match get_str(f, "background")? {
            None | Some("auto") | Some("opaque") => false,
            Some("transparent") => true,
            Some(v) => {
                return Err(ApiError::bad_value("background", v, "'transparent', 'opaque', and 'auto'"));
            }
        };
        if job.transparent && job.format == Format::Jpeg {
            return Err(ApiError::invalid(
                "background",
                "Transparent background is not supported for the jpeg output format.",
            ));
        }
        Ok(job)
    }

    fn size(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }

    fn background(&self) -> &'static str {
        if self.transparent { "transparent" } else { "opaque" }
    }

    fn text_tokens(&self) -> u64 {
        self.prompt.split_whitespace().count() as u64 + 3
    }

    fn image_tokens(&self) -> u64 {
        match self.endpoint {
            Endpoint::Edits => IMAGE_TOKENS_PER_INPUT * self.input_images,
            // dall-e-2 variations report no usage.
            Endpoint::Generations | Endpoint::Variations => 0,
        }
    }

    fn output_tokens_per_image(&self) -> u64 {
        if self.gpt2 {
            let tiles: u64 = match self.quality {
                "low" => 16,
                "high" => 96,
                _ => 48,
            };
            let (w, h) = (u64::from(self.width), u64::from(self.height));
            let (long, short) = (w.max(h), w.min(h));
            let across = (2 * tiles * short + long) / (2 * long);
            return (tiles * across * (2_000_000 + w * h)).div_ceil(4_000_000);
        }
        let col = match (self.width, self.height) {
            (1024, 1536) => 1,
            (1536, 1024) => 2,
            _ => 0,
        };
        let row: [u64; 3] = match self.quality {
            "low" => [272, 408, 400],
            "high" => [4160, 6240, 6208],
            _ => [1056, 1584, 1568],
        };
        row[col]
    }

    /// The usage of `images` images, output tokens multiplied by `times` (a fault).
    fn usage(&self, images: u64, times: u64) -> Value {
        let (text, image) = (self.text_tokens(), self.image_tokens());
        let input = text + image;
        let output = images * self.output_tokens_per_image() * times;
        json!({
            "total_tokens": input + output,
            "input_tokens": input,
            "output_tokens": output,
            "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        })
    }

    /// Encodes one image; `seed` varies the colours (image index, partial index).
    async fn render(&self, seed: u32) -> Result<Bytes, ApiError> {
        let (w, h) = (self.width, self.height);
        let (format, transparent, q) = match self.family {
            Family::Gpt => (self.format, self.transparent, self.jpeg_quality),
            Family::DallE2 | Family::DallE3 => (Format::Png, false, 100),
        };
        let signer = self.signer.clone();
        let model = self.model.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = encode(w, h, seed, format, transparent, q).map_err(|e| internal(e.to_string()))?;
            let Some(signer) = signer else { return Ok(bytes) };
            let media = match format {
                Format::Png => provenance::MediaType::Png,
                Format::Jpeg => provenance::MediaType::Jpeg,
                Format::Webp => provenance::MediaType::Webp,
            };
            let generation =
                provenance::Generation { model: &model, checkpoint: None, prompt: None, partial_image_index: None };
            signer.sign(&bytes, media, provenance::Origin::Generated, &generation).map_err(|e| internal(e.to_string()))
        })
        .await
        .map_err(|e| internal(e.to_string()))?
        .map(Bytes::from)
    }
}

/// gpt-image-2's size rule.
fn gpt2_size_ok(w: u32, h: u32) -> bool {
    let (long, short) = (w.max(h), w.min(h));
    let pixels = u64::from(w) * u64::from(h);
    w.is_multiple_of(16)
        && h.is_multiple_of(16)
        && long <= 3840
        && long <= 3 * short
        && (655_360..=8_294_400).contains(&pixels)
}

/// OpenAI's answer for a model that does not exist, or no longer does.
fn model_not_found(model: &str) -> ApiError {
    ApiError {
        code: Some("model_not_found"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
    }
}

fn internal(msg: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A gradient image of `w` x `h`, encoded as `format`.
fn encode(
    w: u32,
    h: u32,
    seed: u32,
    format: Format,
    transparent: bool,
    jpeg_quality: u8,
) -> image::ImageResult<Vec<u8>> {
    let alpha = transparent && format != Format::Jpeg;
    let channels = if alpha { 4 } else { 3 };
    let mut px = Vec::with_capacity((w as usize) * (h as usize) * channels);
    let blue = (seed.wrapping_mul(53) % 256) as u8;
    for y in 0..h {
        let g = (y * 255 / h.max(1)) as u8;
        for x in 0..w {
            let r = (x * 255 / w.max(1)) as u8;
            px.extend_from_slice(&[r, g, blue]);
            if alpha {
                // Transparent left half, opaque right half.
                px.push(if x < w / 2 { 0 } else { 255 });
            }
        }
    }
    let color = if alpha { ExtendedColorType::Rgba8 } else { ExtendedColorType::Rgb8 };
    let mut out = Vec::new();
    match format {
        Format::Png => image::codecs::png::PngEncoder::new_with_quality(
            &mut out,
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Sub,
        )
        .write_image(&px, w, h, color)?,
        Format::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, jpeg_quality).write_image(&px, w, h, color)?
        }
        Format::Webp => image::codecs::webp::WebPEncoder::new_lossless(&mut out).write_image(&px, w, h, color)?,
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Answers

async fn respond_json(state: &FakeState, job: Job, faults: &Faults) -> Result<Response, ApiError> {
    let drop_mid = faults.drop_mid;
    let mut data = Vec::new();
    for i in 0..job.n {
        let bytes = job.render(i).await?;
        let mut item = Map::new();
        if job.want_url {
            item.insert("url".into(), Value::String(state.store_file(bytes)));
        } else {
            item.insert("b64_json".into(), Value::String(B64.encode(&bytes)));
        }
        if job.family == Family::DallE3 {
            item.insert("revised_prompt".into(), Value::String(format!("revised: {}", job.prompt)));
        }
        data.push(Value::Object(item));
    }
    let mut body = json!({"created": now(), "data": data});
    // Some OpenAI-compatible gateways leave out the resolved settings: `[fault:bare]` plays one.
    if job.family == Family::Gpt && !job.prompt.contains("[fault:bare]") {
        body["background"] = json!(job.background());
        body["output_format"] = json!(job.format.name());
        body["size"] = json!(faults.reported_size(&job));
        body["quality"] = json!(job.quality);
    }
    if job.family == Family::Gpt {
        // Some OpenAI-compatible gateways report no usage: `[fault:no-usage]` plays one.
        if !job.prompt.contains("[fault:no-usage]") {
            body["usage"] = job.usage(u64::from(job.n), faults.usage_times.unwrap_or(1));
        }
    }
    let text = body.to_string();
    if drop_mid {
        let half = Bytes::from(text);
        let cut = half.len() / 2;
        let first = half.slice(..cut);
        // The pause lets hyper flush the first half before the body fails.
        let items = stream::iter([Some(first), None]).then(|item| async move {
            match item {
                Some(b) => Ok(b),
                None => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(io::Error::other("fake-openai: dropped connection"))
                }
            }
        });
        return Ok(([(header::CONTENT_TYPE, "application/json")], Body::from_stream(items)).into_response());
    }
    state.bill(u64::from(job.n));
    Ok(([(header::CONTENT_TYPE, "application/json")], text).into_response())
}

/// One planned event of a stream: image `image`, partial `partial` (None = completed).
#[derive(Debug, Clone, Copy)]
struct Step {
    image: u32,
    partial: Option<u32>,
}

fn stream_response(state: &FakeState, job: Job, faults: &Faults) -> Response {
    let drop_mid = faults.drop_mid;
    let gap = faults.gap_ms.map_or(EVENT_GAP, Duration::from_millis);
    let shape = Shape {
        size: faults.reported_size(&job),
        usage_times: faults.usage_times.unwrap_or(1),
        bare: job.prompt.contains("[fault:bare]"),
    };
    let state = state.clone();
    let mut steps = Vec::new();
    for image in 0..job.n {
        for k in 0..job.partial_images {
            steps.push(Step { image, partial: Some(k) });
        }
        steps.push(Step { image, partial: None });
    }
    let job = Arc::new(job);
    let shape = Arc::new(shape);
    let events = stream::iter(steps.into_iter().enumerate()).then(move |(i, step)| {
        let job = Arc::clone(&job);
        let shape = Arc::clone(&shape);
        let state = state.clone();
        async move {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            if drop_mid && i == 1 {
                return Err(io::Error::other("fake-openai: dropped connection"));
            }
            let event = event(&job, &shape, step).await.map_err(|e| io::Error::other(e.message))?;
            if step.partial.is_none() {
                state.bill(1);
            }
            Ok(event)
        }
    });
    // Stop after the first error so that hyper aborts the connection.
    let events = events.scan(false, |failed, item| {
        if *failed {
            return futures_util::future::ready(None);
        }
        *failed = item.is_err();
        futures_util::future::ready(Some(item))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(events))
        .into_response()
}

/// What stream events report, as the faults shape it.
struct Shape {
    size: String,
    usage_times: u64,
    /// `[fault:bare]`: events without the resolved settings, like some gateways.
    bare: bool,
}

async fn event(job: &Job, shape: &Shape, step: Step) -> Result<Bytes, ApiError> {
    let seed = step.image * 8 + step.partial.map_or(7, |k| k + 1);
    let bytes = job.render(seed).await?;
    let prefix = job.endpoint.event_prefix();
    let mut data = json!({
        "b64_json": B64.encode(&bytes),
        "created_at": now(),
        "size": shape.size,
        "quality": job.quality,
        "background": job.background(),
        "output_format": job.format.name(),
    });
    if shape.bare
        && let Some(fields) = data.as_object_mut()
    {
        for field in ["size", "quality", "background", "output_format"] {
            fields.remove(field);
        }
    }
    let kind = match step.partial {
        Some(k) => {
            data["partial_image_index"] = json!(k);
            format!("{prefix}.partial_image")
        }
        None => {
            if !job.prompt.contains("[fault:no-usage]") {
                data["usage"] = job.usage(1, shape.usage_times);
            }
            format!("{prefix}.completed")
        }
    };
    data["type"] = json!(kind);
    Ok(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")))
}
