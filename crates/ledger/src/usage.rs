//! The usage ledger: one append-only row per request, and the queries that sum it.
//!
//! Rows are written by [`Ledger::settle`], [`Ledger::release`] (in the same transaction as the
//! budget change) and [`Ledger::record`] (requests that held no reservation: refusals, requests
//! without a key). Nothing updates or deletes them. The cost is stored twice on purpose: the total in
//! nano-USD (summed by the queries) and the caller's itemized breakdown as JSON text (shown, never
//! parsed here).
//!
//! Queries aggregate in SQL per time bucket and per (model, key, project, size, operation, billing
//! basis, tier, provider), then fold
//! those rows into the requested grouping in Rust, so the SQL never changes with the grouping.
//! Rows are placed by `created_at`, the request's start.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::db::{Ledger, from_ms, to_i64, to_ms, to_u64};
use crate::error::{LedgerError, Result};
use crate::money::{nanos_to_usd, usd_to_nanos_half_up};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestStatus {
    Succeeded,
    Failed,
    /// Refused before running (budget, quota, rate limit).
    Refused,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            "refused" => Some(Self::Refused),
            _ => None,
        }
    }
}

/// Where a ledger row's cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CostSource {
    /// Priced from what ran: the provider's usage, imagegate's count of it, or measured compute time.
    Priced,
    /// What ran could not be known or priced (an abandoned request whose outcome never arrived, a
    /// result the catalog cannot price): the worst case that was held was charged.
    WorstCase,
    /// Priced above the worst case that was held: the hold was charged, never more.
    Capped,
    /// Nothing was charged.
    None,
}

impl CostSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Priced => "priced",
            Self::WorstCase => "worst_case",
            Self::Capped => "capped",
            Self::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "priced" => Some(Self::Priced),
            "worst_case" => Some(Self::WorstCase),
            "capped" => Some(Self::Capped),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Token counts of one request (zero where a model does not bill tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_text: u64,
    pub input_image: u64,
    pub output: u64,
}

/// What the server knows about one request. The key, project, status and cost come from the call
/// that writes it ([`Ledger::settle`], [`Ledger::release`], [`Ledger::record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub request_id: String,
    /// What was asked: `generation`, `edit`, ... (OpenAI's usage `source`).
    pub operation: String,
    /// The model that ran and was billed.
    pub model: String,
    /// The model the client named, when another ran in its place (a shut-down model's replacement).
    pub requested_model: Option<String>,
    pub provider: String,
    /// `default`, `flex`, `batch`, ...
    pub tier: String,
    pub quality: Option<String>,
    pub size: Option<String>,
    /// Images charged to the image quota: those produced (or, for a request whose client went away,
    /// incurred); 0 for a request that produced none.
    pub n: u32,
    pub tokens: TokenUsage,
    /// The itemized cost as JSON text, stored as given.
    pub cost_breakdown: Option<String>,
    /// `tokens`, `per_image`, `compute`, ...
    pub billing_basis: String,
    pub error_code: Option<String>,
    /// Where the cost came from; `None` on rows written before it was recorded.
    pub cost_source: Option<CostSource>,
    pub latency_ms: u64,
    pub created_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// A stored ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    /// Increasing in insertion order.
    pub id: i64,
    pub key_id: Option<String>,
    pub project_id: Option<String>,
    pub status: RequestStatus,
    pub cost_usd: Decimal,
    pub entry: LedgerEntry,
}

/// What usage can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    Model,
    Key,
    Project,
    Size,
    Operation,
    /// The UTC day of `created_at`.
    Day,
    /// How the request was billed ([`LedgerEntry::billing_basis`]: `tokens`, `per_image`, ...).
    BillingBasis,
    /// The service tier it ran and was billed at (`default`, `flex`, `batch`).
    Tier,
    /// Where it ran: `local`, or the upstream's name.
    Provider,
}

/// Usage between `start` (inclusive) and `end` (exclusive; `None` means up to now), grouped by
/// `group_by` (empty: one total).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
    pub group_by: Vec<Dimension>,
}

impl UsageQuery {
    /// Everything since `start`, grouped by `group_by`.
    pub fn since(start: DateTime<Utc>, group_by: &[Dimension]) -> Self {
        Self { start, end: None, group_by: group_by.to_vec() }
    }
}

/// Which ledger rows [`Ledger::recent_entries`] returns: `None` fields match every row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    pub model: Option<String>,
    pub key_id: Option<String>,
    pub status: Option<RequestStatus>,
    /// Created at or after.
    pub start: Option<DateTime<Utc>>,
    /// Created before.
    pub end: Option<DateTime<Utc>>,
}

