//! The usage console at `/console`: web pages for people, served by the server itself (no scripts, no
//! assets from elsewhere), behind an admin key.
//!
//! An admin key logs in once through a form (`POST /console/login`); the server answers with a
//! session cookie (`imagegate_console`: a random secret of the ledger's `console_sessions`, HttpOnly,
//! SameSite=Strict, Path=/console, Secure when the request came over HTTPS) and the key itself is never
//! put in a URL, a page or the browser's storage. Every page checks the session against the database,
//! so a session ends on every instance at once when it expires, is logged out, or its key is revoked.
//! A request without a live session is redirected to the login form. The console only reads.
//!
//! The pages are server-rendered HTML (tables, an inline SVG chart, GET forms), so they work without
//! JavaScript. Their numbers come from the ledger's queries ([`ledger::report`] for the totals and the
//! CSV, which is `imagegate usage --csv`'s, byte for byte), and every amount is an exact decimal.

use std::collections::{BTreeSet, HashMap};

use axum::extract::{Form, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, NaiveDate, NaiveTime, Utc};
use ledger::report::{By, Report};
use ledger::{ApiKey, BucketWidth, BudgetUsage, Decimal, Ledger, UsageBucket, UsageQuery, UsageRow};
use serde::Deserialize;

use crate::AppState;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "imagegate_console";
/// How long a session lasts.
const SESSION_HOURS: i64 = 12;

#[derive(Deserialize)]
pub struct Login {
    /// Absent or empty: refused like a wrong key.
    #[serde(default)]
    key: String,
}

/// What the console shows (a GET form: it lives in the URL, never a key). Empty fields take their
/// defaults: the last 30 days, by model, per day, every request.
#[derive(Deserialize, Default, Clone)]
pub struct View {
    /// First day shown (UTC, `YYYY-MM-DD`).
    #[serde(default)]
    from: String,
    /// Last day shown, whole (UTC, `YYYY-MM-DD`).
    #[serde(default)]
    to: String,
    /// What the spend is split by: model, key, project, provider, tier or basis.
    #[serde(default)]
    by: String,
    /// `day` or `hour`.
    #[serde(default)]
    bucket: String,
    /// Recent requests of this model only.
    #[serde(default)]
    model: String,
    /// Recent requests of this key (its id) only.
    #[serde(default)]
    key: String,
    /// Recent requests that ended so only: succeeded, failed, refused.
    #[serde(default)]
    status: String,
}

/// The splits the spend chart offers, with their labels.
const SPLITS: [(By, &str); 6] = [
    (By::Model, "model"),
    (By::Key, "key"),
    (By::Project, "project"),
    (By::Provider, "provider"),
    (By::Tier, "tier"),
    (By::Basis, "billing basis"),
];
/// Days shown by default, per day and per hour.
const DEFAULT_DAYS: i64 = 30;
const DEFAULT_DAYS_BY_HOUR: i64 = 2;
/// The longest range, in days, per bucket width: enough bars to read, few enough to draw.
const MAX_DAYS_BY_DAY: i64 = 400;
const MAX_DAYS_BY_HOUR: i64 = 14;
/// Requests the recent-requests table shows at most.
const RECENT: u32 = 200;
/// Batches the batches table shows at most.
const BATCHES: u32 = 50;

/// A [`View`] checked: the range as instants, the split and the bucket width.
struct Resolved {
    from: NaiveDate,
    to: NaiveDate,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    by: By,
    bucket: BucketWidth,
    status: Option<ledger::RequestStatus>,
}

impl View {
    /// The view as asked, or what is wrong with it (said on the page, which then shows the defaults).
    fn resolve(&self, today: NaiveDate) -> Result<Resolved, String> {
        let default_days = if self.bucket == "hour" { DEFAULT_DAYS_BY_HOUR } else { DEFAULT_DAYS };
        let (from, to, start, end) = day_range(&self.from, &self.to, today, default_days)?;
        let by = match self.by.as_str() {
            "" => By::Model,
            s => SPLITS.iter().map(|(b, _)| *b).find(|b| b.as_str() == s).ok_or_else(|| {
                let allowed: Vec<&str> = SPLITS.iter().map(|(b, _)| b.as_str()).collect();
                format!("by: {s:?} is not a split; use one of {}.", allowed.join(", "))
            })?,
        };
        let (bucket, max_days) = match self.bucket.as_str() {
            "" | "day" => (BucketWidth::Day, MAX_DAYS_BY_DAY),
            "hour" => (BucketWidth::Hour, MAX_DAYS_BY_HOUR),
            s => return Err(format!("bucket: {s:?} is not a bucket width; use day or hour.")),
        };
        let days = (to - from).num_days() + 1;
        if days > max_days {
            return Err(format!(
                "{days} days is too long a range for {} buckets: at most {max_days}.",
                if bucket == BucketWidth::Hour { "hour" } else { "day" }
            ));
        }
        let status =
            match self.status.as_str() {
                "" => None,
                s => Some(ledger::RequestStatus::parse(s).ok_or_else(|| {
                    format!("status: {s:?} is not a request status; use succeeded, failed or refused.")
                })?),
            };
        Ok(Resolved { from, to, start, end, by, bucket, status })
    }
}

