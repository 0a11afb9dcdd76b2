//! The validation rules, as a table: each row is a request to one model and what OpenAI's API (and so
//! imagegate) answers: accepted, or a 400 naming the field and the error code.

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use api::{Fields, RawRequest};
use domain::{JobKind, ModelFamily, SizeChoice};
use serde_json::{Value, json};

/// `Ok` or `Err((param, code))`.
type Expect = Result<(), (&'static str, &'static str)>;

fn family(model: &str) -> ModelFamily {
    ModelFamily::of_openai_model(model).expect("a known model")
}

fn check(kind: JobKind, model: &str, body: Value, expect: Expect) {
    let map = body.as_object().expect("an object").clone();
    let extra: &[&str] = if kind == JobKind::Edit { &["images", "mask"] } else { &[] };
    let result = RawRequest::parse(&Fields::Json(&map), kind, extra)
        .and_then(|raw| raw.validate(model, family(model), kind).map(|_| ()));
    let got = result.map_err(|e| {
        assert_eq!(e.status, 400, "{model} {body}: status");
        assert!(!e.body.message.is_empty());
        (e.body.param.unwrap_or_default(), e.body.code.unwrap_or_default())
    });
    let want = expect.map_err(|(p, c)| (p.to_owned(), c.to_owned()));
    assert_eq!(got, want, "{kind:?} {model} {body}");
}

fn generation(model: &str, mut extra: Value, expect: Expect) {
    extra["prompt"].as_str().is_none().then(|| extra["prompt"] = json!("a cute baby sea otter"));
    check(JobKind::Generate, model, extra, expect);
}

fn edit(model: &str, mut extra: Value, expect: Expect) {
    extra["prompt"].as_str().is_none().then(|| extra["prompt"] = json!("add a hat"));
    check(JobKind::Edit, model, extra, expect);
}

const GPT: [&str; 3] = ["gpt-image-1-mini", "gpt-image-1", "gpt-image-1.5"];
const ALL: [&str; 5] = ["gpt-image-1-mini", "gpt-image-1", "gpt-image-1.5", "dall-e-3", "dall-e-2"];

#[test]
fn prompt() {
    for m in ALL {
        check(JobKind::Generate, m, json!({}), Err(("prompt", "missing_required_parameter")));
        check(JobKind::Generate, m, json!({"prompt": ""}), Err(("prompt", "empty_string")));
        check(JobKind::Generate, m, json!({"prompt": 7}), Err(("prompt", "invalid_type")));
        check(JobKind::Generate, m, json!({"prompt": null}), Err(("prompt", "missing_required_parameter")));
    }
    for (m, max) in [("gpt-image-1-mini", 32_000), ("gpt-image-1", 32_000), ("dall-e-3", 4_000), ("dall-e-2", 1_000)] {
        generation(m, json!({"prompt": "é".repeat(max)}), Ok(()));
        generation(m, json!({"prompt": "é".repeat(max + 1)}), Err(("prompt", "string_above_max_length")));
    }
}

#[test]
fn n() {
    for m in ["gpt-image-1-mini", "gpt-image-1", "gpt-image-1.5", "dall-e-2"] {
        generation(m, json!({"n": 10}), Ok(()));
        generation(m, json!({"n": 11}), Err(("n", "integer_above_max_value")));
        generation(m, json!({"n": 0}), Err(("n", "integer_below_min_value")));
    }
    generation("dall-e-3", json!({"n": 1}), Ok(()));
    generation("dall-e-3", json!({"n": 2}), Err(("n", "invalid_value")));
    generation("gpt-image-1", json!({"n": "2"}), Err(("n", "invalid_type")));
    generation("gpt-image-1", json!({"n": 1.5}), Err(("n", "invalid_type")));
    generation("gpt-image-1", json!({"n": 99999999999999999999u128 as f64}), Err(("n", "invalid_type")));
    generation("gpt-image-1", json!({"n": null}), Ok(()));
}

