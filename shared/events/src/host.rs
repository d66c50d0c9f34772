//! What a process gives the services it hosts: the bus, the API-key cache kept honest by
//! identity events, page tokens, the set of gRPC services to serve, the shutdown signal and
//! the background tasks to wait for. kiln-server builds one, lets each service `open` on it,
//! then serves it.

use std::sync::Arc;

use kiln_core::auth::AuthCache;
use kiln_core::config::ServerConfig;
use kiln_core::page::PageTokens;
use kiln_core::server::ServiceSet;
use sea_orm::DatabaseConnection;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::EventBus;
use crate::consumer::{BatchHandler, spawn_consumer};
use crate::outbox::Outbox;

/// Shared plumbing for the services of one process.
pub struct Host {
    server: ServerConfig,
    pub bus: Arc<dyn EventBus>,
    pub cache: Arc<AuthCache>,
    pub pages: PageTokens,
    pub services: ServiceSet,
    pub shutdown: watch::Receiver<bool>,
    service_token: Option<String>,
    tasks: Vec<JoinHandle<()>>,
}

/// A host taken apart to be served.
pub struct HostParts {
    pub bus: Arc<dyn EventBus>,
    pub cache: Arc<AuthCache>,
    pub services: ServiceSet,
    pub shutdown: watch::Receiver<bool>,
    pub service_token: Option<String>,
    /// Background tasks that end at shutdown.
    pub tasks: Vec<JoinHandle<()>>,
}

impl Host {
    pub fn new(
        server: &ServerConfig,
        bus: Arc<dyn EventBus>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            server: server.clone(),
            bus,
            cache: Arc::new(AuthCache::new(server.auth_cache_ttl)),
            pages: PageTokens::new(page_secret(server).as_bytes()),
            services: ServiceSet::new(),
            shutdown,
            service_token: server.service_token.clone(),
            tasks: Vec::new(),
        }
    }

    /// The process's server settings.
    pub fn server(&self) -> &ServerConfig {
        &self.server
    }

    /// A service's database, migrated: a SQLite file under the data dir (created if need be)
    /// unless a database URL is configured.
    pub async fn open_database(
        &self,
        service: &str,
        migrations: &[kiln_store::Migration],
    ) -> Result<DatabaseConnection, kiln_core::Error> {
        if self.server.database_url.is_none() {
            std::fs::create_dir_all(&self.server.data_dir).map_err(|e| {
                kiln_core::Error::internal(
                    format_args!("creating the data dir {}", self.server.data_dir.display()),
                    e,
                )
            })?;
        }
        let db = kiln_store::connect(&self.server.database_url_for(service)).await?;
        kiln_store::migrate(&db, service, migrations).await?;
        Ok(db)
    }

    /// Publishes what `outbox` holds on the bus, in the background until shutdown.
    pub fn relay(&mut self, outbox: &Outbox, db: DatabaseConnection) {
        let relay = outbox.spawn_relay(db, self.bus.clone(), self.shutdown.clone());
        self.track(relay);
    }

    /// Runs the durable consumer `name` on `filter` in the background until shutdown, handing
    /// `handler` up to `batch` waiting events at once ([`spawn_consumer`]).
    pub fn consume(
        &mut self,
        name: &str,
        filter: &str,
        batch: usize,
        handler: Arc<dyn BatchHandler>,
    ) {
        let consumer = spawn_consumer(
            self.bus.clone(),
            name.to_owned(),
            filter.to_owned(),
            batch,
            handler,
            self.shutdown.clone(),
        );
        self.track(consumer);
    }

    /// A background task that ends at shutdown (an outbox relay, a consumer).
    pub fn track(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    pub fn into_parts(self) -> HostParts {
        HostParts {
            bus: self.bus,
            cache: self.cache,
            services: self.services,
            shutdown: self.shutdown,
            service_token: self.service_token,
            tasks: self.tasks,
        }
    }
}

/// The page-token signing secret: configured, else derived from the service token, else a
/// per-process random one (tokens then do not survive a restart).
fn page_secret(server: &ServerConfig) -> String {
    if let Some(secret) = &server.page_token_secret {
        return secret.clone();
    }
    if let Some(token) = &server.service_token {
        return format!("page-tokens:{token}");
    }
    uuid::Uuid::new_v4().to_string()
}
