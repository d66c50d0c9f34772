//! Where the scheduler reads models: the registry, over gRPC (the scheduler on its own) or in
//! process (`kiln dev`). Read with the scheduler's own authority; the caller's access is
//! checked here.

use async_trait::async_trait;
use kiln_proto::registry::v1::{GetModelRequest, Model, model_service_client::ModelServiceClient};

use kiln_core::server::ServiceChannel;
use kiln_core::{Error, Result};

#[async_trait]
pub trait ModelCatalog: Send + Sync + 'static {
    /// The model, or the registry's NOT_FOUND.
    async fn get_model(&self, name: &str) -> Result<Model>;
}

/// The registry over gRPC.
#[async_trait]
impl ModelCatalog for ModelServiceClient<ServiceChannel> {
    async fn get_model(&self, name: &str) -> Result<Model> {
        let request = GetModelRequest {
            name: name.to_owned(),
        };
        Ok(ModelServiceClient::get_model(&mut self.clone(), request)
            .await
            .map_err(|status| Error::from_peer("registry GetModel", status))?
            .into_inner())
    }
}
