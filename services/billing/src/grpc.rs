//! Billing's gRPC face: one line per RPC over [`Billing`] (see [`kiln_core::grpc_service`]).

use kiln_core::grpc::{ListRpc, Update};
use kiln_proto::billing::v1::*;

use crate::service::Billing;

kiln_core::grpc_service! {
    impl usage_service_server::UsageService for Billing {
        fn get_usage(GetUsageRequest) -> GetUsageResponse =
            |svc, caller, r| svc.get_usage(&caller, r).await;
    }
}

kiln_core::grpc_service! {
    impl quota_service_server::QuotaService for Billing {
        fn get_quota(GetQuotaRequest) -> Quota =
            |svc, caller, r| svc.get_quota(&caller, &r.name).await;
        fn list_quotas(ListQuotasRequest) -> ListQuotasResponse =
            |svc, caller, r| svc.list_quotas(&caller, &r.list_request()).await.map(Into::into);
        fn update_quota(UpdateQuotaRequest) -> Quota = |svc, caller, r| {
            svc.update_quota(&caller, Update::new("quota", r.quota, r.update_mask)?).await
        };
        fn check_quota(CheckQuotaRequest) -> CheckQuotaResponse =
            |svc, caller, r| svc.check_quota(&caller, &r.account, &r.quota, r.requested).await;
    }
}

/// Adds billing's gRPC services to a server.
pub fn add_services(billing: &Billing, services: &mut kiln_core::server::ServiceSet) {
    services
        .add(usage_service_server::UsageServiceServer::new(
            billing.clone(),
        ))
        .add(quota_service_server::QuotaServiceServer::new(
            billing.clone(),
        ));
}
