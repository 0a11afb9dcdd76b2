//! `POST /v1/images/estimates`, imagegate's own endpoint: planned requests in, itemized costs out.
//!
//! ```json
//! {"requests": [{"model": "gpt-image-1-mini", "quality": "medium", "size": "1024x1024", "n": 1,
//!                "count": 100, "prompt_words": 30, "service_tier": "default"}]}
//! ```
//! Each item names its prompt by `prompt` (text, counted in o200k tokens), `prompt_tokens` or
//! `prompt_words`; `input_images` lists edit inputs as `"WxH"`; `provider` picks one provider.

use domain::{InputFidelity, Quality, Size};
use serde_json::{Map, Value, json};

use crate::{ApiError, Fields};

/// The size of a planned prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSize {
    Text(String),
    Tokens(u64),
    Words(u64),
}

/// One planned item, as parsed; `None` quality or size means `auto` (estimated at the worst case).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedItem {
    pub model: String,
    pub provider: Option<String>,
    pub quality: Option<Quality>,
    pub size: Option<Size>,
    pub n: u64,
    pub count: u64,
    pub prompt: PromptSize,
    pub input_images: Vec<Size>,
    pub input_fidelity_high: bool,
    pub partial_images: u64,
    pub service_tier: String,
}

const ITEM_FIELDS: &[&str] = &[
    "model",
    "provider",
    "quality",
    "size",
    "n",
    "count",
    "prompt",
    "prompt_tokens",
    "prompt_words",
    "input_images",
    "input_fidelity",
    "partial_images",
    "service_tier",
];

/// At most this many requests in one planned item (OpenAI's batch limit).
pub const MAX_COUNT: i64 = 1_000_000;

pub fn parse_estimate_request(body: &Map<String, Value>) -> Result<Vec<PlannedItem>, ApiError> {
    if let Some(unknown) = body.keys().find(|k| *k != "requests") {
        return Err(ApiError::unknown_parameter(unknown));
    }
    let items = match body.get("requests") {
        None | Some(Value::Null) => return Err(ApiError::missing("requests")),
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_value_msg("requests", "List at least one planned request.".to_owned()));
        }
        Some(other) => return Err(ApiError::invalid_type("requests", "an array", crate::fields::json_kind(other))),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = format!("requests[{i}]");
            let map = item
                .as_object()
                .ok_or_else(|| ApiError::invalid_type(&prefix, "an object", crate::fields::json_kind(item)))?;
            parse_item(map).map_err(|mut e| {
                e.body.param = Some(match e.body.param {
                    Some(p) => format!("{prefix}.{p}"),
                    None => prefix.clone(),
                });
                e
            })
        })
        .collect()
}

fn parse_item(map: &Map<String, Value>) -> Result<PlannedItem, ApiError> {
    if let Some(unknown) = map.keys().find(|k| !ITEM_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::unknown_parameter(unknown));
    }
    let f = Fields::Json(map);
    let model = f.string("model")?.ok_or_else(|| ApiError::missing("model"))?;
    let quality = match f.string("quality")? {
        None => None,
        Some(q) => match q.parse::<Quality>() {
            Ok(Quality::Auto) => None,
            Ok(q) => Some(q),
            Err(()) => return Err(ApiError::invalid_value("quality", &q, Quality::ALL)),
        },
    };
    let size = match f.string("size")?.as_deref() {
        None | Some("auto") => None,
        Some(s) => Some(s.parse::<Size>().map_err(|()| {
            ApiError::invalid_value_msg("size", format!("Invalid value: '{s}'. Expected WIDTHxHEIGHT or 'auto'."))
        })?),
    };
    let positive = |name: &str, default: i64, max: i64| -> Result<u64, ApiError> {
        match f.integer(name)?.unwrap_or(default) {
            v if v < 1 => Err(ApiError::below_min(name, 1, v)),
            v if v > max => Err(ApiError::above_max(name, max, v)),
            v => Ok(v as u64),
        }
    };
    let n = positive("n", 1, 10)?;
    let count = positive("count", 1, MAX_COUNT)?;
    let prompt = match (f.string("prompt")?, f.integer("prompt_tokens")?, f.integer("prompt_words")?) {
        (Some(t), None, None) => PromptSize::Text(t),
        (None, Some(t), None) if t >= 0 => PromptSize::Tokens(t as u64),
        (None, None, Some(w)) if w >= 0 => PromptSize::Words(w as u64),
        (None, None, None) => {
            return Err(ApiError::missing("prompt").with_message(
                "Missing the prompt: give 'prompt' (the text), 'prompt_tokens' or 'prompt_words'.".to_owned(),
            ));
        }
        _ => {
            return Err(ApiError::invalid_value_msg(
                "prompt",
                "Give exactly one of 'prompt', 'prompt_tokens' and 'prompt_words', with a non-negative count."
                    .to_owned(),
            ));
        }
    };
    let input_images = match map.get("input_images") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().and_then(|s| s.parse::<Size>().ok()).ok_or_else(|| {
                    ApiError::invalid_value_msg(
                        &format!("input_images[{i}]"),
                        format!("Invalid input image size {v}: expected \"WIDTHxHEIGHT\"."),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid_type("input_images", "an array", crate::fields::json_kind(other)));
        }
    };
    let input_fidelity_high = match f.string("input_fidelity")? {
        None => false,
        Some(v) => match v.parse::<InputFidelity>() {
            Ok(fidelity) => fidelity == InputFidelity::High,
            Err(()) => return Err(ApiError::invalid_value("input_fidelity", &v, InputFidelity::ALL)),
        },
    };
    let partial_images = match f.integer("partial_images")?.unwrap_or(0) {
        p if p < 0 => return Err(ApiError::below_min("partial_images", 0, p)),
        p if p > 3 => return Err(ApiError::above_max("partial_images", 3, p)),
        p => p as u64,
    };
    Ok(PlannedItem {
        model,
        provider: f.string("provider")?,
        quality,
        size,
        n,
        count,
        prompt,
        input_images,
        input_fidelity_high,
        partial_images,
        service_tier: f.string("service_tier")?.unwrap_or_else(|| "default".to_owned()),
    })
}