/// The days `from` to `to` (UTC, `YYYY-MM-DD`, both whole; empty: today, and the `default_days` up to
/// `to`), and the instants they span, `[start, end)`.
fn day_range(
    from: &str,
    to: &str,
    today: NaiveDate,
    default_days: i64,
) -> Result<(NaiveDate, NaiveDate, DateTime<Utc>, DateTime<Utc>), String> {
    let date = |field: &str, value: &str, default: NaiveDate| {
        if value.is_empty() {
            return Ok(default);
        }
        NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .map_err(|_| format!("{field}: {value:?} is not a date; expected YYYY-MM-DD."))
    };
    let to = date("to", to, today)?;
    let from = date("from", from, to - Duration::days(default_days - 1))?;
    if from > to {
        return Err(format!("from ({from}) is after to ({to})."));
    }
    let midnight = |d: NaiveDate| d.and_time(NaiveTime::MIN).and_utc();
    let end = to.succ_opt().map(midnight).ok_or_else(|| format!("to: {to} is out of range."))?;
    Ok((from, to, midnight(from), end))
}

/// The admin key of the request's console session, or the response that sends it to the login form
/// (or says the ledger is unavailable).
async fn signed_in<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<(&'a Ledger, ApiKey), Response> {
    let Some(ledger) = &state.ledger else { return Err(no_ledger()) };
    let key = match session(headers) {
        Some(secret) => ledger.session_key(&secret).await.map_err(unavailable)?,
        None => None,
    };
    match key.filter(|k| k.scope == ledger::Scope::Admin) {
        Some(key) => Ok((ledger, key)),
        None => Err(redirect("/console/login", None)),
    }
}

/// `GET /console`: the console, or the login form's address.
pub async fn index(
    State(state): State<AppState>,
    headers: HeaderMap,
    view: Result<Query<View>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (ledger, me) = match signed_in(&state, &headers).await {
        Ok(signed_in) => signed_in,
        Err(response) => return response,
    };
    let today = ledger.now().date_naive();
    // A view that cannot be shown is said on the page, over the default view.
    let asked = view
        .map_err(|e| format!("The address is not a console view: {e}."))
        .and_then(|Query(view)| view.resolve(today).map(|resolved| (view, resolved)));
    let (view, resolved, problem) = match asked {
        Ok((view, resolved)) => (view, resolved, None),
        Err(problem) => match View::default().resolve(today) {
            Ok(resolved) => (View::default(), resolved, Some(problem)),
            Err(e) => {
                tracing::error!(error = %e, "console: the default view is invalid");
                return unavailable_page();
            }
        },
    };
    let alert = match &problem {
        Some(p) => format!("<p class=\"error\" role=\"alert\">{}</p>", escape(p)),
        None => String::new(),
    };
    match console_page(&state, ledger, &me, &view, &resolved, &alert).await {
        Ok(body) => {
            let status = if problem.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK };
            page(status, "imagegate console", &body)
        }
        Err(e) => unavailable(e),
    }
}

async fn console_page(
    state: &AppState,
    ledger: &Ledger,
    me: &ApiKey,
    view: &View,
    r: &Resolved,
    alert: &str,
) -> ledger::Result<String> {
    let keys = ledger.list_keys().await?;
    let projects = ledger.list_projects().await?;
    let report = ledger.usage_report(&[r.by], r.start, Some(r.end)).await?;
    let query = UsageQuery { start: r.start, end: Some(r.end), group_by: vec![r.by.dimension()] };
    let buckets = ledger.usage_buckets(&query, r.bucket).await?;
    // The models of the range, for the requests' filter: the report's groups when it is by model.
    let models: BTreeSet<String> = if r.by == By::Model {
        report.groups.keys().filter_map(|values| values.first().cloned().flatten()).collect()
    } else {
        let query = UsageQuery { start: r.start, end: Some(r.end), group_by: vec![ledger::Dimension::Model] };
        ledger.usage(&query).await?.into_iter().filter_map(|row| row.model).collect()
    };
    let filter = ledger::EntryFilter {
        model: Some(view.model.clone()).filter(|m| !m.is_empty()),
        key_id: Some(view.key.clone()).filter(|k| !k.is_empty()),
        status: r.status,
        start: Some(r.start),
        end: Some(r.end),
    };
    let entries = ledger.recent_entries(&filter, RECENT).await?;
    let mut last_use: HashMap<String, DateTime<Utc>> = HashMap::new();
    let mut key_usage: HashMap<String, Option<BudgetUsage>> = HashMap::new();
    for k in &keys {
        if let Some(at) = ledger.last_use(&k.id).await? {
            last_use.insert(k.id.clone(), at);
        }
        key_usage.insert(k.id.clone(), ledger.usage_of_key(k).await?);
    }
    let mut project_usage: HashMap<String, Option<BudgetUsage>> = HashMap::new();
    for p in &projects {
        project_usage.insert(p.id.clone(), ledger.usage_of_project(p).await?);
    }
    let batches = ledger.recent_batches(BATCHES).await?;
    let key_names: HashMap<&str, &str> = keys.iter().map(|k| (k.id.as_str(), k.name.as_str())).collect();

    let view_form = view_form(view, r);
    let spend = spend_section(&report, &buckets, r);
    let keys_table = keys_section(&keys, &projects, &key_usage, &last_use);
    let projects_table = projects_section(&projects, &keys, &project_usage, &last_use);
    let requests = requests_section(&entries, &key_names, &keys, &models, view, r);
    let batches = batches_section(&batches, &key_names);
    let models_served = state.catalog.public_names();
    let estimate =
        format!("<h2 id=\"estimate\">Estimate a job</h2>{}", estimate_form(&EstimateForm::default(), &models_served));
    Ok(format!(
        "<header><h1>imagegate console</h1><p>Signed in with the admin key <strong>{name}</strong>.</p>\
         <form method=\"post\" action=\"/console/logout\"><button>Log out</button></form>\
         <nav><a href=\"#spend\">Spend</a> · <a href=\"#keys\">Keys</a> · <a href=\"#projects\">Projects</a> · \
         <a href=\"#requests\">Requests</a> · <a href=\"#batches\">Batches</a> · <a href=\"#estimate\">Estimate</a></nav></header>\
         <main>{alert}{view_form}{spend}{keys_table}{projects_table}{requests}{batches}{estimate}</main>",
        name = escape(&me.name),
    ))
}

