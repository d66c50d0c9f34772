//! The reconcile pass: lost nodes, autoscaling, replicas to start or stop, placement,
//! deployment and deployed-model states, the routing table. It runs when something changes
//! (an API call, a node's report) and every `reconcile_interval` otherwise. The decisions
//! are pure functions (`autoscale`, `replicas::plan`, `placement`, `lost_nodes`, `routes`,
//! [`progress`]); this module applies them.

use std::time::Instant;

use kiln_events::Body;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::{ReplicaLoad, ReplicaStats, deployed_model, deployment, replica};

use crate::addons;
use crate::autoscale::{self, Observed, Policy};
use crate::replicas::{self, Plan, pending_replica};
use crate::resource::is_gone;
use crate::routes::routing_table;
use crate::service::Scheduler;
use crate::state::{DeploymentEntry, ReplicaEntry, State};
use crate::time::now;
use kiln_core::Result;

/// Replica failures in a row (without one becoming ready) that fail the deployment.
const MAX_FAILURES: u32 = 3;

/// Runs passes until shutdown.
pub(crate) fn spawn(
    scheduler: Scheduler,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let interval = scheduler.config().reconcile_interval;
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
    pub(crate) async fn reconcile(&self) -> Result<()> {
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
        self.reconcile_jobs(&mut state).await;
        crate::metrics::publish(&crate::metrics::snapshot(&state));
        let table = routing_table(&state, self.current_routes().version);
        if table.routes != self.current_routes().routes {
            self.publish_routes(table);
        }
        Ok(())
    }

    /// Autoscales one deployment, then starts or stops replicas to match.
    async fn reconcile_replicas(&self, state: &mut State, name: &str) -> Result<()> {
        let Some(entry) = state.deployments.get(name) else {
            return Ok(());
        };
        let d = entry.deployment.clone();
        if d.state == deployment::State::Deleting as i32 {
            self.stop_replicas_of(state, name, "deployment deleted")
                .await;
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
        let ours: Vec<&ReplicaEntry> = state
            .replicas
            .values()
            .filter(|r| r.replica.deployment == name)
            .collect();
        match replicas::plan(desired, &ours) {
            Plan::Keep => {}
            Plan::Start(count) => {
                let (d, bytes) = (entry.deployment.clone(), entry.model_bytes);
                for _ in 0..count {
                    let id = uuid::Uuid::now_v7().simple().to_string();
                    let new = pending_replica(&d, bytes, &id[id.len() - 12..], now());
                    state.replicas.insert(new.replica.name.clone(), new);
                }
            }
            Plan::Stop(surplus) => {
                for replica in surplus {
                    self.stop_replica(state, &replica, "scaled down").await;
                }
            }
        }
        Ok(())
    }

    /// Runs the autoscaler on one deployment and stores the desired count it decides.
    async fn autoscale(&self, state: &mut State, name: &str) -> Result<()> {
        let loads: Vec<ReplicaLoad> = state
            .replicas
            .values()
            .filter(|r| r.replica.deployment == name && r.state() == replica::State::Ready)
            .map(|r| r.load)
            .collect();
        let replicas = state.replicas_of(name).len();
        let entry = state.deployments.get_mut(name).expect("present");
        let observed = Observed {
            desired: entry.deployment.desired_replica_count,
            replicas,
            loads: &loads,
            demand: entry.demand,
        };
        let policy = Policy::of(&entry.deployment);
        let decision = autoscale::decide(&policy, &observed, &mut entry.timers, Instant::now());
        entry.demand = false;
        match decision {
            Some((desired, reason)) => self.set_desired(entry, desired, reason.as_str()).await,
            None => Ok(()),
        }
    }

    /// Stats, state and status of one deployment from its replicas; stored when changed.
    async fn refresh_deployment(&self, state: &mut State, name: &str) -> Result<()> {
        let ours: Vec<&ReplicaEntry> = state
            .replicas
            .values()
            .filter(|r| r.replica.deployment == name)
            .collect();
        let Some(entry) = state.deployments.get_mut(name) else {
            return Ok(());
        };
        if is_gone(&entry.deployment) {
            return Ok(());
        }
        let next = progress(entry, &ours);
        if next.stats.ready_replica_count > 0 {
            entry.failures = 0;
        }
        let d = &entry.deployment;
        let changed = d.replica_count != next.replica_count
            || d.replica_stats.as_ref() != Some(&next.stats)
            || d.state != next.state
            || d.status.as_ref() != Some(&next.status);
        if !changed {
            return Ok(());
        }
        let previous = d.state;
        let d = &mut entry.deployment;
        d.replica_count = next.replica_count;
        d.replica_stats = Some(next.stats);
        d.status = Some(next.status);
        d.state = next.state;
        d.update_time = Some(now());
        let event = (previous != next.state).then(|| {
            tracing::info!(
                deployment = name,
                from = previous,
                to = next.state,
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
        for dm in state.deployed_models_of(name) {
            self.delete_deployed_model_row(&dm).await?;
            state.deployed_models.remove(&dm.name);
        }
        self.drop_deployment_row(name).await?;
        state.deployments.remove(name);
        Ok(())
    }
}

/// A deployment's replica count, stats, state and status, as its replicas make them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Progress {
    pub replica_count: i32,
    pub stats: ReplicaStats,
    pub state: i32,
    pub status: ResourceStatus,
}

/// What `replicas` (all of `entry`'s) make of a deployment that is not deleted: FAILED after
/// [`MAX_FAILURES`] replica failures with none ready (a ready replica clears the failures);
/// CREATING or UPDATING become READY once the desired count is ready; the status says what
/// the waiting replicas lack (RESOURCE_EXHAUSTED), else the last failure.
pub(crate) fn progress(entry: &DeploymentEntry, replicas: &[&ReplicaEntry]) -> Progress {
    let mut stats = ReplicaStats::default();
    for r in replicas {
        match r.state() {
            replica::State::PendingScheduling => stats.pending_scheduling_replica_count += 1,
            replica::State::DownloadingModel => stats.downloading_model_replica_count += 1,
            replica::State::Initializing => stats.initializing_replica_count += 1,
            replica::State::Ready => stats.ready_replica_count += 1,
            _ => {}
        }
    }
    let count = replicas.len() as i32;
    let d = &entry.deployment;
    let ready = stats.ready_replica_count;
    let failures = if ready > 0 { 0 } else { entry.failures };
    let desired = d.desired_replica_count;
    let mut state = d.state;
    let mut status = ResourceStatus::default();
    if failures >= MAX_FAILURES && ready == 0 {
        state = deployment::State::Failed as i32;
        status = d.status.clone().unwrap_or_default();
    } else {
        let starting = d.state == deployment::State::Creating as i32
            || d.state == deployment::State::Updating as i32;
        if starting && ready >= desired && (desired > 0 || count == 0) {
            state = deployment::State::Ready as i32;
        }
        if !entry.unplaced.is_empty() {
            status = ResourceStatus {
                code: tonic::Code::ResourceExhausted as i32,
                message: entry.unplaced.clone(),
            };
        } else if failures > 0 {
            status = d.status.clone().unwrap_or_default();
        }
    }
    Progress {
        replica_count: count,
        stats,
        state,
        status,
    }
}

#[cfg(test)]
mod tests;
