//! Exact money: USD as [`Decimal`] outside, integer nano-USD (`i64`, 1e-9 USD) in the database.
//!
//! Rounding happens only here, once per amount, always to the nano-dollar:
//! - a worst case being **reserved** rounds up ([`usd_to_nanos_ceil`]): the hold is never less than
//!   the price;
//! - a **limit** (hard cap, soft threshold) rounds down ([`usd_to_nanos_floor`]): never allows more
//!   than configured;
//! - an actual cost being **settled** or recorded rounds half-up ([`usd_to_nanos_half_up`]), the
//!   usual commercial rounding.
//!
//! Prices from the `pricing` crate are already exact at nano precision except compute time, which it
//! rounds to the nano-dollar itself, so in practice these conversions are exact. Reading back
//! ([`nanos_to_usd`]) is always exact. `i64` nano-USD holds up to about 9.2 billion USD; larger or
//! negative amounts are refused with [`LedgerError::InvalidAmount`].

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::error::{LedgerError, Result};

/// Nano-USD in one USD.
pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// USD to nano-USD, rounding up (toward more money). For reservations.
pub fn usd_to_nanos_ceil(usd: Decimal) -> Result<i64> {
    to_nanos(usd, RoundingStrategy::ToPositiveInfinity)
}

/// USD to nano-USD, rounding half away from zero (half-up, amounts being non-negative). For settled costs.
pub fn usd_to_nanos_half_up(usd: Decimal) -> Result<i64> {
    to_nanos(usd, RoundingStrategy::MidpointAwayFromZero)
}

/// USD to nano-USD, rounding down (toward less money). For limits.
pub fn usd_to_nanos_floor(usd: Decimal) -> Result<i64> {
    to_nanos(usd, RoundingStrategy::ToNegativeInfinity)
}

/// Nano-USD to USD, exactly (trailing zeros dropped: `40_000_000` is `0.04`).
pub fn nanos_to_usd(nanos: i64) -> Decimal {
    Decimal::new(nanos, 9).normalize()
}

fn to_nanos(usd: Decimal, strategy: RoundingStrategy) -> Result<i64> {
    if usd.is_sign_negative() && !usd.is_zero() {
        return Err(LedgerError::InvalidAmount(usd));
    }
    usd.checked_mul(Decimal::from(NANOS_PER_USD))
        .map(|nanos| nanos.round_dp_with_strategy(0, strategy))
        .and_then(|nanos| nanos.to_i64())
        .ok_or(LedgerError::InvalidAmount(usd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn usd(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn rounding_per_use() {
        // (amount, ceil, half-up, floor)
        let cases = [
            ("0", 0, 0, 0),
            ("0.04", 40_000_000, 40_000_000, 40_000_000),
            ("1.0000000001", 1_000_000_001, 1_000_000_000, 1_000_000_000),
            ("0.0000000005", 1, 1, 0),
            ("0.0000000004999", 1, 0, 0),
            ("123.456789012", 123_456_789_012, 123_456_789_012, 123_456_789_012),
        ];
        for (amount, ceil, half_up, floor) in cases {
            assert_eq!(usd_to_nanos_ceil(usd(amount)).unwrap(), ceil, "ceil {amount}");
            assert_eq!(usd_to_nanos_half_up(usd(amount)).unwrap(), half_up, "half-up {amount}");
            assert_eq!(usd_to_nanos_floor(usd(amount)).unwrap(), floor, "floor {amount}");
        }
    }

    #[test]
    fn round_trip_is_exact() {
        for nanos in [0, 1, 40_000_000, 1_000_000_000, 123_456_789_012, i64::MAX] {
            assert_eq!(usd_to_nanos_half_up(nanos_to_usd(nanos)).unwrap(), nanos);
        }
        assert_eq!(nanos_to_usd(40_000_000).to_string(), "0.04");
    }

    #[test]
    fn refuses_negative_and_huge() {
        assert!(matches!(usd_to_nanos_ceil(usd("-0.01")), Err(LedgerError::InvalidAmount(_))));
        assert!(matches!(usd_to_nanos_ceil(usd("10000000000")), Err(LedgerError::InvalidAmount(_))));
        assert!(matches!(usd_to_nanos_floor(Decimal::MAX), Err(LedgerError::InvalidAmount(_))));
        assert_eq!(usd_to_nanos_ceil(usd("-0")).unwrap(), 0);
    }
}
