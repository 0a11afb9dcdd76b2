//! imagegate's HTTP server: the axum application, authentication, model routing and the thin handlers
//! that join the `api` crate's parsing to the providers.
//!
//! [`app`] builds the router from an [`AppState`] (tests call it without a socket) under the layers of
//! [`with_layers`]; [`run_with`] serves it on a listener, one hyper HTTP/1 connection per task, with the
//! timeouts and the connection cap of [`ServeOptions`], until a shutdown future resolves, letting
//! in-flight requests finish.

pub mod accounts;
mod admin;
pub mod auth;
pub mod batches;
pub mod billing;
pub mod body;
mod budget;
pub mod config;
pub mod console;
pub mod decode;
pub mod drain;
pub mod estimates;
mod handlers;
pub mod jobs;
pub mod links;
pub mod metrics;
pub mod remote;
pub mod routing;

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use api::ApiError;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use providers::local::LocalProvider;
use providers::openai::{OpenAiUpstream, UpstreamConfig};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower::util::MapRequestLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use auth::KeySet;
pub use config::{Config, ConfigError, Limits};
pub use routing::Catalog;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub catalog: Arc<Catalog>,
    pub prices: Arc<pricing::Catalog>,
    pub keys: Arc<KeySet>,
    pub limits: Limits,
    pub default_model: Option<Arc<str>>,
    /// Keys, budgets and the usage ledger. `None` only for embedded uses without accounting (tests,
    /// the CLI's in-process server): `imagegate serve` always has one.
    pub ledger: Option<ledger::Ledger>,
    /// How long a hold outlives its instance's last heartbeat; also a local job's worst-case compute
    /// time.
    pub reservation_ttl_ms: u64,
    /// The longest upstream attempt (`timeout_secs` of the slowest provider, and its name): the
    /// reservation TTL must exceed it by [`TTL_MARGIN`].
    pub slowest_upstream: Option<(String, std::time::Duration)>,
    /// Stops the ledger's upkeep (heartbeat and sweep) when the last clone of the state is dropped.
    upkeep: Option<Arc<tokio_util::sync::DropGuard>>,
    /// Decoded input-image bytes in flight over all requests (`Limits::max_decode_bytes`).
    pub decode_budget: decode::DecodeBudget,
    /// Request-body bytes in memory over all requests (`Limits::max_body_bytes_in_flight`).
    pub body_budget: body::BodyBudget,
    /// The base of the image URLs this server makes (`--public-url`); `None`: the request's `Host`.
    pub public_url: Option<Arc<str>>,
    /// Which input image URLs the server fetches (`[remote_images]`); `None`: none.
    pub remote_images: Option<Arc<remote::RemoteImages>>,
    /// What `GET /metrics` shows.
    pub metrics: metrics::Metrics,
    /// Wakes the batch worker (a batch was created, a line finished).
    pub batch_wakeup: Arc<tokio::sync::Notify>,
}

