//! The one place a served request's cost is computed: the job, its resolved settings and its usage
//! (the provider's, or counted when it reports none) priced by the catalog, with the provider's discount.
//!
//! Service tiers other than `default` are priced in estimates; served requests run on the default tier
//! until flex scheduling exists, and say so in their cost (`service_tier: "default"`).

use domain::{ImageJob, Resolved, Size, Usage};
use pricing::{Adjustments, Cost, JobShape, PriceError};
use serde_json::Value;

use crate::AppState;
use crate::routing::Route;

/// The tier served requests run on today.
pub const SERVED_TIER: &str = "default";

/// Prices a finished job. `images` is the number of images produced; `usage` what the provider reported;
/// `compute_ms` the device time it measured (the compute basis of local models).
pub fn bill(
    state: &AppState,
    route: &Route,
    job: &ImageJob,
    resolved: &Resolved,
    images: u64,
    usage: Option<Usage>,
    compute_ms: Option<u64>,
) -> Result<Cost, PriceError> {
    let quality = resolved.quality.unwrap_or(domain::Quality::High);
    let size = resolved.size.unwrap_or(Size::new(1024, 1024));
    price_job(state, route, job, quality, size, images, usage, compute_ms, false)
}

/// The most a job can cost, before it runs: its own quality and size, or where it says `auto` the most
/// expensive the model prices; all `n` images and every partial image; counted input. Local models are
/// billed by time, so their worst case is `compute_cap_ms` of compute (the reservation's lifetime: a job
/// still running then has its hold released anyway).
pub fn worst_case(state: &AppState, route: &Route, job: &ImageJob, compute_cap_ms: u64) -> Result<Cost, PriceError> {
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
    price_job(state, route, job, quality, size, n, None, Some(compute_cap_ms), true)
}

/// Text tokens a provider may count for a prompt of `counted` o200k tokens: providers add template
/// tokens imagegate cannot see, so the worst case allows a quarter more, and at least 16.
fn text_tokens_worst_case(counted: u64) -> u64 {
    counted + (counted / 4).max(16)
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
    worst: bool,
) -> Result<Cost, PriceError> {
    let model = &route.upstream_model;
    let price = state.prices.model(model).ok_or_else(|| PriceError(format!("model '{model}' has no price")))?;
    let options = job.options();
    let (input_images, high_fidelity) = match job {
        ImageJob::Generate(_) => (Vec::new(), false),
        ImageJob::Edit(e) => {
            (e.images.iter().map(|i| i.size).collect(), e.input_fidelity == Some(domain::InputFidelity::High))
        }
    };
    // Counting text tokens only matters when the provider reported no usage for a token-billed model.
    let text_tokens = match usage {
        None if worst => text_tokens_worst_case(pricing::count_text_tokens(job.prompt())),
        None => pricing::count_text_tokens(job.prompt()),
        Some(_) => 0,
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
    let adjustments = Adjustments {
        tier: SERVED_TIER.to_owned(),
        tier_multiplier: state.prices.tier_multiplier(SERVED_TIER).unwrap_or(pricing::Decimal::ONE),
        provider: route.provider.name().to_owned(),
        discount_percent: route.discount_percent,
    };
    pricing::cost(model, price, &shape, usage, compute_ms, &adjustments)
}

/// The cost as the response's extension object, or `None` (logged) when it could not be priced.
pub fn cost_extension(route: &Route, cost: Result<Cost, PriceError>) -> Option<(Cost, Value)> {
    match cost {
        Ok(c) => {
            let json = api::cost_json(&c, route.provider.name(), &route.upstream_model, SERVED_TIER);
            Some((c, json))
        }
        Err(e) => {
            tracing::error!(model = %route.upstream_model, error = %e, "could not price a served request");
            None
        }
    }
}

/// The costs of a stream's images as one: lines side by side, totals and usage added.
pub fn sum(costs: Vec<Cost>) -> Option<Cost> {
    let mut iter = costs.into_iter();
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
