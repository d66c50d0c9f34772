//! Where the scheduler reads models: the registry, over gRPC (the scheduler on its own) or in
//! process (`kiln dev`). Read with the scheduler's own authority; the caller's access is
//! checked here.

use async_trait::async_trait;
use kiln_proto::registry::v1::{GetModelRequest, Model, model_service_client::ModelServiceClient};

use kiln_core::{Error, Result};

#[async_trait]
pub trait ModelCatalog: Send + Sync + 'static {
    /// The model, or the registry's NOT_FOUND.
    async fn get_model(&self, name: &str) -> Result<Model>;
}

/// The registry over gRPC.
pub struct RemoteCatalog {
    client: ModelServiceClient<kiln_core::server::ServiceChannel>,
}

impl RemoteCatalog {
    /// Connects lazily to `url`, presenting `service_token`.
    pub fn new(url: &str, service_token: &str) -> Result<Self> {
        let channel = kiln_core::server::service_channel("registry_url", url, service_token)?;
        Ok(Self {
            client: ModelServiceClient::new(channel),
        })
    }
}

#[async_trait]
impl ModelCatalog for RemoteCatalog {
    async fn get_model(&self, name: &str) -> Result<Model> {
        Ok(self
            .client
            .clone()
            .get_model(GetModelRequest {
                name: name.to_owned(),
            })
            .await
            .map_err(|status| Error::from_peer("registry GetModel", status))?
            .into_inner())
    }
}
