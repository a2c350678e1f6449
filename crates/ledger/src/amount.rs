//! Token amounts: integer base units (`u128`), 10^9 per token, parsed from and printed
//! as exact decimal strings so no amount ever passes through a float.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Base units in one token.
pub const BASE_UNITS_PER_TOKEN: u128 = 1_000_000_000;
/// Decimal places of a token amount.
pub const TOKEN_DECIMALS: usize = 9;
/// The largest amount one operation may carry: 10^18 tokens. Far above any real
/// supply, and small enough that sums of many amounts cannot overflow `u128`.
pub const AMOUNT_MAX: u128 = 1_000_000_000_000_000_000 * BASE_UNITS_PER_TOKEN;

/// A non-negative number of base units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Amount(pub u128);

/// Why a string is not an amount.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed amount `{text}`: {reason}")]
pub struct AmountError {
    pub text: String,
    pub reason: &'static str,
}

impl Amount {
    pub const ZERO: Amount = Amount(0);

    /// Parses a token amount with up to nine decimals, e.g. `"12.5"` or `"0.000000001"`.
    pub fn parse_tokens(text: &str) -> Result<Amount, AmountError> {
        let err = |reason| AmountError {
            text: text.to_string(),
            reason,
        };
        let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(err("empty"));
        }
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(frac) || (text.contains('.') && frac.is_empty()) {
            return Err(err(
                "expected digits with an optional decimal point, like 12.5",
            ));
        }
        if frac.len() > TOKEN_DECIMALS {
            return Err(err("more than 9 decimal places"));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err("too large"))?
        };
        let frac_units: u128 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<9}")
                .parse()
                .map_err(|_| err("bad fraction"))?
        };
        let units = whole
            .checked_mul(BASE_UNITS_PER_TOKEN)
            .and_then(|w| w.checked_add(frac_units))
            .ok_or_else(|| err("too large"))?;
        Amount::checked(units).ok_or_else(|| err("above the 10^18-token limit"))
    }

    /// Parses a decimal count of base units, e.g. `"1500000000"`.
    pub fn parse_base_units(text: &str) -> Result<Amount, AmountError> {
        let err = |reason| AmountError {
            text: text.to_string(),
            reason,
        };
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("expected a whole number of base units"));
        }
        let units: u128 = text.parse().map_err(|_| err("too large"))?;
        Amount::checked(units).ok_or_else(|| err("above the 10^18-token limit"))
    }

    /// `Some` when within [`AMOUNT_MAX`].
    pub fn checked(units: u128) -> Option<Amount> {
        (units <= AMOUNT_MAX).then_some(Amount(units))
    }

    /// The amount in tokens, exact, without trailing zeros: `12.5`, `3`, `0.000000001`.
    pub fn tokens_string(self) -> String {
        let whole = self.0 / BASE_UNITS_PER_TOKEN;
        let frac = self.0 % BASE_UNITS_PER_TOKEN;
        if frac == 0 {
            return whole.to_string();
        }
        let frac = format!("{frac:09}");
        format!("{whole}.{}", frac.trim_end_matches('0'))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Amount {
    type Err = AmountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Amount::parse_base_units(s)
    }
}

// JSON carries base units as a decimal string: JSON numbers lose precision past 2^53.
impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Amount::parse_base_units(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_strings_round_trip_exactly() {
        for (text, units) in [
            ("12.5", 12_500_000_000u128),
            ("3", 3_000_000_000),
            ("0.000000001", 1),
            (".5", 500_000_000),
        ] {
            let a = Amount::parse_tokens(text).unwrap();
            assert_eq!(a.0, units, "{text}");
            assert_eq!(Amount::parse_tokens(&a.tokens_string()).unwrap(), a);
        }
    }

    #[test]
    fn malformed_amounts_say_why() {
        for bad in [
            "",
            "-1",
            "1.",
            "1e9",
            "0.0000000001",
            "1,000",
            "abc",
            "1000000000000000001",
        ] {
            assert!(Amount::parse_tokens(bad).is_err(), "{bad}");
        }
        assert!(Amount::parse_base_units("12.5").is_err());
        let e = Amount::parse_tokens("0.0000000001").unwrap_err();
        assert!(e.to_string().contains("9 decimal places"), "{e}");
        assert_eq!(
            serde_json::from_str::<Amount>("\"17\"").unwrap(),
            Amount(17)
        );
        assert!(serde_json::from_str::<Amount>("17").is_err());
    }
}