impl AppState {
    /// Builds the providers of `config` and the routing over them.
    pub fn from_config(config: &Config) -> Result<AppState, ConfigError> {
        // Every billed response counts its prompt's tokens: have the encoder ready by the first one.
        pricing::warm_up_token_counter();
        config.limits.check()?;
        let metrics = metrics::Metrics::new();
        let mut providers: Vec<routing::ProviderModels> = Vec::new();
        if !config.local_models.is_empty() {
            let mut engine = config.engine.clone();
            if let Some(p) = &config.provenance {
                engine.provenance = Some(signer(p)?);
            }
            let steps = metrics.clone();
            engine.step_observer =
                Some(providers::local::StepObserver(Arc::new(move |model, took| steps.step(model, took))));
            let local = LocalProvider::new(config::LOCAL_PROVIDER, config.local_models.clone(), engine)
                .map_err(|e| ConfigError(format!("models: {e}")))?;
            let models = local.model_names().into_iter().map(|m| (m, domain::ModelFamily::Local)).collect();
            providers.push(routing::ProviderModels {
                provider: Arc::new(local),
                models,
                discount_percent: rust_decimal::Decimal::ZERO,
            });
        }
        for p in &config.providers {
            let mut upstream = UpstreamConfig::new(&p.name, &p.base_url, p.api_key.clone());
            upstream.timeout = p.timeout;
            upstream.max_retries = p.max_retries;
            upstream.queue = p.queue;
            let provider =
                OpenAiUpstream::new(upstream).map_err(|e| ConfigError(format!("providers.{}: {e}", p.name)))?;
            providers.push(routing::ProviderModels {
                provider: Arc::new(provider),
                models: p.models.clone(),
                discount_percent: p.discount_percent,
            });
        }
        for p in &providers {
            metrics.watch_queue(p.provider.name(), p.provider.queue());
        }
        let slowest_upstream = config.providers.iter().max_by_key(|p| p.timeout).map(|p| (p.name.clone(), p.timeout));
        let catalog = Catalog::with_lifecycles(providers, config.aliases.clone(), config.lifecycles())?;
        if let Some(m) = &config.default_model
            && catalog.resolve(m).is_err()
        {
            return Err(ConfigError(format!("default_model: '{m}' is not a model any provider serves")));
        }
        Ok(AppState {
            catalog: Arc::new(catalog),
            prices: Arc::new(config.prices.clone()),
            keys: Arc::new(KeySet::new(config.api_key_hashes.clone())),
            limits: config.limits,
            default_model: config.default_model.as_deref().map(Arc::from),
            ledger: None,
            reservation_ttl_ms: DEFAULT_RESERVATION_TTL.as_millis() as u64,
            slowest_upstream,
            upkeep: None,
            decode_budget: decode::DecodeBudget::new(config.limits.max_decode_bytes),
            body_budget: body::BodyBudget::new(config.limits.max_body_bytes_in_flight),
            public_url: None,
            remote_images: config.remote_images.clone().map(Arc::new),
            metrics,
            batch_wakeup: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// The same state, accounting on `ledger`; its static keys (config `api_keys`, `IMAGEGATE_API_KEYS`)
    /// are imported into it as user keys, so that they keep working and get budgets like any other.
    ///
    /// Starts the ledger's upkeep, which runs until the last clone of the state is dropped: every
    /// quarter of the reservation TTL a heartbeat renews the holds of this instance's running requests
    /// (a live request's hold never expires, however long it runs), then a sweep frees the holds of
    /// instances that died. Refuses a reservation TTL that does not exceed the slowest upstream's
    /// timeout by [`TTL_MARGIN`].
    pub async fn with_ledger(mut self, ledger: ledger::Ledger) -> Result<AppState, ConfigError> {
        let reservation_ttl = ledger.reservation_ttl();
        if let Some((provider, timeout)) = &self.slowest_upstream
            && reservation_ttl < *timeout + TTL_MARGIN
        {
            return Err(ConfigError(format!(
                "--reservation-ttl-secs ({} s) must be at least the longest upstream timeout ({} s: timeout_secs of provider '{provider}') plus {} s, so that a hold never expires before its request could",
                reservation_ttl.as_secs(),
                timeout.as_secs(),
                TTL_MARGIN.as_secs()
            )));
        }
        for (i, digest) in self.keys.digests().iter().enumerate() {
            ledger
                .import_key(&format!("static-{}", i + 1), digest, ledger::Scope::User)
                .await
                .map_err(|e| ConfigError(format!("cannot import the static API keys into the database: {e}")))?;
        }
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(upkeep(ledger.clone(), upkeep_interval(reservation_ttl), stop.clone()));
        self.ledger = Some(ledger);
        self.reservation_ttl_ms = u64::try_from(reservation_ttl.as_millis()).unwrap_or(u64::MAX);
        // The worker's state holds no upkeep guard: the last clone outside it stops both.
        tokio::spawn(batches::worker(self.clone(), stop.clone()));
        self.upkeep = Some(Arc::new(stop.drop_guard()));
        Ok(self)
    }

    /// Whether requests without a key are served: no static key, and no key in the ledger.
    pub async fn is_open(&self) -> Result<bool, ConfigError> {
        match &self.ledger {
            // The static keys were imported into the ledger.
            Some(l) => l.has_keys().await.map(|has| !has).map_err(|e| ConfigError(format!("the database: {e}"))),
            None => Ok(self.keys.is_open()),
        }
    }
}

/// How long a hold outlives its instance's last heartbeat by default.
pub const DEFAULT_RESERVATION_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// How much longer than the slowest upstream attempt the reservation TTL must be: time to settle
/// after an upstream's last byte, were heartbeats to fail meanwhile.
pub const TTL_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The upkeep's period: four heartbeats per TTL (so three can fail without a live hold expiring),
/// between 100 ms and a minute.
/// The local engine's signer: the configured identity, or the server's own (made in the data dir the
/// first time, with a warning that validators show it as untrusted).
fn signer(config: &config::ProvenanceConfig) -> Result<providers::local::Provenance, ConfigError> {
    use provenance::Identity;
    let identity = match &config.identity {
        config::IdentitySource::Files { cert_chain, private_key } => {
            Identity::from_files(cert_chain, private_key).map_err(|e| ConfigError(format!("provenance: {e}")))?
        }
        config::IdentitySource::Remote { cert_chain, url, algorithm } => {
            Identity::remote(cert_chain, url, algorithm).map_err(|e| ConfigError(format!("provenance: {e}")))?
        }
        config::IdentitySource::Local(dir) => {
            let (identity, made) = Identity::local(dir).map_err(|e| ConfigError(format!("provenance: {e}")))?;
            let how = "validators show its signatures as untrusted until [provenance] cert_chain and private_key name a certificate from a C2PA-trusted issuer";
            if made {
                tracing::warn!(dir = %dir.display(), "made a self-signed identity to sign local images with: {how}");
            } else {
                tracing::info!(dir = %dir.display(), "signing local images with the self-signed identity: {how}");
            }
            identity
        }
    };
    let signer = provenance::Signer::new(&identity, ("imagegate", env!("CARGO_PKG_VERSION")))
        .map_err(|e| ConfigError(format!("provenance: {e}")))?;
    Ok(providers::local::Provenance {
        signer: Arc::new(signer),
        include_prompt: config.include_prompt,
        cache_dir: Some(config.cache_dir.clone()),
    })
}

fn upkeep_interval(ttl: std::time::Duration) -> std::time::Duration {
    (ttl / 4).clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(60))
}

/// Renews this instance's holds, then frees those of dead instances and deletes expired images, every
/// `interval` until `stop`.
async fn upkeep(ledger: ledger::Ledger, interval: std::time::Duration, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = ledger.heartbeat().await {
            tracing::warn!(error = %e, "could not renew this instance's holds");
        }
        if let Err(e) = ledger.release_expired(ledger.now()).await {
            tracing::warn!(error = %e, "could not release expired reservations");
        }
        if let Err(e) = ledger.delete_expired_images().await {
            tracing::warn!(error = %e, "could not delete expired images");
        }
        if let Err(e) = ledger.delete_expired_sessions().await {
            tracing::warn!(error = %e, "could not delete expired console sessions");
        }
    }
}

/// The application: every route, with the body limit and OpenAI-shaped errors for anything unrouted,
/// under [`with_layers`].
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/images/generations", post(handlers::generations))
        .route("/images/edits", post(handlers::edits))
        .route("/images/variations", post(handlers::variations))
        .route("/images/estimates", post(handlers::estimates))
        .route("/models", get(handlers::list_models))
        .route("/models/{*id}", get(handlers::get_model))
        .route("/admin/keys", get(admin::list_keys).post(admin::create_key))
        .route("/admin/keys/{id}", axum::routing::delete(admin::revoke_key).post(admin::update_key))
        .route("/organization/usage/images", get(admin::usage_images))
        .route("/organization/costs", get(admin::costs))
        .route(
            "/files",
            post(batches::upload)
                .layer(DefaultBodyLimit::max(api::batch::MAX_BATCH_FILE_BYTES))
                .get(batches::list_files),
        )
        .route("/files/{id}", get(batches::get_file).delete(batches::delete_file))
        .route("/files/{id}/content", get(batches::file_content))
        .route("/batches", post(batches::create_batch).get(batches::list_batches))
        .route("/batches/{id}", get(batches::get_batch))
        .route("/batches/{id}/cancel", post(batches::cancel_batch))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        // Image URLs need no key: their unguessable id is the capability.
        .route("/images/{id}/content", get(links::content));
    let routes = Router::new()
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/console", get(console::index))
        .route("/console/login", get(console::login_form).post(console::login))
        .route("/console/logout", post(console::logout))
        .route("/console/usage.csv", get(console::usage_csv))
        .route("/console/estimate", get(console::estimate))
        .nest("/v1", v1)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            drain::DrainLimit(state.limits.max_body_bytes),
            drain::drain_unread,
        ))
        .with_state(state);
    with_layers(routes)
}

