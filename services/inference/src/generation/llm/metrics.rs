//! A generation loop's metrics, labelled by its model and LoRA slots: the queue, the batch, time to first
//! token, decode steps and tokens, and the prefix cache's share of prompt tokens.

use std::sync::LazyLock;
use std::time::Duration;

use kiln_core::metrics::{
    self, Counter, Family, Gauge, Histogram, HistogramFamily, Labels, count_histogram,
    seconds_histogram,
};

use super::worker::Sequence;

struct Families {
    waiting: Family<Labels<2>, Gauge>,
    running: Family<Labels<2>, Gauge>,
    time_to_first_token: HistogramFamily<Labels<2>>,
    decode_step: HistogramFamily<Labels<2>>,
    decode_batch: HistogramFamily<Labels<2>>,
    generated: Family<Labels<2>, Counter>,
    prompt: Family<Labels<2>, Counter>,
    cached_prompt: Family<Labels<2>, Counter>,
    adapters: Family<Labels<2>, Gauge>,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| Families {
    waiting: metrics::register(
        "kiln_llm_waiting_requests",
        "Requests queued for a text-generation model, not yet admitted to its batch",
        false,
        Family::default(),
    ),
    running: metrics::register(
        "kiln_llm_running_sequences",
        "Sequences a text-generation model is decoding",
        false,
        Family::default(),
    ),
    time_to_first_token: metrics::register(
        "kiln_llm_time_to_first_token",
        "From a request's submission to its first generated token",
        true,
        Family::new_with_constructor(seconds_histogram),
    ),
    decode_step: metrics::register(
        "kiln_llm_decode_step_duration",
        "One decode step over the running batch (a token for each sequence)",
        true,
        Family::new_with_constructor(seconds_histogram),
    ),
    decode_batch: metrics::register(
        "kiln_llm_decode_batch_size",
        "Sequences in a decode step",
        false,
        Family::new_with_constructor(count_histogram),
    ),
    generated: metrics::register(
        "kiln_llm_generated_tokens",
        "Tokens generated (rate: decode tokens per second)",
        false,
        Family::default(),
    ),
    prompt: metrics::register(
        "kiln_llm_prompt_tokens",
        "Prompt tokens of the requests prefilled",
        false,
        Family::default(),
    ),
    cached_prompt: metrics::register(
        "kiln_llm_cached_prompt_tokens",
        "Prompt tokens whose keys and values came from the prefix cache (over \
         kiln_llm_prompt_tokens_total: its hit rate)",
        false,
        Family::default(),
    ),
    adapters: metrics::register(
        "kiln_llm_loaded_adapters",
        "LoRA adapters resident in a model's slots (0: none, or a graph without slots)",
        false,
        Family::default(),
    ),
});

/// One model's handles, resolved once.
pub(super) struct LlmMetrics {
    pub(super) waiting: Gauge,
    pub(super) running: Gauge,
    pub(super) adapters: Gauge,
    time_to_first_token: Histogram,
    decode_step: Histogram,
    decode_batch: Histogram,
    generated: Counter,
    prompt: Counter,
    cached_prompt: Counter,
}

impl LlmMetrics {
    /// The loop of `model` with `lora_slots` slots (the same model may be loaded bare and
    /// with slots, side by side: their gauges must not overwrite each other).
    pub(super) fn of(model: &str, lora_slots: usize) -> Self {
        let f = &*FAMILIES;
        let labels = [
            ("model", model.to_owned()),
            ("lora_slots", lora_slots.to_string()),
        ];
        Self {
            waiting: f.waiting.get_or_create(&labels).clone(),
            running: f.running.get_or_create(&labels).clone(),
            adapters: f.adapters.get_or_create(&labels).clone(),
            time_to_first_token: f.time_to_first_token.get_or_create(&labels).clone(),
            decode_step: f.decode_step.get_or_create(&labels).clone(),
            decode_batch: f.decode_batch.get_or_create(&labels).clone(),
            generated: f.generated.get_or_create(&labels).clone(),
            prompt: f.prompt.get_or_create(&labels).clone(),
            cached_prompt: f.cached_prompt.get_or_create(&labels).clone(),
        }
    }

    /// A sequence whose prompt is in: its first token was sampled.
    pub(super) fn prefilled(&self, seq: &Sequence) {
        self.time_to_first_token
            .observe(seq.arrived.elapsed().as_secs_f64());
        self.prompt.inc_by(seq.request.prompt.len() as u64);
        self.cached_prompt.inc_by(seq.cached_prompt as u64);
        self.generated.inc();
    }

    /// A decode step over `batch` sequences.
    pub(super) fn decoded(&self, batch: usize, took: Duration) {
        self.decode_step.observe(took.as_secs_f64());
        self.decode_batch.observe(batch as f64);
        self.generated.inc_by(batch as u64);
    }
}
