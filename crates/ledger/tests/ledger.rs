//! The ledger against real databases: every scenario runs on SQLite (a temporary file, WAL) and, when
//! `IMAGEGATE_TEST_DATABASE_URL` is set, on PostgreSQL in a schema of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use ledger::{
    ApiKey, BucketWidth, Budget, BudgetOwner, CostSource, Dimension, HeldRequest, Idempotency, KeyUpdate, Ledger,
    LedgerEntry, LedgerError, LedgerOptions, ManualClock, NewKey, NewProject, Period, ProjectUpdate, RateLimit,
    RateLimitKind, RateLimits, RefusalReason, RequestStatus, Reservation, Reserve, Scope, TokenUsage, UsageQuery,
    UsageRow,
};
use rust_decimal::Decimal;
use sqlx::{Connection, Executor};

const PG_ENV: &str = "IMAGEGATE_TEST_DATABASE_URL";

// ---------------------------------------------------------------------------------------------
// Harness

/// A fresh, empty database with a hand-set clock.
struct Db {
    ledger: Ledger,
    clock: Arc<ManualClock>,
    url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, schema: String },
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = ledger::sqlite_url(dir.path()).unwrap();
        let (ledger, clock) = open(&url).await;
        Db { ledger, clock, url, cleanup: Cleanup::Sqlite(dir) }
    }

    /// `None` (and a loud line) when no PostgreSQL is configured.
    async fn postgres() -> Option<Db> {
        let Ok(admin_url) = std::env::var(PG_ENV) else {
            eprintln!(
                "SKIPPED: set {PG_ENV} (e.g. postgres://postgres@127.0.0.1:5432/test) to run the PostgreSQL tests"
            );
            return None;
        };
        sqlx::any::install_default_drivers();
        // A schema per test, so tests running in parallel never see each other's rows. The name is
        // ours (hex digits), not input.
        let schema = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::AnyConnection::connect(&admin_url).await.unwrap();
        admin.execute(format!("CREATE SCHEMA {schema}").as_str()).await.unwrap();
        admin.close().await.unwrap();
        let sep = if admin_url.contains('?') { '&' } else { '?' };
        let url = format!("{admin_url}{sep}options=-c%20search_path%3D{schema}");
        let (ledger, clock) = open(&url).await;
        Some(Db { ledger, clock, url, cleanup: Cleanup::Postgres { admin_url, schema } })
    }

    /// A second instance on the same database (another process, as far as the ledger can tell).
    async fn another_instance(&self) -> Ledger {
        Ledger::connect_with(&self.url, options(self.clock.clone())).await.unwrap()
    }

    async fn finish(self) {
        self.ledger.close().await;
        if let Cleanup::Postgres { admin_url, schema } = self.cleanup {
            let mut admin = sqlx::AnyConnection::connect(&admin_url).await.unwrap();
            admin.execute(format!("DROP SCHEMA {schema} CASCADE").as_str()).await.unwrap();
            admin.close().await.unwrap();
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.ledger.now()
    }

    fn set(&self, time: &str) {
        self.clock.set(at(time));
    }
}

fn options(clock: Arc<ManualClock>) -> LedgerOptions {
    LedgerOptions {
        clock,
        max_connections: 8,
        reservation_ttl: Duration::from_secs(600),
        idempotency_in_flight_ttl: Duration::from_secs(300),
        idempotency_retention: Duration::from_secs(86_400),
    }
}

async fn open(url: &str) -> (Ledger, Arc<ManualClock>) {
    // A Wednesday, midday.
    let clock = Arc::new(ManualClock::new(at("2025-03-05T12:00:00Z")));
    let ledger = Ledger::connect_with(url, options(clock.clone())).await.unwrap();
    (ledger, clock)
}

/// Each scenario below becomes `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = super::Db::sqlite().await;
                    super::$name(&db).await;
                    db.finish().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(db) = super::Db::postgres().await else { return };
                    super::$name(&db).await;
                    db.finish().await;
                }
            )*
        }
    };
}

