//! Completions and chat completions over a text-generation model's generation loop: a
//! request becomes a [`Job`] (`request`), unary answers gather every choice (`unary`), streams
//! send each piece as it decodes, then a last message with the finish reasons and the usage
//! (`stream`); both are made of the same parts, whichever the API (`response`). Usage is
//! recorded before the last answer goes out.

mod chat_completion;
mod completion;
mod request;
mod response;
mod stream;
mod unary;

use kiln_core::Error;
use std::sync::Arc;

use kiln_core::auth::Principal;
use tokio::sync::mpsc;

use crate::engine::{LoadedModel, Task};
use crate::generation::llm::{Adapter, Event, Finish, Llm, SequenceRequest, SubmitError};
use crate::generation::sampling::{Sampled, SamplingParams};
use crate::router::RouteRef;
use crate::service::Inference;
use crate::usage::Usage;
use kiln_core::Result;

/// A generation request, whichever API it came through.
struct Job {
    model: Arc<LoadedModel>,
    /// The LoRA addon it goes through: its rows use the addon's slot, and its usage is the
    /// addon's.
    adapter: Option<Arc<Adapter>>,
    /// The deployed model and replica serving it (for usage).
    route: Option<RouteRef>,
    /// Token ids of each prompt.
    prompts: Vec<Vec<u32>>,
    /// Texts of each prompt (for `echo`).
    prompt_texts: Vec<String>,
    n: usize,
    params: SamplingParams,
    max_tokens: usize,
    stops: Vec<String>,
}

/// What one choice produced.
#[derive(Default)]
struct ChoiceResult {
    text: String,
    tokens: Vec<Sampled>,
    finish: Option<Finish>,
    counts: Counts,
}

/// Token counts of a request's choices, summed.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    completion: usize,
    /// Prompt tokens that came from the prefix cache.
    cached_prompt: usize,
}

impl Counts {
    fn add(&mut self, completion: usize, cached_prompt: usize) {
        self.completion += completion;
        self.cached_prompt += cached_prompt;
    }

    fn sum<'a>(results: impl IntoIterator<Item = &'a ChoiceResult>) -> Self {
        let mut total = Self::default();
        for r in results {
            total.add(r.counts.completion, r.counts.cached_prompt);
        }
        total
    }
}

fn llm(model: &LoadedModel) -> Result<&Llm> {
    model.llm().ok_or_else(|| {
        let serves = match model.task {
            Task::Embedding => "an embedding model (CreateEmbeddings)",
            _ => "a tensor model (the Open Inference Protocol's ModelInfer)",
        };
        Error::invalid(
            "model",
            format!("{} is {serves}; it does not generate text", model.name),
        )
    })
}

impl Inference {
    /// Starts every choice; returns one event receiver per choice, in choice order.
    fn start(&self, job: &Job) -> Result<Vec<mpsc::UnboundedReceiver<Event>>> {
        let llm = llm(&job.model)?;
        let mut receivers = Vec::new();
        for prompt in &job.prompts {
            for i in 0..job.n {
                let (events, receiver) = mpsc::unbounded_channel();
                let request = SequenceRequest {
                    prompt: prompt.clone(),
                    params: job.params.clone(),
                    max_tokens: job.max_tokens,
                    stops: job.stops.clone(),
                    choice: i as u64,
                    adapter: job.adapter.clone(),
                    events,
                };
                llm.submit(request).map_err(|e| match e {
                    SubmitError::Full => Error::ResourceExhausted {
                        message: format!(
                            "{} has too many requests waiting; retry shortly",
                            job.model.name
                        ),
                        retry_after: Some(std::time::Duration::from_secs(1)),
                    },
                    SubmitError::Stopped => {
                        Error::Internal(format!("{} stopped serving", job.model.name))
                    }
                })?;
                receivers.push(receiver);
            }
        }
        Ok(receivers)
    }

    async fn record(
        &self,
        caller: &Principal,
        job: &Job,
        id: &str,
        api: &'static str,
        counts: Counts,
        start: i64,
    ) -> Result<()> {
        let prompt: usize = job.prompts.iter().map(Vec::len).sum::<usize>() * job.n;
        self.usage
            .record(
                caller,
                Usage {
                    request_id: id.to_owned(),
                    model: job
                        .adapter
                        .as_ref()
                        .map_or_else(|| job.model.name.clone(), |a| a.name.clone()),
                    api,
                    prompt_tokens: prompt as i64,
                    completion_tokens: counts.completion as i64,
                    cached_prompt_tokens: counts.cached_prompt as i64,
                    start_micros: start,
                    route: job.route.clone(),
                    ..Default::default()
                },
            )
            .await
    }
}
