//! The usage console at `/console`: web pages for people, served by the server itself (no scripts, no
//! assets from elsewhere), behind an admin key.
//!
//! An admin key logs in once through a form (`POST /console/login`); the server answers with a
//! session cookie (`imagegate_console`: a random secret of the ledger's `console_sessions`, HttpOnly,
//! SameSite=Strict, Path=/console, Secure when the request came over HTTPS) and the key itself is never
//! put in a URL, a page or the browser's storage. Every page checks the session against the database,
//! so a session ends on every instance at once when it expires, is logged out, or its key is revoked.
//! A request without a live session is redirected to the login form. The console only reads.

use axum::extract::{Form, State};
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
    key: String,
}

/// `GET /console`: the console, or the login form's address.
pub async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
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
    let mut rows = String::new();
    for k in &keys {
        let budget = k.budget.as_ref().map_or_else(
            || "none".to_owned(),
            |b| match b.limit_usd {
                Some(limit) => format!("${} per {}", limit.normalize(), b.period.as_str()),
                None => format!("no cap ({})", b.period.as_str()),
            },
        );
        let state = if k.revoked_at.is_some() { "revoked" } else { "active" };
        rows.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{state}</td></tr>\n",
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
         <main><h2>API keys</h2><div class=\"scroll\"><table><thead><tr><th>Name</th><th>Key</th><th>Scope</th>\
         <th>Budget</th><th>Created</th><th>State</th></tr></thead><tbody>\n{rows}</tbody></table></div></main>",
        name = escape(&key.name),
    );
    page(StatusCode::OK, "imagegate console", &body)
}

/// `GET /console/login`: the login form.
pub async fn login_form() -> Response {
    login_page(StatusCode::OK, None)
}

/// `POST /console/login`: an admin key starts a session; anything else is refused on the form.
pub async fn login(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<Login>) -> Response {
    let Some(ledger) = &state.ledger else { return no_ledger() };
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
.scroll{overflow-x:auto}.error{color:#a00}input{font:inherit;padding:.3rem;width:min(30rem,100%)}\
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
