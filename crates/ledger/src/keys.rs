//! API keys and projects.
//!
//! A secret is `ig-` followed by 48 random alphanumerics (about 285 bits, from the thread-local
//! CSPRNG). It is returned once, by [`Ledger::create_key`], and never stored: the database keeps its
//! SHA-256 and its first 11 characters (the *prefix*, e.g. `ig-AbCd1234`), which identify the key in
//! listings without revealing it.
//!
//! [`Ledger::authenticate`] finds candidates by prefix (public information, so the lookup's timing
//! reveals nothing) and compares SHA-256 digests in constant time. It reads the database on every
//! call, with no cache: a revoked key fails on the very next request, on every instance.
//!
//! Keys from the static list of earlier versions (`api_keys = ["sha256:..."]` in the config,
//! `IMAGEGATE_API_KEYS`) are imported by their digest ([`Ledger::import_key`]): their secrets are the
//! operator's own and do not start with `ig-`, so they are found by digest, with `sha256:` and the first
//! hex digits as their visible prefix.

use chrono::{DateTime, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::budget::{Budget, Period};
use crate::db::{Ledger, from_ms, to_i64, to_ms, to_u32, to_u64};
use crate::error::{LedgerError, Result};
use crate::money::{nanos_to_usd, usd_to_nanos_floor};

/// Every secret starts with this.
pub const SECRET_PREFIX: &str = "ig-";
/// Random characters after [`SECRET_PREFIX`].
const SECRET_RANDOM_CHARS: usize = 48;
/// Characters of the secret kept as its visible prefix (`ig-` and 8 random ones).
const VISIBLE_PREFIX_LEN: usize = 11;

/// What a key may do. The server decides what each scope allows; admin keys typically manage keys
/// and read organization usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Admin,
    User,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Self::Admin),
            "user" => Some(Self::User),
            _ => None,
        }
    }
}

/// Per-key request rate limits, enforced across instances by [`Ledger::check_rate_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    pub images_per_minute: Option<u32>,
}

/// A project: a named group of keys with its own optional budget, shared by all its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub budget: Option<Budget>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProject {
    pub name: String,
    pub budget: Option<Budget>,
}

/// Changes to a project; `None` leaves a field as it is (`Some(None)` removes the budget).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectUpdate {
    pub name: Option<String>,
    pub budget: Option<Option<Budget>>,
}

/// An API key as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// The visible start of the secret, e.g. `ig-AbCd1234`.
    pub prefix: String,
    pub scope: Scope,
    pub project_id: Option<String>,
    /// The models this key may use; `None` allows all.
    pub allowed_models: Option<Vec<String>>,
    pub budget: Option<Budget>,
    pub rate_limits: RateLimits,
    /// The tier its requests run at when they leave it to the server (`service_tier` `auto` or none):
    /// `flex`, or `None` for the default tier.
    pub service_tier: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Whether this key may use `model` (the name the client asked for).
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.as_ref().is_none_or(|models| models.iter().any(|m| m == model))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub name: String,
    pub scope: Scope,
    /// The project the key belongs to (its id); it must exist.
    pub project_id: Option<String>,
    pub allowed_models: Option<Vec<String>>,
    pub budget: Option<Budget>,
    pub rate_limits: RateLimits,
    /// `flex`, or `None` (the default tier): see [`ApiKey::service_tier`].
    pub service_tier: Option<String>,
}

impl NewKey {
    /// A user key with no project, budget or limits.
    pub fn user(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            scope: Scope::User,
            project_id: None,
            allowed_models: None,
            budget: None,
            rate_limits: RateLimits::default(),
            service_tier: None,
        }
    }
}

/// A key just created, with its secret: the only time the secret exists outside the client.
/// `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct CreatedKey {
    pub key: ApiKey,
    pub secret: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey").field("key", &self.key).field("secret", &"<redacted>").finish()
    }
}