/// One priced item of an estimate, with what it was priced as.
pub struct PricedItem<'a> {
    pub model: &'a str,
    pub provider: &'a str,
    pub service_tier: &'a str,
    pub quality: Quality,
    pub size: Size,
    pub requests: u64,
    pub images: u64,
    pub estimate: &'a pricing::Estimate,
}

/// One alternative: the whole job on another model, provider or tier.
pub struct Alternative<'a> {
    pub model: &'a str,
    pub provider: &'a str,
    pub service_tier: &'a str,
    pub total: pricing::Decimal,
}

fn usd(d: pricing::Decimal) -> String {
    d.normalize().to_string()
}

/// The estimate's JSON: `total_usd` (a decimal string), the items with their lines, the alternatives
/// cheapest first, and plain-language notes.
pub fn estimate_json(
    items: &[PricedItem<'_>],
    total: pricing::Decimal,
    alternatives: &[Alternative<'_>],
    notes: &[String],
) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|it| {
            let c = &it.estimate.cost;
            let usage = c.usage.map(|u| {
                json!({"text_input_tokens": u.input_text_tokens, "image_input_tokens": u.input_image_tokens,
                       "image_output_tokens": u.output_tokens})
            });
            let view = it.estimate.per_image_view.as_ref().map(|v| {
                json!({
                    "per_image_price_usd": usd(v.unit_price),
                    "per_image_total_usd": usd(v.per_image_total),
                    "input_tokens_usd": usd(v.input_tokens_cost),
                    "output_tokens_usd": usd(v.output_tokens_cost),
                    "naive_sum_usd": usd(v.naive_sum),
                    "per_image_plus_input_usd": usd(v.per_image_plus_input),
                })
            });
            json!({
                "model": it.model,
                "provider": it.provider,
                "service_tier": it.service_tier,
                "quality": it.quality.as_str(),
                "size": it.size.to_string(),
                "requests": it.requests,
                "images": it.images,
                "billing_basis": c.basis.as_str(),
                "usage": usage,
                "lines": c.lines.iter().map(|l| json!({
                    "item": l.item, "quantity": l.quantity,
                    "unit_price_usd": usd(l.unit_price), "amount_usd": usd(l.amount),
                })).collect::<Vec<_>>(),
                "total_usd": c.total_string(),
                "per_image_view": view,
            })
        })
        .collect();
    json!({
        "object": "image.estimate",
        "total_usd": usd(total),
        "items": items,
        "alternatives": alternatives.iter().map(|a| json!({
            "model": a.model, "provider": a.provider, "service_tier": a.service_tier, "total_usd": usd(a.total),
        })).collect::<Vec<_>>(),
        "notes": notes,
    })
}
