//! Serving a decoder-with-past graph (HF-optimum convention) with continuous batching: one
//! thread owns the session; sequences join between steps, newcomers' prompts are fed in
//! chunks, several newcomers in one pass when they fit (so running sequences are not stalled
//! by a long prefill, and a burst of newcomers starts together), every running sequence
//! advances one token per batched decode step, and each leaves when it finishes or its client
//! goes away. Every sequence keeps its own key/value cache; a decode step pads the caches of
//! the batch to the longest and masks the padding, so each sequence computes exactly what it
//! would alone.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::detok::Detokenizer;
use super::sampling::{Sampled, Sampler, SamplingParams};
use super::stop::StopMatcher;
use crate::backend::{BackendError, Session};
use crate::tensor::{Tensor, TensorData};

/// Limits of one model's generation loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmLimits {
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Prompt tokens one step feeds: a newcomer's chunk, or newcomers prefilled together
    /// (rows × the longest chunk).
    pub prefill_chunk: usize,
    /// Cached tokens over all running sequences (the KV memory bound).
    pub max_kv_tokens: usize,
    /// Requests waiting to start beyond which new ones are refused.
    pub queue_capacity: usize,
    /// Memory for the key/value entries of recent prompts (the prefix cache); 0 turns it off.
    pub prefix_cache_bytes: u64,
}

/// The graph's cache shape and the tokens that end a sequence.
#[derive(Debug, Clone)]
pub struct LlmShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub eos: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence or a stop string.
    Stop,
    /// max_tokens, or the context is full.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a sequence reports to its request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it released (possibly empty: part of a character, or
    /// held back because it may begin a stop string).
    Token {
        sampled: Sampled,
        text: String,
    },
    /// The last event of a sequence.
    Finished {
        finish: Finish,
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_prompt_tokens: usize,
        text: String,
    },
    Failed(String),
}

/// One sequence to generate.
pub struct SequenceRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stops: Vec<String>,
    /// Which choice of its request this is (seeds differ per choice).
    pub choice: u64,
    pub events: UnboundedSender<Event>,
}

/// Why a sequence was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Stopped,
}

/// A text-generation model's queue and thread.
pub struct Llm {
    queue: SyncSender<SequenceRequest>,
    pub shape: LlmShape,
    pub tokenizer: Arc<Tokenizer>,
}

impl Llm {
    pub fn start(
        name: &str,
        session: Box<dyn Session>,
        shape: LlmShape,
        tokenizer: Arc<Tokenizer>,
        limits: LlmLimits,
    ) -> std::io::Result<Self> {
        let output = |name: &str| {
            session
                .outputs()
                .iter()
                .position(|t| t.name == name)
                .ok_or_else(|| std::io::Error::other(format!("the graph has no output {name}")))
        };
        let logits = output("logits")?;
        let mut presents = Vec::with_capacity(2 * shape.layers);
        for l in 0..shape.layers {
            presents.push(output(&format!("present.{l}.key"))?);
            presents.push(output(&format!("present.{l}.value"))?);
        }
        let (queue, requests) = sync_channel(limits.queue_capacity.max(1));
        let takes_positions = session.inputs().iter().any(|t| t.name == "position_ids");
        let token_bytes = (2 * shape.layers * shape.kv_heads * shape.head_dim * 4) as u64;
        let prefix = PrefixCache::new((limits.prefix_cache_bytes / token_bytes.max(1)) as usize);
        let worker = Worker {
            prefix,
            logits,
            presents,
            takes_positions,
            session,
            shape: shape.clone(),
            tokenizer: tokenizer.clone(),
            limits,
        };
        std::thread::Builder::new()
            .name(format!(
                "kiln-llm-{}",
                name.rsplit('/').next().unwrap_or(name)
            ))
            .spawn(move || worker.run(requests))?;
        Ok(Self {
            queue,
            shape,
            tokenizer,
        })
    }

