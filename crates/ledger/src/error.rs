//! The one error type of the crate.

/// What can go wrong in the ledger. Refusals (budget, rate limit, idempotency conflicts) are not
/// errors: they are ordinary outcomes ([`crate::Reserve`], [`crate::RateLimit`], [`crate::Idempotency`]).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL names no supported backend. Holds the scheme only (the URL may hold a password).
    #[error("unsupported database URL scheme {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    #[error("no API key with id {0:?}")]
    KeyNotFound(String),
    #[error("API key {0:?} is revoked")]
    KeyRevoked(String),
    #[error("no project {0:?}")]
    ProjectNotFound(String),
    #[error("a project named {0:?} already exists")]
    ProjectExists(String),
    /// A USD amount that is negative or too large to store.
    #[error("invalid amount {0} USD: amounts are between 0 and 9,000,000,000 USD")]
    InvalidAmount(rust_decimal::Decimal),
    /// Any other argument the ledger cannot take (an empty name, a model name with a newline, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A stored value the ledger cannot read back (a bad enum string, an impossible timestamp).
    #[error("unreadable stored value: {0}")]
    Corrupt(String),
}

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;