#[test]
fn size() {
    let table: &[(&str, &[&str], &[&str])] = &[
        ("gpt-image-1-mini", &["1024x1024", "1536x1024", "1024x1536", "auto"], &["1254x836", "256x256", "1792x1024"]),
        ("gpt-image-1", &["1024x1024", "1536x1024", "1024x1536", "auto"], &["512x512", "1024x1792"]),
        ("gpt-image-1.5", &["1024x1024", "1536x1024", "1024x1536", "auto"], &["2048x2048"]),
        ("dall-e-3", &["1024x1024", "1792x1024", "1024x1792", "auto"], &["1536x1024", "512x512"]),
        ("dall-e-2", &["256x256", "512x512", "1024x1024", "auto"], &["1536x1024", "1792x1024"]),
    ];
    for (model, good, bad) in table {
        for s in *good {
            generation(model, json!({"size": s}), Ok(()));
        }
        for s in *bad {
            generation(model, json!({"size": s}), Err(("size", "invalid_value")));
        }
        for s in ["", "big", "1024", "1024x", "-1x5"] {
            generation(model, json!({"size": s}), Err(("size", "invalid_value")));
        }
    }
    edit("gpt-image-1", json!({"size": "1536x1024"}), Ok(()));
    edit("dall-e-2", json!({"size": "512x512"}), Ok(()));
    edit("dall-e-2", json!({"size": "1536x1024"}), Err(("size", "invalid_value")));
}

/// gpt-image-2 takes any size within its rule, and a refusal says the rule.
#[test]
fn gpt_image_2_sizes() {
    for model in ["gpt-image-2", "gpt-image-2-2026-04-21"] {
        for s in ["2048x1152", "3840x2160", "2160x3840", "1024x1024", "1536x1024", "1024x640", "2880x2880", "auto"] {
            generation(model, json!({"size": s}), Ok(()));
            edit(model, json!({"size": s}), Ok(()));
        }
        for s in ["1000x1000", "4096x1024", "3856x2160", "3840x1024", "1008x640", "2896x2896", "512x512", "big"] {
            generation(model, json!({"size": s}), Err(("size", "invalid_value")));
        }
    }
    let message = |size: &str| {
        let map = json!({"prompt": "p", "size": size});
        let raw = RawRequest::parse(&Fields::Json(map.as_object().unwrap()), JobKind::Generate, &[]).unwrap();
        raw.validate("gpt-image-2", ModelFamily::GptImage2, JobKind::Generate).unwrap_err().body.message
    };
    assert!(message("1000x1000").contains("multiples of 16"), "{}", message("1000x1000"));
    assert!(message("4096x1024").contains("at most 3840"), "{}", message("4096x1024"));
    assert!(message("3840x1024").contains("3:1"), "{}", message("3840x1024"));
    assert!(message("512x512").contains("at least 655360"), "{}", message("512x512"));
    assert!(message("2896x2896").contains("at most 8294400"), "{}", message("2896x2896"));
    // Its other rules: no transparency, input fidelity always high, the GPT quality levels.
    generation("gpt-image-2", json!({"background": "transparent"}), Err(("background", "invalid_value")));
    generation("gpt-image-2", json!({"background": "opaque", "output_format": "webp"}), Ok(()));
    edit("gpt-image-2", json!({"input_fidelity": "high"}), Err(("input_fidelity", "invalid_value")));
    generation("gpt-image-2", json!({"quality": "hd"}), Err(("quality", "invalid_value")));
    generation("gpt-image-2", json!({"quality": "high", "n": 10, "stream": true, "partial_images": 3}), Ok(()));
    generation("gpt-image-2", json!({"style": "vivid"}), Err(("style", "unsupported_parameter")));
}

