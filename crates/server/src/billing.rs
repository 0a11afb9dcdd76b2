//! The one place a served request's cost is computed: the job, its resolved settings and its usage
//! (the provider's, or counted when it reports none) priced by the catalog, with the provider's discount.
//!
//! The bill of a job follows one rule, streamed or not: its input (the prompt's text tokens, the edit's
//! input images) is billed once per request, its output per image produced. A stream's completed events
//! are priced one by one ([`StreamBill`]): the first carries the input, each carries its own image's
//! output (and its partial images), so the events add up to exactly what the same job costs unstreamed.
//! A cost is never more than the worst case held for it ([`cap`]): what is shown is what is charged.
//!
//! A request is priced at the tier it ran at ([`Route::tier`]: the catalog's multiplier, flex and batch
//! half the default), and says so in its cost (`service_tier`).

use domain::{ImageJob, Resolved, Size, Usage};
use ledger::CostSource;
use pricing::{Adjustments, Cost, CostLine, JobShape, PriceError};
use rust_decimal::Decimal;
use serde_json::Value;

use crate::AppState;
use crate::routing::Route;

/// The prompt's o200k text tokens: counted once per request, on a blocking thread (a long prompt is
/// milliseconds of CPU), and used by the worst case and every bill of the request.
pub fn count_prompt_tokens(job: &ImageJob) -> u64 {
    pricing::count_text_tokens(job.prompt())
}

/// The input a bill carries: the whole job's on its first bill, nothing on later ones.
#[derive(Debug, Clone, Copy)]
enum Input {
    Whole,
    AlreadyBilled,
}

/// The quality and size a result is priced at: what the provider reported, or the dearest quality
/// and OpenAI's default size where it said nothing.
fn billed_shape(resolved: &Resolved) -> (domain::Quality, Size) {
    (resolved.quality.unwrap_or(domain::Quality::High), resolved.size.unwrap_or(Size::new(1024, 1024)))
}

/// Prices a finished job. `images` is the number of images produced; `usage` what the provider reported;
/// `compute_ms` the device time it measured (the compute basis of local models); `text_tokens` the
/// prompt's count ([`count_prompt_tokens`]).
#[allow(clippy::too_many_arguments)]
pub fn bill(
    state: &AppState,
    route: &Route,
    job: &ImageJob,
    resolved: &Resolved,
    images: u64,
    usage: Option<Usage>,
    compute_ms: Option<u64>,
    text_tokens: u64,
) -> Result<Cost, PriceError> {
    let (quality, size) = billed_shape(resolved);
    price_job(state, route, job, quality, size, images, usage, compute_ms, text_tokens, Input::Whole)
}

/// The most a job can cost, before it runs: its own quality and size, or where it says `auto` the most
/// expensive the model prices; all `n` images and every partial image; the counted input with a
/// margin. Local models are billed by time, so their worst case is `compute_cap_ms` of compute.
pub fn worst_case(
    state: &AppState,
    route: &Route,
    job: &ImageJob,
    text_tokens: u64,
    compute_cap_ms: u64,
) -> Result<Cost, PriceError> {
    let model = &route.upstream_model;
    let price = state.prices.model(model).ok_or_else(|| PriceError(format!("model '{model}' has no price")))?;
    let options = job.options();
    let quality = options.quality.filter(|q| *q != domain::Quality::Auto);
    let size = match options.size {
        Some(domain::SizeChoice::Exact(s)) => Some(s),
        _ => None,
    };
    let (quality, size) = match price.billing_basis {
        pricing::BillingBasis::Tokens | pricing::BillingBasis::PerImage => pricing::worst_case(price, quality, size)
            .ok_or_else(|| PriceError(format!("model '{model}' has no price for this quality and size")))?,
        // Priced by time or flat: quality and size only shape the reported usage.
        _ => (quality.unwrap_or(domain::Quality::High), size.unwrap_or(Size::new(1024, 1024))),
    };
    let n = u64::from(options.n.max(1));
    let text_tokens = text_tokens_worst_case(text_tokens);
    price_job(state, route, job, quality, size, n, None, Some(compute_cap_ms), text_tokens, Input::Whole)
}

/// Text tokens a provider may count for a prompt of `counted` o200k tokens: providers add template
/// tokens imagegate cannot see, so the worst case allows a quarter more, and at least 16.
fn text_tokens_worst_case(counted: u64) -> u64 {
    counted.saturating_add((counted / 4).max(16))
}

/// A stream's bill, one completed image at a time: input billed with the first image only.
#[derive(Debug, Default)]
pub struct StreamBill {
    /// Input tokens of the provider's reports already billed (a provider may repeat the request's
    /// input in every event's usage; only what goes beyond the largest report so far is new).
    text_billed: u64,
    image_billed: u64,
    /// Whether the counted input (prompt and input images) was billed, when the provider reports none.
    counted_input_billed: bool,
}

impl StreamBill {
    /// The cost of the next completed image, which the provider reported with `usage` (its usage of
    /// that image, possibly repeating the request's input) and `compute_ms`.
    #[allow(clippy::too_many_arguments)]
    pub fn next(
        &mut self,
        state: &AppState,
        route: &Route,
        job: &ImageJob,
        resolved: &Resolved,
        usage: Option<Usage>,
        compute_ms: Option<u64>,
        text_tokens: u64,
    ) -> Result<Cost, PriceError> {
        let (quality, size) = billed_shape(resolved);
        let (usage, input) = match usage {
            Some(u) => {
                let text = u.input_text_tokens.saturating_sub(self.text_billed);
                let image = u.input_image_tokens.saturating_sub(self.image_billed);
                self.text_billed = self.text_billed.max(u.input_text_tokens);
                self.image_billed = self.image_billed.max(u.input_image_tokens);
                let input_tokens = text.saturating_add(image);
                let new = Usage {
                    input_tokens,
                    input_text_tokens: text,
                    input_image_tokens: image,
                    total_tokens: input_tokens.saturating_add(u.output_tokens),
                    ..u
                };
                (Some(new), Input::Whole)
            }
            None if self.counted_input_billed => (None, Input::AlreadyBilled),
            None => {
                self.counted_input_billed = true;
                (None, Input::Whole)
            }
        };
        price_job(state, route, job, quality, size, 1, usage, compute_ms, text_tokens, input)
    }
}

