//! The upstream provider: any OpenAI-compatible Images API (OpenAI itself, CometAPI, another gateway).
//!
//! One pooled HTTP client per provider. Failures that may pass (connection errors, 408, 429, 5xx) are
//! retried a bounded number of times with exponential backoff and jitter, waiting at least what the
//! upstream asks in `Retry-After`/`retry-after-ms`; any other 4xx is final and passed through with the
//! upstream's status and envelope. Streams are forwarded event by event as they arrive.

use std::time::Duration;

use api::{ErrorBody, UpstreamStreamItem};
use async_trait::async_trait;
use bytes::Bytes;
use domain::{EditRequest, ImageJob, InputImage};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::multipart::{Form, Part};

use crate::schedule::{Permit, Place, Queue, QueueLimits};
use crate::{CancellationToken, Provider, ProviderError, ProviderOutput};

/// How to reach one upstream, and how patiently.
#[derive(Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL including the version prefix, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer`; never logged.
    pub api_key: Option<String>,
    /// Limit on one attempt; for streams, on the wait for the first byte and between events.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first backoff; each retry doubles it, up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Requests in flight to this upstream at once, and how background (flex, batch) work waits.
    pub queue: QueueLimits,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("queue", &self.queue)
            .finish()
    }
}

impl UpstreamConfig {
    /// Defaults like the OpenAI SDKs': 10 minute timeout, 2 retries.
    pub fn new(name: impl Into<String>, base_url: impl Into<String>, api_key: Option<String>) -> Self {
        UpstreamConfig {
            name: name.into(),
            base_url: base_url.into(),
            api_key,
            timeout: Duration::from_secs(600),
            max_retries: 2,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            queue: QueueLimits::default(),
        }
    }
}

/// A `Retry-After` longer than this is not waited out: the 429 goes back to the client instead.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

pub struct OpenAiUpstream {
    config: UpstreamConfig,
    client: reqwest::Client,
    queue: Queue,
}

