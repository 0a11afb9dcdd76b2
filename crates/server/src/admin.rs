//! Admin endpoints (admin keys only): managing keys, and the usage and costs of the organization in
//! the shapes of OpenAI's `GET /v1/organization/usage/images` and `GET /v1/organization/costs`.
//!
//! Amounts are exact decimals written as JSON numbers (never through a float).

use std::collections::HashMap;

use api::ApiError;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use ledger::{BucketWidth, Budget, Dimension, NewKey, Period, RateLimits, Scope, UsageBucket, UsageQuery, UsageRow};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::accounts::Caller;
use crate::auth::require_admin;
use crate::{AppState, HttpError};

type AdminResult = Result<Response, HttpError>;

fn ledger(state: &AppState) -> Result<&ledger::Ledger, ApiError> {
    state.ledger.as_ref().ok_or_else(|| {
        ApiError::new(404, "invalid_request_error", None, Some("no_ledger"), "This server keeps no ledger.".into())
    })
}

fn ledger_error(e: ledger::LedgerError) -> ApiError {
    match e {
        ledger::LedgerError::KeyNotFound(id) => ApiError::new(
            404,
            "invalid_request_error",
            Some("key_id"),
            Some("key_not_found"),
            format!("No API key '{id}'."),
        ),
        e @ (ledger::LedgerError::InvalidArgument(_) | ledger::LedgerError::InvalidAmount(_)) => {
            ApiError::invalid_value_msg("body", e.to_string())
        }
        other => {
            tracing::error!(error = %other, "admin request failed in the ledger");
            ApiError::new(503, "server_error", None, Some("ledger_unavailable"), "The ledger is unavailable.".into())
        }
    }
}

/// An exact decimal as a JSON number.
fn number(d: Decimal) -> Box<RawValue> {
    RawValue::from_string(d.normalize().to_string()).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => HttpError(ApiError::internal("admin")).into_response(),
    }
}

#[derive(Serialize)]
struct KeyOut {
    object: &'static str,
    id: String,
    name: String,
    /// The visible start of the secret.
    redacted_value: String,
    scope: &'static str,
    project_id: Option<String>,
    allowed_models: Option<Vec<String>>,
    budget: Option<BudgetOut>,
    requests_per_minute: Option<u32>,
    images_per_minute: Option<u32>,
    /// The tier its requests run at when they leave it to the server.
    service_tier: String,
    created_at: i64,
    revoked_at: Option<i64>,
    /// Only when the key was just created: never stored, never shown again.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

#[derive(Serialize)]
struct BudgetOut {
    period: &'static str,
    limit_usd: Option<Box<RawValue>>,
    soft_limit_usd: Option<Box<RawValue>>,
    image_quota: Option<u64>,
}

fn key_out(k: ledger::ApiKey, value: Option<String>) -> KeyOut {
    KeyOut {
        object: "organization.api_key",
        id: k.id,
        name: k.name,
        redacted_value: format!("{}...", k.prefix),
        scope: if k.scope == Scope::Admin { "admin" } else { "user" },
        project_id: k.project_id,
        allowed_models: k.allowed_models,
        budget: k.budget.map(|b| BudgetOut {
            period: b.period.as_str(),
            limit_usd: b.limit_usd.map(number),
            soft_limit_usd: b.soft_limit_usd.map(number),
            image_quota: b.image_quota,
        }),
        requests_per_minute: k.rate_limits.requests_per_minute,
        images_per_minute: k.rate_limits.images_per_minute,
        service_tier: k.service_tier.unwrap_or_else(|| "default".to_owned()),
        created_at: k.created_at.timestamp(),
        revoked_at: k.revoked_at.map(|t| t.timestamp()),
        value,
    }
}

/// `POST /v1/admin/keys`: `{name, scope?, models?, budget_usd?, period?, soft_budget_usd?, image_quota?,
/// requests_per_minute?, images_per_minute?}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
    scope: Option<String>,
    models: Option<Vec<String>>,
    budget_usd: Option<Decimal>,
    period: Option<String>,
    soft_budget_usd: Option<Decimal>,
    image_quota: Option<u64>,
    requests_per_minute: Option<u32>,
    images_per_minute: Option<u32>,
    /// `default` or `flex`: the tier of its requests that leave it to the server.
    service_tier: Option<String>,
}

