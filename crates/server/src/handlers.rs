//! The HTTP handlers. Thin on purpose: read the body, let `api` parse and validate, route, call the
//! provider, and write the response. Image decoding runs on blocking threads, never on the runtime.

use api::{ApiError, Fields, RawRequest};
use axum::extract::{Extension, FromRequest, Multipart, Path, Request, State};
use axum::http::header::{ALLOW, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use domain::{EditRequest, GenerateRequest, ImageJob, InputImage, JobKind, VariationRequest};
use serde_json::{Map, Value};

use crate::accounts::{self, Caller};
use crate::body::BodyError;
use crate::jobs::{Who, execute, json_response, request_id};
use crate::routing::Route;
use crate::{AppState, HttpError};
use crate::{links, remote};
use api::upstream::ImageRef;

type HandlerResult = Result<Response, HttpError>;

pub async fn generations(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    request: Request,
) -> HandlerResult {
    let headers = request.headers().clone();
    let tier = line_tier(&request);
    let body = read_body(&state, request, generation_body_limit(&state)).await?;
    let fingerprint = wants_fingerprint(&state, &headers).then(|| ledger::fingerprint(&body));
    let map = json_body(&headers, body).await?;
    let raw = RawRequest::parse(&Fields::Json(&map), JobKind::Generate, &[])?;
    let (model, route) = route(&state, &raw, JobKind::Generate)?;
    let (prompt, mut options, _) = raw.validate(&route.display_name(&model), route.family, JobKind::Generate)?;
    let caller = caller.map(|Extension(c)| c);
    let links = links::plan(&state, &headers, &mut options, route.family, caller.as_ref().map(|c| c.0.id.as_str()))?;
    let job = ImageJob::Generate(GenerateRequest { prompt, options });
    execute(&state, route, job, &headers, Who { caller, model, fingerprint, links, tier }).await
}

/// A batch's line runs at the batch tier.
fn line_tier(request: &Request) -> Option<domain::Tier> {
    request.extensions().get::<crate::batches::LineOwner>().map(|_| domain::Tier::Batch)
}

/// Checks a JSON request `body` for `kind` as its endpoint would before running it (fields, model,
/// the model's rules), without running it: what a batch's input file is checked against.
pub(crate) fn check_json_request(state: &AppState, kind: JobKind, body: &Map<String, Value>) -> Result<(), ApiError> {
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid_value_msg("stream", "A batch's requests cannot be streamed.".to_owned()));
    }
    let image_fields: &[&str] = if kind == JobKind::Edit { &["images", "mask"] } else { &[] };
    let raw = RawRequest::parse(&Fields::Json(body), kind, image_fields)?;
    let (model, route) = route(state, &raw, kind).map_err(|e| e.0)?;
    raw.validate(&route.display_name(&model), route.family, kind)?;
    if kind == JobKind::Edit && !body.contains_key("images") {
        return Err(ApiError::missing("images"));
    }
    Ok(())
}

