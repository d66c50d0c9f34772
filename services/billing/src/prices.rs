//! Prices, parsed once from config into whole nano-units, so the ledger never holds a
//! floating-point amount: tokens cost a whole number of nanos each, accelerator time is
//! priced per microsecond and rounded to the nano once per ledger entry.

use std::collections::{BTreeMap, HashMap};

use kiln_core::config::ConfigError;
use kiln_proto::common::v1::{AcceleratorType, Money};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Nano-units in one unit of the currency.
pub(crate) const NANOS_PER_UNIT: i64 = 1_000_000_000;
const MICROS_PER_HOUR: i128 = 3_600_000_000;

/// Prices per million tokens, as decimal strings (`"0.10"`): each must be a whole number of
/// nano-units per token (at most three decimals).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TokenPrices {
    /// Prompt tokens not served from the prefix cache.
    pub input: String,
    /// Prompt tokens served from the prefix cache.
    pub cached_input: String,
    /// Generated tokens.
    pub output: String,
    /// Tokens of embedding inputs.
    pub embedding: String,
    /// Tokens a fine-tuning job trains on (every epoch).
    pub training: String,
}

/// One tier of `billing.token_prices`: its bound and its prices side by side.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(from = "TierKeys")]
pub struct TokenTier {
    /// Models up to this many parameters; 0: no bound (the last tier).
    pub max_parameters: i64,
    #[serde(flatten)]
    pub prices: TokenPrices,
}

/// A tier as it is written, every key known (serde cannot refuse unknown keys next to a
/// flattened struct).
#[derive(Default, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
struct TierKeys {
    /// Models up to this many parameters; 0: no bound (the last tier).
    max_parameters: i64,
    /// Per million prompt tokens not served from the prefix cache (`"0.10"`).
    input: String,
    /// Per million prompt tokens served from the prefix cache.
    cached_input: String,
    /// Per million generated tokens.
    output: String,
    /// Per million tokens of embedding inputs.
    embedding: String,
    /// Per million tokens a fine-tuning job trains on (every epoch).
    training: String,
}

impl From<TierKeys> for TokenTier {
    fn from(keys: TierKeys) -> Self {
        Self {
            max_parameters: keys.max_parameters,
            prices: TokenPrices {
                input: keys.input,
                cached_input: keys.cached_input,
                output: keys.output,
                embedding: keys.embedding,
                training: keys.training,
            },
        }
    }
}

impl TokenTier {
    /// A tier of models up to `max_parameters` with its prices: input, cached input,
    /// output, embedding, training.
    pub(crate) fn new(max_parameters: i64, prices: [&str; 5]) -> Self {
        let [input, cached_input, output, embedding, training] = prices.map(str::to_owned);
        Self {
            max_parameters,
            prices: TokenPrices {
                input,
                cached_input,
                output,
                embedding,
                training,
            },
        }
    }
}

/// Nano-units per token of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TokenRates {
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
pub(crate) struct Prices {
    pub currency_code: String,
    /// (max parameters, 0 = unbounded; rates), ascending.
    tiers: Vec<(i64, TokenRates)>,
    models: HashMap<String, RateOverrides>,
    /// Nano-units per accelerator-hour, by `AcceleratorType` value.
    accelerators: HashMap<i32, i64>,
}

