//! Answers reach clients that write their whole body before reading. A request refused before its body
//! was read (401, 404, 405, 413, 415, a multipart field refused before the file parts arrive) used to
//! be answered at once and its connection closed: a client still writing its upload (Node's undici,
//! which the official Node SDK uses) then got EPIPE, reported "Connection error." and retried, never
//! seeing the status. Here every request's body is watched; whatever the handler left unread when its
//! answer is ready is read and thrown away first (at most [`DRAIN_FACTOR`] times the body limit and
//! [`DRAIN_TIME`], a chunk at a time, counted nowhere), so that the client reads the answer and the
//! connection stays usable.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use hyper::body::{Frame, SizeHint};

/// How much of an unread body is read to be thrown away, in multiples of the body limit; a client that
/// sends more has its connection closed unread, as before.
pub const DRAIN_FACTOR: usize = 2;
/// How long an unread body is read for at most.
pub const DRAIN_TIME: Duration = Duration::from_secs(60);

/// The state of [`drain_unread`]: the request body limit.
#[derive(Clone, Copy, Debug)]
pub struct DrainLimit(pub usize);

/// Runs the request, then reads whatever of its body was left unread before the answer goes out.
pub async fn drain_unread(State(DrainLimit(limit)): State<DrainLimit>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    // A client that asked to be told before it sends (`Expect: 100-continue`) sends nothing unless
    // the body is read: if nobody read it, there is nothing to drain.
    let waits = parts
        .headers
        .get(axum::http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let shared = Arc::new(Shared::default());
    let watched = Watched { inner: Some(body), shared: Arc::clone(&shared) };
    let response = next.run(Request::from_parts(parts, Body::new(watched))).await;
    let rest = shared.rest.lock().ok().and_then(|mut slot| slot.take());
    if let Some(rest) = rest
        && (!waits || shared.polled.load(Ordering::Relaxed))
    {
        let cap = limit.saturating_mul(DRAIN_FACTOR);
        let read = tokio::time::timeout(DRAIN_TIME, discard(rest, cap)).await;
        if !matches!(read, Ok(true)) {
            tracing::debug!(status = %response.status(), "an unread request body was too long or too slow to drain");
        }
    }
    response
}

/// Reads `body` to its end, throwing it away; `false` when it went past `cap` bytes or broke.
async fn discard(body: Body, cap: usize) -> bool {
    let mut stream = body.into_data_stream();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                seen = seen.saturating_add(chunk.len());
                if seen > cap {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

#[derive(Default)]
struct Shared {
    /// The body, when it was dropped before its end.
    rest: Mutex<Option<Body>>,
    /// Whether anyone asked for the body's data.
    polled: AtomicBool,
}

/// A request body that hands itself back to [`drain_unread`] when dropped unfinished.
struct Watched {
    /// `None` once it ended (or failed).
    inner: Option<Body>,
    shared: Arc<Shared>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.shared.polled.store(true, Ordering::Relaxed);
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let frame = Pin::new(inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            self.inner = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take().filter(|b| !b.is_end_stream())
            && let Ok(mut slot) = self.shared.rest.lock()
        {
            *slot = Some(inner);
        }
    }
}
