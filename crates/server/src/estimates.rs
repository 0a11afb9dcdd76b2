//! Estimates: planned requests priced with the same math as the bill, on the providers this instance
//! routes to (or at list price for catalog models it does not serve), and the same job priced on every
//! other model, provider and tier it knows, cheapest first. Shared by the HTTP endpoint and the CLI.

use api::ApiError;
use api::estimates::{Alternative, PlannedItem, PricedItem, PromptSize};
use domain::{Quality, Size};
use pricing::{Adjustments, Decimal, Estimate, PlannedRequest};
use serde_json::Value;

use crate::AppState;

/// The provider name shown for models priced from the catalog without a provider serving them.
pub const LIST_PRICE: &str = "list price";

/// One way to run a job: a provider (or the list price), its model name, and its discount.
struct Target {
    provider: String,
    model: String,
    discount_percent: Decimal,
}

/// A computed estimate: the total and its JSON (`total_usd` and every line).
pub struct EstimateOutcome {
    pub total: Decimal,
    pub json: Value,
}

pub fn estimate(state: &AppState, items: &[PlannedItem]) -> Result<EstimateOutcome, ApiError> {
    let mut priced: Vec<(Target, Quality, Size, String, Estimate)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let param = |field: &str| format!("requests[{i}].{field}");
        let target = target_for(state, item).map_err(|e| e.with_param(&param("model")))?;
        let (estimate, quality, size) = price_on(state, &target, item).map_err(|e| {
            let field = param(e.body.param.as_deref().unwrap_or("model"));
            e.with_param(&field)
        })?;
        priced.push((target, quality, size, item.service_tier.clone(), estimate));
    }
    let total: Decimal = priced.iter().map(|p| p.4.cost.total).sum();

    let mut notes = Vec::new();
    for ((target, _, _, _, e), item) in priced.iter().zip(items) {
        if let Some(v) = &e.per_image_view {
            notes.push(format!(
                "{model}: the published per-image price is ${unit} ({n} images: ${per_image}). Adding that per-image fee, the input tokens (${input}) and the image output tokens (${output}) gives ${naive} (the published campaign example rounds the output line to ${output_rounded} and writes ${naive_rounded}). That counts every image twice: the per-image price is the price of the output tokens. {model} is billed from its usage tokens, so the correct total is input + output tokens: ${total} (per-image fee + input tokens would be ${per_image_plus_input}).",
                model = target.model,
                unit = pricing::format_usd(v.unit_price),
                n = item.count * item.n,
                per_image = pricing::format_usd(v.per_image_total),
                input = pricing::format_usd(v.input_tokens_cost),
                output = pricing::format_usd(v.output_tokens_cost),
                naive = pricing::format_usd(v.naive_sum),
                output_rounded = pricing::format_usd(v.output_tokens_cost.round_dp(2)),
                naive_rounded = pricing::format_usd(v.per_image_total + v.input_tokens_cost + v.output_tokens_cost.round_dp(2)),
                total = pricing::format_usd(e.cost.total),
                per_image_plus_input = pricing::format_usd(v.per_image_plus_input),
            ));
        }
    }
    if items.iter().any(|it| it.quality.is_none() || it.size.is_none()) {
        notes.push(
            "Quality or size 'auto' is estimated at the most expensive quality and size the model prices, so the estimate never understates."
                .to_owned(),
        );
    }

    // The same job on every target and tier, where every item can be priced there.
    let mut alternatives: Vec<(Target, String, Decimal)> = Vec::new();
    for target in all_targets(state) {
        for tier in state.prices.tiers.keys() {
            let mut sum = Decimal::ZERO;
            let mut ok = true;
            for item in items {
                let item = PlannedItem { service_tier: tier.clone(), ..item.clone() };
                match price_on(state, &target, &item) {
                    Ok((e, _, _)) => sum += e.cost.total,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                alternatives.push((
                    Target {
                        provider: target.provider.clone(),
                        model: target.model.clone(),
                        discount_percent: target.discount_percent,
                    },
                    tier.clone(),
                    sum,
                ));
            }
        }
    }
    alternatives.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.model.cmp(&b.0.model)));

    let items_json: Vec<PricedItem<'_>> = priced
        .iter()
        .zip(items)
        .map(|((t, q, s, tier, e), it)| PricedItem {
            model: &t.model,
            provider: &t.provider,
            service_tier: tier,
            quality: *q,
            size: *s,
            requests: it.count,
            images: it.count * it.n,
            estimate: e,
        })
        .collect();
    let alternatives_json: Vec<Alternative<'_>> = alternatives
        .iter()
        .map(|(t, tier, sum)| Alternative { model: &t.model, provider: &t.provider, service_tier: tier, total: *sum })
        .collect();
    let json = api::estimates::estimate_json(&items_json, total, &alternatives_json, &notes);
    Ok(EstimateOutcome { total, json })
}

