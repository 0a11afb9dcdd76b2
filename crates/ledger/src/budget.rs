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
//!   `spent + reserved <= cap` holds always: a request is never charged more than its hold (a cost
//!   priced above it is charged the hold, and the server's row says `capped`). Caps are read just before the transaction, so a cap an admin changes applies from
//!   the next reserve (one already under way uses the value it read).
//! - **Settle once.** Settling or releasing deletes the reservation row in the same transaction that
//!   moves the money; whoever deletes it (settle, release, or [`Ledger::release_expired`]) is the one
//!   that gives the hold back.
//! - **Charge as it goes.** [`Ledger::charge`] moves part of a hold to spent while the request still
//!   runs (each image a stream delivers), so a request whose instance dies has paid for what it
//!   delivered; the final settle charges the rest, never more than the hold in all.
//! - **A live hold never expires.** Each hold carries its instance's id, and [`Ledger::heartbeat`]
//!   renews all of them (and their in-flight idempotency entries); only the holds of an instance that
//!   stopped renewing expire. The sweep that frees one writes its request's ledger row (`failed`,
//!   `instance_died`, what it had charged) and forgets its idempotency entry. Should a request finish
//!   after its hold was swept anyway (an instance paused longer than the TTL), it is charged only what
//!   still fits under every cap (`hold_expired`): the budget is never overrun.
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
use crate::idempotency::Completion;
use crate::keys::{ApiKey, Project};
use crate::money::{nanos_to_usd, usd_to_nanos_ceil, usd_to_nanos_floor, usd_to_nanos_half_up};
use crate::usage::{CostSource, LedgerEntry, RequestStatus, TokenUsage, insert_entry};

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

/// Budget held for one request. Settle or release it exactly once (both take it by value). While its
/// instance lives, [`Ledger::heartbeat`] keeps the hold from expiring; if the instance dies,
/// [`Ledger::release_expired`] frees it after the reservation TTL and writes the request's ledger row.
#[derive(Debug)]
pub struct Reservation {
    pub id: String,
    pub request_id: String,
    pub key_id: String,
    pub project_id: Option<String>,
    /// The worst case held, as given (held rounded up to the nano-dollar).
    pub worst_case_usd: Decimal,
    pub images: u32,
    /// When the hold expires unless a heartbeat renews it.
    pub expires_at: DateTime<Utc>,
    /// Settled spending of the key or its project is at or past a soft threshold already.
    pub over_soft_limit: bool,
    amount_nanos: i64,
    holds: Vec<Hold>,
    /// Charged through [`Ledger::charge`] while the hold existed (moved from the hold to spent).
    charged_nanos: i64,
    images_charged: u32,
    /// Charged after the hold had been swept (each charge only where it fit under the caps).
    charged_after_expiry_nanos: i64,
    /// The hold was found swept: later charges and the final row say so.
    expired: bool,
}

impl Reservation {
    /// What this request has been charged so far.
    pub fn charged_usd(&self) -> Decimal {
        nanos_to_usd(self.charged_nanos.saturating_add(self.charged_after_expiry_nanos))
    }

    /// What is still held: the worst case less what was charged against it.
    pub fn remaining_usd(&self) -> Decimal {
        nanos_to_usd((self.amount_nanos - self.charged_nanos).max(0))
    }
}