/// Bucket widths for [`Ledger::usage_buckets`] (OpenAI's `bucket_width`: `1h`, `1d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketWidth {
    Hour,
    Day,
}

impl BucketWidth {
    fn millis(self) -> i64 {
        match self {
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
        }
    }
}

/// Sums over a group of ledger rows. A field of the group is `Some` only when grouped by it (and
/// the rows have it: requests without a key have no key id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub model: Option<String>,
    pub key_id: Option<String>,
    pub project_id: Option<String>,
    pub size: Option<String>,
    pub operation: Option<String>,
    pub day: Option<DateTime<Utc>>,
    pub billing_basis: Option<String>,
    pub tier: Option<String>,
    pub provider: Option<String>,
    /// Ledger rows, whatever their status.
    pub requests: u64,
    pub succeeded: u64,
    /// `n` summed over succeeded rows.
    pub images: u64,
    pub input_text_tokens: u64,
    pub input_image_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Decimal,
}

/// One time bucket of [`Ledger::usage_buckets`]: `[start, end)` and its groups (empty when idle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub results: Vec<UsageRow>,
}

/// The most buckets one query may return.
const MAX_BUCKETS: i64 = 10_000;

/// Columns of [`row_from_ledger`], as a literal for `concat!`.
macro_rules! ledger_columns {
    () => {
        "id, request_id, key_id, project_id, operation, model, provider, tier, quality, size, n,
         input_text_tokens, input_image_tokens, output_tokens, cost_nanos, cost_breakdown,
         billing_basis, status, error_code, cost_source, latency_ms, created_at_ms, finished_at_ms,
         requested_model"
    };
}

impl Ledger {
    /// Appends a row for a request that held no reservation: a refusal, or a request served without
    /// a key. Charges no budget. The project is the key's.
    pub async fn record(
        &self,
        key_id: Option<&str>,
        status: RequestStatus,
        cost_usd: Decimal,
        entry: &LedgerEntry,
    ) -> Result<()> {
        let cost = usd_to_nanos_half_up(cost_usd)?;
        let project_id = match key_id {
            Some(key_id) => self.get_key(key_id).await?.project_id,
            None => None,
        };
        let mut conn = self.pool.acquire().await?;
        insert_entry(&mut conn, key_id, project_id.as_deref(), status, cost, entry).await
    }

