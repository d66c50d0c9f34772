//! Kiln registry: models (base models and LoRA addons), their files, datasets, and the public
//! library. kiln-server hosts it (`kiln serve registry`, `kiln dev`).

mod artifacts;
pub mod config;
mod datasets;
mod db;
mod deployments;
mod download;
mod grpc;
mod library;
mod local_files;
mod models;
mod prepare;
mod preparers;
mod recovery;
mod service;
mod staging;
mod stored;
mod uploads;
mod validate;

use kiln_events::host::Host;
use kiln_events::records::HasRecords as _;

pub use kiln_core::{Error, Result};
pub use library::{CHAT_MODEL, EMBEDDING_MODEL, asset_dir};
pub use local_files::{UPLOAD_CHUNK, file_upload_stream, hash_file};
pub use service::Registry;

/// Opens the registry's database (migrating it) and artifact store, starts its outbox relay
/// on the host's bus and adds its gRPC services to the host.
pub async fn open(config: &config::RegistryConfig, host: &mut Host) -> Result<Registry> {
    let db = host.open_database(service::SERVICE, db::MIGRATIONS).await?;
    let artifacts = artifacts::Artifacts::open(&host.server().data_dir, config)?;
    let registry = Registry::new(
        db.clone(),
        host.pages.clone(),
        artifacts,
        config.clone(),
        preparers::Preparers::standard(),
    );
    let recovered = registry.recover_uploads().await?;
    if recovered > 0 {
        tracing::info!(recovered, "unfinished uploads resume at their staged bytes");
    }
    host.relay(registry.outbox(), db);
    deployments::spawn(&registry, host);
    grpc::add_services(&registry, &mut host.services);
    Ok(registry)
}
