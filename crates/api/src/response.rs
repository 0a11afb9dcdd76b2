//! Responses on the wire: `ImagesResponse`, the streaming events, `GET /v1/models`, in both directions
//! (imagegate writes them to its clients and reads them from upstream providers).

use domain::{
    Background, GeneratedImage, ImagePayload, ImageResult, JobKind, ModelFamily, OutputFormat, Quality, Resolved, Size,
    StreamEvent, Usage,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ErrorBody;

#[derive(Serialize, Deserialize, Default, Clone, Copy, Debug, PartialEq, Eq)]
struct InputTokensDetails {
    #[serde(default)]
    text_tokens: u64,
    #[serde(default)]
    image_tokens: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
struct OutputTokensDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text_tokens: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
struct UsageWire {
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    input_tokens_details: InputTokensDetails,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_tokens_details: Option<OutputTokensDetails>,
}

impl From<&Usage> for UsageWire {
    fn from(u: &Usage) -> Self {
        let details = (u.output_image_tokens.is_some() || u.output_text_tokens.is_some())
            .then_some(OutputTokensDetails { image_tokens: u.output_image_tokens, text_tokens: u.output_text_tokens });
        UsageWire {
            total_tokens: u.total_tokens,
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            input_tokens_details: InputTokensDetails {
                text_tokens: u.input_text_tokens,
                image_tokens: u.input_image_tokens,
            },
            output_tokens_details: details,
        }
    }
}

impl From<UsageWire> for Usage {
    fn from(w: UsageWire) -> Self {
        Usage {
            input_tokens: w.input_tokens,
            output_tokens: w.output_tokens,
            total_tokens: w.total_tokens,
            input_text_tokens: w.input_tokens_details.text_tokens,
            input_image_tokens: w.input_tokens_details.image_tokens,
            output_image_tokens: w.output_tokens_details.and_then(|d| d.image_tokens),
            output_text_tokens: w.output_tokens_details.and_then(|d| d.text_tokens),
        }
    }
}

/// What imagegate writes: borrows the images so that large base64 payloads are not copied.
#[derive(Serialize)]
struct ImagesResponseOut<'a> {
    created: i64,
    data: Vec<ImageOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    background: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_format: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quality: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageWire>,
    /// imagegate's extension: the cost of this response (SDKs ignore unknown fields).
    #[serde(skip_serializing_if = "Option::is_none")]
    imagegate: Option<&'a Value>,
}

#[derive(Serialize)]
struct ImageOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    b64_json: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revised_prompt: Option<&'a str>,
}

