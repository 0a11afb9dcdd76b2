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
    /// How long a reservation holds before it is presumed abandoned; also a local job's worst-case
    /// compute time.
    pub reservation_ttl_ms: u64,
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
            decode_budget: decode::DecodeBudget::new(config.limits.max_decode_bytes),
        })
    }

    /// The same state, accounting on `ledger`; its static keys (config `api_keys`, `IMAGEGATE_API_KEYS`)
    /// are imported into it as user keys, so that they keep working and get budgets like any other.
    pub async fn with_ledger(
        mut self,
        ledger: ledger::Ledger,
        reservation_ttl: std::time::Duration,
    ) -> Result<AppState, ConfigError> {
        for (i, digest) in self.keys.digests().iter().enumerate() {
            ledger
                .import_key(&format!("static-{}", i + 1), digest, ledger::Scope::User)
                .await
                .map_err(|e| ConfigError(format!("cannot import the static API keys into the database: {e}")))?;
        }
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

/// How long a reservation holds by default: longer than any request should run.
pub const DEFAULT_RESERVATION_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

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
