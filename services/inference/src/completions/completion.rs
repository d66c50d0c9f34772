//! Completions: a prompt (or several) continued, unary or streamed.

use futures::stream::BoxStream;
use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_proto::kiln_inference::v1::*;
use tonic::Status;

use super::request::{check_stops, choices, max_tokens_field};
use super::response::{Api, Piece, completion_logprobs};
use super::{Job, llm};
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
                logprobs: r.logprobs.is_some(),
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
            prompts,
            prompt_texts: texts,
            model,
            adapter: served.adapter,
            route: served.route,
        })
    }

    pub(crate) async fn create_completion(
        &self,
        caller: &Principal,
        served: Served,
        r: CreateCompletionRequest,
    ) -> Result<Completion> {
        let job = || self.completion_job(served, &r);
        let choice = |job: &Job, mut piece: Piece<_>| {
            if r.echo {
                piece
                    .text
                    .insert_str(0, &job.prompt_texts[piece.index / job.n]);
            }
            completion_choice(piece)
        };
        self.answer(caller, &COMPLETIONS, r.model.clone(), job, choice)
            .await
    }

    /// Streams a completion: a message per piece, then one with finish reasons and usage.
    pub(crate) async fn stream_completion(
        &self,
        caller: &Principal,
        served: Served,
        r: CreateCompletionRequest,
    ) -> Result<BoxStream<'static, Result<Completion, Status>>> {
        let job = || self.completion_job(served, &r);
        // With echo, each choice starts with its prompt.
        let prelude = |job: &Job| {
            if !r.echo {
                return Vec::new();
            }
            (0..job.prompts.len() * job.n)
                .map(|index| {
                    completion_choice(Piece {
                        index,
                        text: job.prompt_texts[index / job.n].clone(),
                        finish: "",
                        logprobs: None,
                    })
                })
                .collect()
        };
        let choice = |piece: Piece<_>| (!piece.is_empty()).then(|| completion_choice(piece));
        self.stream(caller, &COMPLETIONS, r.model.clone(), job, prelude, choice)
    }
}

/// The completions API.
static COMPLETIONS: Api<CompletionLogprobs> = Api {
    name: "completions",
    id_prefix: "cmpl",
    logprobs: completion_logprobs,
};

fn completion_choice(piece: Piece<CompletionLogprobs>) -> CompletionChoice {
    CompletionChoice {
        index: piece.index as i32,
        text: piece.text,
        finish_reason: piece.finish.into(),
        logprobs: piece.logprobs,
    }
}