/// The header that carries a request's id, in requests (to the handlers) and responses (to the client).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The layers every route of [`app`] runs under, for any router (tests wrap their own handlers in
/// exactly these). Outermost first:
/// - the client's `x-request-id` is dropped and the server's own UUID set in its place, since handlers
///   key the usage ledger on it: a client-chosen id could collide with another key's or be forged to
///   look like someone else's request (OpenAI likewise ignores the client's). The response carries it;
/// - tracing;
/// - a panic in a handler becomes a 500 in OpenAI's envelope naming the request id, logged at error
///   level with that id (the connection would otherwise be dropped with no answer). This relies on
///   panics unwinding, the profiles' default (`panic = "abort"` must not be set in Cargo.toml).
pub fn with_layers(router: Router) -> Router {
    let x_request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    router
        .layer(CatchPanicLayer::custom(panic_response as fn(Box<dyn Any + Send + 'static>) -> Response))
        .layer(axum::middleware::from_fn(report_panic))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .layer(MapRequestLayer::new(drop_client_request_id as fn(Request) -> Request))
}

/// Removes any `x-request-id` the client sent, so that [`SetRequestIdLayer`] (which keeps an incoming
/// one) always sets the server's.
fn drop_client_request_id(mut request: Request) -> Request {
    request.headers_mut().remove(REQUEST_ID_HEADER);
    request
}

/// What a handler's panic said, for the log only; set on the response [`panic_response`] makes.
#[derive(Clone)]
struct Panicked(String);

/// The response for a caught panic. The catch-panic layer does not see the request, so the envelope is
/// written by [`report_panic`], which knows its id; this one is what the client would get without it.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let what = if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    };
    let mut response = HttpError(ApiError::internal("unknown")).into_response();
    response.extensions_mut().insert(Panicked(what));
    response
}

/// Logs a caught panic with the request's id, and answers the 500 envelope naming that id (never what
/// the panic said: that may hold internals).
async fn report_panic(request: Request, next: Next) -> Response {
    let id = request.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("unknown").to_owned();
    let response = next.run(request).await;
    match response.extensions().get::<Panicked>() {
        None => response,
        Some(Panicked(what)) => {
            tracing::error!(request_id = %id, panic = %what, "a handler panicked");
            HttpError(ApiError::internal(&id)).into_response()
        }
    }
}

/// Refuses to serve without keys (`open`) on an address other machines can reach.
pub fn check_listen_address(addr: &SocketAddr, open: bool) -> Result<(), ConfigError> {
    if open && !addr.ip().is_loopback() {
        return Err(ConfigError(format!(
            "refusing to listen on {addr} without API keys: anyone who can reach it could spend your money. Create one with `imagegate keys create --name NAME` (or set IMAGEGATE_API_KEYS), or listen on 127.0.0.1"
        )));
    }
    Ok(())
}

/// How [`run_with`] treats connections. The defaults suit a server on the open internet; the timeouts
/// are capped at a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// How long a client has to send a request's line and headers, from the connection's start or from
    /// the end of the previous response: a connection that is slower (slowloris), or idle this long
    /// between keep-alive requests, is closed without an answer.
    pub header_timeout: Duration,
    /// How long a client has to send a request's whole body, from the end of its headers: a body that
    /// stalls or trickles past it is answered 408 and the connection closed. Large uploads over slow
    /// links need it raised.
    pub body_timeout: Duration,
    /// How long a write to a client may wait for it to read: a client that stops reading a response
    /// (or a stream) this long is disconnected, so it cannot hold its connection slot forever. Time
    /// between a stream's events does not count, only a write the client does not take.
    pub write_timeout: Duration,
    /// The most connections served at once; at the cap no connection is accepted (new ones wait in the
    /// listen backlog) until one closes. Keep it below the process's open-file limit (`ulimit -n`).
    pub max_connections: usize,
}

/// [`ServeOptions::header_timeout`]'s default.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// [`ServeOptions::body_timeout`]'s default.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// [`ServeOptions::write_timeout`]'s default.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// [`ServeOptions::max_connections`]'s default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The longest timeout honoured: longer ones could overflow a deadline's clock arithmetic.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Serves `app` on `listener` with the default [`ServeOptions`] until `shutdown` resolves; requests in
/// flight then finish before it returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(listener, app, ServeOptions::default(), shutdown).await
}