pub async fn edits(State(state): State<AppState>, request: Request) -> HandlerResult {
    let headers = request.headers().clone();
    let tier = line_tier(&request);
    let caller = request.extensions().get::<Caller>().cloned();
    let ct = content_type(&headers).to_owned();
    let form = if ct.starts_with("multipart/form-data") {
        read_multipart(request, &state).await?
    } else if is_json(&ct) {
        let body = read_body(&state, request, state.limits.max_body_bytes).await?;
        // Parsing and base64-decoding megabytes of images is work for a blocking thread.
        let (mut form, remote) = blocking(move || read_json_edit(&body), &headers).await??;
        fetch_remote(&state, &mut form, remote, caller.as_ref()).await?;
        form
    } else {
        return Err(ApiError::unsupported_media_type(&ct, "'multipart/form-data' or 'application/json'").into());
    };

    let raw = match &form.fields {
        EditFields::Text(parts) => RawRequest::parse(&Fields::Text(parts), JobKind::Edit, &[])?,
        EditFields::Json(map) => RawRequest::parse(&Fields::Json(map), JobKind::Edit, &["images", "mask"])?,
    };
    let (model, route) = route(&state, &raw, JobKind::Edit)?;
    let (prompt, mut options, input_fidelity) =
        raw.validate(&route.display_name(&model), route.family, JobKind::Edit)?;
    let links = links::plan(&state, &headers, &mut options, route.family, caller.as_ref().map(|c| c.0.id.as_str()))?;
    let fingerprint = match wants_fingerprint(&state, &headers) {
        // Hashing megabytes of images is work for a blocking thread.
        true => Some(blocking(form.fingerprint_job(), &headers).await?),
        false => None,
    };
    let (images, mask) = inspect_inputs(form.images, form.mask, &state, &headers).await?;
    api::images::check_inputs(&images, route.family, &model)?;
    if let Some(m) = &mask {
        api::images::check_mask(m, &images[0])?;
    }
    let job = ImageJob::Edit(EditRequest { prompt, images, mask, input_fidelity, options });
    execute(&state, route, job, &headers, Who { caller, model, fingerprint, links, tier }).await
}

/// `POST /v1/images/variations`: multipart with one `image`, as OpenAI's (dall-e-2), or for a local model.
pub async fn variations(State(state): State<AppState>, request: Request) -> HandlerResult {
    let headers = request.headers().clone();
    let caller = request.extensions().get::<Caller>().cloned();
    let ct = content_type(&headers).to_owned();
    if !ct.starts_with("multipart/form-data") {
        return Err(ApiError::unsupported_media_type(&ct, "'multipart/form-data'").into());
    }
    let form = read_multipart(request, &state).await?;
    if form.mask.is_some() {
        return Err(ApiError::unknown_parameter("mask").into());
    }
    if form.images.len() > 1 {
        return Err(ApiError::invalid_value_msg(
            "image",
            format!("A variation is made of exactly one image, and {} were sent.", form.images.len()),
        )
        .into());
    }
    let EditFields::Text(parts) = &form.fields else {
        return Err(ApiError::unsupported_media_type(&ct, "'multipart/form-data'").into());
    };
    let raw = RawRequest::parse(&Fields::Text(parts), JobKind::Variation, &[])?;
    let (model, route) = route(&state, &raw, JobKind::Variation)?;
    let (_, mut options, _) = raw.validate(&route.display_name(&model), route.family, JobKind::Variation)?;
    let links = links::plan(&state, &headers, &mut options, route.family, caller.as_ref().map(|c| c.0.id.as_str()))?;
    let fingerprint = match wants_fingerprint(&state, &headers) {
        true => Some(blocking(form.fingerprint_job(), &headers).await?),
        false => None,
    };
    let (images, _) = inspect_inputs(form.images, None, &state, &headers).await?;
    api::images::check_inputs(&images, route.family, &model)?;
    let Some(image) = images.into_iter().next() else { return Err(ApiError::missing("image").into()) };
    let job = ImageJob::Variation(VariationRequest { image, options });
    execute(&state, route, job, &headers, Who { caller, model, fingerprint, links, tier: None }).await
}

fn wants_fingerprint(state: &AppState, headers: &HeaderMap) -> bool {
    state.ledger.is_some() && headers.contains_key(accounts::IDEMPOTENCY_HEADER)
}

/// `POST /v1/images/estimates`: what planned requests would cost, before spending anything.
pub async fn estimates(State(state): State<AppState>, request: Request) -> HandlerResult {
    let headers = request.headers().clone();
    let body = read_body(&state, request, state.limits.max_body_bytes).await?;
    let map = json_body(&headers, body).await?;
    let items = api::estimates::parse_estimate_request(&map)?;
    // Pricing counts prompt tokens: CPU work for a blocking thread, not the async runtime.
    let outcome = blocking(move || crate::estimates::estimate(&state, &items), &headers).await??;
    Ok(json_response(serde_json::to_vec(&outcome.json).unwrap_or_default()))
}

