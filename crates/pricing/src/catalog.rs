//! The price catalog: per-model prices as data (`catalog.toml`, shipped in the crate), with entries
//! from the config file laid over it. Every price is an exact decimal read from a string.

use std::collections::BTreeMap;
use std::fmt;

use chrono::NaiveDate;
use domain::{Quality, Size};
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};

/// The catalog shipped with imagegate.
pub const BUILTIN_CATALOG: &str = include_str!("../catalog.toml");

/// An exact USD amount, deserialized only from a decimal string (`"0.011"`), never through a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Price(pub Decimal);

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Price, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Integer(i64),
            Float(f64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) => t
                .trim()
                .parse::<Decimal>()
                .map(Price)
                .map_err(|_| serde::de::Error::custom(format!("'{t}' is not a decimal number"))),
            Raw::Integer(i) => Ok(Price(Decimal::from(i))),
            Raw::Float(f) => {
                Err(serde::de::Error::custom(format!("write prices as strings (\"{f}\"), so that they stay exact")))
            }
        }
    }
}

/// Which numbers a bill is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingBasis {
    /// Usage tokens at the per-token prices (GPT image models: OpenAI bills from `usage`).
    Tokens,
    /// The per-image table by quality and size (DALL-E).
    PerImage,
    /// Measured compute time at a price per hour (local models).
    Compute,
    /// A flat price per image (local models).
    Flat,
}

impl BillingBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingBasis::Tokens => "tokens",
            BillingBasis::PerImage => "per_image",
            BillingBasis::Compute => "compute",
            BillingBasis::Flat => "flat",
        }
    }
}

/// USD per 1M tokens.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrices {
    pub text_input: Price,
    pub cached_text_input: Option<Price>,
    pub image_input: Price,
    pub cached_image_input: Option<Price>,
    pub image_output: Price,
}

/// One model's prices.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub billing_basis: BillingBasis,
    /// When these prices were read, and where.
    pub as_of: Option<String>,
    pub source: Option<String>,
    pub tokens: Option<TokenPrices>,
    /// quality -> size -> USD per image.
    #[serde(default)]
    pub per_image: BTreeMap<String, BTreeMap<String, Price>>,
    /// quality -> size -> image output tokens per image.
    #[serde(default)]
    pub output_tokens: BTreeMap<String, BTreeMap<String, u64>>,
    /// Output tokens for any size, where the model takes any size (gpt-image-2); the table above,
    /// where it has the size, comes first.
    pub output_token_formula: Option<OutputTokenFormula>,
    /// `compute` basis: USD per hour of the device that ran the job.
    pub usd_per_hour: Option<Price>,
    /// `flat` basis: USD per image.
    pub flat_per_image: Option<Price>,
}

impl ModelPrice {
    pub fn per_image_price(&self, quality: Quality, size: Size) -> Option<Decimal> {
        self.per_image.get(quality.as_str())?.get(&size.to_string()).map(|p| p.0)
    }

    pub fn output_tokens_per_image(&self, quality: Quality, size: Size) -> Option<u64> {
        let listed = self.output_tokens.get(quality.as_str()).and_then(|sizes| sizes.get(&size.to_string()).copied());
        listed.or_else(|| self.output_token_formula.as_ref()?.tokens(quality, size))
    }

    /// Whether this model has a price for images of this quality and size.
    pub fn prices(&self, quality: Quality, size: Size) -> bool {
        match self.billing_basis {
            BillingBasis::Tokens => self.output_tokens_per_image(quality, size).is_some(),
            BillingBasis::PerImage => self.per_image_price(quality, size).is_some(),
            BillingBasis::Compute | BillingBasis::Flat => true,
        }
    }

