//! Embeddings: tokenize each input, run the model (each input its own batcher job, so inputs
//! of one request and of concurrent requests share forward passes), mean-pool the token
//! vectors over the attention mask and L2-normalise.

use crate::engine::{LoadedModel, Task};
use crate::runner::Dispatch;
use crate::tensor::{Tensor, TensorData};
use kiln_core::Error;
use kiln_core::Result;

/// One input's vector.
pub struct Embedded {
    pub vector: Vec<f32>,
}

/// The longest input (in tokens, special tokens included) `model` accepts.
pub fn max_tokens(model: &LoadedModel) -> usize {
    let from_manifest = usize::try_from(model.manifest.context_length).unwrap_or(0);
    let from_graph = model
        .runner()
        .ok()
        .and_then(|r| r.inputs().iter().find(|t| t.name == "input_ids"))
        .and_then(|t| t.shape.get(1))
        .and_then(|&d| usize::try_from(d).ok());
    match (from_manifest, from_graph) {
        (0, Some(g)) => g,
        (0, None) => 512,
        (m, Some(g)) => m.min(g),
        (m, None) => m,
    }
}

/// Token ids of every input; over-long ones are refused (`input[i]`) or, with `truncate`, cut
/// to the limit keeping the final special token.
pub fn tokenize(model: &LoadedModel, inputs: &[String], truncate: bool) -> Result<Vec<Vec<u32>>> {
    let tokenizer = model
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::FailedPrecondition(format!("{} has no tokenizer", model.name)))?;
    let limit = max_tokens(model);
    let mut out = Vec::with_capacity(inputs.len());
    for (i, text) in inputs.iter().enumerate() {
        let encoding = tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| Error::invalid(format!("input[{i}]"), format!("cannot tokenize: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > limit {
            if !truncate {
                return Err(Error::invalid(
                    format!("input[{i}]"),
                    format!(
                        "is {} tokens, more than the model's limit of {limit} (set truncate to cut it)",
                        ids.len()
                    ),
                ));
            }
            let last = *ids.last().expect("non-empty");
            ids.truncate(limit);
            // Keep the closing special token ([SEP]) the model was trained to see.
            let special = encoding.get_special_tokens_mask().last() == Some(&1);
            if special {
                ids[limit - 1] = last;
            }
        }
        if ids.is_empty() {
            return Err(Error::invalid(format!("input[{i}]"), "has no tokens"));
        }
        out.push(ids);
    }
    Ok(out)
}

/// Embeds token sequences, all at once through the batcher.
pub async fn embed(model: &LoadedModel, sequences: Vec<Vec<u32>>) -> Result<Vec<Embedded>> {
    if model.task != Task::Embedding {
        return Err(Error::FailedPrecondition(format!(
            "{} is not an embedding model",
            model.name
        )));
    }
    let runner = model.runner()?;
    let wants_types = runner.inputs().iter().any(|t| t.name == "token_type_ids");
    let output = runner
        .outputs()
        .iter()
        .position(|t| t.name == "sentence_embedding")
        .or_else(|| {
            runner
                .outputs()
                .iter()
                .position(|t| t.name == "last_hidden_state" || t.name == "token_embeddings")
        })
        .ok_or_else(|| {
            Error::FailedPrecondition(format!("{} has no embedding output", model.name))
        })?;
    // A lone input may run on this thread; several go through the queue to share a pass.
    let dispatch = if sequences.len() == 1 {
        Dispatch::Alone
    } else {
        Dispatch::Queue
    };
    let jobs = sequences.into_iter().map(|ids| {
        let n = ids.len();
        let mut inputs = vec![
            (
                "input_ids".to_owned(),
                Tensor {
                    shape: vec![1, n],
                    data: TensorData::I64(ids.iter().map(|&t| i64::from(t)).collect()),
                },
            ),
            (
                "attention_mask".to_owned(),
                Tensor {
                    shape: vec![1, n],
                    data: TensorData::I64(vec![1; n]),
                },
            ),
        ];
        if wants_types {
            inputs.push((
                "token_type_ids".to_owned(),
                Tensor {
                    shape: vec![1, n],
                    data: TensorData::I64(vec![0; n]),
                },
            ));
        }
        async move {
            let outputs = model.run(inputs, true, dispatch).await?;
            Ok::<_, kiln_core::Error>(Embedded {
                vector: pool(&outputs[output], n)?,
            })
        }
    });
    futures::future::try_join_all(jobs).await
}

/// Mean over the first `tokens` positions of a `[1, seq, hidden]` output (the rest is batch
/// padding), or a `[1, hidden]` sentence embedding as is; then L2-normalised.
fn pool(output: &Tensor, tokens: usize) -> Result<Vec<f32>> {
    let TensorData::F32(values) = &output.data else {
        return Err(Error::Internal(format!(
            "the embedding output is {}, expected FP32",
            output.dtype()
        )));
    };
    let mut vector = match output.shape.as_slice() {
        [1, hidden] => values[..*hidden].to_vec(),
        [1, seq, hidden] if *seq >= tokens => {
            let mut sum = vec![0f32; *hidden];
            for row in values.chunks_exact(*hidden).take(tokens) {
                for (s, v) in sum.iter_mut().zip(row) {
                    *s += v;
                }
            }
            sum.iter_mut().for_each(|s| *s /= tokens as f32);
            sum
        }
        other => {
            return Err(Error::Internal(format!(
                "the embedding output has shape {other:?}, expected [1, {tokens}+, hidden]"
            )));
        }
    };
    normalize(&mut vector);
    Ok(vector)
}

/// Scales to unit length (a zero vector stays zero).
pub fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|v| *v /= norm);
    }
}

/// Keeps the first `dimensions` values and re-normalises (`dimensions` names the field).
pub(crate) fn shorten(vector: &mut Vec<f32>, dimensions: usize) {
    vector.truncate(dimensions);
    normalize(vector);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_ignores_padding_and_normalises() {
        let out = Tensor::new(
            vec![1, 3, 2],
            TensorData::F32(vec![1.0, 0.0, 3.0, 0.0, 100.0, 100.0]),
        )
        .unwrap();
        let v = pool(&out, 2).unwrap();
        assert_eq!(v, vec![1.0, 0.0]);
        let mut w = vec![3.0, 4.0, 12.0];
        shorten(&mut w, 2);
        assert!((w[0] - 0.6).abs() < 1e-6 && (w[1] - 0.8).abs() < 1e-6);
    }
}
