//! Requests as an upstream OpenAI-compatible API expects them, built from domain requests.
//!
//! Only the fields the client sent are forwarded, so the upstream applies its own defaults exactly as if
//! the client had called it directly. imagegate's extension fields (`service_tier`, `seed`) stay here.

use base64::Engine as _;
use bytes::Bytes;
use domain::{EditRequest, GenerateRequest, ImageOptions, SizeChoice, VariationRequest};
use serde_json::{Map, Value};

use crate::ApiError;

/// The JSON body of `POST /images/generations` for `model`.
pub fn generation_body(model: &str, req: &GenerateRequest) -> Value {
    let mut m = Map::new();
    m.insert("model".into(), model.into());
    m.insert("prompt".into(), req.prompt.clone().into());
    for (k, v) in option_fields(&req.options) {
        m.insert(k.into(), v);
    }
    Value::Object(m)
}

/// The text parts of a multipart `POST /images/variations` for `model` (the image is added by the
/// caller).
pub fn variation_text_fields(model: &str, req: &VariationRequest) -> Vec<(&'static str, String)> {
    let mut out = vec![("model", model.to_owned())];
    out.extend(text_fields(&req.options));
    out
}

/// The options as multipart text parts.
fn text_fields(options: &ImageOptions) -> Vec<(&'static str, String)> {
    option_fields(options)
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, text)
        })
        .collect()
}

/// The text parts of a multipart `POST /images/edits` for `model` (files are added by the caller).
pub fn edit_text_fields(model: &str, req: &EditRequest) -> Vec<(&'static str, String)> {
    let mut out = vec![("model", model.to_owned()), ("prompt", req.prompt.clone())];
    if let Some(f) = req.input_fidelity {
        out.push(("input_fidelity", f.as_str().to_owned()));
    }
    out.extend(text_fields(&req.options));
    out
}

fn option_fields(o: &ImageOptions) -> Vec<(&'static str, Value)> {
    let mut out: Vec<(&'static str, Value)> = Vec::new();
    if o.n != 1 {
        out.push(("n", o.n.into()));
    }
    if let Some(size) = o.size {
        let s = match size {
            SizeChoice::Auto => "auto".to_owned(),
            SizeChoice::Exact(s) => s.to_string(),
        };
        out.push(("size", s.into()));
    }
    let strings = [
        ("quality", o.quality.map(|v| v.as_str())),
        ("output_format", o.output_format.map(|v| v.as_str())),
        ("background", o.background.map(|v| v.as_str())),
        ("moderation", o.moderation.map(|v| v.as_str())),
        ("style", o.style.map(|v| v.as_str())),
        ("response_format", o.response_format.map(|v| v.as_str())),
    ];
    for (k, v) in strings {
        if let Some(v) = v {
            out.push((k, v.into()));
        }
    }
    if let Some(c) = o.output_compression {
        out.push(("output_compression", c.into()));
    }
    if let Some(u) = &o.user {
        out.push(("user", u.clone().into()));
    }
    if o.stream {
        out.push(("stream", true.into()));
        out.push(("partial_images", o.partial_images.into()));
    }
    out
}

/// An image reference of the JSON edit form: the bytes of a `data:` URL, or an `http(s)://` URL for the
/// server to fetch (only from the hosts its operator allows: `server::remote`).
#[derive(Debug, Clone, PartialEq)]
pub enum ImageRef {
    Data(Bytes),
    Url(String),
    /// A file uploaded to the Files API (`{"file_id": ...}`).
    File(String),
}

/// Reads an image reference of the JSON edit form (`{"image_url": ...}` or `{"file_id": ...}`).
pub fn parse_image_ref(param: &str, value: &Value) -> Result<ImageRef, ApiError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::invalid_type(param, "an object with 'image_url'", crate::fields::json_kind(value)))?;
    if let Some(unknown) = obj.keys().find(|k| *k != "image_url" && *k != "file_id") {
        return Err(ApiError::unknown_parameter(&format!("{param}.{unknown}")));
    }
    match (obj.get("file_id").filter(|v| !v.is_null()), obj.get("image_url").filter(|v| !v.is_null())) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_value_msg(
                param,
                "An image is given by 'image_url' or by 'file_id', not both.".to_owned(),
            ));
        }
        (Some(Value::String(id)), None) if !id.is_empty() => return Ok(ImageRef::File(id.clone())),
        (Some(other), None) => {
            return Err(ApiError::invalid_type(
                &format!("{param}.file_id"),
                "a file id",
                crate::fields::json_kind(other),
            ));
        }
        _ => {}
    }
    let param = format!("{param}.image_url");
    let url = match obj.get("image_url") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(ApiError::invalid_type(&param, "a string", crate::fields::json_kind(other)));
        }
        None => return Err(ApiError::missing(&param)),
    };
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(ImageRef::Url(url.clone()));
    }
    decode_data_url(&param, url).map(ImageRef::Data)
}

