//! `imagegate estimate`: what a job would cost, itemized, before anything is spent. Runs the same
//! estimate as `POST /v1/images/estimates`, in-process, on this instance's providers and prices.

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
    /// How many requests.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Images per request.
    #[arg(short = 'n', long = "n", default_value_t = 1)]
    n: u64,
    /// Prompt length in words (about 4 tokens per 3 words).
    #[arg(long, conflicts_with_all = ["prompt", "prompt_tokens"])]
    prompt_words: Option<u64>,
    /// Prompt length in tokens.
    #[arg(long, conflicts_with = "prompt")]
    prompt_tokens: Option<u64>,
    /// The prompt itself (counted in o200k tokens).
    #[arg(long)]
    prompt: Option<String>,
    /// An input image size for edits (WIDTHxHEIGHT); repeat for several.
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
    let state = args.config.state(&[])?;
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
    let items: Vec<PlannedItem> = api::estimates::parse_estimate_request(&map).map_err(|e| e.body.message)?;
    let outcome = server::estimates::estimate(&state, &items).map_err(|e| e.body.message)?;
    let mut out = std::io::stdout().lock();
    let text =
        if args.json { serde_json::to_string_pretty(&outcome.json).unwrap_or_default() } else { human(&outcome.json) };
    writeln!(out, "{text}").map_err(|e| e.to_string())
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
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(4000), "4,000");
        assert_eq!(thousands(105_600), "105,600");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
