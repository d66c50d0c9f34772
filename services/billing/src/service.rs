//! The billing service's shared state.

use std::sync::Arc;

use kiln_core::page::PageTokens;
use kiln_events::records::{HasRecords, Records};
use sea_orm::DatabaseConnection;

use crate::config::BillingConfig;
use crate::prices::Prices;

/// The service's name in the outbox and migrations.
pub(crate) const SERVICE: &str = "billing";

/// Billing, shared by its handlers, its ledger consumer and its accrual loop.
#[derive(Clone)]
pub struct Billing {
    inner: Arc<Inner>,
}

struct Inner {
    records: Records,
    config: BillingConfig,
    prices: Prices,
}

impl HasRecords for Billing {
    fn records(&self) -> &Records {
        &self.inner.records
    }
}

impl Billing {
    pub(crate) fn new(
        db: DatabaseConnection,
        pages: PageTokens,
        config: BillingConfig,
    ) -> crate::Result<Self> {
        let prices = config
            .prices()
            .map_err(|e| crate::Error::Internal(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                records: Records::new(SERVICE, db, pages),
                config,
                prices,
            }),
        })
    }

    pub(crate) fn config(&self) -> &BillingConfig {
        &self.inner.config
    }

    pub(crate) fn prices(&self) -> &Prices {
        &self.inner.prices
    }
}