/// What a held request is: recorded with its reservation, so that the sweep that frees the hold of a
/// dead instance can write the request's ledger row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldRequest {
    pub request_id: String,
    pub operation: String,
    /// The model that runs and is billed.
    pub model: String,
    /// The model the client named, when another one runs (a shut-down model's replacement).
    pub requested_model: Option<String>,
    pub provider: String,
    pub tier: String,
    pub billing_basis: String,
    /// The request's `Idempotency-Key`: its in-flight entry lives as long as the hold and is forgotten
    /// when a sweep frees it, so a retry after a crash runs again.
    pub idempotency_key: Option<String>,
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
    /// The hard cap and image quota read when the hold was taken (for charges after it was swept).
    limit_nanos: Option<i64>,
    quota: Option<i64>,
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
    /// reserved; the reservation still makes settle/release uniform. See [`Ledger::reserve_request`].
    pub async fn reserve(
        &self,
        key_id: &str,
        request_id: &str,
        worst_case_usd: Decimal,
        images: u32,
    ) -> Result<Reserve> {
        let request = HeldRequest { request_id: request_id.to_owned(), ..HeldRequest::default() };
        self.reserve_request(key_id, &request, worst_case_usd, images).await
    }

    /// [`Ledger::reserve`] for `request`, which is recorded with the hold: this instance's
    /// [`Ledger::heartbeat`] keeps it alive, and if the instance dies the sweep that frees it writes
    /// the request's ledger row (`failed`, `instance_died`, with what it had charged).
    ///
    /// Errors with [`LedgerError::KeyNotFound`] or [`LedgerError::KeyRevoked`].
    pub async fn reserve_request(
        &self,
        key_id: &str,
        request: &HeldRequest,
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
                limit_nanos: budget.limit_usd.map(usd_to_nanos_floor).transpose()?,
                quota: budget.image_quota.map(to_i64).transpose()?,
            };
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
            .bind(hold.limit_nanos)
            .bind(hold.quota)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = held else {
                let counts = read_counts(&mut tx, &hold.owner, budget.period, hold.period_start_ms).await?;
                tx.rollback().await?;
                let over_cap = hold
                    .limit_nanos
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
                 created_at_ms, expires_at_ms, instance_id, operation, model, provider, tier, billing_basis,
                 idempotency_key, requested_model)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
        )
        .bind(&id)
        .bind(&request.request_id)
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
        .bind(&*self.instance_id)
        .bind(&request.operation)
        .bind(&request.model)
        .bind(&request.provider)
        .bind(&request.tier)
        .bind(&request.billing_basis)
        .bind(request.idempotency_key.as_deref())
        .bind(request.requested_model.as_deref())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        Ok(Reserve::Reserved(Reservation {
            id,
            request_id: request.request_id.clone(),
            key_id: key.id,
            project_id: key.project_id,
            worst_case_usd,
            images,
            expires_at,
            over_soft_limit,
            amount_nanos: amount,
            holds,
            charged_nanos: 0,
            images_charged: 0,
            charged_after_expiry_nanos: 0,
            expired: false,
        }))
    }

    /// Charges `cost_usd` and `images` of a request that is still running (a stream's completed image):
    /// moved from its hold to spent at once, so that nothing delivered is free even if this instance
    /// dies before the request finishes. Never more than what is left of the hold; if the hold was
    /// swept meanwhile, only what still fits under every cap. Returns what was charged.
    pub async fn charge(&self, reservation: &mut Reservation, cost_usd: Decimal, images: u32) -> Result<Decimal> {
        // Never more than the hold in all: what was charged after it expired counts too (two charges
        // after a sweep must not each take the whole rest of the hold).
        let left = reservation.amount_nanos - reservation.charged_nanos - reservation.charged_after_expiry_nanos;
        let wanted = usd_to_nanos_half_up(cost_usd)?.min(left.max(0));
        let images = images.min(reservation.images.saturating_sub(reservation.images_charged));
        for _ in 0..CONFLICT_RETRIES {
            let mut tx = self.begin().await?;
            if !reservation.expired {
                let updated = sqlx::query(
                    "UPDATE reservations SET charged_nanos = charged_nanos + $2, images_charged = images_charged + $3
                     WHERE id = $1",
                )
                .bind(&reservation.id)
                .bind(wanted)
                .bind(i64::from(images))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if updated == 1 {
                    let images = i64::from(images);
                    let delta =
                        Delta { spent: wanted, reserved: -wanted, images_spent: images, images_reserved: -images };
                    for hold in &reservation.holds {
                        apply(&mut tx, hold, delta).await?;
                    }
                    tx.commit().await?;
                    reservation.charged_nanos += wanted;
                    reservation.images_charged += images as u32;
                    return Ok(nanos_to_usd(wanted));
                }
                reservation.expired = true;
            }
            let Some((charged, _)) = charge_beyond_hold(&mut tx, &reservation.holds, wanted, images).await? else {
                tx.rollback().await?;
                continue;
            };
            tx.commit().await?;
            reservation.charged_after_expiry_nanos += charged;
            return Ok(nanos_to_usd(charged));
        }
        Ok(Decimal::ZERO)
    }

    /// Charges `actual_cost_usd` in all (what [`Ledger::charge`] took so far included) and `entry.n`
    /// images, gives back the rest of the hold and appends `entry` as a succeeded ledger row: one
    /// transaction.
    pub async fn settle(
        &self,
        reservation: Reservation,
        actual_cost_usd: Decimal,
        entry: &LedgerEntry,
    ) -> Result<Settlement> {
        self.finish(reservation, actual_cost_usd, entry.n, RequestStatus::Succeeded, entry, None).await
    }

    /// [`Ledger::settle`], storing the response of the request's `Idempotency-Key` in the same
    /// transaction ([`Ledger::complete_idempotent`]): a retry after any crash either finds the request
    /// charged and its response stored, or neither, so it never runs and is charged twice.
    pub async fn settle_and_store(
        &self,
        reservation: Reservation,
        actual_cost_usd: Decimal,
        entry: &LedgerEntry,
        completion: &Completion<'_>,
    ) -> Result<Settlement> {
        self.finish(reservation, actual_cost_usd, entry.n, RequestStatus::Succeeded, entry, Some(completion)).await
    }

    /// Gives back what is left of the hold and appends `entry` as a failed ledger row, charging
    /// `cost_usd` in all (what [`Ledger::charge`] took so far included; pass what was delivered or
    /// incurred, zero when nothing was) and `entry.n` images.
    pub async fn release(
        &self,
        reservation: Reservation,
        cost_usd: Decimal,
        entry: &LedgerEntry,
    ) -> Result<Settlement> {
        self.finish(reservation, cost_usd, entry.n, RequestStatus::Failed, entry, None).await
    }

    /// Ends a request: charges up to `total_usd` in all, never more than its hold; if the hold was
    /// swept (its instance looked dead), only what fits under every cap, and the row says
    /// `hold_expired`. A budget is never overrun either way.
    async fn finish(
        &self,
        mut reservation: Reservation,
        total_usd: Decimal,
        images: u32,
        status: RequestStatus,
        entry: &LedgerEntry,
        completion: Option<&Completion<'_>>,
    ) -> Result<Settlement> {
        let total = usd_to_nanos_half_up(total_usd)?.min(reservation.amount_nanos);
        let images = images.min(reservation.images);
        for attempt in 0..=CONFLICT_RETRIES {
            let mut tx = self.begin().await?;
            let deleted = if reservation.expired {
                None
            } else {
                sqlx::query_scalar::<_, i64>("DELETE FROM reservations WHERE id = $1 RETURNING charged_nanos")
                    .bind(&reservation.id)
                    .fetch_optional(&mut *tx)
                    .await?
            };
            let (row_cost, charged_now) = match deleted {
                Some(_) => {
                    let r = &reservation;
                    let extra = (total - r.charged_nanos).max(0);
                    let delta = Delta {
                        spent: extra,
                        reserved: -(r.amount_nanos - r.charged_nanos),
                        images_spent: i64::from(images.saturating_sub(r.images_charged)),
                        images_reserved: -i64::from(r.images - r.images_charged),
                    };
                    for hold in &r.holds {
                        apply(&mut tx, hold, delta).await?;
                    }
                    (r.charged_nanos + extra, extra)
                }
                None => {
                    reservation.expired = true;
                    let r = &reservation;
                    let wanted = (total - r.charged_nanos - r.charged_after_expiry_nanos).max(0);
                    let more_images = images.saturating_sub(r.images_charged);
                    // Out of conflicts: charge nothing more rather than risk passing a cap.
                    let (wanted, more_images) =
                        if attempt == CONFLICT_RETRIES { (0, 0) } else { (wanted, more_images) };
                    match charge_beyond_hold(&mut tx, &r.holds, wanted, more_images).await? {
                        Some((charged, _)) => (r.charged_after_expiry_nanos + charged, charged),
                        None => {
                            tx.rollback().await?;
                            continue;
                        }
                    }
                }
            };
            let expired = reservation.expired;
            let mut entry = entry.clone();
            if expired {
                tracing::warn!(
                    reservation = %reservation.id,
                    request_id = %reservation.request_id,
                    "a request finished after its hold was swept; charged only what fit under the caps"
                );
                entry.error_code.get_or_insert_with(|| "hold_expired".to_owned());
            }
            let mut settlement = Settlement {
                charged_usd: nanos_to_usd(
                    reservation.charged_nanos + reservation.charged_after_expiry_nanos + charged_now,
                ),
                over_soft_limit: false,
                crossed_soft_limit: false,
                reservation_expired: expired,
            };
            for hold in &reservation.holds {
                if let Some(soft) = hold.soft_nanos {
                    let spent_after = read_counts(&mut tx, &hold.owner, hold.period, hold.period_start_ms).await?.spent;
                    settlement.over_soft_limit |= spent_after >= soft;
                    settlement.crossed_soft_limit |= spent_after >= soft && spent_after - charged_now < soft;
                }
            }
            insert_entry(
                &mut tx,
                Some(&reservation.key_id),
                reservation.project_id.as_deref(),
                status,
                row_cost,
                &entry,
            )
            .await?;
            if let Some(c) = completion {
                self.store_idempotent(&mut tx, c).await?;
            }
            tx.commit().await?;
            return Ok(settlement);
        }
        Err(LedgerError::InvalidArgument("the budget rows kept changing; the request could not be finished".into()))
    }

    /// Renews the holds of every request this instance is running (and their in-flight idempotency
    /// entries) for another reservation TTL. The server calls it well within the TTL, so a live
    /// request's hold never expires; holds of an instance that stopped calling it (it died) expire
    /// and [`Ledger::release_expired`] frees them. Returns how many holds were renewed.
    pub async fn heartbeat(&self) -> Result<u64> {
        let expires_ms = to_ms(self.clock.now()) + self.reservation_ttl_ms;
        let renewed = sqlx::query("UPDATE reservations SET expires_at_ms = $2 WHERE instance_id = $1")
            .bind(&*self.instance_id)
            .bind(expires_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if renewed > 0 {
            sqlx::query(
                "UPDATE idempotency SET expires_at_ms = $2
                 WHERE state = 'in_flight' AND expires_at_ms < $2 AND EXISTS (
                     SELECT 1 FROM reservations r WHERE r.instance_id = $1
                       AND r.key_id = idempotency.key_id AND r.idempotency_key = idempotency.idempotency_key)",
            )
            .bind(&*self.instance_id)
            .bind(expires_ms)
            .execute(&self.pool)
            .await?;
        }
        self.renew_line_claims(expires_ms).await?;
        Ok(renewed)
    }

    /// Frees every reservation that expired at or before `now` (its instance stopped renewing it: it
    /// died), writes the ledger row of its request (`failed`, `instance_died`, charged what it had
    /// charged), forgets its in-flight idempotency entry so a retry runs again, and prunes stale
    /// rate-limit windows and idempotency entries. Returns how many reservations were freed. Runs on
    /// connect; the server runs it with every heartbeat. Safe to run from several instances at once:
    /// each reservation is released by whoever deletes it.
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
                     project_id, project_period, project_period_start_ms, amount_nanos, images,
                     charged_nanos, images_charged, created_at_ms, operation, model, provider, tier,
                     billing_basis, idempotency_key, requested_model",
            )
            .bind(&id)
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { continue };
            let charged: i64 = row.try_get("charged_nanos")?;
            let images_charged: i64 = row.try_get("images_charged")?;
            let delta = Delta {
                reserved: -(row.try_get::<i64, _>("amount_nanos")? - charged),
                images_reserved: -(row.try_get::<i64, _>("images")? - images_charged),
                ..Delta::default()
            };
            for hold in holds_from_row(&row)? {
                apply(&mut tx, &hold, delta).await?;
            }
            let key_id: String = row.try_get("key_id")?;
            let project_id: Option<String> = row.try_get("project_id")?;
            let request_id: String = row.try_get("request_id")?;
            let operation: String = row.try_get("operation")?;
            // Holds taken before requests were recorded with them have nothing to write a row from.
            if !operation.is_empty() {
                let created_at = from_ms(row.try_get("created_at_ms")?)?;
                let entry = LedgerEntry {
                    request_id: request_id.clone(),
                    operation,
                    model: row.try_get("model")?,
                    requested_model: row.try_get("requested_model")?,
                    provider: row.try_get("provider")?,
                    tier: row.try_get("tier")?,
                    quality: None,
                    size: None,
                    n: u32::try_from(images_charged).unwrap_or(u32::MAX),
                    tokens: TokenUsage::default(),
                    cost_breakdown: None,
                    billing_basis: row.try_get("billing_basis")?,
                    error_code: Some("instance_died".to_owned()),
                    cost_source: Some(if charged > 0 { CostSource::Priced } else { CostSource::None }),
                    latency_ms: u64::try_from(now_ms - to_ms(created_at)).unwrap_or(0),
                    created_at,
                    finished_at: now,
                };
                insert_entry(&mut tx, Some(&key_id), project_id.as_deref(), RequestStatus::Failed, charged, &entry)
                    .await?;
            }
            let idempotency_key: Option<String> = row.try_get("idempotency_key")?;
            if let Some(idem) = idempotency_key {
                sqlx::query(
                    "DELETE FROM idempotency WHERE key_id = $1 AND idempotency_key = $2 AND state = 'in_flight'",
                )
                .bind(&key_id)
                .bind(&idem)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            released += 1;
            tracing::warn!(reservation = %id, request_id = %request_id, "released the hold of a request whose instance died");
        }
        self.prune(now_ms).await?;
        Ok(released)
    }

    /// Where the key's budget stands this period; `None` when the key has no budget.
    pub async fn key_budget_usage(&self, key_id: &str) -> Result<Option<BudgetUsage>> {
        self.usage_of_key(&self.get_key(key_id).await?).await
    }

    /// [`Ledger::key_budget_usage`] of a key already read.
    pub async fn usage_of_key(&self, key: &ApiKey) -> Result<Option<BudgetUsage>> {
        self.budget_usage(BudgetOwner::Key(key.id.clone()), key.budget.clone()).await
    }

    /// Where the project's budget stands this period; `None` when the project has no budget.
    pub async fn project_budget_usage(&self, project_id: &str) -> Result<Option<BudgetUsage>> {
        self.usage_of_project(&self.get_project(project_id).await?).await
    }

    /// [`Ledger::project_budget_usage`] of a project already read.
    pub async fn usage_of_project(&self, project: &Project) -> Result<Option<BudgetUsage>> {
        self.budget_usage(BudgetOwner::Project(project.id.clone()), project.budget.clone()).await
    }

    async fn budget_usage(&self, owner: BudgetOwner, budget: Option<Budget>) -> Result<Option<BudgetUsage>> {
        let Some(budget) = budget else { return Ok(None) };
        let start = to_ms(budget.period.start(self.clock.now()));
        let mut conn = self.pool.acquire().await?;
        let counts = read_counts(&mut conn, &owner, budget.period, start).await?;
        counts.usage(owner, budget, start).map(Some)
    }
}

