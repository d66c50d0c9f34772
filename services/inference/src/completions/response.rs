//! What unary and streamed answers of both APIs are made of: the messages' envelope, each
//! choice's piece, usage and log probabilities.

use kiln_proto::kiln_inference::v1::{
    ChatCompletion, ChatCompletionChoice, ChatCompletionChunk, ChatCompletionChunkChoice,
    ChatLogprobs, Completion, CompletionChoice, CompletionLogprobs, TokenLogprob, TopLogprob,
    TopLogprobs, Usage,
};

use super::{Counts, Job};
use crate::generation::llm::Llm;
use crate::generation::sampling::Sampled;
use kiln_core::Result;

/// One of the generation APIs (completions, chat completions): what its answers differ in
/// beyond their messages' types.
pub(super) struct Api<L> {
    /// Its name in usage records.
    pub(super) name: &'static str,
    /// The prefix of its answers' IDs.
    pub(super) id_prefix: &'static str,
    /// Log probabilities of sampled tokens, in its answers' form.
    pub(super) logprobs: fn(&Llm, &[Sampled]) -> L,
}

impl<L> Api<L> {
    /// Begins answering a request: notes when (usage counts from here, tokenizing the prompt
    /// included), builds the request's job and names the answer. Returns the start (Unix
    /// microseconds), the job and the answer's ID.
    pub(super) fn begin(&self, job: impl FnOnce() -> Result<Job>) -> Result<(i64, Job, String)> {
        let start = kiln_core::time::now_micros();
        let job = job()?;
        let id = format!("{}-{}", self.id_prefix, uuid::Uuid::now_v7().simple());
        Ok((start, job, id))
    }
}

impl Job {
    /// The log probabilities of `tokens` in `api`'s form, when the request asked for them.
    pub(super) fn logprobs<L>(&self, api: &Api<L>, tokens: &[Sampled]) -> Option<L> {
        let llm = self.model.llm().filter(|_| self.params.logprobs)?;
        Some((api.logprobs)(llm, tokens))
    }
}

/// What one choice adds to an answer: unary, the whole choice; streamed, a piece as it
/// decodes (the last with the finish reason).
pub(super) struct Piece<L> {
    /// The choice's index in the answer (prompt × `n` + choice).
    pub(super) index: usize,
    pub(super) text: String,
    /// Why the choice ended; empty until it has.
    pub(super) finish: &'static str,
    /// The tokens' log probabilities, when the request asked for them.
    pub(super) logprobs: Option<L>,
}

impl<L> Piece<L> {
    /// Whether the piece carries nothing: a token that released no text yet (part of a
    /// character, or held back because it may begin a stop string), without log probabilities.
    pub(super) fn is_empty(&self) -> bool {
        self.text.is_empty() && self.finish.is_empty() && self.logprobs.is_none()
    }
}

/// What every message of one answer repeats.
pub(super) struct Envelope {
    pub(super) id: String,
    /// Unix seconds.
    pub(super) created: i64,
    /// The model as the request named it.
    pub(super) model: String,
}

/// A message of an answer: its envelope around its choices and, unary or last in a stream,
/// the usage.
pub(super) trait Message: Send + 'static {
    type Choice: Send + 'static;

    fn new(envelope: &Envelope, choices: Vec<Self::Choice>, usage: Option<Usage>) -> Self;
}

/// Implements [`Message`] for each message type, with its choice type and `object` name.
macro_rules! messages {
    ($($message:ident($choice:ident) = $object:literal;)*) => {$(
        impl Message for $message {
            type Choice = $choice;

            fn new(envelope: &Envelope, choices: Vec<$choice>, usage: Option<Usage>) -> Self {
                Self {
                    id: envelope.id.clone(),
                    object: $object.into(),
                    created: envelope.created,
                    model: envelope.model.clone(),
                    choices,
                    usage,
                }
            }
        }
    )*};
}

messages! {
    Completion(CompletionChoice) = "text_completion";
    ChatCompletion(ChatCompletionChoice) = "chat.completion";
    ChatCompletionChunk(ChatCompletionChunkChoice) = "chat.completion.chunk";
}

pub(super) fn usage(job: &Job, counts: Counts) -> Usage {
    let prompt = job.prompts.iter().map(Vec::len).sum::<usize>() * job.n;
    Usage {
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

pub(super) fn completion_logprobs(llm: &Llm, tokens: &[Sampled]) -> CompletionLogprobs {
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

pub(super) fn chat_logprobs(llm: &Llm, tokens: &[Sampled]) -> ChatLogprobs {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_is_empty_only_without_text_finish_or_log_probabilities() {
        let piece = |text: &str, finish, logprobs| Piece {
            index: 0,
            text: text.into(),
            finish,
            logprobs,
        };
        assert!(piece("", "", None).is_empty());
        assert!(!piece("a", "", None).is_empty());
        assert!(!piece("", "stop", None).is_empty());
        assert!(!piece("", "", Some(ChatLogprobs::default())).is_empty());
    }

    #[test]
    fn every_message_of_an_answer_repeats_its_envelope_under_its_apis_object() {
        let envelope = Envelope {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
        };
        let chunk = ChatCompletionChunk::new(&envelope, Vec::new(), None);
        let answer = ChatCompletion::new(&envelope, Vec::new(), Some(Usage::default()));
        let completion = Completion::new(&envelope, Vec::new(), None);
        for (id, created, model) in [
            (&chunk.id, chunk.created, &chunk.model),
            (&answer.id, answer.created, &answer.model),
            (&completion.id, completion.created, &completion.model),
        ] {
            assert_eq!(
                (id.as_str(), created, model.as_str()),
                ("chatcmpl-1", 7, "m")
            );
        }
        assert_eq!(chunk.object, "chat.completion.chunk");
        assert_eq!(answer.object, "chat.completion");
        assert!(answer.usage.is_some() && chunk.usage.is_none());
        assert_eq!(completion.object, "text_completion");
    }
}
