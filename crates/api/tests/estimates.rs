//! The estimates endpoint's input rules, as a table: every numeric field, list and prompt is accepted up
//! to its documented maximum and refused one past it, with a 400 naming the field and its item's index
//! (issue 17: unbounded inputs wrapped the price).

// Test helpers unwrap freely: a failure here is a failing test, not a user-facing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use api::ApiError;
use api::estimates::{PlannedItem, PromptSize, parse_estimate_request};
use serde_json::{Value, json};

fn parse(body: &Value) -> Result<Vec<PlannedItem>, ApiError> {
    parse_estimate_request(body.as_object().unwrap())
}

/// One planned item: the campaign's, with `fields` laid over it (a `null` removes the field).
fn item(fields: Value) -> Value {
    let mut item = json!({"model": "gpt-image-1-mini", "quality": "medium", "size": "1024x1024", "prompt_words": 30});
    for (k, v) in fields.as_object().unwrap() {
        if v.is_null() {
            item.as_object_mut().unwrap().remove(k);
        } else {
            item[k] = v.clone();
        }
    }
    item
}

/// The error for a body with this one item, as (param, code, message).
fn refusal(fields: Value) -> (String, String, String) {
    let body = json!({"requests": [item(fields.clone())]});
    let e = parse(&body).map(|_| ()).expect_err(&format!("{fields} should be refused"));
    assert_eq!(e.status, 400, "{fields}");
    assert_eq!(e.body.kind, "invalid_request_error");
    (e.body.param.unwrap(), e.body.code.unwrap(), e.body.message)
}

fn accepted(fields: Value) -> PlannedItem {
    let body = json!({"requests": [item(fields.clone())]});
    let mut items = parse(&body).unwrap_or_else(|e| panic!("{fields}: {}", e.body.message));
    items.remove(0)
}

#[test]
fn issue_17_inputs_are_refused_naming_the_field() {
    let body = json!({"requests": [{"model": "gpt-image-1-mini", "prompt_tokens": 9_223_372_036_854_775_807u64,
        "count": 1_000_000}]});
    let e = parse(&body).unwrap_err();
    assert_eq!((e.status, e.body.param.as_deref()), (400, Some("requests[0].prompt_tokens")));
    assert_eq!(e.body.code.as_deref(), Some("integer_above_max_value"));
    assert!(e.body.message.contains("Allowed: 0 to 128000"), "{}", e.body.message);

    let body = json!({"requests": [{"model": "gpt-image-1-mini", "prompt_words": 9_223_372_036_854_775_807u64}]});
    let e = parse(&body).unwrap_err();
    assert_eq!((e.status, e.body.param.as_deref()), (400, Some("requests[0].prompt_words")));
    assert!(e.body.message.contains("Allowed: 0 to 96000"), "{}", e.body.message);

    // A 2 MB prompt is refused by its length, as generations refuse it, before anything tokenizes it.
    let body = json!({"requests": [{"model": "gpt-image-1-mini", "prompt": "a".repeat(2_000_000)}]});
    let e = parse(&body).unwrap_err();
    assert_eq!((e.status, e.body.param.as_deref()), (400, Some("requests[0].prompt")));
    assert_eq!(e.body.code.as_deref(), Some("string_above_max_length"));
    assert_eq!(
        e.body.message,
        "Invalid 'prompt': string too long. Expected a string with maximum length 32000, but got a string with length 2000000 instead."
    );
}

#[test]
fn integers_are_accepted_up_to_their_maximum_and_refused_past_it() {
    // field, smallest, largest (the documented limits: see api::estimates and pricing::limits).
    let table: [(&str, i64, i64); 5] = [
        ("n", 1, 10),
        ("count", 1, 1_000_000),
        ("prompt_tokens", 0, 128_000),
        ("prompt_words", 0, 96_000),
        ("partial_images", 0, 3),
    ];
    for (field, min, max) in table {
        // The prompt is given one way only.
        let base = |v: Value| {
            let mut f = json!({ field: v });
            if field == "prompt_tokens" {
                f["prompt_words"] = Value::Null;
            }
            f
        };
        for ok in [min, max] {
            let parsed = accepted(base(json!(ok)));
            let got = match field {
                "n" => parsed.n,
                "count" => parsed.count,
                "partial_images" => parsed.partial_images,
                "prompt_tokens" => match parsed.prompt {
                    PromptSize::Tokens(t) => t,
                    other => panic!("{other:?}"),
                },
                _ => match parsed.prompt {
                    PromptSize::Words(w) => w,
                    other => panic!("{other:?}"),
                },
            };
            assert_eq!(got, ok as u64, "{field}");
        }
        let range = format!("Allowed: {min} to {max}");
        for (bad, code) in [
            (json!(max + 1), "integer_above_max_value"),
            (json!(i64::MAX), "integer_above_max_value"),
            (json!(u64::MAX), "integer_above_max_value"),
            (json!(min - 1), "integer_below_min_value"),
            (json!(i64::MIN), "integer_below_min_value"),
        ] {
            let (param, got_code, message) = refusal(base(bad.clone()));
            assert_eq!((param.as_str(), got_code.as_str()), (format!("requests[0].{field}").as_str(), code), "{bad}");
            assert!(message.contains(&range) && message.contains(&format!("'{field}'")), "{field}={bad}: {message}");
        }
    }
}