pub async fn list_models(State(state): State<AppState>) -> Response {
    let listing = state.catalog.listing();
    let objects: Vec<api::ModelObject<'_>> = listing.iter().map(model_object).collect();
    json_response(api::models_json(&objects, 0))
}

pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> HandlerResult {
    let listing = state.catalog.listing();
    let Some(found) = listing.iter().find(|l| l.id == id) else {
        // A model shut down without a replacement here gets the refusal that says so.
        let e = state.catalog.resolve(&id).err();
        return Err(e.unwrap_or_else(|| ApiError::model_not_found(&id, &state.catalog.public_names())).into());
    };
    Ok(json_response(api::model_json(&model_object(found), 0).to_string().into_bytes()))
}

fn model_object(l: &crate::routing::Listed) -> api::ModelObject<'_> {
    api::ModelObject { id: &l.id, owned_by: &l.owned_by, shutdown_date: l.shutdown_date.map(|d| d.to_string()) }
}

pub async fn health() -> Response {
    json_response(br#"{"status":"ok"}"#.to_vec())
}

pub async fn not_found(method: Method, uri: Uri) -> HttpError {
    HttpError(ApiError::route_not_found(method.as_str(), uri.path()))
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let allowed = if path.starts_with("/v1/models")
        || path.starts_with("/v1/organization/")
        || path == "/health"
        || (path.starts_with("/v1/images/") && path.ends_with("/content"))
    {
        "GET"
    } else if path.starts_with("/v1/admin/keys/") {
        "POST, DELETE"
    } else if path == "/v1/admin/keys" {
        "GET, POST"
    } else {
        "POST"
    };
    let mut response = HttpError(ApiError::method_not_allowed(method.as_str(), uri.path(), allowed)).into_response();
    response.headers_mut().insert(ALLOW, HeaderValue::from_static(allowed));
    response
}

/// Picks the model (the request's, the configured default, or OpenAI's default) and its route.
fn route(state: &AppState, raw: &RawRequest, kind: JobKind) -> Result<(String, Route), HttpError> {
    let model = match (&raw.model, &state.default_model) {
        (Some(m), _) => m.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => raw.openai_default_model(kind).to_owned(),
    };
    let route = state.catalog.resolve(&model)?;
    Ok((model, route))
}

enum EditFields {
    Text(Vec<(String, String)>),
    Json(Map<String, Value>),
}

/// An edit's body, read but not yet checked.
struct EditForm {
    fields: EditFields,
    /// (field name for errors, bytes, client file name)
    images: Vec<(String, Bytes, Option<String>)>,
    mask: Option<(Bytes, Option<String>)>,
}

impl EditForm {
    /// The form's content (fields in order, then every image and the mask) as a fingerprint, computed
    /// by the returned closure (the images are shared, not copied).
    fn fingerprint_job(&self) -> impl FnOnce() -> String + Send + 'static {
        let fields = match &self.fields {
            EditFields::Text(parts) => parts.iter().map(|(k, v)| format!("{k}={v}\n")).collect::<String>(),
            EditFields::Json(map) => {
                let rest = map.iter().filter(|(k, _)| *k != "images" && *k != "mask");
                Value::Object(rest.map(|(k, v)| (k.clone(), v.clone())).collect()).to_string()
            }
        };
        let mut files: Vec<Bytes> = self.images.iter().map(|(_, bytes, _)| bytes.clone()).collect();
        files.extend(self.mask.iter().map(|(bytes, _)| bytes.clone()));
        move || {
            let mut parts: Vec<&[u8]> = vec![fields.as_bytes()];
            parts.extend(files.iter().map(|b| b.as_ref()));
            ledger::fingerprint_parts(&parts)
        }
    }
}

