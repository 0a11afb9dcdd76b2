//! The connection: one sqlx `AnyPool` over SQLite or PostgreSQL, the migrations run on connect,
//! transactions that take SQLite's write lock up front, and helpers that read stored integers back
//! into typed values.
//!
//! Both backends get the same SQL text: `$1`-style placeholders (SQLite reads them as numbered
//! parameters), `ON CONFLICT`, `RETURNING`, integer money and millisecond timestamps. Sums are cast
//! back to `BIGINT` because PostgreSQL's `SUM(bigint)` is `NUMERIC`, which the `Any` driver cannot
//! read. Only the migrations differ (the ledger's identity column), one directory per backend.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, ConnectOptions, Connection, Executor, Transaction};

use crate::clock::{Clock, SystemClock};
use crate::error::{LedgerError, Result};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// How long SQLite waits for another connection's write lock before failing with "database is
/// locked". Every write transaction queues on this lock (see [`Ledger::begin`]).
const SQLITE_CONNECTION_PRAGMAS: &str = "PRAGMA busy_timeout = 15000; PRAGMA synchronous = NORMAL;";

/// Settings for [`Ledger::connect_with`]. `Default` gives the production values.
#[derive(Clone)]
pub struct LedgerOptions {
    /// Where "now" comes from: budget periods, expiry, rate windows and ledger queries use it.
    pub clock: Arc<dyn Clock>,
    /// The pool's size. SQLite has one writer at a time whatever this is; readers run in parallel.
    pub max_connections: u32,
    /// How long a reservation holds budget after its instance's last [`Ledger::heartbeat`] before
    /// [`Ledger::release_expired`] frees it (the instance is presumed dead).
    pub reservation_ttl: Duration,
    /// How long an in-flight idempotency entry blocks retries before it is presumed abandoned, unless
    /// its request's hold keeps it alive (a heartbeat renews both). The reservation TTL is right.
    pub idempotency_in_flight_ttl: Duration,
    /// How long a completed idempotency entry is replayed (OpenAI-style: a day).
    pub idempotency_retention: Duration,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            max_connections: 8,
            reservation_ttl: Duration::from_secs(60 * 60),
            idempotency_in_flight_ttl: Duration::from_secs(60 * 60),
            idempotency_retention: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl std::fmt::Debug for LedgerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerOptions")
            .field("max_connections", &self.max_connections)
            .field("reservation_ttl", &self.reservation_ttl)
            .field("idempotency_in_flight_ttl", &self.idempotency_in_flight_ttl)
            .field("idempotency_retention", &self.idempotency_retention)
            .finish_non_exhaustive()
    }
}

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a URL names: `sqlite:...` or `postgres://` / `postgresql://`.
    pub fn from_url(url: &str) -> Result<Self> {
        let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
        match scheme {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            _ => Err(LedgerError::UnsupportedUrl(scheme.to_owned())),
        }
    }
}

/// The store. Cheap to clone (the pool is shared); every method is one or a few statements, and every
/// change that must be atomic runs in one transaction.
#[derive(Clone)]
pub struct Ledger {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) reservation_ttl_ms: i64,
    pub(crate) in_flight_ttl_ms: i64,
    pub(crate) retention_ms: i64,
    /// This process's id among the instances sharing the database: its holds carry it, and its
    /// heartbeat renews them.
    pub(crate) instance_id: Arc<str>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("backend", &self.backend).finish_non_exhaustive()
    }
}

/// The default database URL for a data directory: `sqlite://DATA_DIR/imagegate.db?mode=rwc`
/// (created if missing). Characters that mean something in a URL are percent-encoded.
pub fn sqlite_url(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join("imagegate.db");
    let path = path
        .to_str()
        .ok_or_else(|| LedgerError::InvalidArgument(format!("the data dir {} is not UTF-8", data_dir.display())))?;
    let mut encoded = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            '%' => encoded.push_str("%25"),
            '?' => encoded.push_str("%3F"),
            '#' => encoded.push_str("%23"),
            ' ' => encoded.push_str("%20"),
            c => encoded.push(c),
        }
    }
    Ok(format!("sqlite://{encoded}?mode=rwc"))
}

