//! The node agent. It keeps one stream to the scheduler: it registers the node's
//! accelerators and backends, loads and unloads replicas (and their addons) as assigned,
//! acknowledges assignments, reports the replicas' state and load in heartbeats, and keeps the
//! routing table the scheduler pushes for the node's [`Router`].

mod addons;
mod host;
mod link;
mod training;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_core::auth::Principal;
use kiln_core::backoff::Backoff;
use kiln_proto::common::v1::{AcceleratorType, Status as ResourceStatus};
use kiln_proto::scheduler::v1::{
    Accelerator, AssignmentAck, Backend as BackendInfo, LoadReplica, NodeHeartbeat, NodeMessage,
    RegisterNode, Replica, ReplicaHeartbeat, ReplicaLoad, ReplicaStateReport, RoutingTable,
    SchedulerMessage, assignment, node_message, replica, scheduler_message,
};
use tokio::sync::{mpsc, watch};
use tonic::Status;

pub use link::{SchedulerLink, SchedulerStream};

use crate::config::InferenceConfig;
use crate::engine::{Engine, Variant};
use crate::replicas::{Held, Replicas};
use crate::router::Router;

/// The node: its replicas, its stream to the scheduler, and the router that serves requests
/// on the replicas by the routing table the stream brings.
pub(crate) struct Node {
    engine: Arc<Engine>,
    pub(crate) name: String,
    node_id: String,
    address: String,
    accelerators: Vec<Accelerator>,
    labels: HashMap<String, String>,
    replicas: Arc<Replicas>,
    routes: watch::Sender<Arc<RoutingTable>>,
    outbound: Arc<Outbound>,
    pub(crate) router: Router,
    /// The fine-tuning jobs it runs, and where their checkpoints go (one per epoch, so that
    /// a job given back to this node after a restart resumes).
    jobs: training::Jobs,
    checkpoints: std::path::PathBuf,
    /// Where it records the tokens its jobs train on (set once the recorder runs).
    pub(crate) usage: std::sync::OnceLock<crate::usage::UsageRecorder>,
    training_enabled: bool,
}

/// The sending side of the current stream to the scheduler, while there is one.
#[derive(Default)]
struct Outbound(Mutex<Option<mpsc::Sender<NodeMessage>>>);

impl Outbound {
    fn set(&self, sender: Option<mpsc::Sender<NodeMessage>>) {
        *self.0.lock().expect("outbound") = sender;
    }

    /// Sends without waiting; a message that finds no stream or a full one is dropped (the
    /// next heartbeat or demand says it again).
    fn send(&self, message: node_message::Payload) {
        let sender = self.0.lock().expect("outbound").clone();
        if let Some(sender) = sender {
            let _ = sender.try_send(NodeMessage {
                payload: Some(message),
            });
        }
    }
}

impl Node {
    /// A node named `node_id` (empty: the host name) reachable at `address`, keeping its
    /// jobs' checkpoints in `checkpoints`.
    pub(crate) fn new(
        engine: Arc<Engine>,
        config: &InferenceConfig,
        address: String,
        checkpoints: std::path::PathBuf,
    ) -> Arc<Self> {
        let node_id = if config.node_id.is_empty() {
            host::host_node_id()
        } else {
            config.node_id.clone()
        };
        let name = format!("nodes/{node_id}");
        let (routes, table) = watch::channel(Arc::new(RoutingTable::default()));
        let replicas = Arc::new(Replicas::default());
        let outbound = Arc::new(Outbound::default());
        let demand = {
            let outbound = outbound.clone();
            Box::new(move |demand| outbound.send(node_message::Payload::Demand(demand)))
        };
        let router = Router::new(
            engine.clone(),
            name.clone(),
            replicas.clone(),
            table,
            demand,
            config,
        );
        Arc::new(Self {
            engine,
            name,
            node_id,
            address,
            accelerators: host::accelerators(config),
            labels: config.labels.clone().into_iter().collect(),
            replicas,
            routes,
            outbound,
            router,
            jobs: Default::default(),
            checkpoints,
            usage: Default::default(),
            training_enabled: config.training.enabled,
        })
    }

    /// What its trainer trains on: the CPU. (GPUs would need the trainer built with candle's
    /// CUDA backend, `kiln-trainer/cuda`, which no build of the node enables yet.)
    fn training_accelerators(&self) -> Vec<i32> {
        if self.training_enabled {
            vec![AcceleratorType::Cpu as i32]
        } else {
            Vec::new()
        }
    }

