//! Billing's `[billing]` configuration: prices, quota defaults and how often running replicas
//! are billed.

use std::collections::BTreeMap;

use std::time::Duration;

use kiln_core::config::{ConfigError, Validate};
use kiln_core::duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::prices::{Prices, parse_usd_nanos};
pub use crate::prices::{TokenPrices, TokenTier};

/// The ledger's durable consumer unless `ledger_consumer` names another.
const DEFAULT_LEDGER_CONSUMER: &str = "billing-ledger";

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    /// ISO 4217 code of every price and amount.
    pub currency_code: String,
    /// Per-million-token prices by model size: the first tier whose `max_parameters` covers
    /// the model (a LoRA addon counts as its base model) applies; the last tier has no bound.
    pub token_prices: Vec<TokenTier>,
    /// Per-million-token prices for one model, over its tier (`"accounts/a/models/m"`).
    pub model_prices: BTreeMap<String, TokenPrices>,
    /// USD (or `currency_code`) per accelerator-hour, by accelerator type name
    /// (`NVIDIA_H100_80GB`, `CPU`, ...).
    pub accelerator_prices: BTreeMap<String, String>,
    /// The quotas every account starts with.
    pub quotas: QuotaDefaults,
    /// How often running dedicated replicas are billed for their time so far (so reports and
    /// spend limits see them before they stop).
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub accrual_interval: Duration,
    /// Events handled per ledger transaction at most.
    pub ingest_batch: usize,
    /// The ledger's durable consumer on the event stream. Instances of one billing share
    /// it; a second billing with its own database (a standby, an audit copy) on the same
    /// stream takes another name and reads the whole stream itself.
    pub ledger_consumer: String,
}

/// Default quota values (and the most an account may set itself).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaDefaults {
    /// Accelerators of each type an account's dedicated deployments may hold at once.
    pub accelerators: i64,
    /// Deployments an account may hold.
    pub deployments: i64,
    /// Serverless inference requests per minute.
    pub serverless_inference_rpm: i64,
    /// Serverless inference tokens per minute.
    pub serverless_inference_tpm: i64,
    /// Fine-tuning jobs an account may run at once.
    pub fine_tuning_jobs: i64,
    /// Whole currency units per calendar month (UTC).
    pub monthly_spend: i64,
}

impl Default for QuotaDefaults {
    fn default() -> Self {
        Self {
            accelerators: 16,
            deployments: 50,
            serverless_inference_rpm: 6_000,
            serverless_inference_tpm: 2_000_000,
            fine_tuning_jobs: 10,
            monthly_spend: 1_000,
        }
    }
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            currency_code: "USD".into(),
            token_prices: vec![
                TokenTier::new(4_000_000_000, ["0.10", "0.05", "0.10", "0.008", "0.50"]),
                TokenTier::new(16_000_000_000, ["0.20", "0.10", "0.20", "0.016", "0.50"]),
                TokenTier::new(0, ["0.90", "0.45", "0.90", "0.016", "3.00"]),
            ],
            model_prices: BTreeMap::new(),
            accelerator_prices: [
                ("NVIDIA_A100_80GB", "2.90"),
                ("NVIDIA_H100_80GB", "5.80"),
                ("NVIDIA_H200_141GB", "6.99"),
                ("AMD_MI300X_192GB", "4.99"),
                ("CPU", "0.05"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            quotas: QuotaDefaults::default(),
            accrual_interval: Duration::from_secs(60),
            ingest_batch: 512,
            ledger_consumer: DEFAULT_LEDGER_CONSUMER.to_owned(),
        }
    }
}

impl BillingConfig {
    /// The parsed price table.
    pub(crate) fn prices(&self) -> Result<Prices, ConfigError> {
        Prices::new(
            &self.currency_code,
            &self.token_prices,
            &self.model_prices,
            &self.accelerator_prices,
        )
    }
}

impl Validate for BillingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let code = &self.currency_code;
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::invalid(
                "billing.currency_code",
                format!("must be an ISO 4217 code such as USD, got {code:?}"),
            ));
        }
        if self.accrual_interval < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "billing.accrual_interval",
                "must be at least 100ms",
            ));
        }
        if !(1..=4096).contains(&self.ingest_batch) {
            return Err(ConfigError::invalid(
                "billing.ingest_batch",
                "must be between 1 and 4096",
            ));
        }
        let consumer = &self.ledger_consumer;
        if consumer.is_empty()
            || !consumer
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::invalid(
                "billing.ledger_consumer",
                format!("must be letters, digits, '-' and '_', got {consumer:?}"),
            ));
        }
        let q = &self.quotas;
        for (key, value) in [
            ("accelerators", q.accelerators),
            ("deployments", q.deployments),
            ("serverless_inference_rpm", q.serverless_inference_rpm),
            ("serverless_inference_tpm", q.serverless_inference_tpm),
            ("fine_tuning_jobs", q.fine_tuning_jobs),
            ("monthly_spend", q.monthly_spend),
        ] {
            if value < 0 {
                return Err(ConfigError::invalid(
                    format!("billing.quotas.{key}"),
                    "must not be negative",
                ));
            }
        }
        for (name, price) in &self.accelerator_prices {
            parse_usd_nanos(price).map_err(|e| {
                ConfigError::invalid(format!("billing.accelerator_prices.{name}"), e)
            })?;
        }
        self.prices().map(|_| ())
    }
}
