//! Money and limits around one request, on the ledger: the caller's key, its model list and rate
//! limits, idempotent retries, the worst case held against its budgets before any provider runs, and
//! the settlement with one ledger row after.
//!
//! The protocol (the `ledger` crate makes each step atomic, on SQLite and PostgreSQL):
//! 1. [`admit`]: the model must be one the key may use; the rate limit counts the request; an
//!    `Idempotency-Key` seen before replays its stored response (or is a 409 while in flight).
//! 2. [`Admission::reserve`]: the request's worst case ([`crate::billing::worst_case`]) is reserved
//!    against the key's and its project's budgets, or the request is refused with 429
//!    `insufficient_quota` before any provider is called. The hold lives as long as this instance's
//!    heartbeat ([`ledger::Ledger::heartbeat`], run by [`crate::AppState::with_ledger`]'s upkeep).
//! 3. While it runs, [`Ticket::charge`] charges what a stream has produced, image by image; then
//!    [`Ticket::finish`] charges the rest of the request's cost (never more than the hold in all: a
//!    budget is never overrun) and writes its one ledger row. The caller decides the cost: what was
//!    delivered, or for a request whose client went away what the provider incurred. A ticket dropped
//!    unfinished (a bug or a shutdown) releases its hold with what it had charged, and a process that
//!    dies leaves a hold that another instance's sweep finishes ([`ledger::Ledger::release_expired`]).
//!
//! Requests without a key (the loopback mode with no keys) are recorded too, with no key and no hold.

use std::time::Instant;

use api::ApiError;
use axum::http::HeaderMap;
use ledger::{
    ApiKey, CostSource, HeldRequest, Idempotency, Ledger, LedgerEntry, RateLimit, RequestStatus, Reservation, Reserve,
    StoredResponse, TokenUsage,
};
use pricing::Cost;
use rust_decimal::Decimal;

/// The authenticated caller, put in the request's extensions by [`crate::auth::require_key`].
#[derive(Debug, Clone)]
pub struct Caller(pub ApiKey);

/// The header that makes a retry safe.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Set on a response replayed for a repeated `Idempotency-Key`.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// On a replayed response: the request that ran (and was charged), when known.
pub const REPLAY_OF_HEADER: &str = "x-imagegate-replay-of";
/// Set when spending has passed the key's (or project's) soft budget.
pub const BUDGET_WARNING_HEADER: &str = "x-imagegate-budget-warning";
/// Responses larger than this are stored for idempotent replay without their images.
const MAX_STORED_RESPONSE: usize = 16 << 20;

/// What is stored for a succeeded request whose response cannot be replayed (streamed, or larger than
/// [`MAX_STORED_RESPONSE`]): a retry is told so with a 409 instead of getting a 200 without images.
#[derive(serde::Serialize, serde::Deserialize)]
struct NotStored {
    /// Why the response was not stored.
    imagegate_not_stored: String,
    /// The request that succeeded and was charged.
    request_id: String,
}

impl NotStored {
    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The marker, if `stored` is one (a real response has no `imagegate_not_stored` field).
    fn parse(stored: &str) -> Option<Self> {
        if stored.len() > 1024 {
            return None;
        }
        serde_json::from_str(stored).ok()
    }
}

/// The answer to a retry whose earlier request succeeded: its stored response, or a 409 saying that
/// the response was delivered once and not kept (it is not run, nor charged, again).
fn replay(idem: &str, stored: &StoredResponse) -> Result<(), ApiError> {
    let Some(note) = NotStored::parse(&stored.body) else { return Ok(()) };
    let cost = stored.cost_usd.as_deref().map(|c| format!(" and was charged ${c}")).unwrap_or_default();
    Err(ApiError::new(
        409,
        "invalid_request_error",
        Some(IDEMPOTENCY_HEADER),
        Some("idempotent_response_not_stored"),
        format!(
            "The request with the Idempotency-Key '{idem}' already succeeded (request {}){cost}; its response was {}, so it cannot be replayed. It is not run again: use a new Idempotency-Key to generate new images.",
            note.request_id, note.imagegate_not_stored
        ),
    ))
}

/// What is known of a request before it runs, for its ledger row.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub request_id: String,
    /// `generation` or `edit`.
    pub operation: &'static str,
    /// The model that runs (its provider's name for it).
    pub model: String,
    /// The model name the client asked for (what key model lists name).
    pub requested_model: String,
    pub provider: String,
    pub n: u32,
    /// How the model is billed (`tokens`, `per_image`, ...): recorded on every row, also refused ones.
    pub billing_basis: &'static str,
    /// The tier it runs and is billed at.
    pub tier: domain::Tier,
}

