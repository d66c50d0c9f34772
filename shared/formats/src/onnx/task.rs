//! The tasks a bundle serves, and whether an ONNX graph's interface fits the one a user
//! declared, the way Kiln's engine feeds it.

use super::interface::{OnnxInfo, TensorSpec};
use crate::error::FormatError;
use crate::onnx_proto::{elem_type, elem_type_name};

/// What a model bundle serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// Token ids in, one vector per input out (`CreateEmbeddings`).
    Embedding,
    /// A causal LM with logits (completions and chat completions).
    TextGeneration,
    /// Any tensors in, tensors out (the Open Inference Protocol).
    Tensor,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::Embedding, Task::TextGeneration, Task::Tensor];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Embedding => "embedding",
            Task::TextGeneration => "text-generation",
            Task::Tensor => "tensor",
        }
    }

    /// The inverse of [`Task::as_str`].
    pub fn parse(s: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_float(elem_type: i32) -> bool {
    use elem_type::*;
    matches!(elem_type, FLOAT | FLOAT16 | DOUBLE | BFLOAT16)
}

const EMBEDDING_OUTPUTS: [&str; 3] = [
    "last_hidden_state",
    "sentence_embedding",
    "token_embeddings",
];
const EMBEDDING_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];
const GENERATION_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "position_ids"];

/// Whether the model can serve `task` the way Kiln's engine feeds it:
///
/// - embedding: int64 `input_ids` and `attention_mask` (and optionally `token_type_ids`), no
///   other input, and a float output `last_hidden_state` or `token_embeddings` of rank 3, or
///   `sentence_embedding` of rank 2;
/// - text generation: int64 `input_ids` and `attention_mask` (optionally `position_ids`), a
///   float `logits` output, and for every `past_key_values.N.key|value` input the matching
///   `present.N.key|value` output (the HF-optimum decoder-with-past convention);
/// - tensor: at least one input and one output, all of known element types.
pub fn check_task(file: &str, info: &OnnxInfo, task: Task) -> Result<(), FormatError> {
    let fail = |problem: String| {
        Err(FormatError::new(
            file,
            format!("cannot serve the {task} task: {problem}"),
        ))
    };
    let int64_input = |name: &str| -> Result<(), FormatError> {
        match info.input(name) {
            None => fail(format!("it has no input {name:?}")),
            Some(t) if t.elem_type != elem_type::INT64 => fail(format!(
                "input {name:?} is {}, expected int64",
                type_name(t.elem_type)
            )),
            Some(_) => Ok(()),
        }
    };
    match task {
        Task::Embedding => {
            int64_input("input_ids")?;
            int64_input("attention_mask")?;
            if info.input("token_type_ids").is_some() {
                int64_input("token_type_ids")?;
            }
            if let Some(extra) = info
                .inputs
                .iter()
                .find(|t| !EMBEDDING_INPUTS.contains(&t.name.as_str()))
            {
                return fail(format!(
                    "input {:?} is not one Kiln feeds to an embedding model (it feeds \
                     input_ids, attention_mask and token_type_ids)",
                    extra.name
                ));
            }
            let Some(out) = info
                .outputs
                .iter()
                .find(|t| EMBEDDING_OUTPUTS.contains(&t.name.as_str()))
            else {
                return fail(format!(
                    "it has no output last_hidden_state, token_embeddings or \
                     sentence_embedding (its outputs: {})",
                    names(&info.outputs)
                ));
            };
            let want_rank = if out.name == "sentence_embedding" {
                2
            } else {
                3
            };
            if !is_float(out.elem_type) {
                return fail(format!(
                    "output {:?} is {}, expected a float type",
                    out.name,
                    type_name(out.elem_type)
                ));
            }
            if out.dims.len() != want_rank {
                return fail(format!(
                    "output {:?} has rank {}, expected {want_rank}",
                    out.name,
                    out.dims.len()
                ));
            }
            Ok(())
        }
        Task::TextGeneration => {
            int64_input("input_ids")?;
            int64_input("attention_mask")?;
            if info.input("position_ids").is_some() {
                int64_input("position_ids")?;
            }
            match info.output("logits") {
                None => {
                    return fail(format!(
                        "it has no output \"logits\" (its outputs: {})",
                        names(&info.outputs)
                    ));
                }
                Some(t) if !is_float(t.elem_type) => {
                    return fail(format!(
                        "output \"logits\" is {}, expected a float type",
                        type_name(t.elem_type)
                    ));
                }
                Some(_) => {}
            }
            for input in &info.inputs {
                let name = input.name.as_str();
                if let Some(rest) = name.strip_prefix("past_key_values.") {
                    let present = format!("present.{rest}");
                    let well_formed = rest.split_once('.').is_some_and(|(layer, kind)| {
                        layer.parse::<u32>().is_ok() && (kind == "key" || kind == "value")
                    });
                    if !well_formed {
                        return fail(format!(
                            "input {name:?} is not named past_key_values.N.key or \
                             past_key_values.N.value"
                        ));
                    }
                    if info.output(&present).is_none() {
                        return fail(format!("input {name:?} has no matching output {present:?}"));
                    }
                } else if !GENERATION_INPUTS.contains(&name) {
                    return fail(format!(
                        "input {name:?} is not one Kiln feeds to a text-generation model (it \
                         feeds input_ids, attention_mask, position_ids and \
                         past_key_values.N.key/value)"
                    ));
                }
            }
            Ok(())
        }
        Task::Tensor => {
            if info.inputs.is_empty() {
                return fail("it has no inputs".into());
            }
            if info.outputs.is_empty() {
                return fail("it has no outputs".into());
            }
            for (kind, t) in info
                .inputs
                .iter()
                .map(|t| ("input", t))
                .chain(info.outputs.iter().map(|t| ("output", t)))
            {
                if elem_type_name(t.elem_type).is_none() {
                    return fail(format!(
                        "{kind} {:?} has an unknown element type ({})",
                        t.name, t.elem_type
                    ));
                }
            }
            Ok(())
        }
    }
}

fn type_name(elem_type: i32) -> String {
    match elem_type_name(elem_type) {
        Some(n) => n.to_string(),
        None => format!("of unknown type {elem_type}"),
    }
}

fn names(specs: &[TensorSpec]) -> String {
    if specs.is_empty() {
        return "none".into();
    }
    specs
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
