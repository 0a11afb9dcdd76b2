//! Throwaway databases for tests (of this crate and of the crates above it): a SQLite file in a
//! temporary directory, or a fresh schema in the PostgreSQL that `IMAGEGATE_TEST_DATABASE_URL` names.

use sqlx::{Connection, Executor};

use crate::error::{LedgerError, Result};

/// The variable that turns the PostgreSQL tests on (`.ci/run` sets it).
pub const POSTGRES_ENV: &str = "IMAGEGATE_TEST_DATABASE_URL";

/// An empty database; [`TestDatabase::url`] connects to it. Drop the schema with
/// [`TestDatabase::finish`] (a SQLite one goes with its directory).
pub struct TestDatabase {
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, schema: String },
}

impl TestDatabase {
    pub fn sqlite() -> Result<TestDatabase> {
        let dir = tempfile::tempdir().map_err(|e| LedgerError::InvalidArgument(e.to_string()))?;
        let url = crate::sqlite_url(dir.path())?;
        Ok(TestDatabase { url, cleanup: Cleanup::Sqlite(dir) })
    }

    /// A schema of its own in the configured PostgreSQL, or `None` (after saying loudly that the test
    /// is skipped) when `IMAGEGATE_TEST_DATABASE_URL` is not set.
    pub async fn postgres() -> Result<Option<TestDatabase>> {
        let Ok(admin_url) = std::env::var(POSTGRES_ENV) else {
            eprintln!(
                "SKIPPED: set {POSTGRES_ENV} (e.g. postgres://postgres@127.0.0.1:5432/test) to run the PostgreSQL tests"
            );
            return Ok(None);
        };
        sqlx::any::install_default_drivers();
        // The schema name is ours (hex digits), never input.
        let schema = format!("imagegate_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::AnyConnection::connect(&admin_url).await?;
        admin.execute(format!("CREATE SCHEMA {schema}").as_str()).await?;
        admin.close().await?;
        let sep = if admin_url.contains('?') { '&' } else { '?' };
        let url = format!("{admin_url}{sep}options=-c%20search_path%3D{schema}");
        Ok(Some(TestDatabase { url, cleanup: Cleanup::Postgres { admin_url, schema } }))
    }

    /// Drops a PostgreSQL schema (a SQLite directory is removed on drop).
    pub async fn finish(self) -> Result<()> {
        if let Cleanup::Postgres { admin_url, schema } = self.cleanup {
            let mut admin = sqlx::AnyConnection::connect(&admin_url).await?;
            admin.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await?;
            admin.close().await?;
        }
        Ok(())
    }
}
