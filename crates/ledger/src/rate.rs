//! Per-key rate limits that hold across every instance sharing the database.
//!
//! Each key has one counter row per fixed one-minute window (aligned to the UTC minute). A request
//! is admitted by a single conditional `UPDATE ... SET requests = requests + 1, images = images + n
//! WHERE requests + 1 <= limit AND images + n <= limit`: the check and the increment are one
//! statement, so concurrent requests on any instance cannot both take the last slot. A refused
//! request changes nothing. Old windows are pruned by [`Ledger::release_expired`].
//!
//! Fixed windows allow up to twice the limit across a window boundary; that is the usual trade for
//! one row and one statement per request.

use sqlx::Row;

use crate::db::{Ledger, to_ms};
use crate::error::Result;
use crate::keys::ApiKey;

const WINDOW_MS: i64 = 60_000;

/// The answer to [`Ledger::check_rate_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    /// Counted against this minute's window.
    Allowed,
    /// Not counted. The server answers 429 with `Retry-After: retry_after_secs`.
    Limited { kind: RateLimitKind, per_minute: u32, retry_after_secs: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitKind {
    Requests,
    /// Also when one request asks for more images than a whole minute allows: waiting will not help
    /// that one, so the server may prefer a 400.
    Images,
}

impl Ledger {
    /// Counts one request of `images` images against the key's per-minute limits, or refuses it.
    /// Uses the limits carried by `key` (as authenticated moments before); a key without limits is
    /// always allowed and costs no write.
    pub async fn check_rate_limit(&self, key: &ApiKey, images: u32) -> Result<RateLimit> {
        let limits = key.rate_limits;
        if limits.requests_per_minute.is_none() && limits.images_per_minute.is_none() {
            return Ok(RateLimit::Allowed);
        }
        let now_ms = to_ms(self.clock.now());
        let window_start = now_ms - now_ms.rem_euclid(WINDOW_MS);
        // Whole seconds until the window ends, rounded up, at least one.
        let retry_after_secs = u64::try_from((window_start + WINDOW_MS - now_ms + 999) / 1000).unwrap_or(1).max(1);

        sqlx::query(
            "INSERT INTO rate_windows (key_id, window_start_ms, requests, images) VALUES ($1, $2, 0, 0)
             ON CONFLICT (key_id, window_start_ms) DO NOTHING",
        )
        .bind(&key.id)
        .bind(window_start)
        .execute(&self.pool)
        .await?;
        let admitted = sqlx::query(
            "UPDATE rate_windows SET requests = requests + 1, images = images + $3
             WHERE key_id = $1 AND window_start_ms = $2
               AND ($4 IS NULL OR requests + 1 <= $4)
               AND ($5 IS NULL OR images + $3 <= $5)",
        )
        .bind(&key.id)
        .bind(window_start)
        .bind(i64::from(images))
        .bind(limits.requests_per_minute.map(i64::from))
        .bind(limits.images_per_minute.map(i64::from))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if admitted == 1 {
            return Ok(RateLimit::Allowed);
        }

        let row = sqlx::query("SELECT requests FROM rate_windows WHERE key_id = $1 AND window_start_ms = $2")
            .bind(&key.id)
            .bind(window_start)
            .fetch_optional(&self.pool)
            .await?;
        let requests: i64 = row.map(|row| row.try_get("requests")).transpose()?.unwrap_or(0);
        let limited = match (limits.requests_per_minute, limits.images_per_minute) {
            (Some(rpm), _) if requests >= i64::from(rpm) => (RateLimitKind::Requests, rpm),
            (_, Some(ipm)) => (RateLimitKind::Images, ipm),
            (Some(rpm), None) => (RateLimitKind::Requests, rpm),
            (None, None) => return Ok(RateLimit::Allowed),
        };
        Ok(RateLimit::Limited { kind: limited.0, per_minute: limited.1, retry_after_secs })
    }

    /// Deletes rate windows that ended before `now_ms`, and idempotency entries past their expiry.
    pub(crate) async fn prune(&self, now_ms: i64) -> Result<()> {
        let current_window = now_ms - now_ms.rem_euclid(WINDOW_MS);
        let windows = sqlx::query("DELETE FROM rate_windows WHERE window_start_ms < $1")
            .bind(current_window)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let entries = sqlx::query("DELETE FROM idempotency WHERE expires_at_ms <= $1")
            .bind(now_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
        tracing::debug!(windows, idempotency_entries = entries, "pruned");
        Ok(())
    }
}
