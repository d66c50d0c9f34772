//! How a service reaches the services it calls: in the same process (their Rust API, no
//! gRPC), or over gRPC with the service credential. The registry is the scheduler's model
//! catalog and the nodes' model source; billing is the scheduler's quota gate and the nodes'
//! rate limits; the scheduler is a node's link.

use std::collections::HashMap;

use futures::StreamExt;
use kiln_core::auth::Principal;
use kiln_core::server::ServiceChannel;
use kiln_core::{Error, Result};
use kiln_inference::limits::{LimitSource, Limits, RPM_QUOTA, TPM_QUOTA};
use kiln_inference::source::{FileStream, ModelSource};
use kiln_proto::billing::v1::quota_service_client::QuotaServiceClient;
use kiln_proto::registry::v1::{
    CreateModelRequest, Dataset, DeleteModelRequest, DownloadDatasetRequest,
    DownloadModelFilesRequest, Model, ValidateModelUploadRequest,
};
use kiln_scheduler::catalog::{ModelCatalog, RemoteRegistry};
use kiln_scheduler::quota::{QuotaGate, QuotaLimits};

/// The registry, here or over gRPC.
pub(crate) enum RegistryLink {
    Local(kiln_registry::Registry),
    Remote(Box<RemoteRegistry>),
}

#[async_trait::async_trait]
impl ModelCatalog for RegistryLink {
    async fn get_model(&self, name: &str) -> Result<Model> {
        match self {
            Self::Local(registry) => registry.get_model(&Principal::service(), name).await,
            Self::Remote(client) => client.get_model(name).await,
        }
    }

    async fn get_dataset(&self, name: &str) -> Result<Dataset> {
        match self {
            Self::Local(registry) => registry.get_dataset(&Principal::service(), name).await,
            Self::Remote(client) => client.get_dataset(name).await,
        }
    }
}

#[async_trait::async_trait]
impl ModelSource for RegistryLink {
    async fn get_model(&self, name: &str) -> Result<Model> {
        ModelCatalog::get_model(self, name).await
    }

    async fn download(&self, name: &str, bundle_precision: Option<i32>) -> Result<FileStream> {
        let registry = match self {
            Self::Local(registry) => registry,
            Self::Remote(client) => {
                return kiln_inference::source::download(&client.models, name, bundle_precision)
                    .await;
            }
        };
        let request = DownloadModelFilesRequest {
            name: name.to_owned(),
            bundle_precision,
            ..Default::default()
        };
        let stream = registry
            .download_model_files(&Principal::service(), request)
            .await?;
        Ok(stream.boxed())
    }

    async fn read_dataset(&self, name: &str) -> Result<Vec<u8>> {
        let request = DownloadDatasetRequest {
            name: name.to_owned(),
            ..Default::default()
        };
        let mut pieces = match self {
            Self::Local(registry) => registry
                .download_dataset(&Principal::service(), request)
                .await?
                .boxed(),
            Self::Remote(client) => {
                let failed = |status| Error::from_peer("registry DownloadDataset", status);
                let stream = client
                    .datasets
                    .clone()
                    .max_decoding_message_size(16 << 20)
                    .download_dataset(request)
                    .await
                    .map_err(failed)?
                    .into_inner();
                stream.map(move |piece| piece.map_err(failed)).boxed()
            }
        };
        let mut data = Vec::new();
        while let Some(piece) = pieces.next().await {
            data.extend_from_slice(&piece?.data);
        }
        Ok(data)
    }

