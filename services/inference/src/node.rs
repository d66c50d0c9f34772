//! The node agent and router. The agent keeps one stream to the scheduler: it registers the
//! node's accelerators and backends, loads and unloads replicas as assigned, reports their
//! state and load in heartbeats, and keeps the routing table the scheduler pushes. The router
//! turns a request's model string (a model, a deployed model, or `model#deployment`) into a
//! replica: served here when this node holds a ready one, else forwarded to the node that
//! does (least loaded from this node's view); a deployment with no ready replica holds the
//! request (bounded) while the scheduler starts one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_core::names::ChildName;
use kiln_core::telemetry::OutgoingInterceptor;
use kiln_proto::common::v1::{AcceleratorType, Status as ResourceStatus};
use kiln_proto::scheduler::v1::{
    Accelerator, AssignmentAck, Backend as BackendInfo, DeploymentDemand, LoadAddon, LoadReplica,
    NodeHeartbeat, NodeMessage, RegisterNode, Replica, ReplicaHeartbeat, ReplicaLoad,
    ReplicaStateReport, Route, RoutingTable, SchedulerMessage, assignment, node_message,
    node_service_client::NodeServiceClient, replica, scheduler_message,
};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use crate::config::InferenceConfig;
use crate::engine::{Engine, LoadedModel};
use crate::error::{Error, Result};

/// The header a forwarded request carries, so the node it reaches serves it or fails, and
/// never forwards it again.
pub const FORWARDED_HEADER: &str = "kiln-forwarded";

pub type SchedulerStream = BoxStream<'static, Result<SchedulerMessage, Status>>;

/// How a node reaches the scheduler: over gRPC, or in process (`kiln dev`).
#[async_trait]
pub trait SchedulerLink: Send + Sync + 'static {
    /// Opens the node's stream: `outbound` carries what the node says (RegisterNode first).
    async fn open(&self, outbound: mpsc::Receiver<NodeMessage>) -> Result<SchedulerStream>;
}

/// The scheduler over gRPC.
pub struct RemoteScheduler {
    client: NodeServiceClient<InterceptedService<Channel, OutgoingInterceptor>>,
}

impl RemoteScheduler {
    pub fn new(url: &str, service_token: &str) -> Result<Self> {
        let channel = kiln_core::server::endpoint(url)
            .map_err(|e| Error::Startup(format!("scheduler_url: {e}")))?
            .connect_lazy();
        let interceptor = OutgoingInterceptor::new(Some(service_token))?;
        Ok(Self {
            client: NodeServiceClient::with_interceptor(channel, interceptor),
        })
    }
}