on_both_databases!(
    burst_never_overspends,
    day_boundary_resets_and_keeps_periods_apart,
    month_boundary_resets,
    soft_threshold_is_reported,
    image_quota_is_enforced,
    project_budget_is_shared_by_its_keys,
    secrets_authenticate_until_revoked,
    expired_reservations_are_released,
    heartbeats_keep_live_holds_and_sweeps_finish_dead_ones,
    charges_as_it_goes_stay_within_the_hold,
    release_frees_the_hold_and_records_a_failure,
    idempotency_states,
    rate_limit_window_holds_across_instances,
    usage_sums_match_the_rows,
    usage_groups_by_billing_basis,
    keys_and_projects_are_managed,
    static_keys_are_imported_by_digest,
    stored_images_are_served_until_they_expire,
    batch_lines_are_claimed_once_and_batches_expire,
    console_sessions_last_until_they_expire_end_or_their_key_is_revoked,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn at(time: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(time).unwrap().with_timezone(&Utc)
}

fn usd(amount: &str) -> Decimal {
    Decimal::from_str(amount).unwrap()
}

fn entry(db: &Db, request_id: &str, model: &str, n: u32) -> LedgerEntry {
    LedgerEntry {
        request_id: request_id.into(),
        operation: "generation".into(),
        model: model.into(),
        requested_model: None,
        provider: "openai".into(),
        tier: "default".into(),
        quality: Some("low".into()),
        size: Some("1024x1024".into()),
        n,
        tokens: TokenUsage { input_text: 12, input_image: 0, output: 272 * u64::from(n) },
        cost_breakdown: Some(r#"[{"item":"output","usd":"0.01"}]"#.into()),
        billing_basis: "tokens".into(),
        error_code: None,
        cost_source: Some(CostSource::Priced),
        latency_ms: 1500,
        created_at: db.now(),
        finished_at: db.now() + TimeDelta::milliseconds(1500),
    }
}

async fn key_with(db: &Db, budget: Option<Budget>, project_id: Option<&str>) -> ApiKey {
    let new = NewKey { budget, project_id: project_id.map(str::to_owned), ..NewKey::user("test") };
    db.ledger.create_key(new).await.unwrap().key
}

async fn reserved(db: &Db, key: &ApiKey, request_id: &str, worst_case: &str, images: u32) -> Reservation {
    match db.ledger.reserve(&key.id, request_id, usd(worst_case), images).await.unwrap() {
        Reserve::Reserved(r) => r,
        Reserve::Refused(refusal) => panic!("{request_id}: refused: {refusal:?}"),
    }
}

async fn refused(db: &Db, key: &ApiKey, worst_case: &str, images: u32) -> ledger::Refusal {
    match db.ledger.reserve(&key.id, "refused", usd(worst_case), images).await.unwrap() {
        Reserve::Refused(refusal) => refusal,
        Reserve::Reserved(r) => panic!("reserved, expected a refusal: {r:?}"),
    }
}

/// (spent, reserved) of the key's budget now.
async fn key_money(db: &Db, key: &ApiKey) -> (Decimal, Decimal) {
    let usage = db.ledger.key_budget_usage(&key.id).await.unwrap().unwrap();
    (usage.spent_usd, usage.reserved_usd)
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// 50 concurrent requests against a budget that affords exactly 10: exactly 10 run.
async fn burst_never_overspends(db: &Db) {
    let cost = usd("0.04");
    let key = key_with(db, Some(Budget::capped(Period::Month, cost * Decimal::from(10))), None).await;

    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let ledger = db.ledger.clone();
            let key_id = key.id.clone();
            let entry = entry(db, &format!("req_{i}"), "gpt-image-1", 1);
            tokio::spawn(async move {
                match ledger.reserve(&key_id, &entry.request_id, cost, 1).await.unwrap() {
                    Reserve::Reserved(reservation) => {
                        tokio::time::sleep(Duration::from_millis(5 + i % 20)).await;
                        ledger.settle(reservation, cost, &entry).await.unwrap();
                        true
                    }
                    Reserve::Refused(refusal) => {
                        assert_eq!(refusal.worst_case_usd, cost);
                        assert!(refusal.remaining_usd() < cost, "{refusal:?}");
                        false
                    }
                }
            })
        })
        .collect();
    let mut succeeded = 0;
    for task in tasks {
        succeeded += usize::from(task.await.unwrap());
    }

    assert_eq!(succeeded, 10, "exactly the affordable requests run");
    let usage = db.ledger.key_budget_usage(&key.id).await.unwrap().unwrap();
    assert_eq!(usage.spent_usd, cost * Decimal::from(10));
    assert!(usage.spent_usd <= usage.budget.limit_usd.unwrap());
    assert_eq!(usage.reserved_usd, Decimal::ZERO);
    assert_eq!((usage.images_spent, usage.images_reserved), (10, 0));
    let far_future = db.now() + TimeDelta::days(365);
    assert_eq!(db.ledger.release_expired(far_future).await.unwrap(), 0, "no reservation left behind");
    let rows = db.ledger.entries(db.now() - TimeDelta::days(1), 100).await.unwrap();
    assert_eq!(rows.len(), 10);
    assert!(rows.iter().all(|r| r.status == RequestStatus::Succeeded && r.cost_usd == cost));
}

/// A daily budget resets at midnight UTC; a reservation made before midnight settles into its own day.
async fn day_boundary_resets_and_keeps_periods_apart(db: &Db) {
    let key = key_with(db, Some(Budget::capped(Period::Day, usd("0.10"))), None).await;
    db.set("2025-03-05T23:58:00Z");
    let r = reserved(db, &key, "a", "0.06", 1).await;
    db.ledger.settle(r, usd("0.06"), &entry(db, "a", "m", 1)).await.unwrap();
    let refusal = refused(db, &key, "0.06", 1).await;
    assert_eq!(refusal.reason, RefusalReason::Budget);
    assert_eq!(refusal.remaining_usd(), usd("0.04"));
    assert_eq!(refusal.worst_case_usd, usd("0.06"));
    assert_eq!(refusal.usage.resets_at, Some(at("2025-03-06T00:00:00Z")));

    db.set("2025-03-05T23:59:59.999Z");
    let before_midnight = reserved(db, &key, "b", "0.03", 1).await;

    db.set("2025-03-06T00:00:00Z");
    assert_eq!(key_money(db, &key).await, (Decimal::ZERO, Decimal::ZERO), "a new day starts empty");
    let after_midnight = reserved(db, &key, "c", "0.10", 1).await;
    db.ledger.settle(before_midnight, usd("0.025"), &entry(db, "b", "m", 1)).await.unwrap();
    assert_eq!(key_money(db, &key).await, (Decimal::ZERO, usd("0.10")), "yesterday's settle left today alone");
    db.ledger.settle(after_midnight, usd("0.10"), &entry(db, "c", "m", 1)).await.unwrap();
    assert_eq!(key_money(db, &key).await, (usd("0.10"), Decimal::ZERO));

    db.set("2025-03-05T12:00:00Z");
    assert_eq!(key_money(db, &key).await, (usd("0.085"), Decimal::ZERO), "yesterday holds its own settle");
}

async fn month_boundary_resets(db: &Db) {
    let budget = Budget { image_quota: Some(3), ..Budget::capped(Period::Month, usd("1")) };
    let key = key_with(db, Some(budget), None).await;
    db.set("2025-01-31T23:00:00Z");
    let r = reserved(db, &key, "a", "1", 3).await;
    db.ledger.settle(r, usd("1"), &entry(db, "a", "m", 3)).await.unwrap();
    let refusal = refused(db, &key, "0.000000001", 0).await;
    assert_eq!(refusal.reason, RefusalReason::Budget);
    assert_eq!(refusal.remaining_usd(), Decimal::ZERO);
    assert_eq!(refusal.usage.period_start, at("2025-01-01T00:00:00Z"));
    assert_eq!(refusal.usage.resets_at, Some(at("2025-02-01T00:00:00Z")));

    db.set("2025-02-01T00:00:00Z");
    let r = reserved(db, &key, "b", "1", 3).await;
    db.ledger.settle(r, usd("0.5"), &entry(db, "b", "m", 3)).await.unwrap();
    let usage = db.ledger.key_budget_usage(&key.id).await.unwrap().unwrap();
    assert_eq!((usage.spent_usd, usage.images_spent), (usd("0.5"), 3));
    assert_eq!(usage.resets_at, Some(at("2025-03-01T00:00:00Z")));
}

async fn soft_threshold_is_reported(db: &Db) {
    let budget = Budget { soft_limit_usd: Some(usd("0.10")), ..Budget::capped(Period::Total, usd("1")) };
    let key = key_with(db, Some(budget), None).await;

    let r = reserved(db, &key, "a", "0.06", 1).await;
    assert!(!r.over_soft_limit);
    let s = db.ledger.settle(r, usd("0.06"), &entry(db, "a", "m", 1)).await.unwrap();
    assert!(!s.over_soft_limit && !s.crossed_soft_limit, "{s:?}");

    let r = reserved(db, &key, "b", "0.06", 1).await;
    assert!(!r.over_soft_limit, "settled spending (0.06) is still below 0.10");
    let s = db.ledger.settle(r, usd("0.04"), &entry(db, "b", "m", 1)).await.unwrap();
    assert!(s.over_soft_limit && s.crossed_soft_limit, "0.06 + 0.04 reaches 0.10: {s:?}");
    assert_eq!(s.charged_usd, usd("0.04"));

    let r = reserved(db, &key, "c", "0.06", 1).await;
    assert!(r.over_soft_limit);
    let s = db.ledger.settle(r, usd("0.01"), &entry(db, "c", "m", 1)).await.unwrap();
    assert!(s.over_soft_limit && !s.crossed_soft_limit, "crossed once only: {s:?}");
}

async fn image_quota_is_enforced(db: &Db) {
    let budget = Budget { period: Period::Month, limit_usd: None, soft_limit_usd: None, image_quota: Some(5) };
    let key = key_with(db, Some(budget), None).await;
    let first = reserved(db, &key, "a", "0.5", 3).await;
    let refusal = refused(db, &key, "0.01", 3).await;
    assert_eq!(refusal.reason, RefusalReason::ImageQuota);
    assert_eq!(refusal.usage.remaining_images(), Some(2));
    assert_eq!(refusal.images, 3);
    db.ledger.settle(first, usd("0.5"), &entry(db, "a", "m", 3)).await.unwrap();
    let second = reserved(db, &key, "b", "0.5", 2).await;
    assert_eq!(refused(db, &key, "0", 1).await.reason, RefusalReason::ImageQuota);
    db.ledger.release(second, Decimal::ZERO, &entry(db, "b", "m", 0)).await.unwrap();
    let usage = db.ledger.key_budget_usage(&key.id).await.unwrap().unwrap();
    assert_eq!((usage.images_spent, usage.images_reserved, usage.remaining_images()), (3, 0, Some(2)));
}

async fn project_budget_is_shared_by_its_keys(db: &Db) {
    let project = db
        .ledger
        .create_project(NewProject { name: "team".into(), budget: Some(Budget::capped(Period::Week, usd("0.10"))) })
        .await
        .unwrap();
    let a = key_with(db, Some(Budget::capped(Period::Day, usd("1"))), Some(&project.id)).await;
    let b = key_with(db, None, Some(&project.id)).await;
    let big = key_with(db, Some(Budget::capped(Period::Day, usd("0.05"))), Some(&project.id)).await;

    let r = reserved(db, &a, "a", "0.06", 1).await;
    db.ledger.settle(r, usd("0.06"), &entry(db, "a", "m", 1)).await.unwrap();

    let refusal = refused(db, &b, "0.06", 1).await;
    assert_eq!(refusal.usage.owner, BudgetOwner::Project(project.id.clone()));
    assert_eq!(refusal.remaining_usd(), usd("0.04"));

    // The key's own cap is checked first and named as the reason.
    let refusal = refused(db, &big, "0.06", 1).await;
    assert_eq!(refusal.usage.owner, BudgetOwner::Key(big.id.clone()));

    // Refused by the project: the key's hold taken just before is rolled back with it.
    refused(db, &a, "0.05", 1).await;
    assert_eq!(key_money(db, &a).await, (usd("0.06"), Decimal::ZERO));

    let r = reserved(db, &b, "b", "0.04", 1).await;
    assert_eq!(r.project_id.as_deref(), Some(project.id.as_str()));
    db.ledger.settle(r, usd("0.04"), &entry(db, "b", "m", 1)).await.unwrap();
    let usage = db.ledger.project_budget_usage(&project.id).await.unwrap().unwrap();
    assert_eq!((usage.spent_usd, usage.reserved_usd, usage.remaining_usd()), (usd("0.10"), usd("0"), Some(usd("0"))));
    assert_eq!(usage.period_start, at("2025-03-03T00:00:00Z"), "weeks start on Monday");

    let rows = db.ledger.entries_for_request("b").await.unwrap();
    assert_eq!(rows[0].project_id.as_deref(), Some(project.id.as_str()));
    assert_eq!(rows[0].key_id.as_deref(), Some(b.id.as_str()));
}

async fn secrets_authenticate_until_revoked(db: &Db) {
    let created = db.ledger.create_key(NewKey { scope: Scope::Admin, ..NewKey::user("ci") }).await.unwrap();
    let secret = created.secret.clone();
    assert!(secret.starts_with(&created.key.prefix) && created.key.prefix.len() == 11);
    assert!(!format!("{created:?}").contains(&secret[11..]), "Debug hides the secret");
    let other = db.ledger.create_key(NewKey::user("other")).await.unwrap();

    let found = db.ledger.authenticate(&secret).await.unwrap().unwrap();
    assert_eq!(found, created.key);
    assert_eq!(found.scope, Scope::Admin);
    assert_eq!(db.ledger.authenticate(&other.secret).await.unwrap().unwrap().id, other.key.id);

    let last = secret.chars().last().unwrap();
    let wrong_last = format!("{}{}", &secret[..secret.len() - 1], if last == 'a' { 'b' } else { 'a' });
    let same_prefix_wrong_rest = format!("{}{}", &secret[..11], "x".repeat(secret.len() - 11));
    for wrong in [
        wrong_last.as_str(),
        same_prefix_wrong_rest.as_str(),
        &secret[..secret.len() - 1],
        &format!("{secret}x"),
        &secret[..11],
        "ig-",
        "",
        "sk-proj-whatever",
        &secret.replacen("ig-", "xx-", 1),
    ] {
        assert_eq!(db.ledger.authenticate(wrong).await.unwrap(), None, "{wrong:?}");
    }

    let revoked = db.ledger.revoke_key(&created.key.id).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(db.now()));
    assert_eq!(db.ledger.authenticate(&secret).await.unwrap(), None, "revoked keys fail at once");
    assert!(db.ledger.authenticate(&other.secret).await.unwrap().is_some(), "other keys are unaffected");
    let err = db.ledger.reserve(&created.key.id, "r", usd("0.01"), 1).await.unwrap_err();
    assert!(matches!(err, LedgerError::KeyRevoked(_)), "{err}");
    db.clock.advance(TimeDelta::seconds(5));
    assert_eq!(db.ledger.revoke_key(&created.key.id).await.unwrap().revoked_at, revoked.revoked_at);
}

