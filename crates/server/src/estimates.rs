//! Estimates: planned requests priced with the same math as the bill, on the providers this instance
//! routes to (or at list price for catalog models it does not serve), and the same job priced on every
//! other model, provider and tier it knows, cheapest first. Shared by the HTTP endpoint and the CLI.
//!
//! The items come bounded from `api::estimates` (counts, prompt lengths, sizes), and every sum here is
//! checked like the pricing math itself: an estimate is exact or refused, never wrapped.

use api::ApiError;
use api::estimates::{Alternative, PlannedItem, PricedItem, PromptSize};
use domain::{ModelFamily, Quality, Size};
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

/// One item priced where it runs.
struct Priced {
    target: Target,
    quality: Quality,
    size: Size,
    service_tier: String,
    images: u64,
    estimate: Estimate,
}

pub fn estimate(state: &AppState, items: &[PlannedItem]) -> Result<EstimateOutcome, ApiError> {
    // Each prompt's tokens, counted once: a prompt text is tokenized here only, however many targets
    // and tiers it is then priced on.
    let prompt_tokens: Vec<u64> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            prompt_tokens(item).map_err(|e| {
                let field = format!("requests[{i}].{}", e.body.param.as_deref().unwrap_or("prompt"));
                e.with_param(&field)
            })
        })
        .collect::<Result<_, _>>()?;
    let mut priced: Vec<Priced> = Vec::new();
    for (i, (item, &tokens)) in items.iter().zip(&prompt_tokens).enumerate() {
        let param = |field: &str| format!("requests[{i}].{field}");
        let target = target_for(state, item).map_err(|e| e.with_param(&param("model")))?;
        let (estimate, quality, size) = price_on(state, &target, item, tokens).map_err(|e| {
            let field = param(e.body.param.as_deref().unwrap_or("model"));
            e.with_param(&field)
        })?;
        let images = item.count.checked_mul(item.n).ok_or_else(|| too_large(&param("count")))?;
        priced.push(Priced { target, quality, size, service_tier: item.service_tier.clone(), images, estimate });
    }
    let total = priced
        .iter()
        .try_fold(Decimal::ZERO, |sum, p| sum.checked_add(p.estimate.cost.total))
        .ok_or_else(|| too_large("requests"))?;

    let mut notes = Vec::new();
    for Priced { target, images, estimate: e, .. } in &priced {
        if let Some(v) = &e.per_image_view {
            notes.push(format!(
                "{model}: the published per-image price is ${unit} ({n} images: ${per_image}). Adding that per-image fee, the input tokens (${input}) and the image output tokens (${output}) gives ${naive} (the published campaign example rounds the output line to ${output_rounded} and writes ${naive_rounded}). That counts every image twice: the per-image price is the price of the output tokens. {model} is billed from its usage tokens, so the correct total is input + output tokens: ${total} (per-image fee + input tokens would be ${per_image_plus_input}).",
                model = target.model,
                unit = pricing::format_usd(v.unit_price),
                n = images,
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
    // A shut-down model priced at its list price: what it cost, not what can be bought.
    let today = crate::routing::today();
    for p in &priced {
        let model = &p.target.model;
        if p.target.provider == LIST_PRICE
            && let Some(date) =
                state.prices.lifecycle(model).filter(|l| l.is_shut_down(today)).and_then(|l| l.shutdown_date)
        {
            let note = format!(
                "{model} was shut down by its provider on {date}: this is its last list price, which OpenAI no longer sells (estimate without \"provider\" to price what a request for it runs on here)."
            );
            if !notes.contains(&note) {
                notes.push(note);
            }
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
            let mut sum = Some(Decimal::ZERO);
            for (item, &tokens) in items.iter().zip(&prompt_tokens) {
                let item = PlannedItem { service_tier: tier.clone(), ..item.clone() };
                sum = match (sum, price_on(state, &target, &item, tokens)) {
                    (Some(sum), Ok((e, _, _))) => sum.checked_add(e.cost.total),
                    _ => None,
                };
                if sum.is_none() {
                    break;
                }
            }
            if let Some(sum) = sum {
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
        .map(|(p, it)| PricedItem {
            model: &p.target.model,
            provider: &p.target.provider,
            service_tier: &p.service_tier,
            quality: p.quality,
            size: p.size,
            requests: it.count,
            images: p.images,
            estimate: &p.estimate,
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
    let today = chrono::Utc::now().date_naive();
    for model in state.prices.models.keys() {
        // A model its provider no longer serves is no alternative at its list price.
        if state.prices.lifecycle(model).is_some_and(|l| l.is_shut_down(today)) {
            continue;
        }
        if !out.iter().any(|t| t.model == *model && t.discount_percent.is_zero()) {
            out.push(Target { provider: LIST_PRICE.to_owned(), model: model.clone(), discount_percent: Decimal::ZERO });
        }
    }
    out
}

/// A total or count too large to compute exactly. The parser's limits keep real plans far from this;
/// only prices configured absurdly high could reach it.
fn too_large(param: &str) -> ApiError {
    ApiError::invalid_value_msg(
        param,
        "The estimate is too large to compute exactly: ask for fewer requests or images.".to_owned(),
    )
}

/// The text tokens of one request's prompt; the error's param is the item's field at fault.
fn prompt_tokens(item: &PlannedItem) -> Result<u64, ApiError> {
    match &item.prompt {
        PromptSize::Text(t) => Ok(pricing::count_text_tokens(t)),
        PromptSize::Tokens(t) => Ok(*t),
        PromptSize::Words(w) => {
            pricing::tokens_for_words(*w).map_err(|e| ApiError::invalid_value_msg("prompt_words", e.0))
        }
    }
}

/// Prices one item on one target, its prompt counted as `prompt_tokens`; the error's param is the
/// item's field at fault.
fn price_on(
    state: &AppState,
    target: &Target,
    item: &PlannedItem,
    prompt_tokens: u64,
) -> Result<(Estimate, Quality, Size), ApiError> {
    let price = state
        .prices
        .model(&target.model)
        .ok_or_else(|| ApiError::model_not_found(&target.model, &state.catalog.public_names()))?;
    // A model that takes any size within a rule (gpt-image-2) is estimated only at sizes it takes.
    if let (Some(size), Some(ModelFamily::GptImage2)) = (item.size, ModelFamily::of_openai_model(&target.model))
        && let Some(problem) = domain::gpt_image_2::size_problem(size.width, size.height)
    {
        return Err(ApiError::invalid_value_msg(
            "size",
            format!("Model '{}' does not take the size {size}: {problem}.", target.model),
        ));
    }
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