impl Ledger {
    /// Connects with [`LedgerOptions::default`]. See [`Ledger::connect_with`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, LedgerOptions::default()).await
    }

    /// Connects to `sqlite://PATH?mode=rwc` or `postgres://...`, brings the schema up to date and
    /// releases reservations that expired while no process was running.
    ///
    /// SQLite runs in WAL mode (readers never wait for the writer) with a busy timeout, so several
    /// connections and processes can share the file. PostgreSQL migrations take an advisory lock,
    /// so instances starting together do not race.
    pub async fn connect_with(url: &str, options: LedgerOptions) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let connect_options: AnyConnectOptions = url.parse()?;

        if backend == Backend::Sqlite {
            // WAL is a property of the file, set once here: switching journal mode needs an exclusive
            // lock that the busy timeout cannot wait for, so pool connections must not race to do it.
            let mut conn = connect_options.connect().await?;
            conn.execute("PRAGMA journal_mode = WAL").await?;
            conn.close().await?;
        }

        let pool = AnyPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute(SQLITE_CONNECTION_PRAGMAS).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(connect_options)
            .await?;

        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }

        let ledger = Self {
            pool,
            backend,
            reservation_ttl_ms: duration_ms(options.reservation_ttl)?,
            in_flight_ttl_ms: duration_ms(options.idempotency_in_flight_ttl)?,
            retention_ms: duration_ms(options.idempotency_retention)?,
            clock: options.clock,
            instance_id: Arc::from(uuid::Uuid::now_v7().to_string()),
        };
        let now = ledger.clock.now();
        ledger.release_expired(now).await?;
        Ok(ledger)
    }

    /// This instance's id: the holds it takes carry it (see [`Ledger::heartbeat`]).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// How long a hold lives after the last heartbeat of its instance.
    pub fn reservation_ttl(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.reservation_ttl_ms).unwrap_or(0))
    }

    /// Which database this ledger talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The ledger's clock (the server uses it for `created_at`, so tests control both).
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Begins a write transaction.
    ///
    /// On SQLite it is `BEGIN IMMEDIATE`: the write lock is taken (waiting up to the busy timeout)
    /// before the first read, so a transaction never reads a snapshot and then fails to upgrade it
    /// (`SQLITE_BUSY_SNAPSHOT`, which the busy timeout does not cover). Writers are serialized, which
    /// is what makes every check-then-write inside one of these transactions atomic on SQLite.
    /// On PostgreSQL it is a plain `BEGIN` (READ COMMITTED): atomicity comes from conditional
    /// `UPDATE`s, which lock the row and re-check their `WHERE` against its latest committed version.
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }
}

fn duration_ms(d: Duration) -> Result<i64> {
    i64::try_from(d.as_millis()).map_err(|_| LedgerError::InvalidArgument(format!("duration {d:?} is too long")))
}

/// A UTC time as stored: Unix milliseconds.
pub(crate) fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Stored Unix milliseconds back to a UTC time.
pub(crate) fn from_ms(ms: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| LedgerError::Corrupt(format!("timestamp {ms} ms")))
}

/// A count as stored (`BIGINT`).
pub(crate) fn to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| LedgerError::InvalidArgument(format!("{n} is too large to store")))
}

/// A stored count, which is never negative.
pub(crate) fn to_u64(n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| LedgerError::Corrupt(format!("negative count {n}")))
}

/// A stored per-minute limit or similar small number.
pub(crate) fn to_u32(n: i64) -> Result<u32> {
    u32::try_from(n).map_err(|_| LedgerError::Corrupt(format!("limit {n} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_url() {
        assert_eq!(Backend::from_url("sqlite://data/imagegate.db?mode=rwc").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::from_url("sqlite::memory:").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::from_url("postgres://u:p@h/db").unwrap(), Backend::Postgres);
        assert_eq!(Backend::from_url("postgresql://h/db").unwrap(), Backend::Postgres);
        let err = Backend::from_url("mysql://root:hunter2@h/db").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn sqlite_url_encodes_the_path() {
        let url = sqlite_url(std::path::Path::new("/data/my dir?#%")).unwrap();
        assert_eq!(url, "sqlite:///data/my%20dir%3F%23%25/imagegate.db?mode=rwc");
    }
}
