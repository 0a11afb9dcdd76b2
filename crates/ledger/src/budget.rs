//! Budgets and reservations: the part that must never let spending pass a cap.
//!
//! A key, and the project it belongs to, may each have a [`Budget`]: a hard cap in USD, a soft
//! threshold (a warning only) and an image quota, per [`Period`]. What was spent and what is held is
//! counted in one `budget_usage` row per (owner, period, period start); a new period is simply a new
//! row, so budgets reset on their own at UTC calendar boundaries.
//!
//! A request goes: [`Ledger::reserve`] its worst case, run it, then [`Ledger::settle`] the actual
//! cost (or [`Ledger::release`] on failure). Invariants:
//!
//! - **No overspend.** A hold is one conditional `UPDATE ... WHERE spent + reserved + amount <= cap`
//!   on the key's row and then the project's row, inside one transaction that also records the
//!   reservation: either every hold is taken or none. Concurrent reserves cannot both pass the check:
//!   on SQLite, write transactions begin with `BEGIN IMMEDIATE`, which takes the database's single
//!   write lock before the first statement, so they run one after another (across processes too);
//!   on PostgreSQL (READ COMMITTED), the `UPDATE` locks the row and, if another transaction changed
//!   it meanwhile, waits for that one to commit and re-evaluates its `WHERE` on the new version.
//!   Either way the check and the increment cannot be split by another writer. So
//!   `spent + reserved <= cap` holds whenever every settled cost is at most its worst case; a cost
//!   above its worst case is still recorded in full (the truth is billed) and then blocks further
//!   reserves. Caps are read just before the transaction, so a cap an admin changes applies from
//!   the next reserve (one already under way uses the value it read).
//! - **Settle once.** Settling or releasing deletes the reservation row in the same transaction that
//!   moves the money; whoever deletes it (settle, release, or [`Ledger::release_expired`]) is the one
//!   that gives the hold back. A settle that finds its reservation already expired still charges
//!   the actual cost, and says so.
//! - **Periods.** A reservation remembers the period rows it holds; it settles into those rows even
//!   if the period has turned meanwhile, so neither period's numbers are corrupted.
//! - **Lock order.** On PostgreSQL every transaction touches the key's row before the project's
//!   and handles one reservation, so concurrent transactions cannot deadlock.
//! - **Configuration changes.** Spending is counted per period kind: changing a cap keeps the
//!   period's spending; changing the period (or adding a budget) starts counting afresh.

use chrono::{DateTime, Datelike, Months, NaiveTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use uuid::Uuid;

use crate::db::{Ledger, from_ms, to_i64, to_ms, to_u64};
use crate::error::{LedgerError, Result};
use crate::money::{nanos_to_usd, usd_to_nanos_ceil, usd_to_nanos_floor, usd_to_nanos_half_up};
use crate::usage::{LedgerEntry, RequestStatus, insert_entry};

/// A budget period. Periods follow UTC calendar boundaries; weeks start on Monday.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Day,
    Week,
    Month,
    /// Never resets.
    Total,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
            Self::Total => "total",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            "month" => Some(Self::Month),
            "total" => Some(Self::Total),
            _ => None,
        }
    }

    /// The start of the period holding `now` (the Unix epoch for [`Period::Total`]).
    pub fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let midnight = now.date_naive().and_time(NaiveTime::MIN).and_utc();
        match self {
            Self::Day => midnight,
            Self::Week => midnight - TimeDelta::days(i64::from(now.weekday().num_days_from_monday())),
            Self::Month => midnight - TimeDelta::days(i64::from(now.day0())),
            Self::Total => DateTime::UNIX_EPOCH,
        }
    }

    /// When the period starting at `start` ends and the budget resets (`None` for [`Period::Total`]).
    pub fn end(self, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Day => Some(start + TimeDelta::days(1)),
            Self::Week => Some(start + TimeDelta::days(7)),
            Self::Month => start.checked_add_months(Months::new(1)),
            Self::Total => None,
        }
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits per period for a key or a project. Every limit is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub period: Period,
    /// The hard cap: a request whose worst case does not fit is refused. Stored rounded down to the
    /// nano-dollar.
    pub limit_usd: Option<Decimal>,
    /// Crossing this is reported ([`Settlement::crossed_soft_limit`]) but refuses nothing.
    pub soft_limit_usd: Option<Decimal>,
    /// At most this many images per period.
    pub image_quota: Option<u64>,
}

