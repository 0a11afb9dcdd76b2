//! Cost math: a job's usage (reported by the provider, or counted here) priced by the catalog, with the
//! tier and provider adjustments, as an itemized breakdown whose lines sum exactly to the total.
//!
//! Rounding: none. Prices are decimals, token counts integers, multipliers decimals, and the only
//! division (per 1M tokens, per 100 percent) is exact in decimal. The one exception is compute time,
//! whose cost (price per hour x milliseconds / 3,600,000) is rounded once, half away from zero, to the
//! nano-dollar where it is computed.
//!
//! Overflow: none, silently. Every product and sum of token counts and amounts is checked, and one that
//! does not fit (`u64` tokens, `Decimal`'s 28 digits) is a [`PriceError`], never a wrapped or saturated
//! number: a bill or an estimate is exact or it is refused. The estimate's input limits
//! ([`crate::limits`]) keep real plans far from either edge.

use std::sync::OnceLock;

use domain::{Quality, Size, Usage};
use rust_decimal::{Decimal, RoundingStrategy};
use tiktoken_rs::CoreBPE;

use crate::catalog::{BillingBasis, ModelPrice};

/// Extra image output tokens for every partial image streamed.
pub const PARTIAL_IMAGE_TOKENS: u64 = 100;
/// Image input tokens: a base per image plus this many per 512 px tile.
pub const IMAGE_BASE_TOKENS: u64 = 65;
pub const IMAGE_TILE_TOKENS: u64 = 129;
/// The `input_fidelity=high` surcharge per input image, square and otherwise.
pub const HIGH_FIDELITY_SQUARE_TOKENS: u64 = 4160;
pub const HIGH_FIDELITY_OTHER_TOKENS: u64 = 6240;

/// What a job asks for, in the terms prices are written in. Quality and size are resolved (never auto).
#[derive(Debug, Clone, PartialEq)]
pub struct JobShape {
    /// Images produced.
    pub n: u64,
    pub quality: Quality,
    pub size: Size,
    /// Partial images streamed per image.
    pub partial_images: u64,
    /// Text tokens of the prompt.
    pub text_tokens: u64,
    /// Sizes of the edit's input images.
    pub input_images: Vec<Size>,
    pub input_fidelity_high: bool,
}

/// The tier and provider a job ran on, and what they change.
#[derive(Debug, Clone, PartialEq)]
pub struct Adjustments {
    pub tier: String,
    pub tier_multiplier: Decimal,
    pub provider: String,
    /// Percent off the list price; negative for a markup.
    pub discount_percent: Decimal,
}

impl Adjustments {
    /// The list price: default tier, no discount.
    pub fn none(provider: &str) -> Adjustments {
        Adjustments {
            tier: "default".to_owned(),
            tier_multiplier: Decimal::ONE,
            provider: provider.to_owned(),
            discount_percent: Decimal::ZERO,
        }
    }
}

/// Where the token counts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The provider's `usage`: the billing truth.
    Provider,
    /// Counted by imagegate (o200k text tokens, the tile rule, the output token table).
    Counted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Counted => "counted",
        }
    }
}

