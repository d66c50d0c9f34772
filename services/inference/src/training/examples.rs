//! A JSONL fine-tuning dataset into the trainer's examples, as the model will see them when it
//! serves: chat examples rendered with the model's own chat template (its default system
//! prompt included) and tokenized as a chat completion's prompt is, learning only the
//! assistant's turns; completion examples as a completion's prompt and its answer, learning
//! the answer and the end of sequence. Examples longer than the limit are cut, and counted.

use kiln_formats::Manifest;
use kiln_proto::kiln_inference::v1::ChatMessage;
use kiln_trainer::Example;
use serde_json::Value;
use tokenizers::Tokenizer;

/// A dataset's examples, ready for the trainer.
#[derive(Debug)]
pub struct Prepared {
    pub examples: Vec<Example>,
    /// Examples cut to the limit.
    pub truncated: usize,
}

/// The examples of `jsonl` (a validated dataset) for a model with `tokenizer` and `manifest`,
/// each at most `max_tokens` long. Errors name the line.
pub fn prepare(
    jsonl: &[u8],
    tokenizer: &Tokenizer,
    manifest: &Manifest,
    max_tokens: usize,
) -> Result<Prepared, String> {
    let text = |id: Option<u32>| {
        id.and_then(|t| tokenizer.id_to_token(t))
            .unwrap_or_default()
    };
    let (bos, eos) = (text(manifest.bos_token_id), text(manifest.eos_token_id));
    let mut prepared = Prepared {
        examples: Vec::new(),
        truncated: 0,
    };
    for (i, line) in jsonl.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let at = |problem: String| format!("line {line_no}: {problem}");
        let value: Value = serde_json::from_slice(line).map_err(|e| at(e.to_string()))?;
        let (full, learned) = if value.get("messages").is_some() {
            chat_spans(&value, manifest, &bos, &eos).map_err(at)?
        } else {
            completion_spans(&value, &eos).map_err(at)?
        };
        let mut example = tokenize(&full, &learned, tokenizer, manifest).map_err(at)?;
        if example.tokens.len() > max_tokens {
            example.tokens.truncate(max_tokens);
            example.learned.truncate(max_tokens);
            prepared.truncated += 1;
        }
        prepared.examples.push(example);
    }
    Ok(prepared)
}

/// The text of a chat example and the byte ranges of it the model learns: each assistant
/// message (unless its `weight` is 0) with what its template closes it with.
fn chat_spans(
    value: &Value,
    manifest: &Manifest,
    bos: &str,
    eos: &str,
) -> Result<(String, Vec<std::ops::Range<usize>>), String> {
    let Some(Value::Array(raw)) = value.get("messages") else {
        return Err("\"messages\" is not an array".into());
    };
    let mut messages = Vec::with_capacity(raw.len());
    let mut weights = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let field = |name: &str| m.get(name).and_then(Value::as_str).unwrap_or_default();
        messages.push(ChatMessage {
            role: field("role").to_owned(),
            content: field("content").to_owned(),
            name: field("name").to_owned(),
        });
        let weight = match m.get("weight") {
            None => 1,
            Some(w) => match w.as_i64() {
                Some(w @ (0 | 1)) => w,
                _ => return Err(format!("messages[{i}].weight must be 0 or 1")),
            },
        };
        weights.push(weight);
    }
    let render = |upto: usize, open_turn: bool| {
        crate::chat::render(
            &manifest.chat_template,
            &messages[..upto],
            bos,
            eos,
            open_turn,
        )
        .map_err(|e| e.to_string())
    };
    let full = render(messages.len(), false)?;
    let mut learned = Vec::new();
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" || weights[k] == 0 || k == 0 {
            continue;
        }
        let start = render(k, true)?;
        let end = render(k + 1, false)?;
        if !full.starts_with(&start) || !full.starts_with(&end) || end.len() < start.len() {
            return Err(format!(
                "the model's chat template does not render messages[{k}] after the ones \
                 before it, so its tokens cannot be told apart"
            ));
        }
        learned.push(start.len()..end.len());
    }
    Ok((full, learned))
}

/// The text of a completion example (prompt, completion, end of sequence) and the range of
/// it the model learns: the completion and the end of sequence.
fn completion_spans(
    value: &Value,
    eos: &str,
) -> Result<(String, Vec<std::ops::Range<usize>>), String> {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("\"{name}\" is not a string"))
    };
    let (prompt, completion) = (field("prompt")?, field("completion")?);
    let full = format!("{prompt}{completion}{eos}");
    let learned = std::iter::once(prompt.len()..full.len()).collect();
    Ok((full, learned))
}