async fn console_sessions_last_until_they_expire_end_or_their_key_is_revoked(db: &Db) {
    let admin = db.ledger.create_key(NewKey { scope: Scope::Admin, ..NewKey::user("ops") }).await.unwrap();
    let secret = db.ledger.start_session(&admin.key.id, TimeDelta::hours(12)).await.unwrap();
    assert!(secret.starts_with("igs_") && secret.len() == 52, "{secret}");
    assert_eq!(db.ledger.session_key(&secret).await.unwrap().unwrap().id, admin.key.id);
    for wrong in [&secret[..51], "igs_", "", admin.secret.as_str()] {
        assert_eq!(db.ledger.session_key(wrong).await.unwrap(), None, "{wrong:?}");
    }
    // Expired: gone, and the sweep deletes it.
    db.clock.advance(TimeDelta::hours(12));
    assert_eq!(db.ledger.session_key(&secret).await.unwrap(), None);
    assert_eq!(db.ledger.delete_expired_sessions().await.unwrap(), 1);
    // Ended.
    let secret = db.ledger.start_session(&admin.key.id, TimeDelta::hours(12)).await.unwrap();
    let other = db.ledger.start_session(&admin.key.id, TimeDelta::hours(12)).await.unwrap();
    db.ledger.end_session(&secret).await.unwrap();
    assert_eq!(db.ledger.session_key(&secret).await.unwrap(), None);
    assert!(db.ledger.session_key(&other).await.unwrap().is_some(), "other sessions are unaffected");
    // Its key revoked: every session of it ends at once.
    db.ledger.revoke_key(&admin.key.id).await.unwrap();
    assert_eq!(db.ledger.session_key(&other).await.unwrap(), None);
}

async fn static_keys_are_imported_by_digest(db: &Db) {
    use sha2::Digest;
    let digest: [u8; 32] = sha2::Sha256::digest(b"sk-operator-chosen").into();
    let imported = db.ledger.import_key("static-1", &digest, Scope::User).await.unwrap();
    assert!(imported.prefix.starts_with("sha256:"), "{}", imported.prefix);
    // Importing again (another instance starting, a restart) finds the same key.
    assert_eq!(db.ledger.import_key("static-1", &digest, Scope::User).await.unwrap().id, imported.id);
    assert_eq!(db.ledger.list_keys().await.unwrap().len(), 1);
    assert_eq!(db.ledger.authenticate("sk-operator-chosen").await.unwrap().unwrap().id, imported.id);
    assert_eq!(db.ledger.authenticate("sk-operator-chose").await.unwrap(), None);
    db.ledger.revoke_key(&imported.id).await.unwrap();
    assert_eq!(db.ledger.authenticate("sk-operator-chosen").await.unwrap(), None);
}

