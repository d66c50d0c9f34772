//! `serve(roles)`: runs the named services in one process on one gRPC server and reaches the
//! others remotely. `kiln dev` serves them all; `kiln serve registry` serves one.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use kiln_core::auth::{AuthLayer, Authenticator};
use kiln_core::server::service_channel;
use kiln_events::EventBus;
use kiln_events::host::Host;
use kiln_proto::billing::v1::quota_service_client::QuotaServiceClient;
use kiln_proto::identity::v1::auth_service_client::AuthServiceClient;
use kiln_proto::scheduler::v1::node_service_client::NodeServiceClient;
use kiln_scheduler::catalog::RemoteRegistry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::KilnConfig;
use crate::links::{BillingLink, LocalScheduler, RegistryLink};
use crate::roles::{Role, Roles};

/// A process serving its services.
pub struct Running {
    pub addr: SocketAddr,
    /// The bootstrap admin key when identity runs here and this start created it (the first
    /// start on this state).
    pub new_admin_key: Option<String>,
    pub bus: Arc<dyn EventBus>,
    /// Billing, when it runs here (tests replay events into its ledger).
    pub billing: Option<kiln_billing::Billing>,
    /// The inference engine, when inference runs here (benchmarks call its models in
    /// process beside the served path).
    pub engine: Option<Arc<kiln_inference::engine::Engine>>,
    /// Where `GET /metrics` answers, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the HTTP edge answers, when the gateway runs here.
    pub gateway_addr: Option<SocketAddr>,
    /// The same services called in process: every layer of a network call (trace context,
    /// metrics, auth), no transport (the HTTP edge here calls these).
    pub local: kiln_core::server::LocalService,
    stop: watch::Sender<bool>,
    done: JoinHandle<Result<(), String>>,
}

impl Running {
    /// Tells the process to stop, without waiting (a test's node dying).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops serving and waits for background work (outbox relays, consumers) to finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.done.await?.map_err(anyhow::Error::msg)
    }
}

/// Starts `roles` on `listener`. `bus` overrides the configured one (tests share theirs).
pub async fn serve(
    roles: Roles,
    config: &KilnConfig,
    listener: TcpListener,
    bus: Option<Arc<dyn EventBus>>,
) -> anyhow::Result<Running> {
    config.check_roles(roles)?;
    let config = &with_edge_credential(config, roles);
    let server = &config.server;
    // TLS files are read (and refused, naming the key) before anything starts.
    kiln_core::tls::trust_configured(server)?;
    let tls = kiln_core::tls::server_config(server)?;
    let addr = listener.local_addr().context("listener address")?;
    let bus = match bus {
        Some(bus) => bus,
        None => kiln_events::connect_bus(server).await?,
    };
    let token = server.service_token.as_deref().unwrap_or_default();
    let peer = |key: &str, url: &Option<String>| {
        service_channel(key, url.as_deref().unwrap_or_default(), token)
    };
    let (stop, shutdown) = watch::channel(false);
    let metrics_addr = match server.metrics_listen {
        Some(listen) => Some(serve_metrics(listen, stop.subscribe()).await?),
        None => None,
    };
    let mut host = Host::new(server, bus.clone(), shutdown);

    let mut new_admin_key = None;
    let mut identity = None;
    if roles.has(Role::Identity) {
        let (opened, key) = kiln_identity::open(&config.identity, &mut host).await?;
        identity = Some(opened);
        new_admin_key = key;
    }
    let registry = match roles.has(Role::Registry) {
        true => Some(kiln_registry::open(&config.registry, &mut host).await?),
        false => None,
    };
    let billing = match roles.has(Role::Billing) {
        true => Some(kiln_billing::open(&config.billing, &mut host).await?),
        false => None,
    };
    // The registry as the scheduler and the node read it (None: neither runs here).
    let registry_link = match (
        &registry,
        roles.has(Role::Scheduler) || roles.has(Role::Inference),
    ) {
        (_, false) => None,
        (Some(registry), true) => Some(Arc::new(RegistryLink::Local(registry.clone()))),
        (None, true) => Some(Arc::new(RegistryLink::Remote(Box::new(
            RemoteRegistry::new(peer("registry_url", &server.registry_url)?),
        )))),
    };
    // None: quotas are not enforced (a process without billing, told so).
    let billing_link = match (&billing, &server.billing_url) {
        (Some(billing), _) => Some(Arc::new(BillingLink::Local(billing.clone()))),
        (None, Some(_)) => Some(Arc::new(BillingLink::Remote(QuotaServiceClient::new(
            peer("billing_url", &server.billing_url)?,
        )))),
        (None, None) => None,
    };
    let scheduler = if roles.has(Role::Scheduler) {
        let quotas = billing_link
            .clone()
            .map(|b| b as Arc<dyn kiln_scheduler::quota::QuotaGate>);
        let catalog = registry_link.clone().context("the registry link")?;
        Some(kiln_scheduler::open(&config.scheduler, &mut host, catalog, quotas).await?)
    } else {
        None
    };
    let mut engine = None;
    if roles.has(Role::Inference) {
        let mut inference_config = config.inference.clone();
        if let Some(registry) = &registry {
            use_fetched_onnxruntime(&mut inference_config, registry);
        }
        let link: Option<Arc<dyn kiln_inference::node::SchedulerLink>> = match &scheduler {
            Some(scheduler) => Some(Arc::new(LocalScheduler(scheduler.clone()))),
            None if inference_config.scheduler_url.is_empty() => None,
            None => Some(Arc::new(NodeServiceClient::new(service_channel(
                "inference.scheduler_url",
                &inference_config.scheduler_url,
                token,
            )?))),
        };
        let scheduling = link.map(|link| kiln_inference::Scheduling {
            address: advertised_url(&inference_config, addr, tls.is_some()),
            link,
        });
        let limits = billing_link.map(|b| b as Arc<dyn kiln_inference::limits::LimitSource>);
        let source = registry_link.clone().context("the registry link")?;
        let inference =
            kiln_inference::open(&inference_config, &mut host, source, scheduling, limits).await?;
        kiln_inference::preload(&inference, inference_config.preload.clone());
        engine = Some(inference.engine().clone());
    }
    if config.import_library
        && let (Some(registry), Some(scheduler)) = (&registry, &scheduler)
    {
        crate::library::import_in_background(registry.clone(), scheduler.clone());
    }
    // Identity in this process answers key checks from its tables, unless told to delegate to
    // another identity (a replica of a larger deployment).
    let authenticator: Arc<dyn Authenticator> = match (identity, &server.identity_url) {
        (Some(identity), None) => Arc::new(identity),
        (_, url) => Arc::new(AuthServiceClient::new(peer("identity_url", url)?)),
    };
    let grace = server.shutdown_grace;
    let (done, local) = serve_host(host, listener, authenticator, tls, grace).await?;
    let gateway_addr = match roles.has(Role::Gateway) {
        true => Some(serve_gateway(config, local.clone(), stop.subscribe()).await?),
        false => None,
    };
    tracing::info!(%addr, services = %roles, "Kiln serving");
    Ok(Running {
        addr,
        new_admin_key,
        bus,
        billing,
        engine,
        metrics_addr,
        gateway_addr,
        local,
        stop,
        done,
    })
}

