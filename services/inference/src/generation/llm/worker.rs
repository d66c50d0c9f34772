//! The generation loop: admits waiting requests while the batch and the key/value budget
//! allow, runs one prefill pass over the newcomers that fit it and one decode step over the
//! running sequences, and lets each sequence go when it finishes or its client leaves.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};

use tokenizers::Tokenizer;

use super::arena::{KvArena, SeqId};
use super::lora::{Adapter, LoraSlots, Residency};
use super::metrics::LlmMetrics;
use super::prefix::PrefixCache;
use super::{Event, Finish, LlmLimits, LlmShape, Queued};
use crate::backend::Session;
use crate::generation::detok::Detokenizer;
use crate::generation::sampling::{Sampled, Sampler};
use crate::generation::stop::StopMatcher;

/// A sequence in the loop.
pub(super) struct Sequence {
    /// Its row's owner in the arena.
    pub(super) id: SeqId,
    pub(super) request: super::SequenceRequest,
    /// When it was submitted.
    pub(super) arrived: std::time::Instant,
    pub(super) sampler: Sampler,
    /// Per layer and kind (key, value: index 2·layer + kind), per key/value head: positions ×
    /// head_dim values. Empty when the arena holds the cache.
    pub(super) cache: Vec<Vec<Vec<f32>>>,
    /// Tokens in the cache.
    pub(super) cached: usize,
    /// Prompt tokens taken from the prefix cache.
    pub(super) cached_prompt: usize,
    /// Prompt tokens fed so far.
    pub(super) fed: usize,
    /// The token to feed next (sampled, not yet in the cache).
    pub(super) next: Option<u32>,
    pub(super) generated: Vec<u32>,
    pub(super) detok: Detokenizer,
    pub(super) stop: StopMatcher,
}

impl Sequence {
    fn closed(&self) -> bool {
        self.request.events.is_closed()
    }

    pub(super) fn adapter(&self) -> Option<&Adapter> {
        self.request.adapter.as_deref()
    }

    /// What its keys and values depend on besides the tokens (the prefix cache's namespace).
    pub(super) fn adapter_key(&self) -> &str {
        self.adapter().map_or("", |a| a.key.as_str())
    }
}

pub(super) struct Worker {
    /// The adapters resident in the graph's LoRA slots (None: a graph without them).
    pub(super) lora: Option<LoraSlots>,
    pub(super) prefix: PrefixCache,
    /// Index of `logits` among the session's outputs, and of `present.L.key|value` for cache
    /// slot 2·L + kind.
    pub(super) logits: usize,
    pub(super) presents: Vec<usize>,
    /// The logits' last dimension (0 when the graph leaves it open).
    pub(super) vocab: usize,
    /// Exports without a `position_ids` input derive positions from the mask themselves.
    pub(super) takes_positions: bool,
    pub(super) session: Box<dyn Session>,
    pub(super) shape: LlmShape,
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) limits: LlmLimits,
    pub(super) metrics: LlmMetrics,
    /// Every sequence's cache, appended to in place, when the graph and backend allow.
    pub(super) arena: Option<KvArena>,
    /// The logits of a pass in place (reused).
    pub(super) logits_buffer: Vec<f32>,
    /// The last id given to a sequence.
    pub(super) last_id: SeqId,
}

