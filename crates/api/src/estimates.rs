//! `POST /v1/images/estimates`, imagegate's own endpoint: planned requests in, itemized costs out.
//!
//! ```json
//! {"requests": [{"model": "gpt-image-1-mini", "quality": "medium", "size": "1024x1024", "n": 1,
//!                "count": 100, "prompt_words": 30, "service_tier": "default"}]}
//! ```
//! Each item names its prompt by `prompt` (text, counted in o200k tokens), `prompt_tokens` or
//! `prompt_words`; `input_images` lists edit inputs as `"WxH"`; `provider` picks one provider.
//!
//! Every count, length and size is bounded (the `MAX_*` constants below): generously for real use, and
//! so that no price computation comes near overflow. Out of range is a 400 whose `param` names the field
//! with its item's index (`requests[0].prompt_tokens`) and whose message says the allowed range.

use domain::{InputFidelity, Quality, Size};
use serde_json::{Map, Value, json};

use pricing::limits;

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

/// At most this many planned items in one estimate. An item is one kind of request (a model, quality,
/// size and prompt length) with its own `count`, so even a varied campaign needs a handful; 100 is
/// generous, and it bounds the work of one estimate: every item is priced on every model, provider and
/// tier for the alternatives, and its prompt text tokenized.
pub const MAX_ITEMS: usize = 100;
// The limits of one item, as the wire's signed integers. Each is `pricing::limits`'s, which says why it
// is where it is; the pricing math is checked against overflow within them and beyond.
/// Requests in one planned item.
pub const MAX_COUNT: i64 = limits::MAX_REQUESTS as i64;
/// Images per request (OpenAI's `n`).
pub const MAX_N: i64 = limits::MAX_IMAGES_PER_REQUEST as i64;
/// The longest prompt text, in characters: the longest any generation takes, the very constant
/// generations are checked against.
pub const MAX_PROMPT_CHARS: usize = crate::request::GPT_PROMPT_MAX;
/// The most prompt tokens: the most a prompt of `MAX_PROMPT_CHARS` characters can count.
pub const MAX_PROMPT_TOKENS: i64 = limits::MAX_PROMPT_TOKENS as i64;
/// The most prompt words: the words that count as `MAX_PROMPT_TOKENS` tokens.
pub const MAX_PROMPT_WORDS: i64 = limits::MAX_PROMPT_WORDS as i64;
/// Input images per request, as edits take them.
pub const MAX_INPUT_IMAGES: usize = crate::images::MAX_INPUT_IMAGES;
/// Partial images per request (OpenAI's `partial_images`).
pub const MAX_PARTIAL_IMAGES: i64 = limits::MAX_PARTIAL_IMAGES as i64;

// The limits the pricing math is proven safe for are the ones this parser enforces.
const _: () = assert!(limits::MAX_PROMPT_TOKENS == 4 * MAX_PROMPT_CHARS as u64);
const _: () = assert!(limits::MAX_INPUT_IMAGES == MAX_INPUT_IMAGES);

