//! A request's fields checked and turned into a [`Job`]: its prompts tokenized and fitted
//! into the model's context, its sampling parameters, choices, stops and limits.

use kiln_core::Error;
use kiln_proto::kiln_inference::v1::ContextLengthExceededBehavior;

use super::llm;
use crate::engine::LoadedModel;
use crate::service::Inference;
use kiln_core::Result;

/// The most choices one request may ask for.
const MAX_CHOICES: usize = 16;

pub(super) fn check_stops(stops: &[String]) -> Result<Vec<String>> {
    if stops.len() > 4 {
        return Err(Error::invalid(
            "stop",
            format!("at most 4 stop sequences, got {}", stops.len()),
        ));
    }
    Ok(stops.iter().filter(|s| !s.is_empty()).cloned().collect())
}

/// The request's max_tokens (at least 1), or `default` when unset.
pub(super) fn max_tokens_field(value: Option<i32>, default: usize) -> Result<usize> {
    match value {
        None => Ok(default),
        Some(m) if m >= 1 => Ok(m as usize),
        Some(m) => Err(Error::invalid(
            "max_tokens",
            format!("must be at least 1, got {m}"),
        )),
    }
}

pub(super) fn choices(n: Option<i32>) -> Result<usize> {
    match n {
        None => Ok(1),
        Some(n) if n >= 1 && n as usize <= MAX_CHOICES => Ok(n as usize),
        Some(n) => Err(Error::invalid(
            "n",
            format!("must be between 1 and {MAX_CHOICES}, got {n}"),
        )),
    }
}

impl Inference {
    /// Tokenizes `text` as a prompt (with BOS when the model wants it).
    pub(super) fn prompt_tokens(
        &self,
        model: &LoadedModel,
        field: &str,
        text: &str,
    ) -> Result<Vec<u32>> {
        let llm = llm(model)?;
        let encoding = llm
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::invalid(field, format!("cannot tokenize: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if model.manifest.add_bos_token
            && let Some(bos) = model.manifest.bos_token_id
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        if ids.is_empty() {
            return Err(Error::invalid(field, "has no tokens"));
        }
        Ok(ids)
    }

    /// Fits prompt and max_tokens into the context: refuses (naming `max_tokens`), or with
    /// TRUNCATE drops the oldest prompt tokens and then lowers max_tokens.
    pub(super) fn fit_context(
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
        Err(Error::invalid(
            "max_tokens",
            format!(
                "the prompt's {} tokens plus max_tokens {} exceed the model's context of {context} tokens",
                prompt.len(),
                max_tokens
            ),
        ))
    }
}
