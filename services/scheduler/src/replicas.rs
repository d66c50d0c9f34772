//! Replicas: the plan that brings a deployment to its desired count, placing the waiting
//! ones on nodes, stopping them, and applying what nodes report about them.

use std::collections::HashMap;
use std::time::Instant;

use kiln_events::Body;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::{
    Assignment, Deployment, LoadReplica, Replica, ReplicaLoad, SchedulerMessage, UnloadReplica,
    assignment, replica, scheduler_message,
};

use crate::placement::{self, DeviceGroup, Need, NodeCapacity};
use crate::service::Scheduler;
use crate::state::{ReplicaEntry, State};
use crate::time::{now, proto_duration, seconds_between};
use kiln_core::names::account_of;

/// What a deployment's replicas need to reach its desired count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    Keep,
    /// Start this many new replicas (they wait for a node).
    Start(usize),
    /// Stop these replicas.
    Stop(Vec<String>),
}

/// What brings `replicas` (a deployment's, in any state) to `desired`. Stops the least
/// useful first: waiting for a node, then starting, then the least loaded ready ones.
pub(crate) fn plan(desired: usize, replicas: &[&ReplicaEntry]) -> Plan {
    if replicas.len() < desired {
        return Plan::Start(desired - replicas.len());
    }
    if replicas.len() == desired {
        return Plan::Keep;
    }
    let mut ranked: Vec<(u8, i32, &str)> = replicas
        .iter()
        .map(|r| {
            let rank = match r.state() {
                replica::State::PendingScheduling => 0,
                replica::State::Ready => 2,
                _ => 1,
            };
            (
                rank,
                r.load.in_flight_requests + r.load.queue_depth,
                r.replica.name.as_str(),
            )
        })
        .collect();
    ranked.sort();
    Plan::Stop(
        ranked
            .into_iter()
            .take(replicas.len() - desired)
            .map(|(_, _, name)| name.to_owned())
            .collect(),
    )
}

/// A new replica `{deployment}/replicas/{id}` of `d`, waiting for a node.
pub(crate) fn pending_replica(
    d: &Deployment,
    model_bytes: i64,
    id: &str,
    created: prost_types::Timestamp,
) -> ReplicaEntry {
    ReplicaEntry {
        replica: Replica {
            name: format!("{}/replicas/{id}", d.name),
            deployment: d.name.clone(),
            model: d.base_model.clone(),
            backend: d.backend.clone(),
            precision: d.precision,
            accelerator_type: d.accelerator_type,
            accelerator_count: d.accelerator_count,
            state: replica::State::PendingScheduling as i32,
            create_time: Some(created),
            update_time: Some(created),
            ..Default::default()
        },
        deployment_type: d.deployment_type,
        model_bytes,
        load: ReplicaLoad::default(),
        addons_requested: Default::default(),
    }
}

/// What is free on each ready node, after the replicas placed on it.
pub(crate) fn capacities(state: &State) -> Vec<NodeCapacity> {
    let mut nodes: Vec<NodeCapacity> = state
        .nodes
        .values()
        .filter(|n| n.is_ready())
        .map(|n| NodeCapacity {
            name: n.node.name.clone(),
            groups: n
                .node
                .accelerators
                .iter()
                .map(|a| DeviceGroup::new(a.r#type, a.count.max(0) as usize, a.memory_bytes))
                .collect(),
        })
        .collect();
    let index: HashMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), i))
        .collect();
    for r in state.replicas.values() {
        if let Some(&i) = index.get(&r.replica.node)
            && let Some(group) = nodes[i].group_mut(r.replica.accelerator_type)
        {
            group.occupy(&r.replica.accelerator_indices, r.model_bytes);
        }
    }
    // And the devices fine-tuning jobs train on.
    for job in state
        .jobs
        .values()
        .filter(|j| crate::fine_tuning::on_a_node(j.state))
    {
        if let Some(&i) = index.get(&job.node)
            && let Some(group) = nodes[i].group_mut(job.accelerator_type)
        {
            group.occupy(&job.accelerator_indices, 0);
        }
    }
    nodes
}

