//! Usage: every answered request's `kiln.inference.usage.recorded` event, written to this
//! node's outbox before the answer goes out, so a crash or a bus outage loses none. Writes
//! from concurrent requests share one statement (group commit), so recording costs one
//! commit per burst rather than per request.

use std::sync::Arc;

use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_events::outbox::Outbox;
use kiln_events::{Body, new_event};
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::events::v1::UsageRecorded;
use kiln_proto::scheduler::v1::deployment::DeploymentType;
use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};

use crate::error::Result;

pub const SOURCE: &str = "inference";

/// What one request used.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub request_id: String,
    pub model: String,
    /// "completions", "chat.completions", "embeddings", "model_infer".
    pub api: &'static str,
    pub prompt_tokens: i64,
    /// Of `prompt_tokens`, those whose keys and values came from the prefix cache.
    pub cached_prompt_tokens: i64,
    pub completion_tokens: i64,
    pub embedding_input_tokens: i64,
    /// When the request arrived (Unix microseconds).
    pub start_micros: i64,
    /// The deployed model and replica that served it (none on a node without a scheduler).
    pub route: Option<crate::node::RouteRef>,
}

type Pending = (
    kiln_proto::events::v1::Event,
    oneshot::Sender<Result<(), String>>,
);

/// Records usage events through the outbox.
#[derive(Clone)]
pub struct UsageRecorder {
    queue: mpsc::Sender<Pending>,
    node: Arc<str>,
    accelerator: AcceleratorType,
    /// Counts each serverless answer's tokens against its account's per-minute limit.
    limiter: Option<Arc<crate::limits::RateLimiter>>,
}

impl UsageRecorder {
    /// Starts the writer task on `db` (whose outbox relay publishes the events).
    pub fn start(
        db: DatabaseConnection,
        outbox: Outbox,
        node: &str,
        accelerator: AcceleratorType,
        limiter: Option<Arc<crate::limits::RateLimiter>>,
    ) -> Self {
        let (queue, mut pending) = mpsc::channel::<Pending>(4096);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while pending.recv_many(&mut batch, 512).await > 0 {
                // Answers of one forward pass finish together, but the first one's record
                // wakes this task at once (ahead of the others' handlers): let them queue
                // theirs first so the pass costs one commit, not one each.
                tokio::task::yield_now().await;
                while batch.len() < 512
                    && let Ok(more) = pending.try_recv()
                {
                    batch.push(more);
                }
                let (events, acks): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
                let written = outbox
                    .publish_all(&db, &events)
                    .await
                    .map_err(|e| e.to_string());
                for done in acks {
                    let _ = done.send(written.clone());
                }
            }
        });
        Self {
            queue,
            node: node.into(),
            accelerator,
            limiter,
        }
    }

    /// Records `usage` for `caller`; returns once it is durably in the outbox.
    pub async fn record(&self, caller: &Principal, usage: Usage) -> Result<()> {
        let route = usage.route.unwrap_or_default();
        if let Some(limiter) = &self.limiter
            && route.deployment_type != DeploymentType::Dedicated as i32
        {
            limiter.charge_tokens(
                &caller.account,
                usage.prompt_tokens.max(usage.embedding_input_tokens) + usage.completion_tokens,
            );
        }
        let body = UsageRecorded {
            request_id: usage.request_id.clone(),
            deployed_model: route.deployed_model,
            deployment: route.deployment,
            replica: route.replica,
            account: format!("accounts/{}", caller.account),
            api_key: caller.api_key.clone(),
            model: usage.model.clone(),
            deployment_type: if route.deployment_type == 0 {
                DeploymentType::Serverless as i32
            } else {
                route.deployment_type
            },
            api: usage.api.to_owned(),
            prompt_tokens: usage.prompt_tokens,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            completion_tokens: usage.completion_tokens,
            embedding_input_tokens: usage.embedding_input_tokens,
            accelerator_type: self.accelerator as i32,
            node: format!("nodes/{}", self.node),
            start_time: Some(kiln_core::time::micros_to_timestamp(usage.start_micros)),
            end_time: Some(kiln_core::time::micros_to_timestamp(
                kiln_core::time::now_micros(),
            )),
            ..Default::default()
        };
        let event = new_event(
            SOURCE,
            "inference.usage.recorded",
            &format!("accounts/{}", caller.account),
            &usage.model,
            Body::UsageRecorded(body),
        );
        let (done, written) = oneshot::channel();
        self.queue
            .send((event, done))
            .await
            .map_err(|_| ApiError::Unavailable("usage recording stopped".into()))?;
        written
            .await
            .map_err(|_| ApiError::Unavailable("usage recording stopped".into()))?
            .map_err(|e| ApiError::Unavailable(format!("recording usage: {e}")).into())
    }
}
