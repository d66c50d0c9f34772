//! The ledger's copy of the scheduler's deployments, from its events, and what quotas read
//! of it: a deployment that is not being deleted counts against its account's deployments
//! quota and holds `max_replica_count × accelerator_count` of its accelerator type (the most
//! its autoscaler can reach).

use kiln_proto::scheduler::v1::Deployment;
use kiln_proto::scheduler::v1::deployment::{DeploymentType, State as DeploymentState};
use kiln_store::{execute, query};
use sea_orm::{ConnectionTrait, DatabaseTransaction};

use crate::db::first_int;
use kiln_core::Result;
use kiln_core::names::account_of;

/// Whether a deployment in `state` (a value of `Deployment.State`) counts against quotas.
fn is_active(state: i32) -> bool {
    !matches!(
        DeploymentState::try_from(state),
        Ok(DeploymentState::Deleting | DeploymentState::Deleted)
    )
}

/// Saves (or replaces) the copy of `d`.
pub(crate) async fn save_deployment(txn: &DatabaseTransaction, d: &Deployment) -> Result<()> {
    execute(
        txn,
        "INSERT INTO billing_deployments (name, account, deployment_type, accelerator_type, accelerator_count, max_replica_count, active) \
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET deployment_type = excluded.deployment_type, \
         accelerator_type = excluded.accelerator_type, accelerator_count = excluded.accelerator_count, \
         max_replica_count = excluded.max_replica_count, active = excluded.active",
        vec![
            d.name.clone().into(),
            account_of(&d.name).to_owned().into(),
            d.deployment_type.into(),
            d.accelerator_type.into(),
            i64::from(d.accelerator_count).into(),
            i64::from(d.max_replica_count).into(),
            is_active(d.state).into(),
        ],
    )
    .await?;
    Ok(())
}

/// A deleted deployment no longer counts (its copy stays, inactive).
pub(crate) async fn deployment_deleted(txn: &DatabaseTransaction, name: &str) -> Result<()> {
    execute(
        txn,
        "UPDATE billing_deployments SET active = ? WHERE name = ?",
        vec![false.into(), name.into()],
    )
    .await?;
    Ok(())
}

/// How many accelerators of `accelerator_type` `account`'s active dedicated deployments hold.
pub(crate) async fn accelerators_held<C: ConnectionTrait>(
    conn: &C,
    account: &str,
    accelerator_type: i32,
) -> Result<i64> {
    let rows = query(
        conn,
        "SELECT CAST(COALESCE(SUM(accelerator_count * max_replica_count), 0) AS BIGINT) AS used \
         FROM billing_deployments WHERE account = ? AND active = ? AND deployment_type = ? AND accelerator_type = ?",
        vec![
            account.into(),
            true.into(),
            (DeploymentType::Dedicated as i32).into(),
            accelerator_type.into(),
        ],
    )
    .await?;
    Ok(first_int(&rows, "used")?)
}

/// How many active deployments `account` has.
pub(crate) async fn active_deployments<C: ConnectionTrait>(conn: &C, account: &str) -> Result<i64> {
    let rows = query(
        conn,
        "SELECT COUNT(*) AS used FROM billing_deployments WHERE account = ? AND active = ?",
        vec![account.into(), true.into()],
    )
    .await?;
    Ok(first_int(&rows, "used")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_counts_until_it_is_being_deleted() {
        for state in [
            DeploymentState::Unspecified,
            DeploymentState::Creating,
            DeploymentState::Ready,
            DeploymentState::Updating,
            DeploymentState::Failed,
        ] {
            assert!(is_active(state as i32), "{state:?}");
        }
        assert!(!is_active(DeploymentState::Deleting as i32));
        assert!(!is_active(DeploymentState::Deleted as i32));
        // A state this build does not know counts (as before it was known).
        assert!(is_active(99));
    }
}