pub async fn create_key(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    body: axum::body::Bytes,
) -> AdminResult {
    require_admin(caller.as_ref().map(|Extension(c)| c))?;
    let ledger = ledger(&state)?;
    let req: CreateKey =
        serde_json::from_slice(&body).map_err(|e| ApiError::malformed_body(format!("Invalid key request: {e}")))?;
    check_name(&req.name)?;
    let scope = match req.scope.as_deref() {
        None | Some("user") => Scope::User,
        Some("admin") => Scope::Admin,
        Some(other) => return Err(ApiError::invalid_value("scope", other, &["user", "admin"]).into()),
    };
    let period = parse_period(req.period.as_deref())?;
    let budget =
        (req.budget_usd.is_some() || req.soft_budget_usd.is_some() || req.image_quota.is_some()).then_some(Budget {
            period,
            limit_usd: req.budget_usd,
            soft_limit_usd: req.soft_budget_usd,
            image_quota: req.image_quota,
        });
    let new = NewKey {
        name: req.name,
        scope,
        project_id: None,
        allowed_models: req.models,
        budget,
        rate_limits: RateLimits {
            requests_per_minute: req.requests_per_minute,
            images_per_minute: req.images_per_minute,
        },
        service_tier: req.service_tier,
    };
    let created = ledger.create_key(new).await.map_err(ledger_error)?;
    Ok(json(StatusCode::CREATED, &key_out(created.key, Some(created.secret))))
}

/// `POST /v1/admin/keys/{id}`: changes what the body names, as a JSON merge patch: `name`, `models`
/// (null: all models), `budget` (`{budget_usd, period, soft_budget_usd, image_quota}`, null: none),
/// `requests_per_minute`, `images_per_minute` (null: unlimited).
pub async fn update_key(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> AdminResult {
    require_admin(caller.as_ref().map(|Extension(c)| c))?;
    let ledger = ledger(&state)?;
    let patch: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(|e| ApiError::malformed_body(format!("Invalid key update: {e}")))?;
    let current = ledger.get_key(&id).await.map_err(ledger_error)?;
    let mut update = ledger::KeyUpdate::default();
    let mut limits = current.rate_limits;
    for (name, value) in &patch {
        match name.as_str() {
            "name" => {
                let new_name: String = field(name, value)?;
                check_name(&new_name)?;
                update.name = Some(new_name);
            }
            "models" => update.allowed_models = Some(field(name, value)?),
            "budget" => {
                let budget: Option<CreateBudget> = field(name, value)?;
                update.budget = Some(budget.map(|b| b.budget()).transpose()?);
            }
            "requests_per_minute" => limits.requests_per_minute = field(name, value)?,
            "images_per_minute" => limits.images_per_minute = field(name, value)?,
            "service_tier" => update.service_tier = Some(field(name, value)?),
            other => return Err(ApiError::unknown_parameter(other).into()),
        }
    }
    if limits != current.rate_limits {
        update.rate_limits = Some(limits);
    }
    let key = ledger.update_key(&id, update).await.map_err(ledger_error)?;
    Ok(json(StatusCode::OK, &key_out(key, None)))
}

/// A key's new name, or a 400 naming `name`: the ledger's rule (not empty, no control characters,
/// since names are shown in terminals and spreadsheets), checked here so that the error names the field.
fn check_name(name: &str) -> Result<(), ApiError> {
    match ledger::keys::name_problem(name) {
        Some(problem) => Err(ApiError::invalid_value_msg("name", format!("Invalid 'name': a key's name {problem}."))),
        None => Ok(()),
    }
}

/// One field of a merge patch, or an error naming it.
fn field<T: serde::de::DeserializeOwned>(name: &str, v: &serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(v.clone()).map_err(|e| ApiError::invalid_value_msg(name, format!("'{name}': {e}")))
}

/// A budget in a key update.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBudget {
    budget_usd: Option<Decimal>,
    period: Option<String>,
    soft_budget_usd: Option<Decimal>,
    image_quota: Option<u64>,
}

