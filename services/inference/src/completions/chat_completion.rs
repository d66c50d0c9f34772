//! Chat completions: a conversation rendered by the model's chat template and answered,
//! unary or streamed.

use kiln_core::Error;
use std::collections::HashSet;

use futures::stream::BoxStream;
use kiln_core::auth::Principal;
use kiln_proto::kiln_inference::v1::*;
use tonic::Status;

use super::request::{check_stops, choices, max_tokens_field};
use super::response::{Api, Piece, chat_logprobs};
use super::{Job, llm};
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
            true,
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
                logprobs: r.logprobs == Some(true),
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
            prompts: vec![ids],
            prompt_texts: vec![prompt_text],
            model,
            adapter: served.adapter,
            route: served.route,
        })
    }

    pub(crate) async fn create_chat_completion(
        &self,
        caller: &Principal,
        served: Served,
        r: CreateChatCompletionRequest,
    ) -> Result<ChatCompletion> {
        let job = || self.chat_job(served, &r);
        let choice = |_: &Job, piece: Piece<ChatLogprobs>| ChatCompletionChoice {
            index: piece.index as i32,
            message: Some(ChatMessage {
                role: "assistant".into(),
                content: piece.text,
                name: String::new(),
            }),
            finish_reason: piece.finish.into(),
            logprobs: piece.logprobs,
        };
        self.answer(caller, &CHAT_COMPLETIONS, r.model.clone(), job, choice)
            .await
    }

    /// Streams a chat completion: the role first, then content pieces, then the finish
    /// reasons and usage.
    pub(crate) async fn stream_chat_completion(
        &self,
        caller: &Principal,
        served: Served,
        r: CreateChatCompletionRequest,
    ) -> Result<BoxStream<'static, Result<ChatCompletionChunk, Status>>> {
        let job = || self.chat_job(served, &r);
        let mut started = HashSet::new();
        let choice = move |piece| chunk_choice(&mut started, piece);
        self.stream(
            caller,
            &CHAT_COMPLETIONS,
            r.model.clone(),
            job,
            |_| Vec::new(),
            choice,
        )
    }
}

/// The chat completions API.
static CHAT_COMPLETIONS: Api<ChatLogprobs> = Api {
    name: "chat.completions",
    id_prefix: "chatcmpl",
    logprobs: chat_logprobs,
};

/// A streamed piece as a chunk's choice. The first chunk of each choice carries the role, even
/// when it carries nothing else; a later piece that carries nothing is left out. `started`:
/// the choices whose first chunk has gone.
fn chunk_choice(
    started: &mut HashSet<usize>,
    piece: Piece<ChatLogprobs>,
) -> Option<ChatCompletionChunkChoice> {
    let first = started.insert(piece.index);
    if piece.is_empty() && !first {
        return None;
    }
    Some(ChatCompletionChunkChoice {
        index: piece.index as i32,
        delta: Some(ChatMessageDelta {
            role: if first { "assistant" } else { "" }.into(),
            content: piece.text,
        }),
        finish_reason: piece.finish.into(),
        logprobs: piece.logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(index: usize, text: &str, finish: &'static str) -> Piece<ChatLogprobs> {
        Piece {
            index,
            text: text.into(),
            finish,
            logprobs: None,
        }
    }

    /// (role, content, finish reason) of a chunk's choice.
    fn parts(choice: &ChatCompletionChunkChoice) -> (&str, &str, &str) {
        let delta = choice.delta.as_ref().expect("a delta");
        (&delta.role, &delta.content, &choice.finish_reason)
    }

    #[test]
    fn each_choice_starts_with_the_role_and_later_empty_pieces_are_left_out() {
        let mut started = HashSet::new();
        let mut send = |p| chunk_choice(&mut started, p);
        let first = send(piece(0, "", "")).expect("the first piece, empty, carries the role");
        assert_eq!(parts(&first), ("assistant", "", ""));
        assert!(send(piece(0, "", "")).is_none());
        let other = send(piece(1, "Hi", "")).expect("another choice's first piece");
        assert_eq!((other.index, parts(&other)), (1, ("assistant", "Hi", "")));
        let next = send(piece(0, "Tokyo", "")).expect("a piece with text");
        assert_eq!(parts(&next), ("", "Tokyo", ""));
        let last = send(piece(0, "", "stop")).expect("the last piece, with the finish");
        assert_eq!(parts(&last), ("", "", "stop"));
    }
}