#[async_trait]
impl SchedulerLink for RemoteScheduler {
    async fn open(&self, outbound: mpsc::Receiver<NodeMessage>) -> Result<SchedulerStream> {
        let stream = self
            .client
            .clone()
            .connect(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await
            .map_err(Error::Remote)?
            .into_inner();
        Ok(stream.boxed())
    }
}

/// A replica this node holds.
struct Held {
    replica: Replica,
    /// The folders of its loaded addons (`replica.loaded_addons` names them).
    addon_dirs: HashMap<String, std::path::PathBuf>,
    in_flight: Arc<AtomicI32>,
    served: Arc<AtomicU64>,
    /// `served` at the previous heartbeat, and when that was.
    last_served: (u64, Instant),
}

/// Counts a request on a replica while it lives.
pub struct InFlight {
    count: Arc<AtomicI32>,
}

impl InFlight {
    fn new(count: Arc<AtomicI32>, served: &AtomicU64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        served.fetch_add(1, Ordering::Relaxed);
        Self { count }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which deployed model and replica answer a request, for its usage record.
#[derive(Debug, Clone, Default)]
pub struct RouteRef {
    pub deployed_model: String,
    pub deployment: String,
    pub deployment_type: i32,
    pub replica: String,
}

/// A request served on this node.
pub struct Served {
    pub model: Arc<LoadedModel>,
    pub route: Option<RouteRef>,
    /// Held until the answer is complete (streams keep it to their end).
    pub in_flight: Option<InFlight>,
}

/// Where a request goes.
pub enum Target {
    Local(Served),
    /// Another node's gRPC server; the guard counts the forward against that replica.
    Remote(Channel, InFlight),
}

/// The node: its replicas, the routing table, its way to other nodes.
pub struct Node {
    engine: Arc<Engine>,
    pub name: String,
    node_id: String,
    address: String,
    accelerators: Vec<Accelerator>,
    labels: HashMap<String, String>,
    cold_start_timeout: Duration,
    max_waiting: usize,
    replicas: std::sync::Mutex<HashMap<String, Held>>,
    routes: watch::Sender<Arc<RoutingTable>>,
    outbound: std::sync::Mutex<Option<mpsc::Sender<NodeMessage>>>,
    peers: std::sync::Mutex<HashMap<String, Channel>>,
    /// Requests this node forwards now, per replica (its view of remote load).
    forwarded: std::sync::Mutex<HashMap<String, Arc<AtomicI32>>>,
    /// Requests waiting for a deployment with no ready replica.
    waiting: std::sync::Mutex<HashMap<String, usize>>,
}

impl Node {
    /// A node named `node_id` (empty: the host name) reachable at `address`.
    pub fn new(engine: Arc<Engine>, config: &InferenceConfig, address: String) -> Arc<Self> {
        let node_id = if config.node_id.is_empty() {
            host_node_id()
        } else {
            config.node_id.clone()
        };
        let (routes, _) = watch::channel(Arc::new(RoutingTable::default()));
        Arc::new(Self {
            engine,
            name: format!("nodes/{node_id}"),
            node_id,
            address,
            accelerators: accelerators(config),
            labels: config.labels.clone().into_iter().collect(),
            cold_start_timeout: Duration::from_millis(config.cold_start_timeout_ms),
            max_waiting: config.max_waiting_requests,
            replicas: Default::default(),
            routes,
            outbound: Default::default(),
            peers: Default::default(),
            forwarded: Default::default(),
            waiting: Default::default(),
        })
    }

    fn send(&self, message: node_message::Payload) {
        let sender = self.outbound.lock().expect("outbound").clone();
        if let Some(sender) = sender {
            let _ = sender.try_send(NodeMessage {
                payload: Some(message),
            });
        }
    }

    fn report(&self, replica: &str, state: replica::State, status: Option<ResourceStatus>) {
        let loaded_addons = self
            .replicas
            .lock()
            .expect("replicas")
            .get(replica)
            .map(|held| held.replica.loaded_addons.clone())
            .unwrap_or_default();
        self.send(node_message::Payload::ReplicaState(ReplicaStateReport {
            replica: replica.to_owned(),
            state: state as i32,
            status,
            time: Some(kiln_core::time::micros_to_timestamp(
                kiln_core::time::now_micros(),
            )),
            loaded_addons,
        }));
    }

    fn set_state(&self, replica: &str, state: replica::State) -> bool {
        let mut replicas = self.replicas.lock().expect("replicas");
        match replicas.get_mut(replica) {
            Some(held) => {
                held.replica.state = state as i32;
                if state == replica::State::Ready {
                    held.replica.ready_time = Some(kiln_core::time::micros_to_timestamp(
                        kiln_core::time::now_micros(),
                    ));
                }
                true
            }
            None => false,
        }
    }

    fn register_message(&self) -> RegisterNode {
        let backends = self
            .engine
            .backends()
            .names()
            .into_iter()
            .map(|name| {
                let why = self
                    .engine
                    .backends()
                    .get(name)
                    .and_then(|b| b.unavailable(self.engine.device()));
                BackendInfo {
                    name: name.to_owned(),
                    available: why.is_none(),
                    message: why.unwrap_or_default(),
                    accelerator_types: self.accelerators.iter().map(|a| a.r#type).collect(),
                }
            })
            .collect();
        RegisterNode {
            node_id: self.node_id.clone(),
            address: self.address.clone(),
            accelerators: self.accelerators.clone(),
            backends,
            labels: self.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            training_enabled: false,
            replicas: self
                .replicas
                .lock()
                .expect("replicas")
                .values()
                .map(|h| h.replica.clone())
                .collect(),
        }
    }

    fn heartbeat(&self) -> NodeHeartbeat {
        let mut replicas = self.replicas.lock().expect("replicas");
        let now = Instant::now();
        let beats = replicas
            .values_mut()
            .map(|held| {
                let served = held.served.load(Ordering::Relaxed);
                let (before, at) = held.last_served;
                let seconds = now.duration_since(at).as_secs_f32().max(1e-3);
                held.last_served = (served, now);
                ReplicaHeartbeat {
                    replica: held.replica.name.clone(),
                    state: held.replica.state,
                    load: Some(ReplicaLoad {
                        in_flight_requests: held.in_flight.load(Ordering::Relaxed),
                        requests_per_second: (served - before) as f32 / seconds,
                        ..Default::default()
                    }),
                    loaded_addons: held.replica.loaded_addons.clone(),
                }
            })
            .collect();
        NodeHeartbeat {
            time: Some(kiln_core::time::micros_to_timestamp(
                kiln_core::time::now_micros(),
            )),
            replicas: beats,
        }
    }

    /// Loads an assigned replica's model (in the background) and reports how it went.
    fn load_replica(self: &Arc<Self>, load: LoadReplica) {
        {
            let mut replicas = self.replicas.lock().expect("replicas");
            if replicas.contains_key(&load.replica) {
                return; // a repeated delivery
            }
            replicas.insert(
                load.replica.clone(),
                Held {
                    replica: Replica {
                        name: load.replica.clone(),
                        deployment: load.deployment.clone(),
                        model: load.model.clone(),
                        node: self.name.clone(),
                        backend: load.backend.clone(),
                        precision: load.precision,
                        accelerator_type: load.accelerator_type,
                        accelerator_count: load.accelerator_indices.len() as i32,
                        accelerator_indices: load.accelerator_indices.clone(),
                        state: replica::State::DownloadingModel as i32,
                        ..Default::default()
                    },
                    addon_dirs: HashMap::new(),
                    in_flight: Default::default(),
                    served: Default::default(),
                    last_served: (0, Instant::now()),
                },
            );
        }
        self.report(&load.replica, replica::State::DownloadingModel, None);
        let node = self.clone();
        tokio::spawn(async move {
            let loaded = node
                .engine
                .model_on(&Principal::service(), "model", &load.model, &load.backend)
                .await;
            match loaded {
                Ok(_) => {
                    if node.set_state(&load.replica, replica::State::Ready) {
                        tracing::info!(replica = %load.replica, model = %load.model, "replica ready");
                        node.report(&load.replica, replica::State::Ready, None);
                    }
                }
                Err(err) => {
                    let status = Status::from(err);
                    tracing::warn!(replica = %load.replica, error = %status.message(), "replica failed to load");
                    node.replicas
                        .lock()
                        .expect("replicas")
                        .remove(&load.replica);
                    node.report(
                        &load.replica,
                        replica::State::Failed,
                        Some(ResourceStatus {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        }),
                    );
                }
            }
        });
    }

    /// Stops taking requests for a replica, lets its in-flight ones finish (up to `drain`),
    /// and unloads its model when no other replica here uses it.
    fn unload_replica(self: &Arc<Self>, name: String, drain: Duration) {
        let Some(held) = self.replicas.lock().expect("replicas").remove(&name) else {
            return;
        };
        let node = self.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + drain;
            while held.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let still_used = node.replicas.lock().expect("replicas").values().any(|h| {
                h.replica.model == held.replica.model && h.replica.backend == held.replica.backend
            });
            if !still_used {
                node.engine
                    .unload(&held.replica.model, &held.replica.backend)
                    .await;
            }
            for dir in held.addon_dirs.values() {
                node.release_addon_files(dir);
            }
            tracing::info!(replica = %name, "replica unloaded");
            node.report(&name, replica::State::Stopped, None);
        });
    }

    /// Fetches an addon's files for a replica (verified, into the model cache) and lists it
    /// among the replica's loaded addons; the ack says whether it could. Serving requests
    /// through the addon's weights is the LoRA serving work's; until then a request naming
    /// the addon is refused by the engine, never answered by the bare base.
    fn load_addon(self: &Arc<Self>, id: String, load: LoadAddon) {
        let base = {
            let replicas = self.replicas.lock().expect("replicas");
            match replicas.get(&load.replica) {
                Some(held) if held.replica.loaded_addons.contains(&load.addon) => {
                    drop(replicas);
                    self.ack(id, Ok(()));
                    return;
                }
                Some(held) => held.replica.model.clone(),
                None => {
                    drop(replicas);
                    self.ack(
                        id,
                        Err(format!("{} is not held by this node", load.replica)),
                    );
                    return;
                }
            }
        };
        let node = self.clone();
        tokio::spawn(async move {
            let fetched = node.engine.fetch_addon(&load.addon, &base).await;
            let outcome = match fetched {
                Ok(dir) => {
                    let mut replicas = node.replicas.lock().expect("replicas");
                    match replicas.get_mut(&load.replica) {
                        Some(held) => {
                            if !held.replica.loaded_addons.contains(&load.addon) {
                                held.replica.loaded_addons.push(load.addon.clone());
                            }
                            held.addon_dirs.insert(load.addon.clone(), dir);
                            Ok(())
                        }
                        None => {
                            // Unloaded meanwhile.
                            drop(replicas);
                            node.release_addon_files(&dir);
                            Err(format!("{} was unloaded", load.replica))
                        }
                    }
                }
                Err(err) => Err(Status::from(err).message().to_owned()),
            };
            match &outcome {
                Ok(()) => {
                    tracing::info!(replica = %load.replica, addon = %load.addon, "addon loaded");
                    let state = node
                        .replicas
                        .lock()
                        .expect("replicas")
                        .get(&load.replica)
                        .and_then(|h| replica::State::try_from(h.replica.state).ok());
                    if let Some(state) = state {
                        node.report(&load.replica, state, None);
                    }
                }
                Err(why) => {
                    tracing::warn!(replica = %load.replica, addon = %load.addon, %why, "addon not loaded")
                }
            }
            node.ack(id, outcome);
        });
    }

    fn unload_addon(&self, replica: &str, addon: &str) {
        let (dir, state) = {
            let mut replicas = self.replicas.lock().expect("replicas");
            let Some(held) = replicas.get_mut(replica) else {
                return;
            };
            held.replica.loaded_addons.retain(|a| a != addon);
            (
                held.addon_dirs.remove(addon),
                replica::State::try_from(held.replica.state).ok(),
            )
        };
        if let Some(dir) = dir {
            self.release_addon_files(&dir);
        }
        tracing::info!(replica, addon, "addon unloaded");
        if let Some(state) = state {
            self.report(replica, state, None);
        }
    }

    /// Unpins an addon's files unless another replica here still holds them.
    fn release_addon_files(&self, dir: &std::path::Path) {
        let still_used = self
            .replicas
            .lock()
            .expect("replicas")
            .values()
            .any(|h| h.addon_dirs.values().any(|d| d == dir));
        if !still_used {
            self.engine.release_addon(dir);
        }
    }

    fn ack(&self, id: String, outcome: std::result::Result<(), String>) {
        self.send(node_message::Payload::Ack(AssignmentAck {
            assignment_id: id,
            accepted: outcome.is_ok(),
            status: outcome.err().map(|why| ResourceStatus {
                code: tonic::Code::FailedPrecondition as i32,
                message: why,
            }),
        }));
    }

    fn assignment(self: &Arc<Self>, id: String, action: assignment::Action) {
        let accepted = match action {
            assignment::Action::LoadReplica(load) => {
                self.load_replica(load);
                Ok(())
            }
            assignment::Action::UnloadReplica(unload) => {
                let drain = unload
                    .drain_timeout
                    .map(|d| Duration::from_secs(d.seconds.max(0) as u64))
                    .unwrap_or(Duration::from_secs(30));
                self.unload_replica(unload.replica, drain);
                Ok(())
            }
            assignment::Action::LoadAddon(load) => {
                // Acknowledged once its files are here (or not).
                self.load_addon(id, load);
                return;
            }
            assignment::Action::UnloadAddon(unload) => {
                self.unload_addon(&unload.replica, &unload.addon);
                Ok(())
            }
            assignment::Action::StartFineTuningJob(_)
            | assignment::Action::CancelFineTuningJob(_) => {
                Err("this node does not run fine-tuning jobs".to_owned())
            }
        };
        self.ack(id, accepted);
    }

    /// Keeps the node registered until shutdown: reconnects (with backoff) whenever the
    /// stream ends, telling the scheduler the replicas it still holds.
    pub fn spawn_agent(
        self: &Arc<Self>,
        link: Arc<dyn SchedulerLink>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let (sender, receiver) = mpsc::channel(256);
                let _ = sender
                    .send(NodeMessage {
                        payload: Some(node_message::Payload::Register(node.register_message())),
                    })
                    .await;
                match link.open(receiver).await {
                    Ok(inbound) => {
                        *node.outbound.lock().expect("outbound") = Some(sender);
                        backoff = Duration::from_millis(200);
                        tokio::select! {
                            reason = node.session(inbound) => {
                                tracing::warn!(node = %node.name, reason, "scheduler stream ended; reconnecting");
                            }
                            _ = shutdown.changed() => {}
                        }
                        *node.outbound.lock().expect("outbound") = None;
                    }
                    Err(err) => {
                        tracing::warn!(node = %node.name, %err, "cannot reach the scheduler; retrying")
                    }
                }
                if *shutdown.borrow() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }

    /// Follows one stream until it ends; returns why.
    async fn session(self: &Arc<Self>, mut inbound: SchedulerStream) -> String {
        let mut ticker = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                message = inbound.next() => match message {
                    Some(Ok(SchedulerMessage { payload: Some(payload) })) => match payload {
                        scheduler_message::Payload::Registered(registered) => {
                            let every = registered
                                .heartbeat_interval
                                .map(|d| Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64))
                                .filter(|d| !d.is_zero())
                                .unwrap_or(Duration::from_secs(2));
                            ticker = tokio::time::interval(every);
                            tracing::info!(node = %registered.name, "registered with the scheduler");
                        }
                        scheduler_message::Payload::RoutingTable(table) => {
                            self.routes.send_replace(Arc::new(table));
                        }
                        scheduler_message::Payload::Assignment(a) => {
                            if let Some(action) = a.action {
                                self.assignment(a.assignment_id, action);
                            }
                        }
                    },
                    Some(Ok(_)) => {}
                    Some(Err(status)) => return format!("stream error: {}", status.message()),
                    None => return "stream closed".to_owned(),
                },
                _ = ticker.tick() => {
                    self.send(node_message::Payload::Heartbeat(self.heartbeat()));
                }
            }
        }
    }

    /// The replica a request's model string names, here or on another node.
    pub async fn target(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
        forwarded: bool,
    ) -> Result<Target> {
        let mut routes = self.routes.subscribe();
        let deadline = tokio::time::Instant::now() + self.cold_start_timeout;
        let mut waiting: Option<WaitGuard<'_>> = None;
        loop {
            let table = routes.borrow_and_update().clone();
            let route = find_route(&table, caller, field, name)?;
            if let Some(served) = self.local(route).await? {
                return Ok(Target::Local(served));
            }
            if forwarded {
                return Err(ApiError::Unavailable(format!(
                    "{} no longer serves {name}; retry",
                    self.name
                ))
                .into());
            }
            if let Some(target) = self.remote(route)? {
                return Ok(target);
            }
            if waiting.is_none() {
                waiting = Some(self.wait_for(&route.deployment)?);
            }
            let count = waiting.as_ref().map_or(1, |w| w.count());
            self.send(node_message::Payload::Demand(DeploymentDemand {
                deployment: route.deployment.clone(),
                waiting_requests: count as i32,
            }));
            let deployment = route.deployment.clone();
            match tokio::time::timeout_at(deadline, routes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(ApiError::Unavailable("the node is shutting down".into()).into());
                }
                Err(_) => {
                    return Err(ApiError::Unavailable(format!(
                        "{deployment} has no ready replica after {} s; retry later",
                        self.cold_start_timeout.as_secs()
                    ))
                    .into());
                }
            }
        }
    }

    /// Whether a replica that `caller` may use serves `name` now.
    pub fn is_ready(&self, caller: &Principal, name: &str) -> bool {
        let table = self.routes.borrow().clone();
        find_route(&table, caller, "name", name).is_ok_and(|r| r.replicas.iter().any(|r| r.ready))
    }

    /// The route's replica on this node, if it is ready here.
    async fn local(&self, route: &Route) -> Result<Option<Served>> {
        if route.model != route.base_model {
            // The replica holds the addon's files, but applying LoRA weights is not built
            // yet: answering with the bare base would pass its output off as the addon's.
            return Err(ApiError::FailedPrecondition(format!(
                "{} is LoRA addon {} on {}: its files are loaded, but this node cannot apply \
                 LoRA weights yet; send the request to the base model {}",
                route.deployed_model, route.model, route.deployment, route.base_model
            ))
            .into());
        }
        let held = {
            let replicas = self.replicas.lock().expect("replicas");
            route
                .replicas
                .iter()
                .filter(|r| r.node == self.name)
                .filter_map(|r| replicas.get(&r.replica))
                .filter(|h| h.replica.state == replica::State::Ready as i32)
                .min_by_key(|h| h.in_flight.load(Ordering::Relaxed))
                .map(|h| {
                    (
                        h.replica.name.clone(),
                        h.replica.backend.clone(),
                        InFlight::new(h.in_flight.clone(), &h.served),
                    )
                })
        };
        let Some((replica, backend, guard)) = held else {
            return Ok(None);
        };
        // The replica's model on the backend its deployment asked for.
        let model = self
            .engine
            .model_on(&Principal::service(), "model", &route.base_model, &backend)
            .await?;
        Ok(Some(Served {
            model,
            route: Some(RouteRef {
                deployed_model: route.deployed_model.clone(),
                deployment: route.deployment.clone(),
                deployment_type: route.deployment_type,
                replica,
            }),
            in_flight: Some(guard),
        }))
    }

    /// The least loaded (from this node's view) ready replica elsewhere.
    fn remote(&self, route: &Route) -> Result<Option<Target>> {
        let mut forwarded = self.forwarded.lock().expect("forwarded");
        let best = route
            .replicas
            .iter()
            .filter(|r| r.ready && r.node != self.name)
            .min_by_key(|r| {
                forwarded
                    .get(&r.replica)
                    .map_or(0, |c| c.load(Ordering::Relaxed))
            });
        let Some(best) = best else {
            return Ok(None);
        };
        let count = forwarded.entry(best.replica.clone()).or_default().clone();
        drop(forwarded);
        let channel = {
            let mut peers = self.peers.lock().expect("peers");
            match peers.get(&best.address) {
                Some(channel) => channel.clone(),
                None => {
                    let channel = kiln_core::server::endpoint(&best.address)
                        .map_err(|e| ApiError::Internal(format!("node address: {e}")))?
                        .connect_lazy();
                    peers.insert(best.address.clone(), channel.clone());
                    channel
                }
            }
        };
        let served = AtomicU64::new(0);
        Ok(Some(Target::Remote(channel, InFlight::new(count, &served))))
    }

    fn wait_for(&self, deployment: &str) -> Result<WaitGuard<'_>> {
        let mut waiting = self.waiting.lock().expect("waiting");
        let count = waiting.entry(deployment.to_owned()).or_default();
        if *count >= self.max_waiting {
            return Err(ApiError::ResourceExhausted {
                message: format!(
                    "{deployment} is starting and already holds {count} waiting requests; retry shortly"
                ),
                retry_after: Some(Duration::from_secs(1)),
            }
            .into());
        }
        *count += 1;
        Ok(WaitGuard {
            node: self,
            deployment: deployment.to_owned(),
        })
    }
}

