//! Billing's gRPC face: thin handlers over [`Billing`].

use kiln_core::grpc::{ListRpc, Reply, reply, reply_list, required, split};
use kiln_proto::billing::v1::*;
use tonic::Request;

use crate::service::Billing;

#[tonic::async_trait]
impl usage_service_server::UsageService for Billing {
    async fn get_usage(&self, request: Request<GetUsageRequest>) -> Reply<GetUsageResponse> {
        let (p, r) = split(request)?;
        reply(self.get_usage(&p, r).await)
    }
}

#[tonic::async_trait]
impl quota_service_server::QuotaService for Billing {
    async fn get_quota(&self, request: Request<GetQuotaRequest>) -> Reply<Quota> {
        let (p, r) = split(request)?;
        reply(self.get_quota(&p, &r.name).await)
    }

    async fn list_quotas(&self, request: Request<ListQuotasRequest>) -> Reply<ListQuotasResponse> {
        let (p, r) = split(request)?;
        reply_list(self.list_quotas(&p, &r.list_request()).await)
    }

    async fn update_quota(&self, request: Request<UpdateQuotaRequest>) -> Reply<Quota> {
        let (p, r) = split(request)?;
        let quota = required(r.quota, "quota")?;
        reply(self.update_quota(&p, quota, r.update_mask).await)
    }

    async fn check_quota(&self, request: Request<CheckQuotaRequest>) -> Reply<CheckQuotaResponse> {
        let (p, r) = split(request)?;
        reply(
            self.check_quota(&p, &r.account, &r.quota, r.requested)
                .await,
        )
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