    fn send(&self, message: node_message::Payload) {
        self.outbound.send(message);
    }

    fn report(&self, replica: &str, state: replica::State, status: Option<ResourceStatus>) {
        let loaded_addons = self
            .replicas
            .lock()
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
        let mut replicas = self.replicas.lock();
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
            training_enabled: self.training_enabled,
            training_accelerators: self.training_accelerators(),
            replicas: self
                .replicas
                .lock()
                .values()
                .map(|h| h.replica.clone())
                .collect(),
        }
    }

    fn heartbeat(&self) -> NodeHeartbeat {
        let mut replicas = self.replicas.lock();
        let now = Instant::now();
        let beats = replicas
            .values_mut()
            .map(|held| ReplicaHeartbeat {
                replica: held.replica.name.clone(),
                state: held.replica.state,
                load: Some(ReplicaLoad {
                    in_flight_requests: i32::try_from(held.in_flight()).unwrap_or(i32::MAX),
                    requests_per_second: held.take_rate(now),
                    ..Default::default()
                }),
                loaded_addons: held.replica.loaded_addons.clone(),
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
        let variant = Variant {
            backend: load.backend.clone(),
            lora_slots: self
                .engine
                .config()
                .lora_slots(load.enable_addons, load.num_peft_device_cached),
        };
        {
            let mut replicas = self.replicas.lock();
            if replicas.contains_key(&load.replica) {
                return; // a repeated delivery
            }
            replicas.insert(
                load.replica.clone(),
                Held::new(
                    Replica {
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
                    variant.clone(),
                ),
            );
        }
        self.report(&load.replica, replica::State::DownloadingModel, None);
        let node = self.clone();
        tokio::spawn(async move {
            let loaded = node
                .engine
                .model_on(&Principal::service(), "model", &load.model, &variant)
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
                    node.replicas.lock().remove(&load.replica);
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
        let Some(held) = self.replicas.lock().remove(&name) else {
            return;
        };
        let node = self.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + drain;
            while held.in_flight() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let still_used = node
                .replicas
                .lock()
                .values()
                .any(|h| h.replica.model == held.replica.model && h.variant == held.variant);
            if !still_used {
                node.engine.unload(&held.replica.model, &held.variant).await;
            }
            for dir in held.addon_dirs.values() {
                node.release_addon_files(dir);
            }
            tracing::info!(replica = %name, "replica unloaded");
            node.report(&name, replica::State::Stopped, None);
        });
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
            assignment::Action::StartFineTuningJob(_) if !self.training_enabled => {
                Err("this node does not run fine-tuning jobs".to_owned())
            }
            assignment::Action::StartFineTuningJob(start)
                if !self
                    .training_accelerators()
                    .contains(&start.accelerator_type) =>
            {
                Err(format!(
                    "this node's trainer cannot train on {}",
                    AcceleratorType::try_from(start.accelerator_type)
                        .map_or("an unknown accelerator", |t| t.as_str_name())
                ))
            }
            assignment::Action::StartFineTuningJob(start) => self.start_job(start),
            assignment::Action::CancelFineTuningJob(cancel) => {
                self.cancel_job(&cancel.job);
                Ok(())
            }
        };
        self.ack(id, accepted);
    }

    /// Keeps the node registered until shutdown: reconnects (with backoff) whenever the
    /// stream ends, telling the scheduler the replicas it still holds.
    pub(crate) fn spawn_agent(
        self: &Arc<Self>,
        link: Arc<dyn SchedulerLink>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            loop {
                let (sender, receiver) = mpsc::channel(256);
                let _ = sender
                    .send(NodeMessage {
                        payload: Some(node_message::Payload::Register(node.register_message())),
                    })
                    .await;
                match link.open(receiver).await {
                    Ok(inbound) => {
                        node.outbound.set(Some(sender));
                        backoff.reset();
                        tokio::select! {
                            reason = node.session(inbound) => {
                                tracing::warn!(node = %node.name, reason, "scheduler stream ended; reconnecting");
                            }
                            _ = shutdown.changed() => {}
                        }
                        node.outbound.set(None);
                    }
                    Err(err) => {
                        tracing::warn!(node = %node.name, %err, "cannot reach the scheduler; retrying")
                    }
                }
                if *shutdown.borrow() || !backoff.wait(&mut shutdown).await {
                    // Training stops with the node; the scheduler gives its job to another.
                    node.stop_jobs();
                    break;
                }
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
}