    /// Checks that the entry has what its basis needs; `key` names it in errors.
    fn check(&self, key: &str) -> Result<(), CatalogError> {
        let missing = |what: &str| {
            Err(CatalogError(format!("{key}: billing_basis = \"{}\" needs {what}", self.billing_basis.as_str())))
        };
        match self.billing_basis {
            BillingBasis::Tokens if self.tokens.is_none() => missing("a [tokens] table"),
            BillingBasis::Tokens if self.output_tokens.is_empty() && self.output_token_formula.is_none() => {
                missing("an [output_tokens] table or an [output_token_formula]")
            }
            BillingBasis::PerImage if self.per_image.is_empty() => missing("a [per_image] table"),
            BillingBasis::Compute if self.usd_per_hour.is_none() => missing("usd_per_hour"),
            BillingBasis::Flat if self.flat_per_image.is_none() => missing("flat_per_image"),
            _ => {
                for (quality, sizes) in &self.per_image {
                    check_keys(key, "per_image", quality, sizes.keys())?;
                }
                for (quality, sizes) in &self.output_tokens {
                    check_keys(key, "output_tokens", quality, sizes.keys())?;
                }
                if let Some(f) = &self.output_token_formula {
                    f.check(key)?;
                }
                let negative = self.per_image.values().flat_map(|s| s.values()).any(|p| p.0.is_sign_negative());
                if negative {
                    return Err(CatalogError(format!("{key}.per_image: prices cannot be negative")));
                }
                Ok(())
            }
        }
    }
}

/// Output tokens per image for any size, as OpenAI's calculator for gpt-image-2 counts them: with `t`
/// tiles along the image's long side (by quality), `t x round(t x short / long)` tiles in all, each
/// worth `(2,000,000 + width x height) / 4,000,000` tokens, the total rounded up. (The half rounds down:
/// `floor((2 t short + long) / (2 long))`.)
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputTokenFormula {
    /// quality -> tiles along the long side.
    pub tiles: BTreeMap<String, u64>,
    /// The size, among those the model takes, that the formula gives the most tokens: what an `auto`
    /// size is held and estimated at.
    pub largest_size: String,
    pub source: Option<String>,
}

impl OutputTokenFormula {
    pub fn tokens(&self, quality: Quality, size: Size) -> Option<u64> {
        let tiles = *self.tiles.get(quality.as_str())?;
        Some(formula_tokens(tiles, size))
    }

    pub fn largest_size(&self) -> Option<Size> {
        self.largest_size.parse().ok()
    }

    fn check(&self, key: &str) -> Result<(), CatalogError> {
        for quality in self.tiles.keys() {
            if quality.parse::<Quality>().is_err() {
                return Err(CatalogError(format!("{key}.output_token_formula.tiles: '{quality}' is not a quality")));
            }
        }
        if self.tiles.values().any(|t| *t == 0 || *t > 1024) {
            return Err(CatalogError(format!("{key}.output_token_formula.tiles: each count is 1 to 1024")));
        }
        if self.largest_size().is_none() {
            return Err(CatalogError(format!(
                "{key}.output_token_formula.largest_size: '{}' is not a WIDTHxHEIGHT size",
                self.largest_size
            )));
        }
        Ok(())
    }
}

/// The formula of [`OutputTokenFormula`] for `tiles` along the long side. In u128 nothing overflows:
/// tiles are at most 1024 and sides below 2^32.
pub fn formula_tokens(tiles: u64, size: Size) -> u64 {
    let (w, h) = (u128::from(size.width), u128::from(size.height));
    let (long, short) = (w.max(h).max(1), w.min(h));
    let t = u128::from(tiles);
    let across = (2 * t * short + long) / (2 * long);
    let tokens = (t * across * (2_000_000 + w * h)).div_ceil(4_000_000);
    u64::try_from(tokens).unwrap_or(u64::MAX)
}

fn check_keys<'a>(
    key: &str,
    table: &str,
    quality: &str,
    sizes: impl Iterator<Item = &'a String>,
) -> Result<(), CatalogError> {
    if quality.parse::<Quality>().is_err() {
        return Err(CatalogError(format!("{key}.{table}: '{quality}' is not a quality")));
    }
    for s in sizes {
        if s.parse::<Size>().is_err() {
            return Err(CatalogError(format!("{key}.{table}.{quality}: '{s}' is not a WIDTHxHEIGHT size")));
        }
    }
    Ok(())
}