/// Serializes a finished job as OpenAI's `ImagesResponse` for a model of `family`, with imagegate's
/// extension object (the cost) under `imagegate` when given. DALL-E's responses are `created` and
/// `data` only, as OpenAI's: the GPT image models' `background`, `output_format`, `size` and `quality`
/// are left out (DALL-E's `standard` quality is not a value of that field).
pub fn images_response_json(result: &ImageResult, family: ModelFamily, extension: Option<&Value>) -> Vec<u8> {
    let dall_e = matches!(family, ModelFamily::DallE2 | ModelFamily::DallE3);
    let resolved = Resolved::default();
    let r = if dall_e { &resolved } else { &result.resolved };
    let out = ImagesResponseOut {
        created: result.created,
        data: result
            .images
            .iter()
            .map(|img| {
                let (b64_json, url) = match &img.payload {
                    ImagePayload::Base64(b) => (Some(b.as_str()), None),
                    ImagePayload::Url(u) => (None, Some(u.as_str())),
                };
                ImageOut { b64_json, url, revised_prompt: img.revised_prompt.as_deref() }
            })
            .collect(),
        background: r.background.map(Background::as_str),
        output_format: r.output_format.map(OutputFormat::as_str),
        size: r.size.map(|s| s.to_string()),
        quality: r.quality.map(Quality::as_str),
        usage: result.usage.as_ref().map(UsageWire::from),
        imagegate: extension,
    };
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

/// What an upstream sends; tolerant of fields it leaves out or values imagegate does not know.
#[derive(Deserialize)]
struct ImagesResponseIn {
    created: Option<i64>,
    #[serde(default)]
    data: Vec<ImageIn>,
    background: Option<String>,
    output_format: Option<String>,
    size: Option<String>,
    quality: Option<String>,
    usage: Option<UsageWire>,
}

#[derive(Deserialize)]
struct ImageIn {
    b64_json: Option<String>,
    url: Option<String>,
    revised_prompt: Option<String>,
}

/// Reads an upstream's `ImagesResponse`. Values reported as `auto` or unknown are left unresolved for the
/// caller to fill in.
pub fn parse_images_response(body: &[u8]) -> Result<ImageResult, String> {
    let r: ImagesResponseIn = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let mut images = Vec::with_capacity(r.data.len());
    for (i, d) in r.data.into_iter().enumerate() {
        let payload = match (d.b64_json, d.url) {
            (Some(b), _) => ImagePayload::Base64(b),
            (None, Some(u)) => ImagePayload::Url(u),
            (None, None) => return Err(format!("data[{i}] has neither b64_json nor url")),
        };
        images.push(GeneratedImage { payload, revised_prompt: d.revised_prompt });
    }
    if images.is_empty() {
        return Err("the response has no images".to_owned());
    }
    Ok(ImageResult {
        created: r.created.unwrap_or(0),
        images,
        resolved: resolved_from_wire(r.size, r.quality, r.background, r.output_format),
        usage: r.usage.map(Usage::from),
        compute_ms: None,
    })
}

fn resolved_from_wire(
    size: Option<String>,
    quality: Option<String>,
    background: Option<String>,
    output_format: Option<String>,
) -> Resolved {
    Resolved {
        size: size.and_then(|s| s.parse::<Size>().ok()),
        quality: quality.and_then(|q| q.parse().ok()).filter(|q| *q != Quality::Auto),
        background: background.and_then(|b| b.parse().ok()).filter(|b| *b != Background::Auto),
        output_format: output_format.and_then(|f| f.parse().ok()),
    }
}

/// One streaming event as written to a client: the SSE `event:` name and the `data:` JSON.
pub fn stream_event_json(kind: JobKind, event: &StreamEvent, extension: Option<&Value>) -> (&'static str, String) {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        b64_json: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        partial_image_index: Option<u32>,
        created_at: i64,
        size: String,
        quality: &'static str,
        background: &'static str,
        output_format: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<UsageWire>,
        #[serde(skip_serializing_if = "Option::is_none")]
        imagegate: Option<&'a Value>,
    }
    // Variations do not stream (OpenAI has no such events); were one to, it would read as an edit.
    let prefix = match kind {
        JobKind::Generate => "image_generation",
        JobKind::Edit | JobKind::Variation => "image_edit",
    };
    let (name, b64_json, index, created_at, resolved, usage) = match event {
        StreamEvent::Partial { b64_json, partial_image_index, created_at, resolved } => {
            ("partial_image", b64_json, Some(*partial_image_index), *created_at, resolved, None)
        }
        StreamEvent::Completed { b64_json, created_at, resolved, usage, .. } => {
            ("completed", b64_json, None, *created_at, resolved, usage.as_ref().map(UsageWire::from))
        }
    };
    let event_name: &'static str = match (kind, name) {
        (JobKind::Generate, "partial_image") => "image_generation.partial_image",
        (JobKind::Generate, _) => "image_generation.completed",
        (JobKind::Edit | JobKind::Variation, "partial_image") => "image_edit.partial_image",
        (JobKind::Edit | JobKind::Variation, _) => "image_edit.completed",
    };
    debug_assert!(event_name.starts_with(prefix));
    let out = Out {
        kind: event_name,
        b64_json,
        partial_image_index: index,
        created_at,
        size: resolved.size.map(|s| s.to_string()).unwrap_or_else(|| "auto".to_owned()),
        quality: resolved.quality.map_or("auto", Quality::as_str),
        background: resolved.background.map_or("auto", Background::as_str),
        output_format: resolved.output_format.map_or("png", OutputFormat::as_str),
        usage,
        imagegate: extension,
    };
    (event_name, serde_json::to_string(&out).unwrap_or_default())
}

/// An error event in a stream, shaped so that the SDKs raise it (`{"type":"error","error":{...}}`).
pub fn stream_error_json(error: &ErrorBody) -> String {
    serde_json::json!({"type": "error", "error": error}).to_string()
}

/// What one upstream SSE `data:` line carried.
#[derive(Debug, PartialEq)]
pub enum UpstreamStreamItem {
    Event(StreamEvent),
    Error(ErrorBody),
    /// An event type imagegate does not know; skipped.
    Other(String),
}

/// Reads one upstream streaming event's JSON.
pub fn parse_stream_event(data: &str) -> Result<UpstreamStreamItem, String> {
    #[derive(Deserialize)]
    struct In {
        #[serde(rename = "type")]
        kind: Option<String>,
        b64_json: Option<String>,
        partial_image_index: Option<u32>,
        created_at: Option<i64>,
        size: Option<String>,
        quality: Option<String>,
        background: Option<String>,
        output_format: Option<String>,
        usage: Option<UsageWire>,
        error: Option<ErrorBody>,
    }
    let e: In = serde_json::from_str(data).map_err(|e| format!("invalid event JSON: {e}"))?;
    if let Some(err) = e.error {
        return Ok(UpstreamStreamItem::Error(err));
    }
    let kind = e.kind.unwrap_or_default();
    let resolved = resolved_from_wire(e.size, e.quality, e.background, e.output_format);
    let created_at = e.created_at.unwrap_or(0);
    let b64 = || e.b64_json.clone().ok_or_else(|| format!("event '{kind}' has no b64_json"));
    if kind.ends_with(".partial_image") {
        Ok(UpstreamStreamItem::Event(StreamEvent::Partial {
            b64_json: b64()?,
            partial_image_index: e.partial_image_index.unwrap_or(0),
            created_at,
            resolved,
        }))
    } else if kind.ends_with(".completed") {
        Ok(UpstreamStreamItem::Event(StreamEvent::Completed {
            b64_json: b64()?,
            created_at,
            resolved,
            usage: e.usage.map(Usage::from),
            compute_ms: None,
        }))
    } else {
        Ok(UpstreamStreamItem::Other(kind))
    }
}