/// The range, split and bucket form; it carries the request filters along.
fn view_form(view: &View, r: &Resolved) -> String {
    let mut splits = String::new();
    for (by, label) in SPLITS {
        let selected = if by == r.by { " selected" } else { "" };
        splits.push_str(&format!("<option value=\"{}\"{selected}>{label}</option>", by.as_str()));
    }
    let hour = if r.bucket == BucketWidth::Hour { " selected" } else { "" };
    format!(
        "<form method=\"get\" action=\"/console\" class=\"view\" aria-label=\"Range and split\">\
         <label>From <input type=\"date\" name=\"from\" value=\"{from}\"></label> \
         <label>To <input type=\"date\" name=\"to\" value=\"{to}\"></label> \
         <label>Split by <select name=\"by\">{splits}</select></label> \
         <label>Per <select name=\"bucket\"><option value=\"day\">day</option><option value=\"hour\"{hour}>hour</option></select></label> \
         {hidden}<button>Show</button></form>",
        from = r.from,
        to = r.to,
        hidden = hidden(&[("model", &view.model), ("key", &view.key), ("status", &view.status)]),
    )
}

/// Hidden inputs for the non-empty fields of another form, so that one form keeps the other's choice.
fn hidden(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(name, v)| format!("<input type=\"hidden\" name=\"{name}\" value=\"{}\">", escape(v)))
        .collect()
}

/// Series colours, by rank of cost (distinct in hue and lightness, readable on white); the series beyond
/// the first seven share the last, grey (their bars' titles and the table still name each).
const PALETTE: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Spend per bucket split as asked, as a stacked bar chart (inline SVG: no script), and each group's
/// exact totals from the report, with its CSV.
fn spend_section(report: &Report, buckets: &[UsageBucket], r: &Resolved) -> String {
    use rust_decimal::prelude::ToPrimitive;
    let by = r.by;
    let label = |value: Option<&str>| match (by, value) {
        (By::Key, Some(_)) => {
            let cells = report.label(by, value);
            format!("{} ({})", cells.get(1).map_or("", String::as_str), cells.first().map_or("", String::as_str))
        }
        _ => report.label(by, value).join(" ").trim_end().to_owned(),
    };
    // Colours by rank of cost, the most expensive first; beyond the palette, one "other" colour.
    let mut ranked: Vec<(&Vec<Option<String>>, &ledger::report::Sums)> = report.groups.iter().collect();
    ranked.sort_by(|a, b| b.1.cost_usd.cmp(&a.1.cost_usd).then_with(|| a.0.cmp(b.0)));
    let colours: HashMap<Option<String>, &str> = ranked
        .iter()
        .enumerate()
        .map(|(i, (values, _))| (values.first().cloned().flatten(), PALETTE[i.min(PALETTE.len() - 1)]))
        .collect();
    let colour = |value: &Option<String>| colours.get(value).copied().unwrap_or(PALETTE[PALETTE.len() - 1]);

    let bucket_total = |b: &UsageBucket| b.results.iter().map(|row| row.cost_usd).sum::<Decimal>();
    let max = buckets.iter().map(bucket_total).max().unwrap_or(Decimal::ZERO);
    let bucket_label = |t: DateTime<Utc>| match r.bucket {
        BucketWidth::Hour => t.format("%Y-%m-%d %H:00").to_string(),
        BucketWidth::Day => t.format("%Y-%m-%d").to_string(),
    };
    // Geometry only: the amounts themselves are shown as exact decimals.
    const HEIGHT: i64 = 160;
    const BAR: i64 = 20;
    let mut bars = String::new();
    for (i, b) in buckets.iter().enumerate() {
        let x = i as i64 * (BAR + 4);
        let mut y = HEIGHT;
        let mut rows: Vec<&UsageRow> = b.results.iter().filter(|row| row.cost_usd > Decimal::ZERO).collect();
        rows.sort_by_key(|row| std::cmp::Reverse(row.cost_usd));
        for row in rows {
            let h = if max.is_zero() {
                0
            } else {
                (row.cost_usd * Decimal::from(HEIGHT) / max).round().to_i64().unwrap_or(0).max(1)
            };
            y -= h;
            let value = by.value(row);
            bars.push_str(&format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"{BAR}\" height=\"{h}\" fill=\"{}\"><title>{} {}: ${}</title></rect>",
                colour(&value),
                bucket_label(b.start),
                escape(&label(value.as_deref())),
                row.cost_usd.normalize()
            ));
        }
    }
    let width = (buckets.len() as i64 * (BAR + 4)).max(1);
    let mut rows = String::new();
    for (values, sums) in &report.groups {
        let value = values.first().cloned().flatten();
        rows.push_str(&format!(
            "<tr><td><span class=\"swatch\" style=\"background:{}\"></span>{}</td><td>{}</td><td>{}</td><td>${}</td></tr>\n",
            colour(&value),
            escape(&label(value.as_deref())),
            sums.requests,
            sums.images,
            sums.cost_usd.normalize()
        ));
    }
    let split = SPLITS.iter().find(|(b, _)| *b == by).map_or("model", |(_, l)| l);
    let per = if r.bucket == BucketWidth::Hour { "hour" } else { "day" };
    let csv_by = format!("{},day", by.as_str());
    let first = buckets.first().map(|b| bucket_label(b.start)).unwrap_or_default();
    let last = buckets.last().map(|b| bucket_label(b.start)).unwrap_or_default();
    let total = &report.total;
    format!(
        "<section id=\"spend\"><h2>Spend per {per} by {split}, {from} to {to} (UTC)</h2>\
         <figure><svg role=\"img\" aria-label=\"Spend per {per} by {split}\" viewBox=\"0 0 {width} {HEIGHT}\" \
         width=\"100%\" height=\"{HEIGHT}\" preserveAspectRatio=\"none\">{bars}</svg>\
         <div class=\"axis\"><span>{first}</span><span>{last}</span></div>\
         <figcaption>Highest {per}: ${max}. Hover a bar for its {per}, {split} and amount.</figcaption></figure>\
         <div class=\"scroll\"><table><thead><tr><th>{Split}</th><th>Requests</th><th>Images</th><th>Cost (USD)</th></tr></thead>\
         <tbody>\n{rows}</tbody><tfoot><tr><th>Total</th><th>{}</th><th>{}</th><th>${}</th></tr></tfoot></table></div>\
         <p><a href=\"/console/usage.csv?from={from}&amp;to={to}&amp;by={csv_by}\" download>Download CSV</a> \
         (by {split} and day: the rows of <code>imagegate usage --csv --by {csv_by} --since {from} --until {to}</code>)</p></section>",
        total.requests,
        total.images,
        total.cost_usd.normalize(),
        from = r.from,
        to = r.to,
        max = max.normalize(),
        Split = capitalized(split),
    )
}

fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

fn money(d: Decimal) -> String {
    format!("${}", d.normalize())
}

/// A budget's cells: the budget, spent, held, remaining and images (spent/quota), and whether it is
/// near or over its soft limit (or at its cap).
fn budget_cells(budget: Option<&ledger::Budget>, usage: Option<&BudgetUsage>) -> (String, bool) {
    let budget_text = budget.map_or_else(
        || "none".to_owned(),
        |b| {
            let per = match b.period {
                ledger::Period::Total => "in total".to_owned(),
                period => format!("per {}", period.as_str()),
            };
            let cap = match b.limit_usd {
                Some(limit) => format!("{} {per}", money(limit)),
                None => format!("no cap ({per})"),
            };
            match b.soft_limit_usd {
                Some(soft) => format!("{cap}, soft {}", money(soft)),
                None => cap,
            }
        },
    );
    let (spent, held, remaining, images, near) = match usage {
        Some(u) => (
            money(u.spent_usd),
            money(u.reserved_usd),
            u.remaining_usd().map_or_else(|| "no cap".to_owned(), money),
            match u.budget.image_quota {
                Some(quota) => format!("{} of {quota}", u.images_spent + u.images_reserved),
                None => format!("{} (no quota)", u.images_spent + u.images_reserved),
            },
            u.budget.soft_limit_usd.is_some_and(|soft| u.spent_usd + u.reserved_usd >= soft)
                || u.remaining_usd().is_some_and(|r| r.is_zero())
                || u.remaining_images() == Some(0),
        ),
        None => ("-".to_owned(), "-".to_owned(), "no budget".to_owned(), "-".to_owned(), false),
    };
    (
        format!(
            "<td>{}</td><td>{spent}</td><td>{held}</td><td>{remaining}</td><td>{images}</td>",
            escape(&budget_text)
        ),
        near,
    )
}

fn when(at: Option<&DateTime<Utc>>) -> String {
    at.map_or_else(|| "never".to_owned(), |t| time(*t, "%Y-%m-%d %H:%M UTC"))
}

/// A `<time>` element: `t` shown in `format`, and machine-readable.
fn time(t: DateTime<Utc>, format: &str) -> String {
    format!("<time datetime=\"{}\">{}</time>", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), t.format(format))
}

fn keys_section(
    keys: &[ApiKey],
    projects: &[ledger::Project],
    usage: &HashMap<String, Option<BudgetUsage>>,
    last_use: &HashMap<String, DateTime<Utc>>,
) -> String {
    let project_names: HashMap<&str, &str> = projects.iter().map(|p| (p.id.as_str(), p.name.as_str())).collect();
    let mut rows = String::new();
    for k in keys {
        let (cells, near) = budget_cells(k.budget.as_ref(), usage.get(&k.id).and_then(Option::as_ref));
        let class = if near { " class=\"near\"" } else { "" };
        let limit = |n: Option<u32>, what: &str| n.map(|n| format!("{n} {what}/min"));
        let limits: Vec<String> =
            [limit(k.rate_limits.requests_per_minute, "requests"), limit(k.rate_limits.images_per_minute, "images")]
                .into_iter()
                .flatten()
                .collect();
        let limits = if limits.is_empty() { "none".to_owned() } else { limits.join(", ") };
        let project = k.project_id.as_deref().map_or("-", |id| project_names.get(id).copied().unwrap_or(id));
        let state = if k.revoked_at.is_some() { "revoked" } else { "active" };
        rows.push_str(&format!(
            "<tr{class}><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>{cells}<td>{limits}</td><td>{}</td><td>{}</td><td>{state}</td></tr>\n",
            escape(&k.name),
            escape(&k.prefix),
            k.scope.as_str(),
            escape(project),
            when(last_use.get(&k.id)),
            time(k.created_at, "%Y-%m-%d %H:%M UTC"),
        ));
    }
    format!(
        "<section id=\"keys\"><h2>API keys</h2><p class=\"hint\">Highlighted: at or past the soft budget, or nothing left under the cap or quota.</p>\
         <div class=\"scroll\"><table><thead><tr><th>Name</th><th>Key</th><th>Scope</th><th>Project</th>\
         <th>Budget</th><th>Spent this period</th><th>Held</th><th>Remaining</th><th>Images this period</th><th>Rate limits</th>\
         <th>Last use</th><th>Created</th><th>State</th></tr></thead><tbody>\n{rows}</tbody></table></div></section>"
    )
}

