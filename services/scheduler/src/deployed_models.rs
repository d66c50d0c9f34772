//! Deployed models: a base model or LoRA addon on a deployment, the name requests use.

use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_core::names::{self, ChildName, validate_display_name};
use kiln_core::page::mask_paths;
use kiln_events::Body;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1 as ev;
use kiln_proto::registry::v1::model;
use kiln_proto::scheduler::v1::{DeployedModel, deployed_model, deployment};
use kiln_store::listing::Listing;

use crate::error::Result;
use crate::resource::{account_of, is_gone, own_parent};
use crate::service::Scheduler;
use crate::state::State;
use crate::time::now;

/// What a caller means to do with a deployed model.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Read it: its own account's, or a public one.
    Read,
    /// Change it: its own account's only.
    Write,
}

/// The deployed model `name` (in `field`) if the caller may have it for `access`; NOT_FOUND
/// otherwise, so others' deployed models do not show.
fn find<'s>(
    state: &'s State,
    caller: &Principal,
    field: &str,
    name: &str,
    access: Access,
) -> Result<&'s DeployedModel> {
    let parsed = ChildName::parse(field, "deployedModels", name, Some(&caller.account))?;
    match state.deployed_models.get(&parsed.to_string()) {
        Some(dm) if caller.can_access(&parsed.account) || (access == Access::Read && dm.public) => {
            Ok(dm)
        }
        _ => Err(ApiError::not_found(&parsed).into()),
    }
}

impl Scheduler {
    pub(crate) async fn create_deployed_model(
        &self,
        caller: &Principal,
        parent: &str,
        deployed_model_id: String,
        dm: DeployedModel,
    ) -> Result<DeployedModel> {
        let parent = own_parent(caller, parent)?;
        validate_display_name("deployed_model.display_name", &dm.display_name)?;
        if dm.public && !caller.is_privileged() {
            return Err(ApiError::PermissionDenied(
                "only a platform admin makes deployed models public".into(),
            )
            .into());
        }
        if dm.model.is_empty() {
            return Err(ApiError::invalid("deployed_model.model", "is required").into());
        }
        if dm.deployment.is_empty() {
            return Err(ApiError::invalid("deployed_model.deployment", "is required").into());
        }
        let model_name = ChildName::parse(
            "deployed_model.model",
            "models",
            &dm.model,
            Some(&caller.account),
        )?;
        let model = match self.catalog().get_model(&model_name.to_string()).await {
            Ok(m) if m.public || caller.can_access(&model_name.account) => m,
            Ok(_) => return Err(ApiError::not_found(&model_name).into()),
            Err(crate::Error::Remote(s)) if s.code() == tonic::Code::NotFound => {
                return Err(ApiError::not_found(&model_name).into());
            }
            Err(e) => return Err(e),
        };
        if model.state != model::State::Ready as i32 {
            return Err(
                ApiError::FailedPrecondition(format!("{} is not READY", model.name)).into(),
            );
        }
        let mut state = self.lock().await;
        let target = self.readable(&state, caller, "deployed_model.deployment", &dm.deployment)?;
        let d = target.deployment.clone();
        if !caller.can_access(&account_of(&d.name)) {
            return Err(ApiError::not_found(&d.name).into());
        }
        if is_gone(&d) {
            return Err(ApiError::FailedPrecondition(format!("{} is deleted", d.name)).into());
        }
        if model.kind == model::Kind::LoraAddon as i32 {
            let base = model
                .peft_details
                .as_ref()
                .map(|p| p.base_model.as_str())
                .unwrap_or_default();
            if base != d.base_model {
                return Err(ApiError::invalid(
                    "deployed_model.model",
                    format!(
                        "{} is an addon of {base}; {} serves {}",
                        model.name, d.name, d.base_model
                    ),
                )
                .into());
            }
            if !d.enable_addons {
                return Err(ApiError::FailedPrecondition(format!(
                    "{} does not take addons (set enable_addons)",
                    d.name
                ))
                .into());
            }
        } else if model.name != d.base_model {
            return Err(ApiError::invalid(
                "deployed_model.model",
                format!("{} serves {}, not {}", d.name, d.base_model, model.name),
            )
            .into());
        }
        let model_id = model_name.id.clone();
        let id = if deployed_model_id.is_empty() {
            self.free_deployed_model_id(&state, &parent.account, &model_id)
        } else {
            names::validate_id("deployed_model_id", &deployed_model_id)?;
            deployed_model_id
        };
        let name = format!("{parent}/deployedModels/{id}");
        if state.deployed_models.contains_key(&name) {
            return Err(ApiError::already_exists(&name).into());
        }
        let has_default = state.deployed_models.values().any(|other| {
            other.model == model.name
                && other.default
                && other.name.starts_with(&format!("{parent}/"))
        });
        let created = now();
        let serverless = d.deployment_type == deployment::DeploymentType::Serverless as i32;
        // An addon is DEPLOYED only once the replicas hold it (the reconcile pass sees to it).
        let ready = d.state == deployment::State::Ready as i32 && model.name == d.base_model;
        let new = DeployedModel {
            name: name.clone(),
            display_name: if dm.display_name.is_empty() {
                model.display_name.clone()
            } else {
                dm.display_name.clone()
            },
            description: dm.description.clone(),
            create_time: Some(created),
            update_time: Some(created),
            model: model.name.clone(),
            deployment: d.name.clone(),
            default: dm.default || !has_default,
            state: if ready {
                deployed_model::State::Deployed
            } else {
                deployed_model::State::Deploying
            } as i32,
            serverless,
            status: Some(ResourceStatus::default()),
            public: dm.public,
        };
        if new.default && has_default {
            self.clear_default(&mut state, &parent.account, &model.name)
                .await?;
        }
        self.save_deployed_model(
            &new,
            true,
            "scheduler.deployed_model.created",
            Body::DeployedModelCreated(ev::DeployedModelCreated {
                deployed_model: Some(new.clone()),
            }),
        )
        .await?;
        state.deployed_models.insert(name, new.clone());
        drop(state);
        self.wake();
        Ok(new)
    }