    pub fn submit(&self, request: SequenceRequest) -> Result<(), SubmitError> {
        self.queue.try_send(request).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }
}

/// A sequence in the loop.
struct Sequence {
    request: SequenceRequest,
    sampler: Sampler,
    /// Per layer and kind (key, value: index 2·layer + kind), per key/value head: positions ×
    /// head_dim values.
    cache: Vec<Vec<Vec<f32>>>,
    /// Tokens in the cache.
    cached: usize,
    /// Prompt tokens taken from the prefix cache.
    cached_prompt: usize,
    /// Prompt tokens fed so far.
    fed: usize,
    /// The token to feed next (sampled, not yet in the cache).
    next: Option<u32>,
    generated: Vec<u32>,
    detok: Detokenizer,
    stop: StopMatcher,
}

impl Sequence {
    fn closed(&self) -> bool {
        self.request.events.is_closed()
    }
}

struct Worker {
    prefix: PrefixCache,
    /// Index of `logits` among the session's outputs, and of `present.L.key|value` for cache
    /// slot 2·L + kind.
    logits: usize,
    presents: Vec<usize>,
    /// Exports without a `position_ids` input derive positions from the mask themselves.
    takes_positions: bool,
    session: Box<dyn Session>,
    shape: LlmShape,
    tokenizer: Arc<Tokenizer>,
    limits: LlmLimits,
}

