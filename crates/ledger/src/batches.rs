//! The store of the Files and Batch APIs: uploaded files, batches and each batch's lines, every one
//! owned by the API key that made it (another key finds nothing).
//!
//! A batch's lines are claimed by one instance at a time with a conditional update (any instance
//! sharing the database may run them; PostgreSQL's `FOR UPDATE SKIP LOCKED` would do the same), and
//! the claim is renewed by the instance's [`Ledger::heartbeat`]; a claim that lapsed (its instance died)
//! is taken over. [`Ledger::advance_batches`] expires batches past their window and finishes batches
//! with no line left to run, making their output and error files. Money is not here: a line is one
//! request, held and charged like any other.

use chrono::{DateTime, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use sqlx::Row;
use sqlx::any::AnyRow;

use rust_decimal::Decimal;

use crate::db::{Ledger, to_ms};
use crate::error::Result;
use crate::money::nanos_to_usd;

/// Who owns what an open server (no keys) makes.
pub const ANONYMOUS: &str = "anonymous";

fn random_id(prefix: &str) -> String {
    let random: String = rand::rng().sample_iter(Alphanumeric).take(24).map(char::from).collect();
    format!("{prefix}{random}")
}

fn seconds(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

/// A batch's own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchPart {
    /// The lines that got a 2xx answer.
    Output,
    /// The lines that got an error, or never ran.
    Error,
}

impl BatchPart {
    fn as_str(self) -> &'static str {
        match self {
            BatchPart::Output => "output",
            BatchPart::Error => "error",
        }
    }
}

/// A file's description (not its content).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub id: String,
    pub owner: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// For a batch's output or error file: the batch and which of its files.
    pub batch: Option<(String, BatchPart)>,
}

/// What a file holds.
#[derive(Debug)]
pub enum FileContent {
    /// An uploaded file's bytes.
    Stored(Vec<u8>),
    /// A batch's output or error file: its lines, in input order.
    Lines(Vec<DoneLine>),
}

/// A batch line that is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneLine {
    pub batch_id: String,
    pub line: i64,
    pub custom_id: String,
    /// The HTTP status the request got; 0 for a line that never ran.
    pub status_code: u16,
    pub request_id: Option<String>,
    /// The response body (JSON), or for a line that never ran, why (an error code).
    pub response: String,
}

/// How many of a batch's lines are done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// A batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub id: String,
    pub owner: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    /// OpenAI's statuses: `validating`, `failed`, `in_progress`, `finalizing`, `completed`, `expired`,
    /// `cancelling`, `cancelled`.
    pub status: String,
    /// JSON object, as given.
    pub metadata: Option<String>,
    /// JSON: the validation errors of a failed batch.
    pub errors: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub counts: RequestCounts,
}

/// A batch to create.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub owner: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub metadata: Option<String>,
    /// How long it may run.
    pub window: chrono::Duration,
}

/// A line claimed by this instance, to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedLine {
    pub batch_id: String,
    pub line: i64,
    pub custom_id: String,
    /// The request body (JSON).
    pub body: String,
    pub owner: String,
    pub endpoint: String,
}

const FILE_COLUMNS: &str = "id, owner, purpose, filename, bytes, created_at, batch_id, batch_part";

const BATCH_COLUMNS: &str = "id, owner, endpoint, input_file_id, completion_window, status, metadata, errors,
    output_file_id, error_file_id, created_at, in_progress_at, expires_at, finalizing_at, completed_at,
    failed_at, expired_at, cancelling_at, cancelled_at";

fn file_from_row(row: &AnyRow) -> Result<FileRecord> {
    let batch_id: Option<String> = row.try_get("batch_id")?;
    let part: Option<String> = row.try_get("batch_part")?;
    let batch = match (batch_id, part.as_deref()) {
        (Some(b), Some("output")) => Some((b, BatchPart::Output)),
        (Some(b), Some(_)) => Some((b, BatchPart::Error)),
        _ => None,
    };
    Ok(FileRecord {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        purpose: row.try_get("purpose")?,
        filename: row.try_get("filename")?,
        bytes: u64::try_from(row.try_get::<i64, _>("bytes")?).unwrap_or(0),
        created_at: row.try_get("created_at")?,
        batch,
    })
}

