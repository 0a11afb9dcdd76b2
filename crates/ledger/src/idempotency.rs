//! Idempotency keys: a retried request with the same `Idempotency-Key` gets the first answer
//! instead of running (and billing) twice.
//!
//! Entries are per API key. [`Ledger::begin_idempotent`] claims an entry with one
//! `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired` statement, so of two concurrent requests with
//! the same key exactly one gets [`Idempotency::New`]. The winner then either
//! [`Ledger::complete_idempotent`]s it (storing the response metadata, replayed for
//! `idempotency_retention`) or [`Ledger::fail_idempotent`]s it (removing it, so a retry runs again).
//! An in-flight entry lives as long as its request's hold (the instance's heartbeat renews both); when
//! its instance dies, the sweep that frees the hold forgets it, so a retry runs again. An entry with no
//! hold (a request refused before its hold, or one without a key) is taken over after
//! `idempotency_in_flight_ttl`.

use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::{Ledger, to_ms};
use crate::error::{LedgerError, Result};
use crate::keys::hex;

/// The answer to [`Ledger::begin_idempotent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotency {
    /// This request owns the key: run it, then complete or fail it.
    New,
    /// The same request is running elsewhere (the server answers 409 and the client retries later).
    InFlight,
    /// The request already ran; here is what [`Ledger::complete_idempotent`] stored for it.
    Completed(StoredResponse),
    /// The key was used for a different request body (the server answers 400 or 422).
    Mismatch,
}

/// What a completed idempotent request stored, replayed to its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The response body (or a note saying why it was not stored).
    pub body: String,
    /// What the request was charged, as the cost header said (`None` when it said nothing).
    pub cost_usd: Option<String>,
    /// The request that ran (when it was stored as it settled: [`Ledger::settle_and_store`]).
    pub request_id: Option<String>,
}

/// A request fingerprint: lowercase hex SHA-256 of the bytes (e.g. the method, path and body).
pub fn fingerprint(request: &[u8]) -> String {
    hex(&Sha256::digest(request))
}

/// The fingerprint of a request in several parts (form fields, then files), each length-prefixed so
/// that moving bytes from one part to the next changes it.
pub fn fingerprint_parts(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex(&h.finalize())
}

/// The response to store for a request's `Idempotency-Key` as it settles.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    /// Whose idempotency keys: the API key's id (or the open server's owner).
    pub key_id: &'a str,
    pub idempotency_key: &'a str,
    pub response: &'a str,
    /// The cost header's value.
    pub cost_usd: Option<&'a str>,
    /// The request that ran.
    pub request_id: &'a str,
}

impl Ledger {
    /// Claims `idempotency_key` for this request, or says why not.
    pub async fn begin_idempotent(
        &self,
        key_id: &str,
        idempotency_key: &str,
        fingerprint: &str,
    ) -> Result<Idempotency> {
        let now_ms = to_ms(self.clock.now());
        // The entry can vanish between the claim and the read (its owner failed): claim again.
        for _ in 0..3 {
            let claimed = sqlx::query(
                "INSERT INTO idempotency (key_id, idempotency_key, fingerprint, state, response,
                     created_at_ms, expires_at_ms)
                 VALUES ($1, $2, $3, 'in_flight', NULL, $4, $5)
                 ON CONFLICT (key_id, idempotency_key) DO UPDATE
                 SET fingerprint = excluded.fingerprint, state = 'in_flight', response = NULL,
                     created_at_ms = excluded.created_at_ms, expires_at_ms = excluded.expires_at_ms
                 WHERE idempotency.expires_at_ms <= $4",
            )
            .bind(key_id)
            .bind(idempotency_key)
            .bind(fingerprint)
            .bind(now_ms)
            .bind(now_ms + self.in_flight_ttl_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if claimed == 1 {
                return Ok(Idempotency::New);
            }
            let row = sqlx::query(
                "SELECT fingerprint, state, response, cost_usd, request_id FROM idempotency
                 WHERE key_id = $1 AND idempotency_key = $2",
            )
            .bind(key_id)
            .bind(idempotency_key)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else { continue };
            let stored: String = row.try_get("fingerprint")?;
            let state: String = row.try_get("state")?;
            let response: Option<String> = row.try_get("response")?;
            let cost_usd: Option<String> = row.try_get("cost_usd")?;
            let request_id: Option<String> = row.try_get("request_id")?;
            return Ok(match (stored == fingerprint, state.as_str(), response) {
                (false, _, _) => Idempotency::Mismatch,
                (true, "completed", Some(body)) => {
                    Idempotency::Completed(StoredResponse { body, cost_usd, request_id })
                }
                (true, "in_flight", _) => Idempotency::InFlight,
                (true, state, _) => return Err(LedgerError::Corrupt(format!("idempotency state {state:?}"))),
            });
        }
        Ok(Idempotency::InFlight)
    }

    /// Stores the response of a request that owns `idempotency_key`, and what it was charged
    /// (`cost_usd`, the cost header's value); retries get both back as [`Idempotency::Completed`] for
    /// `idempotency_retention`.
    pub async fn complete_idempotent(
        &self,
        key_id: &str,
        idempotency_key: &str,
        response: &str,
        cost_usd: Option<&str>,
    ) -> Result<()> {
        let now_ms = to_ms(self.clock.now());
        sqlx::query(
            "UPDATE idempotency SET state = 'completed', response = $3, cost_usd = $5, expires_at_ms = $4
             WHERE key_id = $1 AND idempotency_key = $2 AND state = 'in_flight'",
        )
        .bind(key_id)
        .bind(idempotency_key)
        .bind(response)
        .bind(now_ms + self.retention_ms)
        .bind(cost_usd)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// [`Ledger::complete_idempotent`] within `tx`.
    pub(crate) async fn store_idempotent(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        c: &Completion<'_>,
    ) -> Result<()> {
        let now_ms = to_ms(self.clock.now());
        sqlx::query(
            "UPDATE idempotency SET state = 'completed', response = $3, cost_usd = $5, expires_at_ms = $4,
                 request_id = $6
             WHERE key_id = $1 AND idempotency_key = $2 AND state = 'in_flight'",
        )
        .bind(c.key_id)
        .bind(c.idempotency_key)
        .bind(c.response)
        .bind(now_ms + self.retention_ms)
        .bind(c.cost_usd)
        .bind(c.request_id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Forgets an in-flight entry whose request failed, so a retry runs again.
    pub async fn fail_idempotent(&self, key_id: &str, idempotency_key: &str) -> Result<()> {
        sqlx::query("DELETE FROM idempotency WHERE key_id = $1 AND idempotency_key = $2 AND state = 'in_flight'")
            .bind(key_id)
            .bind(idempotency_key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
