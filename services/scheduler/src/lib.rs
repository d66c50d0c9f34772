//! Kiln scheduler: deployments and deployed models, worker nodes and the replicas placed on
//! them, autoscaling, and the routing table every node follows. A library plus a thin
//! `main.rs`; `kiln dev` hosts it beside the other services.

mod addons;
mod autoscale;
pub mod catalog;
pub mod config;
mod db;
mod deployed_models;
mod deployments;
mod fine_tuning;
mod grpc;
mod lost_nodes;
mod metrics;
mod nodes;
pub mod placement;
pub mod quota;
mod reconcile;
mod replicas;
mod resource;
mod routes;
mod service;
mod state;
mod time;

use kiln_events::records::HasRecords as _;
use std::sync::Arc;

use kiln_events::host::Host;

pub use kiln_core::{Error, Result};
pub use service::Scheduler;

/// Opens the scheduler's database (migrating it), starts its outbox relay and reconcile loop
/// on the host and adds its gRPC services. Models are read from `catalog`; deployments are
/// checked against billing's quotas through `quotas` when given.
pub async fn open(
    config: &config::SchedulerConfig,
    host: &mut Host,
    catalog: Arc<dyn catalog::ModelCatalog>,
    quotas: Option<Arc<dyn quota::QuotaGate>>,
) -> Result<Scheduler> {
    let db = host.open_database(service::SERVICE, db::MIGRATIONS).await?;
    let scheduler = Scheduler::new(
        db.clone(),
        host.pages.clone(),
        config.clone(),
        catalog,
        quotas,
        host.shutdown.clone(),
    )
    .await?;
    host.relay(scheduler.outbox(), db);
    scheduler.resume_validations().await;
    host.track(reconcile::spawn(scheduler.clone(), host.shutdown.clone()));
    let (ending, mut stopped) = (scheduler.clone(), host.stopped.clone());
    host.track(tokio::spawn(async move {
        let _ = stopped.wait_for(|s| *s).await;
        ending.node_tasks_ended().await;
    }));
    grpc::add_services(&scheduler, &mut host.services);
    Ok(scheduler)
}
