//! Billing's gRPC face: thin handlers over [`Billing`].

use kiln_core::auth::{Principal, principal};
use kiln_proto::billing::v1::*;
use tonic::{Request, Response, Status};

use crate::service::Billing;

type Reply<T> = Result<Response<T>, Status>;

fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    Ok(principal(request)?.clone())
}

#[tonic::async_trait]
impl usage_service_server::UsageService for Billing {
    async fn get_usage(&self, request: Request<GetUsageRequest>) -> Reply<GetUsageResponse> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.get_usage(&p, request.into_inner()).await?,
        ))
    }
}

#[tonic::async_trait]
impl quota_service_server::QuotaService for Billing {
    async fn get_quota(&self, request: Request<GetQuotaRequest>) -> Reply<Quota> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.get_quota(&p, &request.into_inner().name).await?,
        ))
    }

    async fn list_quotas(&self, request: Request<ListQuotasRequest>) -> Reply<ListQuotasResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_quotas(
                &p,
                &r.parent,
                r.page_size,
                &r.page_token,
                &r.filter,
                &r.order_by,
            )
            .await?;
        Ok(Response::new(ListQuotasResponse {
            quotas: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }

    async fn update_quota(&self, request: Request<UpdateQuotaRequest>) -> Reply<Quota> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let quota = r
            .quota
            .ok_or_else(|| Status::from(kiln_core::Error::invalid("quota", "is required")))?;
        Ok(Response::new(
            self.update_quota(&p, quota, r.update_mask).await?,
        ))
    }

    async fn check_quota(&self, request: Request<CheckQuotaRequest>) -> Reply<CheckQuotaResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.check_quota(&p, &r.account, &r.quota, r.requested)
                .await?,
        ))
    }
}

pub fn add_services(billing: &Billing, services: &mut kiln_core::server::ServiceSet) {
    services
        .add(usage_service_server::UsageServiceServer::new(
            billing.clone(),
        ))
        .add(quota_service_server::QuotaServiceServer::new(
            billing.clone(),
        ));
}
