//! The registry's gRPC face: thin handlers over [`Registry`].

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::auth::{Principal, principal};
use kiln_proto::registry::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::service::Registry;

type Reply<T> = Result<Response<T>, Status>;

fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    Ok(principal(request)?.clone())
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| kiln_core::Error::invalid(field, "is required").into())
}

#[tonic::async_trait]
impl model_service_server::ModelService for Registry {
    async fn create_model(&self, request: Request<CreateModelRequest>) -> Reply<Model> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.create_model(&p, &r.parent, r.model_id, required(r.model, "model")?)
                .await?,
        ))
    }

    async fn get_model(&self, request: Request<GetModelRequest>) -> Reply<Model> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.get_model(&p, &request.into_inner().name).await?,
        ))
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Reply<ListModelsResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_models(
                &p,
                &r.parent,
                r.page_size,
                &r.page_token,
                &r.filter,
                &r.order_by,
            )
            .await?;
        Ok(Response::new(ListModelsResponse {
            models: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }

    async fn update_model(&self, request: Request<UpdateModelRequest>) -> Reply<Model> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.update_model(&p, required(r.model, "model")?, r.update_mask)
                .await?,
        ))
    }

    async fn delete_model(
        &self,
        request: Request<DeleteModelRequest>,
    ) -> Reply<DeleteModelResponse> {
        let p = caller(&request)?;
        self.delete_model(&p, &request.into_inner().name).await?;
        Ok(Response::new(DeleteModelResponse {}))
    }

    async fn upload_model_files(
        &self,
        request: Request<Streaming<UploadModelFilesRequest>>,
    ) -> Reply<UploadModelFilesResponse> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.upload_model_files(&p, request.into_inner()).await?,
        ))
    }

    async fn validate_model_upload(
        &self,
        request: Request<ValidateModelUploadRequest>,
    ) -> Reply<ValidateModelUploadResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.validate_model_upload(&p, &r.name, r.validate_only)
                .await?,
        ))
    }

    async fn prepare_model(&self, request: Request<PrepareModelRequest>) -> Reply<Model> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.prepare_model(&p, &r.name, r.precision, r.force)
                .await?,
        ))
    }

    type DownloadModelFilesStream = BoxStream<'static, Result<DownloadModelFilesResponse, Status>>;

    async fn download_model_files(
        &self,
        request: Request<DownloadModelFilesRequest>,
    ) -> Reply<Self::DownloadModelFilesStream> {
        let p = caller(&request)?;
        let stream = self.download_model_files(&p, request.into_inner()).await?;
        Ok(Response::new(
            stream.map(|r| r.map_err(Status::from)).boxed(),
        ))
    }
}

#[tonic::async_trait]
impl dataset_service_server::DatasetService for Registry {
    async fn create_dataset(&self, request: Request<CreateDatasetRequest>) -> Reply<Dataset> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.create_dataset(&p, &r.parent, r.dataset_id, required(r.dataset, "dataset")?)
                .await?,
        ))
    }

    async fn get_dataset(&self, request: Request<GetDatasetRequest>) -> Reply<Dataset> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.get_dataset(&p, &request.into_inner().name).await?,
        ))
    }

    async fn list_datasets(
        &self,
        request: Request<ListDatasetsRequest>,
    ) -> Reply<ListDatasetsResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_datasets(
                &p,
                &r.parent,
                r.page_size,
                &r.page_token,
                &r.filter,
                &r.order_by,
            )
            .await?;
        Ok(Response::new(ListDatasetsResponse {
            datasets: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }

    async fn update_dataset(&self, request: Request<UpdateDatasetRequest>) -> Reply<Dataset> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.update_dataset(&p, required(r.dataset, "dataset")?, r.update_mask)
                .await?,
        ))
    }

    async fn delete_dataset(
        &self,
        request: Request<DeleteDatasetRequest>,
    ) -> Reply<DeleteDatasetResponse> {
        let p = caller(&request)?;
        self.delete_dataset(&p, &request.into_inner().name).await?;
        Ok(Response::new(DeleteDatasetResponse {}))
    }

    async fn upload_dataset(
        &self,
        request: Request<Streaming<UploadDatasetRequest>>,
    ) -> Reply<Dataset> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.upload_dataset(&p, request.into_inner()).await?,
        ))
    }

    type DownloadDatasetStream = BoxStream<'static, Result<DownloadDatasetResponse, Status>>;

    async fn download_dataset(
        &self,
        request: Request<DownloadDatasetRequest>,
    ) -> Reply<Self::DownloadDatasetStream> {
        let p = caller(&request)?;
        let stream = self.download_dataset(&p, request.into_inner()).await?;
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
