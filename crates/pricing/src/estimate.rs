//! Estimates before spending: the same math as the bill, on counted usage, plus the published per-image
//! view of token-billed models and an explanation of the common double count.
//!
//! A plan of `requests` identical requests is priced as one job with every count multiplied, so that
//! its total is exactly `requests` x one request's price. Each multiplication is checked (see `cost`):
//! the limits in [`crate::limits`] keep real plans far from overflow, and bigger numbers are a
//! [`PriceError`], never a wrapped count.

use domain::{Quality, Size, Usage};
use rust_decimal::Decimal;

use crate::catalog::{BillingBasis, ModelPrice};
use crate::cost::{
    Adjustments, Cost, JobShape, PriceError, UsageSource, cost, count_usage, money_div, money_mul, money_sum,
    tokens_mul,
};

/// A set of identical requests someone plans to make.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRequest {
    /// Quality and size resolved (never auto).
    pub quality: Quality,
    pub size: Size,
    /// Images per request.
    pub n: u64,
    /// How many such requests.
    pub requests: u64,
    /// Text tokens of one request's prompt.
    pub prompt_tokens: u64,
    pub input_images: Vec<Size>,
    pub input_fidelity_high: bool,
    pub partial_images: u64,
}

impl PlannedRequest {
    /// Images in all the requests.
    pub fn images(&self) -> Result<u64, PriceError> {
        tokens_mul(self.n, self.requests, "number of images")
    }
}

/// The per-image table's view of a token-billed model, for comparison with published summaries.
#[derive(Debug, Clone, PartialEq)]
pub struct PerImageView {
    /// Images x the published per-image price.
    pub per_image_total: Decimal,
    pub unit_price: Decimal,
    /// Text and image input tokens at their prices.
    pub input_tokens_cost: Decimal,
    /// Image output tokens at their price.
    pub output_tokens_cost: Decimal,
    /// Per-image fee + input + output: what a naive sum gives. It counts every image twice.
    pub naive_sum: Decimal,
    /// Per-image fee + input tokens: the per-image view done right.
    pub per_image_plus_input: Decimal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub cost: Cost,
    pub per_image_view: Option<PerImageView>,
}

/// Prices a planned set of requests on one model with the given adjustments.
pub fn estimate(
    model: &str,
    price: &ModelPrice,
    plan: &PlannedRequest,
    adjustments: &Adjustments,
) -> Result<Estimate, PriceError> {
    let one = JobShape {
        n: plan.n,
        quality: plan.quality,
        size: plan.size,
        partial_images: plan.partial_images,
        text_tokens: plan.prompt_tokens,
        input_images: plan.input_images.clone(),
        input_fidelity_high: plan.input_fidelity_high,
    };
    let usage = count_usage(price, &one)?.map(|u| scaled(u, plan.requests)).transpose()?;
    let text_tokens = tokens_mul(plan.prompt_tokens, plan.requests, "prompt token count")?;
    let all = JobShape { n: plan.images()?, text_tokens, ..one };
    if price.billing_basis == BillingBasis::Tokens && usage.is_none() {
        return Err(PriceError(format!(
            "model '{model}' has no output token count for quality '{}' at {}",
            plan.quality, plan.size
        )));
    }
    let mut c = cost(model, price, &all, usage, None, adjustments)?;
    c.usage_source = UsageSource::Counted;
    let per_image_view =
        match (price.billing_basis, &price.tokens, usage, price.per_image_price(plan.quality, plan.size)) {
            (BillingBasis::Tokens, Some(tokens), Some(u), Some(unit)) => {
                let million = Decimal::from(1_000_000u64);
                let text = money_mul(Decimal::from(u.input_text_tokens), tokens.text_input.0)?;
                let image = money_mul(Decimal::from(u.input_image_tokens), tokens.image_input.0)?;
                let input = money_div(money_sum([text, image])?, million)?;
                let output = money_div(money_mul(Decimal::from(u.output_tokens), tokens.image_output.0)?, million)?;
                let per_image_total = money_mul(unit, Decimal::from(plan.images()?))?;
                Some(PerImageView {
                    per_image_total,
                    unit_price: unit,
                    input_tokens_cost: input,
                    output_tokens_cost: output,
                    naive_sum: money_sum([per_image_total, input, output])?,
                    per_image_plus_input: money_sum([per_image_total, input])?,
                })
            }
            _ => None,
        };
    Ok(Estimate { cost: c, per_image_view })
}

/// One request's usage times `k` requests.
fn scaled(u: Usage, k: u64) -> Result<Usage, PriceError> {
    let times = |t: u64| tokens_mul(t, k, "token count");
    Ok(Usage {
        input_tokens: times(u.input_tokens)?,
        output_tokens: times(u.output_tokens)?,
        total_tokens: times(u.total_tokens)?,
        input_text_tokens: times(u.input_text_tokens)?,
        input_image_tokens: times(u.input_image_tokens)?,
        output_image_tokens: u.output_image_tokens.map(times).transpose()?,
        output_text_tokens: u.output_text_tokens.map(times).transpose()?,
    })
}

/// The quality and size a request that says `auto` is estimated at: the most expensive the model
/// prices, so that an estimate never understates.
pub fn worst_case(price: &ModelPrice, quality: Option<Quality>, size: Option<Size>) -> Option<(Quality, Size)> {
    let mut best: Option<(Quality, Size, Decimal)> = None;
    let table: Vec<(String, String, Decimal)> = match price.billing_basis {
        BillingBasis::Tokens => {
            let mut table: Vec<(String, String, Decimal)> = price
                .output_tokens
                .iter()
                .flat_map(|(q, sizes)| sizes.iter().map(move |(s, t)| (q.clone(), s.clone(), Decimal::from(*t))))
                .collect();
            // A model that takes any size: the asked size, or for `auto` the largest it takes.
            if let Some(formula) = &price.output_token_formula
                && let Some(at) = size.or_else(|| formula.largest_size())
            {
                for (q, tiles) in &formula.tiles {
                    let tokens = crate::catalog::formula_tokens(*tiles, at);
                    table.push((q.clone(), at.to_string(), Decimal::from(tokens)));
                }
            }
            table
        }
        _ => price
            .per_image
            .iter()
            .flat_map(|(q, sizes)| sizes.iter().map(move |(s, p)| (q.clone(), s.clone(), p.0)))
            .collect(),
    };
    for (q, s, value) in table {
        let (Ok(q), Ok(s)) = (q.parse::<Quality>(), s.parse::<Size>()) else {
            continue;
        };
        if quality.is_some_and(|want| want != q) || size.is_some_and(|want| want != s) {
            continue;
        }
        if best.as_ref().is_none_or(|(_, _, v)| value > *v) {
            best = Some((q, s, value));
        }
    }
    best.map(|(q, s, _)| (q, s))
}
