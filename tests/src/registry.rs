//! Registry clients and upload helpers for the suites.

use crate::AuthedChannel;
use kiln_proto::registry::v1 as regv1;
use kiln_proto::registry::v1::upload_model_files_request::Payload;
use sha2::{Digest, Sha256};

pub type Models = regv1::model_service_client::ModelServiceClient<AuthedChannel>;
pub type Datasets = regv1::dataset_service_client::DatasetServiceClient<AuthedChannel>;

pub fn models(ch: &AuthedChannel) -> Models {
    Models::new(ch.clone()).max_decoding_message_size(16 << 20)
}

pub fn datasets(ch: &AuthedChannel) -> Datasets {
    Datasets::new(ch.clone()).max_decoding_message_size(16 << 20)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Creates a model of `kind` in `account`.
pub async fn create_model(
    ch: &AuthedChannel,
    account: &str,
    id: &str,
    kind: regv1::model::Kind,
    base: Option<&str>,
) -> Result<regv1::Model, tonic::Status> {
    models(ch)
        .create_model(regv1::CreateModelRequest {
            parent: format!("accounts/{account}"),
            model_id: id.to_owned(),
            model: Some(regv1::Model {
                kind: kind as i32,
                peft_details: base.map(|b| regv1::PeftDetails {
                    base_model: b.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .map(|r| r.into_inner())
}

/// The upload messages of in-memory files: each a header then 1 MiB chunks from `from`.
pub fn file_messages(
    model: &str,
    files: &[(&str, &[u8])],
    from: usize,
    until: Option<usize>,
) -> Vec<regv1::UploadModelFilesRequest> {
    let mut out = Vec::new();
    for (path, bytes) in files {
        out.push(regv1::UploadModelFilesRequest {
            payload: Some(Payload::Header(regv1::ModelFileHeader {
                model: model.to_owned(),
                path: (*path).to_owned(),
                size_bytes: bytes.len() as i64,
                sha256: sha256_hex(bytes),
            })),
        });
        let end = until.unwrap_or(bytes.len()).min(bytes.len());
        let mut at = from;
        while at < end {
            let next = (at + (1 << 20)).min(end);
            out.push(regv1::UploadModelFilesRequest {
                payload: Some(Payload::Chunk(regv1::FileChunk {
                    offset: at as i64,
                    data: bytes[at..next].to_vec().into(),
                })),
            });
            at = next;
        }
    }
    out
}

/// Uploads in-memory files whole.
pub async fn upload(
    ch: &AuthedChannel,
    model: &str,
    files: &[(&str, &[u8])],
) -> Result<regv1::UploadModelFilesResponse, tonic::Status> {
    let messages = file_messages(model, files, 0, None);
    models(ch)
        .upload_model_files(futures::stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

/// Uploads a local file through the same stream the CLI uses.
pub async fn upload_path(
    ch: &AuthedChannel,
    model: &str,
    path_in_model: &str,
    local: &std::path::Path,
) -> regv1::UploadModelFilesResponse {
    let (sha, size) = kiln_registry::library::hash_file(local).await.unwrap();
    let stream = kiln_registry::library::file_upload_stream(
        model.to_owned(),
        path_in_model.to_owned(),
        local.to_owned(),
        size,
        sha,
        0,
        |_| {},
    );
    models(ch)
        .upload_model_files(stream)
        .await
        .expect("upload")
        .into_inner()
}

pub async fn validate(ch: &AuthedChannel, model: &str) -> regv1::ValidateModelUploadResponse {
    models(ch)
        .validate_model_upload(regv1::ValidateModelUploadRequest {
            name: model.to_owned(),
            validate_only: false,
        })
        .await
        .expect("validate")
        .into_inner()
}

/// Downloads a file (or a range) of a model.
pub async fn download(
    ch: &AuthedChannel,
    model: &str,
    path: &str,
    offset: i64,
    length: i64,
) -> Result<Vec<u8>, tonic::Status> {
    use futures::StreamExt;
    let mut stream = models(ch)
        .download_model_files(regv1::DownloadModelFilesRequest {
            name: model.to_owned(),
            path: path.to_owned(),
            offset,
            length,
            bundle_precision: None,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        assert_eq!(
            piece.offset as usize,
            offset as usize + out.len(),
            "pieces arrive in order"
        );
        out.extend_from_slice(&piece.data);
    }
    Ok(out)
}
