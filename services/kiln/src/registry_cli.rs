//! The registry's client commands: `kiln create|get|list|update|delete model|dataset` and
//! `kiln download model|dataset`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;
use kiln_proto::registry::v1 as regv1;
use kiln_proto::registry::v1::model::Kind;
use kiln_registry::library::{file_upload_stream, hash_file};

use crate::cli::{Client, ListArgs, collect_pages, print};
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct CreateModelArgs {
    /// The model ID.
    pub model_id: String,
    /// A file (a .gguf checkpoint) or a folder (ONNX bundle or PEFT adapter).
    pub path: PathBuf,
    /// The base model of a LoRA addon (an ID in the account, or a full name).
    #[arg(long)]
    pub base_model: Option<String>,
    /// base, embedding, tensor or lora (default: read from the files).
    #[arg(long)]
    pub kind: Option<String>,
    #[arg(long)]
    pub display_name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// Publish to every account (platform admin).
    #[arg(long)]
    pub public: bool,
}

#[derive(Debug, Args)]
pub struct CreateDatasetArgs {
    pub dataset_id: String,
    /// The JSONL file.
    pub file: PathBuf,
    /// chat or completion (default: read from the first line).
    #[arg(long)]
    pub format: Option<String>,
    #[arg(long)]
    pub display_name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DownloadCommand {
    /// Download a model's files into a folder (or one file, or a byte range of it).
    Model {
        model: String,
        /// Only this file.
        #[arg(long)]
        path: Option<String>,
        /// Folder to write into (default: the model ID).
        #[arg(long)]
        dest: Option<PathBuf>,
    },
    /// Download a dataset's JSONL file.
    Dataset {
        dataset: String,
        /// File to write (default: <dataset>.jsonl).
        #[arg(long)]
        dest: Option<PathBuf>,
    },
}

type Authed = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    kiln_core::telemetry::OutgoingInterceptor,
>;

fn models(client: &Client) -> regv1::model_service_client::ModelServiceClient<Authed> {
    regv1::model_service_client::ModelServiceClient::new(client.authed())
        .max_decoding_message_size(16 << 20)
}

fn datasets(client: &Client) -> regv1::dataset_service_client::DatasetServiceClient<Authed> {
    regv1::dataset_service_client::DatasetServiceClient::new(client.authed())
        .max_decoding_message_size(16 << 20)
}

/// A full resource name from an ID in the current account, or a full name as given.
pub(crate) async fn full_name(
    client: &Client,
    collection: &str,
    id: &str,
) -> anyhow::Result<String> {
    if id.starts_with("accounts/") {
        return Ok(id.to_owned());
    }
    Ok(format!("{}/{collection}/{id}", client.account().await?))
}

fn enum_name<E: TryFrom<i32>>(value: i32, name: fn(E) -> &'static str) -> String {
    E::try_from(value).map(name).unwrap_or("?").to_owned()
}

fn model_row(m: &regv1::Model) -> Vec<String> {
    let size: i64 = m.files.iter().map(|f| f.size_bytes).sum();
    vec![
        m.name.clone(),
        enum_name(m.kind, |k: Kind| k.as_str_name()),
        enum_name(m.state, |s: regv1::model::State| s.as_str_name()),
        if m.public { "yes".into() } else { "no".into() },
        format!("{:.1} MB", size as f64 / 1e6),
        output::time(&m.create_time),
    ]
}
const MODEL_HEADERS: &[&str] = &["NAME", "KIND", "STATE", "PUBLIC", "SIZE", "CREATED"];

fn dataset_row(d: &regv1::Dataset) -> Vec<String> {
    vec![
        d.name.clone(),
        enum_name(d.format, |f: regv1::dataset::Format| f.as_str_name()),
        enum_name(d.state, |s: regv1::dataset::State| s.as_str_name()),
        d.example_count.to_string(),
        output::time(&d.create_time),
    ]
}
const DATASET_HEADERS: &[&str] = &["NAME", "FORMAT", "STATE", "EXAMPLES", "CREATED"];

/// A one-line progress display on stderr.
struct Progress {
    label: String,
    total: u64,
    sent: Arc<AtomicU64>,
    started: Instant,
}

impl Progress {
    fn new(label: String, total: u64, already: u64) -> Self {
        Self {
            label,
            total,
            sent: Arc::new(AtomicU64::new(already)),
            started: Instant::now(),
        }
    }