async fn read_multipart(request: Request, state: &AppState) -> Result<EditForm, HttpError> {
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|r| body_rejection(r.status().as_u16(), &r.body_text(), state.limits.max_body_bytes))?;
    let mut texts = Vec::new();
    let mut files = Vec::new();
    let mut mask = None;
    let limit = state.limits.max_body_bytes;
    let deadline = tokio::time::Instant::now() + state.limits.decode_wait;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(body_rejection(e.status().as_u16(), &e.body_text(), state.limits.max_body_bytes)),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let is_image = name == "image" || name == "image[]" || is_indexed_image(&name);
        let has_file = filename.is_some();
        // Read into the body budget, and large fields into pages of their own (`crate::body`).
        let mut collector = state.body_budget.collector(limit, deadline);
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => collector.push(&chunk).await.map_err(|e| body_error(e, limit))?,
                Ok(None) => break,
                Err(e) => return Err(body_rejection(e.status().as_u16(), &e.body_text(), limit)),
            }
        }
        let bytes = collector.finish();
        if is_image {
            files.push((bytes, filename));
        } else if name == "mask" {
            mask = Some((bytes, filename));
        } else if has_file {
            return Err(ApiError::unknown_parameter(&name).into());
        } else {
            if bytes.len() > GENERATION_BODY_LIMIT {
                return Err(ApiError::invalid_value_msg(
                    &name,
                    format!(
                        "The '{name}' field is {} bytes long; a text field is at most {GENERATION_BODY_LIMIT} bytes (a prompt at most 32,000 characters).",
                        bytes.len()
                    ),
                )
                .into());
            }
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| ApiError::invalid_type(&name, "a UTF-8 string", "binary data"))?;
            texts.push((name, text));
        }
    }
    check_image_count(files.len(), "image")?;
    let count = files.len();
    let images = files.into_iter().enumerate().map(|(i, (b, f))| (api::images::image_param(i, count), b, f)).collect();
    Ok(EditForm { fields: EditFields::Text(texts), images, mask })
}

fn is_indexed_image(name: &str) -> bool {
    name.strip_prefix("image[")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// An image of a JSON edit given by URL: where it goes in the form, and the URL.
struct RemoteRef {
    /// `None`: the mask; else the index in the form's images.
    slot: Option<usize>,
    param: String,
    source: Source,
}

/// Where an image of a JSON edit comes from.
enum Source {
    /// A URL, fetched (`server::remote`).
    Url(String),
    /// A file of the caller's on the Files API.
    File(String),
}

/// Fetches the form's images given by URL (`server::remote`) or by file id (the caller's files) into
/// their places.
async fn fetch_remote(
    state: &AppState,
    form: &mut EditForm,
    remote: Vec<RemoteRef>,
    caller: Option<&Caller>,
) -> Result<(), HttpError> {
    for r in remote {
        let bytes = match &r.source {
            Source::Url(url) => remote::fetch(state.remote_images.as_deref(), &r.param, url).await?,
            Source::File(id) => crate::batches::image_file(state, caller, &r.param, id).await?,
        };
        match r.slot {
            Some(i) => {
                if let Some(image) = form.images.get_mut(i) {
                    image.1 = bytes;
                }
            }
            None => form.mask = Some((bytes, None)),
        }
    }
    Ok(())
}

fn read_json_edit(body: &[u8]) -> Result<(EditForm, Vec<RemoteRef>), HttpError> {
    let map = json_object(body)?;
    let refs = match map.get("images") {
        None | Some(Value::Null) => return Err(ApiError::missing("images").into()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(ApiError::invalid_type("images", "an array", json_kind(other)).into());
        }
    };
    check_image_count(refs.len(), "images")?;
    let mut images = Vec::with_capacity(refs.len());
    let mut remote = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let param = format!("images[{i}]");
        let bytes = match api::upstream::parse_image_ref(&param, r)? {
            ImageRef::Data(bytes) => bytes,
            ImageRef::Url(url) => {
                remote.push(RemoteRef { slot: Some(i), param: format!("{param}.image_url"), source: Source::Url(url) });
                Bytes::new()
            }
            ImageRef::File(id) => {
                remote.push(RemoteRef { slot: Some(i), param: format!("{param}.file_id"), source: Source::File(id) });
                Bytes::new()
            }
        };
        images.push((param, bytes, None));
    }
    let mask = match map.get("mask") {
        None | Some(Value::Null) => None,
        Some(r) => match api::upstream::parse_image_ref("mask", r)? {
            ImageRef::Data(bytes) => Some((bytes, None)),
            ImageRef::Url(url) => {
                remote.push(RemoteRef { slot: None, param: "mask.image_url".into(), source: Source::Url(url) });
                None
            }
            ImageRef::File(id) => {
                remote.push(RemoteRef { slot: None, param: "mask.file_id".into(), source: Source::File(id) });
                None
            }
        },
    };
    Ok((EditForm { fields: EditFields::Json(map), images, mask }, remote))
}

