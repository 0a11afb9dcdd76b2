//! imagegate's HTTP server: the axum application, authentication, model routing and the thin handlers
//! that join the `api` crate's parsing to the providers.
//!
//! [`app`] builds the router from an [`AppState`] (tests call it without a socket); [`run`] serves it on a
//! listener until a shutdown future resolves, letting in-flight requests finish.

pub mod accounts;
mod admin;
pub mod auth;
pub mod billing;
pub mod config;
pub mod decode;
pub mod estimates;
mod handlers;
pub mod jobs;
pub mod routing;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use api::ApiError;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use providers::local::LocalProvider;
use providers::openai::{OpenAiUpstream, UpstreamConfig};
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
}

impl AppState {
    /// Builds the providers of `config` and the routing over them.
    pub fn from_config(config: &Config) -> Result<AppState, ConfigError> {
        // Every billed response counts its prompt's tokens: have the encoder ready by the first one.
        pricing::warm_up_token_counter();
        config.limits.check()?;
        let mut providers: Vec<routing::ProviderModels> = Vec::new();
        if !config.local_models.is_empty() {
            let local = LocalProvider::new(config::LOCAL_PROVIDER, config.local_models.clone(), config.engine.clone())
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
            let provider =
                OpenAiUpstream::new(upstream).map_err(|e| ConfigError(format!("providers.{}: {e}", p.name)))?;
            providers.push(routing::ProviderModels {
                provider: Arc::new(provider),
                models: p.models.clone(),
                discount_percent: p.discount_percent,
            });
        }
        let slowest_upstream =
            config.providers.iter().max_by_key(|p| p.timeout).map(|p| (p.name.clone(), p.timeout));
        let catalog = Catalog::new(providers, config.aliases.clone())?;
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
        self.upkeep = Some(Arc::new(stop.drop_guard()));
        self.ledger = Some(ledger);
        self.reservation_ttl_ms = u64::try_from(reservation_ttl.as_millis()).unwrap_or(u64::MAX);
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
fn upkeep_interval(ttl: std::time::Duration) -> std::time::Duration {
    (ttl / 4).clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(60))
}

/// Renews this instance's holds, then frees those of dead instances, every `interval` until `stop`.
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
    }
}

/// The application: every route, with request ids, tracing, the body limit and OpenAI-shaped errors for
/// anything unrouted.
pub fn app(state: AppState) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let v1 = Router::new()
        .route("/images/generations", post(handlers::generations))
        .route("/images/edits", post(handlers::edits))
        .route("/images/estimates", post(handlers::estimates))
        .route("/models", get(handlers::list_models))
        .route("/models/{*id}", get(handlers::get_model))
        .route("/admin/keys", get(admin::list_keys).post(admin::create_key))
        .route("/admin/keys/{id}", axum::routing::delete(admin::revoke_key).post(admin::update_key))
        .route("/organization/usage/images", get(admin::usage_images))
        .route("/organization/costs", get(admin::costs))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .route("/health", get(handlers::health))
        .nest("/v1", v1)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .with_state(state)
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

/// Serves `app` on `listener` until `shutdown` resolves; requests in flight then finish before it returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
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
