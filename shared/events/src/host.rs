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
///
/// A stop runs in three steps, so that nothing the last calls did is lost: `shutdown` turns
/// true (no new calls; the calls in flight may finish, nodes deregister); once the calls
/// have ended, the background work ends (`stopped`: consumers first handle what is on its
/// way, loops end) while the outbox relays still publish; then the relays publish what is
/// left and end. A clean stop leaves every outbox empty when the bus is up.
pub struct Host {
    server: ServerConfig,
    pub bus: Arc<dyn EventBus>,
    pub cache: Arc<AuthCache>,
    pub pages: PageTokens,
    pub services: ServiceSet,
    /// True once the process stops taking calls.
    pub shutdown: watch::Receiver<bool>,
    /// True once the calls in flight have ended: background work ends.
    pub stopped: watch::Receiver<bool>,
    stop: Stop,
    service_tokens: Vec<String>,
}

/// The ends of a host's background work, which whoever serves it sets.
pub struct Stop {
    stop_relays: watch::Sender<bool>,
    relays: Vec<JoinHandle<()>>,
    stop_work: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stop {
    /// Once the calls have ended: the background work ends, then the relays publish what
    /// is left (what the calls and that work recorded) and end.
    pub async fn run(self) {
        let _ = self.stop_work.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = self.stop_relays.send(true);
        for relay in self.relays {
            let _ = relay.await;
        }
    }
}

/// A host taken apart to be served.
pub struct HostParts {
    pub bus: Arc<dyn EventBus>,
    pub cache: Arc<AuthCache>,
    pub services: ServiceSet,
    pub shutdown: watch::Receiver<bool>,
    /// The service credentials callers may present (the one this process sends first).
    pub service_tokens: Vec<String>,
    /// Ends the background work once the calls have ended.
    pub stop: Stop,
}

impl Host {
    pub fn new(
        server: &ServerConfig,
        bus: Arc<dyn EventBus>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (stop_work, stopped) = watch::channel(false);
        Self {
            server: server.clone(),
            bus,
            cache: Arc::new(AuthCache::new(server.auth_cache_ttl)),
            pages: PageTokens::new(page_secret(server).as_bytes()),
            services: ServiceSet::new(),
            shutdown,
            stopped,
            stop: Stop {
                stop_relays: watch::channel(false).0,
                relays: Vec::new(),
                stop_work,
                tasks: Vec::new(),
            },
            service_tokens: server
                .service_token
                .iter()
                .chain(&server.accepted_service_tokens)
                .cloned()
                .collect(),
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

    /// Publishes what `outbox` holds on the bus, in the background until the rest of the
    /// work has stopped (then one last pass).
    pub fn relay(&mut self, outbox: &Outbox, db: DatabaseConnection) {
        let stop = self.stop.stop_relays.subscribe();
        let relay = outbox.spawn_relay(db, self.bus.clone(), stop);
        self.stop.relays.push(relay);
    }

    /// Runs the durable consumer `name` on `filter` in the background until `stopped`,
    /// handing `handler` up to `batch` waiting events at once ([`spawn_consumer`]).
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
            self.stopped.clone(),
        );
        self.track(consumer);
    }

    /// A background task the process waits for when it stops (it ends at `shutdown` or at
    /// `stopped`).
    pub fn track(&mut self, task: JoinHandle<()>) {
        self.stop.tasks.push(task);
    }

    pub fn into_parts(self) -> HostParts {
        HostParts {
            bus: self.bus,
            cache: self.cache,
            services: self.services,
            shutdown: self.shutdown,
            service_tokens: self.service_tokens,
            stop: self.stop,
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
