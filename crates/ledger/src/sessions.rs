//! Sessions of the usage console: an admin key logs in once ([`Ledger::start_session`]) and the
//! browser presents the session's random secret (a cookie) instead of the key. Only the secret's
//! SHA-256 is stored; a session ends when it expires, when it is ended, or when its key is revoked.

use chrono::Duration;
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::{Ledger, to_ms};
use crate::error::Result;
use crate::keys::{ApiKey, hex};

/// Random characters of a session secret after `igs_` (about 285 bits).
const SECRET_RANDOM_CHARS: usize = 48;

fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

impl Ledger {
    /// A new session for `key_id`, valid for `ttl`; returns its secret (shown once, never stored).
    pub async fn start_session(&self, key_id: &str, ttl: Duration) -> Result<String> {
        let random: String = rand::rng().sample_iter(Alphanumeric).take(SECRET_RANDOM_CHARS).map(char::from).collect();
        let secret = format!("igs_{random}");
        let now = self.clock.now();
        sqlx::query(
            "INSERT INTO console_sessions (secret_sha256, key_id, created_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(digest(&secret))
        .bind(key_id)
        .bind(to_ms(now))
        .bind(to_ms(now + ttl))
        .execute(&self.pool)
        .await?;
        Ok(secret)
    }

    /// The live key of the unexpired session whose secret this is, or `None` (no such session, it
    /// expired, or its key was revoked since).
    pub async fn session_key(&self, secret: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query("SELECT key_id FROM console_sessions WHERE secret_sha256 = $1 AND expires_at_ms > $2")
            .bind(digest(secret))
            .bind(to_ms(self.clock.now()))
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let key_id: String = row.try_get("key_id")?;
        match self.get_key(&key_id).await {
            Ok(key) if key.revoked_at.is_none() => Ok(Some(key)),
            Ok(_) | Err(crate::LedgerError::KeyNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Ends the session whose secret this is (nothing when there is none).
    pub async fn end_session(&self, secret: &str) -> Result<()> {
        sqlx::query("DELETE FROM console_sessions WHERE secret_sha256 = $1")
            .bind(digest(secret))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes expired sessions; returns how many (the server's sweep runs it).
    pub async fn delete_expired_sessions(&self) -> Result<u64> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE expires_at_ms <= $1")
            .bind(to_ms(self.clock.now()))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