fn check_image_count(count: usize, param: &str) -> Result<(), ApiError> {
    if count == 0 {
        return Err(ApiError::missing(param));
    }
    if count > api::images::MAX_INPUT_IMAGES {
        return Err(ApiError::invalid_value_msg(
            param,
            format!(
                "Too many input images: {count} were sent, and at most {} are allowed.",
                api::images::MAX_INPUT_IMAGES
            ),
        ));
    }
    Ok(())
}

/// Checks every input image and the mask: first all their headers (format, pixel limit) on a blocking
/// thread, then decodes each on one, within the process's decode budget: each decode holds its exact
/// buffer size there while it runs (given back by the blocking task itself, so also when the client
/// has gone), and the request waits at most `Limits::decode_wait` in all for room, then gets a 503.
async fn inspect_inputs(
    images: Vec<(String, Bytes, Option<String>)>,
    mask: Option<(Bytes, Option<String>)>,
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Vec<InputImage>, Option<InputImage>), HttpError> {
    let max_pixels = state.limits.max_image_pixels;
    let has_mask = mask.is_some();
    let probe = move || -> Result<Vec<api::images::ProbedImage>, ApiError> {
        images
            .into_iter()
            .map(|(param, bytes, name)| api::images::probe_image(&param, bytes, name, max_pixels))
            .chain(mask.map(|(bytes, name)| api::images::probe_image("mask", bytes, name, max_pixels)))
            .collect()
    };
    let probed = blocking(probe, headers).await??;
    let deadline = tokio::time::Instant::now() + state.limits.decode_wait;
    let mut decoded = Vec::with_capacity(probed.len());
    for image in probed {
        let reservation = state.decode_budget.reserve(image.decoded_bytes(), deadline).await?;
        let decode = move || {
            let result = image.decode();
            drop(reservation);
            result
        };
        decoded.push(blocking(decode, headers).await??);
    }
    let mask = if has_mask { decoded.pop() } else { None };
    Ok((decoded, mask))
}

/// Runs `work` on a blocking thread; a task that panics is a 500.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
    headers: &HeaderMap,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        tracing::error!(error = %e, request_id = request_id(headers), "a blocking task failed");
        HttpError(ApiError::internal(request_id(headers)))
    })
}

/// The whole body, at most `limit` bytes (413 once more arrives: reading up to the limit first lets a
/// client that writes its whole body before reading still see the answer, where refusing on the
/// `Content-Length` alone broke its pipe), counted against the server's body budget while any copy
/// of it lives (a 503 to retry when there is no room in time).
async fn read_body(state: &AppState, request: Request, limit: usize) -> Result<Bytes, HttpError> {
    let deadline = tokio::time::Instant::now() + state.limits.decode_wait;
    state.body_budget.read(request.into_body(), limit, deadline).await.map_err(|e| body_error(e, limit))
}

fn body_error(e: BodyError, limit: usize) -> HttpError {
    match e {
        BodyError::TooLarge => HttpError(ApiError::payload_too_large(limit)),
        BodyError::Busy(e) => HttpError(e),
        BodyError::Read(text) => {
            HttpError(ApiError::malformed_body(format!("The request body could not be read: {text}")))
        }
    }
}

