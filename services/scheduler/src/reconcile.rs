//! The reconcile pass: lost nodes, autoscaling, replicas to start or stop, placement,
//! deployment and deployed-model states, the routing table. It runs when something changes
//! (an API call, a node's report) and every `reconcile_interval` otherwise.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use kiln_events::Body;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::{
    Assignment, DeployedModel, LoadReplica, Replica, ReplicaLoad, ReplicaStats, Route,
    RouteReplica, RoutingTable, SchedulerMessage, UnloadReplica, assignment, deployed_model,
    deployment, node, replica, scheduler_message,
};

use crate::addons;
use crate::deployments::{duration_of, is_gone, seconds_between};
use crate::error::Result;
use crate::placement::{self, DeviceGroup, Need, NodeCapacity};
use crate::service::{ReplicaEntry, Scheduler, State, now};

/// Replica failures in a row (without one becoming ready) that fail the deployment.
const MAX_FAILURES: u32 = 3;
/// google.rpc RESOURCE_EXHAUSTED: a deployment waiting for capacity.
const CODE_RESOURCE_EXHAUSTED: i32 = 8;

/// Runs passes until shutdown.
pub fn spawn(
    scheduler: Scheduler,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let interval = scheduler.config().reconcile_interval();
        loop {
            if let Err(err) = scheduler.reconcile().await {
                tracing::warn!(%err, "reconcile pass failed");
            }
            tokio::select! {
                _ = scheduler.woken() => {}
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => break,
            }
        }
    })
}

impl Scheduler {
    /// One pass.
    pub async fn reconcile(&self) -> Result<()> {
        let mut state = self.lock().await;
        self.find_lost_nodes(&mut state).await;
        let names: Vec<String> = state.deployments.keys().cloned().collect();
        for name in &names {
            self.reconcile_replicas(&mut state, name).await?;
        }
        self.place_pending(&mut state).await;
        for name in &names {
            self.refresh_deployment(&mut state, name).await?;
        }
        self.sync_addons(&mut state);
        self.refresh_deployed_models(&mut state).await?;
        let table = routing_table(&state, self.current_routes().version);
        if table.routes != self.current_routes().routes {
            self.publish_routes(table);
        }
        Ok(())
    }

    async fn find_lost_nodes(&self, state: &mut State) {
        let limit = self.config().node_lost_after();
        let late: Vec<String> = state
            .nodes
            .values()
            .filter(|n| {
                n.node.state != node::State::Lost as i32 && n.last_heartbeat.elapsed() > limit
            })
            .map(|n| n.node.name.clone())
            .collect();
        for name in late {
            self.lose_node(state, &name, "no heartbeat").await;
        }
    }