/// `"2.90"` → 2_900_000_000 nano-units. At most nine decimals, never negative.
pub(crate) fn parse_usd_nanos(text: &str) -> Result<i64, String> {
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
    /// The price table of `billing`'s settings: `token_prices` by tier, `model_prices` over
    /// them, `accelerator_prices` by accelerator type name; an error names the bad key.
    pub(crate) fn new(
        currency_code: &str,
        token_prices: &[TokenTier],
        model_prices: &BTreeMap<String, TokenPrices>,
        accelerator_prices: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        if token_prices.is_empty() {
            return Err(ConfigError::invalid(
                "billing.token_prices",
                "needs at least one tier",
            ));
        }
        let mut tiers = Vec::new();
        let mut previous = 0;
        let last = token_prices.len() - 1;
        for (i, tier) in token_prices.iter().enumerate() {
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
        for (model, prices) in model_prices {
            models.insert(
                model.clone(),
                overrides(&format!("billing.model_prices.{model:?}"), prices)?,
            );
        }
        let mut accelerators = HashMap::new();
        for (name, price) in accelerator_prices {
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
            currency_code: currency_code.to_owned(),
            tiers,
            models,
            accelerators,
        })
    }

    /// The rates of `model`, `parameters` large (a LoRA addon: its base model's count).
    pub(crate) fn token_rates(&self, model: &str, parameters: i64) -> TokenRates {
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
    fn accelerator_hour(&self, accelerator_type: i32) -> i64 {
        self.accelerators
            .get(&accelerator_type)
            .copied()
            .unwrap_or(0)
    }

    /// The cost of `accelerator_micros` accelerator-microseconds, rounded half away from
    /// zero to the nano (corrections are negative).
    pub(crate) fn accelerator_cost(&self, accelerator_type: i32, accelerator_micros: i64) -> i64 {
        let exact = i128::from(accelerator_micros.abs())
            * i128::from(self.accelerator_hour(accelerator_type));
        let rounded = ((exact + MICROS_PER_HOUR / 2) / MICROS_PER_HOUR) as i64;
        rounded * accelerator_micros.signum()
    }

    /// `nanos` nano-units as Money (units and nanos of the same sign).
    pub(crate) fn money(&self, nanos: i64) -> Money {
        Money {
            currency_code: self.currency_code.clone(),
            units: nanos / NANOS_PER_UNIT,
            nanos: (nanos % NANOS_PER_UNIT) as i32,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tiers and the H100's price; `models`: each model's own prices.
    fn table(models: &[(&str, TokenPrices)]) -> Result<Prices, ConfigError> {
        let models = models
            .iter()
            .map(|(m, p)| ((*m).to_owned(), p.clone()))
            .collect();
        let accelerators = [("NVIDIA_H100_80GB".to_owned(), "5.80".to_owned())].into();
        Prices::new(
            "USD",
            &[
                TokenTier::new(4_000_000_000, ["0.10", "0.05", "0.10", "0.008", "0.50"]),
                TokenTier::new(0, ["0.90", "", "0.80", "0.016", "3.00"]),
            ],
            &models,
            &accelerators,
        )
    }

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
        let output = TokenPrices {
            output: "0.30".into(),
            ..Default::default()
        };
        let cached = TokenPrices {
            input: "0.40".into(),
            ..Default::default()
        };
        let prices = table(&[
            ("accounts/a/models/m", output),
            ("accounts/a/models/c", cached),
        ])
        .unwrap();
        let small = prices.token_rates("accounts/kiln/models/x", 135_000_000);
        assert_eq!(
            small,
            TokenRates {
                input: 100,
                cached_input: 50,
                output: 100,
                embedding: 8,
                training: 500,
            }
        );
        // The bound is inclusive; the last tier has none, and its cached input costs as much
        // as its input when it names no price of its own.
        assert_eq!(prices.token_rates("x", 4_000_000_000).input, 100);
        let big = prices.token_rates("x", 4_000_000_001);
        assert_eq!((big.input, big.cached_input, big.output), (900, 900, 800));
        assert_eq!(prices.token_rates("x", 70_000_000_000).training, 3_000);
        let overridden = prices.token_rates("accounts/a/models/m", 1);
        assert_eq!((overridden.input, overridden.output), (100, 300));
        // A model's own input price is its cached input price too, unless it names one.
        let own_input = prices.token_rates("accounts/a/models/c", 1);
        assert_eq!((own_input.input, own_input.cached_input), (400, 400));
    }

    #[test]
    fn prices_that_do_not_divide_are_named() {
        let odd = TokenPrices {
            input: "0.1234".into(),
            ..Default::default()
        };
        let err = table(&[("m", odd)]).unwrap_err().to_string();
        assert!(err.contains("billing.model_prices.\"m\".input"), "{err}");
        let unordered = Prices::new(
            "USD",
            &[
                TokenTier::new(8, ["0.10"; 5]),
                TokenTier::new(4, ["0.10"; 5]),
                TokenTier::new(0, ["0.10"; 5]),
            ],
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let err = unordered.unwrap_err().to_string();
        assert!(
            err.contains("billing.token_prices[1].max_parameters"),
            "{err}"
        );
    }

    #[test]
    fn accelerator_time_rounds_once_per_entry() {
        let prices = table(&[]).unwrap();
        let h100 = AcceleratorType::NvidiaH10080gb as i32;
        // $5.80 an hour: one accelerator-hour, and one accelerator-second rounded to the nano.
        assert_eq!(prices.accelerator_cost(h100, 3_600_000_000), 5_800_000_000);
        assert_eq!(prices.accelerator_cost(h100, 1_000_000), 1_611_111);
        assert_eq!(prices.accelerator_cost(h100, -1_000_000), -1_611_111);
        assert_eq!(prices.accelerator_cost(0, 1_000_000), 0);
        let m = prices.money(-1_500_000_001);
        assert_eq!((m.units, m.nanos), (-1, -500_000_001));
        assert_eq!(format_nanos(-1_500_000_000), "-1.5");
        assert_eq!(format_nanos(301), "0.000000301");
        assert_eq!(format_nanos(7_000_000_000), "7");
    }
}
