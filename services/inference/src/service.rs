//! The inference node's API: `kiln.inference.v1.InferenceService` (completions, chat
//! completions, embeddings) over the [`Engine`]. Each call is answered here or forwarded to
//! the node that holds its model's replica; usage is recorded per answer.

use kiln_core::Error;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::auth::{Principal, principal};
use kiln_core::in_flight::InFlight;
use kiln_proto::kiln_inference::v1::inference_service_client::InferenceServiceClient;
use kiln_proto::kiln_inference::v1::*;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::embeddings;
use crate::engine::{Engine, LoadedModel, Task};
use crate::node::Node;
use crate::router::{Served, Target, forward, is_forwarded, peer_status};
use crate::usage::{Usage, UsageRecorder};
use kiln_core::Result;

/// The service state every handler shares.
#[derive(Clone)]
pub struct Inference {
    pub(crate) engine: Arc<Engine>,
    pub(crate) usage: UsageRecorder,
    /// The node's agent and router when it works with a scheduler; None: requests name
    /// models, served directly.
    pub(crate) node: Option<Arc<Node>>,
    /// Per-account admission (suspensions are checked without it); None: no rate limits.
    pub(crate) limiter: Option<Arc<crate::limits::RateLimiter>>,
    /// True once the process stops taking calls (the calls in flight may finish).
    pub(crate) draining: tokio::sync::watch::Receiver<bool>,
    /// The calls this node answers (its models' work, streams to their end; not those it
    /// forwards): its load, which the usage relay's and settlements' waits follow.
    pub(crate) answering: InFlight,
}

pub(crate) type Reply<T> = Result<Response<T>, Status>;

pub(crate) fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    Ok(principal(request)?.clone())
}

impl Inference {
    /// The models this node serves, to call in process (benchmarks set the served path
    /// against the same model's pass).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The caller of a call that names a model (`field`: `name`) and where the model is
    /// served: here, or on another node.
    async fn target<T>(
        &self,
        request: &Request<T>,
        field: &str,
        name: &str,
    ) -> Result<(Principal, Target), Status> {
        let caller = caller(request)?;
        let target = self.route(request, &caller, field, name).await?;
        // Limits count where the request is served (once, whichever node it entered).
        if let (Target::Local(served), Some(limiter)) = (&target, &self.limiter) {
            let dedicated = served.route.as_ref().is_some_and(|r| {
                r.deployment_type
                    == kiln_proto::scheduler::v1::deployment::DeploymentType::Dedicated as i32
            });
            if !dedicated {
                limiter.admit(&caller).await?;
            }
        }
        Ok((caller, target))
    }

    /// Where the model is served, without counting a request against rate limits (for
    /// metadata calls).
    pub(crate) async fn route<T>(
        &self,
        request: &Request<T>,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<Target> {
        crate::limits::check_not_suspended(caller)?;
        Ok(match &self.node {
            Some(node) => {
                node.router
                    .target(caller, field, name, is_forwarded(request))
                    .await?
            }
            None => Target::Local(Served {
                model: self.engine.model(caller, field, name).await?,
                adapter: None,
                route: None,
                in_flight: None,
            }),
        })
    }

    pub(crate) async fn create_embeddings(
        &self,
        caller: &Principal,
        served: Served,
        request: CreateEmbeddingsRequest,
    ) -> Result<CreateEmbeddingsResponse> {
        let start_micros = kiln_core::time::now_micros();
        if request.input.is_empty() {
            return Err(Error::invalid("input", "must hold at least one text"));
        }
        let model = served.model;
        expect_task(&model, Task::Embedding, "CreateEmbeddings")?;
        let dimensions = match request.dimensions {
            None => None,
            Some(d) => {
                let full = model
                    .runner()?
                    .outputs()
                    .iter()
                    .find_map(|t| t.shape.last().copied())
                    .unwrap_or(-1);
                if d < 1 || (full > 0 && i64::from(d) > full) {
                    return Err(Error::invalid(
                        "dimensions",
                        format!("must be between 1 and the model's {full} dimensions, got {d}"),
                    ));
                }
                Some(d as usize)
            }
        };
        let sequences = embeddings::tokenize(&model, &request.input, request.truncate)?;
        let tokens: usize = sequences.iter().map(Vec::len).sum();
        // Written down while the model runs; billed once the answer is ready.
        let usage = self.usage.reserve(
            caller,
            Usage {
                request_id: format!("embd-{}", uuid::Uuid::now_v7().simple()),
                model: model.name.clone(),
                api: "embeddings",
                prompt_tokens: tokens as i64,
                embedding_input_tokens: tokens as i64,
                start_micros,
                route: served.route,
                ..Default::default()
            },
        )?;
        let embedded = embeddings::embed(&model, sequences).await?;
        let data = embedded
            .into_iter()
            .enumerate()
            .map(|(index, mut e)| {
                if let Some(d) = dimensions {
                    embeddings::shorten(&mut e.vector, d);
                }
                Embedding {
                    index: index as i32,
                    embedding: e.vector,
                    object: "embedding".into(),
                }
            })
            .collect();
        usage.confirm();
        Ok(CreateEmbeddingsResponse {
            object: "list".into(),
            data,
            model: request.model,
            usage: Some(kiln_proto::kiln_inference::v1::Usage {
                prompt_tokens: tokens as i32,
                completion_tokens: 0,
                total_tokens: tokens as i32,
                prompt_tokens_details: None,
            }),
        })
    }
}

fn expect_task(model: &LoadedModel, task: Task, rpc: &str) -> Result<()> {
    if model.task == task {
        return Ok(());
    }
    let serves = match model.task {
        Task::Embedding => "an embedding model (CreateEmbeddings)",
        Task::TextGeneration => "a text-generation model (completions and chat completions)",
        Task::Tensor => "a tensor model (the Open Inference Protocol's ModelInfer)",
    };
    Err(Error::invalid(
        "model",
        format!("{} is {serves}; {rpc} does not apply", model.name),
    ))
}

/// Keeps `guard` (what counts the call in flight) alive until the stream ends or its client
/// leaves.
fn holding<T: Send + 'static>(
    stream: BoxStream<'static, Result<T, Status>>,
    guard: impl Send + 'static,
) -> BoxStream<'static, Result<T, Status>> {
    stream
        .map(move |item| {
            let _ = &guard;
            item
        })
        .boxed()
}

