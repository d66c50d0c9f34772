//! Quotas before capacity. Billing owns the limits (`accounts/{a}/quotas/{q}`); the scheduler
//! owns what an account holds. So the scheduler reads the account's limits from billing
//! before taking its state lock, then counts the account's deployments under the lock and
//! decides there, with the change itself: two creates racing each other cannot both slip
//! under a quota, and billing's view (built from events, a moment behind) never decides.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kiln_core::auth::Principal;
use kiln_core::names::SYSTEM_ACCOUNT;
use kiln_proto::billing::v1::ListQuotasRequest;
use kiln_proto::billing::v1::quota_service_client::QuotaServiceClient;
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::identity::v1::account::SuspendState;
use kiln_proto::scheduler::v1::Deployment;
use kiln_proto::scheduler::v1::deployment::DeploymentType;

use crate::resource::is_gone;
use crate::state::State;
use kiln_core::{Error, Result};

/// Reading an account's limits takes at most this long; beyond it the change is refused
/// (UNAVAILABLE) rather than made unchecked.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The quota counting an account's deployments (not DELETED).
const DEPLOYMENTS_QUOTA: &str = "deployments";

/// An account's limits: quota ID → value.
#[derive(Debug, Clone, Default)]
pub struct QuotaLimits(pub HashMap<String, i64>);

impl QuotaLimits {
    fn get(&self, quota: &str) -> Option<i64> {
        self.0.get(quota).copied()
    }
}

/// Where an account's limits are read: billing, in process or over gRPC.
#[async_trait]
pub trait QuotaGate: Send + Sync + 'static {
    async fn limits(&self, account: &str) -> Result<QuotaLimits>;
}

/// Billing's QuotaService over gRPC.
#[async_trait]
impl QuotaGate for QuotaServiceClient<kiln_core::server::ServiceChannel> {
    async fn limits(&self, account: &str) -> Result<QuotaLimits> {
        let listed = self
            .clone()
            .list_quotas(ListQuotasRequest {
                parent: format!("accounts/{account}"),
                page_size: 200,
                ..Default::default()
            })
            .await
            .map_err(|status| Error::from_peer("billing ListQuotas", status))?
            .into_inner();
        Ok(QuotaLimits(
            listed
                .quotas
                .into_iter()
                .map(|q| {
                    (
                        q.name.rsplit('/').next().unwrap_or_default().to_owned(),
                        q.value,
                    )
                })
                .collect(),
        ))
    }
}

/// The accelerator quota ID of a type, e.g. `accelerator-nvidia-h100-80gb`.
fn accelerator_quota(accelerator_type: i32) -> String {
    let name = AcceleratorType::try_from(accelerator_type)
        .map(|a| a.as_str_name())
        .unwrap_or("ACCELERATOR_TYPE_UNSPECIFIED");
    format!("accelerator-{}", name.to_lowercase().replace('_', "-"))
}

/// Accelerators a dedicated deployment holds against its quota: as many as its autoscaler
/// may reach, so scaling within its bounds never exceeds the quota.
fn held(d: &Deployment) -> i64 {
    if d.deployment_type != DeploymentType::Dedicated as i32 {
        return 0;
    }
    i64::from(d.max_replica_count.max(1)) * i64::from(d.accelerator_count.max(1))
}

/// Refuses a suspended account's new deployments and changes (FAILED_PRECONDITION).
pub(crate) fn check_not_suspended(caller: &Principal, account: &str) -> Result<()> {
    if caller.account == account
        && caller.suspend_state != 0
        && caller.suspend_state != SuspendState::Unsuspended as i32
    {
        let state = SuspendState::try_from(caller.suspend_state)
            .map(|s| s.as_str_name())
            .unwrap_or("SUSPENDED");
        return Err(Error::FailedPrecondition(format!(
            "account accounts/{account} is suspended ({state}); deployments cannot be created or grown"
        )));
    }
    Ok(())
}

