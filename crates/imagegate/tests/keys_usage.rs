//! `imagegate keys ...` and `imagegate usage` as a user runs them, on a SQLite file in a temporary data
//! dir (and, when `IMAGEGATE_TEST_DATABASE_URL` is set, on PostgreSQL in a schema of its own), checked
//! against what the ledger crate itself reads and writes in the same database.

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Output;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use ledger::testing::TestDatabase;
use ledger::{Decimal, Ledger, LedgerEntry, Period, RequestStatus, Reserve, TokenUsage};

/// Runs the binary on the database `db` (a URL) or else the default SQLite file in `dir`.
fn imagegate(args: &[&str], dir: &Path, db: Option<&str>) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imagegate"));
    cmd.args(args)
        .current_dir(dir)
        .env("IMAGEGATE_DATA_DIR", dir)
        .env_remove("IMAGEGATE_DATABASE_URL")
        .env_remove("IMAGEGATE_CONFIG")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL");
    if let Some(url) = db {
        cmd.env("IMAGEGATE_DATABASE_URL", url);
    }
    cmd.output().unwrap()
}

/// Stdout of a run that must succeed.
fn ok(args: &[&str], dir: &Path, db: Option<&str>) -> String {
    let out = imagegate(args, dir, db);
    assert!(out.status.success(), "imagegate {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Stderr of a run that must fail.
fn fails(args: &[&str], dir: &Path, db: Option<&str>) -> String {
    let out = imagegate(args, dir, db);
    assert!(!out.status.success(), "imagegate {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

fn usd(amount: &str) -> Decimal {
    Decimal::from_str(amount).unwrap()
}

fn at(time: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(time).unwrap().with_timezone(&Utc)
}

/// The whitespace-separated cells of the table line whose first cell is `first`.
fn table_row(text: &str, first: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.first().map(String::as_str) == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{text}"))
}

/// `keys create`: its summary lines and the secret (its last line).
fn create_key(args: &[&str], dir: &Path, db: Option<&str>) -> (String, String) {
    let out = ok(&[&["keys", "create"], args].concat(), dir, db);
    let secret = out.lines().last().unwrap().to_owned();
    assert!(secret.starts_with("ig-") && secret.len() == 51, "the last line is the secret alone: {secret:?}");
    assert!(secret[3..].chars().all(|c| c.is_ascii_alphanumeric()), "{secret:?}");
    let summary = out[..out.len() - secret.len() - 1].to_owned();
    assert!(!summary.contains(&secret[3..]), "the secret is on the last line only:\n{out}");
    (summary, secret)
}

fn entry(request_id: &str, model: &str, basis: &str, n: u32, tokens: TokenUsage, created_at: &str) -> LedgerEntry {
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
        tokens,
        cost_breakdown: None,
        billing_basis: basis.into(),
        error_code: None,
        cost_source: Some(ledger::CostSource::Priced),
        latency_ms: 1200,
        created_at: at(created_at),
        finished_at: at(created_at) + TimeDelta::seconds(1),
    }
}

async fn keys_lifecycle(url: &str, dir: &Path, db: Option<&str>) {
    let (summary, secret) = create_key(
        &[
            "--name",
            "ci",
            "--budget-usd",
            "25",
            "--period",
            "week",
            "--soft-budget-usd",
            "20",
            "--image-quota",
            "200",
            "--models",
            "gpt-image-1,sd-turbo",
            "--project",
            "design",
            "--rpm",
            "60",
            "--ipm",
            "10",
        ],
        dir,
        db,
    );
    let prefix = &secret[..11];
    for expected in [
        format!("prefix:      {prefix}"),
        "scope:       user".into(),
        "$25.00, soft $20.00, 200 images per week".into(),
        "design".into(),
        "gpt-image-1,sd-turbo".into(),
    ] {
        assert!(summary.contains(&expected), "{expected} missing from:\n{summary}");
    }

    // The secret is real: the ledger authenticates it, with everything asked for.
    let ledger = Ledger::connect(url).await.unwrap();
    let key = ledger.authenticate(&secret).await.unwrap().expect("the printed secret authenticates");
    assert!(summary.contains(&format!("id:          {}", key.id)), "{summary}");
    assert_eq!(key.prefix, prefix);
    let budget = key.budget.clone().unwrap();
    assert_eq!(
        (budget.period, budget.limit_usd, budget.soft_limit_usd, budget.image_quota),
        (Period::Week, Some(usd("25")), Some(usd("20")), Some(200))
    );
    assert_eq!(key.allowed_models, Some(vec!["gpt-image-1".to_owned(), "sd-turbo".to_owned()]));
    assert_eq!((key.rate_limits.requests_per_minute, key.rate_limits.images_per_minute), (Some(60), Some(10)));
    let project = ledger.project_by_name("design").await.unwrap().expect("--project created it");
    assert_eq!((key.project_id.as_deref(), project.budget), (Some(project.id.as_str()), None));

    // Spend 1.5 and hold 2 more: the list shows this period's numbers.
    let Reserve::Reserved(r) = ledger.reserve(&key.id, "req-1", usd("3"), 2).await.unwrap() else { panic!() };
    // (Dated outside the range the usage test reads, which may share this database.)
    let e = entry("req-1", "gpt-image-1", "tokens", 2, TokenUsage::default(), "2025-06-01T10:00:00Z");
    ledger.settle(r, usd("1.5"), &e).await.unwrap();
    let Reserve::Reserved(_held) = ledger.reserve(&key.id, "req-2", usd("2"), 1).await.unwrap() else { panic!() };

    let list = ok(&["keys", "list"], dir, db);
    assert!(!list.contains(&secret[3..]), "list never shows a secret:\n{list}");
    let row = table_row(&list, &key.id);
    assert_eq!(row[1..5], ["ci", prefix, "user", "design"], "{list}");
    assert!(list.contains("$25.00/week (soft $20.00)"), "{list}");
    assert_eq!(row[8..13], ["$1.50", "$2.00", "$21.50", "2/200", "gpt-image-1,sd-turbo"], "{list}");
    assert!(list.contains("60 rpm, 10 ipm"), "{list}");

    let json = ok(&["keys", "list", "--json"], dir, db);
    assert!(!json.contains(&secret[3..]), "{json}");
    let keys: serde_json::Value = serde_json::from_str(&json).unwrap();
    let k = &keys[0];
    assert_eq!(
        (k["id"].as_str(), k["prefix"].as_str(), k["project"].as_str()),
        (Some(key.id.as_str()), Some(prefix), Some("design"))
    );
    assert_eq!(k["budget"]["spent_usd"], "1.5");
    assert_eq!(k["budget"]["reserved_usd"], "2");
    assert_eq!(k["budget"]["remaining_usd"], "21.5");
    assert_eq!(k["budget"]["period"], "week");
    assert!(k["revoked_at"].is_null());

    // Update by prefix: a new cap keeps the period and the soft threshold, and this period's spending.
    let out =
        ok(&["keys", "update", prefix, "--name", "ci-2", "--budget-usd", "30", "--all-models", "--ipm", "5"], dir, db);
    assert!(out.contains("ci-2") && out.contains("$30.00, soft $20.00, 200 images per week"), "{out}");
    let updated = ledger.get_key(&key.id).await.unwrap();
    assert_eq!(updated.name, "ci-2");
    assert_eq!(updated.budget.as_ref().and_then(|b| b.limit_usd), Some(usd("30")));
    assert_eq!(updated.allowed_models, None);
    assert_eq!((updated.rate_limits.requests_per_minute, updated.rate_limits.images_per_minute), (Some(60), Some(5)));
    let usage = ledger.key_budget_usage(&key.id).await.unwrap().unwrap();
    assert_eq!(usage.spent_usd, usd("1.5"));

    let err = fails(&["keys", "update", prefix], dir, db);
    assert!(err.contains("nothing to change"), "{err}");
    let err = fails(&["keys", "update", prefix, "--budget-usd=-1"], dir, db);
    assert!(err.contains("--budget-usd"), "{err}");

    ok(&["keys", "update", &key.id, "--no-budget", "--no-rate-limits", "--models", "dall-e-3"], dir, db);
    let updated = ledger.get_key(&key.id).await.unwrap();
    assert_eq!(updated.budget, None);
    assert_eq!(updated.rate_limits, ledger::RateLimits::default());
    assert_eq!(updated.allowed_models, Some(vec!["dall-e-3".to_owned()]));
    assert_eq!(table_row(&ok(&["keys", "list"], dir, db), &key.id)[5], "-", "no budget");

    // A second key in the same project (not created again); prefixes must then be unambiguous.
    let out = imagegate(&["keys", "create", "--name", "other", "--project", "design", "--scope", "admin"], dir, db);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("created project"), "the project exists already");
    let err = fails(&["keys", "revoke", "ig-"], dir, db);
    assert!(err.contains("matches 2 keys") && err.contains(&key.id), "{err}");
    let err = fails(&["keys", "revoke", "ig-nosuchkey"], dir, db);
    assert!(err.contains("no key"), "{err}");

    // Revoke by prefix: the secret stops working at once.
    let out = ok(&["keys", "revoke", prefix], dir, db);
    assert!(out.contains("revoked key") && out.contains(&key.id), "{out}");
    assert_eq!(ledger.authenticate(&secret).await.unwrap(), None);
    let out = ok(&["keys", "revoke", &key.id], dir, db);
    assert!(out.contains("already revoked"), "{out}");
    let row = table_row(&ok(&["keys", "list"], dir, db), &key.id);
    assert_ne!(row.last().map(String::as_str), Some("-"), "the revocation time is shown: {row:?}");
    let keys: serde_json::Value = serde_json::from_str(&ok(&["keys", "list", "--json"], dir, db)).unwrap();
    assert!(keys[0]["revoked_at"].is_string());
    assert_eq!(keys[1]["scope"], "admin");

    // Projects.
    let out = ok(&["keys", "project", "create", "--name", "marketing", "--budget-usd", "100"], dir, db);
    assert!(out.contains("$100.00 per month"), "{out}");
    let out =
        ok(&["keys", "project", "update", "--name", "marketing", "--budget-usd", "10.5", "--period", "day"], dir, db);
    assert!(out.contains("$10.50 per day"), "{out}");
    let err = fails(&["keys", "project", "create", "--name", "marketing"], dir, db);
    assert!(err.contains("already exists"), "{err}");
    let projects = ok(&["keys", "project", "list"], dir, db);
    let design = table_row(&projects, &project.id);
    assert_eq!((design[1].as_str(), design[2].as_str(), design[7].as_str()), ("design", "-", "1"), "{projects}");
    assert!(projects.contains("$10.50/day"), "{projects}");
    ledger.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_created_listed_updated_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let url = ledger::sqlite_url(dir.path()).unwrap();
    keys_lifecycle(&url, dir.path(), None).await;
}

/// Rows on 2026-01-10 and -11 (and one before and one now), on two keys and no key, by two bases.
async fn write_usage(ledger: &Ledger) -> (ledger::ApiKey, ledger::ApiKey) {
    let k1 = ledger.create_key(ledger::NewKey::user("alpha")).await.unwrap().key;
    let k2 = ledger.create_key(ledger::NewKey::user("beta")).await.unwrap().key;
    let tokens = |input_text, input_image, output| TokenUsage { input_text, input_image, output };
    let now = (Utc::now() - TimeDelta::hours(1)).to_rfc3339();
    let rows = [
        (
            Some(&k1),
            "gpt-image-1",
            "tokens",
            1,
            tokens(12, 0, 272),
            "0.011",
            RequestStatus::Succeeded,
            "2026-01-10T10:00:00Z",
        ),
        (
            Some(&k1),
            "gpt-image-1",
            "tokens",
            2,
            tokens(20, 100, 544),
            "0.022",
            RequestStatus::Succeeded,
            "2026-01-10T23:59:59Z",
        ),
        (
            Some(&k2),
            "dall-e-3",
            "per_image",
            1,
            tokens(0, 0, 0),
            "0.04",
            RequestStatus::Succeeded,
            "2026-01-11T00:00:00Z",
        ),
        (None, "dall-e-3", "per_image", 1, tokens(0, 0, 0), "0", RequestStatus::Failed, "2026-01-11T09:30:00Z"),
        (
            Some(&k2),
            "gpt-image-1",
            "tokens",
            1,
            tokens(5, 0, 100),
            "5",
            RequestStatus::Succeeded,
            "2025-12-31T23:59:59Z",
        ),
        (Some(&k2), "sd-turbo", "compute", 4, tokens(0, 0, 0), "0.0004", RequestStatus::Succeeded, now.as_str()),
    ];
    for (i, (key, model, basis, n, tokens, cost, status, time)) in rows.into_iter().enumerate() {
        let e = entry(&format!("u{i}"), model, basis, n, tokens, time);
        ledger.record(key.map(|k| k.id.as_str()), status, usd(cost), &e).await.unwrap();
    }
    (k1, k2)
}

const JANUARY: [&str; 4] = ["--since", "2026-01-01", "--until", "2026-01-31"];

async fn usage_reports(url: &str, dir: &Path, db: Option<&str>) {
    let ledger = Ledger::connect(url).await.unwrap();
    let (k1, _k2) = write_usage(&ledger).await;
    ledger.close().await;
    let usage = |extra: &[&str]| ok(&[&["usage"], &JANUARY[..], extra].concat(), dir, db);

    // By model (the default): REQUESTS SUCCEEDED IMAGES TEXT-IN IMAGE-IN OUTPUT COST BASIS.
    let text = usage(&[]);
    assert!(text.contains("by model"), "{text}");
    assert_eq!(table_row(&text, "gpt-image-1")[1..], ["2", "2", "3", "32", "100", "816", "0.033", "tokens"], "{text}");
    assert_eq!(table_row(&text, "dall-e-3")[1..], ["2", "1", "1", "0", "0", "0", "0.04", "per_image"], "{text}");
    assert_eq!(
        table_row(&text, "TOTAL")[1..],
        ["4", "3", "4", "32", "100", "816", "0.073", "per_image+tokens"],
        "{text}"
    );
    assert!(!text.contains("sd-turbo"), "outside the range:\n{text}");
    assert!(text.contains("billed by tokens") && text.contains("billed per image"), "the bases are named:\n{text}");

    // By day: the day is UTC, [00:00, 24:00).
    let text = usage(&["--by", "day"]);
    assert_eq!(table_row(&text, "2026-01-10")[1..], ["2", "2", "3", "32", "100", "816", "0.033", "tokens"], "{text}");
    assert_eq!(table_row(&text, "2026-01-11")[1..], ["2", "1", "1", "0", "0", "0", "0.04", "per_image"], "{text}");
    assert_eq!(table_row(&text, "TOTAL")[7], "0.073", "{text}");

    // By key: prefix and name; requests without a key have a row of their own.
    let text = usage(&["--by", "key"]);
    assert_eq!(table_row(&text, &k1.prefix)[1..3], ["alpha", "2"], "{text}");
    assert_eq!(table_row(&text, "(no")[2..4], ["1", "0"], "{text}");

    // CSV: a header row, exact decimals, no total row; the sums add up.
    let csv = usage(&["--by", "model", "--csv"]);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "model,requests,succeeded,images,input_text_tokens,input_image_tokens,output_tokens,cost_usd,billing_basis"
        )
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert_eq!(rows[0], ["dall-e-3", "2", "1", "1", "0", "0", "0", "0.04", "per_image"]);
    assert_eq!(rows[1], ["gpt-image-1", "2", "2", "3", "32", "100", "816", "0.033", "tokens"]);
    let total: Decimal = rows.iter().map(|r| usd(r[7])).sum();
    assert_eq!(total, usd("0.073"));

    let csv = usage(&["--by", "day,model", "--csv"]);
    assert!(csv.starts_with("day,model,requests,"), "{csv}");
    assert!(csv.contains("\n2026-01-10,gpt-image-1,2,2,3,32,100,816,0.033,tokens\n"), "{csv}");
    let csv = usage(&["--by", "key", "--csv"]);
    assert!(csv.starts_with("key_id,key_prefix,key_name,requests,"), "{csv}");
    assert!(csv.contains(&format!("{},{},alpha,2,", k1.id, k1.prefix)), "{csv}");

    // Grouped by basis, and not grouped at all.
    let text = usage(&["--by", "basis"]);
    assert_eq!(table_row(&text, "tokens")[1..], ["2", "2", "3", "32", "100", "816", "0.033"], "{text}");
    assert_eq!(table_row(&text, "per_image")[1..], ["2", "1", "1", "0", "0", "0", "0.04"], "{text}");
    assert_eq!(table_row(&text, "TOTAL")[1..], ["4", "3", "4", "32", "100", "816", "0.073"], "{text}");
    let csv = usage(&["--by", "model,basis", "--csv"]);
    assert!(csv.starts_with("model,requests,"), "the basis is the last column: {csv}");
    assert!(csv.contains("\ngpt-image-1,2,2,3,32,100,816,0.033,tokens\n"), "{csv}");
    let text = usage(&["--by", "none"]);
    assert_eq!(
        table_row(&text, "TOTAL")[1..],
        ["4", "3", "4", "32", "100", "816", "0.073", "per_image+tokens"],
        "{text}"
    );

    // The defaults: by model, the last 30 days.
    let text = ok(&["usage"], dir, db);
    assert_eq!(table_row(&text, "sd-turbo")[1..], ["1", "1", "4", "0", "0", "0", "0.0004", "compute"], "{text}");
    assert!(!text.contains("gpt-image-1"), "{text}");

    let err = fails(&["usage", "--since", "yesterday"], dir, db);
    assert!(err.contains("--since yesterday"), "{err}");
    let err = fails(&["usage", "--since", "2026-02-01", "--until", "2026-01-01"], dir, db);
    assert!(err.contains("later"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_sums_by_model_day_and_key_as_table_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    let url = ledger::sqlite_url(dir.path()).unwrap();
    usage_reports(&url, dir.path(), None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_usage_on_postgres() {
    let Some(db) = TestDatabase::postgres().await.unwrap() else {
        eprintln!("SKIPPED: keys_and_usage_on_postgres (set IMAGEGATE_TEST_DATABASE_URL to run it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    keys_lifecycle(&db.url, dir.path(), Some(&db.url)).await;
    usage_reports(&db.url, dir.path(), Some(&db.url)).await;
    assert!(!dir.path().join("imagegate.db").exists(), "the SQLite default is not touched");
    db.finish().await.unwrap();
}

/// The records of a CSV text (RFC 4180: quoted fields may hold commas, doubled quotes, line breaks).
fn csv_records(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let (mut record, mut field, mut quoted, mut chars) = (Vec::new(), String::new(), false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(!quoted && field.is_empty() && record.is_empty(), "the CSV ends with a complete record: {text:?}");
    records
}

/// The cells of the CSV record whose `column` is `value`, by header.
fn csv_row(text: &str, column: &str, value: &str) -> std::collections::HashMap<String, String> {
    let records = csv_records(text);
    let header = &records[0];
    let i = header.iter().position(|h| h == column).unwrap_or_else(|| panic!("no column {column}: {text}"));
    let row = records[1..].iter().find(|r| r[i] == value).unwrap_or_else(|| panic!("no {column} {value:?}: {text}"));
    assert_eq!(row.len(), header.len(), "{text}");
    header.iter().cloned().zip(row.iter().cloned()).collect()
}

const ESC_NAME: &str = "\u{1b}[2J\u{1b}[31mpwned";
const FORMULA: &str = "=HYPERLINK(\"http://evil\",\"x\")";

/// Key, project and model names chosen to attack a terminal or a spreadsheet: new names with control
/// characters are refused (naming the flag); names and models that get in are shown escaped, in
/// tables and CSV, while `--json` keeps them exact.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_names_are_refused_or_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let url = ledger::sqlite_url(dir.path()).unwrap();
    let (dir, db) = (dir.path(), None);

    // Control characters in new names: refused, with the flag named, and nothing created.
    for (args, flag) in [
        (vec!["keys", "create", "--name", ESC_NAME], "--name"),
        (vec!["keys", "create", "--name", "ok", "--project", "a\u{9b}2J"], "--project"),
        (vec!["keys", "project", "create", "--name", "tab\there"], "--name"),
    ] {
        let err = fails(&args, dir, db);
        assert!(err.contains(&format!("{flag} cannot contain control characters")), "{args:?}: {err}");
    }
    assert!(ok(&["keys", "list"], dir, db).contains("no keys yet"));
    assert!(ok(&["keys", "project", "list"], dir, db).contains("no projects yet"));

    // Spreadsheet formulas are ordinary text to imagegate: accepted as names. A model may be anything.
    let (summary, secret) = create_key(
        &["--name", FORMULA, "--project", "@SUM(1+1)", "--models", &format!("{ESC_NAME},dall-e-3")],
        dir,
        db,
    );
    assert!(!summary.contains('\u{1b}'), "{summary:?}");
    assert!(summary.contains("\\u{1b}[2J\\u{1b}[31mpwned,dall-e-3"), "the models are shown escaped: {summary}");
    let prefix = &secret[..11];
    let (_, minus) = create_key(&["--name=-2+3"], dir, db);
    let err = fails(&["keys", "update", prefix, "--name", "x\u{7f}"], dir, db);
    assert!(err.contains("--name cannot contain control characters (found U+007F)"), "{err}");
    let err = fails(&["keys", "project", "update", "--name", "@SUM(1+1)", "--rename", "a\rb"], dir, db);
    assert!(err.contains("--rename cannot contain control characters"), "{err}");

    let ledger = Ledger::connect(&url).await.unwrap();
    let key = ledger.authenticate(&secret).await.unwrap().unwrap();
    let minus = ledger.authenticate(&minus).await.unwrap().unwrap();
    assert_eq!((key.name.as_str(), minus.name.as_str()), (FORMULA, "-2+3"), "names are stored exactly");
    let rows = [(&key, ESC_NAME, "+1024x1024"), (&key, "\t=1+2", "1024x1024"), (&minus, "@cmd", "-1")];
    for (i, (k, model, size)) in rows.into_iter().enumerate() {
        let mut e = entry(&format!("h{i}"), model, "tokens", 1, TokenUsage::default(), "2026-01-20T10:00:00Z");
        e.size = Some(size.to_owned());
        ledger.record(Some(&k.id), RequestStatus::Succeeded, usd("0.5"), &e).await.unwrap();
    }
    ledger.close().await;

    // Tables: no ESC (nor any other control character but the line breaks); the escapes are visible.
    let list = ok(&["keys", "list"], dir, db);
    assert!(!list.contains('\u{1b}'), "{list:?}");
    assert!(list.contains("\\u{1b}[2J\\u{1b}[31mpwned,dall-e-3") && list.contains(FORMULA), "{list}");
    let usage = ok(&["usage", "--since", "2026-01-01", "--until", "2026-01-31", "--by", "key,model,size"], dir, db);
    assert!(!usage.chars().any(|c| c.is_control() && c != '\n'), "{usage:?}");
    assert!(usage.contains("\\u{1b}[2J\\u{1b}[31mpwned") && usage.contains("\\t=1+2"), "{usage}");

    // JSON: exact, escaped by serde.
    let json = ok(&["keys", "list", "--json"], dir, db);
    assert!(!json.contains('\u{1b}'), "{json:?}");
    let keys: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(keys[0]["allowed_models"][0], ESC_NAME);
    assert_eq!(keys[0]["name"], FORMULA);

    // CSV: text cells that start a formula get a leading quote; the numbers stay numbers.
    let csv = ok(
        &["usage", "--since", "2026-01-01", "--until", "2026-01-31", "--by", "key,project,model,size", "--csv"],
        dir,
        db,
    );
    assert!(!csv.contains('\u{1b}') && !csv.contains('\t') && !csv.contains('\r'), "{csv:?}");
    assert!(csv.contains(",\"'=HYPERLINK(\"\"http://evil\"\",\"\"x\"\")\","), "quoted per RFC 4180: {csv}");
    let row = csv_row(&csv, "model", "\\u{1b}[2J\\u{1b}[31mpwned");
    assert_eq!(row["key_name"], format!("'{FORMULA}"));
    assert_eq!(row["key_prefix"], prefix);
    assert_eq!((row["project_name"].as_str(), row["size"].as_str()), ("'@SUM(1+1)", "'+1024x1024"));
    assert_eq!((row["requests"].as_str(), row["cost_usd"].as_str()), ("1", "0.5"));
    let row = csv_row(&csv, "model", "\\t=1+2");
    assert_eq!((row["key_name"].as_str(), row["size"].as_str()), (format!("'{FORMULA}").as_str(), "1024x1024"));
    let row = csv_row(&csv, "model", "'@cmd");
    assert_eq!((row["key_name"].as_str(), row["size"].as_str(), row["project_name"].as_str()), ("'-2+3", "'-1", ""));
    assert_eq!(row["billing_basis"], "tokens");
}

#[test]
fn a_database_url_flag_selects_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let url = ledger::sqlite_url(other.path()).unwrap();
    let out = ok(&["keys", "create", "--name", "x", "--database-url", &url], dir.path(), None);
    assert!(out.lines().last().unwrap().starts_with("ig-"));
    assert!(other.path().join("imagegate.db").exists());
    assert!(ok(&["keys", "list", "--database-url", &url], dir.path(), None).contains(" x "));
    assert!(ok(&["keys", "list"], dir.path(), None).contains("no keys yet"), "the default file is another database");
}
