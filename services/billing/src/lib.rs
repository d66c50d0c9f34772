//! Kiln billing: the usage ledger (from usage and replica events, exactly once), prices,
//! usage reports, quotas and spend limits. A library plus a thin `main.rs`; `kiln dev`
//! hosts it beside the other services.

pub mod config;
mod db;
mod grpc;
mod ledger;
pub mod prices;
mod quota_rules;
mod quotas;
mod service;
#[cfg(test)]
mod testing;
mod usage;

use kiln_events::host::Host;
use kiln_events::records::HasRecords as _;

pub use kiln_core::{Error, Result};
pub use service::Billing;

/// Opens billing's database (migrating it), starts its outbox relay, its ledger consumer
/// and its accrual loop on the host, and adds its gRPC services.
pub async fn open(config: &config::BillingConfig, host: &mut Host) -> Result<Billing> {
    let db = host.open_database(service::SERVICE, db::MIGRATIONS).await?;
    let billing = Billing::new(db.clone(), host.pages.clone(), config.clone())?;
    host.relay(billing.outbox(), db);
    ledger::spawn(&billing, host);
    grpc::add_services(&billing, &mut host.services);
    Ok(billing)
}