    /// Takes `default` off the account's current default deployed model of `model`.
    async fn clear_default(&self, state: &mut State, account: &str, model: &str) -> Result<()> {
        let prefix = format!("accounts/{account}/");
        let current: Vec<String> = state
            .deployed_models
            .values()
            .filter(|dm| dm.model == model && dm.default && dm.name.starts_with(&prefix))
            .map(|dm| dm.name.clone())
            .collect();
        for name in current {
            let mut dm = state.deployed_models[&name].clone();
            dm.default = false;
            self.save_deployed_model_update(&mut dm, vec!["default".into()])
                .await?;
            state.deployed_models.insert(name, dm);
        }
        Ok(())
    }

    pub(crate) async fn get_deployed_model(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<DeployedModel> {
        let state = self.lock().await;
        Ok(find(&state, caller, "name", name, Access::Read)?.clone())
    }

    pub async fn list_deployed_models(
        &self,
        caller: &Principal,
        parent: &str,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<Listing<DeployedModel>> {
        let parent = names::AccountName::parse("parent", parent)?;
        let terms = kiln_core::page::parse_filter(
            filter,
            &[
                "state",
                "model",
                "deployment",
                "default",
                "serverless",
                "public",
            ],
        )?;
        let order = kiln_core::page::parse_order_by(
            order_by,
            &["name", "create_time", "update_time", "display_name"],
        )?;
        let prefix = format!("{parent}/");
        let state = self.lock().await;
        let mut items: Vec<DeployedModel> = state
            .deployed_models
            .values()
            .filter(|dm| dm.name.starts_with(&prefix))
            .filter(|dm| caller.can_access(&parent.account) || dm.public)
            .cloned()
            .collect();
        drop(state);
        for term in &terms {
            let keep = |dm: &DeployedModel| -> Result<bool> {
                let bool_of = |v: &str| match v {
                    "true" => Ok(true),
                    "false" => Ok(false),
                    other => Err(ApiError::invalid(
                        "filter",
                        format!("{} is true or false, got {other:?}", term.field),
                    )),
                };
                Ok(match term.field.as_str() {
                    "state" => {
                        dm.state
                            == kiln_core::page::enum_filter_value("state", &term.value, |s| {
                                deployed_model::State::from_str_name(s).map(|v| v as i32)
                            })?
                    }
                    "model" => dm.model == term.value,
                    "deployment" => dm.deployment == term.value,
                    "default" => dm.default == bool_of(&term.value)?,
                    "serverless" => dm.serverless == bool_of(&term.value)?,
                    _ => dm.public == bool_of(&term.value)?,
                })
            };
            let mut kept = Vec::with_capacity(items.len());
            for dm in items {
                if keep(&dm)? != term.negated {
                    kept.push(dm);
                }
            }
            items = kept;
        }
        for key in order.iter().rev() {
            let micros = |t: &Option<prost_types::Timestamp>| {
                t.as_ref()
                    .map(kiln_core::time::timestamp_to_micros)
                    .unwrap_or(0)
            };
            items.sort_by(|a, b| {
                let o = match key.field.as_str() {
                    "create_time" => micros(&a.create_time).cmp(&micros(&b.create_time)),
                    "update_time" => micros(&a.update_time).cmp(&micros(&b.update_time)),
                    "display_name" => a.display_name.cmp(&b.display_name),
                    _ => a.name.cmp(&b.name),
                };
                if key.descending { o.reverse() } else { o }
            });
        }
        let scope = format!(
            "deployedModels|{parent}|{filter}|{order_by}|{}",
            caller.account
        );
        let page =
            kiln_core::page::Page::from_request(self.pages(), &scope, page_size, page_token)?;
        let total = items.len() as u64;
        Ok(Listing {
            items: items
                .into_iter()
                .skip(page.offset as usize)
                .take(page.limit as usize)
                .collect(),
            next_page_token: page.next_token(self.pages(), &scope, total),
            total_size: total as i32,
        })
    }

    pub(crate) async fn update_deployed_model(
        &self,
        caller: &Principal,
        update: DeployedModel,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<DeployedModel> {
        let mut state = self.lock().await;
        let current = find(
            &state,
            caller,
            "deployed_model.name",
            &update.name,
            Access::Write,
        )?
        .clone();
        let mut dm = current.clone();
        let paths = mask_paths(mask);
        if paths.is_empty() {
            return Err(ApiError::invalid("update_mask", "name the fields to change").into());
        }
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    validate_display_name("deployed_model.display_name", &update.display_name)?;
                    dm.display_name = update.display_name.clone();
                }
                "description" => dm.description = update.description.clone(),
                "default" => dm.default = update.default,
                "public" => {
                    if !caller.is_privileged() {
                        return Err(ApiError::PermissionDenied(
                            "only a platform admin makes deployed models public".into(),
                        )
                        .into());
                    }
                    dm.public = update.public;
                }
                other => {
                    return Err(ApiError::invalid(
                        "update_mask",
                        format!("{other:?} is not an updatable field of a deployed model"),
                    )
                    .into());
                }
            }
        }
        if dm == current {
            return Ok(dm);
        }
        if dm.default && !current.default {
            self.clear_default(&mut state, &account_of(&dm.name), &dm.model)
                .await?;
        }
        self.save_deployed_model_update(&mut dm, paths).await?;
        state.deployed_models.insert(dm.name.clone(), dm.clone());
        drop(state);
        self.wake();
        Ok(dm)
    }

    pub(crate) async fn delete_deployed_model(&self, caller: &Principal, name: &str) -> Result<()> {
        let mut state = self.lock().await;
        let dm = find(&state, caller, "name", name, Access::Write)?.clone();
        self.delete_deployed_model_row(&dm).await?;
        state.deployed_models.remove(&dm.name);
        drop(state);
        self.wake();
        Ok(())
    }
}
