//! Deployments: create, read, list, update, (soft) delete, undelete, scale. Handlers change
//! the stored resource and the in-memory mirror under the state lock, then wake the
//! reconcile pass, which does the placing.

mod create;
mod delete;
mod rules;
mod update;

use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_core::names::{self, ChildName};
use kiln_core::page::{FilterTerm, enum_filter_value};
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::registry::v1::{Model, model};
use kiln_proto::scheduler::v1::{Deployment, deployment};
use kiln_store::listing::Listing;
use sea_orm::{ColumnTrait, Condition, EntityTrait, Order, QueryFilter};

use crate::db::deployment as rows;
use crate::error::Result;
use crate::quota::{self, QuotaLimits};
use crate::resource::decode;
use crate::service::Scheduler;
use crate::state::{DeploymentEntry, State};

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

    /// The account of deployment `name` (in `field`) and its quota limits, read before the
    /// state lock is taken: an answer from billing never holds up the scheduler. No limits
    /// when the caller may not touch the account (the lookup under the lock says NOT_FOUND).
    async fn account_limits(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<(String, Option<QuotaLimits>)> {
        let account = ChildName::parse(field, "deployments", name, Some(&caller.account))?.account;
        let limits = if caller.can_access(&account) {
            quota::read_limits(self.quotas(), &account).await?
        } else {
            None
        };
        Ok((account, limits))
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

    pub(crate) async fn get_deployment(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<Deployment> {
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