fn projects_section(
    projects: &[ledger::Project],
    keys: &[ApiKey],
    usage: &HashMap<String, Option<BudgetUsage>>,
    last_use: &HashMap<String, DateTime<Utc>>,
) -> String {
    if projects.is_empty() {
        return "<section id=\"projects\"><h2>Projects</h2><p>No projects (imagegate keys project create).</p></section>"
            .to_owned();
    }
    let mut rows = String::new();
    for p in projects {
        let (cells, near) = budget_cells(p.budget.as_ref(), usage.get(&p.id).and_then(Option::as_ref));
        let class = if near { " class=\"near\"" } else { "" };
        let members: Vec<&ApiKey> = keys.iter().filter(|k| k.project_id.as_deref() == Some(p.id.as_str())).collect();
        let last = members.iter().filter_map(|k| last_use.get(&k.id)).max();
        rows.push_str(&format!(
            "<tr{class}><td>{}</td>{cells}<td>{}</td><td>{}</td></tr>\n",
            escape(&p.name),
            members.len(),
            when(last),
        ));
    }
    format!(
        "<section id=\"projects\"><h2>Projects</h2><div class=\"scroll\"><table><thead><tr><th>Name</th><th>Budget</th>\
         <th>Spent this period</th><th>Held</th><th>Remaining</th><th>Images this period</th><th>Keys</th><th>Last use</th></tr></thead>\
         <tbody>\n{rows}</tbody></table></div></section>"
    )
}

/// The ledger's recent rows (newest first, as given), with the filter form.
fn requests_section(
    entries: &[ledger::LedgerRow],
    names: &HashMap<&str, &str>,
    keys: &[ApiKey],
    models: &BTreeSet<String>,
    view: &View,
    r: &Resolved,
) -> String {
    let option = |value: &str, label: &str, chosen: &str| {
        let selected = if value == chosen { " selected" } else { "" };
        format!("<option value=\"{}\"{selected}>{}</option>", escape(value), escape(label))
    };
    let mut model_options = option("", "all models", &view.model);
    for m in models {
        model_options.push_str(&option(m, m, &view.model));
    }
    let mut key_options = option("", "all keys", &view.key);
    for k in keys {
        key_options.push_str(&option(&k.id, &format!("{} ({})", k.name, k.prefix), &view.key));
    }
    let mut status_options = option("", "any status", &view.status);
    for s in ["succeeded", "failed", "refused"] {
        status_options.push_str(&option(s, s, &view.status));
    }
    let mut rows = String::new();
    for row in entries {
        let e = &row.entry;
        let key = row.key_id.as_deref().map(|id| names.get(id).copied().unwrap_or(id)).unwrap_or("(open server)");
        let asked = e.requested_model.as_deref().map(|m| format!(" (asked: {})", escape(m))).unwrap_or_default();
        let why = e.error_code.as_deref().map(escape).unwrap_or_default();
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}{asked}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>${}</td><td>{why}</td></tr>\n",
            time(e.created_at, "%Y-%m-%d %H:%M:%S"),
            escape(key),
            escape(&e.model),
            escape(&e.provider),
            escape(e.size.as_deref().unwrap_or("-")),
            escape(e.quality.as_deref().unwrap_or("-")),
            escape(&e.tier),
            row.status.as_str(),
            row.cost_usd.normalize(),
        ));
    }
    let shown =
        if entries.len() as u32 == RECENT { format!("the newest {RECENT}") } else { format!("{}", entries.len()) };
    let carried = hidden(&[
        ("from", &r.from.to_string()),
        ("to", &r.to.to_string()),
        ("by", r.by.as_str()),
        ("bucket", if r.bucket == BucketWidth::Hour { "hour" } else { "day" }),
    ]);
    format!(
        "<section id=\"requests\"><h2>Recent requests</h2>\
         <form method=\"get\" action=\"/console#requests\" aria-label=\"Filter requests\">{carried}\
         <label for=\"model\">Model</label> <select id=\"model\" name=\"model\">{model_options}</select> \
         <label for=\"key\">Key</label> <select id=\"key\" name=\"key\">{key_options}</select> \
         <label for=\"status\">Status</label> <select id=\"status\" name=\"status\">{status_options}</select> \
         <button>Filter</button></form><p class=\"hint\">{shown} requests from {} to {} (UTC), newest first.</p>\
         <div class=\"scroll\"><table><thead><tr><th>Time (UTC)</th><th>Key</th><th>Model</th><th>Provider</th><th>Size</th>\
         <th>Quality</th><th>Tier</th><th>Status</th><th>Cost</th><th>Why refused or failed</th></tr></thead>\
         <tbody>\n{rows}</tbody></table></div></section>",
        r.from, r.to,
    )
}

fn batches_section(batches: &[(ledger::BatchRecord, Decimal)], names: &HashMap<&str, &str>) -> String {
    if batches.is_empty() {
        return "<section id=\"batches\"><h2>Batches</h2><p>No batches yet (the Batch API: POST /v1/batches).</p></section>"
            .to_owned();
    }
    let mut rows = String::new();
    for (b, cost) in batches {
        let c = &b.counts;
        let done = c.completed + c.failed;
        let created =
            DateTime::from_timestamp(b.created_at, 0).map_or_else(String::new, |t| time(t, "%Y-%m-%d %H:%M UTC"));
        let owner = names.get(b.owner.as_str()).copied().unwrap_or(b.owner.as_str());
        rows.push_str(&format!(
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td>\
             <td><progress max=\"{}\" value=\"{done}\">{done} of {}</progress> {done} of {}</td><td>{}</td><td>{}</td><td>${}</td><td>{created}</td></tr>\n",
            escape(&b.id),
            escape(owner),
            escape(&b.endpoint),
            escape(&b.status),
            c.total.max(1),
            c.total,
            c.total,
            c.completed,
            c.failed,
            cost.normalize(),
        ));
    }
    format!(
        "<section id=\"batches\"><h2>Batches</h2><div class=\"scroll\"><table><thead><tr><th>Batch</th><th>Key</th>\
         <th>Endpoint</th><th>Status</th><th>Progress</th><th>Completed</th><th>Failed</th><th>Cost so far</th><th>Created</th></tr></thead>\
         <tbody>\n{rows}</tbody></table></div></section>"
    )
}