    /// Ledger rows created at or after `since`, oldest first, at most `limit`.
    pub async fn entries(&self, since: DateTime<Utc>, limit: u32) -> Result<Vec<LedgerRow>> {
        sqlx::query(concat!(
            "SELECT ",
            ledger_columns!(),
            " FROM ledger WHERE created_at_ms >= $1 ORDER BY created_at_ms, id LIMIT $2"
        ))
        .bind(to_ms(since))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row_from_ledger)
        .collect()
    }

    /// The newest ledger rows that pass `filter`, newest first, at most `limit`.
    pub async fn recent_entries(&self, filter: &EntryFilter, limit: u32) -> Result<Vec<LedgerRow>> {
        // One statement for every filter: an empty value matches all.
        sqlx::query(concat!(
            "SELECT ",
            ledger_columns!(),
            " FROM ledger WHERE created_at_ms >= $1 AND created_at_ms < $2
                 AND ($3 = '' OR model = $3) AND ($4 = '' OR key_id = $4) AND ($5 = '' OR status = $5)
               ORDER BY created_at_ms DESC, id DESC LIMIT $6"
        ))
        .bind(filter.start.map_or(i64::MIN, to_ms))
        .bind(filter.end.map_or(i64::MAX, to_ms))
        .bind(filter.model.as_deref().unwrap_or(""))
        .bind(filter.key_id.as_deref().unwrap_or(""))
        .bind(filter.status.map_or("", RequestStatus::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row_from_ledger)
        .collect()
    }

    /// When `key_id` was last used: its newest ledger row's time (requests, refusals included).
    pub async fn last_use(&self, key_id: &str) -> Result<Option<DateTime<Utc>>> {
        let row = sqlx::query("SELECT MAX(created_at_ms) AS at FROM ledger WHERE key_id = $1")
            .bind(key_id)
            .fetch_one(&self.pool)
            .await?;
        row.try_get::<Option<i64>, _>("at")?.map(from_ms).transpose()
    }

    /// Ledger rows of one request id (usually one), oldest first.
    pub async fn entries_for_request(&self, request_id: &str) -> Result<Vec<LedgerRow>> {
        sqlx::query(concat!("SELECT ", ledger_columns!(), " FROM ledger WHERE request_id = $1 ORDER BY id"))
            .bind(request_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(row_from_ledger)
            .collect()
    }

    /// Totals over the query's range, grouped by its dimensions, ordered by group.
    pub async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        let end_ms = query.end.map_or(i64::MAX, to_ms);
        let parts = self.aggregate(to_ms(query.start), end_ms, BucketWidth::Day).await?;
        Ok(fold(parts.into_iter().map(|(_, part)| part), &query.group_by))
    }

    /// Usage per time bucket, for OpenAI's `/v1/organization/costs` and `/usage/images`. Buckets are
    /// aligned to UTC hours or days: `start` is rounded down to a boundary and every bucket up to
    /// `end` (or now) is returned, idle ones with no results.
    pub async fn usage_buckets(&self, query: &UsageQuery, width: BucketWidth) -> Result<Vec<UsageBucket>> {
        let w = width.millis();
        let start_ms = to_ms(query.start);
        let first = start_ms - start_ms.rem_euclid(w);
        let end_ms = to_ms(query.end.unwrap_or_else(|| self.clock.now()));
        let count = if end_ms > first { (end_ms - first + w - 1) / w } else { 0 };
        if count > MAX_BUCKETS {
            return Err(LedgerError::InvalidArgument(format!(
                "{count} buckets requested, at most {MAX_BUCKETS}: narrow the time range or widen the buckets"
            )));
        }
        let mut parts_by_bucket: BTreeMap<i64, Vec<UsageRow>> = BTreeMap::new();
        for (bucket, part) in self.aggregate(first, end_ms, width).await? {
            parts_by_bucket.entry(bucket).or_default().push(part);
        }
        (0..count)
            .map(|i| {
                let bucket = first + i * w;
                let parts = parts_by_bucket.remove(&bucket).unwrap_or_default();
                Ok(UsageBucket {
                    start: from_ms(bucket)?,
                    end: from_ms(bucket + w)?,
                    results: fold(parts, &query.group_by),
                })
            })
            .collect()
    }

    /// Sums of the ledger rows created in `[start_ms, end_ms)`, per bucket of `width` and per
    /// (model, key, project, size, operation, billing basis, tier, provider), every grouping field filled in.
    async fn aggregate(&self, start_ms: i64, end_ms: i64, width: BucketWidth) -> Result<Vec<(i64, UsageRow)>> {
        let rows = sqlx::query(
            "SELECT created_at_ms - (created_at_ms % $1) AS bucket_ms,
                    model, key_id, project_id, size, operation, billing_basis, tier, provider,
                    COUNT(*) AS requests,
                    CAST(COALESCE(SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END), 0) AS BIGINT) AS succeeded,
                    CAST(COALESCE(SUM(CASE WHEN status = 'succeeded' THEN n ELSE 0 END), 0) AS BIGINT) AS images,
                    CAST(COALESCE(SUM(input_text_tokens), 0) AS BIGINT) AS input_text_tokens,
                    CAST(COALESCE(SUM(input_image_tokens), 0) AS BIGINT) AS input_image_tokens,
                    CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens,
                    CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) AS cost_nanos
             FROM ledger
             WHERE created_at_ms >= $2 AND created_at_ms < $3
             GROUP BY bucket_ms, model, key_id, project_id, size, operation, billing_basis, tier, provider",
        )
        .bind(width.millis())
        .bind(start_ms)
        .bind(end_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let bucket: i64 = row.try_get("bucket_ms")?;
                let day_ms = bucket - bucket.rem_euclid(BucketWidth::Day.millis());
                Ok((
                    bucket,
                    UsageRow {
                        model: row.try_get("model")?,
                        key_id: row.try_get("key_id")?,
                        project_id: row.try_get("project_id")?,
                        size: row.try_get("size")?,
                        operation: row.try_get("operation")?,
                        day: Some(from_ms(day_ms)?),
                        billing_basis: row.try_get("billing_basis")?,
                        tier: row.try_get("tier")?,
                        provider: row.try_get("provider")?,
                        requests: to_u64(row.try_get("requests")?)?,
                        succeeded: to_u64(row.try_get("succeeded")?)?,
                        images: to_u64(row.try_get("images")?)?,
                        input_text_tokens: to_u64(row.try_get("input_text_tokens")?)?,
                        input_image_tokens: to_u64(row.try_get("input_image_tokens")?)?,
                        output_tokens: to_u64(row.try_get("output_tokens")?)?,
                        cost_usd: nanos_to_usd(row.try_get("cost_nanos")?),
                    },
                ))
            })
            .collect()
    }
}