async fn expired_reservations_are_released(db: &Db) {
    let key = key_with(db, Some(Budget::capped(Period::Total, usd("0.10"))), None).await;
    let stale = reserved(db, &key, "crashed", "0.10", 1).await;
    assert_eq!(stale.expires_at, db.now() + TimeDelta::minutes(10));
    refused(db, &key, "0.01", 1).await;

    // Not yet expired: nothing to release.
    db.clock.advance(TimeDelta::minutes(9));
    assert_eq!(db.ledger.release_expired(db.now()).await.unwrap(), 0);
    refused(db, &key, "0.01", 1).await;

    db.clock.advance(TimeDelta::minutes(1));
    assert_eq!(db.ledger.release_expired(db.now()).await.unwrap(), 1);
    assert_eq!(key_money(db, &key).await, (Decimal::ZERO, Decimal::ZERO));
    let fresh = reserved(db, &key, "fresh", "0.10", 1).await;

    // The "crashed" request finishes after all, while the fresh request holds the whole budget: it
    // is charged only what fits under the cap (nothing), so the budget is never overrun.
    let s = db.ledger.settle(stale, usd("0.02"), &entry(db, "crashed", "m", 1)).await.unwrap();
    assert!(s.reservation_expired);
    assert_eq!(s.charged_usd, Decimal::ZERO);
    let (spent, held) = key_money(db, &key).await;
    assert!(spent + held <= usd("0.10"), "spent {spent} + held {held} passed the cap");
    assert_eq!((spent, held), (Decimal::ZERO, usd("0.10")));
    let rows = db.ledger.entries_for_request("crashed").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].cost_usd, rows[0].entry.error_code.as_deref()), (Decimal::ZERO, Some("hold_expired")));

    // With room under the cap, a late finish is charged in full (never more than its hold).
    db.ledger.settle(fresh, usd("0.03"), &entry(db, "fresh", "m", 1)).await.unwrap();
    let late = reserved(db, &key, "late", "0.05", 1).await;
    db.clock.advance(TimeDelta::minutes(10));
    assert_eq!(db.ledger.release_expired(db.now()).await.unwrap(), 1);
    let s = db.ledger.settle(late, usd("0.04"), &entry(db, "late", "m", 1)).await.unwrap();
    assert_eq!((s.charged_usd, s.reservation_expired), (usd("0.04"), true));
    assert_eq!(key_money(db, &key).await, (usd("0.07"), Decimal::ZERO));

    // Expired holds are also released on connect.
    let orphan = reserved(db, &key, "orphan", "0.03", 1).await;
    drop(orphan);
    db.clock.advance(TimeDelta::hours(1));
    let restarted = db.another_instance().await;
    assert_eq!(key_money(db, &key).await, (usd("0.07"), Decimal::ZERO));
    restarted.close().await;
}

/// A hold lives as long as its instance's heartbeat, however long the request runs; when the
/// instance dies, another instance's sweep frees it, writes the request's row with what it had
/// charged, and forgets its in-flight idempotency entry.
async fn heartbeats_keep_live_holds_and_sweeps_finish_dead_ones(db: &Db) {
    let key = key_with(db, Some(Budget::capped(Period::Total, usd("1"))), None).await;
    let fp = ledger::fingerprint(b"job");
    assert_eq!(db.ledger.begin_idempotent(&key.id, "idem", &fp).await.unwrap(), Idempotency::New);
    let request = HeldRequest {
        request_id: "long".into(),
        operation: "generation".into(),
        // A shut-down model's request served by its replacement: the row keeps both names.
        model: "gpt-image-2".into(),
        requested_model: Some("gpt-image-1-mini".into()),
        provider: "openai".into(),
        tier: "default".into(),
        billing_basis: "tokens".into(),
        idempotency_key: Some("idem".into()),
    };
    let Reserve::Reserved(mut live) = db.ledger.reserve_request(&key.id, &request, usd("0.5"), 4).await.unwrap() else {
        panic!("refused")
    };
    let other = db.another_instance().await;

    // Three TTLs go by; the heartbeat every 5 minutes keeps the hold and the idempotency entry.
    for _ in 0..6 {
        db.clock.advance(TimeDelta::minutes(5));
        assert_eq!(db.ledger.heartbeat().await.unwrap(), 1);
        assert_eq!(other.heartbeat().await.unwrap(), 0, "another instance renews only its own holds");
        assert_eq!(other.release_expired(db.now()).await.unwrap(), 0);
    }
    assert_eq!(db.ledger.begin_idempotent(&key.id, "idem", &fp).await.unwrap(), Idempotency::InFlight);
    assert_eq!(key_money(db, &key).await, (Decimal::ZERO, usd("0.5")));

    // Two images delivered: charged at once, out of the hold.
    assert_eq!(db.ledger.charge(&mut live, usd("0.1"), 1).await.unwrap(), usd("0.1"));
    assert_eq!(db.ledger.charge(&mut live, usd("0.1"), 1).await.unwrap(), usd("0.1"));
    assert_eq!(key_money(db, &key).await, (usd("0.2"), usd("0.3")));
    assert_eq!(live.charged_usd(), usd("0.2"));

    // The instance dies (no more heartbeats): after a TTL the other instance frees what is left.
    db.clock.advance(TimeDelta::minutes(9));
    assert_eq!(other.release_expired(db.now()).await.unwrap(), 0);
    db.clock.advance(TimeDelta::minutes(1));
    assert_eq!(other.release_expired(db.now()).await.unwrap(), 1);
    assert_eq!(key_money(db, &key).await, (usd("0.2"), Decimal::ZERO));
    let usage = db.ledger.key_budget_usage(&key.id).await.unwrap().unwrap();
    assert_eq!((usage.images_spent, usage.images_reserved), (2, 0));
    let rows = db.ledger.entries_for_request("long").await.unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!((row.status, row.cost_usd, row.entry.n), (RequestStatus::Failed, usd("0.2"), 2));
    assert_eq!(row.entry.error_code.as_deref(), Some("instance_died"));
    assert_eq!(row.entry.cost_source, Some(CostSource::Priced));
    let e = &row.entry;
    assert_eq!(
        (e.model.as_str(), e.requested_model.as_deref(), e.provider.as_str()),
        ("gpt-image-2", Some("gpt-image-1-mini"), "openai")
    );
    assert_eq!(row.key_id.as_deref(), Some(key.id.as_str()));
    // The retry after the crash runs at once.
    assert_eq!(db.ledger.begin_idempotent(&key.id, "idem", &fp).await.unwrap(), Idempotency::New);
    other.close().await;
}

/// Progressive charges never pass the hold, and the final settle charges the rest exactly once.
async fn charges_as_it_goes_stay_within_the_hold(db: &Db) {
    let key = key_with(db, Some(Budget::capped(Period::Total, usd("1"))), None).await;
    let mut r = reserved(db, &key, "stream", "0.25", 3).await;
    assert_eq!(db.ledger.charge(&mut r, usd("0.1"), 1).await.unwrap(), usd("0.1"));
    assert_eq!(db.ledger.charge(&mut r, usd("0.1"), 1).await.unwrap(), usd("0.1"));
    // The third image would pass the hold: only what is left of it is charged.
    assert_eq!(db.ledger.charge(&mut r, usd("0.1"), 1).await.unwrap(), usd("0.05"));
    assert_eq!(r.remaining_usd(), Decimal::ZERO);
    assert_eq!(key_money(db, &key).await, (usd("0.25"), Decimal::ZERO));
    let mut done = entry(db, "stream", "m", 3);
    done.cost_source = Some(CostSource::Capped);
    let s = db.ledger.settle(r, usd("0.3"), &done).await.unwrap();
    assert_eq!(s.charged_usd, usd("0.25"));
    assert_eq!(key_money(db, &key).await, (usd("0.25"), Decimal::ZERO));
    let rows = db.ledger.entries_for_request("stream").await.unwrap();
    assert_eq!((rows.len(), rows[0].cost_usd), (1, usd("0.25")));

    // A stream abandoned after one image: released with what it delivered.
    let mut r = reserved(db, &key, "abandoned", "0.3", 3).await;
    db.ledger.charge(&mut r, usd("0.1"), 1).await.unwrap();
    let mut gone = entry(db, "abandoned", "m", 1);
    gone.error_code = Some("client_disconnected".into());
    let s = db.ledger.release(r, usd("0.1"), &gone).await.unwrap();
    assert_eq!(s.charged_usd, usd("0.1"));
    assert_eq!(key_money(db, &key).await, (usd("0.35"), Decimal::ZERO));
    let usage = db.ledger.key_budget_usage(&key.id).await.unwrap().unwrap();
    assert_eq!((usage.images_spent, usage.images_reserved), (4, 0));

    // A hold swept while its request still ran (its instance looked dead): later charges together take
    // at most what the hold was, never the whole rest of it each.
    let mut r = reserved(db, &key, "swept", "0.2", 3).await;
    db.clock.advance(chrono::TimeDelta::hours(2));
    db.ledger.release_expired(db.now()).await.unwrap();
    let first = db.ledger.charge(&mut r, usd("0.15"), 1).await.unwrap();
    let second = db.ledger.charge(&mut r, usd("0.15"), 1).await.unwrap();
    assert_eq!(first + second, usd("0.2"), "{first} + {second}");
}

