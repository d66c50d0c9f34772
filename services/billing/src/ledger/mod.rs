//! The usage ledger. One durable consumer reads every event in stream order (so a model or
//! deployment is known before its usage) and books usage as ledger entries, exactly once
//! ([`ingest`]); running dedicated replicas are billed by the accrual loop while they run
//! ([`replicas`]); each booking adds to its account's month and checks its spend limit
//! ([`booking`], [`suspension`]). The ledger keeps its own copies of models and deployments
//! from their events ([`models`], [`deployments`]).

mod booking;
pub(crate) mod deployments;
pub(crate) mod entry;
mod ingest;
mod models;
pub(crate) mod replicas;
pub(crate) mod suspension;
#[cfg(test)]
mod tests;

use kiln_events::records::HasRecords as _;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_core::time::now_micros;
use kiln_events::Event;
use kiln_events::consumer::BatchHandler;

use crate::db::begin_write;
use crate::service::Billing;
use kiln_core::Result;

/// The ledger reads everything, in order; what it does not book it acknowledges untouched.
const SUBJECTS: &str = "kiln.>";

impl Billing {
    /// Bills every running dedicated replica up to `now`, and lifts spend-limit suspensions
    /// of a month that has ended.
    pub(crate) async fn accrue(&self, now: i64) -> Result<()> {
        let txn = begin_write(self.db()).await?;
        let entries = replicas::accrue(&txn, self.prices(), now).await?;
        self.book(&txn, &entries).await?;
        self.lift_ended_months(&txn, now).await?;
        self.outbox().commit(txn).await?;
        Ok(())
    }
}

/// Hands each batch the durable consumer delivers to [`Billing::ingest`].
struct LedgerConsumer(Billing);

#[async_trait]
impl BatchHandler for LedgerConsumer {
    async fn handle(&self, events: &[Event]) -> Result<(), kiln_events::Error> {
        self.0.ingest(events).await.map(|_| ()).map_err(Into::into)
    }
}

/// Starts the ledger consumer (its durable name from config) and the accrual loop on the
/// host.
pub(crate) fn spawn(billing: &Billing, host: &mut kiln_events::host::Host) {
    let config = billing.config();
    let ledger = Arc::new(LedgerConsumer(billing.clone()));
    host.consume(
        &config.ledger_consumer,
        SUBJECTS,
        config.ingest_batch,
        ledger,
    );
    let accrual = {
        let billing = billing.clone();
        let mut shutdown = host.stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(billing.config().accrual_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                if let Err(err) = billing.accrue(now_micros()).await {
                    tracing::warn!(%err, "billing running replicas failed; retrying next tick");
                }
            }
        })
    };
    host.track(accrual);
}