/// A request that passed [`admit`]: go on to [`Admission::reserve`].
pub struct Admission {
    ledger: Ledger,
    metrics: crate::metrics::Metrics,
    key: Option<ApiKey>,
    idempotency_key: Option<String>,
    info: RequestInfo,
    started: Instant,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// What [`admit`] decided.
pub enum Admit {
    Go(Box<Admission>),
    /// The stored response of an earlier request with the same `Idempotency-Key`.
    Replay(StoredResponse),
}

/// A held worst case, to charge as the request runs and finish once.
pub struct Ticket {
    admission: Box<Admission>,
    reservation: Option<Reservation>,
    /// The worst case held (priced before the provider ran).
    worst: Cost,
    /// Charged so far by [`Ticket::charge`].
    charged: Decimal,
    images_charged: u32,
    finished: bool,
}

/// How a request ended, for the response headers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub over_soft_limit: bool,
}

/// Step 1: model list, rate limit, idempotency. `fingerprint` identifies the request's content (given
/// when it carries an `Idempotency-Key`), so a reused key with another body is told apart from a retry.
pub async fn admit(
    ledger: &Ledger,
    metrics: &crate::metrics::Metrics,
    caller: Option<&Caller>,
    headers: &HeaderMap,
    info: RequestInfo,
    fingerprint: Option<&str>,
) -> Result<Admit, ApiError> {
    let key = caller.map(|c| c.0.clone());
    let admission = Admission {
        ledger: ledger.clone(),
        metrics: metrics.clone(),
        key,
        idempotency_key: None,
        created_at: ledger.now(),
        started: Instant::now(),
        info,
    };
    if let Some(key) = &admission.key {
        if !key.allows_model(&admission.info.requested_model) {
            let allowed = key.allowed_models.clone().unwrap_or_default().join("', '");
            let e = ApiError::new(
                403,
                "invalid_request_error",
                Some("model"),
                Some("model_not_allowed"),
                format!(
                    "This API key may not use the model '{}'. It may use: '{allowed}'.",
                    admission.info.requested_model
                ),
            );
            return Err(Box::new(admission).refused(e).await);
        }
        match ledger.check_rate_limit(key, admission.info.n).await.map_err(|e| internal(&admission.info, e))? {
            RateLimit::Allowed => {}
            RateLimit::Limited { kind, per_minute, retry_after_secs } => {
                let what = match kind {
                    ledger::RateLimitKind::Requests => "requests",
                    ledger::RateLimitKind::Images => "images",
                };
                let mut e = ApiError::new(
                    429,
                    "requests",
                    None,
                    Some("rate_limit_exceeded"),
                    format!(
                        "Rate limit reached for this API key: {per_minute} {what} per minute. Please try again in {retry_after_secs}s."
                    ),
                );
                e.retry_after = Some(retry_after_secs);
                return Err(Box::new(admission).refused(e).await);
            }
        }
    }
    let Some(idem) = headers.get(IDEMPOTENCY_HEADER) else { return Ok(Admit::Go(Box::new(admission))) };
    let idem = idem.to_str().ok().map(str::trim).filter(|v| !v.is_empty() && v.len() <= 255).ok_or_else(|| {
        ApiError::new(
            400,
            "invalid_request_error",
            Some(IDEMPOTENCY_HEADER),
            Some("invalid_idempotency_key"),
            "The Idempotency-Key header must be 1 to 255 visible characters.".into(),
        )
    })?;
    let owner = admission.owner().to_owned();
    match ledger
        .begin_idempotent(&owner, idem, fingerprint.unwrap_or_default())
        .await
        .map_err(|e| internal(&admission.info, e))?
    {
        Idempotency::New => Ok(Admit::Go(Box::new(Admission { idempotency_key: Some(idem.to_owned()), ..admission }))),
        Idempotency::Completed(stored) => {
            replay(idem, &stored)?;
            Ok(Admit::Replay(stored))
        }
        Idempotency::InFlight => Err(ApiError::new(
            409,
            "invalid_request_error",
            Some(IDEMPOTENCY_HEADER),
            Some("idempotency_key_in_use"),
            format!("A request with the Idempotency-Key '{idem}' is still running; retry when it has finished."),
        )),
        Idempotency::Mismatch => Err(ApiError::new(
            409,
            "invalid_request_error",
            Some(IDEMPOTENCY_HEADER),
            Some("idempotency_key_reused"),
            format!(
                "The Idempotency-Key '{idem}' was already used for a different request; use a new key for a new request."
            ),
        )),
    }
}