/// Decodes `data:<mime>;base64,<payload>`.
pub fn decode_data_url(param: &str, url: &str) -> Result<Bytes, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::invalid_value_msg(
            param,
            "Invalid image URL: expected a base64 data: URL (data:image/png;base64,...) or an https:// URL.".to_owned(),
        ));
    };
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(ApiError::invalid_value_msg(
            param,
            "Invalid data URL: no ',' separates the header from the data.".to_owned(),
        ));
    };
    if !meta.ends_with(";base64") {
        return Err(ApiError::invalid_value_msg(
            param,
            "Invalid data URL: the data must be base64 (data:image/png;base64,...).".to_owned(),
        ));
    }
    decode_base64(param, payload.trim())
}

/// Decodes base64 into a buffer of its own: a large image goes into pages that return to the OS when
/// it is dropped (see [`crate::buffer`]).
fn decode_base64(param: &str, payload: &str) -> Result<Bytes, ApiError> {
    let invalid = |e: &dyn std::fmt::Display| {
        ApiError::invalid_value_msg(param, format!("Invalid data URL: the base64 data does not decode ({e})."))
    };
    // Mapping fails only when the machine is out of memory: a 503 to retry.
    let mut buffer = crate::buffer::ByteBuffer::zeroed(base64::decoded_len_estimate(payload.len()))
        .map_err(|_| crate::images::decode_busy(1))?;
    let len = base64::engine::general_purpose::STANDARD
        .decode_slice(payload, buffer.as_mut_slice())
        .map_err(|e| invalid(&e))?;
    buffer.truncate(len);
    Ok(buffer.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{OutputFormat, Quality, Size};

    #[test]
    fn only_sent_fields_are_forwarded() {
        let req = GenerateRequest {
            prompt: "otter".into(),
            options: ImageOptions {
                size: Some(SizeChoice::Exact(Size::new(1024, 1536))),
                quality: Some(Quality::Low),
                output_format: Some(OutputFormat::Jpeg),
                output_compression: Some(40),
                seed: Some(3),
                ..ImageOptions::default()
            },
        };
        let body = generation_body("gpt-image-1", &req);
        assert_eq!(
            body,
            serde_json::json!({"model":"gpt-image-1","prompt":"otter","size":"1024x1536","quality":"low",
                "output_format":"jpeg","output_compression":40})
        );
    }

    #[test]
    fn data_urls_decode_and_others_are_refused() {
        assert_eq!(decode_data_url("images[0].image_url", "data:image/png;base64,QUJD").unwrap(), Bytes::from("ABC"));
        let e = decode_data_url("images[0].image_url", "https://example.com/a.png").unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("images[0].image_url"));
        assert!(decode_data_url("p", "data:image/png;base64,%%%").is_err());
        assert!(decode_data_url("p", "data:image/png,abc").is_err());
    }
}
