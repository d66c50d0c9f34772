//! Serving a decoder-with-past graph (HF-optimum convention) with continuous batching: one
//! thread owns the session; sequences join between steps, newcomers' prompts are fed in
//! chunks, several newcomers in one pass when they fit (so running sequences are not stalled
//! by a long prefill, and a burst of newcomers starts together), every running sequence
//! advances one token per batched decode step, and each leaves when it finishes or its client
//! goes away. Every sequence keeps its own key/value cache; a decode step pads the caches of
//! the batch to the longest and masks the padding, so each sequence computes exactly what it
//! would alone.

mod arena;
mod decode;
mod graph;
mod lora;
mod metrics;
mod prefill;
mod prefix;
#[cfg(test)]
mod tests;
mod worker;

use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::sampling::{Sampled, SamplingParams};
use crate::backend::Session;
use lora::LoraSlots;
use metrics::LlmMetrics;
use prefix::PrefixCache;
use worker::Worker;

pub use lora::Adapter;

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
    /// The presents hold each row's new entries right after its own past, not after the
    /// batch's padded past (see the manifest's `kv_in_place`).
    pub kv_in_place: bool,
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
    /// The LoRA adapter its rows go through; None: the bare base.
    pub adapter: Option<Arc<Adapter>>,
    pub events: UnboundedSender<Event>,
}

/// A request as the loop receives it: when it was submitted (its time to first token counts
/// from there).
pub(super) struct Queued {
    pub(super) arrived: std::time::Instant,
    pub(super) request: SequenceRequest,
}

impl std::ops::Deref for Queued {
    type Target = SequenceRequest;

    fn deref(&self) -> &SequenceRequest {
        &self.request
    }
}

/// The LoRA side of a loop over a graph with LoRA slots.
#[derive(Debug, Default, Clone)]
pub struct LoraOptions {
    /// Adapters requests name, resident at once.
    pub slots: usize,
    /// The adapter of every row that names none, in a slot of its own for good.
    pub pinned: Option<Arc<Adapter>>,
}

/// Why a sequence was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Stopped,
}

/// A text-generation model's queue and thread.
pub struct Llm {
    queue: SyncSender<Queued>,
    pub shape: LlmShape,
    pub tokenizer: Arc<Tokenizer>,
}

impl Llm {
    /// Starts the loop of `session`. A graph with LoRA slot inputs keeps up to `lora.slots`
    /// adapters resident, and `lora.pinned` for rows that name none.
    pub fn start(
        name: &str,
        mut session: Box<dyn Session>,
        shape: LlmShape,
        tokenizer: Arc<Tokenizer>,
        limits: LlmLimits,
        lora: LoraOptions,
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
        let metrics = LlmMetrics::of(name, lora.slots);
        let lora = LoraSlots::of_graph(session.inputs(), lora.slots, lora.pinned);
        if let Some(lora) = &lora {
            session
                .set_resident(lora.resident_inputs())
                .map_err(std::io::Error::other)?;
        }
        let vocab = session.outputs()[logits]
            .shape
            .last()
            .and_then(|&d| usize::try_from(d).ok())
            .unwrap_or(0);
        // The cache stays in place where the graph appends to it and the backend lets it.
        let arena = (shape.kv_in_place && session.runs_in_place() && vocab > 0).then(|| {
            arena::KvArena::new(
                shape.layers,
                shape.kv_heads,
                shape.head_dim,
                limits.max_batch.max(1),
                shape.context_length,
            )
        });
        let worker = Worker {
            lora,
            prefix,
            logits,
            presents,
            vocab,
            arena,
            logits_buffer: Vec::new(),
            last_id: 0,
            takes_positions,
            session,
            shape: shape.clone(),
            tokenizer: tokenizer.clone(),
            limits,
            metrics,
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
        let queued = Queued {
            arrived: std::time::Instant::now(),
            request,
        };
        self.queue.try_send(queued).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }
}