impl Admission {
    /// Step 2: holds `worst` against the key's budgets, or refuses with 429 `insufficient_quota`.
    pub async fn reserve(self: Box<Self>, worst: Result<Cost, pricing::PriceError>) -> Result<Ticket, ApiError> {
        let worst = match worst {
            Ok(c) => c,
            Err(e) => {
                // Fail closed: what cannot be priced cannot be held against a budget.
                tracing::error!(model = %self.info.model, error = %e, "cannot price a request's worst case");
                let e = ApiError::new(
                    500,
                    "server_error",
                    Some("model"),
                    Some("unpriced_model"),
                    format!(
                        "The model '{}' has no price for this request, so its cost cannot be held against a budget ({e}). The operator can add one under [prices] in the config.",
                        self.info.model
                    ),
                );
                return Err(self.refused(e).await);
            }
        };
        let worst_case = worst.total;
        let Some(key) = &self.key else {
            return Ok(Ticket::new(self, None, worst));
        };
        let held = HeldRequest {
            request_id: self.info.request_id.clone(),
            operation: self.info.operation.to_owned(),
            model: self.info.model.clone(),
            requested_model: Some(self.info.requested_model.clone()).filter(|m| *m != self.info.model),
            provider: self.info.provider.clone(),
            tier: self.info.tier.as_str().to_owned(),
            billing_basis: self.info.billing_basis.to_owned(),
            idempotency_key: self.idempotency_key.clone(),
        };
        let reserve = self.ledger.reserve_request(&key.id, &held, worst_case, self.info.n).await;
        match reserve {
            Ok(Reserve::Reserved(r)) => Ok(Ticket::new(self, Some(r), worst)),
            Ok(Reserve::Refused(refusal)) => {
                let owner = match refusal.usage.owner {
                    ledger::BudgetOwner::Key(_) => "this API key's",
                    ledger::BudgetOwner::Project(_) => "its project's",
                };
                let period = refusal.usage.budget.period.as_str();
                let resets =
                    refusal.usage.resets_at.map(|t| format!(" It resets at {}.", t.to_rfc3339())).unwrap_or_default();
                let message = match refusal.reason {
                    ledger::RefusalReason::Budget => format!(
                        "You exceeded your current quota: {owner} {period} budget has ${} left, and this request could cost up to ${} (its worst case).{resets}",
                        refusal.remaining_usd().normalize(),
                        worst_case.normalize(),
                    ),
                    ledger::RefusalReason::ImageQuota => format!(
                        "You exceeded your current quota: {owner} {period} image quota has {} images left, and this request asks for {}.{resets}",
                        refusal.usage.remaining_images().unwrap_or(0),
                        refusal.images,
                    ),
                };
                let e = ApiError::new(429, "insufficient_quota", None, Some("insufficient_quota"), message);
                Err(self.refused(e).await)
            }
            Err(e) => Err(internal(&self.info, e)),
        }
    }

    /// Records a request refused before any provider ran (cost 0) and hands back its error.
    pub async fn refused(self: Box<Self>, error: ApiError) -> ApiError {
        let entry = self.entry(None, error.body.code.as_deref(), 0, None, None, CostSource::None);
        let key = self.key.as_ref().map(|k| k.id.as_str());
        if let Err(e) = self.ledger.record(key, RequestStatus::Refused, Decimal::ZERO, &entry).await {
            tracing::error!(request_id = %self.info.request_id, error = %e, "could not record a refused request");
        }
        self.counted(RequestStatus::Refused, Decimal::ZERO);
        if let Some(idem) = &self.idempotency_key {
            self.forget(idem).await;
        }
        error
    }

    /// The request's ledger row in the metrics.
    fn counted(&self, status: RequestStatus, charged: Decimal) {
        let i = &self.info;
        self.metrics.request(&i.provider, &i.model, i.tier, status.as_str(), self.started.elapsed(), charged);
    }

    /// Whose idempotency keys these are: the API key's, or the open server's.
    fn owner(&self) -> &str {
        self.key.as_ref().map_or("anonymous", |k| k.id.as_str())
    }

    async fn forget(&self, idem: &str) {
        if let Err(e) = self.ledger.fail_idempotent(self.owner(), idem).await {
            tracing::warn!(error = %e, "could not clear an idempotency key");
        }
    }