/// Where an item is priced: the provider it names, the route its model takes here, or the list price.
fn target_for(state: &AppState, item: &PlannedItem) -> Result<Target, ApiError> {
    let name = match &item.provider {
        Some(p) if p != LIST_PRICE => format!("{p}/{}", item.model),
        _ => item.model.clone(),
    };
    if item.provider.as_deref() != Some(LIST_PRICE)
        && let Ok(route) = state.catalog.resolve(&name)
    {
        return Ok(Target {
            provider: route.provider.name().to_owned(),
            model: route.upstream_model,
            discount_percent: route.discount_percent,
        });
    }
    let list_price_allowed = item.provider.is_none() || item.provider.as_deref() == Some(LIST_PRICE);
    if list_price_allowed && state.prices.model(&item.model).is_some() {
        return Ok(Target {
            provider: LIST_PRICE.to_owned(),
            model: item.model.clone(),
            discount_percent: Decimal::ZERO,
        });
    }
    let mut known = state.catalog.public_names();
    known.extend(state.prices.models.keys().cloned());
    known.sort();
    known.dedup();
    Err(ApiError::model_not_found(&name, &known))
}

fn all_targets(state: &AppState) -> Vec<Target> {
    let mut out: Vec<Target> = state
        .catalog
        .routes()
        .into_iter()
        .map(|r| Target {
            provider: r.provider.name().to_owned(),
            model: r.upstream_model,
            discount_percent: r.discount_percent,
        })
        .collect();
    for model in state.prices.models.keys() {
        if !out.iter().any(|t| t.model == *model && t.discount_percent.is_zero()) {
            out.push(Target { provider: LIST_PRICE.to_owned(), model: model.clone(), discount_percent: Decimal::ZERO });
        }
    }
    out
}

/// Prices one item on one target; the error's param is the item's field at fault.
fn price_on(state: &AppState, target: &Target, item: &PlannedItem) -> Result<(Estimate, Quality, Size), ApiError> {
    let price = state
        .prices
        .model(&target.model)
        .ok_or_else(|| ApiError::model_not_found(&target.model, &state.catalog.public_names()))?;
    let (quality, size) = pricing::worst_case(price, item.quality, item.size).ok_or_else(|| {
        let what = match (item.quality, item.size) {
            (Some(q), Some(s)) => format!("quality '{q}' at {s}"),
            (Some(q), None) => format!("quality '{q}'"),
            (None, Some(s)) => format!("size {s}"),
            (None, None) => "any quality or size".to_owned(),
        };
        ApiError::invalid_value_msg(
            if item.size.is_some() { "size" } else { "quality" },
            format!("Model '{}' has no price for {what}.", target.model),
        )
    })?;
    let tier_multiplier = state.prices.tier_multiplier(&item.service_tier).ok_or_else(|| {
        let tiers: Vec<&str> = state.prices.tiers.keys().map(String::as_str).collect();
        ApiError::invalid_value("service_tier", &item.service_tier, &tiers)
    })?;
    let prompt_tokens = match &item.prompt {
        PromptSize::Text(t) => pricing::count_text_tokens(t),
        PromptSize::Tokens(t) => *t,
        PromptSize::Words(w) => pricing::tokens_for_words(*w),
    };
    let plan = PlannedRequest {
        quality,
        size,
        n: item.n,
        requests: item.count,
        prompt_tokens,
        input_images: item.input_images.clone(),
        input_fidelity_high: item.input_fidelity_high,
        partial_images: item.partial_images,
    };
    let adjustments = Adjustments {
        tier: item.service_tier.clone(),
        tier_multiplier,
        provider: target.provider.clone(),
        discount_percent: target.discount_percent,
    };
    let e = pricing::estimate(&target.model, price, &plan, &adjustments)
        .map_err(|e| ApiError::invalid_value_msg("model", e.0))?;
    Ok((e, quality, size))
}