#[test]
fn prompt_text_up_to_the_generation_limit() {
    // Characters, not bytes: the same 32,000 as a generation's prompt on the GPT image models.
    let p = accepted(json!({"prompt_words": null, "prompt": "é".repeat(32_000)}));
    assert_eq!(p.prompt, PromptSize::Text("é".repeat(32_000)));
    let (param, code, _) = refusal(json!({"prompt_words": null, "prompt": "é".repeat(32_001)}));
    assert_eq!((param.as_str(), code.as_str()), ("requests[0].prompt", "string_above_max_length"));
    // Exactly one way of giving the prompt.
    let (param, code, _) = refusal(json!({"prompt_tokens": 5}));
    assert_eq!((param.as_str(), code.as_str()), ("requests[0].prompt", "invalid_value"));
}

#[test]
fn input_images_and_sizes_are_bounded() {
    let sixteen = vec!["1024x1024"; 16];
    assert_eq!(accepted(json!({"input_images": sixteen})).input_images.len(), 16);
    let (param, code, message) = refusal(json!({"input_images": vec!["1024x1024"; 17]}));
    assert_eq!((param.as_str(), code.as_str()), ("requests[0].input_images", "array_above_max_length"));
    assert!(message.contains("maximum length 16"), "{message}");

    assert_eq!(accepted(json!({"input_images": ["65535x65535"]})).input_images[0].width, 65_535);
    for bad in ["65536x1024", "1024x65536", "4294967296x1", "0x5", "big"] {
        let (param, code, _) = refusal(json!({"input_images": ["512x512", bad]}));
        assert_eq!((param.as_str(), code.as_str()), ("requests[0].input_images[1]", "invalid_value"), "{bad}");
        let (param, code, message) = refusal(json!({ "size": bad }));
        assert_eq!((param.as_str(), code.as_str()), ("requests[0].size", "invalid_value"), "{bad}");
        assert!(message.contains(bad), "{message}");
    }
    let (_, _, message) = refusal(json!({"size": "65536x1024"}));
    assert!(message.contains("from 1 to 65535 pixels"), "{message}");
    // Within the limit, the parser takes it; whether a model prices it is the estimate's business.
    assert_eq!(accepted(json!({"size": "65535x1"})).size.unwrap().width, 65_535);
}

#[test]
fn at_most_a_hundred_items_and_errors_name_the_item() {
    let hundred: Vec<Value> = (0..100).map(|_| item(json!({}))).collect();
    assert_eq!(parse(&json!({ "requests": hundred })).unwrap().len(), 100);
    let many: Vec<Value> = (0..101).map(|_| item(json!({}))).collect();
    let e = parse(&json!({ "requests": many })).unwrap_err();
    assert_eq!(e.body.param.as_deref(), Some("requests"));
    assert_eq!(e.body.code.as_deref(), Some("array_above_max_length"));
    assert!(e.body.message.contains("maximum length 100"), "{}", e.body.message);

    let e = parse(&json!({"requests": [item(json!({})), item(json!({"count": 1_000_001}))]})).unwrap_err();
    assert_eq!(e.body.param.as_deref(), Some("requests[1].count"));
}

#[test]
fn the_largest_item_parses_to_its_limits() {
    let p = accepted(json!({"n": 10, "count": 1_000_000, "prompt_words": null, "prompt_tokens": 128_000,
        "partial_images": 3, "input_images": vec!["65535x65535"; 16], "size": "65535x65535"}));
    assert_eq!((p.n, p.count, p.partial_images, p.input_images.len()), (10, 1_000_000, 3, 16));
    assert_eq!(p.prompt, PromptSize::Tokens(128_000));
}
