//! Every Kiln service in one process on one address: `kiln dev`, and what the testkit starts.

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_events::EventBus;
use kiln_events::host::Host;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::KilnConfig;

/// A running mesh.
pub struct Mesh {
    pub addr: SocketAddr,
    /// The bootstrap admin key when this start created it (first start on this state).
    pub new_admin_key: Option<String>,
    pub bus: Arc<dyn EventBus>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<Result<(), String>>,
}

impl Mesh {
    /// Starts the mesh on `listener`. `bus` overrides the configured one (tests pass theirs).
    pub async fn start(
        config: &KilnConfig,
        listener: TcpListener,
        bus: Option<Arc<dyn EventBus>>,
    ) -> anyhow::Result<Self> {
        let bus = match bus {
            Some(bus) => bus,
            None => kiln_events::connect_bus(&config.server).await?,
        };
        let (stop, shutdown) = watch::channel(false);
        let mut host = Host::new(&config.server, bus.clone(), shutdown);
        let (identity, new_admin_key) =
            kiln_identity::open(&config.server, &config.identity, &mut host).await?;
        let registry = kiln_registry::open(&config.server, &config.registry, &mut host).await?;
        if config.import_library {
            // In the background: the server answers while the library's files copy in.
            tokio::spawn(async move {
                if let Err(err) = registry.import_library().await {
                    tracing::warn!(%err, "importing the public library failed");
                }
            });
        }
        // A mesh that is told where identity lives delegates key checks to it (a replica of
        // a larger deployment); otherwise its own identity answers from its tables.
        let authenticator: Arc<dyn kiln_core::auth::Authenticator> =
            match &config.server.identity_url {
                Some(url) => {
                    let token = config.server.service_token.as_deref().ok_or_else(|| {
                        anyhow::anyhow!("service_token is required when identity_url is set")
                    })?;
                    Arc::new(kiln_core::auth_client::RemoteAuthenticator::new(
                        url, token,
                    )?)
                }
                None => Arc::new(identity),
            };
        let served = host.serve(listener, authenticator).await?;
        Ok(Self {
            addr: served.local_addr,
            new_admin_key,
            bus,
            stop,
            done: served.done,
        })
    }

    /// Stops serving and waits for background work (outbox relays) to finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.done.await?.map_err(anyhow::Error::msg)
    }
}
