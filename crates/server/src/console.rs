//! The usage console at `/console`: web pages for people, served by the server itself (no scripts, no
//! assets from elsewhere), behind an admin key.
//!
//! An admin key logs in once through a form (`POST /console/login`); the server answers with a
//! session cookie (`imagegate_console`: a random secret of the ledger's `console_sessions`, HttpOnly,
//! SameSite=Strict, Path=/console, Secure when the request came over HTTPS) and the key itself is never
//! put in a URL, a page or the browser's storage. Every page checks the session against the database,
//! so a session ends on every instance at once when it expires, is logged out, or its key is revoked.
//! A request without a live session is redirected to the login form. The console only reads.

use axum::extract::{Form, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
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

/// The console's filters (a GET form: they live in the URL, never a key).
#[derive(Deserialize, Default)]
pub struct Filter {
    /// Only this model's requests (empty: all).
    #[serde(default)]
    model: String,
}

/// Requests the recent-requests table shows at most.
const RECENT: u32 = 200;

/// `GET /console`: the console, or the login form's address.
pub async fn index(State(state): State<AppState>, headers: HeaderMap, Query(filter): Query<Filter>) -> Response {
    let Some(ledger) = &state.ledger else { return no_ledger() };
    let key = match session(&headers) {
        Some(secret) => match ledger.session_key(&secret).await {
            Ok(key) => key,
            Err(e) => return unavailable(e),
        },
        None => None,
    };
    let Some(key) = key.filter(|k| k.scope == ledger::Scope::Admin) else {
        return redirect("/console/login", None);
    };
    let keys = match ledger.list_keys().await {
        Ok(keys) => keys,
        Err(e) => return unavailable(e),
    };
    let now = ledger.now();
    // Whole days, today's to its end.
    let start = (now - chrono::Duration::days(SPEND_DAYS - 1)).date_naive().and_time(chrono::NaiveTime::MIN).and_utc();
    let end = start + chrono::Duration::days(SPEND_DAYS);
    let query = ledger::UsageQuery { start, end: Some(end), group_by: vec![ledger::Dimension::Model] };
    let buckets = match ledger.usage_buckets(&query, ledger::BucketWidth::Day).await {
        Ok(b) => b,
        Err(e) => return unavailable(e),
    };
    let spend = spend_section(&buckets);
    let model = Some(filter.model.as_str()).filter(|m| !m.is_empty());
    let entries = match ledger.recent_entries(model, RECENT).await {
        Ok(e) => e,
        Err(e) => return unavailable(e),
    };
    let names: std::collections::HashMap<&str, &str> = keys.iter().map(|k| (k.id.as_str(), k.name.as_str())).collect();
    let models: std::collections::BTreeSet<&str> =
        buckets.iter().flat_map(|b| &b.results).filter_map(|r| r.model.as_deref()).collect();
    let requests = requests_section(&entries, &names, &models, &filter.model);
    let mut rows = String::new();
    for k in &keys {
        let usage = match ledger.usage_of_key(k).await {
            Ok(u) => u,
            Err(e) => return unavailable(e),
        };
        let money = |d: rust_decimal::Decimal| format!("${}", d.normalize());
        let (spent, held, remaining, near) = match &usage {
            Some(u) => (
                money(u.spent_usd),
                money(u.reserved_usd),
                u.remaining_usd().map_or_else(|| "no cap".to_owned(), money),
                u.budget.soft_limit_usd.is_some_and(|soft| u.spent_usd + u.reserved_usd >= soft)
                    || u.remaining_usd().is_some_and(|r| r.is_zero()),
            ),
            None => ("-".to_owned(), "-".to_owned(), "no budget".to_owned(), false),
        };
        let class = if near { " class=\"near\"" } else { "" };
        let budget = k.budget.as_ref().map_or_else(
            || "none".to_owned(),
            |b| match b.limit_usd {
                Some(limit) => format!("${} per {}", limit.normalize(), b.period.as_str()),
                None => format!("no cap ({})", b.period.as_str()),
            },
        );
        let state = if k.revoked_at.is_some() { "revoked" } else { "active" };
        rows.push_str(&format!(
            "<tr{class}><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{spent}</td><td>{held}</td><td>{remaining}</td><td>{}</td><td>{state}</td></tr>\n",
            escape(&k.name),
            escape(&k.prefix),
            k.scope.as_str(),
            escape(&budget),
            k.created_at.format("%Y-%m-%d %H:%M UTC"),
        ));
    }
    let body = format!(
        "<header><h1>imagegate console</h1><p>Signed in with the admin key <strong>{name}</strong>.</p>\
         <form method=\"post\" action=\"/console/logout\"><button>Log out</button></form></header>\
         <main>{spend}<h2>API keys</h2><div class=\"scroll\"><table><thead><tr><th>Name</th><th>Key</th><th>Scope</th>\
         <th>Budget</th><th>Spent this period</th><th>Held</th><th>Remaining</th><th>Created</th><th>State</th></tr></thead>\
         <tbody>\n{rows}</tbody></table></div>{requests}</main>",
        name = escape(&key.name),
    );
    page(StatusCode::OK, "imagegate console", &body)
}

/// The ledger's recent rows (newest first, as given), with the filter form over `models`.
fn requests_section(
    entries: &[ledger::LedgerRow],
    names: &std::collections::HashMap<&str, &str>,
    models: &std::collections::BTreeSet<&str>,
    model: &str,
) -> String {
    let mut options = String::from("<option value=\"\">all models</option>");
    for m in models {
        let selected = if *m == model { " selected" } else { "" };
        options.push_str(&format!("<option{selected}>{}</option>", escape(m)));
    }
    let mut rows = String::new();
    for r in entries {
        let e = &r.entry;
        let key = r.key_id.as_deref().map(|id| names.get(id).copied().unwrap_or(id)).unwrap_or("(open server)");
        let asked = e.requested_model.as_deref().map(|m| format!(" (asked: {})", escape(m))).unwrap_or_default();
        let why = e.error_code.as_deref().map(escape).unwrap_or_default();
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}{asked}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>${}</td><td>{why}</td></tr>\n",
            e.created_at.format("%Y-%m-%d %H:%M:%S"),
            escape(key),
            escape(&e.model),
            escape(&e.provider),
            escape(e.size.as_deref().unwrap_or("-")),
            escape(e.quality.as_deref().unwrap_or("-")),
            escape(&e.tier),
            r.status.as_str(),
            r.cost_usd.normalize(),
        ));
    }
    format!(
        "<h2>Recent requests</h2><form method=\"get\" action=\"/console\"><label for=\"model\">Model</label> \
         <select id=\"model\" name=\"model\">{options}</select> <button>Show</button></form>\
         <div class=\"scroll\"><table><thead><tr><th>Time (UTC)</th><th>Key</th><th>Model</th><th>Provider</th><th>Size</th>\
         <th>Quality</th><th>Tier</th><th>Status</th><th>Cost</th><th>Why refused or failed</th></tr></thead>\
         <tbody>\n{rows}</tbody></table></div>"
    )
}