fn batch_from_row(row: &AnyRow, counts: RequestCounts) -> Result<BatchRecord> {
    Ok(BatchRecord {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        endpoint: row.try_get("endpoint")?,
        input_file_id: row.try_get("input_file_id")?,
        completion_window: row.try_get("completion_window")?,
        status: row.try_get("status")?,
        metadata: row.try_get("metadata")?,
        errors: row.try_get("errors")?,
        output_file_id: row.try_get("output_file_id")?,
        error_file_id: row.try_get("error_file_id")?,
        created_at: row.try_get("created_at")?,
        in_progress_at: row.try_get("in_progress_at")?,
        expires_at: row.try_get("expires_at")?,
        finalizing_at: row.try_get("finalizing_at")?,
        completed_at: row.try_get("completed_at")?,
        failed_at: row.try_get("failed_at")?,
        expired_at: row.try_get("expired_at")?,
        cancelling_at: row.try_get("cancelling_at")?,
        cancelled_at: row.try_get("cancelled_at")?,
        counts,
    })
}

fn done_from_row(row: &AnyRow) -> Result<DoneLine> {
    Ok(DoneLine {
        batch_id: row.try_get("batch_id")?,
        line: row.try_get::<i64, _>("line")?,
        custom_id: row.try_get("custom_id")?,
        status_code: u16::try_from(row.try_get::<i64, _>("status_code")?).unwrap_or(0),
        request_id: row.try_get("request_id")?,
        response: row.try_get::<Option<String>, _>("response")?.unwrap_or_default(),
    })
}

