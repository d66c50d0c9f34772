//! Registry clients, upload helpers and fixtures (LoRA addons, chat datasets) for the suites.

use futures::StreamExt;
use tonic::Status;

use crate::AuthedChannel;
use kiln_proto::registry::v1 as regv1;
use kiln_proto::registry::v1::upload_model_files_request::Payload;
use sha2::{Digest, Sha256};

clients! {
    Models, models = regv1::model_service_client::ModelServiceClient<AuthedChannel>, limit 16 << 20;
    Datasets, datasets = regv1::dataset_service_client::DatasetServiceClient<AuthedChannel>, limit 16 << 20;
}

pub use crate::calls::{delete_model, get_dataset, get_model, update_model};

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Creates a model of `kind` in `account` (an addon of `base`).
pub async fn create_model(
    ch: &AuthedChannel,
    account: &str,
    id: &str,
    kind: regv1::model::Kind,
    base: Option<&str>,
) -> regv1::Model {
    let peft_details = base.map(|b| regv1::PeftDetails {
        base_model: b.to_owned(),
        ..Default::default()
    });
    let model = regv1::Model {
        kind: kind as i32,
        peft_details,
        ..Default::default()
    };
    let request = regv1::CreateModelRequest {
        parent: format!("accounts/{account}"),
        model_id: id.to_owned(),
        model: Some(model),
    };
    let created = models(ch).create_model(request).await;
    created.expect("create model").into_inner()
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

/// Sends upload messages (see [`file_messages`]) as one stream.
pub async fn upload_messages(
    ch: &AuthedChannel,
    messages: Vec<regv1::UploadModelFilesRequest>,
) -> Result<regv1::UploadModelFilesResponse, Status> {
    let stream = futures::stream::iter(messages);
    Ok(models(ch).upload_model_files(stream).await?.into_inner())
}

/// Uploads in-memory files whole.
pub async fn upload(
    ch: &AuthedChannel,
    model: &str,
    files: &[(&str, &[u8])],
) -> Result<regv1::UploadModelFilesResponse, Status> {
    upload_messages(ch, file_messages(model, files, 0, None)).await
}

/// Uploads the named files of a local folder, each through [`upload_path`].
pub async fn upload_dir(ch: &AuthedChannel, model: &str, dir: &std::path::Path, files: &[&str]) {
    for file in files {
        upload_path(ch, model, file, &dir.join(file)).await;
    }
}

/// Uploads a local file through the same stream the CLI uses.
pub async fn upload_path(
    ch: &AuthedChannel,
    model: &str,
    path_in_model: &str,
    local: &std::path::Path,
) -> regv1::UploadModelFilesResponse {
    let (sha, size) = kiln_registry::hash_file(local).await.unwrap();
    let stream = kiln_registry::file_upload_stream(
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

/// The models of `parent` that pass `filter`.
pub async fn list_models(
    ch: &AuthedChannel,
    parent: &str,
    filter: &str,
) -> Result<Vec<regv1::Model>, Status> {
    let request = regv1::ListModelsRequest {
        parent: parent.to_owned(),
        filter: filter.to_owned(),
        ..Default::default()
    };
    Ok(models(ch).list_models(request).await?.into_inner().models)
}

/// Downloads a file (or a range) of a model.
pub async fn download(
    ch: &AuthedChannel,
    model: &str,
    path: &str,
    offset: i64,
    length: i64,
) -> Result<Vec<u8>, tonic::Status> {
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

/// A safetensors file of F32 zeros with the given tensor shapes.
pub fn safetensors(tensors: &[(&str, [u64; 2])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let len = shape[0] * shape[1] * 4;
        let entry = serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]});
        header.insert((*name).to_owned(), entry);
        offset += len;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.resize(out.len() + offset as usize, 0);
    out
}

/// A LoRA addon of SmolLM2 (hidden size 576) of rank `r` on q_proj and v_proj, whose v_proj
/// B matrix has `v_out` rows (192 fits the model; anything else does not): its
/// adapter_config.json and adapter_model.safetensors.
pub fn lora(r: u64, v_out: u64) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"});
    let layer = "base_model.model.model.layers.0.self_attn";
    let weights = safetensors(&[
        (&format!("{layer}.q_proj.lora_A.weight"), [r, 576]),
        (&format!("{layer}.q_proj.lora_B.weight"), [576, r]),
        (&format!("{layer}.v_proj.lora_A.weight"), [r, 576]),
        (&format!("{layer}.v_proj.lora_B.weight"), [v_out, r]),
    ]);
    (serde_json::to_vec(&config).unwrap(), weights)
}

/// Uploads a [`lora`] addon's two files to `model`.
pub async fn upload_lora(
    ch: &AuthedChannel,
    model: &str,
    r: u64,
    v_out: u64,
) -> Result<regv1::UploadModelFilesResponse, Status> {
    let (config, weights) = lora(r, v_out);
    let files: [(&str, &[u8]); 2] = [
        ("adapter_config.json", &config),
        ("adapter_model.safetensors", &weights),
    ];
    upload(ch, model, &files).await
}

/// Creates a chat dataset `id` in `account`.
pub async fn create_dataset(ch: &AuthedChannel, account: &str, id: &str) -> regv1::Dataset {
    let dataset = regv1::Dataset {
        format: regv1::dataset::Format::Chat as i32,
        ..Default::default()
    };
    let (parent, dataset_id) = (format!("accounts/{account}"), id.to_owned());
    let dataset = Some(dataset);
    let request = regv1::CreateDatasetRequest {
        parent,
        dataset_id,
        dataset,
    };
    let created = datasets(ch).create_dataset(request).await;
    created.expect("create dataset").into_inner()
}

/// Uploads a dataset's content: a header, then 1000-byte chunks.
pub async fn upload_dataset(
    ch: &AuthedChannel,
    name: &str,
    bytes: &[u8],
) -> Result<regv1::Dataset, Status> {
    use regv1::upload_dataset_request::Payload;
    let header = regv1::DatasetFileHeader {
        dataset: name.to_owned(),
        size_bytes: bytes.len() as i64,
        sha256: sha256_hex(bytes),
    };
    let mut messages = vec![Payload::Header(header)];
    for (i, chunk) in bytes.chunks(1000).enumerate() {
        let offset = (i * 1000) as i64;
        let data = chunk.to_vec().into();
        messages.push(Payload::Chunk(regv1::FileChunk { offset, data }));
    }
    let messages = messages
        .into_iter()
        .map(|payload| regv1::UploadDatasetRequest {
            payload: Some(payload),
        });
    let stream = futures::stream::iter(messages);
    Ok(datasets(ch).upload_dataset(stream).await?.into_inner())
}

/// Downloads a dataset's whole content.
pub async fn download_dataset(ch: &AuthedChannel, name: &str) -> Vec<u8> {
    let request = regv1::DownloadDatasetRequest {
        name: name.to_owned(),
        offset: 0,
        length: 0,
    };
    let mut stream = datasets(ch)
        .download_dataset(request)
        .await
        .expect("download dataset")
        .into_inner();
    let mut back = Vec::new();
    while let Some(piece) = stream.next().await {
        back.extend_from_slice(&piece.expect("a piece").data);
    }
    back
}