#[test]
fn the_issue_example_size_message() {
    let map = json!({"prompt": "p", "size": "1254x836"});
    let raw = RawRequest::parse(&Fields::Json(map.as_object().unwrap()), JobKind::Generate, &[]).unwrap();
    let e = raw.validate("gpt-image-1-mini", ModelFamily::GptImageMini, JobKind::Generate).unwrap_err();
    assert_eq!(
        e.body.message,
        "Invalid value: '1254x836'. Supported values are: '1024x1024', '1024x1536', '1536x1024', and 'auto'."
    );
}

#[test]
fn quality() {
    for m in GPT {
        for q in ["low", "medium", "high", "auto"] {
            generation(m, json!({"quality": q}), Ok(()));
        }
        generation(m, json!({"quality": "hd"}), Err(("quality", "invalid_value")));
        generation(m, json!({"quality": "standard"}), Err(("quality", "invalid_value")));
    }
    for q in ["standard", "hd", "auto"] {
        generation("dall-e-3", json!({"quality": q}), Ok(()));
    }
    generation("dall-e-3", json!({"quality": "high"}), Err(("quality", "invalid_value")));
    generation("dall-e-2", json!({"quality": "standard"}), Ok(()));
    generation("dall-e-2", json!({"quality": "hd"}), Err(("quality", "invalid_value")));
    generation("gpt-image-1", json!({"quality": "ultra"}), Err(("quality", "invalid_value")));
}

#[test]
fn response_format() {
    for m in ["dall-e-3", "dall-e-2"] {
        generation(m, json!({"response_format": "url"}), Ok(()));
        generation(m, json!({"response_format": "b64_json"}), Ok(()));
    }
    // Every model takes 'url' here (OpenAI refuses it for GPT image models; the server links them).
    for m in GPT {
        generation(m, json!({"response_format": "b64_json"}), Ok(()));
        generation(m, json!({"response_format": "url"}), Ok(()));
    }
    generation("dall-e-2", json!({"response_format": "jpeg"}), Err(("response_format", "invalid_value")));
    edit("dall-e-2", json!({"response_format": "url"}), Ok(()));
}

#[test]
fn output_format_and_compression() {
    for m in GPT {
        for f in ["png", "jpeg", "webp"] {
            generation(m, json!({"output_format": f}), Ok(()));
        }
        generation(m, json!({"output_format": "gif"}), Err(("output_format", "invalid_value")));
        generation(m, json!({"output_format": "jpeg", "output_compression": 0}), Ok(()));
        generation(m, json!({"output_format": "webp", "output_compression": 100}), Ok(()));
        generation(
            m,
            json!({"output_format": "jpeg", "output_compression": 101}),
            Err(("output_compression", "integer_above_max_value")),
        );
        generation(
            m,
            json!({"output_format": "jpeg", "output_compression": -1}),
            Err(("output_compression", "integer_below_min_value")),
        );
        generation(m, json!({"output_compression": 50}), Err(("output_compression", "invalid_value")));
        generation(
            m,
            json!({"output_format": "png", "output_compression": 50}),
            Err(("output_compression", "invalid_value")),
        );
        // 100 is the default, meaning "no compression": harmless with png.
        generation(m, json!({"output_format": "png", "output_compression": 100}), Ok(()));
    }
    for m in ["dall-e-3", "dall-e-2"] {
        generation(m, json!({"output_format": "png"}), Err(("output_format", "unsupported_parameter")));
        generation(m, json!({"output_compression": 80}), Err(("output_compression", "unsupported_parameter")));
    }
}

#[test]
fn background() {
    for m in GPT {
        for b in ["transparent", "opaque", "auto"] {
            generation(m, json!({"background": b}), Ok(()));
        }
        generation(m, json!({"background": "transparent", "output_format": "webp"}), Ok(()));
        generation(
            m,
            json!({"background": "transparent", "output_format": "jpeg"}),
            Err(("background", "invalid_value")),
        );
        generation(m, json!({"background": "clear"}), Err(("background", "invalid_value")));
    }
    generation("dall-e-3", json!({"background": "opaque"}), Err(("background", "unsupported_parameter")));
}