/// One line of a bill. `amount` = `quantity` x `unit_price` for priced lines; adjustments have
/// quantity 1 and their amount as unit price.
#[derive(Debug, Clone, PartialEq)]
pub struct CostLine {
    pub item: String,
    pub quantity: u64,
    pub unit_price: Decimal,
    pub amount: Decimal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cost {
    pub basis: BillingBasis,
    /// The tokens priced (token basis), or counted for information (other bases).
    pub usage: Option<Usage>,
    pub usage_source: UsageSource,
    pub lines: Vec<CostLine>,
    pub total: Decimal,
}

impl Cost {
    /// The total as a plain decimal string, e.g. `0.008528`.
    pub fn total_string(&self) -> String {
        self.total.normalize().to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PriceError(pub String);

impl PriceError {
    /// A count or amount too large to compute exactly.
    pub(crate) fn overflow(what: &str) -> PriceError {
        PriceError(format!("The {what} is too large to compute exactly: ask for fewer requests or images."))
    }
}

/// `a x b` tokens, or the overflow error naming `what`.
pub(crate) fn tokens_mul(a: u64, b: u64, what: &str) -> Result<u64, PriceError> {
    a.checked_mul(b).ok_or_else(|| PriceError::overflow(what))
}

/// `a + b` tokens, or the overflow error naming `what`.
pub(crate) fn tokens_add(a: u64, b: u64, what: &str) -> Result<u64, PriceError> {
    a.checked_add(b).ok_or_else(|| PriceError::overflow(what))
}

/// `a x b` in dollars; `Decimal`'s own operators panic where this returns the overflow error.
pub(crate) fn money_mul(a: Decimal, b: Decimal) -> Result<Decimal, PriceError> {
    a.checked_mul(b).ok_or_else(|| PriceError::overflow("cost"))
}

/// `a / b` in dollars (`b` a nonzero constant: 100, a million, an hour in ms).
pub(crate) fn money_div(a: Decimal, b: Decimal) -> Result<Decimal, PriceError> {
    a.checked_div(b).ok_or_else(|| PriceError::overflow("cost"))
}

/// The sum of amounts in dollars.
pub(crate) fn money_sum(amounts: impl IntoIterator<Item = Decimal>) -> Result<Decimal, PriceError> {
    amounts.into_iter().try_fold(Decimal::ZERO, |sum, a| sum.checked_add(a)).ok_or_else(|| PriceError::overflow("cost"))
}

const PER_MILLION: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

/// Prices a job. `reported` is the provider's usage (used as is for the token basis); without it the
/// usage is counted from `job`. `compute_ms` is the measured time, for the compute basis.
pub fn cost(
    model: &str,
    price: &ModelPrice,
    job: &JobShape,
    reported: Option<Usage>,
    compute_ms: Option<u64>,
    adjustments: &Adjustments,
) -> Result<Cost, PriceError> {
    let (usage, usage_source) = match reported {
        Some(u) => (Some(u), UsageSource::Provider),
        None => (count_usage(price, job)?, UsageSource::Counted),
    };
    let mut lines = Vec::new();
    match price.billing_basis {
        BillingBasis::Tokens => {
            let tokens =
                price.tokens.as_ref().ok_or_else(|| PriceError(format!("model '{model}' has no token prices")))?;
            let u = usage.ok_or_else(|| {
                PriceError(format!("model '{model}' has no output token count for {} {}", job.quality, job.size))
            })?;
            let priced = [
                ("text input tokens", u.input_text_tokens, tokens.text_input.0),
                ("image input tokens", u.input_image_tokens, tokens.image_input.0),
                ("image output tokens", u.output_tokens, tokens.image_output.0),
            ];
            for (item, quantity, per_million) in priced {
                if quantity > 0 {
                    lines.push(line(item, quantity, money_div(per_million, PER_MILLION)?)?);
                }
            }
        }
        BillingBasis::PerImage => {
            let unit = price.per_image_price(job.quality, job.size).ok_or_else(|| {
                PriceError(format!(
                    "model '{model}' has no per-image price for quality '{}' at {}",
                    job.quality, job.size
                ))
            })?;
            lines.push(line(&format!("images, {} {}", job.quality, job.size), job.n, unit)?);
        }
        BillingBasis::Flat => {
            let unit = price.flat_per_image.map(|p| p.0).unwrap_or_default();
            lines.push(line("images (flat price)", job.n, unit)?);
        }
        BillingBasis::Compute => {
            let per_hour = price.usd_per_hour.map(|p| p.0).unwrap_or_default();
            let ms = compute_ms.unwrap_or(0);
            let amount = compute_cost(per_hour, ms)?;
            lines.push(CostLine { item: format!("compute time, {ms} ms"), quantity: 1, unit_price: amount, amount });
        }
    }
    let list_price = money_sum(lines.iter().map(|l| l.amount))?;
    if adjustments.tier_multiplier != Decimal::ONE {
        let change =
            adjustments.tier_multiplier.checked_sub(Decimal::ONE).ok_or_else(|| PriceError::overflow("cost"))?;
        let amount = money_mul(list_price, change)?;
        lines.push(adjustment(
            &format!("service tier '{}' (x{})", adjustments.tier, adjustments.tier_multiplier.normalize()),
            amount,
        ));
    }
    if !adjustments.discount_percent.is_zero() {
        let after_tier = money_sum(lines.iter().map(|l| l.amount))?;
        let amount = -money_div(money_mul(after_tier, adjustments.discount_percent)?, Decimal::ONE_HUNDRED)?;
        let what = if adjustments.discount_percent.is_sign_positive() {
            format!("{}% off", adjustments.discount_percent.normalize())
        } else {
            format!("{}% markup", (-adjustments.discount_percent).normalize())
        };
        lines.push(adjustment(&format!("provider '{}' ({what})", adjustments.provider), amount));
    }
    let total = money_sum(lines.iter().map(|l| l.amount))?;
    Ok(Cost { basis: price.billing_basis, usage, usage_source, lines, total })
}

fn line(item: &str, quantity: u64, unit_price: Decimal) -> Result<CostLine, PriceError> {
    let amount = money_mul(unit_price, Decimal::from(quantity))?;
    Ok(CostLine { item: item.to_owned(), quantity, unit_price, amount })
}

fn adjustment(item: &str, amount: Decimal) -> CostLine {
    CostLine { item: item.to_owned(), quantity: 1, unit_price: amount, amount }
}

/// USD for `ms` milliseconds at `usd_per_hour`, rounded once to the nano-dollar.
pub fn compute_cost(usd_per_hour: Decimal, ms: u64) -> Result<Decimal, PriceError> {
    let exact = money_div(money_mul(usd_per_hour, Decimal::from(ms))?, Decimal::from(3_600_000u64))?;
    Ok(exact.round_dp_with_strategy(9, RoundingStrategy::MidpointAwayFromZero))
}

/// The usage imagegate counts for a job when the provider reports none, or `None` when the model has no
/// output token count for the job's quality and size.
pub fn count_usage(price: &ModelPrice, job: &JobShape) -> Result<Option<Usage>, PriceError> {
    let per_image = match price.billing_basis {
        // Models billed by time or per image report usage on the GPT image scale, for comparison.
        BillingBasis::Compute | BillingBasis::Flat => price
            .output_tokens_per_image(job.quality, job.size)
            .or_else(|| reference_output_tokens(job.quality, job.size)),
        _ => price.output_tokens_per_image(job.quality, job.size),
    };
    let Some(per_image) = per_image else {
        return Ok(None);
    };
    let what = "image output token count";
    let partial = tokens_mul(PARTIAL_IMAGE_TOKENS, job.partial_images, what)?;
    let output = tokens_mul(job.n, tokens_add(per_image, partial, what)?, what)?;
    let image_in = job.input_images.iter().try_fold(0u64, |sum, s| {
        tokens_add(sum, image_input_tokens(*s, job.input_fidelity_high), "image input token count")
    })?;
    let input = tokens_add(job.text_tokens, image_in, "input token count")?;
    let total = tokens_add(input, output, "total token count")?;
    Ok(Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: total,
        input_text_tokens: job.text_tokens,
        input_image_tokens: image_in,
        output_image_tokens: None,
        output_text_tokens: None,
    }))
}

/// Output tokens of one image on the GPT image scale (272, 1056 and 4160 at 1024x1024 for low, medium
/// and high, proportional to the area as OpenAI's table is), rounded up. For models that bill by time or
/// per image, whose usage is reported on this scale so that it compares with OpenAI's.
pub fn reference_output_tokens(quality: Quality, size: Size) -> Option<u64> {
    let square = match quality {
        Quality::Low => 272u128,
        Quality::Medium | Quality::Standard | Quality::Auto => 1056,
        Quality::High | Quality::Hd => 4160,
    };
    // In u128 the product cannot overflow (4160 x (2^32)^2 < 2^77), and the result, at most
    // 4160 x 2^44, fits a u64 for every size a `Size` can hold.
    let area = u128::from(size.width) * u128::from(size.height);
    u64::try_from((square * area).div_ceil(1024 * 1024)).ok()
}

/// Image input tokens of one input image: fit inside 2048x2048, scale down so the shortest side is at
/// most 512 px, then 65 + 129 per 512 px tile; plus the surcharge for `input_fidelity=high`. Images are
/// only ever scaled down, never up.
///
/// No arithmetic here can overflow: sides are `u32`, so `w * 2048` is below 2^43, and after the fit every
/// side is at most 2048 (at most 4 tiles).
pub fn image_input_tokens(size: Size, high_fidelity: bool) -> u64 {
    let (mut w, mut h) = (u64::from(size.width), u64::from(size.height));
    let longest = w.max(h);
    if longest > 2048 {
        w = w * 2048 / longest;
        h = h * 2048 / longest;
    }
    let shortest = w.min(h).max(1);
    if shortest > 512 {
        w = w * 512 / shortest;
        h = h * 512 / shortest;
    }
    let tiles = w.div_ceil(512).max(1) * h.div_ceil(512).max(1);
    let surcharge = match (high_fidelity, size.width == size.height) {
        (false, _) => 0,
        (true, true) => HIGH_FIDELITY_SQUARE_TOKENS,
        (true, false) => HIGH_FIDELITY_OTHER_TOKENS,
    };
    IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles + surcharge
}

/// The o200k_base encoder, built on first use.
static ENCODER: OnceLock<Option<CoreBPE>> = OnceLock::new();

fn encoder() -> &'static Option<CoreBPE> {
    ENCODER.get_or_init(|| tiktoken_rs::o200k_base().ok())
}