impl Budget {
    /// A hard cap per period, nothing else.
    pub fn capped(period: Period, limit_usd: Decimal) -> Self {
        Self { period, limit_usd: Some(limit_usd), soft_limit_usd: None, image_quota: None }
    }
}

/// Whose budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetOwner {
    Key(String),
    Project(String),
}

impl BudgetOwner {
    fn scope(&self) -> &'static str {
        match self {
            Self::Key(_) => "key",
            Self::Project(_) => "project",
        }
    }

    fn id(&self) -> &str {
        match self {
            Self::Key(id) | Self::Project(id) => id,
        }
    }
}

/// A budget and where it stands in the current period (or, in a [`Refusal`], at the refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetUsage {
    pub owner: BudgetOwner,
    pub budget: Budget,
    pub period_start: DateTime<Utc>,
    /// When this period ends and the counts start from zero (`None` for [`Period::Total`]).
    pub resets_at: Option<DateTime<Utc>>,
    /// Settled this period.
    pub spent_usd: Decimal,
    /// Held by reservations not yet settled.
    pub reserved_usd: Decimal,
    pub images_spent: u64,
    pub images_reserved: u64,
}

impl BudgetUsage {
    /// What can still be reserved: the cap less spent and reserved, never below zero; `None` when
    /// there is no cap.
    pub fn remaining_usd(&self) -> Option<Decimal> {
        self.budget.limit_usd.map(|limit| (limit - self.spent_usd - self.reserved_usd).max(Decimal::ZERO))
    }

    /// Images that can still be reserved this period; `None` when there is no quota.
    pub fn remaining_images(&self) -> Option<u64> {
        self.budget
            .image_quota
            .map(|quota| quota.saturating_sub(self.images_spent.saturating_add(self.images_reserved)))
    }
}

/// The answer to [`Ledger::reserve`].
#[derive(Debug)]
pub enum Reserve {
    Reserved(Reservation),
    /// Nothing was held. The server answers 429 `insufficient_quota`.
    Refused(Refusal),
}

/// Budget held for one request. Settle or release it exactly once (both take it by value); if the
/// process dies first, [`Ledger::release_expired`] frees it after [`Reservation::expires_at`].
#[derive(Debug)]
pub struct Reservation {
    pub id: String,
    pub request_id: String,
    pub key_id: String,
    pub project_id: Option<String>,
    /// The worst case held, as given (held rounded up to the nano-dollar).
    pub worst_case_usd: Decimal,
    pub images: u32,
    pub expires_at: DateTime<Utc>,
    /// Settled spending of the key or its project is at or past a soft threshold already.
    pub over_soft_limit: bool,
    amount_nanos: i64,
    holds: Vec<Hold>,
}

/// Why a reservation was refused, with the numbers for the error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The budget that did not have room (the key's is checked before the project's).
    pub usage: BudgetUsage,
    pub reason: RefusalReason,
    pub worst_case_usd: Decimal,
    pub images: u32,
}

impl Refusal {
    /// What was left of the budget that refused: USD for a cap, zero when only the quota applies.
    pub fn remaining_usd(&self) -> Decimal {
        self.usage.remaining_usd().unwrap_or(Decimal::ZERO)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The worst case does not fit under the hard cap.
    Budget,
    /// The images do not fit in the image quota.
    ImageQuota,
}

/// The answer to [`Ledger::settle`] and [`Ledger::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// What was charged (rounded half-up to the nano-dollar).
    pub charged_usd: Decimal,
    /// After this charge, the key's or project's spending is at or past a soft threshold.
    pub over_soft_limit: bool,
    /// This charge took it there (it was below before): the moment to warn.
    pub crossed_soft_limit: bool,
    /// The reservation had already been released as expired; the cost was charged anyway.
    pub reservation_expired: bool,
}

/// One `budget_usage` row a reservation holds money in.
#[derive(Debug, Clone)]
struct Hold {
    owner: BudgetOwner,
    period: Period,
    period_start_ms: i64,
    soft_nanos: Option<i64>,
}