pub fn parse_estimate_request(body: &Map<String, Value>) -> Result<Vec<PlannedItem>, ApiError> {
    if let Some(unknown) = body.keys().find(|k| *k != "requests") {
        return Err(ApiError::unknown_parameter(unknown));
    }
    let items = match body.get("requests") {
        None | Some(Value::Null) => return Err(ApiError::missing("requests")),
        Some(Value::Array(a)) if a.len() > MAX_ITEMS => return Err(array_too_long("requests", MAX_ITEMS, a.len())),
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
            // The param names the field with its item's index; the message keeps the field's own name,
            // which is also what the CLI's flags are named after.
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
        Some(s) => Some(parse_size("size", s, "Expected WIDTHxHEIGHT or 'auto'")?),
    };
    let n = bounded(&f, "n", (1, MAX_N), "images per request, as generations allow")?.unwrap_or(1);
    let count = bounded(&f, "count", (1, MAX_COUNT), "requests in one planned item")?.unwrap_or(1);
    let text = f.string("prompt")?;
    if let Some(t) = &text {
        let chars = t.chars().count();
        if chars > MAX_PROMPT_CHARS {
            return Err(ApiError::string_too_long("prompt", MAX_PROMPT_CHARS, chars));
        }
    }
    let why =
        format!("the most tokens a prompt of {MAX_PROMPT_CHARS} characters, the longest any model takes, can have");
    let tokens = bounded(&f, "prompt_tokens", (0, MAX_PROMPT_TOKENS), &why)?;
    let why = format!("the words that count as {MAX_PROMPT_TOKENS} tokens");
    let words = bounded(&f, "prompt_words", (0, MAX_PROMPT_WORDS), &why)?;
    let prompt = match (text, tokens, words) {
        (Some(t), None, None) => PromptSize::Text(t),
        (None, Some(t), None) => PromptSize::Tokens(t),
        (None, None, Some(w)) => PromptSize::Words(w),
        (None, None, None) => {
            return Err(ApiError::missing("prompt").with_message(
                "Missing the prompt: give 'prompt' (the text), 'prompt_tokens' or 'prompt_words'.".to_owned(),
            ));
        }
        _ => {
            return Err(ApiError::invalid_value_msg(
                "prompt",
                "Give exactly one of 'prompt', 'prompt_tokens' and 'prompt_words'.".to_owned(),
            ));
        }
    };
    let input_images = match map.get("input_images") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) if a.len() > MAX_INPUT_IMAGES => {
            return Err(array_too_long("input_images", MAX_INPUT_IMAGES, a.len()));
        }
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let param = format!("input_images[{i}]");
                match v.as_str() {
                    Some(s) => parse_size(&param, s, "Expected \"WIDTHxHEIGHT\""),
                    None => Err(ApiError::invalid_value_msg(
                        &param,
                        format!("Invalid input image size {v}: expected \"WIDTHxHEIGHT\"."),
                    )),
                }
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
    let partial_images =
        bounded(&f, "partial_images", (0, MAX_PARTIAL_IMAGES), "as streaming generations allow")?.unwrap_or(0);
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

/// An integer field within `min..=max`, or `None` when absent. Out of range it is OpenAI's
/// below-minimum or above-maximum error, which also says the whole allowed range and why it ends there.
fn bounded(f: &Fields<'_>, name: &str, (min, max): (i64, i64), why: &str) -> Result<Option<u64>, ApiError> {
    let range = |e: ApiError| {
        let message = format!("{} Allowed: {min} to {max} ({why}).", e.body.message);
        e.with_message(message)
    };
    match f.integer(name)? {
        None => Ok(None),
        Some(v) if v < min => Err(range(ApiError::below_min(name, min, v))),
        Some(v) if v > max => Err(range(ApiError::above_max(name, max, v))),
        // In range, so non-negative.
        Some(v) => Ok(Some(v.unsigned_abs())),
    }
}

/// `WIDTHxHEIGHT` with each side from 1 to `limits::MAX_IMAGE_SIDE` pixels.
fn parse_size(param: &str, s: &str, expected: &str) -> Result<Size, ApiError> {
    let max = limits::MAX_IMAGE_SIDE;
    match s.parse::<Size>() {
        Ok(size) if size.width <= max && size.height <= max => Ok(size),
        Ok(_) => Err(ApiError::invalid_value_msg(
            param,
            format!(
                "Invalid value: '{s}'. Each side must be from 1 to {max} pixels (the largest side an image file can have in JPEG, far beyond what any model makes or reads)."
            ),
        )),
        Err(()) => Err(ApiError::invalid_value_msg(param, format!("Invalid value: '{s}'. {expected}."))),
    }
}

/// OpenAI's error for an array with too many elements.
fn array_too_long(param: &str, max: usize, got: usize) -> ApiError {
    ApiError::new(
        400,
        "invalid_request_error",
        Some(param),
        Some("array_above_max_length"),
        format!(
            "Invalid '{param}': array too long. Expected an array with maximum length {max}, but got an array with length {got} instead."
        ),
    )
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