    fn entry(
        &self,
        cost: Option<&Cost>,
        error_code: Option<&str>,
        images: u32,
        quality: Option<String>,
        size: Option<String>,
        cost_source: CostSource,
    ) -> LedgerEntry {
        let usage = cost.and_then(|c| c.usage);
        LedgerEntry {
            request_id: self.info.request_id.clone(),
            operation: self.info.operation.into(),
            model: self.info.model.clone(),
            requested_model: Some(self.info.requested_model.clone()).filter(|m| *m != self.info.model),
            provider: self.info.provider.clone(),
            tier: self.info.tier.as_str().into(),
            quality,
            size,
            n: images,
            tokens: TokenUsage {
                input_text: usage.map_or(0, |u| u.input_text_tokens),
                input_image: usage.map_or(0, |u| u.input_image_tokens),
                output: usage.map_or(0, |u| u.output_tokens),
            },
            cost_breakdown: cost
                .map(|c| api::cost_json(c, &self.info.provider, &self.info.model, self.info.tier.as_str()).to_string()),
            billing_basis: cost.map_or(self.info.billing_basis, |c| c.basis.as_str()).to_owned(),
            error_code: error_code.map(str::to_owned),
            cost_source: Some(cost_source),
            latency_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            created_at: self.created_at,
            finished_at: self.ledger.now(),
        }
    }
}

/// How a request ended, for its ledger row.
pub struct End<'a> {
    /// `Succeeded` when the provider produced every image, `Failed` otherwise.
    pub status: RequestStatus,
    /// Why it did not end normally (`client_disconnected`, the provider's error code, ...).
    pub error_code: Option<&'a str>,
    /// The whole request's cost (what [`Ticket::charge`] took included), never more than the hold;
    /// `None` when nothing is charged.
    pub cost: Option<&'a Cost>,
    pub cost_source: CostSource,
    /// Images produced (charged to the image quota).
    pub images: u32,
    pub quality: Option<String>,
    pub size: Option<String>,
    /// The response body to replay for a repeated `Idempotency-Key` (`None` for a stream), and the
    /// cost header that went with it.
    pub response: Option<&'a [u8]>,
}

impl Ticket {
    fn new(admission: Box<Admission>, reservation: Option<Reservation>, worst: Cost) -> Ticket {
        Ticket { admission, reservation, worst, charged: Decimal::ZERO, images_charged: 0, finished: false }
    }

    /// The request is served by another model than the one admitted (a replacement): its ledger row
    /// says so, with that model's billing basis.
    pub fn served_by(&mut self, model: &str, provider: &str, billing_basis: &'static str) {
        model.clone_into(&mut self.admission.info.model);
        provider.clone_into(&mut self.admission.info.provider);
        self.admission.info.billing_basis = billing_basis;
    }

    /// The worst case held for this request.
    pub fn worst_case(&self) -> &Cost {
        &self.worst
    }

    /// What may still be charged: the hold less what was charged so far.
    pub fn remaining(&self) -> Decimal {
        (self.worst.total - self.charged).max(Decimal::ZERO)
    }

    /// Charges `amount` (at most [`Ticket::remaining`]) and `images` now, while the request still runs:
    /// a stream's completed image is paid for as it is produced, so nothing delivered is free even if
    /// this instance dies before the stream ends.
    pub async fn charge(&mut self, amount: Decimal, images: u32) {
        let amount = amount.min(self.remaining());
        let charged = match &mut self.reservation {
            Some(r) => match self.admission.ledger.charge(r, amount, images).await {
                Ok(charged) => charged,
                Err(e) => {
                    // Charged at the end instead (finish charges the whole cost).
                    tracing::error!(request_id = %self.admission.info.request_id, error = %e, "could not charge a delivered image yet");
                    return;
                }
            },
            None => amount,
        };
        self.charged += charged;
        self.images_charged += images;
    }