/// Serves `app` on `listener` until `shutdown` resolves: it then stops accepting, closes idle
/// connections, and returns once the requests in flight have finished.
///
/// Each connection is hyper's HTTP/1 with the header timeout (which also bounds idle keep-alive waits)
/// and every request's body under the body timeout. Header lines hyper's parser finds invalid (a control
/// byte in a value, a bad name) are dropped and the request served without them, so that the client
/// gets a real answer rather than hyper's empty 400 (a NUL byte, or a bad request line, still gets that).
/// A dropped `Content-Length` or `Transfer-Encoding` line leaves its request without a body, and the
/// body's bytes are read as the next request: nothing a direct client could not send anyway, but a
/// proxy in front must not forward such lines while framing by them itself.
pub async fn run_with(
    listener: tokio::net::TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let body_timeout = options.body_timeout.min(MAX_TIMEOUT);
    let write_timeout = options.write_timeout.min(MAX_TIMEOUT);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout.min(MAX_TIMEOUT))
        .ignore_invalid_headers(true);
    let slots = Arc::new(Semaphore::new(options.max_connections.clamp(1, Semaphore::MAX_PERMITS)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // At the cap, wait for a connection to close before accepting another.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                // The semaphore is never closed.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |request: axum::http::Request<Incoming>| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(serve_request(app, request, body_timeout).await) }
        });
        // Reads have no timeout here (a client waits quietly for a long generation; the header and body
        // deadlines bound what it must send); a write the client does not take ends the connection.
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(write_timeout));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(Box::pin(stream)), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Timeouts, resets and parse errors: the client's doing, not worth more than a debug line.
                tracing::debug!(error = %e, "connection closed with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Waits out an accept error as axum's `serve` does: a failed handshake is the client's, skipped; any
/// other (out of file descriptors) is logged and retried a second later.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "cannot accept a connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One request through `app`, its body under a deadline: a body not all received `body_timeout` after
/// the headers is answered 408, whatever the handler made of the read error.
async fn serve_request(app: Router, request: axum::http::Request<Incoming>, body_timeout: Duration) -> Response {
    let expired = Arc::new(AtomicBool::new(false));
    let request = request.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(body_timeout)),
            expired: expired.clone(),
        })
    });
    let response = match app.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if !expired.load(Ordering::Acquire) {
        return response;
    }
    let id = response.headers().get(REQUEST_ID_HEADER).cloned();
    let id_text = id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    tracing::info!(request_id = %id_text, "a request body was not received in time");
    let secs = body_timeout.as_secs_f64();
    let mut timed_out = HttpError(ApiError::new(
        408,
        "invalid_request_error",
        None,
        Some("request_timeout"),
        format!(
            "The request body was not received within {secs} seconds of its headers; send the whole body promptly."
        ),
    ))
    .into_response();
    // The rest of the body is unread: the connection cannot carry another request.
    timed_out.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
    if let Some(id) = id {
        timed_out.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    timed_out
}

/// A request body that fails once its deadline passes, noting that it did. The deadline is for the
/// whole body, not between chunks (as tower-http's `RequestBodyTimeoutLayer` has it), so that a body
/// trickled a byte at a time is bounded too.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

/// The error a body past its deadline reads as (the handler's view; the client gets the 408).
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received in time")]
struct BodyTimedOut;

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // Data already here is taken even at the deadline.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(axum::BoxError::from)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An [`ApiError`] as an HTTP response: the status, OpenAI's envelope, and `Retry-After` when set.
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (
            status,
            [(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            self.0.to_json(),
        )
            .into_response();
        if let Some(secs) = self.0.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
