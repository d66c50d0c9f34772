//! Billing clients for the suites.

use crate::AuthedChannel;
use kiln_proto::billing::v1 as bilv1;

clients! {
    Usage, usage = bilv1::usage_service_client::UsageServiceClient<AuthedChannel>;
    Quotas, quotas = bilv1::quota_service_client::QuotaServiceClient<AuthedChannel>;
}

pub use crate::calls::update_quota;

/// The month-to-date report of `parent`, grouped by `group_by`.
pub async fn report(
    ch: &AuthedChannel,
    parent: &str,
    group_by: &[bilv1::get_usage_request::GroupBy],
) -> Result<bilv1::GetUsageResponse, tonic::Status> {
    usage(ch)
        .get_usage(bilv1::GetUsageRequest {
            parent: parent.to_owned(),
            group_by: group_by.iter().map(|g| *g as i32).collect(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// The report's totals.
pub async fn totals(ch: &AuthedChannel, parent: &str) -> bilv1::UsageRow {
    report(ch, parent, &[])
        .await
        .expect("usage report")
        .totals
        .expect("totals")
}

/// Sets `accounts/{account}/quotas/{quota}` to `value`.
pub async fn set_quota(
    ch: &AuthedChannel,
    account: &str,
    quota: &str,
    value: i64,
) -> Result<bilv1::Quota, tonic::Status> {
    let quota = bilv1::Quota {
        name: format!("accounts/{account}/quotas/{quota}"),
        value,
        ..Default::default()
    };
    update_quota(ch, quota, &["value"]).await
}

/// Money as nano-units.
pub fn nanos(money: &Option<kiln_proto::common::v1::Money>) -> i64 {
    let m = money.as_ref().expect("an amount");
    m.units * 1_000_000_000 + i64::from(m.nanos)
}
