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
        None => pricing::count_text_tokens(job.prompt()),
        Some(_) => 0,
    };
    let shape = JobShape {
        n: images,
        quality: resolved.quality.unwrap_or(domain::Quality::High),
        size: resolved.size.unwrap_or(Size::new(1024, 1024)),
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