/// `account`'s limits, when quotas apply to it (a gate is configured and it is not the
/// system account).
pub(crate) async fn read_limits(
    gate: Option<&Arc<dyn QuotaGate>>,
    account: &str,
) -> Result<Option<QuotaLimits>> {
    let Some(gate) = gate else { return Ok(None) };
    if account == SYSTEM_ACCOUNT {
        return Ok(None);
    }
    let limits = tokio::time::timeout(READ_TIMEOUT, gate.limits(account))
        .await
        .map_err(|_| Error::Unavailable("billing did not answer with the account's quotas".into()))?
        .map_err(|e| match e {
            Error::Internal(_) => e,
            other => Error::Unavailable(format!(
                "cannot read the account's quotas from billing: {other}"
            )),
        })?;
    Ok(Some(limits))
}

/// Checks that `account` may hold `after` under `limits`, counting its deployments in
/// `state`: a new or restored deployment when `before` is None, else a change of `before`.
/// Only growth is checked, so a deployment over a lowered quota can still shrink.
/// RESOURCE_EXHAUSTED names the quota.
pub(crate) fn check_deployment(
    limits: Option<&QuotaLimits>,
    state: &State,
    account: &str,
    before: Option<&Deployment>,
    after: &Deployment,
) -> Result<()> {
    let Some(limits) = limits else { return Ok(()) };
    let prefix = format!("accounts/{account}/deployments/");
    let others = state
        .deployments
        .values()
        .map(|e| &e.deployment)
        .filter(|d| d.name.starts_with(&prefix) && d.name != after.name && !is_gone(d));
    if before.is_none()
        && let Some(limit) = limits.get(DEPLOYMENTS_QUOTA)
    {
        let count = others.clone().count() as i64;
        if count + 1 > limit {
            return Err(exhausted(format!(
                "quota {DEPLOYMENTS_QUOTA}: accounts/{account} has {count} of {limit} deployments"
            )));
        }
    }
    let needed = held(after);
    let had = before
        .filter(|b| b.accelerator_type == after.accelerator_type)
        .map(held)
        .unwrap_or(0);
    if needed > had {
        let quota = accelerator_quota(after.accelerator_type);
        if let Some(limit) = limits.get(&quota) {
            let in_use: i64 = others
                .filter(|d| d.accelerator_type == after.accelerator_type)
                .map(held)
                .sum();
            if in_use + needed > limit {
                let kind = AcceleratorType::try_from(after.accelerator_type)
                    .map(|a| a.as_str_name())
                    .unwrap_or("ACCELERATOR_TYPE_UNSPECIFIED");
                return Err(exhausted(format!(
                    "quota {quota}: accounts/{account} holds {in_use} of {limit} {kind} accelerators; \
                     this deployment needs {needed} (max_replica_count {} × accelerator_count {})",
                    after.max_replica_count.max(1),
                    after.accelerator_count.max(1)
                )));
            }
        }
    }
    Ok(())
}

/// The quota counting an account's fine-tuning jobs that are not over.
const FINE_TUNING_JOBS_QUOTA: &str = "fine-tuning-jobs";

/// Checks that `account` may start one more fine-tuning job under `limits`, counting its
/// jobs in `state` that are not over. RESOURCE_EXHAUSTED names the quota.
pub(crate) fn check_fine_tuning_job(
    limits: Option<&QuotaLimits>,
    state: &State,
    account: &str,
) -> Result<()> {
    let Some(limit) = limits.and_then(|l| l.get(FINE_TUNING_JOBS_QUOTA)) else {
        return Ok(());
    };
    let prefix = format!("accounts/{account}/");
    let count = state
        .jobs
        .values()
        .filter(|j| j.name.starts_with(&prefix) && !crate::fine_tuning::is_final(j.state))
        .count() as i64;
    if count + 1 > limit {
        return Err(exhausted(format!(
            "quota {FINE_TUNING_JOBS_QUOTA}: accounts/{account} runs {count} of {limit} fine-tuning jobs"
        )));
    }
    Ok(())
}

fn exhausted(message: String) -> Error {
    Error::ResourceExhausted {
        message,
        retry_after: None,
    }
}