impl Ledger {
    /// Stores an uploaded file.
    pub async fn create_file(&self, owner: &str, purpose: &str, filename: &str, content: &[u8]) -> Result<FileRecord> {
        let record = FileRecord {
            id: random_id("file-"),
            owner: owner.to_owned(),
            purpose: purpose.to_owned(),
            filename: filename.to_owned(),
            bytes: content.len() as u64,
            created_at: seconds(self.clock.now()),
            batch: None,
        };
        sqlx::query(
            "INSERT INTO files (id, owner, purpose, filename, bytes, created_at, content)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&record.id)
        .bind(owner)
        .bind(purpose)
        .bind(filename)
        .bind(i64::try_from(content.len()).unwrap_or(i64::MAX))
        .bind(record.created_at)
        .bind(content)
        .execute(&self.pool)
        .await?;
        Ok(record)
    }

    /// `owner`'s file `id`.
    pub async fn file(&self, owner: &str, id: &str) -> Result<Option<FileRecord>> {
        let row = sqlx::query(&format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND owner = $2"))
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(file_from_row).transpose()
    }

    /// What `owner`'s file `id` holds.
    pub async fn file_content(&self, owner: &str, id: &str) -> Result<Option<FileContent>> {
        let Some(file) = self.file(owner, id).await? else { return Ok(None) };
        if let Some((batch_id, part)) = &file.batch {
            return Ok(Some(FileContent::Lines(self.done_lines(batch_id, *part).await?)));
        }
        let content: Option<Vec<u8>> = sqlx::query_scalar("SELECT content FROM files WHERE id = $1 AND owner = $2")
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?
            .flatten();
        Ok(content.map(FileContent::Stored))
    }

    /// `owner`'s files, newest first (`ascending`: oldest first), after the file `after` when given.
    pub async fn list_files(
        &self,
        owner: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: u32,
        ascending: bool,
    ) -> Result<Vec<FileRecord>> {
        let (cmp, order) = if ascending { (">", "ASC") } else { ("<", "DESC") };
        let cursor = match after {
            Some(id) => self.file(owner, id).await?.map(|f| (f.created_at, f.id)),
            None => None,
        };
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE owner = $1 AND ($2 = '' OR purpose = $2)
               AND ($3 = 0 OR created_at {cmp} $4 OR (created_at = $4 AND id {cmp} $5))
             ORDER BY created_at {order}, id {order} LIMIT $6"
        );
        let (has_cursor, at, at_id) = match &cursor {
            Some((t, id)) => (1i64, *t, id.as_str()),
            None => (0, 0, ""),
        };
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(purpose.unwrap_or(""))
            .bind(has_cursor)
            .bind(at)
            .bind(at_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(file_from_row).collect()
    }

    /// Deletes `owner`'s file `id`; whether there was one.
    pub async fn delete_file(&self, owner: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM files WHERE id = $1 AND owner = $2")
            .bind(id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Creates a batch of `lines` (custom id, request body), in progress at once: one transaction.
    pub async fn create_batch(&self, new: &NewBatch, lines: &[(String, String)]) -> Result<BatchRecord> {
        let id = random_id("batch_");
        let now = self.clock.now();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, metadata,
                 created_at, in_progress_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, 'in_progress', $6, $7, $7, $8)",
        )
        .bind(&id)
        .bind(&new.owner)
        .bind(&new.endpoint)
        .bind(&new.input_file_id)
        .bind(&new.completion_window)
        .bind(new.metadata.as_deref())
        .bind(seconds(now))
        .bind(seconds(now + new.window))
        .execute(&mut *tx)
        .await?;
        for (i, (custom_id, body)) in lines.iter().enumerate() {
            sqlx::query(
                "INSERT INTO batch_lines (batch_id, line, custom_id, body, state) VALUES ($1, $2, $3, $4, 'pending')",
            )
            .bind(&id)
            .bind(i64::try_from(i).unwrap_or(i64::MAX))
            .bind(custom_id)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.batch(&new.owner, &id).await?.ok_or_else(|| crate::LedgerError::Corrupt(format!("batch {id} vanished")))
    }

    /// Records a batch whose input failed validation (`errors`, JSON): nothing of it runs.
    pub async fn create_failed_batch(&self, new: &NewBatch, errors: &str) -> Result<BatchRecord> {
        let id = random_id("batch_");
        let now = seconds(self.clock.now());
        sqlx::query(
            "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, metadata,
                 errors, created_at, failed_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, 'failed', $6, $7, $8, $8, $8)",
        )
        .bind(&id)
        .bind(&new.owner)
        .bind(&new.endpoint)
        .bind(&new.input_file_id)
        .bind(&new.completion_window)
        .bind(new.metadata.as_deref())
        .bind(errors)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.batch(&new.owner, &id).await?.ok_or_else(|| crate::LedgerError::Corrupt(format!("batch {id} vanished")))
    }

    /// `owner`'s batch `id`, with its counts.
    pub async fn batch(&self, owner: &str, id: &str) -> Result<Option<BatchRecord>> {
        let row = sqlx::query(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND owner = $2"))
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let counts = self.request_counts(id).await?;
        batch_from_row(&row, counts).map(Some)
    }

    /// `owner`'s batches, newest first, after the batch `after` when given.
    pub async fn list_batches(&self, owner: &str, after: Option<&str>, limit: u32) -> Result<Vec<BatchRecord>> {
        let cursor = match after {
            Some(id) => self.batch(owner, id).await?.map(|b| (b.created_at, b.id)),
            None => None,
        };
        let (has_cursor, at, at_id) = match &cursor {
            Some((t, id)) => (1i64, *t, id.as_str()),
            None => (0, 0, ""),
        };
        let rows = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE owner = $1
               AND ($2 = 0 OR created_at < $3 OR (created_at = $3 AND id < $4))
             ORDER BY created_at DESC, id DESC LIMIT $5"
        ))
        .bind(owner)
        .bind(has_cursor)
        .bind(at)
        .bind(at_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        self.batches_from_rows(&rows).await
    }

    /// The newest batches of every owner, newest first, at most `limit`, each with what its answered
    /// lines cost so far (the ledger rows of the requests they ran), for the console.
    pub async fn recent_batches(&self, limit: u32) -> Result<Vec<(BatchRecord, Decimal)>> {
        let rows =
            sqlx::query(&format!("SELECT {BATCH_COLUMNS} FROM batches ORDER BY created_at DESC, id DESC LIMIT $1"))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::new();
        for batch in self.batches_from_rows(&rows).await? {
            let cost = sqlx::query(
                "SELECT CAST(COALESCE(SUM(l.cost_nanos), 0) AS BIGINT) AS cost_nanos
                 FROM batch_lines b JOIN ledger l ON l.request_id = b.request_id
                 WHERE b.batch_id = $1",
            )
            .bind(&batch.id)
            .fetch_one(&self.pool)
            .await?;
            out.push((batch, nanos_to_usd(cost.try_get("cost_nanos")?)));
        }
        Ok(out)
    }

    /// Batches as read with [`BATCH_COLUMNS`], each with its lines' counts.
    async fn batches_from_rows(&self, rows: &[AnyRow]) -> Result<Vec<BatchRecord>> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            out.push(batch_from_row(row, self.request_counts(&id).await?)?);
        }
        Ok(out)
    }

