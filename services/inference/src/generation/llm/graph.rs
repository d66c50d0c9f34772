//! The graph's inputs and outputs: ids, mask and positions, the batch's past key/values
//! padded to the longest, the presents appended to each sequence's cache, the logits of a row.

use super::worker::{Sequence, Worker};
use crate::backend::{BackendError, InPlaceCache};
use crate::tensor::{Tensor, TensorData};

impl Worker {
    /// The inputs of a pass whose batch rows are `rows`: without positions for graphs that
    /// take none, with the rows' LoRA mask for graphs with slots.
    fn graph_inputs(
        &self,
        mut inputs: Vec<(String, Tensor)>,
        rows: &[Sequence],
    ) -> Result<Vec<(String, Tensor)>, BackendError> {
        if !self.takes_positions {
            inputs.retain(|(name, _)| name != "position_ids");
        }
        if let Some(lora) = &self.lora {
            let mask = lora
                .mask(rows.iter().map(Sequence::adapter))
                .map_err(|m| BackendError::new("lora", m))?;
            inputs.push((kiln_formats::LORA_MASK.to_owned(), mask));
        }
        Ok(inputs)
    }

    /// Runs a pass whose batch rows are `rows`.
    pub(super) fn run_graph(
        &mut self,
        inputs: Vec<(String, Tensor)>,
        rows: &[Sequence],
    ) -> Result<Vec<Tensor>, BackendError> {
        let inputs = self.graph_inputs(inputs, rows)?;
        self.session.run(inputs)
    }

    /// With the arena, brings `seqs` to its rows from `base` and orders them as their rows
    /// are (the batch order of an in-place pass).
    pub(super) fn place_rows(&mut self, seqs: &mut [Sequence], base: usize) {
        if let Some(arena) = self.arena.as_mut() {
            let ids: Vec<_> = seqs.iter().map(|s| s.id).collect();
            arena.place(&ids, base);
            seqs.sort_by_key(|s| arena.row_of(s.id));
        }
    }

    /// Runs a pass over the arena's rows `base..base + rows.len()` (placed), `positions`
    /// the widest row's total, `per_row` tokens a row: the cache is appended in place and
    /// the logits land in the worker's buffer. Returns no tensors (see [`Self::logits_of`]).
    pub(super) fn run_in_place(
        &mut self,
        inputs: Vec<(String, Tensor)>,
        rows: &[Sequence],
        base: usize,
        positions: usize,
        per_row: usize,
    ) -> Result<Vec<Tensor>, BackendError> {
        let inputs = self.graph_inputs(inputs, rows)?;
        let arena = self.arena.as_mut().expect("an in-place pass has the arena");
        arena.ensure(positions);
        let (buffers, shape) = arena.views(base..base + rows.len());
        let logits_shape = [rows.len(), per_row, self.vocab];
        self.logits_buffer
            .resize(logits_shape.iter().product(), 0.0);
        self.session.run_in_place(
            inputs,
            InPlaceCache {
                buffers,
                shape,
                logits: &mut self.logits_buffer,
                logits_shape,
            },
        )?;
        Ok(Vec::new())
    }

    /// The logits at `position` of batch row `row` (`per_row` positions a row) of a pass:
    /// from its outputs, or from the worker's buffer after an in-place pass.
    pub(super) fn logits_of(
        &self,
        outputs: &[Tensor],
        row: usize,
        per_row: usize,
        position: usize,
    ) -> Vec<f32> {
        let (values, vocab): (&[f32], usize) = match outputs.get(self.logits) {
            Some(logits) => {
                let vocab = *logits.shape.last().expect("logits rank");
                match &logits.data {
                    TensorData::F32(values) => (values, vocab),
                    _ => return vec![0.0; vocab],
                }
            }
            None => (&self.logits_buffer, self.vocab),
        };
        let start = (row * per_row + position) * vocab;
        values[start..start + vocab].to_vec()
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
        &mut self,
        seq: &mut Sequence,
        outputs: &[Tensor],
        row: usize,
        padded_past: usize,
        count: usize,
    ) {
        if let Some(arena) = self.arena.as_mut() {
            arena.appended(seq.id, count);
            seq.cached += count;
            return;
        }
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
