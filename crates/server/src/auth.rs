//! Client authentication: managed keys of the ledger, or a static key list when there is no ledger.
//!
//! Keys are held only as SHA-256 digests and compared in constant time, so neither memory dumps nor
//! timing reveal them. With no key configured the server is open, and [`crate::check_listen_address`]
//! keeps it on a loopback address.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::accounts::Caller;
use crate::{AppState, HttpError};

/// The accepted keys, as digests.
#[derive(Clone, Default)]
pub struct KeySet {
    digests: Vec<[u8; 32]>,
}

impl KeySet {
    pub fn new(digests: Vec<[u8; 32]>) -> Self {
        KeySet { digests }
    }

    /// Adds plain keys (from `IMAGEGATE_API_KEYS`), keeping only their digests.
    pub fn add_plain<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) {
        self.digests.extend(keys.into_iter().map(digest));
    }

    /// The digests of the accepted keys.
    pub fn digests(&self) -> &[[u8; 32]] {
        &self.digests
    }

    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn accepts(&self, key: &str) -> bool {
        let d = digest(key);
        // Check every digest, not stopping at a match, so the time taken says nothing about which matched.
        self.digests.iter().fold(false, |found, k| found | bool::from(k.ct_eq(&d)))
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Middleware for `/v1/*`. With a ledger: a live key of the ledger, put in the request's extensions as
/// [`Caller`] (read from the database on every request, so a revocation on any instance holds at once);
/// while the ledger has no key at all, the server is open (on loopback, see
/// [`crate::check_listen_address`]). Without a ledger: a key of the static set, unless it is empty.
pub async fn require_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let header = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let presented = header
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned);
    let Some(ledger) = &state.ledger else {
        if state.keys.is_open() {
            return next.run(request).await;
        }
        return match presented {
            None => HttpError(api::ApiError::missing_api_key()).into_response(),
            Some(key) if state.keys.accepts(&key) => next.run(request).await,
            Some(key) => HttpError(api::ApiError::invalid_api_key(&key)).into_response(),
        };
    };
    let unavailable = |e: ledger::LedgerError| {
        tracing::error!(error = %e, "cannot authenticate: the ledger is unavailable");
        HttpError(api::ApiError::new(
            503,
            "server_error",
            None,
            Some("ledger_unavailable"),
            "Keys cannot be checked right now; please retry shortly.".into(),
        ))
        .into_response()
    };
    // A batch's line, sent by this server's worker: its owner's request, if the key still may.
    if let Some(crate::batches::LineOwner(owner)) = request.extensions().get::<crate::batches::LineOwner>().cloned() {
        if owner == ledger::batches::ANONYMOUS {
            return next.run(request).await;
        }
        return match ledger.get_key(&owner).await {
            Ok(key) if key.revoked_at.is_none() => {
                request.extensions_mut().insert(Caller(key));
                next.run(request).await
            }
            Ok(_) | Err(ledger::LedgerError::KeyNotFound(_)) => HttpError(api::ApiError::new(
                401,
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
                "The API key that created this batch was revoked; its remaining requests do not run.".into(),
            ))
            .into_response(),
            Err(e) => unavailable(e),
        };
    }
    let found = match &presented {
        Some(secret) => match ledger.authenticate(secret).await {
            Ok(found) => found,
            Err(e) => return unavailable(e),
        },
        None => None,
    };
    if let Some(key) = found {
        request.extensions_mut().insert(Caller(key));
        return next.run(request).await;
    }
    // No valid key: fine only while no key exists (the OpenAI SDKs always send some key).
    match ledger.has_keys().await {
        Ok(false) => next.run(request).await,
        Ok(true) => match presented {
            None => HttpError(api::ApiError::missing_api_key()).into_response(),
            Some(key) => HttpError(api::ApiError::invalid_api_key(&key)).into_response(),
        },
        Err(e) => unavailable(e),
    }
}

/// Handlers of admin endpoints call this first: an admin key, or 403 (401 without a ledger key).
pub fn require_admin(caller: Option<&Caller>) -> Result<&ledger::ApiKey, api::ApiError> {
    match caller {
        Some(Caller(key)) if key.scope == ledger::Scope::Admin => Ok(key),
        Some(_) => Err(api::ApiError::new(
            403,
            "invalid_request_error",
            None,
            Some("admin_key_required"),
            "This endpoint needs an admin API key (imagegate keys create --scope admin).".into(),
        )),
        None => Err(api::ApiError::new(
            401,
            "invalid_request_error",
            None,
            Some("admin_key_required"),
            "This endpoint needs an admin API key: send one as 'Authorization: Bearer KEY'.".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let mut k = KeySet::default();
        assert!(k.is_open());
        k.add_plain(["sk-one", "sk-two"]);
        assert!(k.accepts("sk-two"));
        assert!(!k.accepts("sk-tw"));
        assert!(!k.accepts(""));
    }
}
