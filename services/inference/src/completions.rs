//! Completions and chat completions over a text-generation model's generation loop: unary
//! answers gather every choice; streams send each piece as it decodes, then a last message
//! with the finish reasons and the usage. Usage is recorded before the last answer goes out.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_proto::kiln_inference::v1::*;
use tokio::sync::mpsc;
use tonic::Status;

use crate::engine::{LoadedModel, Task};
use crate::error::Result;
use crate::generation::llm::{Event, Finish, Llm, SequenceRequest, SubmitError};
use crate::generation::sampling::{Sampled, SamplingFields, SamplingParams};
use crate::service::Inference;
use crate::usage::Usage;

/// The most choices one request may ask for.
const MAX_CHOICES: usize = 16;

/// A generation request, whichever API it came through.
struct Job {
    model: Arc<LoadedModel>,
    /// The deployed model and replica serving it (for usage).
    route: Option<crate::router::RouteRef>,
    /// Token ids of each prompt.
    prompts: Vec<Vec<u32>>,
    /// Texts of each prompt (for `echo`).
    prompt_texts: Vec<String>,
    n: usize,
    params: SamplingParams,
    max_tokens: usize,
    stops: Vec<String>,
    logprobs: bool,
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
        ApiError::invalid(
            "model",
            format!("{} is {serves}; it does not generate text", model.name),
        )
        .into()
    })
}

fn check_stops(stops: &[String]) -> Result<Vec<String>> {
    if stops.len() > 4 {
        return Err(ApiError::invalid(
            "stop",
            format!("at most 4 stop sequences, got {}", stops.len()),
        )
        .into());
    }
    Ok(stops.iter().filter(|s| !s.is_empty()).cloned().collect())
}

/// The request's max_tokens (at least 1), or `default` when unset.
fn max_tokens_field(value: Option<i32>, default: usize) -> Result<usize> {
    match value {
        None => Ok(default),
        Some(m) if m >= 1 => Ok(m as usize),
        Some(m) => {
            Err(ApiError::invalid("max_tokens", format!("must be at least 1, got {m}")).into())
        }
    }
}

fn choices(n: Option<i32>) -> Result<usize> {
    match n {
        None => Ok(1),
        Some(n) if n >= 1 && n as usize <= MAX_CHOICES => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(
            "n",
            format!("must be between 1 and {MAX_CHOICES}, got {n}"),
        )
        .into()),
    }
}

