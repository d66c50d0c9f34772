//! Every Kiln service in one process on one address: `kiln dev`, and what the testkit starts.

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_core::auth::Principal;
use kiln_events::EventBus;
use kiln_events::host::Host;
use kiln_proto::registry::v1::{DownloadModelFilesRequest, Model};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::KilnConfig;

/// The registry in the same process, as the inference node's model source.
struct LocalRegistry(kiln_registry::Registry);

#[async_trait::async_trait]
impl kiln_inference::source::ModelSource for LocalRegistry {
    async fn get_model(&self, name: &str) -> kiln_inference::Result<Model> {
        self.0
            .get_model(&Principal::service(), name)
            .await
            .map_err(|e| kiln_inference::Error::Remote(e.into()))
    }

    async fn download(
        &self,
        name: &str,
        bundle_precision: Option<i32>,
    ) -> kiln_inference::Result<kiln_inference::source::FileStream> {
        use futures::StreamExt;
        let request = DownloadModelFilesRequest {
            name: name.to_owned(),
            bundle_precision,
            ..Default::default()
        };
        let stream = self
            .0
            .download_model_files(&Principal::service(), request)
            .await
            .map_err(|e| kiln_inference::Error::Remote(e.into()))?;
        Ok(stream
            .map(|piece| piece.map_err(|e| kiln_inference::Error::Remote(e.into())))
            .boxed())
    }
}

/// The registry in the same process, as the scheduler's model catalog.
struct LocalCatalog(kiln_registry::Registry);

#[async_trait::async_trait]
impl kiln_scheduler::catalog::ModelCatalog for LocalCatalog {
    async fn get_model(&self, name: &str) -> kiln_scheduler::Result<Model> {
        self.0
            .get_model(&Principal::service(), name)
            .await
            .map_err(|e| kiln_scheduler::Error::Remote(e.into()))
    }
}

/// Billing in the same process, as the scheduler's quota gate.
struct LocalQuotas(kiln_billing::Billing);

#[async_trait::async_trait]
impl kiln_scheduler::quota::QuotaGate for LocalQuotas {
    async fn limits(
        &self,
        account: &str,
    ) -> kiln_scheduler::Result<kiln_scheduler::quota::QuotaLimits> {
        let values = self
            .0
            .quota_values(account)
            .await
            .map_err(|e| kiln_scheduler::Error::Remote(e.into()))?;
        Ok(kiln_scheduler::quota::QuotaLimits(
            values.into_iter().collect(),
        ))
    }
}

/// Billing in the same process, as the node's source of rate limits.
struct LocalLimits(kiln_billing::Billing);

#[async_trait::async_trait]
impl kiln_inference::limits::LimitSource for LocalLimits {
    async fn limits(
        &self,
        account: &str,
    ) -> kiln_inference::Result<kiln_inference::limits::Limits> {
        let values: std::collections::HashMap<String, i64> = self
            .0
            .quota_values(account)
            .await
            .map_err(|e| kiln_inference::Error::Remote(e.into()))?
            .into_iter()
            .collect();
        let value = |quota: &str| values.get(quota).copied().unwrap_or(0);
        Ok(kiln_inference::limits::Limits {
            requests_per_minute: value(kiln_inference::limits::RPM_QUOTA),
            tokens_per_minute: value(kiln_inference::limits::TPM_QUOTA),
        })
    }
}

/// The scheduler in the same process, as the local node's link.
struct LocalScheduler(kiln_scheduler::Scheduler);

#[async_trait::async_trait]
impl kiln_inference::node::SchedulerLink for LocalScheduler {
    async fn open(
        &self,
        outbound: tokio::sync::mpsc::Receiver<kiln_proto::scheduler::v1::NodeMessage>,
    ) -> kiln_inference::Result<kiln_inference::node::SchedulerStream> {
        use futures::StreamExt;
        let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound).map(Ok);
        self.0
            .connect(&Principal::service(), outbound.boxed())
            .await
            .map_err(|e| kiln_inference::Error::Remote(e.into()))
    }
}

/// Puts each public model of the library on a shared serverless deployment (once: later
/// starts find them there).
async fn serve_library(scheduler: &kiln_scheduler::Scheduler, models: &[&str]) {
    for model in models {
        let id = model.rsplit('/').next().unwrap_or_default().to_owned();
        let deployment = kiln_proto::scheduler::v1::Deployment {
            base_model: (*model).to_owned(),
            min_replica_count: 1,
            ..Default::default()
        };
        match scheduler
            .create_deployment(
                &Principal::service(),
                &format!("accounts/{}", kiln_core::names::SYSTEM_ACCOUNT),
                id,
                deployment,
                false,
                false,
            )
            .await
        {
            Ok(d) => tracing::info!(deployment = %d.name, "serverless deployment created"),
            Err(kiln_scheduler::Error::Api(kiln_core::Error::AlreadyExists { .. })) => {}
            Err(err) => tracing::warn!(model, %err, "cannot deploy the library model"),
        }
    }
}

/// A running mesh.
pub struct Mesh {
    pub addr: SocketAddr,
    /// The bootstrap admin key when this start created it (first start on this state).
    pub new_admin_key: Option<String>,
    pub bus: Arc<dyn EventBus>,
    /// The mesh's billing (tests replay events into its ledger).
    pub billing: kiln_billing::Billing,
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
        let billing = kiln_billing::open(&config.server, &config.billing, &mut host).await?;
        let scheduler = kiln_scheduler::open(
            &config.server,
            &config.scheduler,
            &mut host,
            Arc::new(LocalCatalog(registry.clone())),
            Some(Arc::new(LocalQuotas(billing.clone()))),
        )
        .await?;
        let mut inference_config = config.inference.clone();
        if inference_config.ort_dylib_path.is_empty()
            && std::env::var_os("ORT_DYLIB_PATH").is_none()
        {
            // The library deploy/fetch-assets.sh puts beside the models.
            let fetched = kiln_registry::library::asset_dir(&config.registry)
                .join("onnxruntime/libonnxruntime.so");
            if fetched.is_file() {
                inference_config.ort_dylib_path = fetched.display().to_string();
            }
        }
        let inference = kiln_inference::open(
            &config.server,
            &inference_config,
            &mut host,
            Arc::new(LocalRegistry(registry.clone())),
            Some(kiln_inference::Scheduling {
                address: match inference_config.advertise_url.as_str() {
                    "" => format!("http://{}", listener.local_addr()?),
                    url => url.to_owned(),
                },
                link: Arc::new(LocalScheduler(scheduler.clone())),
            }),
            Some(Arc::new(LocalLimits(billing.clone()))),
        )
        .await?;
        if config.import_library {
            // In the background: the server answers while the library's files copy in; then
            // the public models the library holds go on serverless deployments, which the
            // local node serves.
            tokio::spawn(async move {
                match registry.import_library().await {
                    Ok(_) => {
                        let mut present = Vec::new();
                        for name in [
                            kiln_registry::library::EMBEDDING_MODEL,
                            kiln_registry::library::CHAT_MODEL,
                        ] {
                            if registry
                                .get_model(&Principal::service(), name)
                                .await
                                .is_ok()
                            {
                                present.push(name);
                            }
                        }
                        serve_library(&scheduler, &present).await;
                    }
                    Err(err) => tracing::warn!(%err, "importing the public library failed"),
                }
            });
        }
        kiln_inference::preload(&inference, inference_config.preload);
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
            billing,
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