#[test]
fn moderation_style_user() {
    for m in GPT {
        generation(m, json!({"moderation": "low"}), Ok(()));
        generation(m, json!({"moderation": "none"}), Err(("moderation", "invalid_value")));
        generation(m, json!({"style": "vivid"}), Err(("style", "unsupported_parameter")));
    }
    generation("dall-e-2", json!({"moderation": "low"}), Err(("moderation", "unsupported_parameter")));
    generation("dall-e-3", json!({"style": "natural"}), Ok(()));
    generation("dall-e-3", json!({"style": "noir"}), Err(("style", "invalid_value")));
    generation("dall-e-2", json!({"style": "vivid"}), Err(("style", "unsupported_parameter")));
    for m in ALL {
        generation(m, json!({"user": "user-1234"}), Ok(()));
        generation(m, json!({"user": 1234}), Err(("user", "invalid_type")));
    }
}

#[test]
fn stream_and_partial_images() {
    for m in GPT {
        generation(m, json!({"stream": true}), Ok(()));
        generation(m, json!({"stream": true, "partial_images": 3}), Ok(()));
        generation(m, json!({"stream": true, "partial_images": 4}), Err(("partial_images", "integer_above_max_value")));
        generation(
            m,
            json!({"stream": true, "partial_images": -1}),
            Err(("partial_images", "integer_below_min_value")),
        );
        generation(m, json!({"stream": "yes"}), Err(("stream", "invalid_type")));
    }
    for m in ["dall-e-3", "dall-e-2"] {
        generation(m, json!({"stream": true}), Err(("stream", "unsupported_parameter")));
        generation(m, json!({"stream": false}), Ok(()));
        generation(m, json!({"partial_images": 1}), Err(("partial_images", "unsupported_parameter")));
    }
}

#[test]
fn partial_images_are_only_produced_in_a_stream() {
    let parse = |body: Value| {
        let raw = RawRequest::parse(&Fields::Json(body.as_object().unwrap()), JobKind::Generate, &[]).unwrap();
        raw.validate("gpt-image-1", ModelFamily::GptImage, JobKind::Generate).unwrap().1
    };
    assert_eq!(parse(json!({"prompt": "p", "partial_images": 2})).partial_images, 0);
    assert_eq!(parse(json!({"prompt": "p", "partial_images": 2, "stream": true})).partial_images, 2);
}

#[test]
fn input_fidelity() {
    for m in ["gpt-image-1", "gpt-image-1.5"] {
        edit(m, json!({"input_fidelity": "high"}), Ok(()));
        edit(m, json!({"input_fidelity": "low"}), Ok(()));
        edit(m, json!({"input_fidelity": "max"}), Err(("input_fidelity", "invalid_value")));
    }
    edit("gpt-image-1-mini", json!({"input_fidelity": "high"}), Err(("input_fidelity", "unsupported_parameter")));
    edit("dall-e-2", json!({"input_fidelity": "low"}), Err(("input_fidelity", "unsupported_parameter")));
    generation("gpt-image-1", json!({"input_fidelity": "high"}), Err(("input_fidelity", "unknown_parameter")));
}

#[test]
fn edits_need_an_edit_model() {
    edit("dall-e-3", json!({}), Err(("model", "invalid_value")));
    edit("dall-e-2", json!({}), Ok(()));
    edit("gpt-image-1", json!({"style": "vivid"}), Err(("style", "unknown_parameter")));
}