impl Inference {
    /// Tokenizes `text` as a prompt (with BOS when the model wants it).
    fn prompt_tokens(&self, model: &LoadedModel, field: &str, text: &str) -> Result<Vec<u32>> {
        let llm = llm(model)?;
        let encoding = llm
            .tokenizer
            .encode(text, false)
            .map_err(|e| ApiError::invalid(field, format!("cannot tokenize: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if model.manifest.add_bos_token
            && let Some(bos) = model.manifest.bos_token_id
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        if ids.is_empty() {
            return Err(ApiError::invalid(field, "has no tokens").into());
        }
        Ok(ids)
    }

    /// Fits prompt and max_tokens into the context: refuses (naming `max_tokens`), or with
    /// TRUNCATE drops the oldest prompt tokens and then lowers max_tokens.
    fn fit_context(
        &self,
        model: &LoadedModel,
        prompt: &mut Vec<u32>,
        max_tokens: &mut usize,
        behavior: i32,
    ) -> Result<()> {
        let context = llm(model)?.shape.context_length;
        if prompt.len() + *max_tokens <= context {
            return Ok(());
        }
        if behavior == ContextLengthExceededBehavior::Truncate as i32 {
            let room = context.saturating_sub(*max_tokens).max(1);
            if prompt.len() > room {
                prompt.drain(..prompt.len() - room);
            }
            *max_tokens = (*max_tokens).min(context - prompt.len());
            return Ok(());
        }
        Err(ApiError::invalid(
            "max_tokens",
            format!(
                "the prompt's {} tokens plus max_tokens {} exceed the model's context of {context} tokens",
                prompt.len(),
                max_tokens
            ),
        )
        .into())
    }

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
                    events,
                };
                llm.submit(request).map_err(|e| match e {
                    SubmitError::Full => ApiError::ResourceExhausted {
                        message: format!(
                            "{} has too many requests waiting; retry shortly",
                            job.model.name
                        ),
                        retry_after: Some(std::time::Duration::from_secs(1)),
                    },
                    SubmitError::Stopped => {
                        ApiError::Internal(format!("{} stopped serving", job.model.name))
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
                    model: job.model.name.clone(),
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

    /// Runs a job to the end: every choice's text, tokens and finish.
    async fn run_unary(&self, job: &Job) -> Result<Vec<ChoiceResult>> {
        let receivers = self.start(job)?;
        let gathered = futures::future::join_all(receivers.into_iter().map(|mut rx| async move {
            let mut result = ChoiceResult::default();
            while let Some(event) = rx.recv().await {
                match event {
                    Event::Token { sampled, text } => {
                        result.text.push_str(&text);
                        result.tokens.push(sampled);
                    }
                    Event::Finished {
                        finish,
                        completion_tokens,
                        cached_prompt_tokens,
                        text,
                    } => {
                        result.text.push_str(&text);
                        result.finish = Some(finish);
                        result.counts.add(completion_tokens, cached_prompt_tokens);
                        return Ok(result);
                    }
                    Event::Failed(message) => return Err(ApiError::Internal(message)),
                }
            }
            Err(ApiError::Internal("the generation loop stopped".into()))
        }))
        .await;
        Ok(gathered.into_iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Streams a job: `(choice, event)` as they come, ending when every choice has finished.
    fn run_stream(&self, job: &Job) -> Result<BoxStream<'static, (usize, Event)>> {
        let receivers = self.start(job)?;
        let streams = receivers.into_iter().enumerate().map(|(i, rx)| {
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                .map(move |e| (i, e))
                .boxed()
        });
        Ok(futures::stream::select_all(streams).boxed())
    }

    fn completion_job(&self, model: Arc<LoadedModel>, r: &CreateCompletionRequest) -> Result<Job> {
        let texts: Vec<String> = match (r.prompt.is_empty(), r.prompts.is_empty()) {
            (false, true) => vec![r.prompt.clone()],
            (true, false) => r.prompts.clone(),
            (false, false) => {
                return Err(
                    ApiError::invalid("prompts", "give prompt or prompts, not both").into(),
                );
            }
            (true, true) => return Err(ApiError::invalid("prompt", "is required").into()),
        };
        let vocab = llm(&model)?.tokenizer.get_vocab_size(true);
        let params = SamplingParams::from_fields(
            SamplingFields {
                temperature: r.temperature,
                top_p: r.top_p,
                top_k: r.top_k,
                min_p: r.min_p,
                frequency_penalty: r.frequency_penalty,
                presence_penalty: r.presence_penalty,
                repetition_penalty: r.repetition_penalty,
                logit_bias: Some(&r.logit_bias),
                seed: r.seed,
                top_logprobs: r.logprobs,
                top_logprobs_field: "logprobs",
            },
            vocab,
        )?;
        let requested = max_tokens_field(r.max_tokens, 16)?;
        let mut prompts = Vec::with_capacity(texts.len());
        let mut max_tokens = requested;
        for (i, text) in texts.iter().enumerate() {
            let field = if r.prompts.is_empty() {
                "prompt".to_owned()
            } else {
                format!("prompts[{i}]")
            };
            let mut ids = self.prompt_tokens(&model, &field, text)?;
            let mut mine = requested;
            self.fit_context(
                &model,
                &mut ids,
                &mut mine,
                r.context_length_exceeded_behavior,
            )?;
            max_tokens = max_tokens.min(mine);
            prompts.push(ids);
        }
        Ok(Job {
            n: choices(r.n)?,
            params,
            max_tokens,
            stops: check_stops(&r.stop)?,
            logprobs: r.logprobs.is_some(),
            prompts,
            prompt_texts: texts,
            model,
            route: None,
        })
    }

    fn chat_job(&self, model: Arc<LoadedModel>, r: &CreateChatCompletionRequest) -> Result<Job> {
        let llm = llm(&model)?;
        let token_text = |id: Option<u32>| {
            id.and_then(|t| llm.tokenizer.id_to_token(t))
                .unwrap_or_default()
        };
        let prompt_text = crate::chat::render(
            &model.manifest.chat_template,
            &r.messages,
            &token_text(model.manifest.bos_token_id),
            &token_text(model.manifest.eos_token_id),
        )?;
        let vocab = llm.tokenizer.get_vocab_size(true);
        if r.top_logprobs.is_some() && r.logprobs != Some(true) {
            return Err(ApiError::invalid("top_logprobs", "needs logprobs set to true").into());
        }
        let params = SamplingParams::from_fields(
            SamplingFields {
                temperature: r.temperature,
                top_p: r.top_p,
                top_k: r.top_k,
                min_p: r.min_p,
                frequency_penalty: r.frequency_penalty,
                presence_penalty: r.presence_penalty,
                repetition_penalty: r.repetition_penalty,
                logit_bias: Some(&r.logit_bias),
                seed: r.seed,
                top_logprobs: r.top_logprobs,
                top_logprobs_field: "top_logprobs",
            },
            vocab,
        )?;
        let mut ids = self.prompt_tokens(&model, "messages", &prompt_text)?;
        let context = llm.shape.context_length;
        let mut max_tokens =
            max_tokens_field(r.max_tokens, context.saturating_sub(ids.len()).max(1))?;
        self.fit_context(
            &model,
            &mut ids,
            &mut max_tokens,
            r.context_length_exceeded_behavior,
        )?;
        Ok(Job {
            n: choices(r.n)?,
            params,
            max_tokens,
            stops: check_stops(&r.stop)?,
            logprobs: r.logprobs == Some(true),
            prompts: vec![ids],
            prompt_texts: vec![prompt_text],
            model,
            route: None,
        })
    }

    pub(crate) async fn create_completion(
        &self,
        caller: &Principal,
        served: crate::router::Served,
        r: CreateCompletionRequest,
    ) -> Result<Completion> {
        let start = kiln_core::time::now_micros();
        let mut job = self.completion_job(served.model, &r)?;
        job.route = served.route;
        let results = self.run_unary(&job).await?;
        let id = format!("cmpl-{}", uuid::Uuid::now_v7().simple());
        let counts = Counts::sum(&results);
        self.record(caller, &job, &id, "completions", counts, start)
            .await?;
        let llm = llm(&job.model)?;
        let choices = results
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let prompt = &job.prompt_texts[index / job.n];
                let text = if r.echo {
                    format!("{prompt}{}", c.text)
                } else {
                    c.text
                };
                CompletionChoice {
                    index: index as i32,
                    logprobs: job.logprobs.then(|| completion_logprobs(llm, &c.tokens)),
                    text,
                    finish_reason: c.finish.map(Finish::as_str).unwrap_or_default().into(),
                }
            })
            .collect();
        Ok(Completion {
            id,
            object: "text_completion".into(),
            created: kiln_core::time::now_micros() / 1_000_000,
            model: r.model,
            choices,
            usage: Some(usage(&job, counts)),
        })
    }

    pub(crate) async fn create_chat_completion(
        &self,
        caller: &Principal,
        served: crate::router::Served,
        r: CreateChatCompletionRequest,
    ) -> Result<ChatCompletion> {
        let start = kiln_core::time::now_micros();
        let mut job = self.chat_job(served.model, &r)?;
        job.route = served.route;
        let results = self.run_unary(&job).await?;
        let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
        let counts = Counts::sum(&results);
        self.record(caller, &job, &id, "chat.completions", counts, start)
            .await?;
        let llm = llm(&job.model)?;
        let choices = results
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChatCompletionChoice {
                index: index as i32,
                logprobs: job.logprobs.then(|| chat_logprobs(llm, &c.tokens)),
                message: Some(ChatMessage {
                    role: "assistant".into(),
                    content: c.text,
                    name: String::new(),
                }),
                finish_reason: c.finish.map(Finish::as_str).unwrap_or_default().into(),
            })
            .collect();
        Ok(ChatCompletion {
            id,
            object: "chat.completion".into(),
            created: kiln_core::time::now_micros() / 1_000_000,
            model: r.model,
            choices,
            usage: Some(usage(&job, counts)),
        })
    }

    /// Sends a streamed job's messages: `message` turns each event into one (or none), the
    /// last carries the usage (`last`). Usage is recorded before the last message, and also
    /// when the client goes away (dropping the events then cancels the sequences).
    #[allow(clippy::too_many_arguments)]
    fn spawn_stream<M: Send + 'static>(
        &self,
        caller: &Principal,
        job: Job,
        api: &'static str,
        id: String,
        start: i64,
        prelude: Vec<M>,
        mut message: impl FnMut(&Job, usize, Event) -> Option<M> + Send + 'static,
        last: impl FnOnce(kiln_proto::kiln_inference::v1::Usage) -> M + Send + 'static,
    ) -> Result<BoxStream<'static, Result<M, Status>>> {
        let mut events = self.run_stream(&job)?;
        let (tx, rx) = mpsc::channel::<Result<M, Status>>(64);
        let this = self.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            let mut counts = Counts::default();
            let mut failed = None;
            let mut gone = false;
            for m in prelude {
                gone |= tx.send(Ok(m)).await.is_err();
            }
            while !gone && let Some((index, event)) = events.next().await {
                match &event {
                    Event::Failed(reason) => {
                        failed = Some(reason.clone());
                        break;
                    }
                    Event::Finished {
                        completion_tokens,
                        cached_prompt_tokens,
                        ..
                    } => counts.add(*completion_tokens, *cached_prompt_tokens),
                    Event::Token { .. } => {}
                }
                if let Some(m) = message(&job, index, event) {
                    gone = tx.send(Ok(m)).await.is_err();
                }
            }
            drop(events);
            let recorded = this.record(&caller, &job, &id, api, counts, start).await;
            if gone {
                return;
            }
            let end = match (failed, recorded) {
                (Some(reason), _) => Err(Status::internal(reason)),
                (None, Err(e)) => Err(e.into()),
                (None, Ok(())) => Ok(last(usage(&job, counts))),
            };
            let _ = tx.send(end).await;
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }

    /// Streams a completion: a message per piece, then one with finish reasons and usage.
    pub(crate) async fn stream_completion(
        &self,
        caller: &Principal,
        served: crate::router::Served,
        r: CreateCompletionRequest,
    ) -> Result<BoxStream<'static, Result<Completion, Status>>> {
        let start = kiln_core::time::now_micros();
        let mut job = self.completion_job(served.model, &r)?;
        job.route = served.route;
        let id = format!("cmpl-{}", uuid::Uuid::now_v7().simple());
        let created = start / 1_000_000;
        let piece = {
            let (id, model) = (id.clone(), r.model.clone());
            move |index: usize, text: String, finish: &str, logprobs: Option<CompletionLogprobs>| {
                Completion {
                    id: id.clone(),
                    object: "text_completion".into(),
                    created,
                    model: model.clone(),
                    choices: vec![CompletionChoice {
                        index: index as i32,
                        text,
                        finish_reason: finish.into(),
                        logprobs,
                    }],
                    usage: None,
                }
            }
        };
        // With echo, each choice starts with its prompt.
        let prelude = if r.echo {
            (0..job.prompts.len() * job.n)
                .map(|i| piece(i, job.prompt_texts[i / job.n].clone(), "", None))
                .collect()
        } else {
            Vec::new()
        };
        let message = move |job: &Job, index: usize, event: Event| match event {
            Event::Token { sampled, text } => {
                let llm = job.model.llm()?;
                let logprobs = job
                    .logprobs
                    .then(|| completion_logprobs(llm, std::slice::from_ref(&sampled)));
                (!text.is_empty() || logprobs.is_some()).then(|| piece(index, text, "", logprobs))
            }
            Event::Finished { finish, text, .. } => Some(piece(index, text, finish.as_str(), None)),
            Event::Failed(_) => None,
        };
        let last_id = id.clone();
        let last = move |usage| Completion {
            id: last_id.clone(),
            object: "text_completion".into(),
            created,
            model: r.model.clone(),
            choices: Vec::new(),
            usage: Some(usage),
        };
        self.spawn_stream(
            caller,
            job,
            "completions",
            id,
            start,
            prelude,
            message,
            last,
        )
    }