/// Days of spend the console charts.
const SPEND_DAYS: i64 = 30;

/// Series colours, in turn (distinct in hue and lightness, readable on white).
const PALETTE: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Spend per day by model as a stacked bar chart (inline SVG: no script), and each model's exact total.
fn spend_section(buckets: &[ledger::UsageBucket]) -> String {
    use rust_decimal::Decimal;
    use rust_decimal::prelude::ToPrimitive;
    use std::collections::BTreeMap;
    let mut totals: BTreeMap<String, (u64, u64, Decimal)> = BTreeMap::new();
    for row in buckets.iter().flat_map(|b| &b.results) {
        let t = totals.entry(row.model.clone().unwrap_or_default()).or_default();
        t.0 += row.requests;
        t.1 += row.images;
        t.2 += row.cost_usd;
    }
    let colour = |model: &str| {
        let i = totals.keys().position(|m| m == model).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    let day_total = |b: &ledger::UsageBucket| b.results.iter().map(|r| r.cost_usd).sum::<Decimal>();
    let max = buckets.iter().map(day_total).max().unwrap_or(Decimal::ZERO);
    // Geometry only: the amounts themselves are shown as exact decimals.
    const HEIGHT: i64 = 160;
    const BAR: i64 = 20;
    let mut bars = String::new();
    for (i, b) in buckets.iter().enumerate() {
        let x = i as i64 * (BAR + 4);
        let mut y = HEIGHT;
        for r in b.results.iter().filter(|r| r.cost_usd > Decimal::ZERO) {
            let h = if max.is_zero() {
                0
            } else {
                (r.cost_usd * Decimal::from(HEIGHT) / max).round().to_i64().unwrap_or(0).max(1)
            };
            y -= h;
            let model = r.model.clone().unwrap_or_default();
            bars.push_str(&format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"{BAR}\" height=\"{h}\" fill=\"{}\"><title>{} {}: ${}</title></rect>",
                colour(&model),
                b.start.format("%Y-%m-%d"),
                escape(&model),
                r.cost_usd.normalize()
            ));
        }
    }
    let width = buckets.len() as i64 * (BAR + 4);
    let mut rows = String::new();
    let mut all = (0, 0, Decimal::ZERO);
    for (model, (requests, images, cost)) in &totals {
        all = (all.0 + requests, all.1 + images, all.2 + cost);
        rows.push_str(&format!(
            "<tr><td><span class=\"swatch\" style=\"background:{}\"></span>{}</td><td>{requests}</td><td>{images}</td><td>${}</td></tr>\n",
            colour(model),
            escape(model),
            cost.normalize()
        ));
    }
    format!(
        "<h2>Spend, last {SPEND_DAYS} days (UTC), by model</h2>\
         <figure><svg role=\"img\" aria-label=\"Spend per day by model\" viewBox=\"0 0 {width} {HEIGHT}\" \
         width=\"100%\" height=\"{HEIGHT}\" preserveAspectRatio=\"none\">{bars}</svg>\
         <figcaption>Highest day: ${}. Hover a bar for its day, model and amount.</figcaption></figure>\
         <div class=\"scroll\"><table><thead><tr><th>Model</th><th>Requests</th><th>Images</th><th>Cost (USD)</th></tr></thead>\
         <tbody>\n{rows}</tbody><tfoot><tr><th>Total</th><th>{}</th><th>{}</th><th>${}</th></tr></tfoot></table></div>",
        max.normalize(),
        all.0,
        all.1,
        all.2.normalize()
    )
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
    let body = "<main><h1>imagegate console</h1><p>The ledger is unavailable right now; try again shortly.</p></main>";
    page(StatusCode::SERVICE_UNAVAILABLE, "imagegate console", body)
}

const STYLE: &str = "body{font:16px/1.4 system-ui,sans-serif;margin:0 auto;max-width:70rem;padding:1rem}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #ccc}\
.scroll{overflow-x:auto}.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.4em}tr.near{background:#fff3cd}.error{color:#a00}input{font:inherit;padding:.3rem;width:min(30rem,100%)}\
button{font:inherit;padding:.3rem .8rem}";

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