/// `GET /console/usage.csv`: the usage report of a range as CSV, the rows `imagegate usage --csv`
/// writes for the same `--by`, `--since` and `--until`.
pub async fn usage_csv(
    State(state): State<AppState>,
    headers: HeaderMap,
    view: Result<Query<View>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (ledger, _) = match signed_in(&state, &headers).await {
        Ok(signed_in) => signed_in,
        Err(response) => return response,
    };
    let bad = |message: String| {
        (StatusCode::BAD_REQUEST, [(CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
    };
    let Ok(Query(view)) = view else { return bad("Expected from, to and by as the console's links give them.".into()) };
    let mut by = Vec::new();
    for name in view.by.split(',').filter(|s| !s.is_empty()) {
        match By::parse(name) {
            Some(b) => by.push(b),
            None => {
                let allowed: Vec<&str> = By::ALL.iter().map(|b| b.as_str()).collect();
                return bad(format!("by: {name:?} is not a grouping; use some of {}.", allowed.join(", ")));
            }
        }
    }
    // The range as the view takes it, with no limit on its length: a CSV is not drawn.
    let (from, to, start, end) = match day_range(&view.from, &view.to, ledger.now().date_naive(), DEFAULT_DAYS) {
        Ok(range) => range,
        Err(e) => return bad(e),
    };
    let report = match ledger.usage_report(&by, start, Some(end)).await {
        Ok(report) => report,
        Err(e) => return unavailable(e),
    };
    let filename = format!("imagegate-usage-{from}-{to}.csv");
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (CONTENT_DISPOSITION, format!("attachment; filename=\"{filename}\"")),
            (CACHE_CONTROL, "no-store".to_owned()),
        ],
        report.csv(),
    )
        .into_response()
}

/// The estimate form's fields (a GET form), one planned item.
#[derive(Deserialize, Default)]
pub struct EstimateForm {
    #[serde(default)]
    model: String,
    #[serde(default)]
    quality: String,
    #[serde(default)]
    size: String,
    #[serde(default)]
    n: String,
    #[serde(default)]
    count: String,
    /// The prompt's text, counted by the model's tokenizer; when empty, `prompt_words` says its length.
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    prompt_words: String,
    #[serde(default)]
    service_tier: String,
}

fn estimate_form(form: &EstimateForm, models: &[String]) -> String {
    let mut options = String::new();
    for m in models {
        options.push_str(&format!("<option value=\"{}\">", escape(m)));
    }
    let select = |name: &str, values: &[&str], chosen: &str| {
        let mut out = format!("<select id=\"est-{name}\" name=\"{name}\">");
        for v in values {
            let selected = if *v == chosen { " selected" } else { "" };
            out.push_str(&format!("<option{selected}>{v}</option>"));
        }
        out.push_str("</select>");
        out
    };
    let or = |value: &str, default: &str| if value.is_empty() { default.to_owned() } else { escape(value) };
    format!(
        "<form method=\"get\" action=\"/console/estimate\" class=\"estimate\" aria-label=\"Estimate\">\
         <label for=\"est-model\">Model</label> <input id=\"est-model\" name=\"model\" list=\"served-models\" required value=\"{model}\">\
         <datalist id=\"served-models\">{options}</datalist> \
         <label for=\"est-quality\">Quality</label> {quality} \
         <label for=\"est-size\">Size</label> <input id=\"est-size\" name=\"size\" value=\"{size}\" size=\"9\"> \
         <label for=\"est-n\">Images per request</label> <input id=\"est-n\" name=\"n\" type=\"number\" min=\"1\" value=\"{n}\"> \
         <label for=\"est-count\">Requests</label> <input id=\"est-count\" name=\"count\" type=\"number\" min=\"1\" value=\"{count}\"> \
         <label for=\"est-tier\">Tier</label> {tier}<br>\
         <label for=\"est-prompt\">Prompt</label> <input id=\"est-prompt\" name=\"prompt\" value=\"{prompt}\"> \
         <label for=\"est-words\">or its length in words</label> <input id=\"est-words\" name=\"prompt_words\" type=\"number\" min=\"0\" value=\"{words}\"> \
         <button>Estimate</button></form>",
        model = escape(&form.model),
        quality = select(
            "quality",
            &["auto", "low", "medium", "high"],
            if form.quality.is_empty() { "auto" } else { &form.quality }
        ),
        size = or(&form.size, "1024x1024"),
        n = or(&form.n, "1"),
        count = or(&form.count, "1"),
        tier = select(
            "service_tier",
            &["default", "flex", "batch"],
            if form.service_tier.is_empty() { "default" } else { &form.service_tier }
        ),
        prompt = escape(&form.prompt),
        words = or(&form.prompt_words, "30"),
    )
}

/// `GET /console/estimate`: a job priced before it runs, by the estimates endpoint's own code
/// (`POST /v1/images/estimates`), with its cheaper alternatives.
pub async fn estimate(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Query<EstimateForm>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(response) = signed_in(&state, &headers).await {
        return response;
    }
    let models = state.catalog.public_names();
    let Ok(Query(form)) = form else {
        let body = format!(
            "<main><h1>Estimate a job</h1><p class=\"error\" role=\"alert\">Fill in the form below.</p>{}</main>",
            estimate_form(&EstimateForm::default(), &models)
        );
        return page(StatusCode::BAD_REQUEST, "Estimate: imagegate console", &body);
    };
    let (status, result) = match estimate_result(&state, &form) {
        Ok(html) => (StatusCode::OK, html),
        Err(message) => {
            (StatusCode::BAD_REQUEST, format!("<p class=\"error\" role=\"alert\">{}</p>", escape(&message)))
        }
    };
    let body = format!(
        "<header><h1>Estimate a job</h1><p><a href=\"/console\">Back to the console</a></p></header><main>{}{result}</main>",
        estimate_form(&form, &models)
    );
    page(status, "Estimate: imagegate console", &body)
}

/// The form as the endpoint's JSON item, priced; or the endpoint's own message, naming the field.
fn estimate_result(state: &AppState, form: &EstimateForm) -> Result<String, String> {
    use serde_json::{Map, Value, json};
    let mut item = Map::new();
    item.insert("model".into(), json!(form.model.trim()));
    for (name, value) in [("quality", &form.quality), ("size", &form.size), ("service_tier", &form.service_tier)] {
        if !value.trim().is_empty() {
            item.insert(name.into(), json!(value.trim()));
        }
    }
    // The text when given (its tokens counted), else its length.
    let words = if form.prompt.is_empty() { form.prompt_words.as_str() } else { "" };
    if !form.prompt.is_empty() {
        item.insert("prompt".into(), json!(form.prompt));
    }
    for (name, value) in [("n", form.n.as_str()), ("count", form.count.as_str()), ("prompt_words", words)] {
        if value.trim().is_empty() {
            continue;
        }
        let number: i64 = value.trim().parse().map_err(|_| format!("{name}: {value:?} is not a whole number."))?;
        item.insert(name.into(), json!(number));
    }
    let mut body = Map::new();
    body.insert("requests".into(), Value::Array(vec![Value::Object(item)]));
    let describe = |e: api::ApiError| {
        let field = e.body.param.as_deref().and_then(|p| p.rsplit('.').next()).unwrap_or("request").to_owned();
        format!("{field}: {}", e.body.message)
    };
    let items = api::estimates::parse_estimate_request(&body).map_err(describe)?;
    let outcome = crate::estimates::estimate(state, &items).map_err(describe)?;
    let json = &outcome.json;
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let mut out = format!("<section class=\"result\"><h2>Estimated total: ${}</h2>", escape(&text(&json["total_usd"])));
    for it in json["items"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "<p>{} requests, {} images of <strong>{}</strong> on {} at the {} tier, {} quality, {}, billed by {}.</p>",
            it["requests"],
            it["images"],
            escape(&text(&it["model"])),
            escape(&text(&it["provider"])),
            escape(&text(&it["service_tier"])),
            escape(&text(&it["quality"])),
            escape(&text(&it["size"])),
            escape(&text(&it["billing_basis"])),
        ));
        let mut lines = String::new();
        for l in it["lines"].as_array().into_iter().flatten() {
            lines.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>${}</td><td>${}</td></tr>",
                escape(&text(&l["item"])),
                l["quantity"],
                escape(&text(&l["unit_price_usd"])),
                escape(&text(&l["amount_usd"])),
            ));
        }
        out.push_str(&format!(
            "<div class=\"scroll\"><table><thead><tr><th>Line</th><th>Quantity</th><th>Unit price</th><th>Amount</th></tr></thead><tbody>{lines}</tbody></table></div>"
        ));
    }
    let mut alternatives = String::new();
    for a in json["alternatives"].as_array().into_iter().flatten().take(10) {
        alternatives.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>${}</td></tr>",
            escape(&text(&a["model"])),
            escape(&text(&a["provider"])),
            escape(&text(&a["service_tier"])),
            escape(&text(&a["total_usd"])),
        ));
    }
    if !alternatives.is_empty() {
        out.push_str(&format!(
            "<h3>The same job elsewhere, cheapest first</h3><div class=\"scroll\"><table><thead><tr><th>Model</th><th>Provider</th><th>Tier</th><th>Total</th></tr></thead><tbody>{alternatives}</tbody></table></div>"
        ));
    }
    for note in json["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("<p class=\"hint\">{}</p>", escape(&text(note))));
    }
    out.push_str("</section>");
    Ok(out)
}