impl CreateBudget {
    fn budget(self) -> Result<Budget, ApiError> {
        Ok(Budget {
            period: parse_period(self.period.as_deref())?,
            limit_usd: self.budget_usd,
            soft_limit_usd: self.soft_budget_usd,
            image_quota: self.image_quota,
        })
    }
}

fn parse_period(p: Option<&str>) -> Result<Period, ApiError> {
    match p {
        None => Ok(Period::Month),
        Some(p) => {
            Period::parse(p).ok_or_else(|| ApiError::invalid_value("period", p, &["day", "week", "month", "total"]))
        }
    }
}

pub async fn list_keys(State(state): State<AppState>, caller: Option<Extension<Caller>>) -> AdminResult {
    require_admin(caller.as_ref().map(|Extension(c)| c))?;
    let keys = ledger(&state)?.list_keys().await.map_err(ledger_error)?;
    let data: Vec<KeyOut> = keys.into_iter().map(|k| key_out(k, None)).collect();
    Ok(json(StatusCode::OK, &serde_json::json!({"object": "list", "data": data})))
}

pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> AdminResult {
    require_admin(caller.as_ref().map(|Extension(c)| c))?;
    let key = ledger(&state)?.revoke_key(&id).await.map_err(ledger_error)?;
    Ok(json(StatusCode::OK, &key_out(key, None)))
}

/// The query of both organization endpoints.
struct Window {
    query: UsageQuery,
    width: BucketWidth,
}

fn window(
    params: &HashMap<String, String>,
    allowed_groups: &[(&str, Dimension)],
    costs: bool,
) -> Result<Window, ApiError> {
    let time = |name: &str| -> Result<Option<DateTime<Utc>>, ApiError> {
        match params.get(name) {
            None => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .and_then(|s| DateTime::from_timestamp(s, 0))
                .map(Some)
                .ok_or_else(|| ApiError::invalid_type(name, "a Unix time in seconds", v)),
        }
    };
    let start = time("start_time")?.ok_or_else(|| ApiError::missing("start_time"))?;
    let end = time("end_time")?;
    let width = match params.get("bucket_width").map(String::as_str) {
        None | Some("1d") => BucketWidth::Day,
        Some("1h") if !costs => BucketWidth::Hour,
        Some(other) => {
            let allowed: &[&str] = if costs { &["1d"] } else { &["1h", "1d"] };
            return Err(ApiError::invalid_value("bucket_width", other, allowed));
        }
    };
    let mut group_by = Vec::new();
    for g in params.get("group_by").map(|g| g.split(',').collect::<Vec<_>>()).unwrap_or_default() {
        let g = g.trim();
        if g.is_empty() {
            continue;
        }
        let names: Vec<&str> = allowed_groups.iter().map(|(n, _)| *n).collect();
        let dim = allowed_groups.iter().find(|(n, _)| *n == g).map(|(_, d)| *d);
        group_by.push(dim.ok_or_else(|| ApiError::invalid_value("group_by", g, &names))?);
    }
    for name in params.keys() {
        if !["start_time", "end_time", "bucket_width", "group_by", "limit", "group_by[]"].contains(&name.as_str()) {
            return Err(ApiError::unknown_parameter(name));
        }
    }
    Ok(Window { query: UsageQuery { start, end, group_by }, width })
}

