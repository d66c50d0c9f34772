//! Prices, parsed once from config into whole nano-units, so the ledger never holds a
//! floating-point amount: tokens cost a whole number of nanos each, accelerator time is
//! priced per microsecond and rounded to the nano once per ledger entry.

use std::collections::HashMap;

use kiln_core::config::ConfigError;
use kiln_proto::common::v1::{AcceleratorType, Money};

use crate::config::{BillingConfig, TokenPrices};

const NANOS_PER_UNIT: i64 = 1_000_000_000;
const MICROS_PER_HOUR: i128 = 3_600_000_000;

/// Nano-units per token of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenRates {
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
    pub embedding: i64,
    pub training: i64,
}

/// A model's own prices: each kind set overrides its tier's.
#[derive(Debug, Clone, Copy, Default)]
struct RateOverrides {
    input: Option<i64>,
    cached_input: Option<i64>,
    output: Option<i64>,
    embedding: Option<i64>,
    training: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Prices {
    pub currency_code: String,
    /// (max parameters, 0 = unbounded; rates), ascending.
    tiers: Vec<(i64, TokenRates)>,
    models: HashMap<String, RateOverrides>,
    /// Nano-units per accelerator-hour, by `AcceleratorType` value.
    accelerators: HashMap<i32, i64>,
}

/// `"2.90"` → 2_900_000_000 nano-units. At most nine decimals, never negative.
pub fn parse_usd_nanos(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (!fraction.is_empty() && !digits(fraction)) || fraction.len() > 9 {
        return Err(format!(
            "{text:?} is not an amount (digits, an optional point and at most nine decimals)"
        ));
    }
    let whole: i64 = whole
        .parse()
        .ok()
        .filter(|w| *w < i64::MAX / NANOS_PER_UNIT)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    let fraction: i64 = format!("{fraction:0<9}").parse().unwrap_or(0);
    Ok(whole * NANOS_PER_UNIT + fraction)
}

/// A per-million-token price as nano-units per token; it must divide evenly.
fn per_token(key: &str, text: &str) -> Result<i64, ConfigError> {
    let per_million = parse_usd_nanos(text).map_err(|e| ConfigError::invalid(key, e))?;
    if per_million % 1_000_000 != 0 {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{text:?} per million tokens is not a whole number of nano-units per token (use at most three decimals)"
            ),
        ));
    }
    Ok(per_million / 1_000_000)
}

fn optional(key: &str, text: &str) -> Result<Option<i64>, ConfigError> {
    if text.trim().is_empty() {
        Ok(None)
    } else {
        per_token(key, text).map(Some)
    }
}

fn overrides(key: &str, p: &TokenPrices) -> Result<RateOverrides, ConfigError> {
    Ok(RateOverrides {
        input: optional(&format!("{key}.input"), &p.input)?,
        cached_input: optional(&format!("{key}.cached_input"), &p.cached_input)?,
        output: optional(&format!("{key}.output"), &p.output)?,
        embedding: optional(&format!("{key}.embedding"), &p.embedding)?,
        training: optional(&format!("{key}.training"), &p.training)?,
    })
}

impl Prices {
    pub fn from_config(config: &BillingConfig) -> Result<Self, ConfigError> {
        if config.token_prices.is_empty() {
            return Err(ConfigError::invalid(
                "billing.token_prices",
                "needs at least one tier",
            ));
        }
        let mut tiers = Vec::new();
        let mut previous = 0;
        let last = config.token_prices.len() - 1;
        for (i, tier) in config.token_prices.iter().enumerate() {
            let key = format!("billing.token_prices[{i}]");
            if i < last && tier.max_parameters <= previous {
                return Err(ConfigError::invalid(
                    format!("{key}.max_parameters"),
                    "tiers must have increasing max_parameters (0, no bound, only on the last)",
                ));
            }
            previous = tier.max_parameters;
            let o = overrides(&key, &tier.prices)?;
            let rates = TokenRates {
                input: o.input.unwrap_or(0),
                cached_input: o.cached_input.or(o.input).unwrap_or(0),
                output: o.output.unwrap_or(0),
                embedding: o.embedding.unwrap_or(0),
                training: o.training.unwrap_or(0),
            };
            let bound = if i == last { 0 } else { tier.max_parameters };
            tiers.push((bound, rates));
        }
        let mut models = HashMap::new();
        for (model, prices) in &config.model_prices {
            models.insert(
                model.clone(),
                overrides(&format!("billing.model_prices.{model:?}"), prices)?,
            );
        }
        let mut accelerators = HashMap::new();
        for (name, price) in &config.accelerator_prices {
            let key = format!("billing.accelerator_prices.{name}");
            let kind = AcceleratorType::from_str_name(name)
                .filter(|k| *k != AcceleratorType::Unspecified)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        &key,
                        "not an accelerator type (NVIDIA_A100_80GB, NVIDIA_H100_80GB, NVIDIA_H200_141GB, AMD_MI300X_192GB, CPU)",
                    )
                })?;
            accelerators.insert(
                kind as i32,
                parse_usd_nanos(price).map_err(|e| ConfigError::invalid(&key, e))?,
            );
        }
        Ok(Self {
            currency_code: config.currency_code.clone(),
            tiers,
            models,
            accelerators,
        })
    }

    /// The rates of `model`, `parameters` large (a LoRA addon: its base model's count).
    pub fn token_rates(&self, model: &str, parameters: i64) -> TokenRates {
        let tier = self
            .tiers
            .iter()
            .find(|(max, _)| *max == 0 || parameters <= *max)
            .map(|(_, r)| *r)
            .unwrap_or_default();
        match self.models.get(model) {
            None => tier,
            Some(o) => TokenRates {
                input: o.input.unwrap_or(tier.input),
                cached_input: o.cached_input.or(o.input).unwrap_or(tier.cached_input),
                output: o.output.unwrap_or(tier.output),
                embedding: o.embedding.unwrap_or(tier.embedding),
                training: o.training.unwrap_or(tier.training),
            },
        }
    }

    /// Nano-units per accelerator-hour of `accelerator_type` (0 when it has no price).
    pub fn accelerator_hour(&self, accelerator_type: i32) -> i64 {
        self.accelerators
            .get(&accelerator_type)
            .copied()
            .unwrap_or(0)
    }

    /// The cost of `accelerator_micros` accelerator-microseconds, rounded half away from
    /// zero to the nano (corrections are negative).
    pub fn accelerator_cost(&self, accelerator_type: i32, accelerator_micros: i64) -> i64 {
        let exact = i128::from(accelerator_micros.abs())
            * i128::from(self.accelerator_hour(accelerator_type));
        let rounded = ((exact + MICROS_PER_HOUR / 2) / MICROS_PER_HOUR) as i64;
        rounded * accelerator_micros.signum()
    }

    pub fn money(&self, nanos: i64) -> Money {
        money(&self.currency_code, nanos)
    }
}