async fn release_frees_the_hold_and_records_a_failure(db: &Db) {
    let key = key_with(db, Some(Budget::capped(Period::Total, usd("1"))), None).await;
    let r = reserved(db, &key, "f1", "0.5", 2).await;
    let mut failed = entry(db, "f1", "m", 0);
    failed.error_code = Some("upstream_error".into());
    let s = db.ledger.release(r, Decimal::ZERO, &failed).await.unwrap();
    assert_eq!(s.charged_usd, Decimal::ZERO);
    assert_eq!(key_money(db, &key).await, (Decimal::ZERO, Decimal::ZERO));

    let r = reserved(db, &key, "f2", "0.5", 2).await;
    db.ledger.release(r, usd("0.003"), &entry(db, "f2", "m", 0)).await.unwrap();
    assert_eq!(key_money(db, &key).await, (usd("0.003"), Decimal::ZERO));

    let rows = db.ledger.entries_for_request("f1").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].status, rows[0].cost_usd), (RequestStatus::Failed, Decimal::ZERO));
    assert_eq!(rows[0].entry, failed);
    let usage = db.ledger.key_budget_usage(&key.id).await.unwrap().unwrap();
    assert_eq!(usage.images_spent, 0, "failed requests use no image quota");

    // Refusals are recorded without touching any budget.
    let mut refusal = entry(db, "f3", "m", 1);
    refusal.error_code = Some("insufficient_quota".into());
    db.ledger.record(Some(&key.id), RequestStatus::Refused, Decimal::ZERO, &refusal).await.unwrap();
    assert_eq!(db.ledger.entries_for_request("f3").await.unwrap()[0].status, RequestStatus::Refused);
    assert_eq!(key_money(db, &key).await, (usd("0.003"), Decimal::ZERO));

    // A row served by another model than the one asked for keeps both names.
    let mut replaced = entry(db, "f4", "sd-turbo", 0);
    replaced.requested_model = Some("gpt-image-1-mini".into());
    replaced.error_code = Some("upstream_error".into());
    db.ledger.record(Some(&key.id), RequestStatus::Failed, Decimal::ZERO, &replaced).await.unwrap();
    assert_eq!(db.ledger.entries_for_request("f4").await.unwrap()[0].entry, replaced);
}

async fn idempotency_states(db: &Db) {
    let l = &db.ledger;
    let fp = ledger::fingerprint(b"POST /v1/images/generations {\"prompt\":\"a cat\"}");
    let other_fp = ledger::fingerprint(b"POST /v1/images/generations {\"prompt\":\"a dog\"}");
    assert_eq!(l.begin_idempotent("key_a", "i1", &fp).await.unwrap(), Idempotency::New);
    assert_eq!(l.begin_idempotent("key_a", "i1", &fp).await.unwrap(), Idempotency::InFlight);
    assert_eq!(l.begin_idempotent("key_a", "i1", &other_fp).await.unwrap(), Idempotency::Mismatch);
    assert_eq!(l.begin_idempotent("key_b", "i1", &fp).await.unwrap(), Idempotency::New, "per API key");

    l.complete_idempotent("key_a", "i1", r#"{"request_id":"req_1"}"#, Some("0.011")).await.unwrap();
    let replay = Idempotency::Completed(ledger::StoredResponse {
        body: r#"{"request_id":"req_1"}"#.into(),
        cost_usd: Some("0.011".into()),
        request_id: None,
    });
    assert_eq!(l.begin_idempotent("key_a", "i1", &fp).await.unwrap(), replay);
    assert_eq!(l.begin_idempotent("key_a", "i1", &other_fp).await.unwrap(), Idempotency::Mismatch);

    // A failed request frees its key for a retry.
    l.fail_idempotent("key_b", "i1").await.unwrap();
    assert_eq!(l.begin_idempotent("key_b", "i1", &fp).await.unwrap(), Idempotency::New);
    // Failing a completed entry does not erase it.
    l.fail_idempotent("key_a", "i1").await.unwrap();
    assert_eq!(l.begin_idempotent("key_a", "i1", &fp).await.unwrap(), replay);

    // An abandoned in-flight entry is taken over after its TTL (5 minutes here).
    db.clock.advance(TimeDelta::minutes(4));
    assert_eq!(l.begin_idempotent("key_b", "i1", &fp).await.unwrap(), Idempotency::InFlight);
    db.clock.advance(TimeDelta::minutes(2));
    assert_eq!(l.begin_idempotent("key_b", "i1", &other_fp).await.unwrap(), Idempotency::New);

    // Completed entries are replayed for the retention (a day), then forgotten.
    db.clock.advance(TimeDelta::hours(23));
    assert_eq!(l.begin_idempotent("key_a", "i1", &fp).await.unwrap(), replay);
    db.clock.advance(TimeDelta::hours(1));
    l.release_expired(db.now()).await.unwrap();
    assert_eq!(l.begin_idempotent("key_a", "i1", &other_fp).await.unwrap(), Idempotency::New);

    // Exactly one of many concurrent claims wins.
    let claims: Vec<_> = (0..16)
        .map(|_| {
            let l = l.clone();
            let fp = fp.clone();
            tokio::spawn(async move { l.begin_idempotent("key_c", "race", &fp).await.unwrap() })
        })
        .collect();
    let mut new = 0;
    for claim in claims {
        match claim.await.unwrap() {
            Idempotency::New => new += 1,
            other => assert_eq!(other, Idempotency::InFlight),
        }
    }
    assert_eq!(new, 1);
}

async fn rate_limit_window_holds_across_instances(db: &Db) {
    let limits = RateLimits { requests_per_minute: Some(3), images_per_minute: Some(5) };
    let key = db.ledger.create_key(NewKey { rate_limits: limits, ..NewKey::user("limited") }).await.unwrap().key;
    let other = db.another_instance().await;
    db.set("2025-03-05T12:00:10Z");

    assert_eq!(db.ledger.check_rate_limit(&key, 1).await.unwrap(), RateLimit::Allowed);
    assert_eq!(other.check_rate_limit(&key, 1).await.unwrap(), RateLimit::Allowed);
    assert_eq!(db.ledger.check_rate_limit(&key, 1).await.unwrap(), RateLimit::Allowed);
    let limited = RateLimit::Limited { kind: RateLimitKind::Requests, per_minute: 3, retry_after_secs: 50 };
    assert_eq!(other.check_rate_limit(&key, 1).await.unwrap(), limited, "the other instance sees the count");
    db.set("2025-03-05T12:00:59.001Z");
    let limited = RateLimit::Limited { kind: RateLimitKind::Requests, per_minute: 3, retry_after_secs: 1 };
    assert_eq!(db.ledger.check_rate_limit(&key, 1).await.unwrap(), limited);

    // The next minute is a new window: images count too, and a refused request counts nothing.
    db.set("2025-03-05T12:01:00Z");
    assert_eq!(db.ledger.check_rate_limit(&key, 4).await.unwrap(), RateLimit::Allowed);
    let limited = RateLimit::Limited { kind: RateLimitKind::Images, per_minute: 5, retry_after_secs: 60 };
    assert_eq!(other.check_rate_limit(&key, 2).await.unwrap(), limited);
    assert_eq!(other.check_rate_limit(&key, 1).await.unwrap(), RateLimit::Allowed);
    assert_eq!(other.check_rate_limit(&key, 0).await.unwrap(), RateLimit::Allowed);
    assert!(matches!(other.check_rate_limit(&key, 0).await.unwrap(), RateLimit::Limited { .. }));

    // Concurrent requests: exactly the limit gets through.
    db.set("2025-03-05T12:02:00Z");
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let ledger = if i % 2 == 0 { db.ledger.clone() } else { other.clone() };
            let key = key.clone();
            tokio::spawn(async move { ledger.check_rate_limit(&key, 0).await.unwrap() == RateLimit::Allowed })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += usize::from(task.await.unwrap());
    }
    assert_eq!(allowed, 3);

    let unlimited = db.ledger.create_key(NewKey::user("free")).await.unwrap().key;
    for _ in 0..10 {
        assert_eq!(db.ledger.check_rate_limit(&unlimited, 10).await.unwrap(), RateLimit::Allowed);
    }
    other.close().await;
}

