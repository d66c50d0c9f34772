//! UpdateDeployment and ScaleDeployment.

use kiln_core::Error;
use std::time::Instant;

use kiln_core::auth::Principal;
use kiln_core::grpc::Update;
use kiln_core::names::validate_display_name;
use kiln_events::Body;
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::{Deployment, deployment};

use super::rules::{
    MAX_ACCELERATORS, check_backend, check_max_context_length, check_replica_bounds,
    complete_policy,
};
use crate::autoscale::Timers;
use crate::quota;
use crate::resource::{is_gone, state_name};
use crate::service::Scheduler;
use crate::state::DeploymentEntry;
use crate::time::now;
use kiln_core::Result;

impl Scheduler {
    pub(crate) async fn update_deployment(
        &self,
        caller: &Principal,
        request: Update<Deployment>,
    ) -> Result<Deployment> {
        // Every field of a deployment has a meaningful default: the mask must name them.
        let paths = request.paths(&[]);
        let update = request.resource;
        let (account, limits) = self
            .account_limits(caller, "deployment.name", &update.name)
            .await?;
        let mut state = self.lock().await;
        let before = self
            .writable(&mut state, caller, "deployment.name", &update.name)?
            .deployment
            .clone();
        if is_gone(&before) {
            return Err(Error::FailedPrecondition(format!(
                "{} is {}; undelete it first",
                before.name,
                state_name(before.state)
            )));
        }
        let mut d = before.clone();
        if paths.is_empty() {
            return Err(Error::invalid("update_mask", "name the fields to change"));
        }
        let mut reroll = false;
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    validate_display_name("deployment.display_name", &update.display_name)?;
                    d.display_name = update.display_name.clone();
                }
                "description" => {
                    kiln_core::names::validate_text("deployment.description", &update.description)?;
                    d.description = update.description.clone();
                }
                "expire_time" => d.expire_time = update.expire_time,
                "min_replica_count" => d.min_replica_count = update.min_replica_count,
                "max_replica_count" => d.max_replica_count = update.max_replica_count,
                "autoscaling_policy" => {
                    d.autoscaling_policy = Some(complete_policy(update.autoscaling_policy.clone())?)
                }
                "enable_addons" => d.enable_addons = update.enable_addons,
                "num_peft_device_cached" => {
                    d.num_peft_device_cached = update.num_peft_device_cached
                }
                "max_context_length" => {
                    check_max_context_length(update.max_context_length)?;
                    d.max_context_length = update.max_context_length;
                    reroll = true;
                }
                "accelerator_type" => {
                    if AcceleratorType::try_from(update.accelerator_type).is_err()
                        || update.accelerator_type == AcceleratorType::Unspecified as i32
                    {
                        return Err(Error::invalid(
                            "deployment.accelerator_type",
                            "must be an accelerator type",
                        ));
                    }
                    d.accelerator_type = update.accelerator_type;
                    reroll = true;
                }
                "accelerator_count" => {
                    if !(1..=MAX_ACCELERATORS).contains(&update.accelerator_count) {
                        return Err(Error::invalid(
                            "deployment.accelerator_count",
                            format!("must be between 1 and {MAX_ACCELERATORS}"),
                        ));
                    }
                    d.accelerator_count = update.accelerator_count;
                    reroll = true;
                }
                "precision" => {
                    d.precision = update.precision;
                    reroll = true;
                }
                "backend" => {
                    check_backend(&update.backend)?;
                    d.backend = update.backend.clone();
                    reroll = true;
                }
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!("{other:?} is not an updatable field of a deployment"),
                    ));
                }
            }
        }
        check_replica_bounds(&mut d)?;
        d.desired_replica_count = d
            .desired_replica_count
            .clamp(d.min_replica_count, d.max_replica_count);
        if d == before {
            return Ok(d);
        }
        quota::check_not_suspended(caller, &account)?;
        quota::check_deployment(limits.as_ref(), &state, &account, Some(&before), &d)?;
        let Some(entry) = state.deployments.get_mut(&d.name) else {
            return Err(Error::not_found(&d.name));
        };
        d.update_time = Some(now());
        if reroll {
            // New hardware or settings: every replica is replaced (the pass starts new ones
            // as the old stop).
            d.state = deployment::State::Updating as i32;
        }
        if d.state == deployment::State::Failed as i32 {
            d.state = deployment::State::Updating as i32;
        }
        entry.deployment = d.clone();
        entry.failures = 0;
        let event = (
            "scheduler.deployment.updated",
            Body::DeploymentUpdated(ev::DeploymentUpdated {
                deployment: Some(d.clone()),
                update_mask: Some(prost_types::FieldMask {
                    paths: paths.clone(),
                }),
            }),
        );
        let snapshot = DeploymentEntry::new(d.clone(), entry.model_bytes);
        if let Err(err) = self
            .save_deployment(&snapshot, false, Some(event), None)
            .await
        {
            // Keep memory as stored.
            if let Some(entry) = state.deployments.get_mut(&d.name) {
                entry.deployment = before;
            }
            return Err(err);
        }
        if reroll {
            self.stop_replicas_of(&mut state, &d.name, "deployment updated")
                .await;
        }
        drop(state);
        self.wake();
        Ok(d)
    }

    pub(crate) async fn scale_deployment(
        &self,
        caller: &Principal,
        name: &str,
        replica_count: i32,
    ) -> Result<Deployment> {
        if replica_count < 0 {
            return Err(Error::invalid("replica_count", "must not be negative"));
        }
        let mut state = self.lock().await;
        let entry = self.writable(&mut state, caller, "name", name)?;
        if is_gone(&entry.deployment) {
            return Err(Error::FailedPrecondition(format!(
                "{} is {}",
                entry.deployment.name,
                state_name(entry.deployment.state)
            )));
        }
        let d = &entry.deployment;
        let target = replica_count.clamp(d.min_replica_count, d.max_replica_count);
        if target == d.desired_replica_count {
            return Ok(d.clone());
        }
        // A hand-set count holds until load says otherwise for a whole window.
        entry.timers = Timers::new(Instant::now());
        self.set_desired(entry, target, "manual").await?;
        let d = entry.deployment.clone();
        drop(state);
        self.wake();
        Ok(d)
    }
}