    fn render(&self) {
        let sent = self.sent.load(Ordering::Relaxed);
        let pct = if self.total == 0 {
            100.0
        } else {
            sent as f64 * 100.0 / self.total as f64
        };
        let rate = sent as f64 / 1e6 / self.started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{}: {:>8.1} / {:.1} MB  {pct:>5.1}%  {rate:>7.1} MB/s",
            self.label,
            sent as f64 / 1e6,
            self.total as f64 / 1e6
        );
    }
}

/// The files of a model folder (top level), or the one file.
fn local_files(path: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    if path.is_file() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("the file name is not UTF-8")?;
        return Ok(vec![(name.to_owned(), path.to_owned())]);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| anyhow::anyhow!("a file name is not UTF-8"))?;
            if !name.starts_with('.') {
                files.push((name, entry.path()));
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{} has no files", path.display());
    }
    Ok(files)
}

fn infer_kind(files: &[(String, PathBuf)], base: bool) -> Kind {
    let has = |n: &str| files.iter().any(|(f, _)| f == n);
    if base || has("adapter_config.json") {
        Kind::LoraAddon
    } else if files.iter().any(|(f, _)| f.ends_with(".gguf")) || is_text_generation(files) {
        Kind::BaseModel
    } else if has("tokenizer.json") {
        Kind::EmbeddingModel
    } else {
        Kind::TensorModel
    }
}

/// Whether an ONNX folder holds a language model: its manifest's task says so, or its
/// Hugging Face config.json names a causal LM (an optimum export).
fn is_text_generation(files: &[(String, PathBuf)]) -> bool {
    let read = |name: &str| {
        files
            .iter()
            .find(|(f, _)| f == name)
            .and_then(|(_, path)| std::fs::read(path).ok())
    };
    let manifest_task = read("manifest.json")
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m.get("task").and_then(|t| t.as_str()).map(str::to_owned));
    if let Some(task) = manifest_task {
        return task == "text-generation";
    }
    read("config.json").is_some_and(|config| {
        kiln_formats::read_hf(kiln_formats::HfFiles {
            config: Some(&config),
            ..Default::default()
        })
        .is_ok_and(|info| info.is_causal_lm())
    })
}

