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

use kiln_core::config::ServerConfig;
use kiln_events::host::Host;

pub use kiln_core::{Error, Result};
pub use service::Identity;

/// Opens identity's database (migrating it), starts its outbox relay on the host's bus, adds
/// its gRPC services to the host, and makes sure
/// the system account and its admin exist. Returns the service and, on the very first start,
/// the bootstrap admin API key.
pub async fn open(
    server: &ServerConfig,
    identity: &config::IdentityConfig,
    host: &mut Host,
) -> Result<(Identity, Option<String>)> {
    if server.database_url.is_none() {
        std::fs::create_dir_all(&server.data_dir).map_err(|e| {
            Error::Internal(format!(
                "cannot create data dir {}: {e}",
                server.data_dir.display()
            ))
        })?;
    }
    let db = kiln_store::connect(&server.database_url_for(service::SERVICE)).await?;
    kiln_store::migrate(&db, service::SERVICE, db::MIGRATIONS).await?;
    let svc = Identity::new(
        db.clone(),
        host.pages.clone(),
        host.cache.clone(),
        server.auth_cache_ttl,
    );
    host.track(
        svc.outbox()
            .spawn_relay(db, host.bus.clone(), host.shutdown.clone()),
    );
    host.track(watch_changes(&svc, host).await?);
    host.track(suspensions::spawn(&svc, host));
    grpc::add_services(&svc, &mut host.services);
    let admin_key = svc.bootstrap(&identity.admin_email).await?;
    Ok((svc, admin_key))
}

/// Keeps this replica's caches in step with changes that other replicas make.
async fn watch_changes(identity: &Identity, host: &Host) -> Result<tokio::task::JoinHandle<()>> {
    use futures::StreamExt;
    let mut events = host.bus.subscribe("kiln.identity.account.>").await?;
    let identity = identity.clone();
    let mut shutdown = host.shutdown.clone();
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
