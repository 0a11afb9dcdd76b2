//! Images kept for `response_format=url`: a response's images are stored here and answered with URLs
//! naming them by an unguessable id (`img_` and 48 random alphanumerics, about 285 bits: the URL is
//! the capability, as OpenAI's signed image URLs are), until they expire; [`Ledger::delete_expired_images`]
//! (the server's sweep) deletes them after. In the database, so that any instance sharing it serves
//! any instance's URL.

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use sqlx::Row;

use crate::db::{Ledger, from_ms, to_ms};
use crate::error::Result;

/// Random characters of an image id after `img_`.
const ID_RANDOM_CHARS: usize = 48;

/// A stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    pub content_type: String,
    pub bytes: Vec<u8>,
    pub expires_at: DateTime<Utc>,
}

impl Ledger {
    /// Stores one image for `ttl`; returns its id.
    pub async fn store_image(
        &self,
        key_id: Option<&str>,
        content_type: &str,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<String> {
        let random: String = rand::rng().sample_iter(Alphanumeric).take(ID_RANDOM_CHARS).map(char::from).collect();
        let id = format!("img_{random}");
        let now = self.clock.now();
        sqlx::query(
            "INSERT INTO stored_images (id, key_id, content_type, bytes, created_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(key_id)
        .bind(content_type)
        .bind(bytes)
        .bind(to_ms(now))
        .bind(to_ms(now + ttl))
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// The image stored as `id`, unless it expired (or never was).
    pub async fn stored_image(&self, id: &str) -> Result<Option<StoredImage>> {
        let row = sqlx::query(
            "SELECT content_type, bytes, expires_at_ms FROM stored_images WHERE id = $1 AND expires_at_ms > $2",
        )
        .bind(id)
        .bind(to_ms(self.clock.now()))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(StoredImage {
            content_type: row.try_get("content_type")?,
            bytes: row.try_get("bytes")?,
            expires_at: from_ms(row.try_get("expires_at_ms")?)?,
        }))
    }

    /// Deletes every expired image; returns how many.
    pub async fn delete_expired_images(&self) -> Result<u64> {
        let done = sqlx::query("DELETE FROM stored_images WHERE expires_at_ms <= $1")
            .bind(to_ms(self.clock.now()))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
