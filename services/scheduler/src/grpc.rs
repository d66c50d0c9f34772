//! The scheduler's gRPC face: one line per RPC over [`Scheduler`] (see
//! [`kiln_core::grpc_service`]).

use futures::StreamExt;
use kiln_core::grpc::{ListRpc, Reply, Update, deleted, reply, required, split};
use kiln_proto::scheduler::v1::*;
use tonic::{Request, Streaming};

use crate::fine_tuning::FineTuning;
use crate::nodes::SchedulerStream;
use crate::service::Scheduler;

kiln_core::grpc_service! {
    impl deployment_service_server::DeploymentService for Scheduler {
        fn create_deployment(CreateDeploymentRequest) -> Deployment = |svc, caller, r| {
            let deployment = required(r.deployment, "deployment")?;
            let (parent, id) = (&r.parent, r.deployment_id);
            let (no_auto_deploy, validate_only) = (r.disable_auto_deploy, r.validate_only);
            svc.create_deployment(&caller, parent, id, deployment, no_auto_deploy, validate_only)
                .await
        };
        fn get_deployment(GetDeploymentRequest) -> Deployment =
            |svc, caller, r| svc.get_deployment(&caller, &r.name).await;
        fn list_deployments(ListDeploymentsRequest) -> ListDeploymentsResponse = |svc, caller, r| {
            let listed = svc.list_deployments(&caller, &r.list_request(), r.show_deleted).await;
            listed.map(Into::into)
        };
        fn update_deployment(UpdateDeploymentRequest) -> Deployment = |svc, caller, r| {
            let update = Update::new("deployment", r.deployment, r.update_mask)?;
            svc.update_deployment(&caller, update).await
        };
        fn delete_deployment(DeleteDeploymentRequest) -> DeleteDeploymentResponse =
            |svc, caller, r| {
                let deleted_now = svc.delete_deployment(&caller, &r.name, r.hard, r.ignore_checks);
                deleted_now.await.map(deleted)
            };
        fn undelete_deployment(UndeleteDeploymentRequest) -> Deployment =
            |svc, caller, r| svc.undelete_deployment(&caller, &r.name).await;
        fn scale_deployment(ScaleDeploymentRequest) -> Deployment =
            |svc, caller, r| svc.scale_deployment(&caller, &r.name, r.replica_count).await;
    }
}

kiln_core::grpc_service! {
    impl deployed_model_service_server::DeployedModelService for Scheduler {
        fn create_deployed_model(CreateDeployedModelRequest) -> DeployedModel = |svc, caller, r| {
            let deployed_model = required(r.deployed_model, "deployed_model")?;
            let (parent, id) = (&r.parent, r.deployed_model_id);
            svc.create_deployed_model(&caller, parent, id, deployed_model).await
        };
        fn get_deployed_model(GetDeployedModelRequest) -> DeployedModel =
            |svc, caller, r| svc.get_deployed_model(&caller, &r.name).await;
        fn list_deployed_models(ListDeployedModelsRequest) -> ListDeployedModelsResponse =
            |svc, caller, r| {
                svc.list_deployed_models(&caller, &r.list_request()).await.map(Into::into)
            };
        fn update_deployed_model(UpdateDeployedModelRequest) -> DeployedModel = |svc, caller, r| {
            let update = Update::new("deployed_model", r.deployed_model, r.update_mask)?;
            svc.update_deployed_model(&caller, update).await
        };
        fn delete_deployed_model(DeleteDeployedModelRequest) -> DeleteDeployedModelResponse =
            |svc, caller, r| svc.delete_deployed_model(&caller, &r.name).await.map(deleted);
    }
}

kiln_core::grpc_service! {
    impl node_service_server::NodeService for Scheduler {
        fn list_nodes(ListNodesRequest) -> ListNodesResponse =
            |svc, caller, r| svc.list_nodes(&caller, &r.list_request()).await.map(Into::into);

        streams {
            type ConnectStream = SchedulerStream;

            async fn connect(
                &self,
                request: Request<Streaming<NodeMessage>>,
            ) -> Reply<Self::ConnectStream> {
                let (caller, r) = split(request)?;
                reply(Scheduler::connect(self, &caller, r.boxed()).await)
            }
        }
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
            FineTuning::new(scheduler.clone()),
        ));
}