    /// Streams a chat completion: the role first, then content pieces, then the finish
    /// reasons and usage.
    pub(crate) async fn stream_chat_completion(
        &self,
        caller: &Principal,
        served: crate::router::Served,
        r: CreateChatCompletionRequest,
    ) -> Result<BoxStream<'static, Result<ChatCompletionChunk, Status>>> {
        let start = kiln_core::time::now_micros();
        let mut job = self.chat_job(served.model, &r)?;
        job.route = served.route;
        let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
        let created = start / 1_000_000;
        let chunk = {
            let (id, model) = (id.clone(), r.model.clone());
            move |choices: Vec<ChatCompletionChunkChoice>, usage| ChatCompletionChunk {
                id: id.clone(),
                object: "chat.completion.chunk".into(),
                created,
                model: model.clone(),
                choices,
                usage,
            }
        };
        // The first chunk of each choice carries the role.
        let mut started: HashMap<usize, bool> = HashMap::new();
        let delta = chunk.clone();
        let message = move |job: &Job, index: usize, event: Event| {
            let (content, finish, logprobs) = match event {
                Event::Token { sampled, text } => {
                    let llm = job.model.llm()?;
                    let logprobs = job
                        .logprobs
                        .then(|| chat_logprobs(llm, std::slice::from_ref(&sampled)));
                    if text.is_empty() && logprobs.is_none() && started.contains_key(&index) {
                        return None;
                    }
                    (text, "", logprobs)
                }
                Event::Finished { finish, text, .. } => (text, finish.as_str(), None),
                Event::Failed(_) => return None,
            };
            let role = if started.insert(index, true).is_none() {
                "assistant"
            } else {
                ""
            };
            Some(delta(
                vec![ChatCompletionChunkChoice {
                    index: index as i32,
                    delta: Some(ChatMessageDelta {
                        role: role.into(),
                        content,
                    }),
                    finish_reason: finish.into(),
                    logprobs,
                }],
                None,
            ))
        };
        let last = move |usage| chunk(Vec::new(), Some(usage));
        self.spawn_stream(
            caller,
            job,
            "chat.completions",
            id,
            start,
            Vec::new(),
            message,
            last,
        )
    }
}

