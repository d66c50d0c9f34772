//! A Hugging Face `tokenizer.json` from a GGUF's byte-level BPE tokenizer (`tokenizer.ggml.model`
//! = `gpt2`): the vocabulary, the merges, control tokens as special added tokens, and the
//! pre-tokenizer `tokenizer.ggml.pre` names.

use serde_json::{Value as Json, json};

use crate::gguf::Value;

/// ggml token types: 3 is a control token (`<|im_start|>`, `<|endoftext|>`…), 4 user-defined.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// GPT-2's split pattern (also llama.cpp's default for byte-level BPE).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Builds `tokenizer.json`. `pre` is `tokenizer.ggml.pre` (e.g. `smollm`, `gpt2`).
pub(super) fn tokenizer_json(
    tokens: &[Value],
    token_types: Option<&[Value]>,
    merges: &[Value],
    pre: Option<&str>,
) -> Result<Json, String> {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let text = token
            .as_str()
            .ok_or("tokenizer.ggml.tokens holds a non-string")?;
        vocab.insert(text.to_owned(), json!(id));
        let kind = token_types
            .and_then(|t| t.get(id))
            .and_then(Value::as_i64)
            .unwrap_or(1);
        if kind == CONTROL || kind == USER_DEFINED {
            added.push(json!({
                "id": id,
                "content": text,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": kind == CONTROL,
            }));
        }
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            m.as_str()
                .map(|s| json!(s))
                .ok_or("tokenizer.ggml.merges holds a non-string")
        })
        .collect::<Result<_, _>>()?;
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    // llama.cpp's pre-tokenizers by name; SmolLM splits digits one by one before GPT-2's rules.
    let pre_tokenizer = match pre.unwrap_or("default") {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            split(GPT2_PATTERN),
            byte_level,
        ]}),
        _ => json!({"type": "Sequence", "pretokenizers": [split(GPT2_PATTERN), byte_level]}),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}