/// Merges fully grouped rows into the groups of `group_by`, ordered by group.
fn fold(parts: impl IntoIterator<Item = UsageRow>, group_by: &[Dimension]) -> Vec<UsageRow> {
    let by = |d: Dimension| group_by.contains(&d);
    let mut groups: BTreeMap<GroupKey, UsageRow> = BTreeMap::new();
    for part in parts {
        let group = UsageRow {
            model: part.model.filter(|_| by(Dimension::Model)),
            key_id: part.key_id.filter(|_| by(Dimension::Key)),
            project_id: part.project_id.filter(|_| by(Dimension::Project)),
            size: part.size.filter(|_| by(Dimension::Size)),
            operation: part.operation.filter(|_| by(Dimension::Operation)),
            day: part.day.filter(|_| by(Dimension::Day)),
            billing_basis: part.billing_basis.filter(|_| by(Dimension::BillingBasis)),
            tier: part.tier.filter(|_| by(Dimension::Tier)),
            provider: part.provider.filter(|_| by(Dimension::Provider)),
            ..UsageRow::default()
        };
        let sums = groups.entry(GroupKey::of(&group)).or_insert(group);
        sums.requests = sums.requests.saturating_add(part.requests);
        sums.succeeded = sums.succeeded.saturating_add(part.succeeded);
        sums.images = sums.images.saturating_add(part.images);
        sums.input_text_tokens = sums.input_text_tokens.saturating_add(part.input_text_tokens);
        sums.input_image_tokens = sums.input_image_tokens.saturating_add(part.input_image_tokens);
        sums.output_tokens = sums.output_tokens.saturating_add(part.output_tokens);
        sums.cost_usd += part.cost_usd;
    }
    groups.into_values().collect()
}

/// The grouping fields of a [`UsageRow`], day first, as a map key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    day: Option<DateTime<Utc>>,
    model: Option<String>,
    key_id: Option<String>,
    project_id: Option<String>,
    size: Option<String>,
    operation: Option<String>,
    billing_basis: Option<String>,
    tier: Option<String>,
    provider: Option<String>,
}

impl GroupKey {
    fn of(row: &UsageRow) -> Self {
        Self {
            day: row.day,
            model: row.model.clone(),
            key_id: row.key_id.clone(),
            project_id: row.project_id.clone(),
            size: row.size.clone(),
            operation: row.operation.clone(),
            billing_basis: row.billing_basis.clone(),
            tier: row.tier.clone(),
            provider: row.provider.clone(),
        }
    }
}

/// Appends one ledger row. The only place that writes the ledger.
pub(crate) async fn insert_entry(
    conn: &mut AnyConnection,
    key_id: Option<&str>,
    project_id: Option<&str>,
    status: RequestStatus,
    cost_nanos: i64,
    entry: &LedgerEntry,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO ledger (request_id, key_id, project_id, operation, model, provider, tier, quality,
             size, n, input_text_tokens, input_image_tokens, output_tokens, cost_nanos, cost_breakdown,
             billing_basis, status, error_code, cost_source, latency_ms, created_at_ms, finished_at_ms,
             requested_model)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
             $20, $21, $22, $23)",
    )
    .bind(&entry.request_id)
    .bind(key_id)
    .bind(project_id)
    .bind(&entry.operation)
    .bind(&entry.model)
    .bind(&entry.provider)
    .bind(&entry.tier)
    .bind(entry.quality.as_deref())
    .bind(entry.size.as_deref())
    .bind(i64::from(entry.n))
    .bind(to_i64(entry.tokens.input_text)?)
    .bind(to_i64(entry.tokens.input_image)?)
    .bind(to_i64(entry.tokens.output)?)
    .bind(cost_nanos)
    .bind(entry.cost_breakdown.as_deref())
    .bind(&entry.billing_basis)
    .bind(status.as_str())
    .bind(entry.error_code.as_deref())
    .bind(entry.cost_source.map(CostSource::as_str))
    .bind(to_i64(entry.latency_ms)?)
    .bind(to_ms(entry.created_at))
    .bind(to_ms(entry.finished_at))
    .bind(entry.requested_model.as_deref())
    .execute(conn)
    .await?;
    Ok(())
}