/// A request counted as waiting for a deployment.
struct WaitGuard<'a> {
    node: &'a Node,
    deployment: String,
}

impl WaitGuard<'_> {
    fn count(&self) -> usize {
        self.node
            .waiting
            .lock()
            .expect("waiting")
            .get(&self.deployment)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut waiting = self.node.waiting.lock().expect("waiting");
        if let Some(count) = waiting.get_mut(&self.deployment) {
            *count = count.saturating_sub(1);
        }
    }
}

/// The route a model string names that `caller` may use, else NOT_FOUND.
fn find_route<'t>(
    table: &'t RoutingTable,
    caller: &Principal,
    field: &str,
    name: &str,
) -> Result<&'t Route> {
    if name.is_empty() {
        return Err(ApiError::invalid(field, "is required").into());
    }
    let visible = |route: &Route| {
        route.public
            || route
                .account
                .strip_prefix("accounts/")
                .is_some_and(|a| caller.can_access(a))
    };
    let found = if let Some((model, deployment)) = name.split_once('#') {
        let model = ChildName::parse(field, "models", model, Some(&caller.account))?.to_string();
        let deployment =
            ChildName::parse(field, "deployments", deployment, Some(&caller.account))?.to_string();
        table
            .routes
            .iter()
            .find(|r| r.model == model && r.deployment == deployment && visible(r))
    } else if name.contains("/deployedModels/") {
        let deployed = ChildName::parse(field, "deployedModels", name, None)?.to_string();
        table
            .routes
            .iter()
            .find(|r| r.deployed_model == deployed && visible(r))
    } else {
        let model = ChildName::parse(field, "models", name, None)?.to_string();
        let own = format!("accounts/{}", caller.account);
        let defaults = table
            .routes
            .iter()
            .filter(|r| r.model == model && r.default && visible(r));
        // The caller's own default deployment of the model first, then a shared one.
        let mut best: Option<&Route> = None;
        for route in defaults {
            if route.account == own {
                best = Some(route);
                break;
            }
            best.get_or_insert(route);
        }
        best
    };
    found.ok_or_else(|| ApiError::not_found(name).into())
}