    /// Marks a node lost: its replicas stop counting (their accelerators are released), and
    /// the next pass starts replacements elsewhere.
    pub(crate) async fn lose_node(&self, state: &mut State, name: &str, reason: &str) {
        let Some(entry) = state.nodes.get_mut(name) else {
            return;
        };
        if entry.node.state == node::State::Lost as i32 {
            return;
        }
        entry.node.state = node::State::Lost as i32;
        entry.node.status = Some(ResourceStatus {
            code: 14,
            message: reason.to_owned(),
        });
        entry.node.update_time = Some(now());
        entry.sender = None;
        let last_heartbeat = entry.node.last_heartbeat_time;
        let replicas: Vec<String> = state
            .replicas
            .values()
            .filter(|r| r.replica.node == name)
            .map(|r| r.replica.name.clone())
            .collect();
        tracing::warn!(node = name, reason, replicas = replicas.len(), "node lost");
        for replica in &replicas {
            self.remove_replica(state, replica, "node lost", None).await;
        }
        let _ = self
            .emit(
                "scheduler.node.lost",
                kiln_core::names::SYSTEM_ACCOUNT,
                name,
                Body::NodeLost(ev::NodeLost {
                    name: name.to_owned(),
                    last_heartbeat_time: last_heartbeat,
                    reason: reason.to_owned(),
                    replicas,
                }),
            )
            .await;
    }

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
            let account = account_of(&r.deployment);
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
            let drain = prost_types::Duration {
                seconds: self.config().drain_timeout_secs as i64,
                nanos: 0,
            };
            let _ = sender.try_send(Ok(unload_assignment(name, Some(drain))));
        }
        self.remove_replica(state, name, reason, None).await;
    }

    /// Autoscales one deployment, then starts or stops replicas to match.
    async fn reconcile_replicas(&self, state: &mut State, name: &str) -> Result<()> {
        let Some(entry) = state.deployments.get(name) else {
            return Ok(());
        };
        let d = entry.deployment.clone();
        if d.state == deployment::State::Deleting as i32 {
            let ours: Vec<String> = replicas_of(state, name);
            for replica in ours {
                self.stop_replica(state, &replica, "deployment deleted")
                    .await;
            }
            return self.finish_delete(state, name).await;
        }
        if d.state == deployment::State::Deleted as i32 {
            let purge_due = d
                .purge_time
                .as_ref()
                .is_some_and(|p| p.seconds <= now().seconds);
            if purge_due {
                self.purge(state, name).await?;
            }
            return Ok(());
        }
        if d.state == deployment::State::Failed as i32 {
            return Ok(());
        }
        self.autoscale(state, name).await?;
        let entry = state.deployments.get(name).expect("present");
        let desired = entry.deployment.desired_replica_count.max(0) as usize;
        let live: Vec<String> = replicas_of(state, name);
        if live.len() < desired {
            let d = entry.deployment.clone();
            let bytes = entry.model_bytes;
            for _ in live.len()..desired {
                let id = uuid::Uuid::now_v7().simple().to_string();
                let replica_name = format!("{}/replicas/{}", d.name, &id[id.len() - 12..]);
                let created = now();
                state.replicas.insert(
                    replica_name.clone(),
                    ReplicaEntry {
                        replica: Replica {
                            name: replica_name,
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
                        model_bytes: bytes,
                        load: ReplicaLoad::default(),
                        addons_requested: Default::default(),
                    },
                );
            }
        } else if live.len() > desired {
            // Stop the least useful first: waiting, then starting, then the least loaded.
            let mut ranked: Vec<(u8, i32, String)> = live
                .iter()
                .filter_map(|n| state.replicas.get(n))
                .map(|r| {
                    let rank = match r.state() {
                        replica::State::PendingScheduling => 0,
                        replica::State::Ready => 2,
                        _ => 1,
                    };
                    (
                        rank,
                        r.load.in_flight_requests + r.load.queue_depth,
                        r.replica.name.clone(),
                    )
                })
                .collect();
            ranked.sort();
            for (_, _, replica) in ranked.into_iter().take(live.len() - desired) {
                self.stop_replica(state, &replica, "scaled down").await;
            }
        }
        Ok(())
    }

    /// The autoscaler: desired replicas from the load ready replicas report against the
    /// deployment's targets, honouring its windows.
    async fn autoscale(&self, state: &mut State, name: &str) -> Result<()> {
        let loads: Vec<ReplicaLoad> = state
            .replicas
            .values()
            .filter(|r| r.replica.deployment == name && r.state() == replica::State::Ready)
            .map(|r| r.load)
            .collect();
        let live = replicas_of(state, name).len();
        let entry = state.deployments.get_mut(name).expect("present");
        let d = &entry.deployment;
        let policy = d.autoscaling_policy.clone().unwrap_or_default();
        let (min, max, desired) = (
            d.min_replica_count,
            d.max_replica_count,
            d.desired_replica_count,
        );
        let busy = loads
            .iter()
            .any(|l| l.in_flight_requests + l.queue_depth > 0 || l.requests_per_second > 0.0);
        if busy || entry.demand {
            entry.last_activity = Instant::now();
        }
        if entry.demand && desired == 0 {
            entry.demand = false;
            return self.set_desired(entry, 1.min(max), "scale_from_zero").await;
        }
        entry.demand = false;
        // The replicas needed for the load now: the largest need over the targets.
        let needed = policy
            .load_targets
            .iter()
            .map(|(key, target)| {
                let total: f32 = loads
                    .iter()
                    .map(|l| match key.as_str() {
                        "requests_per_second" => l.requests_per_second,
                        "tokens_generated_per_second" => l.tokens_generated_per_second,
                        "kv_cache_utilization" => l.kv_cache_utilization,
                        _ => (l.in_flight_requests + l.queue_depth) as f32,
                    })
                    .sum();
                (total / target).ceil() as i32
            })
            .max()
            .unwrap_or(0);
        let now = Instant::now();
        // Only judge load once every replica there is serving.
        if !loads.is_empty() && loads.len() == live {
            if needed > desired && desired < max {
                let since = *entry.above_since.get_or_insert(now);
                entry.below_since = None;
                if now.duration_since(since) >= duration_of(policy.scale_up_window.as_ref()) {
                    entry.above_since = None;
                    return self.set_desired(entry, needed.min(max), "autoscaler").await;
                }
            } else if needed < desired && desired > min.max(1) {
                let since = *entry.below_since.get_or_insert(now);
                entry.above_since = None;
                if now.duration_since(since) >= duration_of(policy.scale_down_window.as_ref()) {
                    entry.below_since = None;
                    return self
                        .set_desired(entry, needed.max(min).max(1), "autoscaler")
                        .await;
                }
            } else {
                entry.above_since = None;
                entry.below_since = None;
            }
        }
        if min == 0
            && desired > 0
            && now.duration_since(entry.last_activity)
                >= duration_of(policy.scale_to_zero_window.as_ref())
        {
            return self.set_desired(entry, 0, "scale_to_zero").await;
        }
        Ok(())
    }

    /// What is free on each ready node, after the replicas placed on it.
    pub(crate) fn capacities(&self, state: &State) -> Vec<NodeCapacity> {
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
        nodes
    }

    /// Places every waiting replica it can and sends the nodes their assignments.
    async fn place_pending(&self, state: &mut State) {
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
        let mut nodes = self.capacities(state);
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
            let (d_max_context, d_peft) = {
                let r = &state.replicas[name];
                state
                    .deployments
                    .get(&r.replica.deployment)
                    .map(|e| {
                        (
                            e.deployment.max_context_length,
                            e.deployment.num_peft_device_cached,
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

    /// Stats, state and status of one deployment from its replicas; stored when changed.
    async fn refresh_deployment(&self, state: &mut State, name: &str) -> Result<()> {
        let mut stats = ReplicaStats::default();
        let mut count = 0;
        for r in state
            .replicas
            .values()
            .filter(|r| r.replica.deployment == name)
        {
            count += 1;
            match r.state() {
                replica::State::PendingScheduling => stats.pending_scheduling_replica_count += 1,
                replica::State::DownloadingModel => stats.downloading_model_replica_count += 1,
                replica::State::Initializing => stats.initializing_replica_count += 1,
                replica::State::Ready => stats.ready_replica_count += 1,
                _ => {}
            }
        }
        let Some(entry) = state.deployments.get_mut(name) else {
            return Ok(());
        };
        let d = &entry.deployment;
        if is_gone(d) {
            return Ok(());
        }
        let ready = stats.ready_replica_count;
        if ready > 0 {
            entry.failures = 0;
        }
        let desired = d.desired_replica_count;
        let mut next_state = d.state;
        let mut status = ResourceStatus::default();
        if entry.failures >= MAX_FAILURES && ready == 0 {
            next_state = deployment::State::Failed as i32;
            status = d.status.clone().unwrap_or_default();
        } else {
            let starting = d.state == deployment::State::Creating as i32
                || d.state == deployment::State::Updating as i32;
            if starting && ready >= desired && (desired > 0 || count == 0) {
                next_state = deployment::State::Ready as i32;
            }
            if !entry.unplaced.is_empty() {
                status = ResourceStatus {
                    code: CODE_RESOURCE_EXHAUSTED,
                    message: entry.unplaced.clone(),
                };
            } else if entry.failures > 0 {
                status = d.status.clone().unwrap_or_default();
            }
        }
        let changed = d.replica_count != count
            || d.replica_stats.as_ref() != Some(&stats)
            || d.state != next_state
            || d.status.as_ref() != Some(&status);
        if !changed {
            return Ok(());
        }
        let previous = d.state;
        let d = &mut entry.deployment;
        d.replica_count = count;
        d.replica_stats = Some(stats);
        d.status = Some(status);
        d.state = next_state;
        d.update_time = Some(now());
        let event = (previous != next_state).then(|| {
            tracing::info!(
                deployment = name,
                from = previous,
                to = next_state,
                "deployment state"
            );
            (
                "scheduler.deployment.state_changed",
                Body::DeploymentStateChanged(ev::DeploymentStateChanged {
                    deployment: Some(d.clone()),
                    previous_state: previous,
                }),
            )
        });
        self.save_deployment(entry, false, event, None).await
    }

    /// Deployed models become DEPLOYED once their deployment is first ready (an addon's:
    /// once every ready replica holds it too).
    async fn refresh_deployed_models(&self, state: &mut State) -> Result<()> {
        let ready: Vec<String> = state
            .deployed_models
            .values()
            .filter(|dm| dm.state == deployed_model::State::Deploying as i32)
            .filter(|dm| {
                state.deployments.get(&dm.deployment).is_some_and(|e| {
                    e.deployment.state == deployment::State::Ready as i32
                        || e.deployment.state == deployment::State::Updating as i32
                })
            })
            .filter(|dm| {
                !addons::is_addon_on(state, dm)
                    || addons::held_everywhere(state, &dm.deployment, &dm.model)
            })
            .map(|dm| dm.name.clone())
            .collect();
        for name in ready {
            let mut dm = state.deployed_models[&name].clone();
            self.set_deployed_model_state(&mut dm, deployed_model::State::Deployed)
                .await?;
            state.deployed_models.insert(name, dm);
        }
        Ok(())
    }

    /// A deleting deployment whose replicas are gone: DELETED (or gone, when hard).
    async fn finish_delete(&self, state: &mut State, name: &str) -> Result<()> {
        let entry = state.deployments.get_mut(name).expect("present");
        if entry.deployment.purge_time.is_none() {
            self.drop_deployment_row(name).await?;
            state.deployments.remove(name);
            return Ok(());
        }
        let d = &mut entry.deployment;
        let previous = d.state;
        d.state = deployment::State::Deleted as i32;
        d.replica_count = 0;
        d.replica_stats = Some(ReplicaStats::default());
        d.update_time = Some(now());
        let body = Body::DeploymentStateChanged(ev::DeploymentStateChanged {
            deployment: Some(d.clone()),
            previous_state: previous,
        });
        self.save_deployment(
            entry,
            false,
            Some(("scheduler.deployment.state_changed", body)),
            None,
        )
        .await
    }

    /// Removes a soft-deleted deployment past its purge time, with its deployed models.
    async fn purge(&self, state: &mut State, name: &str) -> Result<()> {
        let models: Vec<DeployedModel> = state
            .deployed_models
            .values()
            .filter(|dm| dm.deployment == name)
            .cloned()
            .collect();
        for dm in models {
            self.delete_deployed_model_row(&dm).await?;
            state.deployed_models.remove(&dm.name);
        }
        self.drop_deployment_row(name).await?;
        state.deployments.remove(name);
        Ok(())
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
                            code: status.as_ref().map_or(13, |s| s.code),
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
                d.last_activity = Instant::now();
            }
            let entry = state.replicas.get_mut(name).expect("present");
            let r = &mut entry.replica;
            r.ready_time = r.update_time;
            let account = account_of(&r.deployment);
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
        let _ = self
            .emit(
                "scheduler.replica.state_changed",
                &account_of(&replica.deployment),
                name,
                Body::ReplicaStateChanged(ev::ReplicaStateChanged {
                    replica: Some(replica),
                    previous_state: previous,
                }),
            )
            .await;
    }
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

fn replicas_of(state: &State, deployment: &str) -> Vec<String> {
    state
        .replicas
        .values()
        .filter(|r| r.replica.deployment == deployment)
        .map(|r| r.replica.name.clone())
        .collect()
}

/// The account ID of `accounts/{a}/...`.
pub(crate) fn account_of(name: &str) -> String {
    name.strip_prefix("accounts/")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

/// Where every deployed model is served, from the current state.
pub(crate) fn routing_table(state: &State, version: i64) -> RoutingTable {
    let mut by_deployment: BTreeMap<&str, Vec<RouteReplica>> = BTreeMap::new();
    for r in state.replicas.values() {
        if r.replica.node.is_empty() {
            continue;
        }
        let Some(node) = state.nodes.get(&r.replica.node) else {
            continue;
        };
        by_deployment
            .entry(r.replica.deployment.as_str())
            .or_default()
            .push(RouteReplica {
                replica: r.replica.name.clone(),
                node: node.node.name.clone(),
                address: node.node.address.clone(),
                ready: r.state() == replica::State::Ready && node.is_ready(),
                accelerator_type: r.replica.accelerator_type,
                accelerator_count: r.replica.accelerator_count,
            });
    }
    let routes = state
        .deployed_models
        .values()
        .filter(|dm| {
            dm.state == deployed_model::State::Deploying as i32
                || dm.state == deployed_model::State::Deployed as i32
                || dm.state == deployed_model::State::Updating as i32
        })
        .filter_map(|dm| {
            let d = &state.deployments.get(&dm.deployment)?.deployment;
            let mut replicas = by_deployment
                .get(dm.deployment.as_str())
                .cloned()
                .unwrap_or_default();
            if dm.model != d.base_model {
                // An addon is served only where it is loaded.
                for route in &mut replicas {
                    route.ready &= state
                        .replicas
                        .get(&route.replica)
                        .is_some_and(|r| r.replica.loaded_addons.contains(&dm.model));
                }
            }
            Some(Route {
                deployed_model: dm.name.clone(),
                model: dm.model.clone(),
                deployment: dm.deployment.clone(),
                base_model: d.base_model.clone(),
                default: dm.default,
                public: dm.public,
                deployment_type: d.deployment_type,
                account: format!("accounts/{}", account_of(&dm.name)),
                replicas,
                state: dm.state,
            })
        })
        .collect();
    RoutingTable {
        version: version + 1,
        routes,
    }
}
