//! Where the scheduler reads models and datasets: the registry, over gRPC (the scheduler on
//! its own) or in process (`kiln dev`). Read with the scheduler's own authority; the caller's
//! access is checked here.

use async_trait::async_trait;
use kiln_proto::registry::v1::dataset_service_client::DatasetServiceClient;
use kiln_proto::registry::v1::{
    Dataset, GetDatasetRequest, GetModelRequest, Model, model_service_client::ModelServiceClient,
};

use kiln_core::server::ServiceChannel;
use kiln_core::{Error, Result};

#[async_trait]
pub trait ModelCatalog: Send + Sync + 'static {
    /// The model, or the registry's NOT_FOUND.
    async fn get_model(&self, name: &str) -> Result<Model>;
    /// The dataset, or the registry's NOT_FOUND.
    async fn get_dataset(&self, name: &str) -> Result<Dataset>;
}

/// The registry's model and dataset services over one gRPC channel.
#[derive(Clone)]
pub struct RemoteRegistry {
    pub models: ModelServiceClient<ServiceChannel>,
    pub datasets: DatasetServiceClient<ServiceChannel>,
}

impl RemoteRegistry {
    pub fn new(channel: ServiceChannel) -> Self {
        Self {
            models: ModelServiceClient::new(channel.clone()),
            datasets: DatasetServiceClient::new(channel),
        }
    }
}

#[async_trait]
impl ModelCatalog for RemoteRegistry {
    async fn get_model(&self, name: &str) -> Result<Model> {
        let request = GetModelRequest {
            name: name.to_owned(),
        };
        Ok(self
            .models
            .clone()
            .get_model(request)
            .await
            .map_err(|status| Error::from_peer("registry GetModel", status))?
            .into_inner())
    }

    async fn get_dataset(&self, name: &str) -> Result<Dataset> {
        let request = GetDatasetRequest {
            name: name.to_owned(),
        };
        Ok(self
            .datasets
            .clone()
            .get_dataset(request)
            .await
            .map_err(|status| Error::from_peer("registry GetDataset", status))?
            .into_inner())
    }
}