/// The assignment that unloads `replica`, letting in-flight requests finish for `drain`.
pub(crate) fn unload_assignment(
    replica: &str,
    drain: Option<prost_types::Duration>,
) -> SchedulerMessage {
    SchedulerMessage {
        payload: Some(scheduler_message::Payload::Assignment(Assignment {
            assignment_id: format!("unload-{replica}"),
            action: Some(assignment::Action::UnloadReplica(UnloadReplica {
                replica: replica.to_owned(),
                drain_timeout: drain,
            })),
        })),
    }
}

impl Scheduler {
    /// Forgets a replica, publishing `replica.stopped` (with its accelerator-seconds, counted
    /// from when it became ready) if it had started.
    pub(crate) async fn remove_replica(
        &self,
        state: &mut State,
        name: &str,
        reason: &str,
        status: Option<ResourceStatus>,
    ) {
        let Some(entry) = state.replicas.remove(name) else {
            return;
        };
        let r = entry.replica;
        if r.ready_time.is_some() {
            let stopped = now();
            let seconds = seconds_between(r.ready_time.as_ref(), &stopped);
            let account = account_of(&r.deployment).to_owned();
            let _ = self
                .emit(
                    "scheduler.replica.stopped",
                    &account,
                    &r.name,
                    Body::ReplicaStopped(ev::ReplicaStopped {
                        replica: r.name.clone(),
                        deployment: r.deployment.clone(),
                        model: r.model.clone(),
                        node: r.node.clone(),
                        accelerator_type: r.accelerator_type,
                        accelerator_count: r.accelerator_count,
                        deployment_type: entry.deployment_type,
                        start_time: r.ready_time,
                        stop_time: Some(stopped),
                        accelerator_seconds: seconds * f64::from(r.accelerator_count),
                        reason: reason.to_owned(),
                        status,
                    }),
                )
                .await;
        }
    }

    /// Tells the replica's node to unload it and forgets it (its accelerators are free for
    /// the next placement; the node drains in-flight requests first).
    pub(crate) async fn stop_replica(&self, state: &mut State, name: &str, reason: &str) {
        let Some(entry) = state.replicas.get(name) else {
            return;
        };
        let node = entry.replica.node.clone();
        if let Some(sender) = state.nodes.get(&node).and_then(|n| n.sender.clone()) {
            let drain = proto_duration(self.config().drain_timeout);
            let _ = sender.try_send(Ok(unload_assignment(name, Some(drain))));
        }
        self.remove_replica(state, name, reason, None).await;
    }

    /// Stops every replica of `deployment`.
    pub(crate) async fn stop_replicas_of(&self, state: &mut State, deployment: &str, reason: &str) {
        for replica in state.replicas_of(deployment) {
            self.stop_replica(state, &replica, reason).await;
        }
    }

    /// Places every waiting replica it can and sends the nodes their assignments.
    pub(crate) async fn place_pending(&self, state: &mut State) {
        let pending: Vec<String> = state
            .replicas
            .values()
            .filter(|r| r.state() == replica::State::PendingScheduling)
            .map(|r| r.replica.name.clone())
            .collect();
        for entry in state.deployments.values_mut() {
            entry.unplaced.clear();
        }
        if pending.is_empty() {
            return;
        }
        let mut nodes = capacities(state);
        let needs: Vec<Need> = pending
            .iter()
            .map(|n| {
                let r = &state.replicas[n];
                Need {
                    kind: r.replica.accelerator_type,
                    count: r.replica.accelerator_count.max(1) as usize,
                    model_bytes: r.model_bytes,
                }
            })
            .collect();
        let placed = placement::place(&mut nodes, &needs);
        for ((name, need), placed) in pending.iter().zip(&needs).zip(placed) {
            let Some(placed) = placed else {
                let deployment = state.replicas[name].replica.deployment.clone();
                if let Some(entry) = state.deployments.get_mut(&deployment)
                    && entry.unplaced.is_empty()
                {
                    // What is free after this pass's placements: what the replica waits for.
                    entry.unplaced = placement::why_unplaced(&nodes, need);
                }
                continue;
            };
            let node_name = nodes[placed.node].name.clone();
            let Some(sender) = state.nodes.get(&node_name).and_then(|n| n.sender.clone()) else {
                continue;
            };
            let (d_max_context, d_peft, d_addons) = {
                let r = &state.replicas[name];
                state
                    .deployments
                    .get(&r.replica.deployment)
                    .map(|e| {
                        (
                            e.deployment.max_context_length,
                            e.deployment.num_peft_device_cached,
                            e.deployment.enable_addons,
                        )
                    })
                    .unwrap_or_default()
            };
            let entry = state.replicas.get_mut(name).expect("pending replica");
            let r = &mut entry.replica;
            r.node = node_name.clone();
            r.accelerator_indices = placed.indices.clone();
            r.state = replica::State::DownloadingModel as i32;
            r.update_time = Some(now());
            let message = SchedulerMessage {
                payload: Some(scheduler_message::Payload::Assignment(Assignment {
                    assignment_id: format!("load-{}", r.name),
                    action: Some(assignment::Action::LoadReplica(LoadReplica {
                        replica: r.name.clone(),
                        deployment: r.deployment.clone(),
                        model: r.model.clone(),
                        backend: r.backend.clone(),
                        precision: r.precision,
                        accelerator_type: r.accelerator_type,
                        accelerator_indices: placed.indices,
                        max_context_length: d_max_context,
                        addons: Vec::new(),
                        num_peft_device_cached: d_peft,
                        enable_addons: d_addons,
                    })),
                })),
            };
            tracing::info!(replica = %r.name, node = %node_name, "placed");
            if sender.try_send(Ok(message)).is_err() {
                // The node's stream is full or gone: try again next pass.
                r.node.clear();
                r.accelerator_indices.clear();
                r.state = replica::State::PendingScheduling as i32;
            }
        }
    }