/// `GET /console/login`: the login form.
pub async fn login_form() -> Response {
    login_page(StatusCode::OK, None)
}

/// `POST /console/login`: an admin key starts a session; anything else is refused on the form.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<Login>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Some(ledger) = &state.ledger else { return no_ledger() };
    let Ok(Form(form)) = form else {
        return login_page(StatusCode::BAD_REQUEST, Some("Send the key with the login form below."));
    };
    let key = match ledger.authenticate(form.key.trim()).await {
        Ok(key) => key,
        Err(e) => return unavailable(e),
    };
    let Some(key) = key else {
        return login_page(StatusCode::UNAUTHORIZED, Some("That is not a live API key of this server."));
    };
    if key.scope != ledger::Scope::Admin {
        return login_page(
            StatusCode::FORBIDDEN,
            Some("The console needs an admin key (imagegate keys create --scope admin); this one is a user key."),
        );
    }
    let secret = match ledger.start_session(&key.id, chrono::Duration::hours(SESSION_HOURS)).await {
        Ok(secret) => secret,
        Err(e) => return unavailable(e),
    };
    tracing::info!(key = %key.id, "console session started");
    let secure = if over_https(&state, &headers) { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE_NAME}={secret}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_HOURS * 3600
    );
    redirect("/console", Some(cookie))
}