    async fn upload_model(
        &self,
        parent: &str,
        model_id: &str,
        model: Model,
        files: Vec<(String, Vec<u8>)>,
        finish: bool,
    ) -> Result<Model> {
        let name = format!("{parent}/models/{model_id}");
        let job = model.fine_tuning_job.clone();
        let existing = match ModelCatalog::get_model(self, &name).await {
            Ok(found) if !job.is_empty() && found.fine_tuning_job == job => Some(found),
            Ok(_) => return Err(Error::already_exists(&name)),
            Err(err) if err.is_not_found() => None,
            Err(e) => return Err(e),
        };
        let messages = kiln_inference::source::upload_messages(&name, &files);
        let service = Principal::service();
        let validation = match self {
            Self::Local(registry) => {
                if existing.is_none() {
                    registry
                        .create_model(&service, parent, model_id.to_owned(), model)
                        .await?;
                }
                let stream = futures::stream::iter(messages.into_iter().map(Ok));
                registry.upload_model_files(&service, stream).await?;
                match finish {
                    true => Some(
                        registry
                            .validate_model_upload(&service, &name, false)
                            .await?,
                    ),
                    false => None,
                }
            }
            Self::Remote(client) => {
                let peer = |what: &'static str| move |status| Error::from_peer(what, status);
                let mut models = client.models.clone();
                if existing.is_none() {
                    let create = CreateModelRequest {
                        parent: parent.to_owned(),
                        model_id: model_id.to_owned(),
                        model: Some(model),
                    };
                    models
                        .create_model(create)
                        .await
                        .map_err(peer("registry CreateModel"))?;
                }
                models
                    .upload_model_files(futures::stream::iter(messages))
                    .await
                    .map_err(peer("registry UploadModelFiles"))?;
                let validate = ValidateModelUploadRequest {
                    name: name.clone(),
                    validate_only: false,
                };
                match finish {
                    true => Some(
                        models
                            .validate_model_upload(validate)
                            .await
                            .map_err(peer("registry ValidateModelUpload"))?
                            .into_inner(),
                    ),
                    false => None,
                }
            }
        };
        match validation {
            Some(response) => kiln_inference::source::validated(response),
            None => ModelCatalog::get_model(self, &name).await,
        }
    }

    async fn delete_model(&self, name: &str) -> Result<()> {
        match self {
            Self::Local(registry) => registry
                .delete_model(&Principal::service(), name)
                .await
                .map(|_| ()),
            Self::Remote(client) => {
                let request = DeleteModelRequest {
                    name: name.to_owned(),
                };
                client
                    .models
                    .clone()
                    .delete_model(request)
                    .await
                    .map_err(|status| Error::from_peer("registry DeleteModel", status))?;
                Ok(())
            }
        }
    }
}

/// Billing, here or over gRPC.
pub(crate) enum BillingLink {
    Local(kiln_billing::Billing),
    Remote(QuotaServiceClient<ServiceChannel>),
}

impl BillingLink {
    /// The account's quota values by quota ID, read in process.
    async fn local_values(billing: &kiln_billing::Billing, account: &str) -> Result<QuotaLimits> {
        let values: HashMap<String, i64> =
            billing.quota_values(account).await?.into_iter().collect();
        Ok(QuotaLimits(values))
    }
}

#[async_trait::async_trait]
impl QuotaGate for BillingLink {
    async fn limits(&self, account: &str) -> Result<QuotaLimits> {
        match self {
            Self::Local(billing) => Self::local_values(billing, account).await,
            Self::Remote(client) => QuotaGate::limits(client, account).await,
        }
    }
}

#[async_trait::async_trait]
impl LimitSource for BillingLink {
    async fn limits(&self, account: &str) -> Result<Limits> {
        let billing = match self {
            Self::Local(billing) => billing,
            Self::Remote(client) => return LimitSource::limits(client, account).await,
        };
        let values = Self::local_values(billing, account).await?.0;
        let value = |quota: &str| values.get(quota).copied().unwrap_or(0);
        Ok(Limits {
            requests_per_minute: value(RPM_QUOTA),
            tokens_per_minute: value(TPM_QUOTA),
        })
    }
}

/// The scheduler in the same process, as the local node's link.
pub(crate) struct LocalScheduler(pub kiln_scheduler::Scheduler);

#[async_trait::async_trait]
impl kiln_inference::node::SchedulerLink for LocalScheduler {
    async fn open(
        &self,
        outbound: tokio::sync::mpsc::Receiver<kiln_proto::scheduler::v1::NodeMessage>,
    ) -> Result<kiln_inference::node::SchedulerStream> {
        let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound).map(Ok);
        self.0
            .connect(&Principal::service(), outbound.boxed())
            .await
    }
}
