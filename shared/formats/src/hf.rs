//! What Kiln reads of a Hugging Face model folder, as `transformers` saves one and optimum
//! exports one: `config.json`, `generation_config.json`, `tokenizer_config.json` and
//! `chat_template.jinja`. The registry shows it on the model when the upload is validated;
//! the engine serves a bundle that carries no `manifest.json` of Kiln's with it.

use serde_json::{Map, Value};

/// The files Kiln reads, in the order of [`HfFiles`]'s fields.
pub const HF_FILES: [&str; 4] = [
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// The bytes of those files a folder holds (None: absent).
#[derive(Debug, Default, Clone, Copy)]
pub struct HfFiles<'a> {
    pub config: Option<&'a [u8]>,
    pub generation_config: Option<&'a [u8]>,
    pub tokenizer_config: Option<&'a [u8]>,
    pub chat_template: Option<&'a [u8]>,
}

impl<'a> HfFiles<'a> {
    /// The files from `(path, bytes)` pairs (other paths are ignored).
    pub fn from_pairs<B: AsRef<[u8]>>(pairs: &'a [(String, B)]) -> Self {
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(p, _)| p == name)
                .map(|(_, b)| b.as_ref())
        };
        Self {
            config: get(HF_FILES[0]),
            generation_config: get(HF_FILES[1]),
            tokenizer_config: get(HF_FILES[2]),
            chat_template: get(HF_FILES[3]),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.config.is_none()
            && self.generation_config.is_none()
            && self.tokenizer_config.is_none()
            && self.chat_template.is_none()
    }
}

/// What the files say about serving the model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HfModelInfo {
    /// `architectures` of config.json, e.g. `LlamaForCausalLM`.
    pub architectures: Vec<String>,
    /// `model_type` of config.json, e.g. `llama`.
    pub model_type: String,
    /// Positions the model was trained for (`max_position_embeddings`, else the tokenizer's
    /// `model_max_length` when it is a real limit); 0: unknown.
    pub context_length: u32,
    /// `chat_template.jinja`, else tokenizer_config.json's `chat_template` (the one named
    /// "default" when it lists several).
    pub chat_template: String,
    /// generation_config.json's, else config.json's.
    pub bos_token_id: Option<u32>,
    /// Every token that ends a sequence (generation configs may list several).
    pub eos_token_ids: Vec<u32>,
    /// tokenizer_config.json's `add_bos_token`: prompts start with BOS.
    pub add_bos_token: bool,
}

impl HfModelInfo {
    /// Whether config.json names a causal language model (text generation).
    pub fn is_causal_lm(&self) -> bool {
        self.architectures
            .iter()
            .any(|a| a.ends_with("ForCausalLM") || a.ends_with("LMHeadModel"))
    }
}

/// A file that is not what it should be: the file and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct HfError {
    pub file: &'static str,
    pub problem: String,
}

/// Reads what `files` hold; an absent file contributes nothing.
pub fn read_hf(files: HfFiles<'_>) -> Result<HfModelInfo, HfError> {
    let config = object(HF_FILES[0], files.config)?;
    let generation = object(HF_FILES[1], files.generation_config)?;
    let tokenizer = object(HF_FILES[2], files.tokenizer_config)?;
    let mut info = HfModelInfo::default();

    if let Some(value) = config.get("architectures") {
        info.architectures = value
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| problem(HF_FILES[0], "architectures must be a list of names"))?;
    }
    if let Some(value) = config.get("model_type") {
        info.model_type = value
            .as_str()
            .ok_or_else(|| problem(HF_FILES[0], "model_type must be a string"))?
            .to_owned();
    }
    info.context_length = match config.get("max_position_embeddings") {
        Some(value) => positive(HF_FILES[0], "max_position_embeddings", value)?,
        // transformers writes a huge sentinel when the tokenizer has no limit.
        None => match tokenizer.get("model_max_length").and_then(Value::as_u64) {
            Some(n) if n > 0 && n <= 1 << 24 => n as u32,
            _ => 0,
        },
    };

    info.bos_token_id = match (generation.get("bos_token_id"), config.get("bos_token_id")) {
        (Some(v), _) if !v.is_null() => Some(token_id(HF_FILES[1], "bos_token_id", v)?),
        (_, Some(v)) if !v.is_null() => Some(token_id(HF_FILES[0], "bos_token_id", v)?),
        _ => None,
    };
    info.eos_token_ids = match (generation.get("eos_token_id"), config.get("eos_token_id")) {
        (Some(v), _) if !v.is_null() => token_ids(HF_FILES[1], "eos_token_id", v)?,
        (_, Some(v)) if !v.is_null() => token_ids(HF_FILES[0], "eos_token_id", v)?,
        _ => Vec::new(),
    };
    if let Some(value) = tokenizer.get("add_bos_token") {
        info.add_bos_token = value
            .as_bool()
            .ok_or_else(|| problem(HF_FILES[2], "add_bos_token must be true or false"))?;
    }

    info.chat_template = match files.chat_template {
        Some(bytes) => String::from_utf8(bytes.to_vec())
            .map_err(|_| problem(HF_FILES[3], "is not UTF-8 text"))?,
        None => match tokenizer.get("chat_template") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(t)) => t.clone(),
            // Several named templates: [{"name": "default", "template": "..."}, ...].
            Some(Value::Array(named)) => {
                let template = |entry: &Value| {
                    entry
                        .get("template")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                };
                named
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| named.first())
                    .and_then(template)
                    .ok_or_else(|| {
                        problem(
                            HF_FILES[2],
                            "chat_template must be a string or a list of {name, template}",
                        )
                    })?
            }
            Some(_) => {
                return Err(problem(
                    HF_FILES[2],
                    "chat_template must be a string or a list of {name, template}",
                ));
            }
        },
    };
    Ok(info)
}

