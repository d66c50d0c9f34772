//! Models and datasets: `kiln create|get|list|update|delete model|dataset` (create uploads
//! the files) and `kiln download model|dataset`.

mod upload;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;
use kiln_proto::registry::v1 as regv1;
use kiln_proto::registry::v1::model::Kind;
use tokio::io::AsyncWriteExt;

use super::flags::DescribeArgs;
use crate::client::{
    Authed, Client, CreateRpc, Format, GetRpc, InParent, ListArgs, changes, delete_and_print,
    enum_name, get_and_print, list_and_print, print_one, printable, resource, say, time,
    update_and_print, yes_no,
};

#[derive(Debug, Subcommand)]
pub enum Create {
    /// Create a model and upload a file or folder: a GGUF file, an ONNX folder (model.onnx,
    /// tokenizer.json), or a PEFT folder (a LoRA addon, with --base-model). Resumes an
    /// interrupted upload of the same files.
    Model(CreateModelArgs),
    /// Create a dataset and upload its JSONL file.
    Dataset(CreateDatasetArgs),
}

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
    #[command(flatten)]
    pub describe: DescribeArgs,
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
pub enum Get {
    /// Show a model (an ID in the account, or a full name like accounts/kiln/models/x).
    Model { model: String },
    /// Show a dataset.
    Dataset { dataset: String },
}

#[derive(Debug, Subcommand)]
pub enum List {
    /// List the account's models (with --account kiln: the public library).
    Models(ListArgs),
    /// List the account's datasets.
    Datasets(ListArgs),
}

