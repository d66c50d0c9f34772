//! The decode step: one token for every running sequence, their pasts padded to the longest
//! and the padding masked.

use super::graph::ids_tensor;
use super::worker::{Sequence, Worker};
use crate::backend::BackendError;

impl Worker {
    /// One token for every running sequence, in one pass.
    pub(super) fn decode(&mut self, running: &mut [Sequence]) -> Result<(), BackendError> {
        self.place_rows(running, 0);
        let batch = running.len();
        let width = running.iter().map(|s| s.cached).max().unwrap_or(0);
        let total = width + 1;
        let mut ids = Vec::with_capacity(batch);
        let mut mask = Vec::with_capacity(batch * total);
        let mut positions = Vec::with_capacity(batch);
        for seq in running.iter() {
            ids.push(seq.next.expect("a running sequence has a next token") as i64);
            mask.extend((0..width).map(|p| i64::from(p < seq.cached)));
            mask.push(1);
            positions.push(seq.cached as i64);
        }
        let mut inputs = vec![
            ("input_ids".to_owned(), ids_tensor(vec![batch, 1], ids)),
            (
                "attention_mask".to_owned(),
                ids_tensor(vec![batch, total], mask),
            ),
            (
                "position_ids".to_owned(),
                ids_tensor(vec![batch, 1], positions),
            ),
        ];
        let outputs = if self.arena.is_some() {
            self.run_in_place(inputs, running, 0, total, 1)?
        } else {
            self.past_of(&mut inputs, running, width);
            self.run_graph(inputs, running)?
        };
        for (row, seq) in running.iter_mut().enumerate() {
            self.append(seq, &outputs, row, width, 1);
            let mut logits = self.logits_of(&outputs, row, 1, 0);
            let sampled = seq.sampler.sample(&mut logits);
            self.emit(seq, sampled);
        }
        Ok(())
    }
}