async fn usage_sums_match_the_rows(db: &Db) {
    let project = db.ledger.create_project(NewProject { name: "p".into(), budget: None }).await.unwrap();
    let k1 = key_with(db, Some(Budget::capped(Period::Month, usd("100"))), Some(&project.id)).await;
    let k2 = key_with(db, None, None).await;

    // (time, key, model, n, cost, status)
    let plan = [
        ("2025-03-04T10:15:00Z", Some(&k1), "gpt-image-1", 1, "0.011", RequestStatus::Succeeded),
        ("2025-03-04T10:45:00Z", Some(&k1), "gpt-image-1", 2, "0.022", RequestStatus::Succeeded),
        ("2025-03-04T11:05:00Z", Some(&k2), "sd-turbo", 4, "0.0004", RequestStatus::Succeeded),
        ("2025-03-04T23:59:59.999Z", Some(&k2), "gpt-image-1", 1, "0.005", RequestStatus::Failed),
        ("2025-03-05T00:00:00Z", Some(&k1), "sd-turbo", 1, "0.0001", RequestStatus::Succeeded),
        ("2025-03-05T09:30:00Z", None, "sd-turbo", 2, "0.0002", RequestStatus::Succeeded),
        ("2025-03-05T09:31:00Z", Some(&k2), "gpt-image-1", 1, "0", RequestStatus::Refused),
    ];
    let mut written = Vec::new();
    for (i, (time, key, model, n, cost, status)) in plan.iter().enumerate() {
        db.set(time);
        let e = entry(db, &format!("u{i}"), model, *n);
        match (key, status) {
            (Some(key), RequestStatus::Succeeded) => {
                let r = reserved(db, key, &e.request_id, cost, *n).await;
                db.ledger.settle(r, usd(cost), &e).await.unwrap();
            }
            (Some(key), RequestStatus::Failed) => {
                let r = reserved(db, key, &e.request_id, cost, *n).await;
                db.ledger.release(r, usd(cost), &e).await.unwrap();
            }
            (key, status) => {
                db.ledger.record(key.map(|k| k.id.as_str()), *status, usd(cost), &e).await.unwrap();
            }
        }
        let project_id = key.and_then(|k| k.project_id.clone());
        written.push((e, key.map(|k| k.id.clone()), project_id, *status, usd(cost)));
    }
    db.set("2025-03-05T12:00:00Z");

    // Every row reads back as written.
    let rows = db.ledger.entries(at("2025-03-01T00:00:00Z"), 100).await.unwrap();
    assert_eq!(rows.len(), written.len());
    for (row, (e, key_id, project_id, status, cost)) in rows.iter().zip(&written) {
        assert_eq!(
            (&row.entry, &row.key_id, &row.project_id, row.status, row.cost_usd),
            (e, key_id, project_id, *status, *cost)
        );
    }

    // Expected sums, computed from what was written, row by row.
    let expect = |pick: &dyn Fn(usize) -> bool| {
        let mut sum = UsageRow::default();
        for (_, (e, _, _, status, cost)) in written.iter().enumerate().filter(|(i, _)| pick(*i)) {
            sum.requests += 1;
            if *status == RequestStatus::Succeeded {
                sum.succeeded += 1;
                sum.images += u64::from(e.n);
            }
            sum.input_text_tokens += e.tokens.input_text;
            sum.output_tokens += e.tokens.output;
            sum.cost_usd += cost;
        }
        sum
    };
    let sums = |row: &UsageRow| {
        (row.requests, row.succeeded, row.images, row.input_text_tokens, row.output_tokens, row.cost_usd)
    };
    let since = |start: &str, group_by: &[Dimension]| UsageQuery::since(at(start), group_by);

    let total = db.ledger.usage(&since("2025-03-01T00:00:00Z", &[])).await.unwrap();
    assert_eq!(total.len(), 1);
    assert_eq!(sums(&total[0]), sums(&expect(&|_| true)));
    assert_eq!(total[0].cost_usd, usd("0.0387"));

    let by_model = db.ledger.usage(&since("2025-03-01T00:00:00Z", &[Dimension::Model])).await.unwrap();
    assert_eq!(by_model.len(), 2);
    for row in &by_model {
        let model = row.model.clone().unwrap();
        assert_eq!(sums(row), sums(&expect(&|i| written[i].0.model == model)), "{model}");
        assert_eq!((row.key_id.clone(), row.day), (None, None), "not grouped by key or day");
    }

    let by_key = db.ledger.usage(&since("2025-03-01T00:00:00Z", &[Dimension::Key])).await.unwrap();
    assert_eq!(by_key.len(), 3, "k1, k2 and no key");
    for row in &by_key {
        assert_eq!(sums(row), sums(&expect(&|i| written[i].1 == row.key_id)), "{:?}", row.key_id);
    }

    let by_project = db.ledger.usage(&since("2025-03-01T00:00:00Z", &[Dimension::Project])).await.unwrap();
    assert_eq!(by_project.len(), 2);
    for row in &by_project {
        assert_eq!(sums(row), sums(&expect(&|i| written[i].2 == row.project_id)), "{:?}", row.project_id);
    }

    let day = |i: usize| written[i].0.created_at.date_naive();
    let by_day = db.ledger.usage(&since("2025-03-01T00:00:00Z", &[Dimension::Day])).await.unwrap();
    assert_eq!(
        by_day.iter().map(|r| r.day.unwrap()).collect::<Vec<_>>(),
        [at("2025-03-04T00:00:00Z"), at("2025-03-05T00:00:00Z")]
    );
    for row in &by_day {
        let d = row.day.unwrap().date_naive();
        assert_eq!(sums(row), sums(&expect(&|i| day(i) == d)), "{d}");
    }

    let by_model_day =
        db.ledger.usage(&since("2025-03-01T00:00:00Z", &[Dimension::Model, Dimension::Day])).await.unwrap();
    assert_eq!(by_model_day.len(), 4);
    for row in &by_model_day {
        let (model, d) = (row.model.clone().unwrap(), row.day.unwrap().date_naive());
        assert_eq!(sums(row), sums(&expect(&|i| written[i].0.model == model && day(i) == d)), "{model} {d}");
    }

    // The range is [start, end).
    let query =
        UsageQuery { start: at("2025-03-04T10:45:00Z"), end: Some(at("2025-03-05T00:00:00Z")), group_by: vec![] };
    let ranged = db.ledger.usage(&query).await.unwrap();
    assert_eq!(sums(&ranged[0]), sums(&expect(&|i| (1..=3).contains(&i))));

    // Daily buckets from a mid-day start: aligned to midnight, up to now, idle days included.
    let query = UsageQuery { start: at("2025-03-03T08:00:00Z"), end: None, group_by: vec![Dimension::Model] };
    let days = db.ledger.usage_buckets(&query, BucketWidth::Day).await.unwrap();
    let starts: Vec<_> = days.iter().map(|b| (b.start, b.end)).collect();
    assert_eq!(
        starts,
        [
            (at("2025-03-03T00:00:00Z"), at("2025-03-04T00:00:00Z")),
            (at("2025-03-04T00:00:00Z"), at("2025-03-05T00:00:00Z")),
            (at("2025-03-05T00:00:00Z"), at("2025-03-06T00:00:00Z")),
        ]
    );
    assert!(days[0].results.is_empty());
    assert_eq!(days[1].results.len(), 2);
    let cost_of_day = |b: &ledger::UsageBucket| b.results.iter().map(|r| r.cost_usd).sum::<Decimal>();
    assert_eq!(cost_of_day(&days[1]), usd("0.0384"));
    assert_eq!(cost_of_day(&days[2]), usd("0.0003"));

    // Hourly buckets, grouped by key: 10:00 holds two rows of k1.
    let query = UsageQuery {
        start: at("2025-03-04T10:00:00Z"),
        end: Some(at("2025-03-04T13:00:00Z")),
        group_by: vec![Dimension::Key, Dimension::Size, Dimension::Operation],
    };
    let hours = db.ledger.usage_buckets(&query, BucketWidth::Hour).await.unwrap();
    assert_eq!(hours.len(), 3);
    assert_eq!(hours[0].results.len(), 1);
    let first = &hours[0].results[0];
    assert_eq!(first.key_id.as_deref(), Some(k1.id.as_str()));
    assert_eq!((first.size.as_deref(), first.operation.as_deref()), (Some("1024x1024"), Some("generation")));
    assert_eq!((first.requests, first.images, first.cost_usd), (2, 3, usd("0.033")));
    assert_eq!(hours[1].results[0].key_id.as_deref(), Some(k2.id.as_str()));
    assert!(hours[2].results.is_empty());

    let too_many = UsageQuery { start: at("2000-01-01T00:00:00Z"), end: None, group_by: vec![] };
    assert!(matches!(
        db.ledger.usage_buckets(&too_many, BucketWidth::Hour).await,
        Err(LedgerError::InvalidArgument(_))
    ));
}