/// Prices of local compute, for local models without an entry of their own.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPrices {
    pub cpu_usd_per_hour: Price,
    pub gpu_usd_per_hour: Price,
}

/// A model's lifecycle at its provider: when it stops being served, and what the provider names to
/// use instead, with where that was read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// The day the provider stops serving the model; `None` while none is announced.
    #[serde(default, deserialize_with = "date")]
    pub shutdown_date: Option<NaiveDate>,
    /// The day the shutdown was announced.
    #[serde(default, deserialize_with = "date")]
    pub notice_date: Option<NaiveDate>,
    /// The models the provider recommends instead, in its order.
    #[serde(default)]
    pub replacements: Vec<String>,
    pub source: String,
}

impl Lifecycle {
    /// Whether the model is no longer served on `today`.
    pub fn is_shut_down(&self, today: NaiveDate) -> bool {
        self.shutdown_date.is_some_and(|d| d <= today)
    }
}

/// A `YYYY-MM-DD` date.
fn date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NaiveDate>, D::Error> {
    let text = String::deserialize(d)?;
    NaiveDate::parse_from_str(&text, "%Y-%m-%d")
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("'{text}' is not a YYYY-MM-DD date")))
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    tiers: BTreeMap<String, Price>,
    models: BTreeMap<String, ModelPrice>,
    #[serde(default)]
    lifecycle: BTreeMap<String, Lifecycle>,
    local: LocalPrices,
}

/// Every known price.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    /// Multiplier by service tier name (`default`, `flex`, `batch`).
    pub tiers: BTreeMap<String, Decimal>,
    pub models: BTreeMap<String, ModelPrice>,
    /// Upstream models' shutdown dates and replacements, by model name.
    pub lifecycle: BTreeMap<String, Lifecycle>,
    pub local: LocalPrices,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CatalogError(pub String);

impl Catalog {
    /// The shipped catalog.
    pub fn builtin() -> Result<Catalog, CatalogError> {
        Catalog::from_toml(BUILTIN_CATALOG).map_err(|e| CatalogError(format!("built-in catalog: {e}")))
    }

    pub fn from_toml(text: &str) -> Result<Catalog, CatalogError> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| CatalogError(e.to_string()))?;
        let catalog = Catalog {
            tiers: file.tiers.into_iter().map(|(k, v)| (k, v.0)).collect(),
            models: file.models,
            lifecycle: file.lifecycle,
            local: file.local,
        };
        catalog.check()?;
        Ok(catalog)
    }

    /// Lays overrides from the config over this catalog: a model entry replaces the whole entry, a tier
    /// its multiplier.
    pub fn with_overrides(
        mut self,
        models: BTreeMap<String, ModelPrice>,
        tiers: BTreeMap<String, Price>,
    ) -> Result<Catalog, CatalogError> {
        for (name, price) in models {
            price.check(&format!("prices.\"{name}\""))?;
            self.models.insert(name, price);
        }
        for (name, m) in tiers {
            self.tiers.insert(name, m.0);
        }
        self.check()?;
        Ok(self)
    }

    fn check(&self) -> Result<(), CatalogError> {
        for (name, m) in &self.models {
            m.check(&format!("models.\"{name}\""))?;
        }
        for (name, m) in &self.tiers {
            if m.is_sign_negative() {
                return Err(CatalogError(format!("tiers.{name}: a multiplier cannot be negative")));
            }
        }
        if !self.tiers.contains_key("default") {
            return Err(CatalogError("tiers: the 'default' tier needs a multiplier".to_owned()));
        }
        Ok(())
    }

    pub fn model(&self, name: &str) -> Option<&ModelPrice> {
        self.models.get(name)
    }

    pub fn lifecycle(&self, name: &str) -> Option<&Lifecycle> {
        self.lifecycle.get(name)
    }

    pub fn tier_multiplier(&self, tier: &str) -> Option<Decimal> {
        self.tiers.get(tier).copied()
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.normalize())
    }
}
