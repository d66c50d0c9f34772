//! DeleteDeployment (soft, or hard) and UndeleteDeployment.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_events::Body;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::{Deployment, deployed_model, deployment};

use crate::quota;
use crate::service::Scheduler;
use crate::state::DeploymentEntry;
use crate::time::now;
use kiln_core::Result;

impl Scheduler {
    pub(crate) async fn delete_deployment(
        &self,
        caller: &Principal,
        name: &str,
        hard: bool,
        ignore_checks: bool,
    ) -> Result<()> {
        let mut state = self.lock().await;
        let full = self
            .writable(&mut state, caller, "name", name)?
            .deployment
            .name
            .clone();
        let in_flight: i32 = state
            .replicas
            .values()
            .filter(|r| r.replica.deployment == full)
            .map(|r| r.load.in_flight_requests + r.load.queue_depth)
            .sum();
        if in_flight > 0 && !ignore_checks {
            return Err(Error::FailedPrecondition(format!(
                "{full} is serving {in_flight} requests; retry when idle, or set ignore_checks"
            )));
        }
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
