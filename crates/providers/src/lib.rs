//! Providers: whatever turns a validated image job into images.
//!
//! The server routes each request to one [`Provider`]: an upstream OpenAI-compatible HTTP API
//! ([`openai::OpenAiUpstream`]) or the local diffusion engine ([`local::LocalProvider`]). A provider
//! gets domain types and returns domain types: it never sees the client's HTTP request, and the server
//! never sees how the provider talks to its backend.

pub mod local;
pub mod openai;
pub mod schedule;

use std::time::Duration;

use api::{ApiError, ErrorBody};
use async_trait::async_trait;
use domain::{ImageJob, ImageResult, StreamEvent};
use futures_util::stream::BoxStream;
pub use tokio_util::sync::CancellationToken;

/// Events of a streamed job, as the provider produces them.
pub type EventStream = BoxStream<'static, Result<StreamEvent, ProviderError>>;

/// What a provider returns: a finished result, or (for `stream = true`) a stream of events.
pub enum ProviderOutput {
    Complete(ImageResult),
    Stream(EventStream),
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's configured name (`openai`, `comet`, ...).
    fn name(&self) -> &str;

    /// The provider's queue: every job takes its [`schedule::Place`] there before anything is held
    /// for it, and runs when the place is [`schedule::Place::ready`].
    fn queue(&self) -> &schedule::Queue;

    /// Runs `job` on the provider's model `model` (the provider's own name for it, after routing),
    /// when its `place` in [`Provider::queue`] comes up; the job holds its permit while it runs (a
    /// stream to its last event).
    ///
    /// `abandoned` is cancelled when the client went away. A provider that can stop early and knows
    /// what it spent (the local engine) stops at the next step and ends with
    /// [`ProviderError::Cancelled`]; one whose bill arrives anyway (an upstream) carries on, so the
    /// caller can read what it was billed. Either way the caller keeps polling the job to its end.
    async fn run(
        &self,
        model: &str,
        job: &ImageJob,
        place: schedule::Place,
        abandoned: &CancellationToken,
    ) -> Result<ProviderOutput, ProviderError>;
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The backend answered with an error; `body` is its envelope (made up when it sent none).
    #[error("upstream answered HTTP {status}: {}", body.message)]
    Upstream { status: u16, body: ErrorBody, retry_after: Option<u64> },
    /// No answer within the configured timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The backend could not be reached, or the connection broke.
    #[error("connection failed: {0}")]
    Connection(String),
    /// The backend answered 2xx with something that is not a valid response.
    #[error("malformed response: {0}")]
    InvalidResponse(String),
    /// The provider refused or failed the job with this error, as the client should see it (a local
    /// model's size rule, a full queue, a model that failed to load).
    #[error("{}", .0.body.message)]
    Api(ApiError),
    /// The job was stopped because its client went away, after `compute_ms` of device time (what it
    /// incurred, for the bill; 0 when it never started).
    #[error("cancelled after {compute_ms} ms of compute: the client went away")]
    Cancelled { compute_ms: u64 },
}