#[derive(Serialize)]
struct Page<T> {
    object: &'static str,
    data: Vec<Bucket<T>>,
    has_more: bool,
    next_page: Option<String>,
}

#[derive(Serialize)]
struct Bucket<T> {
    object: &'static str,
    start_time: i64,
    end_time: i64,
    results: Vec<T>,
}

fn page<T>(buckets: Vec<UsageBucket>, f: impl Fn(UsageRow) -> T) -> Page<T> {
    let data = buckets
        .into_iter()
        .map(|b| Bucket {
            object: "bucket",
            start_time: b.start.timestamp(),
            end_time: b.end.timestamp(),
            results: b.results.into_iter().map(&f).collect(),
        })
        .collect();
    Page { object: "page", data, has_more: false, next_page: None }
}

#[derive(Serialize)]
struct ImagesResult {
    object: &'static str,
    images: u64,
    num_model_requests: u64,
    source: Option<String>,
    size: Option<String>,
    model: Option<String>,
    api_key_id: Option<String>,
    project_id: Option<String>,
    user_id: Option<String>,
}

/// `GET /v1/organization/usage/images`.
pub async fn usage_images(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(params): Query<HashMap<String, String>>,
) -> AdminResult {
    require_admin(caller.as_ref().map(|Extension(c)| c))?;
    let groups = [
        ("model", Dimension::Model),
        ("api_key_id", Dimension::Key),
        ("project_id", Dimension::Project),
        ("size", Dimension::Size),
        ("source", Dimension::Operation),
    ];
    let w = window(&params, &groups, false)?;
    let buckets = ledger(&state)?.usage_buckets(&w.query, w.width).await.map_err(ledger_error)?;
    Ok(json(
        StatusCode::OK,
        &page(buckets, |r| ImagesResult {
            object: "organization.usage.images.result",
            images: r.images,
            num_model_requests: r.succeeded,
            source: r.operation.map(|o| if o == "edit" { "image.edit".into() } else { "image.generation".into() }),
            size: r.size,
            model: r.model,
            api_key_id: r.key_id,
            project_id: r.project_id,
            user_id: None,
        }),
    ))
}

#[derive(Serialize)]
struct Amount {
    value: Box<RawValue>,
    currency: &'static str,
}

#[derive(Serialize)]
struct CostsResult {
    object: &'static str,
    amount: Amount,
    line_item: Option<String>,
    project_id: Option<String>,
}

/// `GET /v1/organization/costs` (`group_by`: `project_id`, `line_item` = the model).
pub async fn costs(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Query(params): Query<HashMap<String, String>>,
) -> AdminResult {
    require_admin(caller.as_ref().map(|Extension(c)| c))?;
    let groups = [("project_id", Dimension::Project), ("line_item", Dimension::Model)];
    let w = window(&params, &groups, true)?;
    let buckets = ledger(&state)?.usage_buckets(&w.query, w.width).await.map_err(ledger_error)?;
    Ok(json(
        StatusCode::OK,
        &page(buckets, |r| CostsResult {
            object: "organization.costs.result",
            amount: Amount { value: number(r.cost_usd), currency: "usd" },
            line_item: r.model,
            project_id: r.project_id,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_control_characters_are_refused_naming_the_field() {
        for bad in ["\u{1b}[2J\u{1b}[31mpwned", "a\tb", "x\u{9b}", "  "] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(
                (e.status, e.body.param.as_deref(), e.body.code.as_deref()),
                (400, Some("name"), Some("invalid_value"))
            );
            assert!(e.body.message.starts_with("Invalid 'name': a key's name cannot "), "{}", e.body.message);
        }
        assert!(check_name("\u{1b}").unwrap_err().body.message.contains("U+001B"));
        for good in ["team", "=HYPERLINK(\"x\")", "café"] {
            assert_eq!(check_name(good), Ok(()));
        }
    }
}
