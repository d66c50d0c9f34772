//! The registry's gRPC face: thin handlers over [`Registry`].

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::grpc::{ListRpc, Reply, reply, reply_list, required, split};
use kiln_proto::registry::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::service::Registry;

#[tonic::async_trait]
impl model_service_server::ModelService for Registry {
    async fn create_model(&self, request: Request<CreateModelRequest>) -> Reply<Model> {
        let (p, r) = split(request)?;
        let model = required(r.model, "model")?;
        reply(self.create_model(&p, &r.parent, r.model_id, model).await)
    }

    async fn get_model(&self, request: Request<GetModelRequest>) -> Reply<Model> {
        let (p, r) = split(request)?;
        reply(self.get_model(&p, &r.name).await)
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Reply<ListModelsResponse> {
        let (p, r) = split(request)?;
        reply_list(self.list_models(&p, &r.list_request()).await)
    }

    async fn update_model(&self, request: Request<UpdateModelRequest>) -> Reply<Model> {
        let (p, r) = split(request)?;
        let model = required(r.model, "model")?;
        reply(self.update_model(&p, model, r.update_mask).await)
    }

    async fn delete_model(
        &self,
        request: Request<DeleteModelRequest>,
    ) -> Reply<DeleteModelResponse> {
        let (p, r) = split(request)?;
        reply(
            self.delete_model(&p, &r.name)
                .await
                .map(|()| DeleteModelResponse {}),
        )
    }

    async fn upload_model_files(
        &self,
        request: Request<Streaming<UploadModelFilesRequest>>,
    ) -> Reply<UploadModelFilesResponse> {
        let (p, r) = split(request)?;
        reply(self.upload_model_files(&p, r).await)
    }

    async fn validate_model_upload(
        &self,
        request: Request<ValidateModelUploadRequest>,
    ) -> Reply<ValidateModelUploadResponse> {
        let (p, r) = split(request)?;
        reply(
            self.validate_model_upload(&p, &r.name, r.validate_only)
                .await,
        )
    }

    async fn prepare_model(&self, request: Request<PrepareModelRequest>) -> Reply<Model> {
        let (p, r) = split(request)?;
        reply(self.prepare_model(&p, &r.name, r.precision, r.force).await)
    }

    type DownloadModelFilesStream = BoxStream<'static, Result<DownloadModelFilesResponse, Status>>;

    async fn download_model_files(
        &self,
        request: Request<DownloadModelFilesRequest>,
    ) -> Reply<Self::DownloadModelFilesStream> {
        let (p, r) = split(request)?;
        let stream = self.download_model_files(&p, r).await?;
        Ok(Response::new(
            stream.map(|r| r.map_err(Status::from)).boxed(),
        ))
    }
}

#[tonic::async_trait]
impl dataset_service_server::DatasetService for Registry {
    async fn create_dataset(&self, request: Request<CreateDatasetRequest>) -> Reply<Dataset> {
        let (p, r) = split(request)?;
        let dataset = required(r.dataset, "dataset")?;
        reply(
            self.create_dataset(&p, &r.parent, r.dataset_id, dataset)
                .await,
        )
    }

    async fn get_dataset(&self, request: Request<GetDatasetRequest>) -> Reply<Dataset> {
        let (p, r) = split(request)?;
        reply(self.get_dataset(&p, &r.name).await)
    }

    async fn list_datasets(
        &self,
        request: Request<ListDatasetsRequest>,
    ) -> Reply<ListDatasetsResponse> {
        let (p, r) = split(request)?;
        reply_list(self.list_datasets(&p, &r.list_request()).await)
    }

    async fn update_dataset(&self, request: Request<UpdateDatasetRequest>) -> Reply<Dataset> {
        let (p, r) = split(request)?;
        let dataset = required(r.dataset, "dataset")?;
        reply(self.update_dataset(&p, dataset, r.update_mask).await)
    }

    async fn delete_dataset(
        &self,
        request: Request<DeleteDatasetRequest>,
    ) -> Reply<DeleteDatasetResponse> {
        let (p, r) = split(request)?;
        reply(
            self.delete_dataset(&p, &r.name)
                .await
                .map(|()| DeleteDatasetResponse {}),
        )
    }

    async fn upload_dataset(
        &self,
        request: Request<Streaming<UploadDatasetRequest>>,
    ) -> Reply<Dataset> {
        let (p, r) = split(request)?;
        reply(self.upload_dataset(&p, r).await)
    }

    type DownloadDatasetStream = BoxStream<'static, Result<DownloadDatasetResponse, Status>>;

    async fn download_dataset(
        &self,
        request: Request<DownloadDatasetRequest>,
    ) -> Reply<Self::DownloadDatasetStream> {
        let (p, r) = split(request)?;
        let stream = self.download_dataset(&p, r).await?;
        Ok(Response::new(
            stream.map(|r| r.map_err(Status::from)).boxed(),
        ))
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