/// imagegate's cost extension: the total as a decimal string, the basis, and every line of the bill.
pub fn cost_json(cost: &pricing::Cost, provider: &str, model: &str, service_tier: &str) -> Value {
    let lines: Vec<Value> = cost
        .lines
        .iter()
        .map(|l| {
            serde_json::json!({
                "item": l.item,
                "quantity": l.quantity,
                "unit_price_usd": l.unit_price.normalize().to_string(),
                "amount_usd": l.amount.normalize().to_string(),
            })
        })
        .collect();
    serde_json::json!({
        "cost_usd": cost.total_string(),
        "billing_basis": cost.basis.as_str(),
        "usage_source": cost.usage_source.as_str(),
        "provider": provider,
        "model": model,
        "service_tier": service_tier,
        "lines": lines,
    })
}

/// One model object of `GET /v1/models`: id, owner, and the shutdown date (`YYYY-MM-DD`) its provider
/// announced, `None` (null) when none is.
pub struct ModelObject<'a> {
    pub id: &'a str,
    pub owned_by: &'a str,
    pub shutdown_date: Option<String>,
}

/// `GET /v1/models`: OpenAI's list of model objects.
pub fn models_json(models: &[ModelObject<'_>], created: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "object": "list",
        "data": models.iter().map(|m| model_json(m, created)).collect::<Vec<_>>(),
    }))
    .unwrap_or_default()
}

/// `GET /v1/models/{id}`: one model object.
pub fn model_json(m: &ModelObject<'_>, created: i64) -> Value {
    json!({"id": m.id, "object": "model", "created": created, "owned_by": m.owned_by, "shutdown_date": m.shutdown_date})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_response_round_trips() {
        let body = br#"{"created":5,"data":[{"b64_json":"QUJD"}],"background":"opaque","output_format":"png",
            "size":"1024x1024","quality":"medium","usage":{"total_tokens":1096,"input_tokens":40,
            "output_tokens":1056,"input_tokens_details":{"text_tokens":40,"image_tokens":0}}}"#;
        let r = parse_images_response(body).unwrap();
        assert_eq!(r.resolved.size, Some(Size::new(1024, 1024)));
        assert_eq!(r.usage.unwrap().output_tokens, 1056);
        let out: serde_json::Value =
            serde_json::from_slice(&images_response_json(&r, ModelFamily::GptImageMini, None)).unwrap();
        let original: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(out, original);
    }

    #[test]
    fn dall_e_responses_are_created_and_data_only() {
        let body = br#"{"created":5,"data":[{"url":"http://x/y.png","revised_prompt":"p"}],"size":"1024x1024","quality":"standard"}"#;
        let mut r = parse_images_response(body).unwrap();
        r.resolved.size = Some(Size::new(1024, 1024));
        r.resolved.output_format = Some(OutputFormat::Png);
        for family in [ModelFamily::DallE2, ModelFamily::DallE3] {
            let out: serde_json::Value = serde_json::from_slice(&images_response_json(&r, family, None)).unwrap();
            assert_eq!(
                out,
                serde_json::json!({"created": 5, "data": [{"url": "http://x/y.png", "revised_prompt": "p"}]})
            );
        }
    }

    #[test]
    fn auto_from_upstream_is_left_unresolved() {
        let r = parse_images_response(br#"{"created":1,"data":[{"url":"http://x/y.png"}],"quality":"auto"}"#).unwrap();
        assert_eq!(r.resolved.quality, None);
        assert!(parse_images_response(br#"{"created":1,"data":[]}"#).is_err());
        assert!(parse_images_response(br#"{"created":1,"#).is_err());
    }

    #[test]
    fn stream_events_round_trip() {
        let ev = StreamEvent::Partial {
            b64_json: "QUJD".into(),
            partial_image_index: 1,
            created_at: 7,
            resolved: Resolved {
                size: Some(Size::new(1024, 1536)),
                quality: Some(Quality::Low),
                background: Some(Background::Opaque),
                output_format: Some(OutputFormat::Webp),
            },
        };
        let (name, json) = stream_event_json(JobKind::Edit, &ev, None);
        assert_eq!(name, "image_edit.partial_image");
        assert_eq!(parse_stream_event(&json).unwrap(), UpstreamStreamItem::Event(ev));
        let err = parse_stream_event(r#"{"type":"error","error":{"message":"m","type":"t","param":null,"code":null}}"#);
        assert!(matches!(err, Ok(UpstreamStreamItem::Error(_))));
    }
}