/// `POST /console/logout`: ends the session and clears the cookie.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let (Some(ledger), Some(secret)) = (&state.ledger, session(&headers))
        && let Err(e) = ledger.end_session(&secret).await
    {
        return unavailable(e);
    }
    let secure = if over_https(&state, &headers) { "; Secure" } else { "" };
    let cookie = format!("{COOKIE_NAME}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    redirect("/console/login", Some(cookie))
}

/// The session secret the request's cookie carries.
fn session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

/// Served over HTTPS: the public URL says so, or the proxy in front does.
fn over_https(state: &AppState, headers: &HeaderMap) -> bool {
    state.public_url.as_deref().is_some_and(|u| u.starts_with("https://"))
        || headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) == Some("https")
}

fn redirect(to: &str, cookie: Option<String>) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(LOCATION, to.to_owned())]).into_response();
    if let Some(c) = cookie.and_then(|c| c.parse().ok()) {
        response.headers_mut().insert(SET_COOKIE, c);
    }
    response
}

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    let message = message.map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(m))).unwrap_or_default();
    let body = format!(
        "<main><h1>imagegate console</h1>{message}\
         <form method=\"post\" action=\"/console/login\"><label for=\"key\">Admin API key</label>\
         <input id=\"key\" name=\"key\" type=\"password\" autocomplete=\"current-password\" required>\
         <button>Log in</button></form></main>"
    );
    page(status, "Log in: imagegate console", &body)
}

fn no_ledger() -> Response {
    let body = "<main><h1>imagegate console</h1><p>This server keeps no ledger, so there is nothing to show: \
                start it with a database (the default data dir's SQLite file, or --database-url).</p></main>";
    page(StatusCode::NOT_FOUND, "imagegate console", body)
}

fn unavailable(e: ledger::LedgerError) -> Response {
    tracing::error!(error = %e, "console: the ledger is unavailable");
    unavailable_page()
}

fn unavailable_page() -> Response {
    let body = "<main><h1>imagegate console</h1><p>The ledger is unavailable right now; try again shortly.</p></main>";
    page(StatusCode::SERVICE_UNAVAILABLE, "imagegate console", body)
}

const STYLE: &str = "body{font:16px/1.4 system-ui,sans-serif;margin:0 auto;max-width:84rem;padding:1rem}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #ccc}\
.scroll{overflow-x:auto}td code,time{white-space:nowrap}.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.4em}tr.near{background:#fff3cd}.error{color:#a00}input{font:inherit;padding:.3rem;max-width:100%;box-sizing:border-box}#key,#est-prompt{width:min(30rem,100%)}\
button{font:inherit;padding:.3rem .8rem}select{font:inherit}form{margin:.6rem 0}label{white-space:nowrap}\
.axis{display:flex;justify-content:space-between;font-size:.85rem;color:#555}.hint{color:#555;font-size:.9rem}\
header form{display:inline}nav{margin:.4rem 0}input[type=number]{width:6rem}";

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title>\
         <style>{STYLE}</style></head><body>{body}</body></html>",
        escape(title)
    );
    (status, [(CONTENT_TYPE, "text/html; charset=utf-8"), (CACHE_CONTROL, "no-store")], html).into_response()
}

/// Text for HTML: the five characters that could end an element or an attribute, escaped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cannot_become_markup() {
        assert_eq!(escape(r#"<b a="1" b='2'>&</b>"#), "&lt;b a=&quot;1&quot; b=&#39;2&#39;&gt;&amp;&lt;/b&gt;");
    }

    fn view(from: &str, to: &str, by: &str, bucket: &str) -> View {
        View { from: from.into(), to: to.into(), by: by.into(), bucket: bucket.into(), ..View::default() }
    }

    #[test]
    fn views_default_to_the_last_30_days_or_2_days_by_hour() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap();
        let r = View::default().resolve(today).unwrap();
        assert_eq!(
            (r.from.to_string(), r.to.to_string(), r.by, r.bucket),
            ("2026-11-07".into(), "2026-12-06".into(), By::Model, BucketWidth::Day)
        );
        assert_eq!(r.start.to_rfc3339(), "2026-11-07T00:00:00+00:00");
        assert_eq!(r.end.to_rfc3339(), "2026-12-07T00:00:00+00:00", "the last day whole");
        let r = view("", "", "provider", "hour").resolve(today).unwrap();
        assert_eq!((r.from.to_string(), r.by, r.bucket), ("2026-12-05".into(), By::Provider, BucketWidth::Hour));
        let r = view("2026-01-01", "2026-01-01", "basis", "").resolve(today).unwrap();
        assert_eq!((r.end - r.start, r.by), (Duration::days(1), By::Basis));
    }

    #[test]
    fn bad_views_say_which_field_and_what_is_allowed() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap();
        for (v, says) in [
            (view("2026-12-02", "2026-12-01", "", ""), "from (2026-12-02) is after to (2026-12-01)"),
            (view("12/01/2026", "", "", ""), "from: \"12/01/2026\" is not a date; expected YYYY-MM-DD"),
            (view("", "", "day", ""), "by: \"day\" is not a split; use one of model, key, project"),
            (view("", "", "", "week"), "bucket: \"week\" is not a bucket width; use day or hour"),
            (view("2026-11-01", "2026-12-01", "", "hour"), "31 days is too long a range for hour buckets: at most 14"),
            (view("2020-01-01", "", "", ""), "too long a range for day buckets: at most 400"),
            (View { status: "ok".into(), ..View::default() }, "status: \"ok\" is not a request status"),
        ] {
            let e = v.resolve(today).err().unwrap();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn the_session_is_read_from_any_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1; imagegate_console=igs_abc; b=2".parse().unwrap());
        assert_eq!(session(&h).as_deref(), Some("igs_abc"));
        let mut h = HeaderMap::new();
        h.append(COOKIE, "imagegate_console=".parse().unwrap());
        assert_eq!(session(&h), None);
    }
}