async fn usage_groups_by_billing_basis(db: &Db) {
    // (model, basis, n, cost)
    let plan = [
        ("gpt-image-1", "tokens", 1, "0.011"),
        ("gpt-image-1", "tokens", 2, "0.022"),
        ("dall-e-3", "per_image", 1, "0.04"),
        ("gpt-image-1", "per_image", 1, "0.042"),
        ("sd-turbo", "compute", 3, "0.0003"),
    ];
    for (i, (model, basis, n, cost)) in plan.iter().enumerate() {
        let e = LedgerEntry { billing_basis: (*basis).into(), ..entry(db, &format!("b{i}"), model, *n) };
        db.ledger.record(None, RequestStatus::Succeeded, usd(cost), &e).await.unwrap();
    }
    let start = at("2025-03-01T00:00:00Z");
    let summary = |rows: Vec<UsageRow>| {
        rows.into_iter().map(|r| (r.model, r.billing_basis, r.requests, r.images, r.cost_usd)).collect::<Vec<_>>()
    };
    let some = |s: &str| Some(s.to_owned());

    let by_basis = db.ledger.usage(&UsageQuery::since(start, &[Dimension::BillingBasis])).await.unwrap();
    assert_eq!(
        summary(by_basis),
        [
            (None, some("compute"), 1, 3, usd("0.0003")),
            (None, some("per_image"), 2, 2, usd("0.082")),
            (None, some("tokens"), 2, 3, usd("0.033")),
        ]
    );

    let by_model_basis =
        db.ledger.usage(&UsageQuery::since(start, &[Dimension::Model, Dimension::BillingBasis])).await.unwrap();
    assert_eq!(
        summary(by_model_basis),
        [
            (some("dall-e-3"), some("per_image"), 1, 1, usd("0.04")),
            (some("gpt-image-1"), some("per_image"), 1, 1, usd("0.042")),
            (some("gpt-image-1"), some("tokens"), 2, 3, usd("0.033")),
            (some("sd-turbo"), some("compute"), 1, 3, usd("0.0003")),
        ]
    );

    // Not grouped by it: the basis is not reported and does not split the groups.
    let by_model = db.ledger.usage(&UsageQuery::since(start, &[Dimension::Model])).await.unwrap();
    assert_eq!(
        summary(by_model),
        [
            (some("dall-e-3"), None, 1, 1, usd("0.04")),
            (some("gpt-image-1"), None, 3, 4, usd("0.075")),
            (some("sd-turbo"), None, 1, 3, usd("0.0003")),
        ]
    );
}