/// A body that could not be read: too large (413) or malformed (400).
fn body_rejection(status: u16, text: &str, limit: usize) -> HttpError {
    if status == 413 {
        HttpError(ApiError::payload_too_large(limit))
    } else {
        HttpError(ApiError::malformed_body(format!("The request body could not be read: {text}")))
    }
}

/// The largest generation body: a prompt of at most 32,000 characters and a dozen fields fit in a
/// fraction of it (the server-wide `max_body_bytes` is for edits' images).
pub const GENERATION_BODY_LIMIT: usize = 1024 * 1024;

/// [`GENERATION_BODY_LIMIT`], or the server's limit when that is smaller.
pub fn generation_body_limit(state: &AppState) -> usize {
    GENERATION_BODY_LIMIT.min(state.limits.max_body_bytes)
}

/// The most JSON values a request body may hold. OpenAI's requests hold tens, the largest estimate a
/// few thousand; a parsed value takes tens of bytes however short its text, so a body of tiny values
/// (`[0,0,0,...]`) would grow twentyfold in memory when parsed.
pub const MAX_JSON_VALUES: usize = 20_000;

/// Bodies up to this size are parsed on the async runtime; larger ones on a blocking thread.
const PARSE_ON_RUNTIME_BYTES: usize = 64 * 1024;

/// A JSON-only endpoint's body as an object: 413 when over `limit`, 415 for another content type, 400
/// when it is not a JSON object (or holds too many values).
async fn json_body(headers: &HeaderMap, body: Bytes) -> Result<Map<String, Value>, HttpError> {
    let ct = content_type(headers);
    if !ct.is_empty() && !is_json(ct) {
        return Err(ApiError::unsupported_media_type(ct, "'application/json'").into());
    }
    if body.len() <= PARSE_ON_RUNTIME_BYTES {
        return json_object(&body);
    }
    blocking(move || json_object(&body), headers).await?
}

/// Whether `body` holds at most `max` JSON values, counted without parsing: every value after the
/// first of an array or object follows a `,`, and every array or object opens with `[` or `{` (outside
/// strings). An upper bound on what parsing it allocates, read in one pass.
fn json_values_within(body: &[u8], max: usize) -> bool {
    let (mut count, mut in_string, mut escaped) = (1usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b',' | b'[' | b'{' => {
                count += 1;
                if count > max {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, HttpError> {
    if !json_values_within(body, MAX_JSON_VALUES) {
        return Err(ApiError::malformed_body(format!(
            "The request body holds more than {MAX_JSON_VALUES} JSON values; no request needs that many."
        ))
        .into());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::malformed_body(format!(
            "The request body must be a JSON object, and it is {}.",
            json_kind(&other)
        ))
        .into()),
        Err(e) => Err(ApiError::malformed_body(format!(
            "We could not parse the JSON body of your request ({e}). The API expects a JSON object."
        ))
        .into()),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn content_type(headers: &HeaderMap) -> &str {
    headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn is_json(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")
}

/// `GET /metrics`: the OpenMetrics exposition (no key: it names no key, project or secret).
pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], state.metrics.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_counted_outside_strings_only() {
        assert!(json_values_within(br#"{"prompt":"a, b, [c], {d}","n":2}"#, 3));
        // The document, the object, a member after the first, the array, three elements after its first.
        assert!(json_values_within(br#"{"prompt":"a","junk":[0,0,0,0]}"#, 7));
        assert!(!json_values_within(br#"{"prompt":"a","junk":[0,0,0,0]}"#, 6));
        // An escaped quote does not end the string.
        assert!(json_values_within(br#"{"p":"say \",,,,,\" twice"}"#, 2));
        let bomb = format!("{{\"prompt\":\"x\",\"junk\":[{}0]}}", "0,".repeat(MAX_JSON_VALUES));
        assert!(matches!(json_object(bomb.as_bytes()), Err(HttpError(e)) if e.status == 400));
    }
}
