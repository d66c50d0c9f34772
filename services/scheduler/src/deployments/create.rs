//! CreateDeployment, and the deployed model it makes unless told not to.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::names::{self, ChildName, SYSTEM_ACCOUNT, validate_display_name};
use kiln_events::Body;
use kiln_proto::common::v1::{AcceleratorType, Status as ResourceStatus};
use kiln_proto::events::v1 as ev;
use kiln_proto::registry::v1::model;
use kiln_proto::scheduler::v1::{
    DeployedModel, Deployment, ReplicaStats, deployed_model, deployment,
};

use super::rules::{
    MAX_ACCELERATORS, check_backend, check_max_context_length, check_replica_bounds,
    complete_policy, default_accelerator, model_bytes,
};
use crate::placement;
use crate::quota;
use crate::replicas::capacities;
use crate::service::Scheduler;
use crate::state::{DeploymentEntry, State};
use crate::time::now;
use kiln_core::Result;

impl Scheduler {
    pub async fn create_deployment(
        &self,
        caller: &Principal,
        parent: &str,
        deployment_id: String,
        mut d: Deployment,
        disable_auto_deploy: bool,
        validate_only: bool,
    ) -> Result<Deployment> {
        let parent = caller.own_parent(parent)?;
        validate_display_name("deployment.display_name", &d.display_name)?;
        names::validate_text("deployment.description", &d.description)?;
        let model = self.servable_base(caller, &d.base_model).await?;
        // An addon as the base is served live-merged into its own base model; it takes no
        // further addons.
        if model.kind == model::Kind::LoraAddon as i32 && d.enable_addons {
            return Err(Error::invalid(
                "deployment.enable_addons",
                format!(
                    "{} is a LoRA addon, served merged into its base: it takes no further addons",
                    model.name
                ),
            ));
        }
        let model_id = ChildName::parse("deployment.base_model", "models", &model.name, None)?.id;
        let deployment_id = if deployment_id.is_empty() {
            let suffix = uuid::Uuid::new_v4().simple().to_string();
            format!("{}-{}", names::slugify(&model_id, 54), &suffix[..8])
        } else {
            names::validate_id("deployment_id", &deployment_id)?;
            deployment_id
        };
        let system = parent.account == SYSTEM_ACCOUNT;
        let kind = match deployment::DeploymentType::try_from(d.deployment_type) {
            Ok(deployment::DeploymentType::Unspecified) | Err(_) if system => {
                deployment::DeploymentType::Serverless
            }
            Ok(deployment::DeploymentType::Unspecified) | Err(_) => {
                deployment::DeploymentType::Dedicated
            }
            Ok(deployment::DeploymentType::Serverless) if !system => {
                return Err(Error::invalid(
                    "deployment.deployment_type",
                    "only the kiln system account has SERVERLESS deployments; yours are DEDICATED",
                ));
            }
            Ok(kind) => kind,
        };
        if d.accelerator_count < 0 || d.accelerator_count > MAX_ACCELERATORS {
            return Err(Error::invalid(
                "deployment.accelerator_count",
                format!("must be between 1 and {MAX_ACCELERATORS}"),
            ));
        }
        if d.accelerator_count == 0 {
            d.accelerator_count = 1;
        }
        if AcceleratorType::try_from(d.accelerator_type).is_err() {
            return Err(Error::invalid(
                "deployment.accelerator_type",
                format!("{} is not an accelerator type", d.accelerator_type),
            ));
        }
        check_backend(&d.backend)?;
        check_max_context_length(d.max_context_length)?;
        check_replica_bounds(&mut d)?;
        let policy = complete_policy(d.autoscaling_policy.take())?;
        quota::check_not_suspended(caller, &parent.account)?;
        if d.accelerator_type == AcceleratorType::Unspecified as i32 {
            d.accelerator_type = default_accelerator(&*self.lock().await);
        }
        let limits = quota::read_limits(self.quotas(), &parent.account).await?;
        let mut state = self.lock().await;
        let name = format!("{parent}/deployments/{deployment_id}");
        if state.deployments.contains_key(&name) {
            return Err(Error::already_exists(&name));
        }
        let asked = Deployment {
            name: name.clone(),
            deployment_type: kind as i32,
            ..d.clone()
        };
        quota::check_deployment(limits.as_ref(), &state, &parent.account, None, &asked)?;
        let bytes = model_bytes(&model);
        if validate_only {
            let nodes = capacities(&state);
            let need = placement::Need {
                kind: d.accelerator_type,
                count: d.accelerator_count as usize,
                model_bytes: bytes,
            };
            let mut fresh = nodes.clone();
            if placement::place(&mut fresh, &[need])[0].is_none() {
                return Err(Error::FailedPrecondition(placement::why_unplaced(
                    &nodes, &need,
                )));
            }
        }
        let created = now();
        let desired = d.min_replica_count.max(1).min(d.max_replica_count);
        let deployment = Deployment {
            name: name.clone(),
            display_name: names::display_name_or(&d.display_name, &deployment_id),
            description: d.description.clone(),
            create_time: Some(created),
            update_time: Some(created),
            expire_time: d.expire_time,
            state: deployment::State::Creating as i32,
            status: Some(ResourceStatus::default()),
            base_model: model.name.clone(),
            accelerator_type: d.accelerator_type,
            accelerator_count: d.accelerator_count,
            precision: d.precision,
            min_replica_count: d.min_replica_count,
            max_replica_count: d.max_replica_count,
            desired_replica_count: desired,
            replica_count: 0,
            replica_stats: Some(ReplicaStats::default()),
            autoscaling_policy: Some(policy),
            enable_addons: d.enable_addons,
            deployment_type: kind as i32,
            backend: d.backend.clone(),
            max_context_length: d.max_context_length,
            num_peft_device_cached: d.num_peft_device_cached,
            created_by: caller.creator(),
            ..Default::default()
        };
        if validate_only {
            return Ok(deployment);
        }
        let entry = DeploymentEntry::new(deployment.clone(), bytes);
        let deployed = if disable_auto_deploy {
            None
        } else {
            let id = self.free_deployed_model_id(&state, &parent.account, &model_id);
            let is_default = !state.deployed_models.values().any(|dm| {
                dm.model == model.name && dm.default && dm.name.starts_with(&format!("{parent}/"))
            });
            Some(DeployedModel {
                name: format!("{parent}/deployedModels/{id}"),
                display_name: model.display_name.clone(),
                description: String::new(),
                create_time: Some(created),
                update_time: Some(created),
                model: model.name.clone(),
                deployment: name.clone(),
                default: is_default,
                state: deployed_model::State::Deploying as i32,
                serverless: kind == deployment::DeploymentType::Serverless,
                status: Some(ResourceStatus::default()),
                public: kind == deployment::DeploymentType::Serverless && model.public,
            })
        };
        self.save_deployment(
            &entry,
            true,
            Some((
                "scheduler.deployment.created",
                Body::DeploymentCreated(ev::DeploymentCreated {
                    deployment: Some(deployment.clone()),
                }),
            )),
            deployed.as_ref().map(|dm| {
                (
                    dm,
                    "scheduler.deployed_model.created",
                    Body::DeployedModelCreated(ev::DeployedModelCreated {
                        deployed_model: Some(dm.clone()),
                    }),
                )
            }),
        )
        .await?;
        state.deployments.insert(name, entry);
        if let Some(dm) = deployed {
            state.deployed_models.insert(dm.name.clone(), dm);
        }
        drop(state);
        self.wake();
        Ok(deployment)
    }

    /// A deployed-model ID in `account` derived from `model_id`, not taken yet.
    pub(crate) fn free_deployed_model_id(
        &self,
        state: &State,
        account: &str,
        model_id: &str,
    ) -> String {
        let taken = |id: &str| {
            state
                .deployed_models
                .contains_key(&format!("accounts/{account}/deployedModels/{id}"))
        };
        if !taken(model_id) {
            return model_id.to_owned();
        }
        (2..)
            .map(|n| {
                let suffix = format!("-{n}");
                format!("{}{suffix}", names::slugify(model_id, 63 - suffix.len()))
            })
            .find(|id| !taken(id))
            .expect("some suffix is free")
    }
}