async fn keys_and_projects_are_managed(db: &Db) {
    let l = &db.ledger;
    assert!(!l.has_keys().await.unwrap());
    let budget = Budget {
        period: Period::Month,
        limit_usd: Some(usd("25.5")),
        soft_limit_usd: Some(usd("20")),
        image_quota: Some(200),
    };
    let project = l.create_project(NewProject { name: "design".into(), budget: Some(budget.clone()) }).await.unwrap();
    assert_eq!(project.budget, Some(budget.clone()));
    let dup = l.create_project(NewProject { name: "design".into(), budget: None }).await.unwrap_err();
    assert!(matches!(dup, LedgerError::ProjectExists(_)), "{dup}");
    assert_eq!(l.project_by_name("design").await.unwrap(), Some(project.clone()));
    assert_eq!(l.project_by_name("nope").await.unwrap(), None);

    let new = NewKey {
        name: "designer".into(),
        scope: Scope::User,
        project_id: Some(project.id.clone()),
        allowed_models: Some(vec!["gpt-image-1".into(), "sd-turbo".into()]),
        budget: Some(Budget::capped(Period::Day, usd("1.000000000"))),
        rate_limits: RateLimits { requests_per_minute: Some(60), images_per_minute: None },
        service_tier: Some("flex".into()),
    };
    let created = l.create_key(new.clone()).await.unwrap();
    let key = created.key.clone();
    assert!(key.id.starts_with("key_"));
    assert_eq!(
        (key.name.as_str(), key.scope, key.project_id.clone()),
        ("designer", Scope::User, Some(project.id.clone()))
    );
    assert_eq!(key.allowed_models, new.allowed_models);
    assert!(key.allows_model("sd-turbo") && !key.allows_model("dall-e-3"));
    assert_eq!(key.budget, new.budget);
    assert_eq!(key.rate_limits, new.rate_limits);
    assert_eq!(key.service_tier.as_deref(), Some("flex"));
    assert_eq!((key.created_at, key.revoked_at), (db.now(), None));
    assert!(l.has_keys().await.unwrap());
    assert_eq!(l.get_key(&key.id).await.unwrap(), key);

    let updated = l
        .update_key(
            &key.id,
            KeyUpdate {
                name: Some("renamed".into()),
                allowed_models: Some(None),
                budget: Some(Some(budget.clone())),
                rate_limits: Some(RateLimits::default()),
                service_tier: Some(None),
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.service_tier, None);
    let gold = KeyUpdate { service_tier: Some(Some("gold".into())), ..KeyUpdate::default() };
    assert!(matches!(l.update_key(&key.id, gold).await, Err(LedgerError::InvalidArgument(_))));
    assert_eq!(updated.allowed_models, None);
    assert!(updated.allows_model("anything"));
    assert_eq!(updated.budget, Some(budget.clone()));
    assert_eq!(updated.rate_limits, RateLimits::default());
    let unchanged = l.update_key(&key.id, KeyUpdate::default()).await.unwrap();
    assert_eq!(unchanged, updated);
    let no_budget = l.update_key(&key.id, KeyUpdate { budget: Some(None), ..KeyUpdate::default() }).await.unwrap();
    assert_eq!(no_budget.budget, None);
    assert_eq!(l.key_budget_usage(&key.id).await.unwrap(), None);

    let p = l.update_project(&project.id, ProjectUpdate { name: Some("ux".into()), budget: Some(None) }).await.unwrap();
    assert_eq!((p.name.as_str(), p.budget.clone()), ("ux", None));
    let second = l.create_project(NewProject { name: "second".into(), budget: None }).await.unwrap();
    let clash = l.update_project(&second.id, ProjectUpdate { name: Some("ux".into()), budget: None }).await;
    assert!(matches!(clash, Err(LedgerError::ProjectExists(_))));
    assert_eq!(l.list_projects().await.unwrap().iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["ux", "second"]);

    let second_key = l.create_key(NewKey::user("second")).await.unwrap().key;
    l.revoke_key(&second_key.id).await.unwrap();
    let listed = l.list_keys().await.unwrap();
    assert_eq!(
        listed.iter().map(|k| (k.name.as_str(), k.revoked_at.is_some())).collect::<Vec<_>>(),
        [("renamed", false), ("second", true)]
    );

    assert!(matches!(l.get_key("key_missing").await, Err(LedgerError::KeyNotFound(_))));
    assert!(matches!(l.revoke_key("key_missing").await, Err(LedgerError::KeyNotFound(_))));
    assert!(matches!(l.update_key("key_missing", KeyUpdate::default()).await, Err(LedgerError::KeyNotFound(_))));
    assert!(matches!(l.reserve("key_missing", "r", usd("1"), 1).await, Err(LedgerError::KeyNotFound(_))));
    let orphan = NewKey { project_id: Some("proj_missing".into()), ..NewKey::user("x") };
    assert!(matches!(l.create_key(orphan).await, Err(LedgerError::ProjectNotFound(_))));
    assert!(matches!(l.create_key(NewKey::user("  ")).await, Err(LedgerError::InvalidArgument(_))));
    let negative = l.reserve(&second_key.id, "r", usd("-1"), 1).await;
    assert!(matches!(negative, Err(LedgerError::InvalidAmount(_))));
}

/// The default database is a WAL-mode SQLite file that a second process can open at once.
#[tokio::test]
async fn sqlite_file_is_created_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data dir #1");
    std::fs::create_dir(&data_dir).unwrap();
    let url = ledger::sqlite_url(&data_dir).unwrap();
    let ledger = Ledger::connect(&url).await.unwrap();
    assert_eq!(ledger.backend(), ledger::Backend::Sqlite);
    assert!(data_dir.join("imagegate.db").is_file());
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
    assert_eq!(mode, "wal");
    conn.close().await.unwrap();
    // Connecting again finds the schema in place.
    let again = Ledger::connect(&url).await.unwrap();
    assert!(!again.has_keys().await.unwrap());
    again.close().await;
    ledger.close().await;
}

async fn stored_images_are_served_until_they_expire(db: &Db) {
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let ttl = chrono::Duration::minutes(60);
    let id = db.ledger.store_image(Some("key_1"), "image/png", &bytes, ttl).await.unwrap();
    let other = db.ledger.store_image(None, "image/webp", b"RIFF", chrono::Duration::minutes(90)).await.unwrap();
    assert!(id.starts_with("img_") && id.len() == 52 && id != other, "{id}");
    let got = db.ledger.stored_image(&id).await.unwrap().unwrap();
    assert_eq!((got.content_type.as_str(), &got.bytes), ("image/png", &bytes));
    assert_eq!(got.expires_at, db.now() + ttl);
    assert!(db.ledger.stored_image("img_nothing").await.unwrap().is_none());
    // Another instance on the same database serves it too.
    let second = db.another_instance().await;
    assert_eq!(second.stored_image(&id).await.unwrap().unwrap().bytes, bytes);
    // At its expiry it is gone, before the sweep deletes it; the sweep deletes only what expired.
    db.clock.advance(ttl);
    assert!(db.ledger.stored_image(&id).await.unwrap().is_none());
    assert_eq!(db.ledger.delete_expired_images().await.unwrap(), 1);
    assert!(db.ledger.stored_image(&other).await.unwrap().is_some());
    second.close().await;
}

async fn batch_lines_are_claimed_once_and_batches_expire(db: &Db) {
    let l = &db.ledger;
    let new = ledger::NewBatch {
        owner: "key_1".into(),
        endpoint: "/v1/images/generations".into(),
        input_file_id: "file-1".into(),
        completion_window: "24h".into(),
        metadata: None,
        window: chrono::Duration::hours(24),
    };
    let lines: Vec<(String, String)> = (0..4).map(|i| (format!("c{i}"), format!("{{\"prompt\":\"{i}\"}}"))).collect();
    let batch = l.create_batch(&new, &lines).await.unwrap();
    assert_eq!((batch.status.as_str(), batch.counts.total), ("in_progress", 4));
    // Another instance on the same database claims what this one has not.
    let other = Ledger::connect_with(&db.url, options(db.clock.clone())).await.unwrap();
    let mine = l.claim_lines(2).await.unwrap();
    let theirs = other.claim_lines(5).await.unwrap();
    let mut claimed: Vec<i64> = mine.iter().chain(&theirs).map(|c| c.line).collect();
    claimed.sort_unstable();
    assert_eq!(claimed, [0, 1, 2, 3]);
    assert!(l.claim_lines(5).await.unwrap().is_empty());
    assert!(l.finish_line(&batch.id, mine[0].line, 200, Some("req_1"), "{}").await.unwrap());
    // A second answer of the same line does not replace the first.
    assert!(!other.finish_line(&batch.id, mine[0].line, 500, Some("req_2"), "{}").await.unwrap());
    // Past the window: the lines not answered yet are given up, and the batch ends expired.
    db.clock.advance(TimeDelta::hours(25));
    l.advance_batches().await.unwrap();
    let expired = l.batch("key_1", &batch.id).await.unwrap().unwrap();
    assert_eq!(expired.status, "expired");
    assert_eq!((expired.counts.completed, expired.counts.failed), (1, 3));
    assert!(expired.expired_at.is_some() && expired.output_file_id.is_some() && expired.error_file_id.is_some());
    let Some(ledger::FileContent::Lines(errors)) =
        l.file_content("key_1", expired.error_file_id.as_deref().unwrap()).await.unwrap()
    else {
        panic!("an error file of lines")
    };
    assert_eq!(errors.len(), 3);
    // A line still running when its batch stopped takes its answer when it comes: it ran and was charged.
    let late = theirs[0].line;
    assert!(other.finish_line(&batch.id, late, 200, Some("req_3"), "{}").await.unwrap());
    let after = l.batch("key_1", &batch.id).await.unwrap().unwrap();
    assert_eq!((after.counts.completed, after.counts.failed), (2, 2));
    // Nothing of it for another owner.
    assert!(l.batch("key_2", &batch.id).await.unwrap().is_none());
    other.close().await;
}