    /// Applies a node's report of a replica's state.
    pub(crate) async fn replica_reported(
        &self,
        state: &mut State,
        node: &str,
        name: &str,
        to: replica::State,
        status: Option<ResourceStatus>,
    ) {
        let Some(entry) = state.replicas.get_mut(name) else {
            return;
        };
        if entry.replica.node != node || entry.replica.state == to as i32 {
            return;
        }
        let previous = entry.replica.state;
        match to {
            replica::State::Failed | replica::State::Stopped => {
                let deployment = entry.replica.deployment.clone();
                if to == replica::State::Failed {
                    let message = status.clone().map(|s| s.message).unwrap_or_default();
                    tracing::warn!(replica = name, %message, "replica failed");
                    if let Some(d) = state.deployments.get_mut(&deployment) {
                        d.failures += 1;
                        d.deployment.status = Some(ResourceStatus {
                            code: status
                                .as_ref()
                                .map_or(tonic::Code::Internal as i32, |s| s.code),
                            message: format!("a replica failed on {node}: {message}"),
                        });
                    }
                }
                self.remove_replica(state, name, "replica ended", status)
                    .await;
                return;
            }
            _ => {}
        }
        entry.replica.state = to as i32;
        entry.replica.update_time = Some(now());
        if to == replica::State::Ready && entry.replica.ready_time.is_none() {
            // Idle time (for scale-to-zero) counts from when the replica could serve.
            if let Some(d) = state.deployments.get_mut(&entry.replica.deployment) {
                d.timers.last_activity = Instant::now();
            }
            let entry = state.replicas.get_mut(name).expect("present");
            let r = &mut entry.replica;
            r.ready_time = r.update_time;
            let account = account_of(&r.deployment).to_owned();
            let body = Body::ReplicaStarted(ev::ReplicaStarted {
                replica: r.name.clone(),
                deployment: r.deployment.clone(),
                model: r.model.clone(),
                node: r.node.clone(),
                accelerator_type: r.accelerator_type,
                accelerator_count: r.accelerator_count,
                deployment_type: entry.deployment_type,
                precision: r.precision,
                backend: r.backend.clone(),
                start_time: r.ready_time,
            });
            let name = r.name.clone();
            let _ = self
                .emit("scheduler.replica.started", &account, &name, body)
                .await;
        }
        let replica = state.replicas[name].replica.clone();
        let account = account_of(&replica.deployment).to_owned();
        let _ = self
            .emit(
                "scheduler.replica.state_changed",
                &account,
                name,
                Body::ReplicaStateChanged(ev::ReplicaStateChanged {
                    replica: Some(replica),
                    previous_state: previous,
                }),
            )
            .await;
    }
}

#[cfg(test)]
mod tests;
