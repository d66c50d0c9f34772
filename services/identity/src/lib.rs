//! Kiln identity: accounts, users, API keys and authentication.
//!
//! A library plus a thin `main.rs`; `kiln serve identity` and `kiln dev` run the same code.

mod account_cache;
mod accounts;
mod api_keys;
mod authn;
mod bootstrap;
pub mod config;
mod db;
mod grpc;
mod rules;
mod service;
mod suspensions;
mod users;

use kiln_events::host::Host;
use kiln_events::records::HasRecords as _;

pub use kiln_core::{Error, Result};
pub use service::Identity;

/// Opens identity's database (migrating it), starts its outbox relay on the host's bus, adds
/// its gRPC services to the host, and makes sure
/// the system account and its admin exist. Returns the service and, on the very first start,
/// the bootstrap admin API key.
pub async fn open(
    identity: &config::IdentityConfig,
    host: &mut Host,
) -> Result<(Identity, Option<String>)> {
    let db = host.open_database(service::SERVICE, db::MIGRATIONS).await?;
    let svc = Identity::new(
        db.clone(),
        host.pages.clone(),
        host.cache.clone(),
        host.server().auth_cache_ttl,
    );
    host.relay(svc.outbox(), db);
    host.track(watch_changes(&svc, host).await?);
    suspensions::spawn(&svc, host);
    grpc::add_services(&svc, &mut host.services);
    let admin_key = svc.bootstrap(&identity.admin_email).await?;
    Ok((svc, admin_key))
}

/// Keeps this replica's caches in step with changes that other replicas make.
async fn watch_changes(identity: &Identity, host: &Host) -> Result<tokio::task::JoinHandle<()>> {
    use futures::StreamExt;
    let mut events = host.bus.subscribe("kiln.identity.account.>").await?;
    let identity = identity.clone();
    let mut shutdown = host.stopped.clone();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(event) => identity.invalidate(&event.resource),
                    None => return,
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }))
}
