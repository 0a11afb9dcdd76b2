//! Client authentication with a static key list (the ledger replaces it with managed keys).
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

/// Middleware for `/v1/*`: a `Bearer` key from the set, unless the set is empty.
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.keys.is_open() {
        return next.run(request).await;
    }
    let header = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let presented = header.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer "))).map(str::trim);
    match presented {
        None | Some("") => HttpError(api::ApiError::missing_api_key()).into_response(),
        Some(key) if state.keys.accepts(key) => next.run(request).await,
        Some(key) => HttpError(api::ApiError::invalid_api_key(key)).into_response(),
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