impl Worker {
    pub(super) fn run(mut self, requests: Receiver<Queued>) {
        self.metrics
            .adapters
            .set(self.lora.as_ref().map_or(0, loaded_adapters));
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        let mut prefilling: VecDeque<Sequence> = VecDeque::new();
        let mut running: Vec<Sequence> = Vec::new();
        loop {
            // Block only when there is nothing to do.
            if waiting.is_empty() && prefilling.is_empty() && running.is_empty() {
                self.metrics.waiting.set(0);
                self.metrics.running.set(0);
                match requests.recv() {
                    Ok(r) => waiting.push_back(r),
                    Err(_) => return,
                }
            }
            // Requests beyond the queue's capacity stay in the channel, so submitters see it
            // full.
            while waiting.len() < self.limits.queue_capacity {
                match requests.try_recv() {
                    Ok(r) => waiting.push_back(r),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if waiting.is_empty() && prefilling.is_empty() && running.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            waiting.retain(|r| !r.events.is_closed());
            self.metrics.waiting.set(waiting.len() as i64);
            // The rows of sequences that ended are free for newcomers.
            self.release_rows(&prefilling, &running);
            // Admit while the batch and the cache budget allow.
            let mut budget: usize = prefilling
                .iter()
                .chain(&running)
                .map(|s| s.request.prompt.len() + s.request.max_tokens)
                .sum();
            let mut next = 0;
            while prefilling.len() + running.len() < self.limits.max_batch {
                let Some(candidate) = waiting.get(next) else {
                    break;
                };
                let need = candidate.prompt.len() + candidate.max_tokens;
                let alone = prefilling.is_empty() && running.is_empty();
                if !alone && budget + need > self.limits.max_kv_tokens {
                    break;
                }
                if let Some(adapter) = candidate.adapter.clone() {
                    match self.make_resident(&adapter, &prefilling, &running) {
                        Ok(true) => {}
                        // Its adapter waits for a slot; the requests behind it go ahead.
                        Ok(false) => {
                            next += 1;
                            continue;
                        }
                        Err(why) => {
                            let queued = waiting.remove(next).expect("candidate");
                            let _ = queued.events.send(Event::Failed(why));
                            continue;
                        }
                    }
                }
                budget += need;
                let request = waiting.remove(next).expect("candidate");
                prefilling.push_back(self.sequence(request));
            }
            prefilling.retain(|s| !s.closed());
            running.retain(|s| !s.closed());
            self.release_rows(&prefilling, &running);
            // One prefill pass per step, over the newcomers that fit it.
            let mut group = self.prefill_group(&mut prefilling);
            if !group.is_empty() {
                match self.prefill(&mut group, running.len()) {
                    Ok(()) => {
                        let mut unfinished = Vec::new();
                        for mut seq in group {
                            if seq.fed < seq.request.prompt.len() {
                                unfinished.push(seq);
                                continue;
                            }
                            self.metrics.prefilled(&seq);
                            if !self.finished(&mut seq) {
                                running.push(seq);
                            }
                        }
                        // Back to the front, in their order.
                        for seq in unfinished.into_iter().rev() {
                            prefilling.push_front(seq);
                        }
                    }
                    Err(e) => {
                        for seq in group {
                            let _ = seq.request.events.send(Event::Failed(e.to_string()));
                        }
                    }
                }
            }
            self.metrics.running.set(running.len() as i64);
            if !running.is_empty() {
                let started = std::time::Instant::now();
                let decoded = self.decode(&mut running);
                self.metrics.decoded(running.len(), started.elapsed());
                if let Err(e) = decoded {
                    for seq in running.drain(..) {
                        let _ = seq.request.events.send(Event::Failed(e.to_string()));
                    }
                    continue;
                }
                let mut still = Vec::with_capacity(running.len());
                for mut seq in running.drain(..) {
                    if !self.finished(&mut seq) {
                        still.push(seq);
                    }
                }
                running = still;
            }
        }
    }

    /// Frees the arena rows of sequences no longer in the loop.
    fn release_rows(&mut self, prefilling: &VecDeque<Sequence>, running: &[Sequence]) {
        if let Some(arena) = self.arena.as_mut() {
            let live: Vec<SeqId> = prefilling.iter().chain(running).map(|s| s.id).collect();
            arena.keep_only(|id| live.contains(&id));
        }
    }

    /// Puts `adapter` in a LoRA slot if it is not in one (between steps, so no pass sees a
    /// half-written slot); false while every slot holds an adapter a sequence in the loop
    /// uses.
    fn make_resident(
        &mut self,
        adapter: &std::sync::Arc<Adapter>,
        prefilling: &VecDeque<Sequence>,
        running: &[Sequence],
    ) -> Result<bool, String> {
        let Some(lora) = self.lora.as_mut() else {
            return Err(format!(
                "this replica serves its base without LoRA slots, so it cannot apply {}; \
                 deploy the base with enable_addons",
                adapter.name
            ));
        };
        let busy = prefilling.iter().chain(running).map(Sequence::adapter_key);
        match lora.make_resident(adapter, busy)? {
            Residency::Resident => Ok(true),
            Residency::Busy => Ok(false),
            Residency::Loaded => {
                let started = std::time::Instant::now();
                if let Err(e) = self.session.set_resident(lora.resident_inputs()) {
                    lora.remove(&adapter.key);
                    return Err(e.to_string());
                }
                tracing::info!(
                    adapter = %adapter.name,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "LoRA adapter put in a slot"
                );
                self.metrics.adapters.set(loaded_adapters(lora));
                Ok(true)
            }
        }
    }

    fn sequence(&mut self, queued: Queued) -> Sequence {
        let Queued { arrived, request } = queued;
        self.last_id += 1;
        let id = self.last_id;
        if let Some(arena) = self.arena.as_mut() {
            arena.admit(id);
        }
        let sampler = Sampler::new(request.params.clone(), &request.prompt, request.choice);
        let stop = StopMatcher::new(request.stops.clone());
        Sequence {
            id,
            sampler,
            cache: vec![vec![Vec::new(); self.shape.kv_heads]; 2 * self.shape.layers],
            cached: 0,
            cached_prompt: 0,
            fed: 0,
            next: None,
            generated: Vec::new(),
            detok: Detokenizer::new(self.tokenizer.clone()),
            stop,
            request,
            arrived,
        }
    }

    /// Keeps the keys and values of `tokens` (the sequence's first positions) in the prefix
    /// cache.
    pub(super) fn remember_prefix(&mut self, seq: &Sequence, tokens: &[u32]) {
        // Covered (a later turn of a conversation the cache holds): copy nothing out.
        if self.prefix.capacity == 0 || self.prefix.covers(seq.adapter_key(), tokens) {
            return;
        }
        let hd = self.shape.head_dim;
        match &self.arena {
            Some(arena) => {
                let cache = arena.read(seq.id, tokens.len().min(seq.cached));
                self.prefix.insert(seq.adapter_key(), tokens, &cache, hd);
            }
            None => self
                .prefix
                .insert(seq.adapter_key(), tokens, &seq.cache, hd),
        }
    }

    /// Records a sampled token as the sequence's next one and sends its text.
    pub(super) fn emit(&self, seq: &mut Sequence, sampled: Sampled) {
        seq.next = Some(sampled.token);
        if self.shape.eos.contains(&sampled.token) {
            return;
        }
        seq.generated.push(sampled.token);
        let delta = seq.detok.push(sampled.token).unwrap_or_default();
        let released = seq.stop.push(&delta);
        let _ = seq.request.events.send(Event::Token {
            sampled,
            text: released.text,
        });
        if released.stopped {
            seq.next = None;
        }
    }

    /// Sends the end when the sequence is done; true if it is.
    pub(super) fn finished(&mut self, seq: &mut Sequence) -> bool {
        let finish = match seq.next {
            None => Some(Finish::Stop),
            Some(t) if self.shape.eos.contains(&t) => Some(Finish::Stop),
            Some(_) if seq.generated.len() >= seq.request.max_tokens => Some(Finish::Length),
            Some(_) if seq.cached + 1 >= self.shape.context_length => Some(Finish::Length),
            Some(_) => None,
        };
        match finish {
            Some(finish) => {
                let text = if finish == Finish::Stop && seq.next.is_none() {
                    String::new()
                } else {
                    // What the detokenizer still holds (an incomplete last character) goes
                    // through the stop strings like any other text.
                    let rest = seq.detok.finish();
                    let released = seq.stop.push(&rest);
                    if released.stopped {
                        released.text
                    } else {
                        released.text + &seq.stop.finish()
                    }
                };
                let _ = seq.request.events.send(Event::Finished {
                    finish,
                    completion_tokens: seq.generated.len(),
                    cached_prompt_tokens: seq.cached_prompt,
                    text,
                });
                // The whole conversation so far (prompt and answer) is what its next turn
                // begins with.
                let in_cache = seq.cached - seq.request.prompt.len().min(seq.cached);
                let mut tokens = seq.request.prompt.clone();
                tokens.extend_from_slice(&seq.generated[..in_cache.min(seq.generated.len())]);
                self.remember_prefix(seq, &tokens);
                true
            }
            None => false,
        }
    }
}

/// Adapters in the graph's LoRA slots.
fn loaded_adapters(lora: &LoraSlots) -> i64 {
    lora.occupied() as i64
}