impl Worker {
    fn run(mut self, requests: Receiver<SequenceRequest>) {
        let mut waiting: VecDeque<SequenceRequest> = VecDeque::new();
        let mut prefilling: VecDeque<Sequence> = VecDeque::new();
        let mut running: Vec<Sequence> = Vec::new();
        loop {
            // Block only when there is nothing to do.
            if waiting.is_empty() && prefilling.is_empty() && running.is_empty() {
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
            // Admit while the batch and the cache budget allow.
            let mut budget: usize = prefilling
                .iter()
                .chain(&running)
                .map(|s| s.request.prompt.len() + s.request.max_tokens)
                .sum();
            while prefilling.len() + running.len() < self.limits.max_batch {
                let Some(front) = waiting.front() else { break };
                let need = front.prompt.len() + front.max_tokens;
                let alone = prefilling.is_empty() && running.is_empty();
                if !alone && budget + need > self.limits.max_kv_tokens {
                    break;
                }
                budget += need;
                let request = waiting.pop_front().expect("front");
                prefilling.push_back(self.sequence(request));
            }
            prefilling.retain(|s| !s.closed());
            running.retain(|s| !s.closed());
            // One prefill pass per step, over the newcomers that fit it.
            let mut group = self.prefill_group(&mut prefilling);
            if !group.is_empty() {
                match self.prefill(&mut group) {
                    Ok(()) => {
                        let mut unfinished = Vec::new();
                        for mut seq in group {
                            if seq.fed < seq.request.prompt.len() {
                                unfinished.push(seq);
                            } else if !self.finished(&mut seq) {
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
            if !running.is_empty() {
                if let Err(e) = self.decode(&mut running) {
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

    fn run_graph(
        &mut self,
        mut inputs: Vec<(String, Tensor)>,
    ) -> Result<Vec<Tensor>, BackendError> {
        if !self.takes_positions {
            inputs.retain(|(name, _)| name != "position_ids");
        }
        self.session.run(inputs)
    }

    fn sequence(&self, request: SequenceRequest) -> Sequence {
        let sampler = Sampler::new(request.params.clone(), &request.prompt, request.choice);
        let stop = StopMatcher::new(request.stops.clone());
        Sequence {
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
        }
    }

    fn empty_past(&self, inputs: &mut Vec<(String, Tensor)>, batch: usize) {
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

    /// Starts a newcomer's prefill from the longest cached beginning of its prompt.
    fn start_prefill(&mut self, seq: &mut Sequence) {
        // Looked up when the sequence's prefill starts rather than when it is admitted, so
        // the choices of one request (admitted together) share the first one's prompt.
        let hit = self
            .prefix
            .take(&seq.request.prompt, &mut seq.cache, self.shape.head_dim);
        seq.cached = hit;
        seq.cached_prompt = hit;
        seq.fed = hit;
    }

    /// How many prompt tokens the sequence's next chunk feeds. Chunks end at multiples of
    /// prefill_chunk, wherever the prefill starts: a prompt resumed from the prefix cache is
    /// then computed in the same pieces as from scratch.
    fn chunk_len(&self, seq: &Sequence) -> usize {
        let step = self.limits.prefill_chunk.max(1);
        (seq.request.prompt.len() - seq.fed).min(step - seq.fed % step)
    }

    /// The newcomers this step prefills together: from the front of `prefilling`, in order,
    /// while the pass (rows × the longest chunk) stays within prefill_chunk tokens, so it
    /// stalls the running sequences no longer than one newcomer's chunk would. One whose
    /// prompt shares uncached blocks with a newcomer already taken waits for the next step,
    /// when it finds them in the prefix cache.
    fn prefill_group(&mut self, prefilling: &mut VecDeque<Sequence>) -> Vec<Sequence> {
        let mut group: Vec<Sequence> = Vec::new();
        let mut longest = 0;
        while let Some(seq) = prefilling.front_mut() {
            if seq.fed == 0 {
                // The cache is only searched when a newcomer is already in the pass.
                let waits = self.prefix.capacity > 0 && !group.is_empty() && {
                    let cached = self.prefix.peek(&seq.request.prompt);
                    group
                        .iter()
                        .any(|g| shared_blocks(&g.request.prompt, &seq.request.prompt) > cached)
                };
                if waits {
                    break;
                }
                self.start_prefill(seq);
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
    /// is in gets its first token sampled.
    fn prefill(&mut self, group: &mut [Sequence]) -> Result<(), BackendError> {
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
        if width == 0 {
            self.empty_past(&mut inputs, batch);
        } else {
            self.past_of(&mut inputs, group, width);
        }
        let outputs = self.run_graph(inputs)?;
        for (row, (seq, &len)) in group.iter_mut().zip(&lens).enumerate() {
            self.append(seq, &outputs, row, width, len, total);
            seq.fed += len;
            if seq.fed < seq.request.prompt.len() {
                continue;
            }
            self.prefix
                .insert(&seq.request.prompt, &seq.cache, self.shape.head_dim);
            let mut logits = logits_at(&outputs[self.logits], row, n, len - 1);
            let sampled = seq.sampler.sample(&mut logits);
            self.emit(seq, sampled);
        }
        Ok(())
    }

    /// Adds the past of `seqs`, right-padded to `width` positions.
    fn past_of(&self, inputs: &mut Vec<(String, Tensor)>, seqs: &[Sequence], width: usize) {
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

    /// Appends positions `from..from + count` of batch row `row` of the presents to `seq`.
    fn append(
        &self,
        seq: &mut Sequence,
        outputs: &[Tensor],
        row: usize,
        from: usize,
        count: usize,
        total: usize,
    ) {
        let (kv, hd) = (self.shape.kv_heads, self.shape.head_dim);
        for (i, cache) in seq.cache.iter_mut().enumerate() {
            let TensorData::F32(present) = &outputs[self.presents[i]].data else {
                continue;
            };
            for (h, head) in cache.iter_mut().enumerate() {
                let start = ((row * kv + h) * total + from) * hd;
                head.extend_from_slice(&present[start..start + count * hd]);
            }
        }
        seq.cached += count;
    }

    /// One token for every running sequence, in one pass.
    fn decode(&mut self, running: &mut [Sequence]) -> Result<(), BackendError> {
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
        self.past_of(&mut inputs, running, width);
        let outputs = self.run_graph(inputs)?;
        for (row, seq) in running.iter_mut().enumerate() {
            self.append(seq, &outputs, row, width, 1, total);
            let mut logits = logits_at(&outputs[self.logits], row, 1, 0);
            let sampled = seq.sampler.sample(&mut logits);
            self.emit(seq, sampled);
        }
        Ok(())
    }

    /// Records a sampled token as the sequence's next one and sends its text.
    fn emit(&self, seq: &mut Sequence, sampled: Sampled) {
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
    fn finished(&mut self, seq: &mut Sequence) -> bool {
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
                self.prefix.insert(&tokens, &seq.cache, self.shape.head_dim);
                true
            }
            None => false,
        }
    }
}

/// Tokens shared through the prefix cache come in whole blocks of this many.
const PREFIX_BLOCK: usize = 16;

/// Key/value entries of recent token sequences (prompts, and prompts with their answers),
/// so a prompt that begins like one of them (a shared system prompt, the earlier turns of a
/// chat, the other choices of a request) starts from its entries rather than computing them
/// again. Bounded in tokens; the least recently used entries go first.
struct PrefixCache {
    entries: Vec<PrefixEntry>,
    held: usize,
    capacity: usize,
    clock: u64,
}

struct PrefixEntry {
    tokens: Vec<u32>,
    /// Per cache slot and head: `tokens.len()` positions × head_dim.
    cache: Vec<Vec<Vec<f32>>>,
    used: u64,
}

impl PrefixCache {
    fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            held: 0,
            capacity,
            clock: 0,
        }
    }

    /// Copies the longest cached beginning of `prompt` (whole blocks, leaving at least its
    /// last token to compute) into the empty `cache`; returns its length in tokens.
    fn take(&mut self, prompt: &[u32], cache: &mut [Vec<Vec<f32>>], head_dim: usize) -> usize {
        let Some((best, len)) = self.best(prompt) else {
            return 0;
        };
        self.clock += 1;
        let entry = &mut self.entries[best];
        entry.used = self.clock;
        for (slot, from) in cache.iter_mut().zip(&entry.cache) {
            for (head, cached) in slot.iter_mut().zip(from) {
                head.extend_from_slice(&cached[..len * head_dim]);
            }
        }
        len
    }

    /// How many tokens of `prompt` [`take`](Self::take) would give, without taking them.
    fn peek(&self, prompt: &[u32]) -> usize {
        self.best(prompt).map_or(0, |(_, len)| len)
    }

    /// The entry covering the most of `prompt`, and how many tokens of it.
    fn best(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, shared_blocks(&e.tokens, prompt)))
            .max_by_key(|&(_, len)| len)
            .filter(|&(_, len)| len > 0)
    }

    /// Keeps the whole blocks of `tokens` with their entries from `cache` (which holds at
    /// least that many positions), unless an entry already covers them.
    fn insert(&mut self, tokens: &[u32], cache: &[Vec<Vec<f32>>], head_dim: usize) {
        let len = tokens.len() / PREFIX_BLOCK * PREFIX_BLOCK;
        let positions = cache
            .first()
            .and_then(|s| s.first())
            .map_or(0, |h| h.len() / head_dim.max(1));
        if len == 0 || len > self.capacity || len > positions {
            return;
        }
        let tokens = &tokens[..len];
        self.clock += 1;
        if let Some(covering) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.starts_with(tokens))
        {
            covering.used = self.clock;
            return;
        }
        // Entries this one extends are covered by it from now on.
        let before = self.entries.len();
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        if self.entries.len() != before {
            self.held = self.entries.iter().map(|e| e.tokens.len()).sum();
        }
        while self.held + len > self.capacity {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
                .expect("entries hold what is counted");
            self.held -= self.entries.swap_remove(oldest).tokens.len();
        }
        let cache = cache
            .iter()
            .map(|slot| slot.iter().map(|h| h[..len * head_dim].to_vec()).collect())
            .collect();
        self.entries.push(PrefixEntry {
            tokens: tokens.to_vec(),
            cache,
            used: self.clock,
        });
        self.held += len;
    }
}

fn ids_tensor(shape: Vec<usize>, values: Vec<i64>) -> Tensor {
    Tensor {
        shape,
        data: TensorData::I64(values),
    }
}

/// The logits at `position` of batch row `row` (`per_row` positions per row).
fn logits_at(logits: &Tensor, row: usize, per_row: usize, position: usize) -> Vec<f32> {
    let vocab = *logits.shape.last().expect("logits rank");
    let TensorData::F32(values) = &logits.data else {
        return vec![0.0; vocab];
    };
    let start = (row * per_row + position) * vocab;
    values[start..start + vocab].to_vec()
}

/// Tokens at the start of `b` that `a` begins with too, in whole prefix-cache blocks (as
/// the cache would give them to `b`, leaving its last token to compute).
fn shared_blocks(a: &[u32], b: &[u32]) -> usize {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    common.min(b.len().saturating_sub(1)) / PREFIX_BLOCK * PREFIX_BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TensorInfo;

    /// A cache of one slot and one head with head_dim 1, position p holding `tokens[p]`.
    fn kv(tokens: &[u32]) -> Vec<Vec<Vec<f32>>> {
        vec![vec![tokens.iter().map(|&t| t as f32).collect()]]
    }

    fn empty() -> Vec<Vec<Vec<f32>>> {
        vec![vec![Vec::new()]]
    }

    #[test]
    fn a_prompt_takes_the_whole_blocks_it_shares_with_an_entry() {
        let mut cache = PrefixCache::new(1024);
        let first: Vec<u32> = (0..40).collect();
        cache.insert(&first, &kv(&first), 1);
        assert_eq!(cache.held, 32, "whole blocks only");
        // Shares 35 tokens: 2 blocks.
        let mut second: Vec<u32> = (0..35).collect();
        second.extend([900, 901, 902]);
        let mut into = empty();
        assert_eq!(cache.take(&second, &mut into, 1), 32);
        assert_eq!(into[0][0], (0..32).map(|t| t as f32).collect::<Vec<_>>());
        // The same 32 tokens alone: the last one is left to compute, so one block.
        let mut into = empty();
        assert_eq!(cache.take(&first[..32], &mut into, 1), 16);
        // Nothing in common within a block.
        let mut into = empty();
        assert_eq!(cache.take(&[5, 6, 7], &mut into, 1), 0);
        assert!(into[0][0].is_empty());
    }

    #[test]
    fn longer_entries_replace_what_they_extend_and_the_oldest_go_first() {
        let mut cache = PrefixCache::new(64);
        let turn: Vec<u32> = (0..16).collect();
        cache.insert(&turn, &kv(&turn), 1);
        let conversation: Vec<u32> = (0..48).collect();
        cache.insert(&conversation, &kv(&conversation), 1);
        assert_eq!((cache.entries.len(), cache.held), (1, 48));
        // Covered already: nothing new is kept.
        cache.insert(&turn, &kv(&turn), 1);
        assert_eq!(cache.held, 48);
        // Over the budget: the least recently used entry goes.
        let other: Vec<u32> = (100..132).collect();
        cache.insert(&other, &kv(&other), 1);
        assert_eq!(cache.held, 32);
        assert_eq!(cache.entries[0].tokens, other);
        // Bigger than the whole budget: not kept.
        let huge: Vec<u32> = (0..80).collect();
        cache.insert(&huge, &kv(&huge), 1);
        assert_eq!(cache.held, 32);
        // A budget of 0 keeps nothing.
        let mut off = PrefixCache::new(0);
        off.insert(&conversation, &kv(&conversation), 1);
        assert!(off.entries.is_empty());
    }

    const VOCAB: u32 = 61;

    /// The next token of the stand-in model after `context`: a sum over the tokens seen, their
    /// count and the last position, so a wrong mask, position or past changes the answer.
    fn next_after(context: &[u32]) -> u32 {
        let sum: u64 = context.iter().map(|&t| u64::from(t)).sum();
        ((7 * sum + 2 * context.len() as u64 - 1) % u64::from(VOCAB)) as u32
    }

    /// A decoder-with-past stand-in (one layer, one head, head_dim 1, the key of a position
    /// being its token) that computes `next_after` over exactly the positions the attention
    /// mask lets each query see, and records the (rows, tokens) of every pass.
    struct ContextSum {
        inputs: Vec<TensorInfo>,
        outputs: Vec<TensorInfo>,
        passes: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
        /// The first pass waits for this, so the test can queue newcomers behind it.
        gate: Option<std::sync::mpsc::Receiver<()>>,
    }

    impl ContextSum {
        fn new(
            passes: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
            gate: std::sync::mpsc::Receiver<()>,
        ) -> Self {
            let info = |name: &str, dtype| TensorInfo {
                name: name.into(),
                dtype,
                shape: vec![-1, -1],
            };
            use crate::tensor::DataType;
            Self {
                inputs: ["input_ids", "attention_mask", "position_ids"]
                    .iter()
                    .map(|n| info(n, DataType::I64))
                    .chain(
                        ["past_key_values.0.key", "past_key_values.0.value"]
                            .iter()
                            .map(|n| info(n, DataType::F32)),
                    )
                    .collect(),
                outputs: ["logits", "present.0.key", "present.0.value"]
                    .iter()
                    .map(|n| info(n, DataType::F32))
                    .collect(),
                passes,
                gate: Some(gate),
            }
        }
    }

    impl Session for ContextSum {
        fn inputs(&self) -> &[TensorInfo] {
            &self.inputs
        }
        fn outputs(&self) -> &[TensorInfo] {
            &self.outputs
        }
        fn run(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, BackendError> {
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            let get = |name: &str| {
                inputs
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| BackendError::new("test", format!("no input {name}")))
            };
            let (ids, mask, positions, past) = (
                get("input_ids")?,
                get("attention_mask")?,
                get("position_ids")?,
                get("past_key_values.0.key")?,
            );
            let (TensorData::I64(ids_v), TensorData::I64(mask_v), TensorData::I64(pos_v)) =
                (&ids.data, &mask.data, &positions.data)
            else {
                return Err(BackendError::new(
                    "test",
                    "ids, mask and positions are int64",
                ));
            };
            let TensorData::F32(past_v) = &past.data else {
                return Err(BackendError::new("test", "the past is float32"));
            };
            let (rows, n) = (ids.shape[0], ids.shape[1]);
            let width = past.shape[2];
            let total = width + n;
            if mask.shape != [rows, total] || positions.shape != [rows, n] {
                return Err(BackendError::new(
                    "test",
                    "mask or positions of the wrong shape",
                ));
            }
            self.passes.lock().unwrap().push((rows, n));
            let mut logits = vec![0.0f32; rows * n * VOCAB as usize];
            let mut present = Vec::with_capacity(rows * total);
            for r in 0..rows {
                let keys: Vec<f32> = past_v[r * width..(r + 1) * width]
                    .iter()
                    .copied()
                    .chain(ids_v[r * n..(r + 1) * n].iter().map(|&t| t as f32))
                    .collect();
                let visible = &mask_v[r * total..(r + 1) * total];
                for i in 0..n {
                    // Causal: query i sees the past and the new positions up to itself.
                    let (mut sum, mut count) = (0u64, 0u64);
                    for p in 0..width + i + 1 {
                        if visible[p] == 1 {
                            sum += keys[p] as u64;
                            count += 1;
                        }
                    }
                    let pos = pos_v[r * n + i] as u64;
                    let next = (7 * sum + count + pos) % u64::from(VOCAB);
                    logits[(r * n + i) * VOCAB as usize + next as usize] = 1.0;
                }
                present.extend(keys);
            }
            let kv = Tensor {
                shape: vec![rows, 1, total, 1],
                data: TensorData::F32(present),
            };
            Ok(vec![
                Tensor {
                    shape: vec![rows, n, VOCAB as usize],
                    data: TensorData::F32(logits),
                },
                kv.clone(),
                kv,
            ])
        }
    }

    fn word_tokenizer() -> Arc<Tokenizer> {
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..VOCAB).map(|i| (format!("t{i}"), i.into())).collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
        });
        Arc::new(json.to_string().parse().expect("a word-level tokenizer"))
    }

    #[tokio::test]
    async fn newcomers_prefill_together_and_each_generates_what_it_would_alone() {
        let passes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (open, gate) = std::sync::mpsc::channel();
        let limits = LlmLimits {
            max_batch: 16,
            prefill_chunk: 16,
            max_kv_tokens: 4096,
            queue_capacity: 64,
            // 8 bytes a token (one layer, key and value of one f32): 1024 tokens.
            prefix_cache_bytes: 8 * 1024,
        };
        let shape = LlmShape {
            layers: 1,
            kv_heads: 1,
            head_dim: 1,
            context_length: 512,
            eos: Vec::new(),
        };
        let llm = Llm::start(
            "m",
            Box::new(ContextSum::new(passes.clone(), gate)),
            shape,
            word_tokenizer(),
            limits,
        )
        .unwrap();
        // Short prompts that fit a pass together, long ones fed in several chunks, and the
        // same 20-token prompt twice (the second waits for the first's blocks in the cache).
        let mut prompts: Vec<Vec<u32>> = [3usize, 5, 4, 7, 2, 9, 20, 33]
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                (0..len as u32)
                    .map(|t| (t * 3 + i as u32 * 11) % VOCAB)
                    .collect()
            })
            .collect();
        prompts.push(prompts[6].clone());
        let max_tokens = 6;
        let mut answers = Vec::new();
        for prompt in &prompts {
            let (events, answer) = tokio::sync::mpsc::unbounded_channel();
            llm.submit(SequenceRequest {
                prompt: prompt.clone(),
                params: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                max_tokens,
                stops: Vec::new(),
                choice: 0,
                events,
            })
            .unwrap();
            answers.push(answer);
        }
        // The first pass held until everyone was queued behind it.
        open.send(()).unwrap();
        let mut cached_of = Vec::new();
        for (prompt, mut answer) in prompts.iter().zip(answers) {
            let mut context = prompt.clone();
            let mut tokens = Vec::new();
            let cached = loop {
                match answer.recv().await.expect("an event") {
                    Event::Token { sampled, .. } => tokens.push(sampled.token),
                    Event::Finished {
                        finish,
                        completion_tokens,
                        cached_prompt_tokens,
                        ..
                    } => {
                        assert_eq!((finish, completion_tokens), (Finish::Length, max_tokens));
                        break cached_prompt_tokens;
                    }
                    Event::Failed(e) => panic!("failed: {e}"),
                }
            };
            let mut alone = Vec::new();
            for _ in 0..max_tokens {
                let next = next_after(&context);
                alone.push(next);
                context.push(next);
            }
            assert_eq!(tokens, alone, "prompt {prompt:?}");
            cached_of.push(cached);
        }
        // The repeated prompt waited for the first one's block and took it from the cache.
        assert_eq!((cached_of[6], cached_of[8]), (0, 16), "{cached_of:?}");
        let passes = passes.lock().unwrap().clone();
        assert!(
            passes.iter().any(|&(rows, n)| rows >= 2 && n >= 2),
            "some newcomers shared a prefill pass: {passes:?}"
        );
        for &(rows, n) in passes.iter().filter(|&&(_, n)| n >= 2) {
            assert!(
                rows * n <= 16,
                "a prefill pass stays within prefill_chunk: {passes:?}"
            );
        }
    }
}
