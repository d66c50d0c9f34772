//! The scheduler's gRPC face: thin handlers over [`Scheduler`].

use futures::StreamExt;
use kiln_core::grpc::{ListRpc, Reply, reply, reply_list, required, split};
use kiln_proto::scheduler::v1::*;
use tonic::{Request, Streaming};

use crate::fine_tuning::FineTuning;
use crate::nodes::SchedulerStream;
use crate::service::Scheduler;

#[tonic::async_trait]
impl deployment_service_server::DeploymentService for Scheduler {
    async fn create_deployment(
        &self,
        request: Request<CreateDeploymentRequest>,
    ) -> Reply<Deployment> {
        let (p, r) = split(request)?;
        let deployment = required(r.deployment, "deployment")?;
        reply(
            self.create_deployment(
                &p,
                &r.parent,
                r.deployment_id,
                deployment,
                r.disable_auto_deploy,
                r.validate_only,
            )
            .await,
        )
    }

    async fn get_deployment(&self, request: Request<GetDeploymentRequest>) -> Reply<Deployment> {
        let (p, r) = split(request)?;
        reply(self.get_deployment(&p, &r.name).await)
    }

    async fn list_deployments(
        &self,
        request: Request<ListDeploymentsRequest>,
    ) -> Reply<ListDeploymentsResponse> {
        let (p, r) = split(request)?;
        reply_list(
            self.list_deployments(&p, &r.list_request(), r.show_deleted)
                .await,
        )
    }

    async fn update_deployment(
        &self,
        request: Request<UpdateDeploymentRequest>,
    ) -> Reply<Deployment> {
        let (p, r) = split(request)?;
        let deployment = required(r.deployment, "deployment")?;
        reply(self.update_deployment(&p, deployment, r.update_mask).await)
    }

    async fn delete_deployment(
        &self,
        request: Request<DeleteDeploymentRequest>,
    ) -> Reply<DeleteDeploymentResponse> {
        let (p, r) = split(request)?;
        let deleted = self
            .delete_deployment(&p, &r.name, r.hard, r.ignore_checks)
            .await;
        reply(deleted.map(|()| DeleteDeploymentResponse {}))
    }

    async fn undelete_deployment(
        &self,
        request: Request<UndeleteDeploymentRequest>,
    ) -> Reply<Deployment> {
        let (p, r) = split(request)?;
        reply(self.undelete_deployment(&p, &r.name).await)
    }

    async fn scale_deployment(
        &self,
        request: Request<ScaleDeploymentRequest>,
    ) -> Reply<Deployment> {
        let (p, r) = split(request)?;
        reply(self.scale_deployment(&p, &r.name, r.replica_count).await)
    }
}

#[tonic::async_trait]
impl deployed_model_service_server::DeployedModelService for Scheduler {
    async fn create_deployed_model(
        &self,
        request: Request<CreateDeployedModelRequest>,
    ) -> Reply<DeployedModel> {
        let (p, r) = split(request)?;
        let deployed_model = required(r.deployed_model, "deployed_model")?;
        reply(
            self.create_deployed_model(&p, &r.parent, r.deployed_model_id, deployed_model)
                .await,
        )
    }

    async fn get_deployed_model(
        &self,
        request: Request<GetDeployedModelRequest>,
    ) -> Reply<DeployedModel> {
        let (p, r) = split(request)?;
        reply(self.get_deployed_model(&p, &r.name).await)
    }

    async fn list_deployed_models(
        &self,
        request: Request<ListDeployedModelsRequest>,
    ) -> Reply<ListDeployedModelsResponse> {
        let (p, r) = split(request)?;
        reply_list(self.list_deployed_models(&p, &r.list_request()).await)
    }

    async fn update_deployed_model(
        &self,
        request: Request<UpdateDeployedModelRequest>,
    ) -> Reply<DeployedModel> {
        let (p, r) = split(request)?;
        let deployed_model = required(r.deployed_model, "deployed_model")?;
        reply(
            self.update_deployed_model(&p, deployed_model, r.update_mask)
                .await,
        )
    }

    async fn delete_deployed_model(
        &self,
        request: Request<DeleteDeployedModelRequest>,
    ) -> Reply<DeleteDeployedModelResponse> {
        let (p, r) = split(request)?;
        let deleted = self.delete_deployed_model(&p, &r.name).await;
        reply(deleted.map(|()| DeleteDeployedModelResponse {}))
    }
}

#[tonic::async_trait]
impl node_service_server::NodeService for Scheduler {
    type ConnectStream = SchedulerStream;

    async fn connect(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Reply<Self::ConnectStream> {
        let (p, r) = split(request)?;
        reply(Scheduler::connect(self, &p, r.boxed()).await)
    }

    async fn list_nodes(&self, request: Request<ListNodesRequest>) -> Reply<ListNodesResponse> {
        let (p, r) = split(request)?;
        reply_list(self.list_nodes(&p, &r.list_request()).await)
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
