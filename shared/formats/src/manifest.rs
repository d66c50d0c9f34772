//! `manifest.json`: what a bundle serves and how. The registry writes it into every bundle it
//! prepares; the engine reads it when it loads one. Both use [`Manifest`], so a key one side
//! renames is an error on the other, not a value silently lost.

use kiln_proto::registry::v1::Model;
use serde::{Deserialize, Serialize};

use crate::error::FormatError;
use crate::hf::HfModelInfo;

/// The manifest of a bundle. `task` and `context_length` are required (a manifest without
/// them is refused, naming the key); the rest may be left out; any other key is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `embedding`, `text-generation` or `tensor`.
    pub task: String,
    /// Tokens a request may hold; 0: unknown.
    pub context_length: i32,
    /// The Jinja chat template ("" for models that do not chat).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chat_template: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// The token that ends a generated sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    /// Further tokens that end one (Hugging Face generation configs may list several).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eos_token_ids: Vec<u32>,
    /// Whether prompts start with the BOS token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub add_bos_token: bool,
    /// The graph writes each batch row's new keys and values right after that row's own past
    /// (`present.N.*` row b holds its first `sum(attention_mask[b])` positions), as ONNX
    /// Runtime's GroupQueryAttention does; false: after the batch's padded past (a Concat).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kv_in_place: bool,
}

impl Manifest {
    /// Its name in a bundle.
    pub const FILE: &'static str = "manifest.json";

    /// The manifest a model's own fields imply: its task, context length and chat template.
    pub fn of_model(model: &Model) -> Self {
        Self {
            task: model
                .base_model_details
                .as_ref()
                .map(|d| d.task.clone())
                .unwrap_or_default(),
            context_length: model.context_length,
            chat_template: model
                .conversation_config
                .as_ref()
                .map(|c| c.template.clone())
                .unwrap_or_default(),
            ..Self::default()
        }
    }

    /// Keys that bundles prepared by earlier versions carry and nothing reads: skipped, so a
    /// data dir's existing bundles keep loading after an upgrade.
    const RETIRED_KEYS: [&'static str; 6] = [
        "model",
        "num_layers",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "precision",
    ];