impl Inference {
    /// Answers a unary call that names a model (`field`: `name`): here with `local`, or
    /// through `remote` on the node that holds the model's replica.
    pub(crate) async fn serve<Req, Resp, Remote, Local>(
        &self,
        request: Request<Req>,
        field: &str,
        name: String,
        remote: impl FnOnce(Channel, Request<Req>) -> Remote,
        local: impl FnOnce(Principal, Served, Req) -> Local,
    ) -> Reply<Resp>
    where
        Remote: Future<Output = Reply<Resp>>,
        Local: Future<Output = Result<Resp>>,
    {
        let (p, target) = self.target(&request, field, &name).await?;
        match target {
            Target::Remote(channel, _guard) => {
                remote(channel, forward(request)).await.map_err(peer_status)
            }
            Target::Local(mut served) => {
                // The replica and the node count the call as in flight until its answer is
                // complete (a drain waits for it; routing sees the load), not just while it
                // is set up.
                let _in_flight = (served.in_flight.take(), self.answering.enter());
                Ok(Response::new(local(p, served, request.into_inner()).await?))
            }
        }
    }

    /// [`serve`](Self::serve) for a streamed answer, which holds its replica to its end.
    async fn serve_stream<Req, Item, Remote, Local>(
        &self,
        request: Request<Req>,
        field: &str,
        name: String,
        remote: impl FnOnce(Channel, Request<Req>) -> Remote,
        local: impl FnOnce(Principal, Served, Req) -> Local,
    ) -> Reply<BoxStream<'static, Result<Item, Status>>>
    where
        Item: Send + 'static,
        Remote: Future<Output = Reply<Streaming<Item>>>,
        Local: Future<Output = Result<BoxStream<'static, Result<Item, Status>>>>,
    {
        let (p, target) = self.target(&request, field, &name).await?;
        match target {
            Target::Remote(channel, guard) => {
                let stream = remote(channel, forward(request))
                    .await
                    .map_err(peer_status)?
                    .into_inner()
                    .map(|item| item.map_err(peer_status));
                Ok(Response::new(holding(stream.boxed(), guard)))
            }
            Target::Local(mut served) => {
                let guard = (served.in_flight.take(), self.answering.enter());
                let stream = local(p, served, request.into_inner()).await?;
                Ok(Response::new(holding(stream, guard)))
            }
        }
    }
}

/// The client of the node a call is forwarded to.
fn peer(channel: Channel) -> InferenceServiceClient<Channel> {
    InferenceServiceClient::new(channel)
}

/// The service's RPCs: each answered here (by the method of the same name on [`Inference`])
/// or forwarded to the node that serves its model, unary (`serve`) or streamed
/// (`serve_stream`).
macro_rules! forwarding_service {
    (streams { $($item:item)* } $( $method:ident($request:ty) -> $reply:ty = $serve:ident; )*) => {
        #[tonic::async_trait]
        impl inference_service_server::InferenceService for Inference {
            $($item)*

            $(
                async fn $method(&self, request: Request<$request>) -> Reply<$reply> {
                    let model = request.get_ref().model.clone();
                    self.$serve(
                        request,
                        "model",
                        model,
                        |channel, r| async move { peer(channel).$method(r).await },
                        |p, served, r| async move { self.$method(&p, served, r).await },
                    )
                    .await
                }
            )*
        }
    };
}

forwarding_service! {
    streams {
        type StreamCompletionStream = BoxStream<'static, Result<Completion, Status>>;
        type StreamChatCompletionStream = BoxStream<'static, Result<ChatCompletionChunk, Status>>;
    }
    create_completion(CreateCompletionRequest) -> Completion = serve;
    stream_completion(CreateCompletionRequest) -> Self::StreamCompletionStream = serve_stream;
    create_chat_completion(CreateChatCompletionRequest) -> ChatCompletion = serve;
    stream_chat_completion(CreateChatCompletionRequest) -> Self::StreamChatCompletionStream =
        serve_stream;
    create_embeddings(CreateEmbeddingsRequest) -> CreateEmbeddingsResponse = serve;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_streamed_answer_counts_in_flight_until_its_client_is_done_with_it() {
        let answering = InFlight::default();
        let items = || futures::stream::iter([Ok::<_, Status>(1), Ok(2)]).boxed();
        // The client leaves mid-stream.
        let mut stream = holding(items(), answering.enter());
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        assert_eq!(answering.get(), 1);
        drop(stream);
        assert_eq!(answering.get(), 0);
        // The stream runs to its end.
        let stream = holding(items(), answering.enter());
        assert_eq!(answering.get(), 1);
        let all: Vec<_> = stream.map(Result::unwrap).collect().await;
        assert_eq!(all, [1, 2]);
        assert_eq!(answering.get(), 0);
    }
}
