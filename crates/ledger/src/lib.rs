//! imagegate's store: API keys, projects, budgets and reservations, rate limits, idempotency keys,
//! images kept for URL responses and the usage ledger, on SQLite (the default, one file in the data
//! dir) or PostgreSQL (several instances sharing one database), with the same behaviour on both.
//!
//! The crate knows nothing of HTTP or JSON: it takes and returns plain Rust values, and the server
//! shapes responses. One [`Ledger`] (cheap to clone) serves a whole process.
//!
//! # One request
//!
//! ```no_run
//! # async fn serve(secret: &str) -> Result<(), ledger::LedgerError> {
//! use ledger::{Idempotency, Ledger, LedgerEntry, RateLimit, Reserve};
//! use rust_decimal::Decimal;
//!
//! let ledger = Ledger::connect("sqlite://data/imagegate.db?mode=rwc").await?;
//! let Some(key) = ledger.authenticate(secret).await? else { return Ok(()) /* 401 */ };
//! if let RateLimit::Limited { retry_after_secs, .. } = ledger.check_rate_limit(&key, 1).await? {
//!     return Ok(()); // 429 with Retry-After
//! }
//! match ledger.begin_idempotent(&key.id, "idem-1", &ledger::fingerprint(b"POST /v1/images ...")).await? {
//!     Idempotency::New => {}
//!     _ => return Ok(()), // replay, 409 or 400
//! }
//! let worst_case = Decimal::new(4, 2); // priced by the pricing crate
//! let reservation = match ledger.reserve(&key.id, "req_1", worst_case, 1).await? {
//!     Reserve::Reserved(r) => r,
//!     Reserve::Refused(refusal) => return Ok(()), // 429 insufficient_quota: refusal.remaining_usd()
//! };
//! // ... run the provider, price the actual usage ...
//! # let entry: LedgerEntry = unimplemented!();
//! let settlement = ledger.settle(reservation, Decimal::new(3, 2), &entry).await?;
//! if settlement.over_soft_limit { /* add a warning header */ }
//! ledger.complete_idempotent(&key.id, "idem-1", "{\"created\":1}", Some("0.03")).await?;
//! # Ok(()) }
//! ```
//!
//! # Invariants
//!
//! - **Money is exact**: [`rust_decimal::Decimal`] USD in the API, integer nano-USD in the database;
//!   the rounding rules are in [`money`]. Never a float.
//! - **Budgets cannot be overspent** by concurrent requests, on any number of instances: see
//!   [`budget`] for the reservation protocol, and [`Ledger`]'s transactions for how each backend
//!   makes it atomic (SQLite: `BEGIN IMMEDIATE` serializes writers; PostgreSQL: conditional `UPDATE`s
//!   that lock and re-check the row).
//! - **Secrets are never stored or logged**: only their SHA-256 and a visible prefix ([`keys`]).
//!   Authentication reads the database every time, so a revocation takes effect at once.
//! - **SQL is only bound queries**: values go through `bind`, never into SQL text.
//! - **Time comes from a [`Clock`]**, so period resets and expiry are testable.
//! - **The ledger is append-only** and written in one place ([`usage`]).

pub mod batches;
pub mod budget;
mod clock;
mod db;
mod error;
mod idempotency;
mod images;
pub mod keys;
pub mod money;
mod rate;
pub mod report;
mod sessions;
pub mod testing;
pub mod usage;

pub use batches::{BatchPart, BatchRecord, ClaimedLine, DoneLine, FileContent, FileRecord, NewBatch, RequestCounts};
pub use budget::{
    Budget, BudgetOwner, BudgetUsage, HeldRequest, Period, Refusal, RefusalReason, Reservation, Reserve, Settlement,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use db::{Backend, Ledger, LedgerOptions, sqlite_url};
pub use error::{LedgerError, Result};
pub use idempotency::{Completion, Idempotency, StoredResponse, fingerprint, fingerprint_parts};
pub use images::StoredImage;
pub use keys::{ApiKey, CreatedKey, KeyUpdate, NewKey, NewProject, Project, ProjectUpdate, RateLimits, Scope};
pub use rate::{RateLimit, RateLimitKind};
pub use rust_decimal::Decimal;
pub use usage::{
    BucketWidth, CostSource, Dimension, EntryFilter, LedgerEntry, LedgerRow, RequestStatus, TokenUsage, UsageBucket,
    UsageQuery, UsageRow,
};
