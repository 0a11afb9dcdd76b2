//! Pricing: what every image costs, before and after. Pure functions over data, no I/O.
//!
//! [`Catalog`] holds the prices (shipped in `catalog.toml`, overridable from the config);
//! [`cost`] prices a finished job from its usage, itemized; [`estimate`] prices planned jobs with the
//! same math; [`limits`] bounds the plans an estimate takes. Money is [`rust_decimal::Decimal`] end to
//! end, never a float, and no count or amount ever wraps: arithmetic is checked.

mod catalog;
mod cost;
mod estimate;
pub mod limits;

pub use catalog::{
    BUILTIN_CATALOG, BillingBasis, Catalog, CatalogError, Lifecycle, LocalPrices, ModelPrice, OutputTokenFormula,
    Price, TokenPrices, formula_tokens,
};
pub use cost::{
    Adjustments, Cost, CostLine, HIGH_FIDELITY_OTHER_TOKENS, HIGH_FIDELITY_SQUARE_TOKENS, JobShape,
    PARTIAL_IMAGE_TOKENS, PriceError, UsageSource, compute_cost, cost, count_text_tokens, count_usage,
    image_input_tokens, reference_output_tokens, tokens_for_words, warm_up_token_counter,
};
pub use estimate::{Estimate, PerImageView, PlannedRequest, estimate, worst_case};
pub use rust_decimal::Decimal;

/// A USD amount for people: exact, with at least two decimals (`1.10`, `0.8448`).
pub fn format_usd(amount: Decimal) -> String {
    let mut d = amount.normalize();
    if d.scale() < 2 {
        d.rescale(2);
    }
    d.to_string()
}
