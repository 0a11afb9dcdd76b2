//! `imagegate estimate`: what a job would cost, itemized, before anything is spent. Runs the same
//! estimate as `POST /v1/images/estimates`, in-process, on this instance's providers and prices.
//!
//! The flags are checked by the endpoint's own parser (`api::estimates`), not by clap's ranges, so
//! that a value out of range gets the endpoint's message (the allowed range and why) and exit code 1,
//! the same as every other refusal here. The limits in the help come from there.

use std::io::Write as _;

use api::estimates::PlannedItem;
use clap::Args;
use serde_json::Value;

use crate::ConfigArgs;

#[derive(Args)]
pub struct EstimateArgs {
    /// Model name or alias (or any model of the price catalog, at list price).
    #[arg(long)]
    model: String,
    /// low, medium, high (GPT image models), standard, hd (DALL-E), or auto (the most expensive).
    #[arg(long, default_value = "auto")]
    quality: String,
    /// WIDTHxHEIGHT, or auto (the most expensive the model prices).
    #[arg(long, default_value = "auto")]
    size: String,
    /// How many requests (1 to 1,000,000).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Images per request (1 to 10).
    #[arg(short = 'n', long = "n", default_value_t = 1)]
    n: u64,
    /// Prompt length in words, 0 to 96,000 (4 tokens per 3 words, rounded up).
    #[arg(long, conflicts_with_all = ["prompt", "prompt_tokens"])]
    prompt_words: Option<u64>,
    /// Prompt length in tokens, 0 to 128,000 (the most a 32,000-character prompt can have).
    #[arg(long, conflicts_with = "prompt")]
    prompt_tokens: Option<u64>,
    /// The prompt itself, up to 32,000 characters (counted in o200k tokens).
    #[arg(long)]
    prompt: Option<String>,
    /// An input image size for edits (WIDTHxHEIGHT, each side up to 65,535); repeat for up to 16.
    #[arg(long)]
    input_image: Vec<String>,
    /// default, flex or batch.
    #[arg(long, default_value = "default")]
    tier: String,
    /// Price on this provider (default: the one the model routes to, else the list price).
    #[arg(long)]
    provider: Option<String>,
    /// Print one JSON object (its `total_usd` is the total, a decimal string).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: EstimateArgs) -> Result<(), String> {
    // The inputs first: a value out of range is refused before any config is read.
    let items = planned_items(&args)?;
    let state = args.config.state(&[])?;
    let outcome = server::estimates::estimate(&state, &items).map_err(|e| e.body.message)?;
    let mut out = std::io::stdout().lock();
    let text =
        if args.json { serde_json::to_string_pretty(&outcome.json).unwrap_or_default() } else { human(&outcome.json) };
    writeln!(out, "{text}").map_err(|e| e.to_string())
}

/// The flags as the endpoint's one planned item, checked by the endpoint's parser: its message (the
/// field, the allowed range) is the error.
fn planned_items(args: &EstimateArgs) -> Result<Vec<PlannedItem>, String> {
    let mut item = serde_json::json!({
        "model": args.model,
        "quality": args.quality,
        "size": args.size,
        "count": args.count,
        "n": args.n,
        "service_tier": args.tier,
        "input_images": args.input_image,
    });
    match (&args.prompt, args.prompt_tokens, args.prompt_words) {
        (Some(p), _, _) => item["prompt"] = p.clone().into(),
        (None, Some(t), _) => item["prompt_tokens"] = t.into(),
        (None, None, Some(w)) => item["prompt_words"] = w.into(),
        (None, None, None) => return Err("give the prompt's size: --prompt-words, --prompt-tokens or --prompt".into()),
    }
    if let Some(p) = &args.provider {
        item["provider"] = p.clone().into();
    }
    let body = serde_json::json!({ "requests": [item] });
    let map = body.as_object().cloned().unwrap_or_default();
    api::estimates::parse_estimate_request(&map).map_err(|e| e.body.message)
}