#[test]
fn extensions_service_tier_and_seed() {
    for t in ["auto", "default", "flex"] {
        generation("gpt-image-1-mini", json!({"service_tier": t}), Ok(()));
    }
    generation("gpt-image-1-mini", json!({"service_tier": "priority"}), Err(("service_tier", "invalid_value")));
    generation("gpt-image-1-mini", json!({"seed": 0}), Ok(()));
    generation("gpt-image-1-mini", json!({"seed": u64::MAX}), Ok(()));
    generation("gpt-image-1-mini", json!({"seed": -1}), Err(("seed", "invalid_value")));
    generation("gpt-image-1-mini", json!({"seed": "42"}), Err(("seed", "invalid_type")));
}

#[test]
fn the_decoder_extension_is_for_local_models_only() {
    let validate = |body: Value, family: ModelFamily, kind: JobKind| {
        let map = body.as_object().unwrap().clone();
        let raw = RawRequest::parse(&Fields::Json(&map), kind, &[])?;
        raw.validate("m", family, kind).map(|(_, options, _)| options.decoder)
    };
    for kind in [JobKind::Generate, JobKind::Edit] {
        for (text, want) in [("full", domain::Decoder::Full), ("tiny", domain::Decoder::Tiny)] {
            let body = json!({"prompt": "otter", "decoder": text});
            assert_eq!(validate(body, ModelFamily::Local, kind).unwrap(), Some(want));
        }
        let none = validate(json!({"prompt": "otter"}), ModelFamily::Local, kind).unwrap();
        assert_eq!(none, None);
        let e = validate(json!({"prompt": "otter", "decoder": "small"}), ModelFamily::Local, kind).unwrap_err();
        assert_eq!((e.body.param.as_deref(), e.body.code.as_deref()), (Some("decoder"), Some("invalid_value")));
        assert!(e.body.message.contains("'full'") && e.body.message.contains("'tiny'"), "{}", e.body.message);
    }
    generation("gpt-image-1", json!({"decoder": "tiny"}), Err(("decoder", "unsupported_parameter")));
    generation("gpt-image-1", json!({"decoder": 1}), Err(("decoder", "invalid_type")));
}

#[test]
fn unknown_fields_are_named() {
    generation("gpt-image-1", json!({"colour": "red"}), Err(("colour", "unknown_parameter")));
    edit("gpt-image-1", json!({"image": "x"}), Err(("image", "unknown_parameter")));
}

#[test]
fn multipart_text_fields_follow_the_same_rules() {
    let parts: Vec<(String, String)> =
        [("prompt", "hat"), ("n", "2"), ("size", "1024x1536"), ("stream", "true"), ("partial_images", "1")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    let raw = RawRequest::parse(&Fields::Text(&parts), JobKind::Edit, &[]).unwrap();
    let (_, o, _) = raw.validate("gpt-image-1", ModelFamily::GptImage, JobKind::Edit).unwrap();
    assert_eq!((o.n, o.stream, o.partial_images), (2, true, 1));
    assert!(matches!(o.size, Some(SizeChoice::Exact(s)) if s.width == 1024 && s.height == 1536));
    let bad = vec![("prompt".to_owned(), "hat".to_owned()), ("n".to_owned(), "two".to_owned())];
    let e = RawRequest::parse(&Fields::Text(&bad), JobKind::Edit, &[]).unwrap_err();
    assert_eq!(e.body.param.as_deref(), Some("n"));
}

#[test]
fn default_model_follows_openai() {
    let raw = |v: Value| RawRequest::parse(&Fields::Json(v.as_object().unwrap()), JobKind::Generate, &[]).unwrap();
    assert_eq!(raw(json!({"prompt": "p"})).openai_default_model(JobKind::Generate), "dall-e-2");
    assert_eq!(raw(json!({"prompt": "p", "quality": "high"})).openai_default_model(JobKind::Generate), "gpt-image-1");
    assert_eq!(
        raw(json!({"prompt": "p", "output_format": "webp"})).openai_default_model(JobKind::Generate),
        "gpt-image-1"
    );
    assert_eq!(raw(json!({"prompt": "p"})).openai_default_model(JobKind::Edit), "gpt-image-1.5");
}
