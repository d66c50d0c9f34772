//! Kiln registry: models (base models and LoRA addons), their files, datasets, and the public
//! library. A library plus a thin `main.rs`; `kiln dev` hosts it beside the other services.

pub mod artifacts;
pub mod config;
pub mod datasets;
pub mod db;
pub mod deployments;
pub mod download;
pub mod error;
pub mod grpc;
pub mod library;
pub mod models;
pub mod prepare;
pub mod service;
pub mod uploads;
pub mod validate;

use kiln_core::config::ServerConfig;
use kiln_events::host::Host;

pub use error::{Error, Result};
pub use service::Registry;

/// Opens the registry's database (migrating it) and artifact store, starts its outbox relay
/// on the host's bus and adds its gRPC services to the host.
pub async fn open(
    server: &ServerConfig,
    config: &config::RegistryConfig,
    host: &mut Host,
) -> Result<Registry> {
    std::fs::create_dir_all(&server.data_dir).map_err(|e| {
        Error::Startup(format!(
            "cannot create data dir {}: {e}",
            server.data_dir.display()
        ))
    })?;
    let db = kiln_store::connect(&server.database_url_for(service::SERVICE)).await?;
    kiln_store::migrate(&db, service::SERVICE, db::MIGRATIONS).await?;
    let artifacts = artifacts::Artifacts::open(&server.data_dir, config)?;
    let registry = Registry::new(
        db.clone(),
        host.pages.clone(),
        artifacts,
        config.clone(),
        prepare::Preparers::standard(),
    );
    host.track(
        registry
            .outbox()
            .spawn_relay(db, host.bus.clone(), host.shutdown.clone()),
    );
    host.track(deployments::spawn(&registry, host));
    grpc::add_services(&registry, &mut host.services);
    Ok(registry)
}

/// Runs the registry alone until `stop` resolves (the `kiln-registry` binary and `kiln serve
/// registry`); callers' keys are checked by identity at `identity_url`.
pub async fn serve_until(
    config: &config::Config,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let bus = kiln_events::connect_bus(&config.server).await?;
    let (stop_tx, shutdown) = tokio::sync::watch::channel(false);
    let mut host = Host::new(&config.server, bus, shutdown);
    open(&config.server, &config.registry, &mut host).await?;
    let identity_url = config.server.identity_url.as_deref().unwrap_or_default();
    let token = config.server.service_token.as_deref().unwrap_or_default();
    let authenticator = std::sync::Arc::new(kiln_core::auth_client::RemoteAuthenticator::new(
        identity_url,
        token,
    )?);
    host.run_until(config.server.listen, authenticator, stop, stop_tx, |addr| {
        println!("kiln registry listening on {addr}");
    })
    .await
    .map_err(anyhow::Error::msg)
}