/// The estimate for people: each item's lines, the total, the notes, and the alternatives.
fn human(v: &Value) -> String {
    let s = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    // Dollars with cents, e.g. 1.10; the JSON keeps the exact normalized decimal.
    let usd = |v: &Value| {
        v.as_str()
            .and_then(|t| t.parse::<pricing::Decimal>().ok())
            .map(pricing::format_usd)
            .unwrap_or_else(|| v.to_string())
    };
    let mut out = String::new();
    for item in v["items"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{} requests, {} images on {} ({}), {} {}, {} tier\n",
            item["requests"],
            item["images"],
            s(&item["model"]),
            s(&item["provider"]),
            s(&item["quality"]),
            s(&item["size"]),
            s(&item["service_tier"]),
        ));
        for line in item["lines"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:<22} {:>9} x ${:<10} = ${}\n",
                s(&line["item"]),
                thousands(line["quantity"].as_u64().unwrap_or(0)),
                s(&line["unit_price_usd"]),
                usd(&line["amount_usd"])
            ));
        }
        out.push_str(&format!(
            "  {:<47} = ${}\n",
            format!("total (billed by {})", s(&item["billing_basis"])),
            usd(&item["total_usd"])
        ));
        if let Some(view) = item["per_image_view"].as_object() {
            out.push_str(&format!(
                "  published per-image view: {} images x ${} = ${}; + input tokens = ${}\n",
                item["images"],
                usd(&view["per_image_price_usd"]),
                usd(&view["per_image_total_usd"]),
                usd(&view["per_image_plus_input_usd"])
            ));
        }
    }
    out.push_str(&format!("\nTotal: ${}\n", usd(&v["total_usd"])));
    for note in v["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("\nNote: {}\n", s(note)));
    }
    let alternatives = v["alternatives"].as_array().cloned().unwrap_or_default();
    if !alternatives.is_empty() {
        out.push_str("\nThe same job elsewhere, cheapest first:\n");
        for a in alternatives.iter().take(15) {
            out.push_str(&format!(
                "  ${:<12} {:<18} {:<12} {}\n",
                usd(&a["total_usd"]),
                s(&a["model"]),
                s(&a["provider"]),
                s(&a["service_tier"])
            ));
        }
    }
    out
}

/// 105600 -> "105,600".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EstimateArgs,
    }

    fn items(flags: &[&str]) -> Result<Vec<PlannedItem>, String> {
        let cli = Cli::try_parse_from([&["estimate", "--model", "gpt-image-1-mini"], flags].concat()).unwrap();
        planned_items(&cli.args)
    }

    /// Issue 17: the flags are bounded as the endpoint's fields are, with the endpoint's message.
    #[test]
    fn out_of_range_flags_get_the_endpoints_message() {
        let e = items(&["--prompt-tokens", "9223372036854775807", "--count", "1000000"]).unwrap_err();
        assert!(e.contains("'prompt_tokens'") && e.contains("Allowed: 0 to 128000"), "{e}");
        let e = items(&["--prompt-words", "9223372036854775807"]).unwrap_err();
        assert!(e.contains("'prompt_words'") && e.contains("Allowed: 0 to 96000"), "{e}");
        let e = items(&["--prompt-words", "3", "--count", "1000001"]).unwrap_err();
        assert!(e.contains("'count'") && e.contains("Allowed: 1 to 1000000"), "{e}");
        let e = items(&["--prompt", &"a".repeat(32_001)]).unwrap_err();
        assert!(e.contains("'prompt'") && e.contains("maximum length 32000"), "{e}");
        let sizes: Vec<&str> = (0..17).flat_map(|_| ["--input-image", "512x512"]).collect();
        let e = items(&[&["--prompt-words", "3"], &sizes[..]].concat()).unwrap_err();
        assert!(e.contains("maximum length 16"), "{e}");
        let e = items(&["--prompt-words", "3", "--size", "65536x1024"]).unwrap_err();
        assert!(e.contains("from 1 to 65535 pixels"), "{e}");

        let ok = items(&["--prompt-tokens", "128000", "--count", "1000000", "-n", "10"]).unwrap();
        assert_eq!((ok[0].count, ok[0].n), (1_000_000, 10));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(4000), "4,000");
        assert_eq!(thousands(105_600), "105,600");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