fn usage(job: &Job, counts: Counts) -> kiln_proto::kiln_inference::v1::Usage {
    let prompt = job.prompts.iter().map(Vec::len).sum::<usize>() * job.n;
    kiln_proto::kiln_inference::v1::Usage {
        prompt_tokens: prompt as i32,
        completion_tokens: counts.completion as i32,
        total_tokens: (prompt + counts.completion) as i32,
        prompt_tokens_details: Some(kiln_proto::kiln_inference::v1::PromptTokensDetails {
            cached_tokens: counts.cached_prompt as i32,
        }),
    }
}

fn token_text(llm: &Llm, token: u32) -> String {
    llm.tokenizer.decode(&[token], false).unwrap_or_default()
}

fn completion_logprobs(llm: &Llm, tokens: &[Sampled]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0i32;
    for s in tokens {
        let text = token_text(llm, s.token);
        out.text_offset.push(offset);
        offset += text.chars().count() as i32;
        out.tokens.push(text);
        out.token_logprobs.push(s.logprob);
        out.top_logprobs.push(TopLogprobs {
            logprobs: s
                .top
                .iter()
                .map(|&(t, l)| (token_text(llm, t), l))
                .collect(),
        });
    }
    out
}

fn chat_logprobs(llm: &Llm, tokens: &[Sampled]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|s| {
                let text = token_text(llm, s.token);
                TokenLogprob {
                    bytes: text.as_bytes().to_vec().into(),
                    token: text,
                    logprob: s.logprob,
                    top_logprobs: s
                        .top
                        .iter()
                        .map(|&(t, l)| {
                            let text = token_text(llm, t);
                            TopLogprob {
                                bytes: text.as_bytes().to_vec().into(),
                                token: text,
                                logprob: l,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}
