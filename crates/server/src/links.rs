//! `response_format=url` for every model: a response's images are stored (in the ledger's database,
//! [`ledger::Ledger::store_image`]) and answered with URLs that imagegate serves itself
//! (`GET /v1/images/{id}/content`, no key needed: the unguessable id is the capability, as OpenAI's
//! signed image URLs are) for [`URL_LIFETIME`], after which they answer 404 and the sweep deletes them.
//!
//! OpenAI answers `url` only for DALL-E (its default there) and refuses it for GPT image models; here
//! any model can answer with URLs, so that code written for DALL-E works with every model. Upstreams are
//! asked for base64 where they take `response_format` (DALL-E) and for nothing where they do not: the
//! URLs are always imagegate's own. Without a database (embedded uses) a DALL-E upstream's own URLs
//! pass through, and other models refuse `url`.

use api::ApiError;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use domain::{ImageOptions, ImagePayload, ImageResult, ModelFamily, OutputFormat, ResponseFormat};

use crate::{AppState, HttpError};

/// How long a stored image is served, as OpenAI's image URLs.
pub const URL_LIFETIME: chrono::Duration = chrono::Duration::minutes(60);

/// Where a response's URLs point and whose they are.
#[derive(Debug, Clone)]
pub struct Links {
    /// The server's public base URL, without a trailing slash (`https://images.example.com`).
    pub base: String,
    /// The key whose request made the images.
    pub key_id: Option<String>,
}

/// Whether the client wants URLs: `response_format=url`, or DALL-E's default. `None` answers inline.
fn wants_urls(options: &ImageOptions, family: ModelFamily) -> bool {
    match options.response_format {
        Some(f) => f == ResponseFormat::Url,
        None => matches!(family, ModelFamily::DallE2 | ModelFamily::DallE3),
    }
}

/// Decides how the request's images are delivered, and sets what its provider is asked for: base64
/// from an upstream that takes `response_format` (DALL-E) when imagegate makes the URLs, nothing from
/// one that does not. Returns the links to make, or `None` to answer inline (or with the upstream's own
/// URLs).
pub fn plan(
    state: &AppState,
    headers: &HeaderMap,
    options: &mut ImageOptions,
    family: ModelFamily,
    key_id: Option<&str>,
) -> Result<Option<Links>, ApiError> {
    let dalle = matches!(family, ModelFamily::DallE2 | ModelFamily::DallE3);
    if !wants_urls(options, family) {
        options.response_format = if dalle { Some(ResponseFormat::B64Json) } else { None };
        return Ok(None);
    }
    if options.stream {
        return Err(ApiError::invalid_value_msg(
            "response_format",
            "Invalid value: 'url'. Streamed images are sent in the events as base64: omit 'response_format' or use 'b64_json' with 'stream'.".into(),
        ));
    }
    if state.ledger.is_none() {
        if dalle {
            // No store: the upstream's own URLs.
            options.response_format = Some(ResponseFormat::Url);
            return Ok(None);
        }
        return Err(ApiError::invalid_value_msg(
            "response_format",
            "Invalid value: 'url'. This server keeps no images (it has no database): use 'b64_json'.".into(),
        ));
    }
    options.response_format = if dalle { Some(ResponseFormat::B64Json) } else { None };
    Ok(Some(Links { base: public_base(state, headers), key_id: key_id.map(str::to_owned) }))
}

/// The configured public URL, or the one the request came to (`http://` and its `Host`).
fn public_base(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("http://{host}")
}

/// Stores `result`'s inline images (in `format`) and puts their URLs in their place. An image that
/// cannot be stored stays inline (the client keeps what it paid for; the log says why).
pub async fn store(state: &AppState, links: &Links, result: &mut ImageResult, format: OutputFormat, request_id: &str) {
    let Some(ledger) = &state.ledger else { return };
    let content_type = format!("image/{}", format.as_str());
    for image in &mut result.images {
        let ImagePayload::Base64(b64) = &mut image.payload else { continue };
        // The text moves to the decoding thread and comes back with the bytes: never copied.
        let text = std::mem::take(b64);
        let decoded = tokio::task::spawn_blocking(move || {
            let bytes = base64::engine::general_purpose::STANDARD.decode(&text);
            (text, bytes)
        })
        .await;
        let (text, bytes) = match decoded {
            Ok((text, Ok(bytes))) => (text, bytes),
            Ok((text, Err(_))) => {
                *b64 = text;
                tracing::error!(request_id, "an image to link was not valid base64; it is answered inline");
                continue;
            }
            Err(_) => {
                tracing::error!(request_id, "an image to link could not be decoded; it is left out");
                continue;
            }
        };
        match ledger.store_image(links.key_id.as_deref(), &content_type, &bytes, URL_LIFETIME).await {
            Ok(id) => image.payload = ImagePayload::Url(format!("{}/v1/images/{id}/content", links.base)),
            Err(e) => {
                *b64 = text;
                tracing::error!(request_id, error = %e, "could not store an image to link; it is answered inline")
            }
        }
    }
}

/// `GET /v1/images/{id}/content`: a stored image until it expires, then 404.
pub async fn content(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let request_id = crate::jobs::request_id(&headers).to_owned();
    let gone = || {
        HttpError(ApiError::new(
            404,
            "invalid_request_error",
            None,
            Some("image_not_found"),
            "No image at this URL: image URLs expire 60 minutes after they are made.".into(),
        ))
        .into_response()
    };
    let Some(ledger) = &state.ledger else { return gone() };
    if !id.starts_with("img_") || id.len() > 64 {
        return gone();
    }
    match ledger.stored_image(&id).await {
        Ok(Some(image)) => {
            let left = (image.expires_at - ledger.now()).num_seconds().max(0);
            let mut response = image.bytes.into_response();
            let headers = response.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&image.content_type) {
                headers.insert(header::CONTENT_TYPE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("private, max-age={left}")) {
                headers.insert(header::CACHE_CONTROL, v);
            }
            response
        }
        Ok(None) => gone(),
        Err(e) => {
            tracing::error!(request_id, error = %e, "could not read a stored image");
            HttpError(ApiError::internal(&request_id)).into_response()
        }
    }
}
