//! The registry's gRPC face: one line per RPC over [`Registry`] (see
//! [`kiln_core::grpc_service`]).

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::grpc::{ListRpc, Reply, Update, deleted, required, split};
use kiln_proto::registry::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::service::Registry;

kiln_core::grpc_service! {
    impl model_service_server::ModelService for Registry {
        fn create_model(CreateModelRequest) -> Model = |svc, caller, r| {
            let model = required(r.model, "model")?;
            svc.create_model(&caller, &r.parent, r.model_id, model).await
        };
        fn get_model(GetModelRequest) -> Model =
            |svc, caller, r| svc.get_model(&caller, &r.name).await;
        fn list_models(ListModelsRequest) -> ListModelsResponse =
            |svc, caller, r| svc.list_models(&caller, &r.list_request()).await.map(Into::into);
        fn update_model(UpdateModelRequest) -> Model = |svc, caller, r| {
            svc.update_model(&caller, Update::new("model", r.model, r.update_mask)?).await
        };
        fn delete_model(DeleteModelRequest) -> DeleteModelResponse =
            |svc, caller, r| svc.delete_model(&caller, &r.name).await.map(deleted);
        fn upload_model_files(Streaming<UploadModelFilesRequest>) -> UploadModelFilesResponse =
            |svc, caller, r| svc.upload_model_files(&caller, r).await;
        fn validate_model_upload(ValidateModelUploadRequest) -> ValidateModelUploadResponse =
            |svc, caller, r| svc.validate_model_upload(&caller, &r.name, r.validate_only).await;
        fn prepare_model(PrepareModelRequest) -> Model =
            |svc, caller, r| svc.prepare_model(&caller, &r.name, r.precision, r.force).await;

        streams {
            type DownloadModelFilesStream =
                BoxStream<'static, Result<DownloadModelFilesResponse, Status>>;

            async fn download_model_files(
                &self,
                request: Request<DownloadModelFilesRequest>,
            ) -> Reply<Self::DownloadModelFilesStream> {
                let (caller, r) = split(request)?;
                let stream = self.download_model_files(&caller, r).await?;
                Ok(Response::new(stream.map(|r| r.map_err(Status::from)).boxed()))
            }
        }
    }
}

kiln_core::grpc_service! {
    impl dataset_service_server::DatasetService for Registry {
        fn create_dataset(CreateDatasetRequest) -> Dataset = |svc, caller, r| {
            let dataset = required(r.dataset, "dataset")?;
            svc.create_dataset(&caller, &r.parent, r.dataset_id, dataset).await
        };
        fn get_dataset(GetDatasetRequest) -> Dataset =
            |svc, caller, r| svc.get_dataset(&caller, &r.name).await;
        fn list_datasets(ListDatasetsRequest) -> ListDatasetsResponse =
            |svc, caller, r| svc.list_datasets(&caller, &r.list_request()).await.map(Into::into);
        fn update_dataset(UpdateDatasetRequest) -> Dataset = |svc, caller, r| {
            svc.update_dataset(&caller, Update::new("dataset", r.dataset, r.update_mask)?).await
        };
        fn delete_dataset(DeleteDatasetRequest) -> DeleteDatasetResponse =
            |svc, caller, r| svc.delete_dataset(&caller, &r.name).await.map(deleted);
        fn upload_dataset(Streaming<UploadDatasetRequest>) -> Dataset =
            |svc, caller, r| svc.upload_dataset(&caller, r).await;

        streams {
            type DownloadDatasetStream =
                BoxStream<'static, Result<DownloadDatasetResponse, Status>>;

            async fn download_dataset(
                &self,
                request: Request<DownloadDatasetRequest>,
            ) -> Reply<Self::DownloadDatasetStream> {
                let (caller, r) = split(request)?;
                let stream = self.download_dataset(&caller, r).await?;
                Ok(Response::new(stream.map(|r| r.map_err(Status::from)).boxed()))
            }
        }
    }
}

/// Adds the registry's gRPC services to a server.
pub fn add_services(registry: &Registry, services: &mut kiln_core::server::ServiceSet) {
    services
        .add(
            model_service_server::ModelServiceServer::new(registry.clone())
                .max_decoding_message_size(8 << 20),
        )
        .add(
            dataset_service_server::DatasetServiceServer::new(registry.clone())
                .max_decoding_message_size(8 << 20),
        );
}