    async fn request_counts(&self, batch_id: &str) -> Result<RequestCounts> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS total,
                 COALESCE(SUM(CASE WHEN state = 'done' AND status_code >= 200 AND status_code < 300 THEN 1 ELSE 0 END), 0) AS completed,
                 COALESCE(SUM(CASE WHEN state = 'done' AND (status_code < 200 OR status_code >= 300) THEN 1 ELSE 0 END), 0) AS failed
             FROM batch_lines WHERE batch_id = $1",
        )
        .bind(batch_id)
        .fetch_one(&self.pool)
        .await?;
        let get = |name: &str| -> Result<u64> { Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0)) };
        Ok(RequestCounts { total: get("total")?, completed: get("completed")?, failed: get("failed")? })
    }

    /// Cancels `owner`'s batch `id`: lines not yet started never run; running ones finish (and are
    /// charged). `None` when there is no such batch.
    pub async fn cancel_batch(&self, owner: &str, id: &str) -> Result<Option<BatchRecord>> {
        let now = seconds(self.clock.now());
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            "UPDATE batches SET status = 'cancelling', cancelling_at = $3
             WHERE id = $1 AND owner = $2 AND status IN ('validating', 'in_progress')",
        )
        .bind(id)
        .bind(owner)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 1 {
            never_run(&mut tx, id, "batch_cancelled").await?;
        }
        tx.commit().await?;
        self.advance_batches().await?;
        self.batch(owner, id).await
    }

    /// Claims up to `limit` lines to run on this instance: lines not started, and lines whose claim
    /// lapsed (their instance died), of batches in progress, oldest batch first.
    pub async fn claim_lines(&self, limit: u32) -> Result<Vec<ClaimedLine>> {
        let now_ms = to_ms(self.clock.now());
        let until = now_ms + self.reservation_ttl_ms;
        let candidates = sqlx::query(
            "SELECT l.batch_id, l.line FROM batch_lines l JOIN batches b ON b.id = l.batch_id
             WHERE b.status = 'in_progress'
               AND (l.state = 'pending' OR (l.state = 'running' AND l.claimed_until_ms <= $1))
             ORDER BY b.created_at, l.batch_id, l.line LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit) * 4)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::new();
        for c in candidates {
            if claimed.len() >= limit as usize {
                break;
            }
            let batch_id: String = c.try_get("batch_id")?;
            let line: i64 = c.try_get("line")?;
            let row = sqlx::query(
                "UPDATE batch_lines SET state = 'running', claimed_by = $3, claimed_until_ms = $4
                 WHERE batch_id = $1 AND line = $2
                   AND (state = 'pending' OR (state = 'running' AND claimed_until_ms <= $5))
                 RETURNING custom_id, body",
            )
            .bind(&batch_id)
            .bind(line)
            .bind(&*self.instance_id)
            .bind(until)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
            // Another instance claimed it first.
            let Some(row) = row else { continue };
            let batch = sqlx::query("SELECT owner, endpoint FROM batches WHERE id = $1")
                .bind(&batch_id)
                .fetch_one(&self.pool)
                .await?;
            claimed.push(ClaimedLine {
                custom_id: row.try_get("custom_id")?,
                body: row.try_get("body")?,
                owner: batch.try_get("owner")?,
                endpoint: batch.try_get("endpoint")?,
                batch_id,
                line,
            });
        }
        Ok(claimed)
    }

    /// Records what a line got: the first answer counts (`false` when another run of the line answered
    /// first: a second run is a replay or was refused, the line's idempotency key sees to it). A line
    /// that was put back to wait, or that its stopped batch gave up on as dead, takes its answer after
    /// all: it ran, and was charged.
    pub async fn finish_line(
        &self,
        batch_id: &str,
        line: i64,
        status_code: u16,
        request_id: Option<&str>,
        response: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE batch_lines SET state = 'done', status_code = $3, request_id = $4, response = $5,
                 claimed_by = NULL, claimed_until_ms = NULL
             WHERE batch_id = $1 AND line = $2 AND (state <> 'done' OR status_code = 0)",
        )
        .bind(batch_id)
        .bind(line)
        .bind(i64::from(status_code))
        .bind(request_id)
        .bind(response)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Puts a line this instance claimed back to wait for another try (it was refused for lack of
    /// capacity, which cost nothing).
    pub async fn requeue_line(&self, batch_id: &str, line: i64) -> Result<()> {
        sqlx::query(
            "UPDATE batch_lines SET state = 'pending', claimed_by = NULL, claimed_until_ms = NULL
             WHERE batch_id = $1 AND line = $2 AND state = 'running' AND claimed_by = $3",
        )
        .bind(batch_id)
        .bind(line)
        .bind(&*self.instance_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Renews this instance's line claims (part of [`Ledger::heartbeat`]).
    pub(crate) async fn renew_line_claims(&self, until_ms: i64) -> Result<()> {
        sqlx::query("UPDATE batch_lines SET claimed_until_ms = $2 WHERE claimed_by = $1 AND state = 'running'")
            .bind(&*self.instance_id)
            .bind(until_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Moves batches on: those past their window stop (lines not started never run); those with no
    /// line left to run are finished, with their output and error files. Safe on several instances at
    /// once. Returns how many batches finished.
    pub async fn advance_batches(&self) -> Result<u64> {
        let now = seconds(self.clock.now());
        let expired: Vec<String> =
            sqlx::query_scalar("SELECT id FROM batches WHERE status = 'in_progress' AND expires_at <= $1")
                .bind(now)
                .fetch_all(&self.pool)
                .await?;
        for id in expired {
            let mut tx = self.begin().await?;
            let moved = sqlx::query(
                "UPDATE batches SET status = 'finalizing', finalizing_at = $2, expired_at = $2
                 WHERE id = $1 AND status = 'in_progress'",
            )
            .bind(&id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if moved == 1 {
                never_run(&mut tx, &id, "batch_expired").await?;
            }
            tx.commit().await?;
        }
        // A stopped batch's line whose instance looks dead: nothing will finish it (if its instance
        // was alive after all, its answer still replaces this: [`Ledger::finish_line`]).
        sqlx::query(
            "UPDATE batch_lines SET state = 'done', status_code = 0, response = 'batch_cancelled'
             WHERE state = 'running' AND claimed_until_ms <= $1 AND batch_id IN
                 (SELECT id FROM batches WHERE status IN ('cancelling', 'finalizing'))",
        )
        .bind(to_ms(self.clock.now()))
        .execute(&self.pool)
        .await?;
        let open: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM batches b WHERE status IN ('in_progress', 'finalizing', 'cancelling')
               AND NOT EXISTS (SELECT 1 FROM batch_lines l WHERE l.batch_id = b.id AND l.state <> 'done')",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut finished = 0;
        for id in open {
            finished += u64::from(self.finish_batch(&id, now).await?);
        }
        Ok(finished)
    }

    /// Ends a batch whose lines are all done: its files, its final status.
    async fn finish_batch(&self, id: &str, now: i64) -> Result<bool> {
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT owner, status, expired_at FROM batches WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let owner: String = row.try_get("owner")?;
        let status: String = row.try_get("status")?;
        let expired: Option<i64> = row.try_get("expired_at")?;
        let (next, stamp) = match (status.as_str(), expired) {
            ("cancelling", _) => ("cancelled", "cancelled_at"),
            (_, Some(_)) => ("expired", "expired_at"),
            _ => ("completed", "completed_at"),
        };
        let mut files = [None, None];
        for (slot, part, ok) in [(0, BatchPart::Output, true), (1, BatchPart::Error, false)] {
            let (count, bytes): (i64, i64) = {
                let r = sqlx::query(&format!(
                    "SELECT COUNT(*) AS n, COALESCE(SUM(LENGTH(response)), 0) AS bytes FROM batch_lines
                     WHERE batch_id = $1 AND state = 'done' AND {}",
                    if ok {
                        "status_code >= 200 AND status_code < 300"
                    } else {
                        "(status_code < 200 OR status_code >= 300)"
                    }
                ))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                (r.try_get("n")?, r.try_get("bytes")?)
            };
            if count == 0 {
                continue;
            }
            let file_id = random_id("file-");
            sqlx::query(
                "INSERT INTO files (id, owner, purpose, filename, bytes, created_at, batch_id, batch_part)
                 VALUES ($1, $2, 'batch_output', $3, $4, $5, $6, $7)",
            )
            .bind(&file_id)
            .bind(&owner)
            .bind(format!("{id}_{}.jsonl", part.as_str()))
            .bind(bytes)
            .bind(now)
            .bind(id)
            .bind(part.as_str())
            .execute(&mut *tx)
            .await?;
            files[slot] = Some(file_id);
        }
        let done = sqlx::query(&format!(
            "UPDATE batches SET status = $2, {stamp} = COALESCE({stamp}, $3),
                 finalizing_at = COALESCE(finalizing_at, $3), output_file_id = $4, error_file_id = $5
             WHERE id = $1 AND status = $6"
        ))
        .bind(id)
        .bind(next)
        .bind(now)
        .bind(files[0].as_deref())
        .bind(files[1].as_deref())
        .bind(&status)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done == 1 {
            tx.commit().await?;
            Ok(true)
        } else {
            // Another instance finished it first.
            tx.rollback().await?;
            Ok(false)
        }
    }

    /// A batch's lines that belong in its output (2xx) or error file, in input order.
    async fn done_lines(&self, batch_id: &str, part: BatchPart) -> Result<Vec<DoneLine>> {
        let filter = match part {
            BatchPart::Output => "status_code >= 200 AND status_code < 300",
            BatchPart::Error => "(status_code < 200 OR status_code >= 300)",
        };
        let rows = sqlx::query(&format!(
            "SELECT batch_id, line, custom_id, status_code, request_id, response FROM batch_lines
             WHERE batch_id = $1 AND state = 'done' AND {filter} ORDER BY line"
        ))
        .bind(batch_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(done_from_row).collect()
    }
}

/// Marks a batch's lines that have not started as done without running (`why`: an error code).
async fn never_run(tx: &mut sqlx::Transaction<'static, sqlx::Any>, batch_id: &str, why: &str) -> Result<()> {
    sqlx::query(
        "UPDATE batch_lines SET state = 'done', status_code = 0, response = $2
         WHERE batch_id = $1 AND state = 'pending'",
    )
    .bind(batch_id)
    .bind(why)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
