//! DeleteDeployment (soft, or hard) and UndeleteDeployment.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_events::Body;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::{Deployment, deployed_model, deployment};

use crate::quota;
use crate::service::Scheduler;
use crate::state::{DeploymentEntry, State};
use crate::time::now;
use kiln_core::Result;
use std::time::Instant;

impl Scheduler {
    pub(crate) async fn delete_deployment(
        &self,
        caller: &Principal,
        name: &str,
        hard: bool,
        ignore_checks: bool,
    ) -> Result<()> {
        // Load comes with heartbeats, so what the scheduler holds may be a heartbeat old
        // either way: a request that just ended can still count, one that just began may not
        // yet. The check waits (a heartbeat interval or two) for every node holding a replica
        // of the deployment to report after this call began.
        let asked = Instant::now();
        let deadline = asked + 2 * self.config().heartbeat_interval;
        let mut reports = self.load_reports();
        let (mut state, full) = loop {
            let mut state = self.lock().await;
            let full = self
                .writable(&mut state, caller, "name", name)?
                .deployment
                .name
                .clone();
            if ignore_checks {
                break (state, full);
            }
            let load = load_of(&state, &full, asked);
            if !load.fresh && Instant::now() < deadline {
                drop(state);
                // A heartbeat came (look again), or the deadline passed (decide on what is known).
                let _ = tokio::time::timeout_at(deadline.into(), reports.changed()).await;
                continue;
            }
            if load.in_flight > 0 {
                let is = if load.fresh {
                    "is"
                } else {
                    "was, at its nodes' last report,"
                };
                return Err(Error::FailedPrecondition(format!(
                    "{full} {is} serving {} requests; retry when idle, or set ignore_checks",
                    load.in_flight
                )));
            }
            break (state, full);
        };
        let entry = state.deployments.get_mut(&full).expect("found above");
        if entry.deployment.state == deployment::State::Deleted as i32 && !hard {
            return Err(Error::FailedPrecondition(format!(
                "{full} is already deleted"
            )));
        }
        let deleted_at = now();
        let purge = prost_types::Timestamp {
            seconds: deleted_at.seconds + self.config().purge_after.as_secs() as i64,
            nanos: 0,
        };
        let d = &mut entry.deployment;
        d.state = deployment::State::Deleting as i32;
        d.delete_time = Some(deleted_at);
        d.purge_time = (!hard).then_some(purge);
        d.desired_replica_count = 0;
        d.update_time = Some(deleted_at);
        let snapshot = DeploymentEntry::new(d.clone(), entry.model_bytes);
        self.save_deployment(
            &snapshot,
            false,
            Some((
                "scheduler.deployment.deleted",
                Body::DeploymentDeleted(ev::DeploymentDeleted {
                    name: full.clone(),
                    hard,
                    purge_time: (!hard).then_some(purge),
                }),
            )),
            None,
        )
        .await?;
        // Its deployed models stop taking requests now; soft-deleted ones come back on
        // undelete, hard-deleted ones go with the deployment.
        for mut dm in state.deployed_models_of(&full) {
            if hard {
                self.delete_deployed_model_row(&dm).await?;
                state.deployed_models.remove(&dm.name);
            } else {
                self.set_deployed_model_state(&mut dm, deployed_model::State::Undeploying)
                    .await?;
                state.deployed_models.insert(dm.name.clone(), dm);
            }
        }
        self.stop_replicas_of(&mut state, &full, "deployment deleted")
            .await;
        drop(state);
        self.wake();
        Ok(())
    }

