//! Where the engine reads models from: the registry, over gRPC (a node on its own) or in
//! process (`kiln dev`, which implements [`ModelSource`] on the registry itself).

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_proto::registry::v1::{
    DownloadModelFilesRequest, DownloadModelFilesResponse, GetModelRequest, Model,
    model_service_client::ModelServiceClient,
};

use kiln_core::{Error, Result};

/// A stream of file pieces, as `DownloadModelFiles` sends them.
pub type FileStream = BoxStream<'static, Result<DownloadModelFilesResponse>>;

/// Reads models with the node's own (service) authority; the engine checks what each
/// caller may see.
#[async_trait]
pub trait ModelSource: Send + Sync + 'static {
    /// The model, or NOT_FOUND.
    async fn get_model(&self, name: &str) -> Result<Model>;
    /// Every file of the model (`bundle_precision` unset) or of a prepared bundle.
    async fn download(&self, name: &str, bundle_precision: Option<i32>) -> Result<FileStream>;
}

/// The registry over gRPC.
#[derive(Clone)]
pub struct RemoteRegistry {
    client: ModelServiceClient<kiln_core::server::ServiceChannel>,
}

impl RemoteRegistry {
    /// Connects lazily to `url`, presenting `service_token`.
    pub fn new(url: &str, service_token: &str) -> Result<Self> {
        let channel = kiln_core::server::service_channel("registry_url", url, service_token)?;
        Ok(Self {
            client: ModelServiceClient::new(channel).max_decoding_message_size(16 << 20),
        })
    }
}

#[async_trait]
impl ModelSource for RemoteRegistry {
    async fn get_model(&self, name: &str) -> Result<Model> {
        let mut client = self.client.clone();
        Ok(client
            .get_model(GetModelRequest {
                name: name.to_owned(),
            })
            .await
            .map_err(|status| Error::from_peer("registry GetModel", status))?
            .into_inner())
    }

    async fn download(&self, name: &str, bundle_precision: Option<i32>) -> Result<FileStream> {
        let mut client = self.client.clone();
        let stream = client
            .download_model_files(DownloadModelFilesRequest {
                name: name.to_owned(),
                bundle_precision,
                ..Default::default()
            })
            .await
            .map_err(|status| Error::from_peer("registry DownloadModelFiles", status))?
            .into_inner();
        Ok(stream
            .map(|piece| {
                piece.map_err(|status| Error::from_peer("registry DownloadModelFiles", status))
            })
            .boxed())
    }
}
