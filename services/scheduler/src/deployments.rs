//! Deployments: create, read, list, update, (soft) delete, undelete, scale. Handlers change
//! the stored resource and the in-memory mirror under the state lock, then wake the
//! reconcile pass, which does the placing.

use std::time::Duration;

use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_core::names::{self, ChildName, SYSTEM_ACCOUNT, validate_display_name};
use kiln_core::page::{FilterTerm, enum_filter_value, mask_paths};
use kiln_core::time::timestamp_to_micros;
use kiln_events::Body;
use kiln_proto::common::v1::{AcceleratorType, Status as ResourceStatus};
use kiln_proto::events::v1 as ev;
use kiln_proto::registry::v1::{Model, model};
use kiln_proto::scheduler::v1::{
    AutoscalingPolicy, DeployedModel, Deployment, ReplicaStats, deployed_model, deployment,
};
use kiln_store::listing::Listing;
use sea_orm::{ColumnTrait, Condition, EntityTrait, Order, QueryFilter};

use crate::db::deployment as rows;
use crate::error::Result;
use crate::placement;
use crate::quota;
use crate::service::{DeploymentEntry, Scheduler, State, decode, now};

/// Load target keys the autoscaler understands.
pub const LOAD_TARGET_KEYS: &[&str] = &[
    "concurrent_requests",
    "requests_per_second",
    "tokens_generated_per_second",
    "kv_cache_utilization",
];

/// The most accelerators one replica may ask for.
const MAX_ACCELERATORS: i32 = 64;
/// The most replicas a deployment may have.
const MAX_REPLICAS: i32 = 1000;

fn seconds(d: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d as i64,
        nanos: 0,
    }
}

pub fn duration_of(d: Option<&prost_types::Duration>) -> Duration {
    d.map(|d| {
        Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64)
    })
    .unwrap_or_default()
}

/// The policy with every left-out field at its default; errors name the bad field.
fn complete_policy(policy: Option<AutoscalingPolicy>) -> Result<AutoscalingPolicy> {
    let mut policy = policy.unwrap_or_default();
    for (field, value, default) in [
        ("scale_up_window", &mut policy.scale_up_window, 30),
        ("scale_down_window", &mut policy.scale_down_window, 600),
        (
            "scale_to_zero_window",
            &mut policy.scale_to_zero_window,
            3600,
        ),
    ] {
        match value {
            None => *value = Some(seconds(default)),
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(ApiError::invalid(
                    format!("deployment.autoscaling_policy.{field}"),
                    "must not be negative",
                )
                .into());
            }
            Some(_) => {}
        }
    }
    if policy.load_targets.is_empty() {
        policy
            .load_targets
            .insert("concurrent_requests".into(), 8.0);
    }
    for (key, target) in &policy.load_targets {
        if !LOAD_TARGET_KEYS.contains(&key.as_str()) {
            return Err(ApiError::invalid(
                format!("deployment.autoscaling_policy.load_targets[{key}]"),
                format!(
                    "is not a load target; use one of {}",
                    LOAD_TARGET_KEYS.join(", ")
                ),
            )
            .into());
        }
        if !(target.is_finite() && *target > 0.0) {
            return Err(ApiError::invalid(
                format!("deployment.autoscaling_policy.load_targets[{key}]"),
                "must be a positive number",
            )
            .into());
        }
    }
    Ok(policy)
}

/// A backend override: empty (the node chooses), tract or onnxruntime.
fn check_backend(backend: &str) -> Result<()> {
    if backend.is_empty() || ["tract", "onnxruntime"].contains(&backend) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "deployment.backend",
        format!("{backend:?} is not a backend; use tract or onnxruntime"),
    )
    .into())
}

fn check_max_context_length(length: i32) -> Result<()> {
    if length < 0 {
        return Err(
            ApiError::invalid("deployment.max_context_length", "must not be negative").into(),
        );
    }
    Ok(())
}

/// Checks min/max replica counts and fills max's default.
fn check_replica_bounds(d: &mut Deployment) -> Result<()> {
    if d.min_replica_count < 0 {
        return Err(
            ApiError::invalid("deployment.min_replica_count", "must not be negative").into(),
        );
    }
    if d.max_replica_count == 0 {
        d.max_replica_count = d.min_replica_count.max(1);
    }
    if d.max_replica_count < d.min_replica_count || d.max_replica_count > MAX_REPLICAS {
        return Err(ApiError::invalid(
            "deployment.max_replica_count",
            format!(
                "must be between min_replica_count ({}) and {MAX_REPLICAS}",
                d.min_replica_count
            ),
        )
        .into());
    }
    Ok(())
}