/// Builds the o200k_base encoder on a background thread and returns at once, so that the first
/// request's token count does not wait for it: building its 200k-entry tables and regex takes about
/// 0.1 s of CPU (on the development VM, 115 ms between a local generation's end and its response). A
/// count that comes first waits for the one build (`OnceLock`); nothing is built twice.
pub fn warm_up_token_counter() {
    if ENCODER.get().is_none() {
        // Without a thread the first count builds it, as before.
        let _ = std::thread::Builder::new().name("o200k-warm-up".into()).spawn(|| {
            encoder();
        });
    }
}

/// Text tokens of a prompt in the o200k_base encoding (GPT-4o's, used by the GPT image models).
pub fn count_text_tokens(text: &str) -> u64 {
    match encoder() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        // The encoding ships inside the crate, so this only guards against a broken build: about four
        // characters a token, OpenAI's rule of thumb.
        None => (text.chars().count() as u64).div_ceil(4),
    }
}

/// Text tokens for a prompt known only by its word count: 4 tokens per 3 words, rounded up (the
/// published worked example counts 30 words as 40 tokens). Computed as `words + ceil(words / 3)`, equal
/// to `ceil(4 x words / 3)`, so that no intermediate product can overflow; the sum is checked.
pub fn tokens_for_words(words: u64) -> Result<u64, PriceError> {
    tokens_add(words, words.div_ceil(3), "prompt token count")
}
