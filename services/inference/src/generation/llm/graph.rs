//! The graph's inputs and outputs: ids, mask and positions, the batch's past key/values
//! padded to the longest, the presents appended to each sequence's cache, the logits of a row.

use super::worker::{Sequence, Worker};
use crate::backend::BackendError;
use crate::tensor::{Tensor, TensorData};

impl Worker {
    /// Runs a pass whose batch rows are `rows` (for their adapters' LoRA mask).
    pub(super) fn run_graph(
        &mut self,
        mut inputs: Vec<(String, Tensor)>,
        rows: &[Sequence],
    ) -> Result<Vec<Tensor>, BackendError> {
        if !self.takes_positions {
            inputs.retain(|(name, _)| name != "position_ids");
        }
        if let Some(lora) = &self.lora {
            let mask = lora
                .mask(rows.iter().map(Sequence::adapter))
                .map_err(|m| BackendError::new("lora", m))?;
            inputs.push((kiln_formats::LORA_MASK.to_owned(), mask));
        }
        self.session.run(inputs)
    }

    pub(super) fn empty_past(&self, inputs: &mut Vec<(String, Tensor)>, batch: usize) {
        for l in 0..self.shape.layers {
            for kind in ["key", "value"] {
                inputs.push((
                    format!("past_key_values.{l}.{kind}"),
                    Tensor {
                        shape: vec![batch, self.shape.kv_heads, 0, self.shape.head_dim],
                        data: TensorData::F32(Vec::new()),
                    },
                ));
            }
        }
    }

    /// Adds the past of `seqs`, right-padded to `width` positions.
    pub(super) fn past_of(
        &self,
        inputs: &mut Vec<(String, Tensor)>,
        seqs: &[Sequence],
        width: usize,
    ) {
        let (kv, hd) = (self.shape.kv_heads, self.shape.head_dim);
        for l in 0..self.shape.layers {
            for (k, kind) in ["key", "value"].into_iter().enumerate() {
                let mut data = Vec::with_capacity(seqs.len() * kv * width * hd);
                for seq in seqs {
                    for head in &seq.cache[2 * l + k] {
                        data.extend_from_slice(head);
                        data.resize(data.len() + (width - seq.cached) * hd, 0.0);
                    }
                }
                inputs.push((
                    format!("past_key_values.{l}.{kind}"),
                    Tensor {
                        shape: vec![seqs.len(), kv, width, hd],
                        data: TensorData::F32(data),
                    },
                ));
            }
        }
    }

    /// Appends batch row `row`'s `count` new positions of the presents to `seq`: they follow
    /// the batch's past, padded to `padded_past`, or with `kv_in_place` the row's own past.
    pub(super) fn append(
        &self,
        seq: &mut Sequence,
        outputs: &[Tensor],
        row: usize,
        padded_past: usize,
        count: usize,
    ) {
        let (kv, hd) = (self.shape.kv_heads, self.shape.head_dim);
        let from = if self.shape.kv_in_place {
            seq.cached
        } else {
            padded_past
        };
        for (i, cache) in seq.cache.iter_mut().enumerate() {
            let present = &outputs[self.presents[i]];
            let TensorData::F32(values) = &present.data else {
                continue;
            };
            let total = present.shape[2];
            for (h, head) in cache.iter_mut().enumerate() {
                let start = ((row * kv + h) * total + from) * hd;
                head.extend_from_slice(&values[start..start + count * hd]);
            }
        }
        seq.cached += count;
    }
}

pub(super) fn ids_tensor(shape: Vec<usize>, values: Vec<i64>) -> Tensor {
    Tensor {
        shape,
        data: TensorData::I64(values),
    }
}

/// The logits at `position` of batch row `row` (`per_row` positions per row).
pub(super) fn logits_at(logits: &Tensor, row: usize, per_row: usize, position: usize) -> Vec<f32> {
    let vocab = *logits.shape.last().expect("logits rank");
    let TensorData::F32(values) = &logits.data else {
        return vec![0.0; vocab];
    };
    let start = (row * per_row + position) * vocab;
    values[start..start + vocab].to_vec()
}