/// The size a replica must hold: the model's largest bundle, else its files.
pub fn model_bytes(model: &Model) -> i64 {
    let files: i64 = model.files.iter().map(|f| f.size_bytes).sum();
    model
        .prepared_bundles
        .iter()
        .map(|b| b.files.iter().map(|f| f.size_bytes).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(files)
}

impl Scheduler {
    /// A deployment the caller may read (its own account's, or a serverless one).
    pub(crate) fn readable<'s>(
        &self,
        state: &'s State,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<&'s DeploymentEntry> {
        let parsed = ChildName::parse(field, "deployments", name, Some(&caller.account))?;
        let full = parsed.to_string();
        match state.deployments.get(&full) {
            Some(entry)
                if caller.can_access(&parsed.account)
                    || entry.deployment.deployment_type
                        == deployment::DeploymentType::Serverless as i32 =>
            {
                Ok(entry)
            }
            _ => Err(ApiError::not_found(&parsed).into()),
        }
    }

    /// A deployment the caller may change: its own account's.
    pub(crate) fn writable<'s>(
        &self,
        state: &'s mut State,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<&'s mut DeploymentEntry> {
        let parsed = ChildName::parse(field, "deployments", name, Some(&caller.account))?;
        let full = parsed.to_string();
        match state.deployments.get_mut(&full) {
            Some(entry) if caller.can_access(&parsed.account) => Ok(entry),
            _ => Err(ApiError::not_found(&parsed).into()),
        }
    }

    /// The base model a deployment names, if the caller may use it and it can be served.
    async fn servable_base(&self, caller: &Principal, name: &str) -> Result<Model> {
        let field = "deployment.base_model";
        if name.is_empty() {
            return Err(ApiError::invalid(field, "is required").into());
        }
        let parsed = ChildName::parse(field, "models", name, Some(&caller.account))?;
        let model = match self.catalog().get_model(&parsed.to_string()).await {
            Ok(model) => model,
            Err(crate::Error::Remote(status)) if status.code() == tonic::Code::NotFound => {
                return Err(ApiError::not_found(&parsed).into());
            }
            Err(err) => return Err(err),
        };
        if !(model.public || caller.can_access(&parsed.account)) {
            return Err(ApiError::not_found(&parsed).into());
        }
        if model.kind == model::Kind::LoraAddon as i32 {
            return Err(ApiError::invalid(
                field,
                format!(
                    "{} is a LoRA addon: deploy its base model with enable_addons, then deploy the addon onto it",
                    model.name
                ),
            )
            .into());
        }
        if model.state != model::State::Ready as i32 {
            return Err(ApiError::FailedPrecondition(format!(
                "{} is not READY (state {})",
                model.name,
                model::State::try_from(model.state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("unknown")
            ))
            .into());
        }
        Ok(model)
    }

    pub async fn create_deployment(
        &self,
        caller: &Principal,
        parent: &str,
        deployment_id: String,
        mut d: Deployment,
        disable_auto_deploy: bool,
        validate_only: bool,
    ) -> Result<Deployment> {
        let parent = names::AccountName::parse("parent", parent)?;
        caller.check_access(&parent, &parent)?;
        validate_display_name("deployment.display_name", &d.display_name)?;
        let model = self.servable_base(caller, &d.base_model).await?;
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
                return Err(ApiError::invalid(
                    "deployment.deployment_type",
                    "only the kiln system account has SERVERLESS deployments; yours are DEDICATED",
                )
                .into());
            }
            Ok(kind) => kind,
        };
        if d.accelerator_count < 0 || d.accelerator_count > MAX_ACCELERATORS {
            return Err(ApiError::invalid(
                "deployment.accelerator_count",
                format!("must be between 1 and {MAX_ACCELERATORS}"),
            )
            .into());
        }
        if d.accelerator_count == 0 {
            d.accelerator_count = 1;
        }
        if AcceleratorType::try_from(d.accelerator_type).is_err() {
            return Err(ApiError::invalid(
                "deployment.accelerator_type",
                format!("{} is not an accelerator type", d.accelerator_type),
            )
            .into());
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
            return Err(ApiError::already_exists(&name).into());
        }
        let asked = Deployment {
            name: name.clone(),
            deployment_type: kind as i32,
            ..d.clone()
        };
        quota::check_deployment(limits.as_ref(), &state, &parent.account, None, &asked)?;
        let bytes = model_bytes(&model);
        if validate_only {
            let nodes = self.capacities(&state);
            let need = placement::Need {
                kind: d.accelerator_type,
                count: d.accelerator_count as usize,
                model_bytes: bytes,
            };
            let mut fresh = nodes.clone();
            if placement::place(&mut fresh, &[need])[0].is_none() {
                return Err(
                    ApiError::FailedPrecondition(placement::why_unplaced(&nodes, &need)).into(),
                );
            }
        }
        let created = now();
        let desired = d.min_replica_count.max(1).min(d.max_replica_count);
        let deployment = Deployment {
            name: name.clone(),
            display_name: if d.display_name.is_empty() {
                deployment_id.clone()
            } else {
                d.display_name.clone()
            },
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
            created_by: if caller.user.is_empty() {
                String::new()
            } else {
                caller.user_name()
            },
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

    pub async fn get_deployment(&self, caller: &Principal, name: &str) -> Result<Deployment> {
        let state = self.lock().await;
        Ok(self
            .readable(&state, caller, "name", name)?
            .deployment
            .clone())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn list_deployments(
        &self,
        caller: &Principal,
        parent: &str,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
        show_deleted: bool,
    ) -> Result<Listing<Deployment>> {
        let parent = names::AccountName::parse("parent", parent)?;
        let mut cond = Condition::all().add(rows::Column::AccountId.eq(parent.account.clone()));
        if !caller.can_access(&parent.account) {
            cond = cond.add(
                rows::Column::DeploymentType.eq(deployment::DeploymentType::Serverless as i32),
            );
        }
        if !show_deleted {
            cond = cond.add(rows::Column::State.ne(deployment::State::Deleted as i32));
        }
        for term in kiln_core::page::parse_filter(
            filter,
            &[
                "state",
                "base_model",
                "accelerator_type",
                "deployment_type",
                "display_name",
            ],
        )? {
            cond = cond.add(deployment_filter(&term)?);
        }
        let order = kiln_core::page::parse_order_by(
            order_by,
            &["name", "create_time", "update_time", "display_name"],
        )?
        .iter()
        .map(|k| {
            let col = match k.field.as_str() {
                "create_time" => rows::Column::CreateTime,
                "update_time" => rows::Column::UpdateTime,
                "display_name" => rows::Column::DisplayName,
                _ => rows::Column::DeploymentId,
            };
            (
                col,
                if k.descending {
                    Order::Desc
                } else {
                    Order::Asc
                },
            )
        })
        .collect();
        let scope = format!(
            "deployments|{parent}|{filter}|{order_by}|{show_deleted}|{}",
            caller.account
        );
        let page = kiln_store::listing::list_page(
            self.db(),
            self.pages(),
            rows::Entity::find().filter(cond),
            &scope,
            page_size,
            page_token,
            order,
            vec![rows::Column::DeploymentId],
        )
        .await?;
        // The stored row is a little behind the live counts: answer from memory where it has
        // the deployment.
        let state = self.lock().await;
        let mut items = Vec::with_capacity(page.items.len());
        for row in page.items {
            let stored: Deployment = decode(&row.resource)?;
            items.push(
                state
                    .deployments
                    .get(&stored.name)
                    .map(|e| e.deployment.clone())
                    .unwrap_or(stored),
            );
        }
        Ok(Listing {
            items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        })
    }

    pub async fn update_deployment(
        &self,
        caller: &Principal,
        update: Deployment,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<Deployment> {
        let account = ChildName::parse(
            "deployment.name",
            "deployments",
            &update.name,
            Some(&caller.account),
        )?
        .account_name()
        .account;
        // Read before the lock: an answer from billing never holds up the scheduler.
        let limits = if caller.can_access(&account) {
            quota::read_limits(self.quotas(), &account).await?
        } else {
            None
        };
        let mut state = self.lock().await;
        let before = self
            .writable(&mut state, caller, "deployment.name", &update.name)?
            .deployment
            .clone();
        if is_gone(&before) {
            return Err(ApiError::FailedPrecondition(format!(
                "{} is {}; undelete it first",
                before.name,
                state_name(before.state)
            ))
            .into());
        }
        let mut d = before.clone();
        let paths = mask_paths(mask);
        if paths.is_empty() {
            return Err(ApiError::invalid("update_mask", "name the fields to change").into());
        }
        let mut reroll = false;
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    validate_display_name("deployment.display_name", &update.display_name)?;
                    d.display_name = update.display_name.clone();
                }
                "description" => d.description = update.description.clone(),
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
                        return Err(ApiError::invalid(
                            "deployment.accelerator_type",
                            "must be an accelerator type",
                        )
                        .into());
                    }
                    d.accelerator_type = update.accelerator_type;
                    reroll = true;
                }
                "accelerator_count" => {
                    if !(1..=MAX_ACCELERATORS).contains(&update.accelerator_count) {
                        return Err(ApiError::invalid(
                            "deployment.accelerator_count",
                            format!("must be between 1 and {MAX_ACCELERATORS}"),
                        )
                        .into());
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
                    return Err(ApiError::invalid(
                        "update_mask",
                        format!("{other:?} is not an updatable field of a deployment"),
                    )
                    .into());
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
            return Err(ApiError::not_found(&d.name).into());
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
            let old: Vec<String> = state
                .replicas
                .values()
                .filter(|r| r.replica.deployment == d.name)
                .map(|r| r.replica.name.clone())
                .collect();
            for replica in old {
                self.stop_replica(&mut state, &replica, "deployment updated")
                    .await;
            }
        }
        drop(state);
        self.wake();
        Ok(d)
    }

    pub async fn delete_deployment(
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
            return Err(ApiError::FailedPrecondition(format!(
                "{full} is serving {in_flight} requests; retry when idle, or set ignore_checks"
            ))
            .into());
        }
        let entry = state.deployments.get_mut(&full).expect("found above");
        if entry.deployment.state == deployment::State::Deleted as i32 && !hard {
            return Err(ApiError::FailedPrecondition(format!("{full} is already deleted")).into());
        }
        let deleted_at = now();
        let purge = prost_types::Timestamp {
            seconds: deleted_at.seconds + self.config().purge_after_secs as i64,
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
        let models: Vec<DeployedModel> = state
            .deployed_models
            .values()
            .filter(|dm| dm.deployment == full)
            .cloned()
            .collect();
        for mut dm in models {
            if hard {
                self.delete_deployed_model_row(&dm).await?;
                state.deployed_models.remove(&dm.name);
            } else {
                self.set_deployed_model_state(&mut dm, deployed_model::State::Undeploying)
                    .await?;
                state.deployed_models.insert(dm.name.clone(), dm);
            }
        }
        let replicas: Vec<String> = state
            .replicas
            .values()
            .filter(|r| r.replica.deployment == full)
            .map(|r| r.replica.name.clone())
            .collect();
        for replica in replicas {
            self.stop_replica(&mut state, &replica, "deployment deleted")
                .await;
        }
        drop(state);
        self.wake();
        Ok(())
    }

    pub async fn undelete_deployment(&self, caller: &Principal, name: &str) -> Result<Deployment> {
        let account = ChildName::parse("name", "deployments", name, Some(&caller.account))?
            .account_name()
            .account;
        let limits = if caller.can_access(&account) {
            quota::read_limits(self.quotas(), &account).await?
        } else {
            None
        };
        let mut state = self.lock().await;
        let before = self
            .writable(&mut state, caller, "name", name)?
            .deployment
            .clone();
        if before.state != deployment::State::Deleted as i32
            && before.state != deployment::State::Deleting as i32
        {
            return Err(
                ApiError::FailedPrecondition(format!("{} is not deleted", before.name)).into(),
            );
        }
        if before.purge_time.is_none() {
            return Err(ApiError::FailedPrecondition(format!(
                "{} was deleted for good (hard) and cannot be restored",
                before.name
            ))
            .into());
        }
        quota::check_not_suspended(caller, &account)?;
        quota::check_deployment(limits.as_ref(), &state, &account, None, &before)?;
        let Some(entry) = state.deployments.get_mut(&before.name) else {
            return Err(ApiError::not_found(&before.name).into());
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
        let models: Vec<DeployedModel> = state
            .deployed_models
            .values()
            .filter(|dm| dm.deployment == d.name)
            .cloned()
            .collect();
        for mut dm in models {
            self.set_deployed_model_state(&mut dm, deployed_model::State::Deploying)
                .await?;
            state.deployed_models.insert(dm.name.clone(), dm);
        }
        drop(state);
        self.wake();
        Ok(d)
    }

    pub async fn scale_deployment(
        &self,
        caller: &Principal,
        name: &str,
        replica_count: i32,
    ) -> Result<Deployment> {
        if replica_count < 0 {
            return Err(ApiError::invalid("replica_count", "must not be negative").into());
        }
        let mut state = self.lock().await;
        let entry = self.writable(&mut state, caller, "name", name)?;
        if is_gone(&entry.deployment) {
            return Err(ApiError::FailedPrecondition(format!(
                "{} is {}",
                entry.deployment.name,
                state_name(entry.deployment.state)
            ))
            .into());
        }
        let d = &entry.deployment;
        let target = replica_count.clamp(d.min_replica_count, d.max_replica_count);
        if target == d.desired_replica_count {
            return Ok(d.clone());
        }
        // A hand-set count holds until load says otherwise for a whole window.
        entry.above_since = None;
        entry.below_since = None;
        entry.last_activity = std::time::Instant::now();
        self.set_desired(entry, target, "manual").await?;
        let d = entry.deployment.clone();
        drop(state);
        self.wake();
        Ok(d)
    }

    /// Sets the desired replica count, stored with its `deployment.scaled` event.
    pub(crate) async fn set_desired(
        &self,
        entry: &mut DeploymentEntry,
        desired: i32,
        reason: &str,
    ) -> Result<()> {
        let previous = entry.deployment.desired_replica_count;
        entry.deployment.desired_replica_count = desired;
        entry.deployment.update_time = Some(now());
        let result = self
            .save_deployment(
                entry,
                false,
                Some((
                    "scheduler.deployment.scaled",
                    Body::DeploymentScaled(ev::DeploymentScaled {
                        name: entry.deployment.name.clone(),
                        previous_desired_replica_count: previous,
                        desired_replica_count: desired,
                        reason: reason.to_owned(),
                    }),
                )),
                None,
            )
            .await;
        if result.is_err() {
            entry.deployment.desired_replica_count = previous;
        } else {
            tracing::info!(deployment = %entry.deployment.name, previous, desired, reason, "scaled");
        }
        result
    }

    pub(crate) async fn set_deployed_model_state(
        &self,
        dm: &mut DeployedModel,
        to: deployed_model::State,
    ) -> Result<()> {
        let previous = dm.state;
        if previous == to as i32 {
            return Ok(());
        }
        dm.state = to as i32;
        dm.update_time = Some(now());
        self.save_deployed_model(
            dm,
            false,
            "scheduler.deployed_model.state_changed",
            Body::DeployedModelStateChanged(ev::DeployedModelStateChanged {
                deployed_model: Some(dm.clone()),
                previous_state: previous,
            }),
        )
        .await
    }
}

/// For a deployment that leaves the type out: the GPU kind most nodes offer, else CPU.
fn default_accelerator(state: &State) -> i32 {
    let mut counts: std::collections::BTreeMap<i32, usize> = Default::default();
    for node in state.nodes.values().filter(|n| n.is_ready()) {
        for group in &node.node.accelerators {
            if group.r#type != AcceleratorType::Cpu as i32 && group.count > 0 {
                *counts.entry(group.r#type).or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .max_by_key(|(kind, n)| (*n, -kind))
        .map(|(kind, _)| kind)
        .unwrap_or(AcceleratorType::Cpu as i32)
}

pub(crate) fn is_gone(d: &Deployment) -> bool {
    d.state == deployment::State::Deleted as i32 || d.state == deployment::State::Deleting as i32
}

pub(crate) fn state_name(state: i32) -> &'static str {
    deployment::State::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("STATE_UNSPECIFIED")
}

fn deployment_filter(term: &FilterTerm) -> Result<sea_orm::sea_query::SimpleExpr> {
    let value: sea_orm::Value = match term.field.as_str() {
        "state" => enum_filter_value("state", &term.value, |s| {
            deployment::State::from_str_name(s).map(|v| v as i32)
        })?
        .into(),
        "accelerator_type" => enum_filter_value("accelerator_type", &term.value, |s| {
            AcceleratorType::from_str_name(s).map(|v| v as i32)
        })?
        .into(),
        "deployment_type" => enum_filter_value("deployment_type", &term.value, |s| {
            deployment::DeploymentType::from_str_name(s).map(|v| v as i32)
        })?
        .into(),
        _ => term.value.clone().into(),
    };
    let column = match term.field.as_str() {
        "state" => rows::Column::State,
        "accelerator_type" => rows::Column::AcceleratorType,
        "deployment_type" => rows::Column::DeploymentType,
        "display_name" => rows::Column::DisplayName,
        _ => rows::Column::BaseModel,
    };
    Ok(if term.negated {
        column.ne(value)
    } else {
        column.eq(value)
    })
}

/// Seconds between two timestamps (for replica accelerator-seconds).
pub(crate) fn seconds_between(
    from: Option<&prost_types::Timestamp>,
    to: &prost_types::Timestamp,
) -> f64 {
    from.map(|f| (timestamp_to_micros(to) - timestamp_to_micros(f)).max(0) as f64 / 1e6)
        .unwrap_or(0.0)
}