/// `text` tokenized as a prompt is (BOS when the model wants it), each token learned when it
/// starts inside one of `learned`.
fn tokenize(
    text: &str,
    learned: &[std::ops::Range<usize>],
    tokenizer: &Tokenizer,
    manifest: &Manifest,
) -> Result<Example, String> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| format!("cannot tokenize: {e}"))?;
    let mut example = Example {
        tokens: Vec::with_capacity(encoding.len() + 1),
        learned: Vec::with_capacity(encoding.len() + 1),
    };
    if manifest.add_bos_token
        && let Some(bos) = manifest.bos_token_id
    {
        example.tokens.push(bos);
        example.learned.push(false);
    }
    for (&id, &(start, _)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
        example.tokens.push(id);
        example
            .learned
            .push(learned.iter().any(|r| r.contains(&start)));
    }
    Ok(example)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::tests::SMOLLM2;

    /// A word-level tokenizer with ChatML's markers as special tokens, and its manifest.
    fn model() -> (Tokenizer, Manifest) {
        let words = [
            "<|im_start|>",
            "<|im_end|>",
            "system",
            "user",
            "assistant",
            "You",
            "are",
            "a",
            "helpful",
            "AI",
            "named",
            "SmolLM",
            ",",
            "trained",
            "by",
            "Hugging",
            "Face",
            "Hi",
            "Hello",
            "there",
            "Bye",
            "What",
            "is",
            "2",
            "+",
            "?",
            "4",
            "[UNK]",
            "<eos>",
        ];
        let vocab: serde_json::Map<String, Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| ((*w).to_owned(), Value::from(i)))
            .collect();
        let special = |id: usize| {
            serde_json::json!({"id": id, "content": words[id], "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [special(0), special(1), special(28)],
            "pre_tokenizer": {"type": "Whitespace"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
        });
        let tokenizer = Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
        let manifest = Manifest {
            chat_template: SMOLLM2.to_owned(),
            eos_token_id: Some(28),
            ..Default::default()
        };
        (tokenizer, manifest)
    }

    fn words(tokenizer: &Tokenizer, e: &Example, learned: bool) -> String {
        let ids: Vec<u32> = e
            .tokens
            .iter()
            .zip(&e.learned)
            .filter(|(_, l)| **l == learned)
            .map(|(t, _)| *t)
            .collect();
        ids.iter()
            .map(|&t| tokenizer.id_to_token(t).unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn chat_examples_learn_the_assistant_turns_only() {
        let (tokenizer, manifest) = model();
        let jsonl = concat!(
            r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello there"},"#,
            r#"{"role":"user","content":"Bye"},{"role":"assistant","content":"Bye","weight":0},"#,
            r#"{"role":"user","content":"What is 2+2?"},{"role":"assistant","content":"4"}]}"#,
            "\n\n",
        );
        let prepared = prepare(jsonl.as_bytes(), &tokenizer, &manifest, 1000).unwrap();
        assert_eq!(prepared.examples.len(), 1);
        assert_eq!(prepared.truncated, 0);
        let e = &prepared.examples[0];
        // The default system prompt is in the context; each learned turn ends with its
        // template's end marker; the turn with weight 0 is context only.
        assert_eq!(
            words(&tokenizer, e, true),
            "Hello there <|im_end|> 4 <|im_end|>"
        );
        let context = words(&tokenizer, e, false);
        assert!(
            context.starts_with("<|im_start|> system You are a helpful AI assistant named SmolLM"),
            "{context}"
        );
        assert!(context.contains("assistant Bye <|im_end|>"), "{context}");

        let cut = prepare(jsonl.as_bytes(), &tokenizer, &manifest, 10).unwrap();
        assert_eq!(cut.truncated, 1);
        assert_eq!(cut.examples[0].tokens.len(), 10);
    }

    #[test]
    fn completion_examples_learn_the_completion_and_the_end() {
        let (tokenizer, manifest) = model();
        let jsonl = "{\"prompt\":\"What is 2+2?\",\"completion\":\" 4\"}\n";
        let prepared = prepare(jsonl.as_bytes(), &tokenizer, &manifest, 1000).unwrap();
        let e = &prepared.examples[0];
        assert_eq!(words(&tokenizer, e, true), "4 <eos>");
        assert_eq!(words(&tokenizer, e, false), "What is 2 + 2 ?");
    }

    #[test]
    fn problems_name_the_line() {
        let (tokenizer, manifest) = model();
        let jsonl = "{\"prompt\":\"Hi\",\"completion\":\"Hello\"}\n{\"prompt\":\"Hi\"}\n";
        let err = prepare(jsonl.as_bytes(), &tokenizer, &manifest, 100).unwrap_err();
        assert_eq!(err, "line 2: \"completion\" is not a string");
        let bad_weight = r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello","weight":2}]}"#;
        let err = prepare(bad_weight.as_bytes(), &tokenizer, &manifest, 100).unwrap_err();
        assert_eq!(err, "line 1: messages[1].weight must be 0 or 1");
    }
}
