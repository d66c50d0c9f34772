//! What the scheduler holds in memory: deployments and deployed models (mirrored from the
//! database), the connected nodes and the replicas on them (in memory only: nodes tell them
//! again when they reconnect). Plain data; the reconcile pass decides from it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use kiln_proto::scheduler::v1::{
    DeployedModel, Deployment, Node, Replica, ReplicaLoad, SchedulerMessage,
    SupervisedFineTuningJob, node, replica,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::autoscale::Timers;

/// Everything the reconcile pass decides from. One lock: passes and API changes take turns.
#[derive(Default)]
pub(crate) struct State {
    pub deployments: BTreeMap<String, DeploymentEntry>,
    pub deployed_models: BTreeMap<String, DeployedModel>,
    pub nodes: BTreeMap<String, NodeEntry>,
    pub replicas: BTreeMap<String, ReplicaEntry>,
    /// Supervised fine-tuning jobs (mirrored from the database), by name.
    pub jobs: BTreeMap<String, SupervisedFineTuningJob>,
    pub next_session: u64,
}

impl State {
    /// The names of a deployment's replicas, in any state.
    pub fn replicas_of(&self, deployment: &str) -> Vec<String> {
        self.replicas
            .values()
            .filter(|r| r.replica.deployment == deployment)
            .map(|r| r.replica.name.clone())
            .collect()
    }

    /// The deployed models on a deployment.
    pub fn deployed_models_of(&self, deployment: &str) -> Vec<DeployedModel> {
        self.deployed_models
            .values()
            .filter(|dm| dm.deployment == deployment)
            .cloned()
            .collect()
    }
}

/// A deployment and what the autoscaler remembers about it.
pub(crate) struct DeploymentEntry {
    pub deployment: Deployment,
    pub model_bytes: i64,
    pub timers: Timers,
    /// A node holds requests for it while it has no ready replica.
    pub demand: bool,
    /// Replica failures since it last had a ready replica.
    pub failures: u32,
    /// Why its waiting replicas cannot be placed (empty when they can).
    pub unplaced: String,
}

impl DeploymentEntry {
    pub fn new(deployment: Deployment, model_bytes: i64) -> Self {
        Self {
            deployment,
            model_bytes,
            timers: Timers::new(Instant::now()),
            demand: false,
            failures: 0,
            unplaced: String::new(),
        }
    }
}

/// Where a node's assignments and routing tables go.
pub(crate) type NodeSender = mpsc::Sender<Result<SchedulerMessage, Status>>;

/// A connected (or lost) worker node.
pub(crate) struct NodeEntry {
    pub node: Node,
    /// Which stream is the node's current one (a reconnect replaces the older).
    pub session: u64,
    /// Where assignments go; None once the stream closed.
    pub sender: Option<NodeSender>,
    pub last_heartbeat: Instant,
    /// When its last heartbeat (the only message that reports load) arrived.
    pub last_load: Option<Instant>,
}

impl NodeEntry {
    pub fn is_ready(&self) -> bool {
        self.node.state == node::State::Ready as i32 && self.sender.is_some()
    }
}

/// A replica and its last reported load.
pub(crate) struct ReplicaEntry {
    pub replica: Replica,
    pub deployment_type: i32,
    pub model_bytes: i64,
    pub load: ReplicaLoad,
    /// Addons its node was told to load and has not reported loaded yet.
    pub addons_requested: BTreeSet<String>,
}

impl ReplicaEntry {
    pub fn state(&self) -> replica::State {
        replica::State::try_from(self.replica.state).unwrap_or(replica::State::Unspecified)
    }
}

/// Builders of small states for the pure decisions' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use kiln_proto::common::v1::AcceleratorType;
    use kiln_proto::scheduler::v1::Accelerator;

    use super::*;

    pub const H100: i32 = AcceleratorType::NvidiaH10080gb as i32;
    pub const CPU: i32 = AcceleratorType::Cpu as i32;

    /// A node with `count` H100s of 80 GiB, ready (with an open stream) unless `state` says
    /// otherwise. The stream's receiving end is dropped: sends fail, which no test needs.
    pub fn node(id: &str, state: node::State, count: i32) -> NodeEntry {
        let (sender, _) = mpsc::channel(1);
        NodeEntry {
            node: Node {
                name: format!("nodes/{id}"),
                address: format!("http://{id}:8080"),
                state: state as i32,
                accelerators: vec![Accelerator {
                    r#type: H100,
                    count,
                    memory_bytes: 80 << 30,
                }],
                ..Default::default()
            },
            session: 1,
            sender: (state == node::State::Ready).then_some(sender),
            last_heartbeat: Instant::now(),
            last_load: None,
        }
    }

    /// A replica `accounts/acme/deployments/{deployment}/replicas/{id}` on `nodes/{node}`
    /// (none when empty) holding one H100 at `index`.
    pub fn replica(
        deployment: &str,
        id: &str,
        node: &str,
        state: replica::State,
        index: i32,
    ) -> ReplicaEntry {
        let deployment = format!("accounts/acme/deployments/{deployment}");
        ReplicaEntry {
            replica: Replica {
                name: format!("{deployment}/replicas/{id}"),
                deployment,
                model: "accounts/acme/models/m".into(),
                node: if node.is_empty() {
                    String::new()
                } else {
                    format!("nodes/{node}")
                },
                accelerator_type: H100,
                accelerator_count: 1,
                accelerator_indices: if node.is_empty() { vec![] } else { vec![index] },
                state: state as i32,
                ..Default::default()
            },
            deployment_type: 0,
            model_bytes: 1 << 30,
            load: ReplicaLoad::default(),
            addons_requested: BTreeSet::new(),
        }
    }

    /// A deployment `accounts/acme/deployments/{id}` of `accounts/acme/models/m`.
    pub fn deployment(id: &str, desired: i32) -> DeploymentEntry {
        DeploymentEntry::new(
            Deployment {
                name: format!("accounts/acme/deployments/{id}"),
                base_model: "accounts/acme/models/m".into(),
                accelerator_type: H100,
                accelerator_count: 1,
                min_replica_count: 1,
                max_replica_count: 4,
                desired_replica_count: desired,
                ..Default::default()
            },
            1 << 30,
        )
    }

    /// A state holding these entries.
    pub fn state(
        deployments: Vec<DeploymentEntry>,
        nodes: Vec<NodeEntry>,
        replicas: Vec<ReplicaEntry>,
    ) -> State {
        State {
            deployments: deployments
                .into_iter()
                .map(|d| (d.deployment.name.clone(), d))
                .collect(),
            nodes: nodes
                .into_iter()
                .map(|n| (n.node.name.clone(), n))
                .collect(),
            replicas: replicas
                .into_iter()
                .map(|r| (r.replica.name.clone(), r))
                .collect(),
            ..Default::default()
        }
    }
}
