//! Prefill: which newcomers share a pass, and the pass that feeds the next chunk of each
//! one's prompt (from the longest beginning the prefix cache holds).

use std::collections::VecDeque;

use super::graph::ids_tensor;
use super::prefix::shared_blocks;
use super::worker::{Sequence, Worker};
use crate::backend::BackendError;

impl Worker {
    /// Starts a newcomer's prefill from the longest cached beginning of its prompt.
    pub(super) fn start_prefill(&mut self, seq: &mut Sequence) {
        // Looked up when the sequence's prefill starts rather than when it is admitted, so
        // the choices of one request (admitted together) share the first one's prompt.
        let adapter = seq.request.adapter.as_ref().map_or("", |a| a.key.as_str());
        let hit = self.prefix.take(
            adapter,
            &seq.request.prompt,
            &mut seq.cache,
            self.shape.head_dim,
        );
        if let Some(arena) = self.arena.as_mut() {
            arena.write(seq.id, &seq.cache, hit);
            seq.cache.iter_mut().flatten().for_each(Vec::clear);
        }
        seq.cached = hit;
        seq.cached_prompt = hit;
        seq.fed = hit;
    }

    /// How many prompt tokens the sequence's next chunk feeds. Chunks end at multiples of
    /// prefill_chunk, wherever the prefill starts: a prompt resumed from the prefix cache is
    /// then computed in the same pieces as from scratch.
    pub(super) fn chunk_len(&self, seq: &Sequence) -> usize {
        let step = self.limits.prefill_chunk.max(1);
        (seq.request.prompt.len() - seq.fed).min(step - seq.fed % step)
    }

    /// The newcomers this step prefills together: from the front of `prefilling`, in order,
    /// while the pass (rows × the longest chunk) stays within prefill_chunk tokens, so it
    /// stalls the running sequences no longer than one newcomer's chunk would. One whose
    /// prompt shares uncached blocks with a newcomer already taken waits for the next step,
    /// when it finds them in the prefix cache.
    pub(super) fn prefill_group(&mut self, prefilling: &mut VecDeque<Sequence>) -> Vec<Sequence> {
        let mut group: Vec<Sequence> = Vec::new();
        let mut longest = 0;
        while let Some(seq) = prefilling.front_mut() {
            if seq.fed == 0 {
                // The cache is only searched when a newcomer is already in the pass.
                let waits = self.prefix.capacity > 0 && !group.is_empty() && {
                    let cached = self.prefix.peek(seq.adapter_key(), &seq.request.prompt);
                    group.iter().any(|g| {
                        g.adapter_key() == seq.adapter_key()
                            && shared_blocks(&g.request.prompt, &seq.request.prompt) > cached
                    })
                };
                if waits {
                    break;
                }
                self.start_prefill(seq);
            }
            // An in-place cache (GroupQueryAttention) takes several rows' prompts in one
            // pass only when none has a past.
            if self.shape.kv_in_place
                && !group.is_empty()
                && (seq.cached > 0 || group.iter().any(|g| g.cached > 0))
            {
                break;
            }
            let width = longest.max(self.chunk_len(seq));
            if !group.is_empty() && (group.len() + 1) * width > self.limits.prefill_chunk {
                break;
            }
            longest = width;
            group.extend(prefilling.pop_front());
        }
        group
    }

    /// Feeds the next chunk of every sequence's prompt in one pass (chunks right-padded to
    /// the longest, pasts to the longest, the padding masked); a sequence whose whole prompt
    /// is in gets its first token sampled. With the arena, the group takes the rows from
    /// `base` (those after the running sequences').
    pub(super) fn prefill(
        &mut self,
        group: &mut [Sequence],
        base: usize,
    ) -> Result<(), BackendError> {
        self.place_rows(group, base);
        let batch = group.len();
        let lens: Vec<usize> = group.iter().map(|s| self.chunk_len(s)).collect();
        let n = lens.iter().copied().max().unwrap_or(0);
        let width = group.iter().map(|s| s.cached).max().unwrap_or(0);
        let total = width + n;
        let mut ids = Vec::with_capacity(batch * n);
        let mut mask = Vec::with_capacity(batch * total);
        let mut positions = Vec::with_capacity(batch * n);
        for (seq, &len) in group.iter().zip(&lens) {
            let chunk = &seq.request.prompt[seq.fed..seq.fed + len];
            ids.extend(chunk.iter().map(|&t| t as i64));
            // Padding repeats the last token at its position (in range for any position
            // table); the mask hides it and nothing real comes after it.
            ids.extend(std::iter::repeat_n(i64::from(chunk[len - 1]), n - len));
            mask.extend((0..width).map(|p| i64::from(p < seq.cached)));
            mask.extend((0..n).map(|i| i64::from(i < len)));
            let first = seq.cached as i64;
            positions.extend((0..n as i64).map(|i| first + i.min(len as i64 - 1)));
        }
        let mut inputs = vec![
            ("input_ids".to_owned(), ids_tensor(vec![batch, n], ids)),
            (
                "attention_mask".to_owned(),
                ids_tensor(vec![batch, total], mask),
            ),
            (
                "position_ids".to_owned(),
                ids_tensor(vec![batch, n], positions),
            ),
        ];
        let outputs = if self.arena.is_some() {
            self.run_in_place(inputs, group, base, width + n, n)?
        } else {
            if width == 0 {
                self.empty_past(&mut inputs, batch);
            } else {
                self.past_of(&mut inputs, group, width);
            }
            self.run_graph(inputs, group)?
        };
        for (row, (seq, &len)) in group.iter_mut().zip(&lens).enumerate() {
            self.append(seq, &outputs, row, width, len);
            seq.fed += len;
            if seq.fed < seq.request.prompt.len() {
                continue;
            }
            self.remember_prefix(seq, &seq.request.prompt);
            let mut logits = self.logits_of(&outputs, row, n, len - 1);
            let sampled = seq.sampler.sample(&mut logits);
            self.emit(seq, sampled);
        }
        Ok(())
    }
}
