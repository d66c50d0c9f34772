//! Services in the same process reached through the traits their callers take, instead of
//! over gRPC: the registry as the scheduler's catalog and the nodes' model source, billing as
//! the scheduler's quota gate and the nodes' rate limits, the scheduler as a node's link.

use std::collections::HashMap;

use futures::StreamExt;
use kiln_core::auth::Principal;
use kiln_proto::registry::v1::{DownloadModelFilesRequest, Model};

pub(crate) struct LocalRegistry(pub kiln_registry::Registry);

#[async_trait::async_trait]
impl kiln_inference::source::ModelSource for LocalRegistry {
    async fn get_model(&self, name: &str) -> kiln_core::Result<Model> {
        self.0.get_model(&Principal::service(), name).await
    }

    async fn download(
        &self,
        name: &str,
        bundle_precision: Option<i32>,
    ) -> kiln_core::Result<kiln_inference::source::FileStream> {
        let request = DownloadModelFilesRequest {
            name: name.to_owned(),
            bundle_precision,
            ..Default::default()
        };
        let stream = self
            .0
            .download_model_files(&Principal::service(), request)
            .await?;
        Ok(stream.boxed())
    }
}

#[async_trait::async_trait]
impl kiln_scheduler::catalog::ModelCatalog for LocalRegistry {
    async fn get_model(&self, name: &str) -> kiln_core::Result<Model> {
        self.0.get_model(&Principal::service(), name).await
    }
}

pub(crate) struct LocalBilling(pub kiln_billing::Billing);

impl LocalBilling {
    async fn values(&self, account: &str) -> kiln_core::Result<HashMap<String, i64>> {
        Ok(self.0.quota_values(account).await?.into_iter().collect())
    }
}

#[async_trait::async_trait]
impl kiln_scheduler::quota::QuotaGate for LocalBilling {
    async fn limits(&self, account: &str) -> kiln_core::Result<kiln_scheduler::quota::QuotaLimits> {
        Ok(kiln_scheduler::quota::QuotaLimits(
            self.values(account).await?,
        ))
    }
}

#[async_trait::async_trait]
impl kiln_inference::limits::LimitSource for LocalBilling {
    async fn limits(&self, account: &str) -> kiln_core::Result<kiln_inference::limits::Limits> {
        let values = self.values(account).await?;
        let value = |quota: &str| values.get(quota).copied().unwrap_or(0);
        Ok(kiln_inference::limits::Limits {
            requests_per_minute: value(kiln_inference::limits::RPM_QUOTA),
            tokens_per_minute: value(kiln_inference::limits::TPM_QUOTA),
        })
    }
}

pub(crate) struct LocalScheduler(pub kiln_scheduler::Scheduler);

#[async_trait::async_trait]
impl kiln_inference::node::SchedulerLink for LocalScheduler {
    async fn open(
        &self,
        outbound: tokio::sync::mpsc::Receiver<kiln_proto::scheduler::v1::NodeMessage>,
    ) -> kiln_core::Result<kiln_inference::node::SchedulerStream> {
        let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound).map(Ok);
        self.0
            .connect(&Principal::service(), outbound.boxed())
            .await
    }
}