fn problem(file: &'static str, text: impl Into<String>) -> HfError {
    HfError {
        file,
        problem: text.into(),
    }
}

fn object(file: &'static str, bytes: Option<&[u8]>) -> Result<Map<String, Value>, HfError> {
    let Some(bytes) = bytes else {
        return Ok(Map::new());
    };
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(problem(file, "must hold a JSON object")),
        Err(e) => Err(problem(file, format!("is not valid JSON: {e}"))),
    }
}

fn positive(file: &'static str, field: &str, value: &Value) -> Result<u32, HfError> {
    value
        .as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            problem(
                file,
                format!("{field} must be a positive integer, got {value}"),
            )
        })
}

fn token_id(file: &'static str, field: &str, value: &Value) -> Result<u32, HfError> {
    value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| problem(file, format!("{field} must be a token id, got {value}")))
}

fn token_ids(file: &'static str, field: &str, value: &Value) -> Result<Vec<u32>, HfError> {
    match value {
        Value::Array(ids) => ids.iter().map(|v| token_id(file, field, v)).collect(),
        single => Ok(vec![token_id(file, field, single)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_optimum_export() {
        let files = HfFiles {
            config: Some(
                br#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2}"#,
            ),
            generation_config: Some(br#"{"bos_token_id": 1, "eos_token_id": [2, 7]}"#),
            tokenizer_config: Some(br#"{"model_max_length": 1000000000000000019884624838656}"#),
            chat_template: Some(b"{{ messages }}"),
        };
        let info = read_hf(files).unwrap();
        assert!(info.is_causal_lm());
        assert_eq!(info.model_type, "llama");
        assert_eq!(info.context_length, 256);
        assert_eq!(info.bos_token_id, Some(1));
        assert_eq!(info.eos_token_ids, vec![2, 7]);
        assert_eq!(info.chat_template, "{{ messages }}");
        assert!(!info.add_bos_token);
    }

    #[test]
    fn templates_and_limits_come_from_the_tokenizer_config_when_alone() {
        let files = HfFiles {
            tokenizer_config: Some(
                br#"{"model_max_length": 2048, "add_bos_token": true, "chat_template":
                     [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
            ),
            ..Default::default()
        };
        let info = read_hf(files).unwrap();
        assert_eq!(info.context_length, 2048);
        assert_eq!(info.chat_template, "D");
        assert!(info.add_bos_token);
        assert!(!info.is_causal_lm());
    }

    #[test]
    fn a_bad_file_is_named_with_its_problem() {
        let bad = |files: HfFiles<'_>| read_hf(files).unwrap_err().to_string();
        assert!(
            bad(HfFiles {
                config: Some(b"{"),
                ..Default::default()
            })
            .starts_with("config.json: is not valid JSON")
        );
        assert_eq!(
            bad(HfFiles {
                config: Some(br#"{"max_position_embeddings": -3}"#),
                ..Default::default()
            }),
            "config.json: max_position_embeddings must be a positive integer, got -3"
        );
        assert_eq!(
            bad(HfFiles {
                generation_config: Some(br#"{"eos_token_id": ["x"]}"#),
                ..Default::default()
            }),
            "generation_config.json: eos_token_id must be a token id, got \"x\""
        );
    }
}