pub async fn create_model(
    client: &Client,
    format: Format,
    args: CreateModelArgs,
) -> anyhow::Result<()> {
    let files = local_files(&args.path)?;
    let kind = match args.kind.as_deref() {
        None => infer_kind(&files, args.base_model.is_some()),
        Some("base") => Kind::BaseModel,
        Some("embedding") => Kind::EmbeddingModel,
        Some("tensor") => Kind::TensorModel,
        Some("lora") => Kind::LoraAddon,
        Some(other) => bail!("--kind {other:?}: use base, embedding, tensor or lora"),
    };
    if kind == Kind::LoraAddon && args.base_model.is_none() {
        bail!("a LoRA addon needs --base-model");
    }
    let base = match &args.base_model {
        Some(b) => Some(full_name(client, "models", b).await?),
        None => None,
    };
    let parent = client.account().await?;
    let name = format!("{parent}/models/{}", args.model_id);
    let created = models(client)
        .create_model(regv1::CreateModelRequest {
            parent: parent.clone(),
            model_id: args.model_id.clone(),
            model: Some(regv1::Model {
                kind: kind as i32,
                display_name: args.display_name.clone().unwrap_or_default(),
                description: args.description.clone().unwrap_or_default(),
                public: args.public,
                peft_details: base.map(|b| regv1::PeftDetails {
                    base_model: b,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await;
    // An existing model still UPLOADING is resumed rather than refused.
    let model = match created {
        Ok(m) => m.into_inner(),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            let existing = models(client)
                .get_model(regv1::GetModelRequest { name: name.clone() })
                .await?
                .into_inner();
            if existing.state != regv1::model::State::Uploading as i32 {
                bail!("{name} already exists and is not uploading");
            }
            eprintln!("{name} exists: resuming its upload");
            existing
        }
        Err(status) => return Err(status.into()),
    };
    for (path_in_model, local) in files {
        let (sha, size) = hash_file(&local)
            .await
            .with_context(|| format!("cannot read {}", local.display()))?;
        let stored = model
            .files
            .iter()
            .find(|f| f.path == path_in_model && f.sha256 == sha && f.size_bytes as u64 == size);
        if stored.is_some_and(|f| f.complete) {
            continue;
        }
        let offset = stored.map(|f| f.uploaded_bytes as u64).unwrap_or(0);
        let progress = Progress::new(path_in_model.clone(), size, offset);
        let sent = progress.sent.clone();
        let stream = file_upload_stream(
            model.name.clone(),
            path_in_model.clone(),
            local.clone(),
            size,
            sha,
            offset,
            move |n| {
                sent.fetch_add(n, Ordering::Relaxed);
            },
        );
        let ticker = {
            let progress = Progress {
                label: progress.label.clone(),
                total: progress.total,
                sent: progress.sent.clone(),
                started: progress.started,
            };
            tokio::spawn(async move {
                loop {
                    progress.render();
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            })
        };
        let result = models(client).upload_model_files(stream).await;
        ticker.abort();
        progress.render();
        eprintln!();
        result?;
    }
    let validated = models(client)
        .validate_model_upload(regv1::ValidateModelUploadRequest {
            name: model.name.clone(),
            validate_only: false,
        })
        .await?
        .into_inner();
    let model = validated.model.unwrap_or_default();
    print(
        format,
        "kiln.registry.v1.Model",
        &[model],
        MODEL_HEADERS,
        model_row,
        true,
    );
    if !validated.valid {
        bail!("the model is not valid: {}", validated.errors.join("; "));
    }
    Ok(())
}

pub async fn create_dataset(
    client: &Client,
    format: Format,
    args: CreateDatasetArgs,
) -> anyhow::Result<()> {
    let text_format = match args.format.as_deref() {
        Some("chat") => regv1::dataset::Format::Chat,
        Some("completion") => regv1::dataset::Format::Completion,
        Some(other) => bail!("--format {other:?}: use chat or completion"),
        None => {
            let first = std::fs::read_to_string(&args.file)
                .with_context(|| format!("cannot read {}", args.file.display()))?
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .to_owned();
            if first.contains("\"messages\"") {
                regv1::dataset::Format::Chat
            } else {
                regv1::dataset::Format::Completion
            }
        }
    };
    let parent = client.account().await?;
    let dataset = datasets(client)
        .create_dataset(regv1::CreateDatasetRequest {
            parent,
            dataset_id: args.dataset_id,
            dataset: Some(regv1::Dataset {
                format: text_format as i32,
                display_name: args.display_name.unwrap_or_default(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let (sha, size) = hash_file(&args.file).await?;
    let bytes = tokio::fs::read(&args.file).await?;
    let mut messages = vec![regv1::UploadDatasetRequest {
        payload: Some(regv1::upload_dataset_request::Payload::Header(
            regv1::DatasetFileHeader {
                dataset: dataset.name.clone(),
                size_bytes: size as i64,
                sha256: sha,
            },
        )),
    }];
    let bytes = bytes::Bytes::from(bytes);
    for start in (0..bytes.len()).step_by(kiln_registry::library::UPLOAD_CHUNK) {
        let end = (start + kiln_registry::library::UPLOAD_CHUNK).min(bytes.len());
        messages.push(regv1::UploadDatasetRequest {
            payload: Some(regv1::upload_dataset_request::Payload::Chunk(
                regv1::FileChunk {
                    offset: start as i64,
                    data: bytes.slice(start..end),
                },
            )),
        });
    }
    let ready = datasets(client)
        .upload_dataset(futures::stream::iter(messages))
        .await?
        .into_inner();
    print(
        format,
        "kiln.registry.v1.Dataset",
        &[ready],
        DATASET_HEADERS,
        dataset_row,
        true,
    );
    Ok(())
}

pub async fn get_model(client: &Client, format: Format, model: &str) -> anyhow::Result<()> {
    let name = full_name(client, "models", model).await?;
    let m = models(client)
        .get_model(regv1::GetModelRequest { name })
        .await?
        .into_inner();
    print(
        format,
        "kiln.registry.v1.Model",
        &[m],
        MODEL_HEADERS,
        model_row,
        true,
    );
    Ok(())
}

pub async fn get_dataset(client: &Client, format: Format, dataset: &str) -> anyhow::Result<()> {
    let name = full_name(client, "datasets", dataset).await?;
    let d = datasets(client)
        .get_dataset(regv1::GetDatasetRequest { name })
        .await?
        .into_inner();
    print(
        format,
        "kiln.registry.v1.Dataset",
        &[d],
        DATASET_HEADERS,
        dataset_row,
        true,
    );
    Ok(())
}

pub async fn list_models(client: &Client, format: Format, list: ListArgs) -> anyhow::Result<()> {
    let parent = client.account().await?;
    let items = collect_pages(list.limit, |page_token| {
        let mut c = models(client);
        let request = regv1::ListModelsRequest {
            parent: parent.clone(),
            page_size: 200,
            page_token,
            filter: list.filter.clone(),
            order_by: list.order_by.clone(),
        };
        async move {
            let page = c.list_models(request).await?.into_inner();
            Ok((page.models, page.next_page_token))
        }
    })
    .await?;
    print(
        format,
        "kiln.registry.v1.Model",
        &items,
        MODEL_HEADERS,
        model_row,
        false,
    );
    Ok(())
}

pub async fn list_datasets(client: &Client, format: Format, list: ListArgs) -> anyhow::Result<()> {
    let parent = client.account().await?;
    let items = collect_pages(list.limit, |page_token| {
        let mut c = datasets(client);
        let request = regv1::ListDatasetsRequest {
            parent: parent.clone(),
            page_size: 200,
            page_token,
            filter: list.filter.clone(),
            order_by: list.order_by.clone(),
        };
        async move {
            let page = c.list_datasets(request).await?.into_inner();
            Ok((page.datasets, page.next_page_token))
        }
    })
    .await?;
    print(
        format,
        "kiln.registry.v1.Dataset",
        &items,
        DATASET_HEADERS,
        dataset_row,
        false,
    );
    Ok(())
}

pub async fn update_model(
    client: &Client,
    format: Format,
    model: &str,
    display_name: Option<String>,
    description: Option<String>,
    public: Option<bool>,
) -> anyhow::Result<()> {
    let mut update = regv1::Model {
        name: full_name(client, "models", model).await?,
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(v) = display_name {
        update.display_name = v;
        paths.push("display_name".to_owned());
    }
    if let Some(v) = description {
        update.description = v;
        paths.push("description".to_owned());
    }
    if let Some(v) = public {
        update.public = v;
        paths.push("public".to_owned());
    }
    if paths.is_empty() {
        bail!("nothing to update: pass --display-name, --description or --public");
    }
    let m = models(client)
        .update_model(regv1::UpdateModelRequest {
            model: Some(update),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await?
        .into_inner();
    print(
        format,
        "kiln.registry.v1.Model",
        &[m],
        MODEL_HEADERS,
        model_row,
        true,
    );
    Ok(())
}

pub async fn update_dataset(
    client: &Client,
    format: Format,
    dataset: &str,
    display_name: Option<String>,
) -> anyhow::Result<()> {
    let Some(display_name) = display_name else {
        bail!("nothing to update: pass --display-name")
    };
    let d = datasets(client)
        .update_dataset(regv1::UpdateDatasetRequest {
            dataset: Some(regv1::Dataset {
                name: full_name(client, "datasets", dataset).await?,
                display_name,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await?
        .into_inner();
    print(
        format,
        "kiln.registry.v1.Dataset",
        &[d],
        DATASET_HEADERS,
        dataset_row,
        true,
    );
    Ok(())
}

pub async fn delete_model(client: &Client, model: &str) -> anyhow::Result<()> {
    let name = full_name(client, "models", model).await?;
    models(client)
        .delete_model(regv1::DeleteModelRequest { name: name.clone() })
        .await?;
    crate::say!("deleted {name}");
    Ok(())
}

pub async fn delete_dataset(client: &Client, dataset: &str) -> anyhow::Result<()> {
    let name = full_name(client, "datasets", dataset).await?;
    datasets(client)
        .delete_dataset(regv1::DeleteDatasetRequest { name: name.clone() })
        .await?;
    crate::say!("deleted {name}");
    Ok(())
}

pub async fn download(client: &Client, command: DownloadCommand) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    match command {
        DownloadCommand::Model { model, path, dest } => {
            let name = full_name(client, "models", &model).await?;
            let dir =
                dest.unwrap_or_else(|| PathBuf::from(name.rsplit('/').next().unwrap_or("model")));
            tokio::fs::create_dir_all(&dir).await?;
            let mut stream = models(client)
                .download_model_files(regv1::DownloadModelFilesRequest {
                    name,
                    path: path.unwrap_or_default(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut current: Option<(String, tokio::fs::File)> = None;
            while let Some(piece) = stream.next().await {
                let piece = piece?;
                if current.as_ref().is_none_or(|(p, _)| *p != piece.path) {
                    if let Some((_, mut f)) = current.take() {
                        f.flush().await?;
                    }
                    let target = dir.join(&piece.path);
                    if let Some(parent) = target.parent() {
                        tokio::fs::create_dir_all(parent).await?;
                    }
                    current = Some((piece.path.clone(), tokio::fs::File::create(&target).await?));
                    crate::say!("{}", target.display());
                }
                if let Some((_, f)) = current.as_mut() {
                    f.write_all(&piece.data).await?;
                }
            }
            if let Some((_, mut f)) = current {
                f.flush().await?;
            }
        }
        DownloadCommand::Dataset { dataset, dest } => {
            let name = full_name(client, "datasets", &dataset).await?;
            let target = dest.unwrap_or_else(|| {
                PathBuf::from(format!(
                    "{}.jsonl",
                    name.rsplit('/').next().unwrap_or("dataset")
                ))
            });
            let mut stream = datasets(client)
                .download_dataset(regv1::DownloadDatasetRequest {
                    name,
                    offset: 0,
                    length: 0,
                })
                .await?
                .into_inner();
            let mut file = tokio::fs::File::create(&target).await?;
            while let Some(piece) = stream.next().await {
                file.write_all(&piece?.data).await?;
            }
            file.flush().await?;
            crate::say!("{}", target.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files of `folder` under tests/data as `local_files` lists them.
    fn fixture(folder: &str) -> Vec<(String, PathBuf)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data")
            .join(folder);
        local_files(&dir).unwrap()
    }

    #[test]
    fn an_optimum_export_is_a_base_model_and_a_bert_folder_an_embedder() {
        let export = fixture("llm/hf-optimum/tiny-llama");
        assert_eq!(infer_kind(&export, false), Kind::BaseModel);
        let tmp = tempfile::tempdir().unwrap();
        for name in ["model.onnx", "tokenizer.json"] {
            std::fs::write(tmp.path().join(name), b"x").unwrap();
        }
        std::fs::write(
            tmp.path().join("config.json"),
            br#"{"architectures": ["BertModel"]}"#,
        )
        .unwrap();
        let embedder = local_files(tmp.path()).unwrap();
        assert_eq!(infer_kind(&embedder, false), Kind::EmbeddingModel);
        assert_eq!(infer_kind(&embedder, true), Kind::LoraAddon);
    }
}
