//! Where the engine reads models from: the registry, in process (`kiln dev`) or over gRPC (a
//! node on its own). The server implements [`ModelSource`] on its link to the registry;
//! [`download`] is the downloads' gRPC half.

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::server::ServiceChannel;
use kiln_proto::registry::v1::{
    DownloadModelFilesRequest, DownloadModelFilesResponse, Model,
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

/// Every file of the model (`bundle_precision` unset) or of a prepared bundle, from the
/// registry over gRPC (the half of a [`ModelSource`] that reaches a remote registry).
pub async fn download(
    client: &ModelServiceClient<ServiceChannel>,
    name: &str,
    bundle_precision: Option<i32>,
) -> Result<FileStream> {
    let failed = |status| Error::from_peer("registry DownloadModelFiles", status);
    // Pieces of up to 4 MiB, within a message of their own.
    let mut client = client.clone().max_decoding_message_size(16 << 20);
    let stream = client
        .download_model_files(DownloadModelFilesRequest {
            name: name.to_owned(),
            bundle_precision,
            ..Default::default()
        })
        .await
        .map_err(failed)?
        .into_inner();
    Ok(stream.map(move |piece| piece.map_err(failed)).boxed())
}
