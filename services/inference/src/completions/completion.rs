//! Completions: a prompt (or several) continued, unary or streamed.

use futures::stream::BoxStream;
use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_proto::kiln_inference::v1::*;
use tonic::Status;

use super::request::{check_stops, choices, max_tokens_field};
use super::response::{completion_logprobs, usage};
use super::{Event, Finish, Job, llm};
use crate::generation::sampling::{SamplingFields, SamplingParams};
use crate::router::Served;
use crate::service::Inference;
use kiln_core::Result;

impl Inference {
    /// A completion request's job, served by `served`.
    pub(super) fn completion_job(
        &self,
        served: Served,
        r: &CreateCompletionRequest,
    ) -> Result<Job> {
        let model = served.model;
        let texts: Vec<String> = match (r.prompt.is_empty(), r.prompts.is_empty()) {
            (false, true) => vec![r.prompt.clone()],
            (true, false) => r.prompts.clone(),
            (false, false) => {
                return Err(Error::invalid(
                    "prompts",
                    "give prompt or prompts, not both",
                ));
            }
            (true, true) => return Err(Error::invalid("prompt", "is required")),
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
            route: served.route,
        })
    }

    pub(crate) async fn create_completion(
        &self,
        caller: &Principal,
        served: Served,
        r: CreateCompletionRequest,
    ) -> Result<Completion> {
        let start = kiln_core::time::now_micros();
        let job = self.completion_job(served, &r)?;
        let id = format!("cmpl-{}", uuid::Uuid::now_v7().simple());
        let (results, counts) = self
            .run_unary(caller, &job, &id, "completions", start)
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

    /// Streams a completion: a message per piece, then one with finish reasons and usage.
    pub(crate) async fn stream_completion(
        &self,
        caller: &Principal,
        served: Served,
        r: CreateCompletionRequest,
    ) -> Result<BoxStream<'static, Result<Completion, Status>>> {
        let start = kiln_core::time::now_micros();
        let job = self.completion_job(served, &r)?;
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
}
