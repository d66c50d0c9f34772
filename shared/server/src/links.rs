//! How a service reaches the services it calls: in the same process (their Rust API, no
//! gRPC), or over gRPC with the service credential. The registry is the scheduler's model
//! catalog and the nodes' model source; billing is the scheduler's quota gate and the nodes'
//! rate limits; the scheduler is a node's link.

use std::collections::HashMap;

use futures::StreamExt;
use kiln_core::Result;
use kiln_core::auth::Principal;
use kiln_core::server::ServiceChannel;
use kiln_inference::limits::{LimitSource, Limits, RPM_QUOTA, TPM_QUOTA};
use kiln_inference::source::{FileStream, ModelSource};
use kiln_proto::billing::v1::quota_service_client::QuotaServiceClient;
use kiln_proto::registry::v1::model_service_client::ModelServiceClient;
use kiln_proto::registry::v1::{DownloadModelFilesRequest, Model};
use kiln_scheduler::catalog::ModelCatalog;
use kiln_scheduler::quota::{QuotaGate, QuotaLimits};

/// The registry, here or over gRPC.
pub(crate) enum RegistryLink {
    Local(kiln_registry::Registry),
    Remote(ModelServiceClient<ServiceChannel>),
}

#[async_trait::async_trait]
impl ModelCatalog for RegistryLink {
    async fn get_model(&self, name: &str) -> Result<Model> {
        match self {
            Self::Local(registry) => registry.get_model(&Principal::service(), name).await,
            Self::Remote(client) => ModelCatalog::get_model(client, name).await,
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
                return kiln_inference::source::download(client, name, bundle_precision).await;
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
