//! Worker nodes: the `Connect` stream (registration, heartbeats, replica reports, demand;
//! assignments and routing tables back) and `ListNodes`.

use kiln_core::Error;
use kiln_events::records::HasRecords as _;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::auth::Principal;
use kiln_core::listing::{Field, Fields, Getter, Kind, ListRequest, Listing, Value, time_value};
use kiln_events::Body;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::{
    Node, NodeMessage, NodeRegistered, RegisterNode, SchedulerMessage, node, node_message, replica,
    scheduler_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::replicas::unload_assignment;
use crate::resource::is_gone;
use crate::service::Scheduler;
use crate::state::{NodeEntry, ReplicaEntry};
use crate::time::now;
use kiln_core::Result;

/// Messages a node's outgoing stream buffers before the scheduler retries later.
const OUTGOING: usize = 256;

pub(crate) type SchedulerStream = BoxStream<'static, Result<SchedulerMessage, Status>>;

impl Scheduler {
    /// Serves one node's stream: the first message registers it; the answer streams
    /// `NodeRegistered`, the routing table (again whenever it changes) and assignments.
    pub async fn connect(
        &self,
        caller: &Principal,
        mut inbound: BoxStream<'static, Result<NodeMessage, Status>>,
    ) -> Result<SchedulerStream> {
        if !caller.has(kiln_core::auth::Role::Service) {
            return Err(Error::PermissionDenied(
                "only inference nodes (the service credential) connect".into(),
            ));
        }
        let first = match inbound.next().await {
            Some(Ok(message)) => message,
            Some(Err(status)) => return Err(Error::from_peer("the node's stream", status)),
            None => {
                return Err(Error::invalid(
                    "register",
                    "the stream closed before RegisterNode",
                ));
            }
        };
        let Some(node_message::Payload::Register(register)) = first.payload else {
            return Err(Error::invalid(
                "register",
                "the first message must be RegisterNode",
            ));
        };
        let (session, name, sender, receiver) = self.register(register).await?;
        let scheduler = self.clone();
        let mut routes = self.routes();
        let mut shutdown = self.shutdown();
        let running = self.node_task();
        tokio::spawn(async move {
            let _running = running;
            // The current table first, then every change.
            let mut routes_open = true;
            let table = routes.borrow_and_update().clone();
            let _ = sender
                .send(Ok(SchedulerMessage {
                    payload: Some(scheduler_message::Payload::RoutingTable((*table).clone())),
                }))
                .await;
            let reason = loop {
                tokio::select! {
                    // The scheduler stopping is no fault of the node's: it is not lost (and
                    // nothing is recorded after the stop), it reconnects to the next one,
                    // which adopts its replicas.
                    _ = shutdown.changed() => return,
                    message = inbound.next() => match message {
                        Some(Ok(message)) => scheduler.node_message(&name, session, message).await,
                        Some(Err(status)) => break format!("stream error: {}", status.message()),
                        None => break "stream closed".to_owned(),
                    },
                    changed = routes.changed(), if routes_open => {
                        if changed.is_err() {
                            routes_open = false;
                            continue;
                        }
                        let table = routes.borrow_and_update().clone();
                        let message = SchedulerMessage {
                            payload: Some(scheduler_message::Payload::RoutingTable((*table).clone())),
                        };
                        if sender.send(Ok(message)).await.is_err() {
                            break "stream closed".to_owned();
                        }
                    }
                }
            };
            scheduler.disconnected(&name, session, &reason).await;
        });
        Ok(ReceiverStream::new(receiver).boxed())
    }

    /// Records a node (replacing an older stream of the same name) and adopts the replicas
    /// it still holds.
    async fn register(
        &self,
        register: RegisterNode,
    ) -> Result<(
        u64,
        String,
        mpsc::Sender<Result<SchedulerMessage, Status>>,
        mpsc::Receiver<Result<SchedulerMessage, Status>>,
    )> {
        if kiln_core::names::id_problem(&register.node_id).is_some() {
            return Err(Error::invalid(
                "register.node_id",
                format!(
                    "{:?} is not an ID (1-63 of a-z, 0-9 and '-', not starting or ending with '-')",
                    register.node_id
                ),
            ));
        }
        if !(register.address.starts_with("http://") || register.address.starts_with("https://")) {
            return Err(Error::invalid(
                "register.address",
                format!(
                    "must be an http:// or https:// URL, got {:?}",
                    register.address
                ),
            ));
        }
        for (i, a) in register.accelerators.iter().enumerate() {
            if a.count < 0 || a.memory_bytes < 0 {
                return Err(Error::invalid(
                    format!("register.accelerators[{i}]"),
                    "count and memory_bytes must not be negative",
                ));
            }
        }
        let name = format!("nodes/{}", register.node_id);
        let (sender, receiver) = mpsc::channel(OUTGOING);
        let mut state = self.lock().await;
        state.next_session += 1;
        let session = state.next_session;
        let registered = now();
        let node = Node {
            name: name.clone(),
            address: register.address.clone(),
            accelerators: register.accelerators.clone(),
            backends: register.backends.clone(),
            state: node::State::Ready as i32,
            status: None,
            create_time: state
                .nodes
                .get(&name)
                .and_then(|n| n.node.create_time)
                .or(Some(registered)),
            update_time: Some(registered),
            last_heartbeat_time: Some(registered),
            replicas: Vec::new(),
            labels: register.labels.clone(),
            version: register.version.clone(),
            training_enabled: register.training_enabled,
            training_accelerators: register.training_accelerators.clone(),
        };
        state.nodes.insert(
            name.clone(),
            NodeEntry {
                node: node.clone(),
                session,
                sender: Some(sender.clone()),
                last_heartbeat: Instant::now(),
                last_load: None,
            },
        );
        let _ = sender
            .send(Ok(SchedulerMessage {
                payload: Some(scheduler_message::Payload::Registered(NodeRegistered {
                    name: name.clone(),
                    heartbeat_interval: Some(crate::time::proto_duration(
                        self.config().heartbeat_interval,
                    )),
                })),
            }))
            .await;
        // Replicas it still holds: adopted if the scheduler still wants them (after a
        // scheduler restart, or a reconnect), unloaded otherwise.
        for held in register.replicas {
            let wanted = state
                .deployments
                .get(&held.deployment)
                .filter(|e| !is_gone(&e.deployment))
                .map(|e| (e.deployment.deployment_type, e.model_bytes));
            let known_elsewhere = state
                .replicas
                .get(&held.name)
                .is_some_and(|r| !r.replica.node.is_empty() && r.replica.node != name);
            match wanted {
                Some((deployment_type, model_bytes)) if !known_elsewhere => {
                    let mut replica = held.clone();
                    replica.node = name.clone();
                    state.replicas.insert(
                        held.name.clone(),
                        ReplicaEntry {
                            replica,
                            deployment_type,
                            model_bytes,
                            load: held.load.unwrap_or_default(),
                            addons_requested: Default::default(),
                        },
                    );
                }
                _ => {
                    let _ = sender.try_send(Ok(unload_assignment(&held.name, None)));
                }
            }
        }
        drop(state);
        tracing::info!(node = %name, address = %node.address, "node connected");
        let _ = self
            .emit(
                "scheduler.node.connected",
                kiln_core::names::SYSTEM_ACCOUNT,
                &name,
                Body::NodeConnected(ev::NodeConnected { node: Some(node) }),
            )
            .await;
        self.wake();
        Ok((session, name, sender, receiver))
    }

    async fn node_message(&self, name: &str, session: u64, message: NodeMessage) {
        let mut state = self.lock().await;
        let Some(entry) = state.nodes.get_mut(name) else {
            return;
        };
        if entry.session != session {
            return;
        }
        entry.last_heartbeat = Instant::now();
        entry.node.last_heartbeat_time = Some(now());
        let mut wake = false;
        let reports_load = matches!(message.payload, Some(node_message::Payload::Heartbeat(_)));
        match message.payload {
            Some(node_message::Payload::Heartbeat(beat)) => {
                entry.last_load = Some(Instant::now());
                for r in beat.replicas {
                    let to =
                        replica::State::try_from(r.state).unwrap_or(replica::State::Unspecified);
                    if let Some(entry) = state.replicas.get_mut(&r.replica)
                        && entry.replica.node == name
                    {
                        entry.load = r.load.unwrap_or_default();
                        entry.replica.loaded_addons = r.loaded_addons;
                    }
                    if to != replica::State::Unspecified {
                        let before = state.replicas.get(&r.replica).map(|e| e.replica.state);
                        self.replica_reported(&mut state, name, &r.replica, to, None)
                            .await;
                        wake |= before != state.replicas.get(&r.replica).map(|e| e.replica.state);
                    }
                }
            }
            Some(node_message::Payload::ReplicaState(report)) => {
                if let Some(entry) = state.replicas.get_mut(&report.replica)
                    && entry.replica.node == name
                {
                    entry.replica.loaded_addons = report.loaded_addons;
                }
                let to =
                    replica::State::try_from(report.state).unwrap_or(replica::State::Unspecified);
                self.replica_reported(&mut state, name, &report.replica, to, report.status)
                    .await;
                wake = true;
            }
            Some(node_message::Payload::Ack(ack)) if !ack.accepted => {
                match self
                    .addon_refused(&mut state, &ack.assignment_id, ack.status.clone())
                    .await
                {
                    Ok(true) => wake = true,
                    Ok(false) => {}
                    Err(err) => tracing::warn!(%err, "cannot record a refused addon"),
                }
                if let Some(replica) = ack.assignment_id.strip_prefix("load-") {
                    let replica = replica.to_owned();
                    self.replica_reported(
                        &mut state,
                        name,
                        &replica,
                        replica::State::Failed,
                        ack.status,
                    )
                    .await;
                    wake = true;
                }
            }
            Some(node_message::Payload::FineTuningJob(report)) => {
                self.job_reported(&mut state, name, report).await;
                wake = true;
            }
            Some(node_message::Payload::Demand(demand)) => {
                if let Some(entry) = state.deployments.get_mut(&demand.deployment) {
                    entry.demand = true;
                    wake = true;
                }
            }
            _ => {}
        }
        drop(state);
        if reports_load {
            self.load_reported();
        }
        if wake {
            self.wake();
        }
    }

    async fn disconnected(&self, name: &str, session: u64, reason: &str) {
        let mut state = self.lock().await;
        if state.nodes.get(name).is_some_and(|n| n.session == session) {
            self.lose_node(&mut state, name, reason).await;
        }
        drop(state);
        self.wake();
    }

    pub async fn list_nodes(
        &self,
        caller: &Principal,
        request: &ListRequest,
    ) -> Result<Listing<Node>> {
        if !caller.is_privileged() {
            return Err(Error::PermissionDenied(
                "only platform admins list nodes".into(),
            ));
        }
        let query = NODE_FIELDS.query(self.pages(), request, "")?;
        let state = self.lock().await;
        let nodes: Vec<Node> = state
            .nodes
            .values()
            .map(|n| {
                let mut node = n.node.clone();
                node.replicas = state
                    .replicas
                    .values()
                    .filter(|r| r.replica.node == node.name)
                    .map(|r| {
                        let mut replica = r.replica.clone();
                        replica.load = Some(r.load);
                        replica
                    })
                    .collect();
                node
            })
            .collect();
        drop(state);
        Ok(query.page_of(self.pages(), nodes))
    }
}

/// The fields a node list filters on and orders by.
static NODE_FIELDS: Fields<Getter<Node>> = Fields {
    collection: "nodes",
    fields: &[
        Field::order("name", |n| Value::Text(n.name.clone())),
        Field::order("create_time", |n| time_value(&n.create_time)),
        Field::order("last_heartbeat_time", |n| {
            time_value(&n.last_heartbeat_time)
        }),
        Field::filter(
            "state",
            |n| Value::Int(n.state.into()),
            Kind::Enum(|s| node::State::from_str_name(s).map(|v| v as i32)),
        ),
    ],
    tie_break: |n| Value::Text(n.name.clone()),
};