/// How many times a charge outside a hold is retried when a concurrent writer changed a budget row
/// between reading its room and taking it (PostgreSQL; SQLite serializes writers).
const CONFLICT_RETRIES: usize = 3;

/// Charges up to `wanted` nano-USD and `images` against `holds`' rows when the request no longer has a
/// hold there (it was swept): only what fits under every cap and quota right now, so that a budget is
/// never overrun. Returns what was charged, or `None` when a row changed between the read and the
/// conditional update (roll back and retry).
async fn charge_beyond_hold(
    conn: &mut AnyConnection,
    holds: &[Hold],
    wanted: i64,
    images: u32,
) -> Result<Option<(i64, i64)>> {
    let (mut cost, mut images) = (wanted, i64::from(images));
    for hold in holds {
        let counts = read_counts(conn, &hold.owner, hold.period, hold.period_start_ms).await?;
        if let Some(limit) = hold.limit_nanos {
            cost = cost.min(limit.saturating_sub(counts.spent.saturating_add(counts.reserved)).max(0));
        }
        if let Some(quota) = hold.quota {
            images =
                images.min(quota.saturating_sub(counts.images_spent.saturating_add(counts.images_reserved)).max(0));
        }
    }
    for hold in holds {
        ensure_usage_row(conn, hold).await?;
        let updated = sqlx::query(
            "UPDATE budget_usage SET spent_nanos = spent_nanos + $5, images_spent = images_spent + $6
             WHERE scope = $1 AND scope_id = $2 AND period = $3 AND period_start_ms = $4
               AND ($7 IS NULL OR spent_nanos + reserved_nanos + $5 <= $7)
               AND ($8 IS NULL OR images_spent + images_reserved + $6 <= $8)",
        )
        .bind(hold.owner.scope())
        .bind(hold.owner.id())
        .bind(hold.period.as_str())
        .bind(hold.period_start_ms)
        .bind(cost)
        .bind(images)
        .bind(hold.limit_nanos)
        .bind(hold.quota)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if updated == 0 {
            return Ok(None);
        }
    }
    Ok(Some((cost, images)))
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
            holds.push(Hold {
                owner: owner(id),
                period,
                period_start_ms,
                soft_nanos: None,
                limit_nanos: None,
                quota: None,
            });
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