/// What a node offers: its configured accelerators, else its CPU.
fn accelerators(config: &InferenceConfig) -> Vec<Accelerator> {
    if !config.accelerators.is_empty() {
        return config
            .accelerators
            .iter()
            .filter_map(|a| {
                let kind = a.parsed_kind()?;
                Some(Accelerator {
                    r#type: kind as i32,
                    count: a.count,
                    memory_bytes: if a.memory_bytes > 0 {
                        a.memory_bytes
                    } else {
                        default_memory(kind)
                    },
                })
            })
            .collect();
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    vec![Accelerator {
        r#type: AcceleratorType::Cpu as i32,
        count: cores * config.cpu_slots_per_core as i32,
        memory_bytes: default_memory(AcceleratorType::Cpu),
    }]
}

fn default_memory(kind: AcceleratorType) -> i64 {
    const GIB: i64 = 1 << 30;
    match kind {
        AcceleratorType::NvidiaA10080gb | AcceleratorType::NvidiaH10080gb => 80 * GIB,
        AcceleratorType::NvidiaH200141gb => 141 * GIB,
        AcceleratorType::AmdMi300x192gb => 192 * GIB,
        _ => host_memory().unwrap_or(16 * GIB),
    }
}

/// The host's RAM, from /proc/meminfo.
fn host_memory() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The host name as a node ID (lowercased, other characters as '-').
fn host_node_id() -> String {
    let raw = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into());
    let id = kiln_core::names::slugify(raw.trim(), 63);
    if id.is_empty() { "node".into() } else { id }
}

/// Sends `message` to a peer node with the caller's own credentials and trace context.
pub fn forward<T>(request: tonic::Request<T>) -> tonic::Request<T> {
    let (mut metadata, _, message) = request.into_parts();
    metadata.insert(
        FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    tonic::Request::from_parts(metadata, Default::default(), message)
}

/// Whether a request came from another node.
pub fn is_forwarded<T>(request: &tonic::Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
}

/// A peer's failure as the caller sees it: a broken connection (tonic reports the h2 error as
/// UNKNOWN) is UNAVAILABLE, the node that held the replica having gone away.
pub fn peer_status(status: Status) -> Status {
    match status.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled => Status::unavailable(format!(
            "the node serving this request went away: {}",
            status.message()
        )),
        _ => status,
    }
}
