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
#[async_trait]
impl ModelSource for ModelServiceClient<kiln_core::server::ServiceChannel> {
    async fn get_model(&self, name: &str) -> Result<Model> {
        let request = GetModelRequest {
            name: name.to_owned(),
        };
        Ok(ModelServiceClient::get_model(&mut self.clone(), request)
            .await
            .map_err(|status| Error::from_peer("registry GetModel", status))?
            .into_inner())
    }

    async fn download(&self, name: &str, bundle_precision: Option<i32>) -> Result<FileStream> {
        // Pieces of up to 4 MiB, within a message of their own.
        let mut client = self.clone().max_decoding_message_size(16 << 20);
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
