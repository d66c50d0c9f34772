//! Hosting gRPC services: the pieces every Kiln process needs around its services (the bus,
//! the API-key cache kept honest by identity events, page tokens) and the server itself.
//! A service's own binary hosts one service; `kiln dev` hosts them all in one.

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_core::auth::{AuthCache, AuthLayer, Authenticator};
use kiln_core::config::ServerConfig;
use kiln_core::page::PageTokens;
use kiln_core::server::ServiceSet;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::EventBus;

/// Shared plumbing for the services of one process.
pub struct Host {
    pub bus: Arc<dyn EventBus>,
    pub cache: Arc<AuthCache>,
    pub pages: PageTokens,
    pub services: ServiceSet,
    pub shutdown: watch::Receiver<bool>,
    service_token: Option<String>,
    tasks: Vec<JoinHandle<()>>,
}

/// A host that is serving.
pub struct Served {
    pub local_addr: SocketAddr,
    /// Ends when the server has stopped and background tasks have finished.
    pub done: JoinHandle<Result<(), String>>,
}

impl Host {
    pub fn new(
        server: &ServerConfig,
        bus: Arc<dyn EventBus>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            bus,
            cache: Arc::new(AuthCache::new(server.auth_cache_ttl())),
            pages: PageTokens::new(page_secret(server).as_bytes()),
            services: ServiceSet::new(),
            shutdown,
            service_token: server.service_token.clone(),
            tasks: Vec::new(),
        }
    }

    /// A background task that ends at shutdown (an outbox relay, a consumer).
    pub fn track(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// Starts serving every added service on `listener`, authenticating through
    /// `authenticator`, until shutdown.
    pub async fn serve(
        self,
        listener: TcpListener,
        authenticator: Arc<dyn Authenticator>,
    ) -> Result<Served, crate::Error> {
        let Host {
            bus,
            cache,
            services,
            shutdown,
            service_token,
            tasks,
            ..
        } = self;
        let invalidation =
            crate::auth_cache::spawn_invalidation(bus, cache.clone(), shutdown.clone()).await?;
        let auth = AuthLayer::new(authenticator, cache, service_token.as_deref());
        let local_addr = listener
            .local_addr()
            .map_err(|e| crate::Error::Handler(format!("listener: {e}")))?;
        let mut stop = shutdown;
        let done = tokio::spawn(async move {
            let result = kiln_core::server::serve(listener, services, auth, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
            invalidation.abort();
            for task in tasks {
                let _ = task.await;
            }
            result.map_err(|e| format!("gRPC server: {e}"))
        });
        Ok(Served { local_addr, done })
    }
}

impl Host {
    /// Serves on `listen` until `stop` resolves, then shuts down cleanly: what a service's own
    /// binary does. `on_ready` hears the bound address.
    pub async fn run_until(
        self,
        listen: SocketAddr,
        authenticator: Arc<dyn Authenticator>,
        stop: impl std::future::Future<Output = ()>,
        stop_tx: watch::Sender<bool>,
        on_ready: impl FnOnce(SocketAddr),
    ) -> Result<(), String> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let served = self
            .serve(listener, authenticator)
            .await
            .map_err(|e| e.to_string())?;
        on_ready(served.local_addr);
        stop.await;
        let _ = stop_tx.send(true);
        served.done.await.map_err(|e| e.to_string())?
    }
}

/// The page-token signing secret: configured, else derived from the service token, else a
/// per-process random one (tokens then do not survive a restart).
pub fn page_secret(server: &ServerConfig) -> String {
    if let Some(secret) = &server.page_token_secret {
        return secret.clone();
    }
    if let Some(token) = &server.service_token {
        return format!("page-tokens:{token}");
    }
    uuid::Uuid::new_v4().to_string()
}
