//! Where the engine reads models from: the registry, in process (`kiln dev`) or over gRPC (a
//! node on its own). The server implements [`ModelSource`] on its link to the registry;
//! [`download`] is the downloads' gRPC half.

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::server::ServiceChannel;
use kiln_proto::registry::v1::{
    DownloadModelFilesRequest, DownloadModelFilesResponse, FileChunk, Model, ModelFileHeader,
    UploadModelFilesRequest, ValidateModelUploadResponse, model_service_client::ModelServiceClient,
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
    /// A dataset's whole file.
    async fn read_dataset(&self, name: &str) -> Result<Vec<u8>>;
    /// Uploads `files` into model `model_id` of `parent`, creating it as `model` unless it
    /// exists already from the same fine-tuning job (`model.fine_tuning_job`); with `finish`,
    /// validates it: READY, or why not.
    async fn upload_model(
        &self,
        parent: &str,
        model_id: &str,
        model: Model,
        files: Vec<(String, Vec<u8>)>,
        finish: bool,
    ) -> Result<Model>;
    /// Deletes a model.
    async fn delete_model(&self, name: &str) -> Result<()>;
}

/// `files` as one UploadModelFiles stream's messages into `model`: each file's header, then
/// its bytes in pieces of 1 MiB.
pub fn upload_messages(model: &str, files: &[(String, Vec<u8>)]) -> Vec<UploadModelFilesRequest> {
    use kiln_proto::registry::v1::upload_model_files_request::Payload;
    use sha2::Digest as _;
    let mut messages = Vec::new();
    for (path, bytes) in files {
        messages.push(UploadModelFilesRequest {
            payload: Some(Payload::Header(ModelFileHeader {
                model: model.to_owned(),
                path: path.clone(),
                size_bytes: bytes.len() as i64,
                sha256: format!("{:x}", sha2::Sha256::digest(bytes)),
            })),
        });
        for (i, piece) in bytes.chunks(1 << 20).enumerate() {
            messages.push(UploadModelFilesRequest {
                payload: Some(Payload::Chunk(FileChunk {
                    offset: (i << 20) as i64,
                    data: piece.to_vec().into(),
                })),
            });
        }
    }
    messages
}

/// The model a validation left READY, or its problems as FAILED_PRECONDITION.
pub fn validated(response: ValidateModelUploadResponse) -> Result<Model> {
    if response.valid {
        return Ok(response.model.unwrap_or_default());
    }
    let mut problems = response.errors;
    problems.extend(
        response
            .missing_files
            .iter()
            .map(|f| format!("{f} is missing")),
    );
    Err(Error::FailedPrecondition(format!(
        "the registry refused the model: {}",
        problems.join("; ")
    )))
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