#[allow(clippy::too_many_arguments)]
fn price_job(
    state: &AppState,
    route: &Route,
    job: &ImageJob,
    quality: domain::Quality,
    size: Size,
    images: u64,
    usage: Option<Usage>,
    compute_ms: Option<u64>,
    text_tokens: u64,
    input: Input,
) -> Result<Cost, PriceError> {
    let model = &route.upstream_model;
    let price = state.prices.model(model).ok_or_else(|| PriceError(format!("model '{model}' has no price")))?;
    let options = job.options();
    let (input_images, high_fidelity) = match (job, input) {
        (ImageJob::Edit(e), Input::Whole) => {
            (e.images.iter().map(|i| i.size).collect(), e.input_fidelity == Some(domain::InputFidelity::High))
        }
        _ => (Vec::new(), false),
    };
    let text_tokens = match input {
        Input::Whole => text_tokens,
        Input::AlreadyBilled => 0,
    };
    let shape = JobShape {
        n: images,
        quality,
        size,
        partial_images: u64::from(options.partial_images),
        text_tokens,
        input_images,
        input_fidelity_high: high_fidelity,
    };
    let tier = route.tier.as_str();
    let tier_multiplier = state
        .prices
        .tier_multiplier(tier)
        .ok_or_else(|| PriceError(format!("the service tier '{tier}' has no price multiplier")))?;
    let adjustments = Adjustments {
        tier: tier.to_owned(),
        tier_multiplier,
        provider: route.provider.name().to_owned(),
        discount_percent: route.discount_percent,
    };
    pricing::cost(model, price, &shape, usage, compute_ms, &adjustments)
}

/// `cost` charged at most `limit` (what is left of the request's hold): above it, a line takes the
/// difference off, so the lines still sum to the total and the total is what is charged.
pub fn cap(mut cost: Cost, limit: Decimal) -> (Cost, CostSource) {
    if cost.total <= limit {
        return (cost, CostSource::Priced);
    }
    let amount = limit.max(Decimal::ZERO) - cost.total;
    tracing::warn!(priced = %cost.total, limit = %limit, "a request was priced above its held worst case; it is charged the hold");
    cost.lines.push(CostLine {
        item: "capped at the worst case held for this request".to_owned(),
        quantity: 1,
        unit_price: amount,
        amount,
    });
    cost.total += amount;
    (cost, CostSource::Capped)
}

/// A charge of `amount` out of the worst case `held`, because what ran could not be known or priced
/// (`why` says which): the whole hold for a request, an image's share of it for a stream's image.
pub fn worst_case_charge(held: &Cost, amount: Decimal, why: &str) -> Cost {
    let amount = amount.max(Decimal::ZERO);
    Cost {
        basis: held.basis,
        usage: None,
        usage_source: held.usage_source,
        lines: vec![CostLine { item: format!("worst case held: {why}"), quantity: 1, unit_price: amount, amount }],
        total: amount,
    }
}

/// The cost as the response's extension object.
pub fn cost_json(route: &Route, cost: &Cost) -> Value {
    api::cost_json(cost, route.provider.name(), &route.upstream_model, route.tier.as_str())
}

/// The costs of a stream's images as one: lines side by side, totals and usage added.
pub fn sum(costs: &[Cost]) -> Option<Cost> {
    let mut iter = costs.iter().cloned();
    let mut total = iter.next()?;
    for c in iter {
        total.total += c.total;
        total.lines.extend(c.lines);
        total.usage = match (total.usage, c.usage) {
            (Some(a), Some(b)) => Some(Usage {
                input_tokens: a.input_tokens + b.input_tokens,
                output_tokens: a.output_tokens + b.output_tokens,
                total_tokens: a.total_tokens + b.total_tokens,
                input_text_tokens: a.input_text_tokens + b.input_text_tokens,
                input_image_tokens: a.input_image_tokens + b.input_image_tokens,
                output_image_tokens: a.output_image_tokens.zip(b.output_image_tokens).map(|(x, y)| x + y),
                output_text_tokens: a.output_text_tokens.zip(b.output_text_tokens).map(|(x, y)| x + y),
            }),
            (a, b) => a.or(b),
        };
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(total: &str) -> Cost {
        let total: Decimal = total.parse().unwrap_or_default();
        Cost {
            basis: pricing::BillingBasis::Tokens,
            usage: None,
            usage_source: pricing::UsageSource::Provider,
            lines: vec![CostLine { item: "x".into(), quantity: 1, unit_price: total, amount: total }],
            total,
        }
    }

    #[test]
    fn a_capped_cost_is_the_limit_and_its_lines_still_add_up() {
        let (c, source) = cap(cost("50"), Decimal::new(2234, 6));
        assert_eq!((c.total, source), (Decimal::new(2234, 6), CostSource::Capped));
        assert_eq!(c.lines.iter().map(|l| l.amount).sum::<Decimal>(), c.total);
        let (c, source) = cap(cost("0.001"), Decimal::new(2234, 6));
        assert_eq!((c.total, source), (Decimal::new(1, 3), CostSource::Priced));
        assert_eq!(c.lines.len(), 1);
    }
}
