//! Chat completions: a conversation rendered by the model's chat template and answered,
//! unary or streamed.

use kiln_core::Error;
use std::collections::HashMap;

use futures::stream::BoxStream;
use kiln_core::auth::Principal;
use kiln_proto::kiln_inference::v1::*;
use tonic::Status;

use super::request::{check_stops, choices, max_tokens_field};
use super::response::{chat_logprobs, usage};
use super::{Event, Finish, Job, llm};
use crate::generation::sampling::{SamplingFields, SamplingParams};
use crate::router::Served;
use crate::service::Inference;
use kiln_core::Result;

impl Inference {
    /// A chat completion request's job, served by `served`.
    pub(super) fn chat_job(&self, served: Served, r: &CreateChatCompletionRequest) -> Result<Job> {
        let model = served.model;
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
            return Err(Error::invalid("top_logprobs", "needs logprobs set to true"));
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
            route: served.route,
        })
    }

    pub(crate) async fn create_chat_completion(
        &self,
        caller: &Principal,
        served: Served,
        r: CreateChatCompletionRequest,
    ) -> Result<ChatCompletion> {
        let start = kiln_core::time::now_micros();
        let job = self.chat_job(served, &r)?;
        let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
        let (results, counts) = self
            .run_unary(caller, &job, &id, "chat.completions", start)
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

    /// Streams a chat completion: the role first, then content pieces, then the finish
    /// reasons and usage.
    pub(crate) async fn stream_chat_completion(
        &self,
        caller: &Principal,
        served: Served,
        r: CreateChatCompletionRequest,
    ) -> Result<BoxStream<'static, Result<ChatCompletionChunk, Status>>> {
        let start = kiln_core::time::now_micros();
        let job = self.chat_job(served, &r)?;
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