    /// Step 3: charges the request's whole cost (less what [`Ticket::charge`] took; never more than
    /// the hold), gives back the rest of the hold and writes the request's one ledger row.
    pub async fn finish(mut self, end: End<'_>) -> Outcome {
        self.finished = true;
        let a = &self.admission;
        let total = end.cost.map_or(Decimal::ZERO, |c| c.total).min(self.worst.total).max(self.charged);
        let cost_source = if total.is_zero() { CostSource::None } else { end.cost_source };
        let entry = a.entry(end.cost, end.error_code, end.images, end.quality, end.size, cost_source);
        let key = a.key.as_ref().map(|k| k.id.clone());
        a.counted(end.status, total);
        let owner = a.owner();
        // A request that produced its images is replayed to a retry (never run and charged twice),
        // even when its client went away before the answer arrived; one that failed runs again.
        let succeeded = end.status == RequestStatus::Succeeded;
        let stored = match (&a.idempotency_key, succeeded) {
            (Some(_), true) => Some(match end.response {
                Some(body) if body.len() <= MAX_STORED_RESPONSE => String::from_utf8_lossy(body).into_owned(),
                other => {
                    let why =
                        if other.is_some() { "too large to store" } else { "streamed, and streams are not stored" };
                    NotStored { imagegate_not_stored: why.to_owned(), request_id: a.info.request_id.clone() }.to_json()
                }
            }),
            _ => None,
        };
        let cost = end.cost.map(|c| c.total.min(self.worst.total).normalize().to_string());
        let completion = match (&a.idempotency_key, &stored) {
            (Some(idem), Some(response)) => Some(ledger::Completion {
                key_id: owner,
                idempotency_key: idem,
                response,
                cost_usd: cost.as_deref(),
                request_id: &a.info.request_id,
            }),
            _ => None,
        };
        let mut outcome = Outcome::default();
        let mut stored_with_charge = false;
        let result = match self.reservation.take() {
            // The charge and the stored response in one transaction.
            Some(r) if succeeded => match &completion {
                Some(c) => {
                    stored_with_charge = true;
                    a.ledger.settle_and_store(r, total, &entry, c).await
                }
                None => a.ledger.settle(r, total, &entry).await,
            },
            Some(r) => a.ledger.release(r, total, &entry).await,
            None => a.ledger.record(key.as_deref(), end.status, total, &entry).await.map(|()| ledger::Settlement {
                charged_usd: total,
                over_soft_limit: false,
                crossed_soft_limit: false,
                reservation_expired: false,
            }),
        };
        match result {
            Ok(s) => {
                outcome.over_soft_limit = s.over_soft_limit;
                if s.crossed_soft_limit {
                    tracing::warn!(key = key.as_deref().unwrap_or(""), "spending crossed a soft budget threshold");
                }
            }
            Err(e) => {
                tracing::error!(request_id = %a.info.request_id, error = %e, "could not finish a request in the ledger");
            }
        }
        let Some(idem) = &a.idempotency_key else { return outcome };
        if !succeeded {
            a.forget(idem).await;
            return outcome;
        }
        if let Some(c) = completion.filter(|_| !stored_with_charge)
            && let Err(e) = a.ledger.complete_idempotent(owner, idem, c.response, c.cost_usd).await
        {
            tracing::error!(error = %e, "could not store an idempotent response");
        }
        outcome
    }

    /// The provider failed before producing anything: release the hold, charge nothing (or what was
    /// already charged), write the failed row.
    pub async fn fail(self, error: &ApiError) {
        let code = error.body.code.clone().unwrap_or_else(|| error.body.kind.clone());
        let end = End {
            status: RequestStatus::Failed,
            error_code: Some(&code),
            cost: None,
            cost_source: CostSource::None,
            images: 0,
            quality: None,
            size: None,
            response: None,
        };
        self.finish(end).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Never finished: the task running the request ended abnormally (a panic, a shutdown). Release
        // the hold with what was charged, from a task.
        if self.finished {
            return;
        }
        let Some(reservation) = self.reservation.take() else { return };
        let ledger = self.admission.ledger.clone();
        let source = if self.charged.is_zero() { CostSource::None } else { CostSource::Priced };
        let entry = self.admission.entry(None, Some("aborted"), self.images_charged, None, None, source);
        self.admission.counted(RequestStatus::Failed, self.charged);
        let charged = self.charged;
        let owner = self.admission.owner().to_owned();
        let idem = self.admission.idempotency_key.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = ledger.release(reservation, charged, &entry).await {
                    tracing::error!(error = %e, "could not release an aborted request; another sweep finishes it");
                }
                if let Some(idem) = idem
                    && let Err(e) = ledger.fail_idempotent(&owner, &idem).await
                {
                    tracing::warn!(error = %e, "could not clear an idempotency key");
                }
            });
        }
    }
}

fn internal(info: &RequestInfo, e: ledger::LedgerError) -> ApiError {
    tracing::error!(request_id = %info.request_id, error = %e, "ledger unavailable");
    ApiError::new(
        503,
        "server_error",
        None,
        Some("ledger_unavailable"),
        format!(
            "The usage ledger is unavailable, so no spending can be authorized; please retry shortly. Request id: {}.",
            info.request_id
        ),
    )
}