/// Signed changes to one `budget_usage` row.
#[derive(Debug, Clone, Copy, Default)]
struct Delta {
    spent: i64,
    reserved: i64,
    images_spent: i64,
    images_reserved: i64,
}

impl Ledger {
    /// Holds `worst_case_usd` and `images` against the key's budget and its project's budget, all or
    /// nothing, in one transaction. A key without budgets (and without a project budget) is always
    /// reserved; the reservation still makes settle/release uniform.
    ///
    /// Errors with [`LedgerError::KeyNotFound`] or [`LedgerError::KeyRevoked`].
    pub async fn reserve(
        &self,
        key_id: &str,
        request_id: &str,
        worst_case_usd: Decimal,
        images: u32,
    ) -> Result<Reserve> {
        let amount = usd_to_nanos_ceil(worst_case_usd)?;
        let now = self.clock.now();
        let key = self.get_key(key_id).await?;
        if key.revoked_at.is_some() {
            return Err(LedgerError::KeyRevoked(key.id));
        }
        let project = match &key.project_id {
            Some(id) => Some(self.get_project(id).await?),
            None => None,
        };
        let budgets = [
            key.budget.map(|b| (BudgetOwner::Key(key.id.clone()), b)),
            project.and_then(|p| p.budget.map(|b| (BudgetOwner::Project(p.id), b))),
        ];

        let mut tx = self.begin().await?;
        let mut holds = Vec::new();
        let mut over_soft_limit = false;
        for (owner, budget) in budgets.into_iter().flatten() {
            let hold = Hold {
                owner,
                period: budget.period,
                period_start_ms: to_ms(budget.period.start(now)),
                soft_nanos: budget.soft_limit_usd.map(usd_to_nanos_floor).transpose()?,
            };
            let limit = budget.limit_usd.map(usd_to_nanos_floor).transpose()?;
            let quota = budget.image_quota.map(to_i64).transpose()?;
            ensure_usage_row(&mut tx, &hold).await?;
            let held = sqlx::query(
                "UPDATE budget_usage
                 SET reserved_nanos = reserved_nanos + $5, images_reserved = images_reserved + $6
                 WHERE scope = $1 AND scope_id = $2 AND period = $3 AND period_start_ms = $4
                   AND ($7 IS NULL OR spent_nanos + reserved_nanos + $5 <= $7)
                   AND ($8 IS NULL OR images_spent + images_reserved + $6 <= $8)
                 RETURNING spent_nanos",
            )
            .bind(hold.owner.scope())
            .bind(hold.owner.id())
            .bind(hold.period.as_str())
            .bind(hold.period_start_ms)
            .bind(amount)
            .bind(i64::from(images))
            .bind(limit)
            .bind(quota)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = held else {
                let counts = read_counts(&mut tx, &hold.owner, budget.period, hold.period_start_ms).await?;
                tx.rollback().await?;
                let over_cap = limit
                    .is_some_and(|limit| counts.spent.saturating_add(counts.reserved).saturating_add(amount) > limit);
                let reason = if over_cap { RefusalReason::Budget } else { RefusalReason::ImageQuota };
                let usage = counts.usage(hold.owner, budget, hold.period_start_ms)?;
                return Ok(Reserve::Refused(Refusal { usage, reason, worst_case_usd, images }));
            };
            let spent: i64 = row.try_get("spent_nanos")?;
            over_soft_limit |= hold.soft_nanos.is_some_and(|soft| spent >= soft);
            holds.push(hold);
        }

        let id = Uuid::now_v7().to_string();
        let expires_at = now + TimeDelta::milliseconds(self.reservation_ttl_ms);
        let (key_hold, project_hold) = split_holds(&holds);
        sqlx::query(
            "INSERT INTO reservations (id, request_id, key_id, key_period, key_period_start_ms,
                 project_id, project_period, project_period_start_ms, amount_nanos, images,
                 created_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&id)
        .bind(request_id)
        .bind(&key.id)
        .bind(key_hold.map(|h| h.period.as_str()))
        .bind(key_hold.map(|h| h.period_start_ms))
        .bind(key.project_id.as_deref())
        .bind(project_hold.map(|h| h.period.as_str()))
        .bind(project_hold.map(|h| h.period_start_ms))
        .bind(amount)
        .bind(i64::from(images))
        .bind(to_ms(now))
        .bind(to_ms(expires_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        Ok(Reserve::Reserved(Reservation {
            id,
            request_id: request_id.to_owned(),
            key_id: key.id,
            project_id: key.project_id,
            worst_case_usd,
            images,
            expires_at,
            over_soft_limit,
            amount_nanos: amount,
            holds,
        }))
    }

    /// Charges `actual_cost_usd` and `entry.n` images, gives back the rest of the hold and appends
    /// `entry` as a succeeded ledger row: one transaction.
    pub async fn settle(
        &self,
        reservation: Reservation,
        actual_cost_usd: Decimal,
        entry: &LedgerEntry,
    ) -> Result<Settlement> {
        let cost = usd_to_nanos_half_up(actual_cost_usd)?;
        self.finish(reservation, cost, entry.n, RequestStatus::Succeeded, entry).await
    }

    /// Gives back the whole hold and appends `entry` as a failed ledger row, charging `cost_usd`
    /// (pass zero unless the failure was billed, e.g. compute spent before a local error).
    pub async fn release(
        &self,
        reservation: Reservation,
        cost_usd: Decimal,
        entry: &LedgerEntry,
    ) -> Result<Settlement> {
        let cost = usd_to_nanos_half_up(cost_usd)?;
        self.finish(reservation, cost, 0, RequestStatus::Failed, entry).await
    }

    async fn finish(
        &self,
        reservation: Reservation,
        cost: i64,
        images: u32,
        status: RequestStatus,
        entry: &LedgerEntry,
    ) -> Result<Settlement> {
        let mut tx = self.begin().await?;
        let deleted = sqlx::query("DELETE FROM reservations WHERE id = $1")
            .bind(&reservation.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let still_held = deleted == 1;
        let delta = Delta {
            spent: cost,
            reserved: if still_held { -reservation.amount_nanos } else { 0 },
            images_spent: i64::from(images),
            images_reserved: if still_held { -i64::from(reservation.images) } else { 0 },
        };
        let mut settlement = Settlement {
            charged_usd: nanos_to_usd(cost),
            over_soft_limit: false,
            crossed_soft_limit: false,
            reservation_expired: !still_held,
        };
        for hold in &reservation.holds {
            let spent_after = apply(&mut tx, hold, delta).await?;
            if let Some(soft) = hold.soft_nanos {
                settlement.over_soft_limit |= spent_after >= soft;
                settlement.crossed_soft_limit |= spent_after >= soft && spent_after - cost < soft;
            }
        }
        insert_entry(&mut tx, Some(&reservation.key_id), reservation.project_id.as_deref(), status, cost, entry)
            .await?;
        tx.commit().await?;
        if !still_held {
            tracing::warn!(
                reservation = %reservation.id,
                request_id = %reservation.request_id,
                "settled a reservation that had expired: its hold was already released"
            );
        }
        Ok(settlement)
    }

    /// Frees every reservation that expired at or before `now` (its process is presumed dead), and
    /// prunes stale rate-limit windows and idempotency entries. Returns how many reservations were
    /// freed. Runs on connect; the server runs it every minute or so. Safe to run from several
    /// instances at once: each reservation is released by whoever deletes it.
    pub async fn release_expired(&self, now: DateTime<Utc>) -> Result<u64> {
        let now_ms = to_ms(now);
        let expired: Vec<String> = sqlx::query_scalar("SELECT id FROM reservations WHERE expires_at_ms <= $1")
            .bind(now_ms)
            .fetch_all(&self.pool)
            .await?;
        let mut released = 0;
        // One transaction per reservation keeps the key-then-project lock order (no deadlocks).
        for id in expired {
            let mut tx = self.begin().await?;
            let row = sqlx::query(
                "DELETE FROM reservations WHERE id = $1 AND expires_at_ms <= $2
                 RETURNING request_id, key_id, key_period, key_period_start_ms,
                     project_id, project_period, project_period_start_ms, amount_nanos, images",
            )
            .bind(&id)
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { continue };
            let delta = Delta {
                reserved: -row.try_get::<i64, _>("amount_nanos")?,
                images_reserved: -row.try_get::<i64, _>("images")?,
                ..Delta::default()
            };
            for hold in holds_from_row(&row)? {
                apply(&mut tx, &hold, delta).await?;
            }
            tx.commit().await?;
            released += 1;
            let request_id: String = row.try_get("request_id")?;
            tracing::warn!(reservation = %id, request_id = %request_id, "released an expired reservation");
        }
        self.prune(now_ms).await?;
        Ok(released)
    }

    /// Where the key's budget stands this period; `None` when the key has no budget.
    pub async fn key_budget_usage(&self, key_id: &str) -> Result<Option<BudgetUsage>> {
        let key = self.get_key(key_id).await?;
        self.budget_usage(BudgetOwner::Key(key.id), key.budget).await
    }

    /// Where the project's budget stands this period; `None` when the project has no budget.
    pub async fn project_budget_usage(&self, project_id: &str) -> Result<Option<BudgetUsage>> {
        let project = self.get_project(project_id).await?;
        self.budget_usage(BudgetOwner::Project(project.id), project.budget).await
    }

    async fn budget_usage(&self, owner: BudgetOwner, budget: Option<Budget>) -> Result<Option<BudgetUsage>> {
        let Some(budget) = budget else { return Ok(None) };
        let start = to_ms(budget.period.start(self.clock.now()));
        let mut conn = self.pool.acquire().await?;
        let counts = read_counts(&mut conn, &owner, budget.period, start).await?;
        counts.usage(owner, budget, start).map(Some)
    }
}

async fn ensure_usage_row(conn: &mut AnyConnection, hold: &Hold) -> Result<()> {
    sqlx::query(
        "INSERT INTO budget_usage (scope, scope_id, period, period_start_ms) VALUES ($1, $2, $3, $4)
         ON CONFLICT (scope, scope_id, period, period_start_ms) DO NOTHING",
    )
    .bind(hold.owner.scope())
    .bind(hold.owner.id())
    .bind(hold.period.as_str())
    .bind(hold.period_start_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Applies `delta` to the hold's row (creating it if it is somehow missing) and returns the spent
/// total after it.
async fn apply(conn: &mut AnyConnection, hold: &Hold, delta: Delta) -> Result<i64> {
    ensure_usage_row(conn, hold).await?;
    let spent = sqlx::query_scalar(
        "UPDATE budget_usage
         SET spent_nanos = spent_nanos + $5, reserved_nanos = reserved_nanos + $6,
             images_spent = images_spent + $7, images_reserved = images_reserved + $8
         WHERE scope = $1 AND scope_id = $2 AND period = $3 AND period_start_ms = $4
         RETURNING spent_nanos",
    )
    .bind(hold.owner.scope())
    .bind(hold.owner.id())
    .bind(hold.period.as_str())
    .bind(hold.period_start_ms)
    .bind(delta.spent)
    .bind(delta.reserved)
    .bind(delta.images_spent)
    .bind(delta.images_reserved)
    .fetch_one(conn)
    .await?;
    Ok(spent)
}

/// A `budget_usage` row as stored (nano-USD); all zero when the row does not exist yet.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    spent: i64,
    reserved: i64,
    images_spent: i64,
    images_reserved: i64,
}

impl Counts {
    fn usage(self, owner: BudgetOwner, budget: Budget, period_start_ms: i64) -> Result<BudgetUsage> {
        let period_start = from_ms(period_start_ms)?;
        Ok(BudgetUsage {
            owner,
            resets_at: budget.period.end(period_start),
            budget,
            period_start,
            spent_usd: nanos_to_usd(self.spent),
            reserved_usd: nanos_to_usd(self.reserved),
            images_spent: to_u64(self.images_spent)?,
            images_reserved: to_u64(self.images_reserved)?,
        })
    }
}

async fn read_counts(
    conn: &mut AnyConnection,
    owner: &BudgetOwner,
    period: Period,
    period_start_ms: i64,
) -> Result<Counts> {
    let row = sqlx::query(
        "SELECT spent_nanos, reserved_nanos, images_spent, images_reserved FROM budget_usage
         WHERE scope = $1 AND scope_id = $2 AND period = $3 AND period_start_ms = $4",
    )
    .bind(owner.scope())
    .bind(owner.id())
    .bind(period.as_str())
    .bind(period_start_ms)
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else { return Ok(Counts::default()) };
    Ok(Counts {
        spent: row.try_get("spent_nanos")?,
        reserved: row.try_get("reserved_nanos")?,
        images_spent: row.try_get("images_spent")?,
        images_reserved: row.try_get("images_reserved")?,
    })
}

fn split_holds(holds: &[Hold]) -> (Option<&Hold>, Option<&Hold>) {
    let key = holds.iter().find(|h| matches!(h.owner, BudgetOwner::Key(_)));
    let project = holds.iter().find(|h| matches!(h.owner, BudgetOwner::Project(_)));
    (key, project)
}

/// The holds a stored reservation names, key first (the lock order).
fn holds_from_row(row: &AnyRow) -> Result<Vec<Hold>> {
    let mut holds = Vec::new();
    for (owner_column, period_column, start_column, owner) in [
        ("key_id", "key_period", "key_period_start_ms", BudgetOwner::Key as fn(String) -> BudgetOwner),
        ("project_id", "project_period", "project_period_start_ms", BudgetOwner::Project),
    ] {
        let id: Option<String> = row.try_get(owner_column)?;
        let period: Option<String> = row.try_get(period_column)?;
        let start: Option<i64> = row.try_get(start_column)?;
        if let (Some(id), Some(period), Some(period_start_ms)) = (id, period, start) {
            let period =
                Period::parse(&period).ok_or_else(|| LedgerError::Corrupt(format!("budget period {period:?}")))?;
            holds.push(Hold { owner: owner(id), period, period_start_ms, soft_nanos: None });
        }
    }
    Ok(holds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn period_boundaries() {
        // 2025-03-05 is a Wednesday.
        let now = at("2025-03-05T17:30:00Z");
        let cases = [
            (Period::Day, "2025-03-05T00:00:00Z", Some("2025-03-06T00:00:00Z")),
            (Period::Week, "2025-03-03T00:00:00Z", Some("2025-03-10T00:00:00Z")),
            (Period::Month, "2025-03-01T00:00:00Z", Some("2025-04-01T00:00:00Z")),
            (Period::Total, "1970-01-01T00:00:00Z", None),
        ];
        for (period, start, end) in cases {
            assert_eq!(period.start(now), at(start), "{period} start");
            assert_eq!(period.end(period.start(now)), end.map(at), "{period} end");
        }
    }

    #[test]
    fn period_edges() {
        // The first instant of a period belongs to it; the last instant before does not.
        assert_eq!(Period::Day.start(at("2025-03-06T00:00:00Z")), at("2025-03-06T00:00:00Z"));
        assert_eq!(Period::Day.start(at("2025-03-05T23:59:59.999Z")), at("2025-03-05T00:00:00Z"));
        // Monday belongs to its own week, Sunday to the one before.
        assert_eq!(Period::Week.start(at("2025-03-10T00:00:00Z")), at("2025-03-10T00:00:00Z"));
        assert_eq!(Period::Week.start(at("2025-03-09T23:59:59Z")), at("2025-03-03T00:00:00Z"));
        // Months of every length, leap February, and the year's turn.
        assert_eq!(Period::Month.end(at("2024-02-01T00:00:00Z")), Some(at("2024-03-01T00:00:00Z")));
        assert_eq!(Period::Month.start(at("2024-02-29T12:00:00Z")), at("2024-02-01T00:00:00Z"));
        assert_eq!(Period::Month.end(at("2024-12-01T00:00:00Z")), Some(at("2025-01-01T00:00:00Z")));
        assert_eq!(Period::Week.start(at("2025-01-01T08:00:00Z")), at("2024-12-30T00:00:00Z"));
    }

    #[test]
    fn period_names_round_trip() {
        for period in [Period::Day, Period::Week, Period::Month, Period::Total] {
            assert_eq!(Period::parse(period.as_str()), Some(period));
        }
        assert_eq!(Period::parse("year"), None);
    }
}
