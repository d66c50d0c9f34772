//! The parts of an answer both unary and streamed answers build: usage and log
//! probabilities.

use kiln_proto::kiln_inference::v1::{
    ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob, TopLogprobs,
};

use super::{Counts, Job};
use crate::generation::llm::Llm;
use crate::generation::sampling::Sampled;

pub(super) fn usage(job: &Job, counts: Counts) -> kiln_proto::kiln_inference::v1::Usage {
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
