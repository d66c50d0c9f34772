//! How a node reaches the scheduler: over gRPC, or in process (`kiln dev`).

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_proto::scheduler::v1::{
    NodeMessage, SchedulerMessage, node_service_client::NodeServiceClient,
};
use tokio::sync::mpsc;
use tonic::Status;

use kiln_core::{Error, Result};

pub type SchedulerStream = BoxStream<'static, Result<SchedulerMessage, Status>>;

/// How a node reaches the scheduler: over gRPC, or in process (`kiln dev`).
#[async_trait]
pub trait SchedulerLink: Send + Sync + 'static {
    /// Opens the node's stream: `outbound` carries what the node says (RegisterNode first).
    async fn open(&self, outbound: mpsc::Receiver<NodeMessage>) -> Result<SchedulerStream>;
}

/// The scheduler over gRPC.
#[async_trait]
impl SchedulerLink for NodeServiceClient<kiln_core::server::ServiceChannel> {
    async fn open(&self, outbound: mpsc::Receiver<NodeMessage>) -> Result<SchedulerStream> {
        let stream = self
            .clone()
            .connect(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await
            .map_err(|status| Error::from_peer("scheduler Connect", status))?
            .into_inner();
        Ok(stream.boxed())
    }
}