/// `nanos` nano-units as Money (units and nanos of the same sign).
pub fn money(currency_code: &str, nanos: i64) -> Money {
    Money {
        currency_code: currency_code.to_owned(),
        units: nanos / NANOS_PER_UNIT,
        nanos: (nanos % NANOS_PER_UNIT) as i32,
    }
}

/// `nanos` as a decimal amount, e.g. "12.5" or "0.000000301".
pub fn format_nanos(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    let units = abs / NANOS_PER_UNIT as u64;
    let fraction = abs % NANOS_PER_UNIT as u64;
    if fraction == 0 {
        return format!("{sign}{units}");
    }
    let digits = format!("{fraction:09}");
    format!("{sign}{units}.{}", digits.trim_end_matches('0'))
}

/// Money as nano-units (saturating).
pub fn money_nanos(money: &Money) -> i64 {
    money
        .units
        .saturating_mul(NANOS_PER_UNIT)
        .saturating_add(i64::from(money.nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(parse_usd_nanos("2.90"), Ok(2_900_000_000));
        assert_eq!(parse_usd_nanos("0.000000001"), Ok(1));
        assert_eq!(parse_usd_nanos("7"), Ok(7_000_000_000));
        assert!(parse_usd_nanos("0.0000000001").is_err());
        assert!(parse_usd_nanos("-1").is_err());
        assert!(parse_usd_nanos("1e3").is_err());
        assert!(parse_usd_nanos("").is_err());
    }

    #[test]
    fn tiers_and_overrides_pick_rates() {
        let mut config = BillingConfig::default();
        config.model_prices.insert(
            "accounts/a/models/m".into(),
            TokenPrices {
                output: "0.30".into(),
                ..Default::default()
            },
        );
        let prices = config.prices().unwrap();
        let small = prices.token_rates("accounts/kiln/models/x", 135_000_000);
        assert_eq!(
            (small.input, small.cached_input, small.embedding),
            (100, 50, 8)
        );
        assert_eq!(prices.token_rates("x", 8_000_000_000).input, 200);
        assert_eq!(prices.token_rates("x", 70_000_000_000).input, 900);
        let overridden = prices.token_rates("accounts/a/models/m", 1);
        assert_eq!((overridden.input, overridden.output), (100, 300));
    }

    #[test]
    fn prices_that_do_not_divide_are_named() {
        let mut config = BillingConfig::default();
        config.token_prices[1].prices.input = "0.1234".into();
        let err = config.prices().unwrap_err().to_string();
        assert!(err.contains("billing.token_prices[1].input"), "{err}");
    }

    #[test]
    fn accelerator_time_rounds_once_per_entry() {
        let prices = BillingConfig::default().prices().unwrap();
        let h100 = AcceleratorType::from_str_name("NVIDIA_H100_80GB").unwrap() as i32;
        // $5.80 an hour: one accelerator-hour, and one accelerator-second rounded to the nano.
        assert_eq!(prices.accelerator_cost(h100, 3_600_000_000), 5_800_000_000);
        assert_eq!(prices.accelerator_cost(h100, 1_000_000), 1_611_111);
        assert_eq!(prices.accelerator_cost(h100, -1_000_000), -1_611_111);
        assert_eq!(prices.accelerator_cost(0, 1_000_000), 0);
        let m = prices.money(-1_500_000_001);
        assert_eq!((m.units, m.nanos), (-1, -500_000_001));
        assert_eq!(money_nanos(&m), -1_500_000_001);
        assert_eq!(format_nanos(-1_500_000_000), "-1.5");
        assert_eq!(format_nanos(301), "0.000000301");
        assert_eq!(format_nanos(7_000_000_000), "7");
    }
}