/// The edge signs and does the transfers of its signed URLs with the service credential; an
/// edge beside the whole API in one process without one gets a random credential of its own.
fn with_edge_credential(config: &KilnConfig, roles: Roles) -> KilnConfig {
    let mut config = config.clone();
    if roles.has(Role::Gateway)
        && !config.gateway.unreached().is_empty()
        && config.server.service_token.is_none()
    {
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        config.server.service_token = Some(token);
    }
    config
}

/// Starts the HTTP edge on `gateway.listen`, transcoding to the gRPC API at the gateway's URLs
/// or to this process's services, called in process; it stops with the process.
async fn serve_gateway(
    config: &KilnConfig,
    local: kiln_core::server::LocalService,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let gateway = &config.gateway;
    let listener = TcpListener::bind(gateway.listen)
        .await
        .with_context(|| format!("gateway.listen {}", gateway.listen))?;
    let local = kiln_gateway::Upstream::Local(local);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let service_token = config.server.service_token.as_deref();
    let running = kiln_gateway::serve(gateway, listener, local, service_token, stopped).await?;
    Ok(running.addr)
}

/// Serves `GET /metrics` on `listen` until `stop`; gives the bound address.
async fn serve_metrics(
    listen: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics_listen {listen}"))?;
    let addr = listener.local_addr().context("metrics listener address")?;
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(err) = kiln_core::metrics::serve(listener, stopped).await {
            tracing::warn!(%err, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%addr, "metrics on /metrics");
    Ok(addr)
}

/// Serves the host's gRPC services (behind the trace and auth layers, with health and
/// reflection) until shutdown, then waits for its background tasks. Also gives the same
/// services to call in process.
async fn serve_host(
    host: Host,
    listener: TcpListener,
    authenticator: Arc<dyn Authenticator>,
    tls: Option<kiln_core::tls::ServerTlsConfig>,
    grace: std::time::Duration,
) -> anyhow::Result<(
    JoinHandle<Result<(), String>>,
    kiln_core::server::LocalService,
)> {
    let parts = host.into_parts();
    let invalidation = kiln_events::auth_cache::spawn_invalidation(
        parts.bus,
        parts.cache.clone(),
        parts.shutdown.clone(),
    )
    .await?;
    let tokens: Vec<&str> = parts.service_tokens.iter().map(String::as_str).collect();
    let auth = AuthLayer::new(authenticator, parts.cache, &tokens);
    let mut stop = parts.shutdown;
    let services = parts.services;
    let local = services.local(auth.clone());
    let background = parts.stop;
    let done = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let result = kiln_core::server::serve(listener, services, auth, tls, stopped, grace).await;
        invalidation.abort();
        background.run().await;
        result.map_err(|e| format!("gRPC server: {e}"))
    });
    Ok((done, local))
}

/// Where other nodes reach this one: `advertise_url`, else `http://` (`https://` when it
/// serves TLS) + the bound address (an unspecified IP replaced by the loopback one).
fn advertised_url(
    config: &kiln_inference::config::InferenceConfig,
    addr: SocketAddr,
    tls: bool,
) -> String {
    if !config.advertise_url.is_empty() {
        return config.advertise_url.clone();
    }
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", kiln_core::server::reachable(addr))
}

/// With the registry in process, a node without a configured ONNX Runtime library uses the
/// one `deploy/fetch-assets.sh` put beside the models.
fn use_fetched_onnxruntime(
    config: &mut kiln_inference::config::InferenceConfig,
    registry: &kiln_registry::Registry,
) {
    if !config.ort_dylib_path.is_empty() || std::env::var_os("ORT_DYLIB_PATH").is_some() {
        return;
    }
    let fetched = kiln_registry::asset_dir(registry.config()).join("onnxruntime/libonnxruntime.so");
    if fetched.is_file() {
        config.ort_dylib_path = fetched.display().to_string();
    }
}