    /// Reads `manifest.json`; the error names the missing, unknown or mistyped key.
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        let invalid = |e: serde_json::Error| {
            FormatError::new(Self::FILE, format!("not a valid manifest: {e}"))
        };
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(invalid)?;
        if let Some(object) = value.as_object_mut() {
            for key in Self::RETIRED_KEYS {
                object.remove(key);
            }
        }
        serde_json::from_value(value).map_err(invalid)
    }

    /// `manifest.json`'s bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest serializes")
    }

    /// Fills what this manifest leaves open from a Hugging Face folder's files (an optimum
    /// export carries no manifest of Kiln's): the manifest's own values win.
    pub fn complete_from(&mut self, info: HfModelInfo) {
        if self.task.is_empty() && info.is_causal_lm() {
            self.task = "text-generation".into();
        }
        if self.context_length <= 0 {
            self.context_length = i32::try_from(info.context_length).unwrap_or(i32::MAX);
        }
        if self.chat_template.is_empty() {
            self.chat_template = info.chat_template;
        }
        self.bos_token_id = self.bos_token_id.or(info.bos_token_id);
        let mut eos = info.eos_token_ids.into_iter();
        self.eos_token_id = self.eos_token_id.or_else(|| eos.next());
        self.eos_token_ids.extend(eos);
        self.add_bos_token |= info.add_bos_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::registry::v1::{BaseModelDetails, ConversationConfig};

    fn llm() -> Manifest {
        Manifest {
            task: "text-generation".into(),
            context_length: 8192,
            chat_template: "{{ messages }}".into(),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            eos_token_ids: vec![7],
            add_bos_token: true,
            kv_in_place: true,
        }
    }

    #[test]
    fn a_bundle_prepared_by_an_earlier_version_still_reads() {
        let earlier = br#"{"task": "text-generation", "context_length": 8192,
            "model": "accounts/kiln/models/smollm2-135m-instruct", "num_layers": 30,
            "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "precision": "FP32"}"#;
        let manifest = Manifest::from_json(earlier).unwrap();
        assert_eq!(manifest.context_length, 8192);
        let err =
            Manifest::from_json(br#"{"task": "t", "context_length": 1, "modle": 1}"#).unwrap_err();
        assert!(err.to_string().contains("modle"), "{err}");
    }

    #[test]
    fn round_trips() {
        for manifest in [llm(), Manifest::default()] {
            assert_eq!(Manifest::from_json(&manifest.to_json()).unwrap(), manifest);
        }
        // Left-out optional keys read as their defaults.
        let minimal = Manifest::from_json(br#"{"task": "embedding", "context_length": 512}"#);
        assert_eq!(
            minimal.unwrap(),
            Manifest {
                task: "embedding".into(),
                context_length: 512,
                ..Manifest::default()
            }
        );
        let written = String::from_utf8(Manifest::default().to_json()).unwrap();
        assert!(!written.contains("chat_template"), "{written}");
    }

    #[test]
    fn a_missing_required_key_is_named() {
        let err = Manifest::from_json(br#"{"task": "embedding"}"#).unwrap_err();
        assert_eq!(err.file, "manifest.json");
        assert!(
            err.problem.contains("missing field `context_length`"),
            "{err}"
        );
        let err = Manifest::from_json(br#"{"context_length": 0}"#).unwrap_err();
        assert!(err.problem.contains("missing field `task`"), "{err}");
    }

    #[test]
    fn an_unknown_or_mistyped_key_is_named() {
        let err =
            Manifest::from_json(br#"{"task": "embedding", "context_length": 512, "bos_id": 1}"#)
                .unwrap_err();
        assert!(err.problem.contains("unknown field `bos_id`"), "{err}");
        let err =
            Manifest::from_json(br#"{"task": "embedding", "context_length": "512"}"#).unwrap_err();
        assert!(err.problem.contains("invalid type: string"), "{err}");
    }

    #[test]
    fn a_models_fields_imply_a_manifest() {
        let model = Model {
            context_length: 2048,
            base_model_details: Some(BaseModelDetails {
                task: "text-generation".into(),
                ..Default::default()
            }),
            conversation_config: Some(ConversationConfig {
                template: "T".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            Manifest::of_model(&model),
            Manifest {
                task: "text-generation".into(),
                context_length: 2048,
                chat_template: "T".into(),
                ..Manifest::default()
            }
        );
        assert_eq!(Manifest::of_model(&Model::default()), Manifest::default());
    }

    #[test]
    fn hugging_face_files_fill_only_what_is_open() {
        let info = HfModelInfo {
            architectures: vec!["LlamaForCausalLM".into()],
            context_length: 256,
            chat_template: "HF".into(),
            bos_token_id: Some(1),
            eos_token_ids: vec![2, 7],
            add_bos_token: true,
            ..Default::default()
        };
        let mut open = Manifest::default();
        open.complete_from(info.clone());
        assert_eq!(
            open,
            Manifest {
                task: "text-generation".into(),
                context_length: 256,
                chat_template: "HF".into(),
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                eos_token_ids: vec![7],
                add_bos_token: true,
                kv_in_place: false,
            }
        );
        let mut set = Manifest {
            task: "embedding".into(),
            context_length: 512,
            chat_template: "own".into(),
            bos_token_id: Some(5),
            eos_token_id: Some(6),
            ..Manifest::default()
        };
        set.complete_from(info);
        assert_eq!(
            set,
            Manifest {
                task: "embedding".into(),
                context_length: 512,
                chat_template: "own".into(),
                bos_token_id: Some(5),
                eos_token_id: Some(6),
                eos_token_ids: vec![2, 7],
                add_bos_token: true,
                kv_in_place: false,
            }
        );
    }
}
