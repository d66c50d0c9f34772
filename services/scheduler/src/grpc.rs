//! The scheduler's gRPC face: thin handlers over [`Scheduler`].

use futures::StreamExt;
use kiln_core::auth::{Principal, principal};
use kiln_proto::scheduler::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::fine_tuning::FineTuning;
use crate::nodes::SchedulerStream;
use crate::service::Scheduler;

type Reply<T> = Result<Response<T>, Status>;

fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    Ok(principal(request)?.clone())
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| kiln_core::Error::invalid(field, "is required").into())
}

#[tonic::async_trait]
impl deployment_service_server::DeploymentService for Scheduler {
    async fn create_deployment(
        &self,
        request: Request<CreateDeploymentRequest>,
    ) -> Reply<Deployment> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.create_deployment(
                &p,
                &r.parent,
                r.deployment_id,
                required(r.deployment, "deployment")?,
                r.disable_auto_deploy,
                r.validate_only,
            )
            .await?,
        ))
    }

    async fn get_deployment(&self, request: Request<GetDeploymentRequest>) -> Reply<Deployment> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.get_deployment(&p, &request.into_inner().name).await?,
        ))
    }

    async fn list_deployments(
        &self,
        request: Request<ListDeploymentsRequest>,
    ) -> Reply<ListDeploymentsResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_deployments(
                &p,
                &r.parent,
                r.page_size,
                &r.page_token,
                &r.filter,
                &r.order_by,
                r.show_deleted,
            )
            .await?;
        Ok(Response::new(ListDeploymentsResponse {
            deployments: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }

    async fn update_deployment(
        &self,
        request: Request<UpdateDeploymentRequest>,
    ) -> Reply<Deployment> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.update_deployment(&p, required(r.deployment, "deployment")?, r.update_mask)
                .await?,
        ))
    }

    async fn delete_deployment(
        &self,
        request: Request<DeleteDeploymentRequest>,
    ) -> Reply<DeleteDeploymentResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        self.delete_deployment(&p, &r.name, r.hard, r.ignore_checks)
            .await?;
        Ok(Response::new(DeleteDeploymentResponse {}))
    }

    async fn undelete_deployment(
        &self,
        request: Request<UndeleteDeploymentRequest>,
    ) -> Reply<Deployment> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.undelete_deployment(&p, &request.into_inner().name)
                .await?,
        ))
    }

    async fn scale_deployment(
        &self,
        request: Request<ScaleDeploymentRequest>,
    ) -> Reply<Deployment> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.scale_deployment(&p, &r.name, r.replica_count).await?,
        ))
    }
}

#[tonic::async_trait]
impl deployed_model_service_server::DeployedModelService for Scheduler {
    async fn create_deployed_model(
        &self,
        request: Request<CreateDeployedModelRequest>,
    ) -> Reply<DeployedModel> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.create_deployed_model(
                &p,
                &r.parent,
                r.deployed_model_id,
                required(r.deployed_model, "deployed_model")?,
            )
            .await?,
        ))
    }

    async fn get_deployed_model(
        &self,
        request: Request<GetDeployedModelRequest>,
    ) -> Reply<DeployedModel> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.get_deployed_model(&p, &request.into_inner().name)
                .await?,
        ))
    }

    async fn list_deployed_models(
        &self,
        request: Request<ListDeployedModelsRequest>,
    ) -> Reply<ListDeployedModelsResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_deployed_models(
                &p,
                &r.parent,
                r.page_size,
                &r.page_token,
                &r.filter,
                &r.order_by,
            )
            .await?;
        Ok(Response::new(ListDeployedModelsResponse {
            deployed_models: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }

    async fn update_deployed_model(
        &self,
        request: Request<UpdateDeployedModelRequest>,
    ) -> Reply<DeployedModel> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.update_deployed_model(
                &p,
                required(r.deployed_model, "deployed_model")?,
                r.update_mask,
            )
            .await?,
        ))
    }

    async fn delete_deployed_model(
        &self,
        request: Request<DeleteDeployedModelRequest>,
    ) -> Reply<DeleteDeployedModelResponse> {
        let p = caller(&request)?;
        self.delete_deployed_model(&p, &request.into_inner().name)
            .await?;
        Ok(Response::new(DeleteDeployedModelResponse {}))
    }
}

#[tonic::async_trait]
impl node_service_server::NodeService for Scheduler {
    type ConnectStream = SchedulerStream;

    async fn connect(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Reply<Self::ConnectStream> {
        let p = caller(&request)?;
        let inbound = request.into_inner().boxed();
        Ok(Response::new(Scheduler::connect(self, &p, inbound).await?))
    }

    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Reply<ListNodesResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_nodes(&p, r.page_size, &r.page_token, &r.filter, &r.order_by)
            .await?;
        Ok(Response::new(ListNodesResponse {
            nodes: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }
}

/// Adds the scheduler's gRPC services to a server.
pub fn add_services(scheduler: &Scheduler, services: &mut kiln_core::server::ServiceSet) {
    services
        .add(deployment_service_server::DeploymentServiceServer::new(
            scheduler.clone(),
        ))
        .add(deployed_model_service_server::DeployedModelServiceServer::new(scheduler.clone()))
        .add(node_service_server::NodeServiceServer::new(
            scheduler.clone(),
        ))
        .add(fine_tuning_service_server::FineTuningServiceServer::new(
            FineTuning::new(scheduler.pages().clone()),
        ));
}