/// Changes to a key; `None` leaves a field as it is (`Some(None)` removes the model list or budget).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub allowed_models: Option<Option<Vec<String>>>,
    pub budget: Option<Option<Budget>>,
    pub rate_limits: Option<RateLimits>,
    /// `Some(None)`: back to the default tier.
    pub service_tier: Option<Option<String>>,
}

/// The columns [`key_from_row`] reads, as a literal for `concat!`.
macro_rules! key_columns {
    () => {
        "id, name, prefix, scope, project_id, allowed_models,
         budget_period, budget_limit_nanos, budget_soft_nanos, budget_images,
         requests_per_minute, images_per_minute, service_tier, created_at_ms, revoked_at_ms"
    };
}

macro_rules! project_columns {
    () => {
        "id, name, budget_period, budget_limit_nanos, budget_soft_nanos, budget_images, created_at_ms"
    };
}

impl Ledger {
    pub async fn create_project(&self, new: NewProject) -> Result<Project> {
        let name = checked_name(&new.name)?;
        let budget = BudgetColumns::new(new.budget.as_ref())?;
        let id = format!("proj_{}", Uuid::now_v7().simple());
        let inserted = sqlx::query(
            "INSERT INTO projects (id, name, budget_period, budget_limit_nanos, budget_soft_nanos,
                 budget_images, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&id)
        .bind(name)
        .bind(budget.period)
        .bind(budget.limit)
        .bind(budget.soft)
        .bind(budget.images)
        .bind(to_ms(self.clock.now()))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(LedgerError::ProjectExists(name.to_owned()));
        }
        self.get_project(&id).await
    }

    /// The project with this id. Errors with [`LedgerError::ProjectNotFound`].
    pub async fn get_project(&self, id: &str) -> Result<Project> {
        sqlx::query(concat!("SELECT ", project_columns!(), " FROM projects WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| project_from_row(&row))
            .transpose()?
            .ok_or_else(|| LedgerError::ProjectNotFound(id.to_owned()))
    }

    /// The project with this name, if any.
    pub async fn project_by_name(&self, name: &str) -> Result<Option<Project>> {
        sqlx::query(concat!("SELECT ", project_columns!(), " FROM projects WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| project_from_row(&row))
            .transpose()
    }

    /// All projects, oldest first.
    pub async fn list_projects(&self) -> Result<Vec<Project>> {
        sqlx::query(concat!("SELECT ", project_columns!(), " FROM projects ORDER BY created_at_ms, id"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(project_from_row)
            .collect()
    }

    pub async fn update_project(&self, id: &str, update: ProjectUpdate) -> Result<Project> {
        let mut tx = self.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM projects WHERE id = $1").bind(id).fetch_optional(&mut *tx).await?;
        if exists.is_none() {
            return Err(LedgerError::ProjectNotFound(id.to_owned()));
        }
        if let Some(name) = &update.name {
            let name = checked_name(name)?;
            let taken = sqlx::query("SELECT 1 FROM projects WHERE name = $1 AND id <> $2")
                .bind(name)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if taken.is_some() {
                return Err(LedgerError::ProjectExists(name.to_owned()));
            }
            sqlx::query("UPDATE projects SET name = $2 WHERE id = $1").bind(id).bind(name).execute(&mut *tx).await?;
        }
        if let Some(budget) = &update.budget {
            let budget = BudgetColumns::new(budget.as_ref())?;
            sqlx::query(
                "UPDATE projects SET budget_period = $2, budget_limit_nanos = $3, budget_soft_nanos = $4,
                     budget_images = $5
                 WHERE id = $1",
            )
            .bind(id)
            .bind(budget.period)
            .bind(budget.limit)
            .bind(budget.soft)
            .bind(budget.images)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.get_project(id).await
    }

    /// Creates a key and returns it with its secret, which is not stored and cannot be shown again.
    pub async fn create_key(&self, new: NewKey) -> Result<CreatedKey> {
        let name = checked_name(&new.name)?;
        let models = join_models(new.allowed_models.as_deref())?;
        let budget = BudgetColumns::new(new.budget.as_ref())?;
        let limits = LimitColumns::new(new.rate_limits);
        let tier = checked_tier(new.service_tier.as_deref())?;
        if let Some(project_id) = &new.project_id {
            self.get_project(project_id).await?;
        }
        let secret = new_secret();
        let id = format!("key_{}", Uuid::now_v7().simple());
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, secret_sha256, scope, project_id, allowed_models,
                 budget_period, budget_limit_nanos, budget_soft_nanos, budget_images,
                 requests_per_minute, images_per_minute, created_at_ms, service_tier)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&id)
        .bind(name)
        .bind(visible_prefix(&secret))
        .bind(sha256_hex(&secret))
        .bind(new.scope.as_str())
        .bind(new.project_id.as_deref())
        .bind(models)
        .bind(budget.period)
        .bind(budget.limit)
        .bind(budget.soft)
        .bind(budget.images)
        .bind(limits.requests)
        .bind(limits.images)
        .bind(to_ms(self.clock.now()))
        .bind(tier)
        .execute(&self.pool)
        .await?;
        Ok(CreatedKey { key: self.get_key(&id).await?, secret })
    }

    /// Imports a key known only by the SHA-256 of its secret (a static key of the config), unless a key
    /// with that digest exists already. Returns the key either way.
    pub async fn import_key(&self, name: &str, digest: &[u8; 32], scope: Scope) -> Result<ApiKey> {
        let name = checked_name(name)?;
        let digest = hex(digest);
        let existing = sqlx::query("SELECT id FROM api_keys WHERE secret_sha256 = $1")
            .bind(&digest)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = existing {
            let id: String = row.try_get("id")?;
            return self.get_key(&id).await;
        }
        let id = format!("key_{}", Uuid::now_v7().simple());
        sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, secret_sha256, scope, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (secret_sha256) DO NOTHING",
        )
        .bind(&id)
        .bind(name)
        .bind(format!("sha256:{}", &digest[..8]))
        .bind(&digest)
        .bind(scope.as_str())
        .bind(to_ms(self.clock.now()))
        .execute(&self.pool)
        .await?;
        tracing::info!(key = %id, "imported a static API key by its digest");
        let row =
            sqlx::query("SELECT id FROM api_keys WHERE secret_sha256 = $1").bind(&digest).fetch_one(&self.pool).await?;
        self.get_key(&row.try_get::<String, _>("id")?).await
    }

    /// The key with this id, revoked or not. Errors with [`LedgerError::KeyNotFound`].
    pub async fn get_key(&self, id: &str) -> Result<ApiKey> {
        sqlx::query(concat!("SELECT ", key_columns!(), " FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| key_from_row(&row))
            .transpose()?
            .ok_or_else(|| LedgerError::KeyNotFound(id.to_owned()))
    }

    /// All keys, revoked ones included, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        sqlx::query(concat!("SELECT ", key_columns!(), " FROM api_keys ORDER BY created_at_ms, id"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    /// Whether any key exists (revoked or not). With none, the server runs without auth on loopback.
    pub async fn has_keys(&self) -> Result<bool> {
        let any = sqlx::query("SELECT 1 FROM api_keys LIMIT 1").fetch_optional(&self.pool).await?;
        Ok(any.is_some())
    }

    pub async fn update_key(&self, id: &str, update: KeyUpdate) -> Result<ApiKey> {
        let mut tx = self.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM api_keys WHERE id = $1").bind(id).fetch_optional(&mut *tx).await?;
        if exists.is_none() {
            return Err(LedgerError::KeyNotFound(id.to_owned()));
        }
        if let Some(name) = &update.name {
            let name = checked_name(name)?;
            sqlx::query("UPDATE api_keys SET name = $2 WHERE id = $1").bind(id).bind(name).execute(&mut *tx).await?;
        }
        if let Some(models) = &update.allowed_models {
            let models = join_models(models.as_deref())?;
            sqlx::query("UPDATE api_keys SET allowed_models = $2 WHERE id = $1")
                .bind(id)
                .bind(models)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(budget) = &update.budget {
            let budget = BudgetColumns::new(budget.as_ref())?;
            sqlx::query(
                "UPDATE api_keys SET budget_period = $2, budget_limit_nanos = $3, budget_soft_nanos = $4,
                     budget_images = $5
                 WHERE id = $1",
            )
            .bind(id)
            .bind(budget.period)
            .bind(budget.limit)
            .bind(budget.soft)
            .bind(budget.images)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(tier) = &update.service_tier {
            let tier = checked_tier(tier.as_deref())?;
            sqlx::query("UPDATE api_keys SET service_tier = $2 WHERE id = $1")
                .bind(id)
                .bind(tier)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(limits) = update.rate_limits {
            let limits = LimitColumns::new(limits);
            sqlx::query("UPDATE api_keys SET requests_per_minute = $2, images_per_minute = $3 WHERE id = $1")
                .bind(id)
                .bind(limits.requests)
                .bind(limits.images)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.get_key(id).await
    }

    /// Revokes a key: from now on it authenticates nowhere and reserves nothing. Revoking a revoked
    /// key changes nothing (it keeps its first revocation time).
    pub async fn revoke_key(&self, id: &str) -> Result<ApiKey> {
        let revoked = sqlx::query("UPDATE api_keys SET revoked_at_ms = $2 WHERE id = $1 AND revoked_at_ms IS NULL")
            .bind(id)
            .bind(to_ms(self.clock.now()))
            .execute(&self.pool)
            .await?;
        tracing::info!(key = %id, newly_revoked = revoked.rows_affected() == 1, "revoked API key");
        self.get_key(id).await
    }

    /// The live (not revoked) key whose secret this is, or `None`. Hits the database every time.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<ApiKey>> {
        let digest = sha256_hex(secret);
        let rows = match secret.get(..VISIBLE_PREFIX_LEN).filter(|_| secret.starts_with(SECRET_PREFIX)) {
            Some(prefix) => {
                sqlx::query(concat!("SELECT ", key_columns!(), ", secret_sha256 FROM api_keys WHERE prefix = $1"))
                    .bind(prefix)
                    .fetch_all(&self.pool)
                    .await?
            }
            // An imported static key: found by its digest (a lookup by a hash reveals nothing usable).
            None if !secret.is_empty() => {
                sqlx::query(concat!(
                    "SELECT ",
                    key_columns!(),
                    ", secret_sha256 FROM api_keys WHERE secret_sha256 = $1"
                ))
                .bind(&digest)
                .fetch_all(&self.pool)
                .await?
            }
            None => return Ok(None),
        };
        let mut found = None;
        // Compare every candidate, in constant time each, rather than stopping at the first match.
        for row in &rows {
            let stored: String = row.try_get("secret_sha256")?;
            if bool::from(stored.as_bytes().ct_eq(digest.as_bytes())) {
                found = Some(key_from_row(row)?);
            }
        }
        Ok(found.filter(|key| key.revoked_at.is_none()))
    }
}

fn new_secret() -> String {
    let random: String = rand::rng().sample_iter(Alphanumeric).take(SECRET_RANDOM_CHARS).map(char::from).collect();
    format!("{SECRET_PREFIX}{random}")
}

fn visible_prefix(secret: &str) -> &str {
    secret.get(..VISIBLE_PREFIX_LEN).unwrap_or(secret)
}

fn sha256_hex(data: &str) -> String {
    hex(&Sha256::digest(data.as_bytes()))
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Why `name` cannot name a new key or project, as words that follow "a name" or a field's name
/// ("cannot be empty"); `None` when it can. Names are shown in terminals and spreadsheets, so a
/// control character (C0, DEL, C1: what starts an escape sequence or moves the cursor) is refused
/// when a name is set; names stored before this rule are still read and shown (escaped by the CLI).
/// Surrounding whitespace does not count: it is trimmed before a name is stored.
pub fn name_problem(name: &str) -> Option<String> {
    let name = name.trim();
    if name.is_empty() {
        return Some("cannot be empty".into());
    }
    name.chars().find(|c| c.is_control()).map(|c| {
        format!(
            "cannot contain control characters (found U+{:04X}): use letters, digits, spaces and punctuation",
            u32::from(c)
        )
    })
}

fn checked_name(name: &str) -> Result<&str> {
    if let Some(problem) = name_problem(name) {
        return Err(LedgerError::InvalidArgument(format!("a name {problem}")));
    }
    Ok(name.trim())
}

/// Model names are stored joined by newlines, so a name may not contain one.
fn join_models(models: Option<&[String]>) -> Result<Option<String>> {
    let Some(models) = models else { return Ok(None) };
    if let Some(bad) = models.iter().find(|m| m.is_empty() || m.contains('\n')) {
        return Err(LedgerError::InvalidArgument(format!("invalid model name {bad:?}")));
    }
    Ok(Some(models.join("\n")))
}

fn split_models(joined: Option<String>) -> Option<Vec<String>> {
    joined.map(|joined| if joined.is_empty() { Vec::new() } else { joined.split('\n').map(str::to_owned).collect() })
}

/// A budget as its four nullable columns; limits rounded down to the nano-dollar.
struct BudgetColumns {
    period: Option<&'static str>,
    limit: Option<i64>,
    soft: Option<i64>,
    images: Option<i64>,
}

impl BudgetColumns {
    fn new(budget: Option<&Budget>) -> Result<Self> {
        let Some(budget) = budget else {
            return Ok(Self { period: None, limit: None, soft: None, images: None });
        };
        Ok(Self {
            period: Some(budget.period.as_str()),
            limit: budget.limit_usd.map(usd_to_nanos_floor).transpose()?,
            soft: budget.soft_limit_usd.map(usd_to_nanos_floor).transpose()?,
            images: budget.image_quota.map(to_i64).transpose()?,
        })
    }
}

struct LimitColumns {
    requests: Option<i64>,
    images: Option<i64>,
}

impl LimitColumns {
    fn new(limits: RateLimits) -> Self {
        Self { requests: limits.requests_per_minute.map(i64::from), images: limits.images_per_minute.map(i64::from) }
    }
}

fn budget_from_row(row: &AnyRow) -> Result<Option<Budget>> {
    let Some(period) = row.try_get::<Option<String>, _>("budget_period")? else { return Ok(None) };
    let period = Period::parse(&period).ok_or_else(|| LedgerError::Corrupt(format!("budget period {period:?}")))?;
    Ok(Some(Budget {
        period,
        limit_usd: row.try_get::<Option<i64>, _>("budget_limit_nanos")?.map(nanos_to_usd),
        soft_limit_usd: row.try_get::<Option<i64>, _>("budget_soft_nanos")?.map(nanos_to_usd),
        image_quota: row.try_get::<Option<i64>, _>("budget_images")?.map(to_u64).transpose()?,
    }))
}

fn project_from_row(row: &AnyRow) -> Result<Project> {
    Ok(Project {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        budget: budget_from_row(row)?,
        created_at: from_ms(row.try_get("created_at_ms")?)?,
    })
}

fn key_from_row(row: &AnyRow) -> Result<ApiKey> {
    let scope: String = row.try_get("scope")?;
    Ok(ApiKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        scope: Scope::parse(&scope).ok_or_else(|| LedgerError::Corrupt(format!("key scope {scope:?}")))?,
        project_id: row.try_get("project_id")?,
        allowed_models: split_models(row.try_get("allowed_models")?),
        budget: budget_from_row(row)?,
        rate_limits: RateLimits {
            requests_per_minute: row.try_get::<Option<i64>, _>("requests_per_minute")?.map(to_u32).transpose()?,
            images_per_minute: row.try_get::<Option<i64>, _>("images_per_minute")?.map(to_u32).transpose()?,
        },
        service_tier: row.try_get("service_tier")?,
        created_at: from_ms(row.try_get("created_at_ms")?)?,
        revoked_at: row.try_get::<Option<i64>, _>("revoked_at_ms")?.map(from_ms).transpose()?,
    })
}

/// A key's tier setting as stored: `flex`, or NULL for the default tier.
fn checked_tier(tier: Option<&str>) -> Result<Option<&str>> {
    match tier {
        None | Some("default") => Ok(None),
        Some("flex") => Ok(Some("flex")),
        Some(other) => {
            Err(LedgerError::InvalidArgument(format!("service tier '{other}': a key's tier is 'default' or 'flex'")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_the_documented_shape() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert_eq!(a.len(), SECRET_PREFIX.len() + SECRET_RANDOM_CHARS);
        assert!(a.starts_with("ig-"));
        assert!(a[3..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(visible_prefix(&a).len(), 11);
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn model_lists_round_trip() {
        let models = vec!["gpt-image-1".to_owned(), "sd-turbo".to_owned()];
        assert_eq!(split_models(join_models(Some(&models)).unwrap()), Some(models));
        assert_eq!(split_models(join_models(Some(&[])).unwrap()), Some(vec![]));
        assert_eq!(split_models(join_models(None).unwrap()), None);
        assert!(join_models(Some(&["a\nb".to_owned()])).is_err());
    }

    #[test]
    fn names_refuse_control_characters_only() {
        for good in ["ci", "  design team  ", "=HYPERLINK(\"x\")", "café ☕", "a\"b,c", "ci\n"] {
            assert_eq!(name_problem(good), None, "{good:?}");
            assert_eq!(checked_name(good).unwrap(), good.trim());
        }
        assert_eq!(name_problem(" \t "), Some("cannot be empty".to_owned()));
        for (bad, code) in [
            ("\u{1b}[2J\u{1b}[31mpwned", "U+001B"),
            ("a\tb", "U+0009"),
            ("a\rb", "U+000D"),
            ("a\nb", "U+000A"),
            ("del\u{7f}", "U+007F"),
            ("csi\u{9b}2J", "U+009B"),
            ("nul\0", "U+0000"),
        ] {
            let problem = name_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(problem.contains("control characters") && problem.contains(code), "{bad:?}: {problem}");
            let err = checked_name(bad).unwrap_err().to_string();
            assert!(err.contains("a name cannot contain control characters"), "{err}");
        }
    }

    #[tokio::test]
    async fn keys_and_projects_with_control_characters_are_refused() {
        let db = crate::testing::TestDatabase::sqlite().unwrap();
        let ledger = Ledger::connect(&db.url).await.unwrap();
        let evil = "\u{1b}[2Jpwned";
        assert!(matches!(ledger.create_key(NewKey::user(evil)).await, Err(LedgerError::InvalidArgument(_))));
        let new = NewProject { name: evil.into(), budget: None };
        assert!(matches!(ledger.create_project(new).await, Err(LedgerError::InvalidArgument(_))));
        let key = ledger.create_key(NewKey::user("ci")).await.unwrap().key;
        let update = KeyUpdate { name: Some(evil.into()), ..KeyUpdate::default() };
        assert!(matches!(ledger.update_key(&key.id, update).await, Err(LedgerError::InvalidArgument(_))));
        let project = ledger.create_project(NewProject { name: "design".into(), budget: None }).await.unwrap();
        let update = ProjectUpdate { name: Some(evil.into()), budget: None };
        assert!(matches!(ledger.update_project(&project.id, update).await, Err(LedgerError::InvalidArgument(_))));
        assert_eq!(ledger.get_key(&key.id).await.unwrap().name, "ci");
        assert_eq!(ledger.get_project(&project.id).await.unwrap().name, "design");
        ledger.close().await;
        db.finish().await.unwrap();
    }
}