#[derive(Debug, Subcommand)]
pub enum Update {
    /// Change a model (an ID in the account, or a full name).
    Model {
        model: String,
        #[command(flatten)]
        describe: DescribeArgs,
        /// Publish to every account (platform admin).
        #[arg(long)]
        public: Option<bool>,
    },
    /// Change a dataset.
    Dataset {
        dataset: String,
        #[arg(long)]
        display_name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum Delete {
    /// Delete a model (refused while it is deployed).
    Model { model: String },
    /// Delete a dataset.
    Dataset { dataset: String },
}

#[derive(Debug, Subcommand)]
pub enum Download {
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

fn models(client: &Client) -> regv1::model_service_client::ModelServiceClient<Authed> {
    regv1::model_service_client::ModelServiceClient::new(client.authed())
        .max_decoding_message_size(16 << 20)
}

fn datasets(client: &Client) -> regv1::dataset_service_client::DatasetServiceClient<Authed> {
    regv1::dataset_service_client::DatasetServiceClient::new(client.authed())
        .max_decoding_message_size(16 << 20)
}

resource!(regv1::Model, models {
    create: create_model(regv1::CreateModelRequest),
    get: get_model(regv1::GetModelRequest) in "models",
    list: list_models(regv1::ListModelsRequest, parent) => models,
    update: update_model(regv1::UpdateModelRequest) model,
    delete: delete_model(regv1::DeleteModelRequest),
});
resource!(regv1::Dataset, datasets {
    create: create_dataset(regv1::CreateDatasetRequest),
    get: get_dataset(regv1::GetDatasetRequest) in "datasets",
    list: list_datasets(regv1::ListDatasetsRequest, parent) => datasets,
    update: update_dataset(regv1::UpdateDatasetRequest) dataset,
    delete: delete_dataset(regv1::DeleteDatasetRequest),
});

printable!(regv1::Model, "kiln.registry.v1.Model" {
    "NAME" => |m| m.name.clone(),
    "KIND" => |m| enum_name(m.kind, Kind::as_str_name),
    "STATE" => |m| enum_name(m.state, regv1::model::State::as_str_name),
    "PUBLIC" => |m| yes_no(m.public),
    "SIZE" => size_text,
    "CREATED" => |m| time(&m.create_time),
});

/// A model's files' total size in MB.
fn size_text(model: &regv1::Model) -> String {
    let size: i64 = model.files.iter().map(|f| f.size_bytes).sum();
    format!("{:.1} MB", size as f64 / 1e6)
}

printable!(regv1::Dataset, "kiln.registry.v1.Dataset" {
    "NAME" => |d| d.name.clone(),
    "FORMAT" => |d| enum_name(d.format, regv1::dataset::Format::as_str_name),
    "STATE" => |d| enum_name(d.state, regv1::dataset::State::as_str_name),
    "EXAMPLES" => |d| d.example_count.to_string(),
    "CREATED" => |d| time(&d.create_time),
});

pub(crate) async fn create(client: &Client, format: Format, command: Create) -> anyhow::Result<()> {
    match command {
        Create::Model(args) => create_model(client, format, args).await,
        Create::Dataset(args) => create_dataset(client, format, args).await,
    }
}

async fn create_model(
    client: &Client,
    format: Format,
    args: CreateModelArgs,
) -> anyhow::Result<()> {
    let files = upload::local_files(&args.path)?;
    let kind = match args.kind.as_deref() {
        None => upload::infer_kind(&files, args.base_model.is_some()),
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
        Some(b) => Some(client.full_name("models", b).await?),
        None => None,
    };
    let parent = client.account().await?;
    let name = format!("{parent}/models/{}", args.model_id);
    let request = regv1::CreateModelRequest {
        parent,
        model_id: args.model_id,
        model: Some(regv1::Model {
            kind: kind as i32,
            display_name: args.describe.display_name.unwrap_or_default(),
            description: args.describe.description.unwrap_or_default(),
            public: args.public,
            peft_details: base.map(|b| regv1::PeftDetails {
                base_model: b,
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    // An existing model still UPLOADING is resumed rather than refused.
    let model = match regv1::Model::create(client, request).await {
        Ok(m) => m,
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            let existing = regv1::Model::get(client, name.clone()).await?;
            if existing.state != regv1::model::State::Uploading as i32 {
                bail!("{name} already exists and is not uploading");
            }
            eprintln!("{name} exists: resuming its upload");
            existing
        }
        Err(status) => return Err(status.into()),
    };
    let mut service = models(client);
    for (path_in_model, local) in files {
        upload::upload_file(&mut service, &model, path_in_model, local).await?;
    }
    let validated = service
        .validate_model_upload(regv1::ValidateModelUploadRequest {
            name: model.name.clone(),
            validate_only: false,
        })
        .await?
        .into_inner();
    print_one(format, &validated.model.unwrap_or_default());
    if !validated.valid {
        bail!("the model is not valid: {}", validated.errors.join("; "));
    }
    Ok(())
}

async fn create_dataset(
    client: &Client,
    format: Format,
    args: CreateDatasetArgs,
) -> anyhow::Result<()> {
    // Read first: an unreadable file creates no dataset.
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let text_format = match args.format.as_deref() {
        Some("chat") => regv1::dataset::Format::Chat,
        Some("completion") => regv1::dataset::Format::Completion,
        Some(other) => bail!("--format {other:?}: use chat or completion"),
        None => {
            let text = String::from_utf8_lossy(&bytes);
            let first = text.lines().find(|l| !l.trim().is_empty());
            upload::dataset_format(first.unwrap_or_default())
        }
    };
    let request = regv1::CreateDatasetRequest {
        parent: client.account().await?,
        dataset_id: args.dataset_id,
        dataset: Some(regv1::Dataset {
            format: text_format as i32,
            display_name: args.display_name.unwrap_or_default(),
            ..Default::default()
        }),
    };
    let dataset = regv1::Dataset::create(client, request).await?;
    let (sha, _) = kiln_registry::hash_file(&args.file).await?;
    let messages = upload::dataset_upload(dataset.name, sha, bytes.into());
    let ready = datasets(client)
        .upload_dataset(futures::stream::iter(messages))
        .await?;
    print_one(format, ready.get_ref());
    Ok(())
}

pub(crate) async fn get(client: &Client, format: Format, command: Get) -> anyhow::Result<()> {
    match command {
        Get::Model { model } => get_and_print::<regv1::Model>(client, format, &model).await,
        Get::Dataset { dataset } => get_and_print::<regv1::Dataset>(client, format, &dataset).await,
    }
}

pub(crate) async fn list(client: &Client, format: Format, command: List) -> anyhow::Result<()> {
    let parent = client.account().await?;
    match command {
        List::Models(list) => {
            let request = InParent::in_parent(parent);
            list_and_print::<regv1::Model>(client, format, &list, request).await
        }
        List::Datasets(list) => {
            let request = InParent::in_parent(parent);
            list_and_print::<regv1::Dataset>(client, format, &list, request).await
        }
    }
}

pub(crate) async fn update(client: &Client, format: Format, command: Update) -> anyhow::Result<()> {
    match command {
        Update::Model {
            model,
            describe:
                DescribeArgs {
                    display_name,
                    description,
                },
            public,
        } => {
            let (mut update, mask) = changes!(regv1::Model {
                display_name,
                description,
                public
            })?;
            update.name = client.full_name("models", &model).await?;
            update_and_print(client, format, update, mask).await
        }
        Update::Dataset {
            dataset,
            display_name,
        } => {
            let (mut update, mask) = changes!(regv1::Dataset { display_name })?;
            update.name = client.full_name("datasets", &dataset).await?;
            update_and_print(client, format, update, mask).await
        }
    }
}

pub(crate) async fn delete(client: &Client, format: Format, command: Delete) -> anyhow::Result<()> {
    match command {
        Delete::Model { model } => delete_and_print::<regv1::Model>(client, format, &model).await,
        Delete::Dataset { dataset } => {
            delete_and_print::<regv1::Dataset>(client, format, &dataset).await
        }
    }
}

/// The last segment of a resource name (its ID).
fn id_of(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

pub(crate) async fn download(client: &Client, command: Download) -> anyhow::Result<()> {
    match command {
        Download::Model { model, path, dest } => {
            let name = client.full_name("models", &model).await?;
            let dir = dest.unwrap_or_else(|| PathBuf::from(id_of(&name)));
            tokio::fs::create_dir_all(&dir).await?;
            let mut stream = models(client)
                .download_model_files(regv1::DownloadModelFilesRequest {
                    name,
                    path: path.unwrap_or_default(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            // The pieces of each file come in order, one file after the other.
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
                    say!("{}", target.display());
                }
                if let Some((_, f)) = current.as_mut() {
                    f.write_all(&piece.data).await?;
                }
            }
            if let Some((_, mut f)) = current {
                f.flush().await?;
            }
        }
        Download::Dataset { dataset, dest } => {
            let name = client.full_name("datasets", &dataset).await?;
            let target = dest.unwrap_or_else(|| PathBuf::from(format!("{}.jsonl", id_of(&name))));
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
            say!("{}", target.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Printable, to_json};

    #[test]
    fn registry_resources_print() {
        let model = regv1::Model {
            name: "accounts/a/models/m".into(),
            kind: Kind::EmbeddingModel as i32,
            state: regv1::model::State::Ready as i32,
            files: vec![
                regv1::ModelFile {
                    size_bytes: 1_500_000,
                    ..Default::default()
                },
                regv1::ModelFile {
                    size_bytes: 500_000,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            model.row(),
            [
                "accounts/a/models/m",
                "EMBEDDING_MODEL",
                "READY",
                "no",
                "2.0 MB",
                "-"
            ]
        );
        assert_eq!(
            to_json(regv1::Model::PROTO_NAME, &model)["kind"],
            "EMBEDDING_MODEL"
        );
        let dataset = regv1::Dataset {
            example_count: 5,
            ..Default::default()
        };
        assert_eq!(dataset.row()[3], "5");
        assert_eq!(
            to_json(regv1::Dataset::PROTO_NAME, &dataset)["example_count"],
            "5"
        );
        assert_eq!(id_of("accounts/a/models/m"), "m");
        assert_eq!(id_of("m"), "m");
    }
}