impl OpenAiUpstream {
    pub fn new(config: UpstreamConfig) -> Result<Self, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30).min(config.timeout))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("imagegate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Connection(format!("cannot build the HTTP client: {e}")))?;
        let queue = Queue::new(config.queue);
        Ok(OpenAiUpstream { config, client, queue })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.config.base_url.trim_end_matches('/'))
    }

    /// Builds one attempt's request; called again for every retry (a multipart form is consumed).
    fn request(&self, model: &str, job: &ImageJob) -> reqwest::RequestBuilder {
        let builder = match job {
            ImageJob::Generate(req) => {
                self.client.post(self.url("images/generations")).json(&api::upstream::generation_body(model, req))
            }
            ImageJob::Edit(req) => self.client.post(self.url("images/edits")).multipart(edit_form(model, req)),
            ImageJob::Variation(req) => {
                let mut form = Form::new();
                for (name, value) in api::upstream::variation_text_fields(model, req) {
                    form = form.text(name, value);
                }
                let form = form.part("image", file_part(&req.image, "image"));
                self.client.post(self.url("images/variations")).multipart(form)
            }
        };
        let builder = match &self.config.api_key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        };
        if job.options().stream {
            builder.header(reqwest::header::ACCEPT, "text/event-stream")
        } else {
            builder.timeout(self.config.timeout)
        }
    }

    /// Sends with retries; returns the first successful response.
    async fn send(&self, model: &str, job: &ImageJob) -> Result<reqwest::Response, ProviderError> {
        let mut attempt = 0;
        loop {
            let result = tokio::time::timeout(self.config.timeout, self.request(model, job).send()).await;
            let failure = match result {
                Err(_) => return Err(ProviderError::Timeout(self.config.timeout)),
                Ok(Err(e)) if e.is_timeout() => {
                    return Err(ProviderError::Timeout(self.config.timeout));
                }
                Ok(Err(e)) => Failure { error: ProviderError::Connection(error_chain(&e)), retry_after: None },
                Ok(Ok(resp)) if resp.status().is_success() => return Ok(resp),
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let retry_after = retry_after(resp.headers());
                    let body = resp.bytes().await.unwrap_or_default();
                    let error = ProviderError::Upstream {
                        status,
                        body: upstream_error_body(&self.config.name, status, &body),
                        retry_after: retry_after.map(|d| d.as_secs_f64().ceil() as u64),
                    };
                    if !retryable_status(status) {
                        return Err(error);
                    }
                    Failure { error, retry_after }
                }
            };
            match self.backoff(attempt, failure.retry_after) {
                Some(delay) => {
                    tracing::warn!(
                        provider = %self.config.name, attempt = attempt + 1, delay_ms = delay.as_millis() as u64,
                        error = %failure.error, "upstream attempt failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                None => return Err(failure.error),
            }
        }
    }

    /// The wait before retry number `attempt + 1`, or `None` when no retry should happen.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.config.max_retries {
            return None;
        }
        let exp = self.config.initial_backoff.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.config.max_backoff);
        // Jitter spreads retries of many clients apart: wait between 75% and 100% of the backoff.
        let jittered = capped.mul_f64(rand::rng().random_range(0.75..=1.0));
        match retry_after {
            Some(wait) if wait > MAX_RETRY_AFTER => None,
            Some(wait) => Some(wait.max(jittered)),
            None => Some(jittered),
        }
    }

    async fn complete(&self, model: &str, job: &ImageJob) -> Result<ProviderOutput, ProviderError> {
        let mut attempt = 0;
        loop {
            let resp = self.send(model, job).await?;
            match resp.bytes().await {
                Ok(body) => {
                    return api::parse_images_response(&body)
                        .map(ProviderOutput::Complete)
                        .map_err(ProviderError::InvalidResponse);
                }
                // The connection broke while the body was arriving: as retryable as a failed connect.
                Err(e) if e.is_timeout() => {
                    return Err(ProviderError::Timeout(self.config.timeout));
                }
                Err(e) => {
                    let error = ProviderError::Connection(error_chain(&e));
                    let Some(delay) = self.backoff(attempt, None) else {
                        return Err(error);
                    };
                    tracing::warn!(provider = %self.config.name, error = %error, "upstream body broke; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn stream(&self, model: &str, job: &ImageJob, permit: Permit) -> Result<ProviderOutput, ProviderError> {
        let resp = self.send(model, job).await?;
        let idle = self.config.timeout;
        let events = resp.bytes_stream().eventsource();
        // The stream holds the permit until its last event.
        let stream = futures_util::stream::unfold(Some((events, permit)), move |state| async move {
            let (mut events, permit) = state?;
            loop {
                let next = match tokio::time::timeout(idle, events.next()).await {
                    Err(_) => return Some((Err(ProviderError::Timeout(idle)), None)),
                    Ok(None) => return None,
                    Ok(Some(next)) => next,
                };
                let event = match next {
                    Err(e) => return Some((Err(ProviderError::Connection(e.to_string())), None)),
                    Ok(event) => event,
                };
                if event.data.trim() == "[DONE]" {
                    return None;
                }
                match api::parse_stream_event(&event.data) {
                    Ok(UpstreamStreamItem::Event(ev)) => return Some((Ok(ev), Some((events, permit)))),
                    Ok(UpstreamStreamItem::Error(body)) => {
                        return Some((Err(ProviderError::Upstream { status: 500, body, retry_after: None }), None));
                    }
                    Ok(UpstreamStreamItem::Other(kind)) => {
                        tracing::debug!(%kind, "skipping an unknown upstream stream event");
                    }
                    Err(e) => return Some((Err(ProviderError::InvalidResponse(e)), None)),
                }
            }
        });
        Ok(ProviderOutput::Stream(stream.boxed()))
    }
}

struct Failure {
    error: ProviderError,
    retry_after: Option<Duration>,
}

#[async_trait]
impl Provider for OpenAiUpstream {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn queue(&self) -> &Queue {
        &self.queue
    }

    /// An upstream bills a job it started whether or not our client is still there, so `abandoned` is
    /// not acted on once it is sent: the caller reads the answer to the end (bounded by the timeout)
    /// to learn the bill. A job still waiting for its turn when its client leaves is never sent.
    async fn run(
        &self,
        model: &str,
        job: &ImageJob,
        place: Place,
        abandoned: &CancellationToken,
    ) -> Result<ProviderOutput, ProviderError> {
        let permit = tokio::select! {
            permit = place.ready() => permit,
            () = abandoned.cancelled() => return Err(ProviderError::Cancelled { compute_ms: 0 }),
        };
        if job.options().stream {
            self.stream(model, job, permit).await
        } else {
            let output = self.complete(model, job).await;
            drop(permit);
            output
        }
    }
}

/// The multipart form of an edit: every image (as `image` alone, or repeated `image[]` like the SDKs),
/// the mask, and the text fields.
fn edit_form(model: &str, req: &EditRequest) -> Form {
    let mut form = Form::new();
    for (name, value) in api::upstream::edit_text_fields(model, req) {
        form = form.text(name, value);
    }
    let field = if req.images.len() == 1 { "image" } else { "image[]" };
    for (i, img) in req.images.iter().enumerate() {
        form = form.part(field, file_part(img, &format!("image-{i}")));
    }
    if let Some(mask) = &req.mask {
        form = form.part("mask", file_part(mask, "mask"));
    }
    form
}

fn file_part(img: &InputImage, default_stem: &str) -> Part {
    let filename = img.filename.clone().unwrap_or_else(|| format!("{default_stem}.{}", img.format.extension()));
    let body = reqwest::Body::from(Bytes::clone(&img.bytes));
    // The mime type is one of three static strings, which always parse.
    Part::stream_with_length(body, img.bytes.len() as u64)
        .file_name(filename)
        .mime_str(img.format.mime_type())
        .unwrap_or_else(|_| Part::bytes(img.bytes.to_vec()))
}

fn retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// What the upstream asks us to wait: `retry-after-ms`, else `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers.get("retry-after-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<f64>().ok()) {
        return (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = value.trim().parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// The upstream's own envelope when it sent one; otherwise an envelope that says what came back.
fn upstream_error_body(provider: &str, status: u16, body: &[u8]) -> ErrorBody {
    if let Some(parsed) = api::parse_error_body(body) {
        return parsed;
    }
    let text = String::from_utf8_lossy(body);
    let snippet: String = text.chars().take(200).collect();
    ErrorBody {
        message: format!("The upstream provider '{provider}' answered HTTP {status}: {}", snippet.trim()),
        kind: if status >= 500 { "server_error" } else { "invalid_request_error" }.to_owned(),
        param: None,
        code: Some("upstream_error".to_owned()),
    }
}

/// A reqwest error with its causes, which name what really failed (refused, reset, DNS).
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn upstream(max_retries: u32) -> OpenAiUpstream {
        let mut c = UpstreamConfig::new("t", "http://127.0.0.1:9", None);
        c.max_retries = max_retries;
        OpenAiUpstream::new(c).unwrap()
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn backoff_grows_is_bounded_and_honours_retry_after() {
        let u = upstream(3);
        let first = u.backoff(0, None).unwrap();
        assert!(first >= Duration::from_millis(375) && first <= Duration::from_millis(500), "{first:?}");
        let third = u.backoff(2, None).unwrap();
        assert!(third >= Duration::from_millis(1500) && third <= Duration::from_secs(2), "{third:?}");
        assert_eq!(u.backoff(3, None), None);
        assert_eq!(u.backoff(0, Some(Duration::from_secs(5))), Some(Duration::from_secs(5)));
        assert_eq!(u.backoff(0, Some(Duration::from_secs(3600))), None);
    }

    #[test]
    fn only_transient_statuses_retry() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 422] {
            assert!(!retryable_status(s), "{s}");
        }
    }

    #[test]
    fn non_json_errors_get_an_envelope() {
        let b = upstream_error_body("comet", 502, b"<html>Bad gateway</html>");
        assert_eq!(b.code.as_deref(), Some("upstream_error"));
        assert!(b.message.contains("comet") && b.message.contains("502"));
        let own = br#"{"error":{"message":"blocked","type":"image_generation_user_error","param":"prompt","code":"moderation_blocked"}}"#;
        assert_eq!(upstream_error_body("x", 400, own).code.as_deref(), Some("moderation_blocked"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = UpstreamConfig::new("t", "http://x", Some("sk-secret".into()));
        assert!(!format!("{c:?}").contains("sk-secret"));
    }
}