fn row_from_ledger(row: &AnyRow) -> Result<LedgerRow> {
    let status: String = row.try_get("status")?;
    let n: i64 = row.try_get("n")?;
    Ok(LedgerRow {
        id: row.try_get("id")?,
        key_id: row.try_get("key_id")?,
        project_id: row.try_get("project_id")?,
        status: RequestStatus::parse(&status)
            .ok_or_else(|| LedgerError::Corrupt(format!("request status {status:?}")))?,
        cost_usd: nanos_to_usd(row.try_get("cost_nanos")?),
        entry: LedgerEntry {
            request_id: row.try_get("request_id")?,
            operation: row.try_get("operation")?,
            model: row.try_get("model")?,
            requested_model: row.try_get("requested_model")?,
            provider: row.try_get("provider")?,
            tier: row.try_get("tier")?,
            quality: row.try_get("quality")?,
            size: row.try_get("size")?,
            n: u32::try_from(n).map_err(|_| LedgerError::Corrupt(format!("image count {n}")))?,
            tokens: TokenUsage {
                input_text: to_u64(row.try_get("input_text_tokens")?)?,
                input_image: to_u64(row.try_get("input_image_tokens")?)?,
                output: to_u64(row.try_get("output_tokens")?)?,
            },
            cost_breakdown: row.try_get("cost_breakdown")?,
            billing_basis: row.try_get("billing_basis")?,
            error_code: row.try_get("error_code")?,
            cost_source: match row.try_get::<Option<String>, _>("cost_source")? {
                None => None,
                Some(s) => {
                    Some(CostSource::parse(&s).ok_or_else(|| LedgerError::Corrupt(format!("cost source {s:?}")))?)
                }
            },
            latency_ms: to_u64(row.try_get("latency_ms")?)?,
            created_at: from_ms(row.try_get("created_at_ms")?)?,
            finished_at: from_ms(row.try_get("finished_at_ms")?)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(model: &str, key: &str, day: i64, cost: i64) -> UsageRow {
        UsageRow {
            model: Some(model.into()),
            key_id: Some(key.into()),
            project_id: None,
            size: Some("1024x1024".into()),
            operation: Some("generation".into()),
            day: Some(from_ms(day * 86_400_000).unwrap()),
            billing_basis: Some("tokens".into()),
            tier: Some("default".into()),
            provider: Some(if key == "k2" { "comet" } else { "local" }.into()),
            requests: 1,
            succeeded: 1,
            images: 2,
            input_text_tokens: 10,
            input_image_tokens: 0,
            output_tokens: 100,
            cost_usd: nanos_to_usd(cost),
        }
    }

    #[test]
    fn fold_groups_and_sums() {
        let parts = vec![part("a", "k1", 0, 1), part("a", "k2", 1, 2), part("b", "k1", 1, 4)];
        let by_model = fold(parts.clone(), &[Dimension::Model]);
        assert_eq!(by_model.len(), 2);
        assert_eq!(by_model[0].model.as_deref(), Some("a"));
        assert_eq!(by_model[0].key_id, None);
        assert_eq!(by_model[0].requests, 2);
        assert_eq!(by_model[0].images, 4);
        assert_eq!(by_model[0].cost_usd, nanos_to_usd(3));

        let by_provider = fold(parts.clone(), &[Dimension::Provider]);
        let sums: Vec<_> = by_provider.iter().map(|r| (r.provider.as_deref(), r.requests, r.cost_usd)).collect();
        assert_eq!(sums, [(Some("comet"), 1, nanos_to_usd(2)), (Some("local"), 2, nanos_to_usd(5))]);
        assert_eq!(by_provider[0].model, None);

        let total = fold(parts.clone(), &[]);
        assert_eq!(total.len(), 1);
        assert_eq!(total[0].cost_usd, nanos_to_usd(7));
        assert_eq!(total[0].output_tokens, 300);

        let by_day_and_model = fold(parts, &[Dimension::Day, Dimension::Model]);
        assert_eq!(by_day_and_model.len(), 3, "{by_day_and_model:?}");
        assert!(by_day_and_model.windows(2).all(|w| w[0].day <= w[1].day), "ordered by day first");
    }

    #[test]
    fn status_names_round_trip() {
        for status in [RequestStatus::Succeeded, RequestStatus::Failed, RequestStatus::Refused] {
            assert_eq!(RequestStatus::parse(status.as_str()), Some(status));
        }
    }
}