    pub(crate) async fn undelete_deployment(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<Deployment> {
        let (account, limits) = self.account_limits(caller, "name", name).await?;
        let mut state = self.lock().await;
        let before = self
            .writable(&mut state, caller, "name", name)?
            .deployment
            .clone();
        if before.state != deployment::State::Deleted as i32
            && before.state != deployment::State::Deleting as i32
        {
            return Err(Error::FailedPrecondition(format!(
                "{} is not deleted",
                before.name
            )));
        }
        if before.purge_time.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "{} was deleted for good (hard) and cannot be restored",
                before.name
            )));
        }
        quota::check_not_suspended(caller, &account)?;
        quota::check_deployment(limits.as_ref(), &state, &account, None, &before)?;
        let Some(entry) = state.deployments.get_mut(&before.name) else {
            return Err(Error::not_found(&before.name));
        };
        let d = &mut entry.deployment;
        d.state = deployment::State::Creating as i32;
        d.delete_time = None;
        d.purge_time = None;
        d.desired_replica_count = d.min_replica_count.max(1).min(d.max_replica_count);
        d.update_time = Some(now());
        d.status = Some(ResourceStatus::default());
        entry.failures = 0;
        let d = d.clone();
        let snapshot = DeploymentEntry::new(d.clone(), entry.model_bytes);
        self.save_deployment(
            &snapshot,
            false,
            Some((
                "scheduler.deployment.undeleted",
                Body::DeploymentUndeleted(ev::DeploymentUndeleted {
                    deployment: Some(d.clone()),
                }),
            )),
            None,
        )
        .await?;
        for mut dm in state.deployed_models_of(&d.name) {
            self.set_deployed_model_state(&mut dm, deployed_model::State::Deploying)
                .await?;
            state.deployed_models.insert(dm.name.clone(), dm);
        }
        drop(state);
        self.wake();
        Ok(d)
    }
}

/// A deployment's requests in flight or queued, by its replicas' last reported load.
#[derive(Debug, PartialEq)]
struct Load {
    in_flight: i32,
    /// Every node holding one of its replicas reported after the moment asked about.
    fresh: bool,
}

fn load_of(state: &State, deployment: &str, since: Instant) -> Load {
    let mut load = Load {
        in_flight: 0,
        fresh: true,
    };
    for r in state.replicas.values() {
        if r.replica.deployment != deployment || r.replica.node.is_empty() {
            continue;
        }
        load.in_flight += (r.load.in_flight_requests + r.load.queue_depth).max(0);
        load.fresh &= state
            .nodes
            .get(&r.replica.node)
            .and_then(|n| n.last_load)
            .is_some_and(|at| at > since);
    }
    load
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::fixtures::{node, replica, state};
    use kiln_proto::scheduler::v1::node::State as NodeState;
    use kiln_proto::scheduler::v1::replica::State as ReplicaState;

    const CHAT: &str = "accounts/acme/deployments/chat";

    #[test]
    fn the_load_is_fresh_once_every_node_holding_a_replica_reported_after_the_question() {
        let before = Instant::now();
        let asked = before + Duration::from_millis(10);
        let after = asked + Duration::from_millis(10);
        let ready = ReplicaState::Ready;
        let mut s = state(
            vec![],
            vec![
                node("a", NodeState::Ready, 1),
                node("b", NodeState::Ready, 1),
            ],
            vec![
                replica("chat", "r1", "a", ready, 0),
                replica("chat", "r2", "b", ready, 0),
                replica("chat", "unplaced", "", ReplicaState::PendingScheduling, 0),
                replica("other", "r3", "b", ready, 0),
            ],
        );
        let load = |s: &State, in_flight, fresh| {
            assert_eq!(load_of(s, CHAT, asked), Load { in_flight, fresh });
        };
        // Nodes that never reported load: nothing known yet, even about an idle replica.
        load(&s, 0, false);
        for r in s.replicas.values_mut() {
            r.load.in_flight_requests = 1;
        }
        s.replicas
            .values_mut()
            .find(|r| r.replica.node == "nodes/a")
            .unwrap()
            .load
            .queue_depth = 2;
        load(&s, 4, false);
        // One node reported since the question, the other before it: not fresh yet.
        s.nodes.get_mut("nodes/a").unwrap().last_load = Some(after);
        s.nodes.get_mut("nodes/b").unwrap().last_load = Some(before);
        load(&s, 4, false);
        // Both did: fresh. The unplaced replica (no node reports for it) is not counted.
        s.nodes.get_mut("nodes/b").unwrap().last_load = Some(after);
        load(&s, 4, true);
        // Another deployment's load is not this one's; one with no replicas is idle and known.
        let none = load_of(&s, "accounts/acme/deployments/none", asked);
        assert_eq!(
            none,
            Load {
                in_flight: 0,
                fresh: true
            }
        );
    }
}
