//! The inference service's `[inference]` configuration section.

use std::path::PathBuf;
use std::time::Duration;

use kiln_core::config::{ConfigError, Validate};
use kiln_core::duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct InferenceConfig {
    /// `auto` (ONNX Runtime where it can run, tract otherwise), `tract` or `onnxruntime`.
    pub backend: String,
    /// ONNX Runtime's shared library; empty: `ORT_DYLIB_PATH`.
    pub ort_dylib_path: String,
    /// The device models run on: `cpu`, or `cuda` / `cuda:N` for an NVIDIA GPU.
    pub device: String,
    /// Threads one forward pass may use; 0: the backend's default (all cores).
    pub intra_op_threads: usize,
    /// Serve a model's INT4 bundle (MatMulNBits, int8 activations) when ONNX Runtime runs it
    /// on the CPU; false keeps to float32. INT4 decodes about three times as fast, but its quantized
    /// activations make a sequence's greedy output depend slightly on what it was batched with.
    pub prefer_int4: bool,
    /// Whether ONNX Runtime's worker threads spin between the operators of a pass, and those
    /// of embedding and tensor models after it too, awake for the next request (a
    /// text-generation model's stop at a pass's end, leaving the cores to token streaming);
    /// unset: yes. Without it every operator wakes the workers: a 4-bit SmolLM2 decodes ~30%
    /// slower on 2 cores, and a MiniLM embedding's p50 over gRPC is ~20% higher.
    pub intra_op_spinning: Option<bool>,
    /// Where downloaded model bundles are kept; empty: `<data_dir>/model-cache`.
    pub cache_dir: String,
    /// Least recently used bundles are removed beyond this size.
    pub cache_max_bytes: u64,
    /// Default dynamic batching of every model (`[inference.batching]`; each model can
    /// override it in `models`).
    pub batching: Batching,
    /// Requests waiting for one model beyond which new ones are refused (UNAVAILABLE).
    pub queue_capacity: usize,
    /// Text generation: sequences decoded together per model.
    pub max_sequences: usize,
    /// Text generation: prompt tokens one step feeds (a newcomer's chunk, or newcomers
    /// prefilled together: rows × the longest chunk).
    pub prefill_chunk: usize,
    /// Text generation: the cached tokens (prompt + max_tokens) over all running sequences.
    pub max_kv_tokens: usize,
    /// Text generation: memory per model for the keys and values of recent prompts and
    /// answers, reused by prompts that begin the same way (system prompts, earlier turns of a
    /// chat); 0 turns the prefix cache off.
    pub prefix_cache_bytes: u64,
    /// LoRA addons: adapter slots per replica of a deployment with `enable_addons` (its
    /// `num_peft_device_cached` overrides it), like vLLM's `max_loras`: the distinct adapters
    /// one decode step can mix. A request for an adapter outside the slots takes the slot of
    /// the least recently used adapter no running sequence needs.
    pub max_loras: usize,
    /// Parsed adapters kept in memory per node (least recently used dropped first), like
    /// vLLM's `max_cpu_loras`.
    pub max_cpu_loras: usize,
    /// Per-model settings; a `path` serves a local bundle under `name`.
    pub models: Vec<ModelConfig>,
    /// Models loaded at start (names), so the first request does not wait for a load.
    pub preload: Vec<String>,
    /// The scheduler this node registers with (a node on its own, e.g.
    /// `http://scheduler:7403`; `kiln dev` registers its node in process). Empty: no
    /// scheduler, and requests name models directly.
    pub scheduler_url: String,
    /// The node's ID at the scheduler; empty: the host name.
    pub node_id: String,
    /// Where other nodes reach this node's gRPC server; empty: `http://` + the listen address.
    pub advertise_url: String,
    /// What the node offers the scheduler. Empty: its CPU, as `cpu_slots_per_core` replica
    /// slots per core and its RAM. GPUs are declared here (type, count, memory per device).
    pub accelerators: Vec<AcceleratorConfig>,
    /// CPU replicas share cores: the slots a CPU node offers per core.
    pub cpu_slots_per_core: u32,
    /// Labels the node reports (shown by `kiln list nodes`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// How long a request waits for a deployment with no ready replica (scaled to zero, or
    /// starting) before UNAVAILABLE.
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub cold_start_timeout: Duration,
    /// Requests that may wait so per deployment; more are refused (RESOURCE_EXHAUSTED).
    pub max_waiting_requests: usize,
    /// Fine-tuning on this node (`[inference.training]`).
    pub training: TrainingConfig,
}

/// Whether and how the node trains LoRA addons (one fine-tuning job at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    /// Tell the scheduler this node takes fine-tuning jobs.
    pub enabled: bool,
    /// The most tokens (padding included) one forward and backward pass holds; a step's
    /// batch beyond it accumulates the gradients of several passes.
    pub pass_tokens: usize,
    /// The threads a job trains with; 0: one per core.
    pub threads: usize,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            pass_tokens: 4096,
            threads: 0,
        }
    }
}

/// A group of identical accelerators a node declares.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AcceleratorConfig {
    /// An accelerator type name: NVIDIA_A100_80GB, NVIDIA_H100_80GB, NVIDIA_H200_141GB,
    /// AMD_MI300X_192GB or CPU.
    #[serde(rename = "type")]
    pub kind: String,
    /// Devices of this type.
    pub count: i32,
    /// Memory per device; 0: the type's own (80 GiB for an H100…; for CPU, the host's RAM).
    pub memory_bytes: i64,
}

impl AcceleratorConfig {
    /// The proto value of `kind`.
    pub(crate) fn parsed_kind(&self) -> Option<kiln_proto::common::v1::AcceleratorType> {
        kiln_proto::common::v1::AcceleratorType::from_str_name(&self.kind.to_ascii_uppercase())
            .filter(|k| *k != kiln_proto::common::v1::AcceleratorType::Unspecified)
    }
}

/// The most copies of one model a node loads.
pub(crate) const MAX_INSTANCES: usize = 16;

/// Dynamic batching: the requests waiting for a model run in one forward pass of up to
/// `max_batch_size` rows; a size of 1 turns batching off. With `max_queue_delay` 0 (the
/// default) a pass takes what is queued when it starts: an idle model answers at once, and
/// under load requests gather while the previous pass runs. A delay holds the first request
/// up to that long for others to join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Batching {
    /// Rows one forward pass takes at most; 1 turns batching off.
    pub max_batch_size: usize,
    /// How long the first request waits for others to join its pass.
    #[serde(with = "duration::serde")]
    #[schemars(with = "duration::Text")]
    pub max_queue_delay: Duration,
    /// Copies of an embedding or tensor model loaded side by side, each running its own
    /// passes with `intra_op_threads` threads: on a small machine two single-threaded
    /// instances keep both cores busy while the server handles the answers of one pass,
    /// where one two-threaded instance waits (more throughput, slower lone requests).
    pub instances: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_queue_delay: Duration::ZERO,
            instances: 1,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// accounts/{account}/models/{model}
    pub name: String,
    /// A local bundle folder (model.onnx, tokenizer.json, manifest.json) to serve under
    /// `name` instead of fetching it from the registry.
    pub path: String,
    /// Overrides `inference.backend` for this model.
    pub backend: String,
    /// Overrides `inference.batching.max_batch_size` for this model.
    pub max_batch_size: Option<usize>,
    /// Overrides `inference.batching.max_queue_delay` for this model.
    #[serde(with = "duration::optional")]
    #[schemars(with = "Option<duration::Text>")]
    pub max_queue_delay: Option<Duration>,
    /// Overrides `inference.batching.instances` for this model.
    pub instances: Option<usize>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            backend: "auto".into(),
            ort_dylib_path: String::new(),
            device: "cpu".into(),
            intra_op_threads: 0,
            intra_op_spinning: None,
            prefer_int4: true,
            cache_dir: String::new(),
            cache_max_bytes: 20 << 30,
            batching: Batching::default(),
            queue_capacity: 1024,
            max_sequences: 16,
            prefill_chunk: 256,
            max_kv_tokens: 65536,
            prefix_cache_bytes: 256 << 20,
            max_loras: 4,
            max_cpu_loras: 16,
            models: Vec::new(),
            preload: Vec::new(),
            scheduler_url: String::new(),
            node_id: String::new(),
            advertise_url: String::new(),
            accelerators: Vec::new(),
            cpu_slots_per_core: 4,
            labels: Default::default(),
            cold_start_timeout: Duration::from_secs(300),
            max_waiting_requests: 256,
            training: TrainingConfig::default(),
        }
    }
}

impl InferenceConfig {
    pub(crate) fn cache_dir(&self, data_dir: &std::path::Path) -> PathBuf {
        if self.cache_dir.is_empty() {
            data_dir.join("model-cache")
        } else {
            PathBuf::from(&self.cache_dir)
        }
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The batching of `name`: its own settings over the defaults.
    pub(crate) fn batching_of(&self, name: &str) -> Batching {
        let model = self.model(name);
        Batching {
            max_batch_size: model
                .and_then(|m| m.max_batch_size)
                .unwrap_or(self.batching.max_batch_size),
            max_queue_delay: model
                .and_then(|m| m.max_queue_delay)
                .unwrap_or(self.batching.max_queue_delay),
            instances: model
                .and_then(|m| m.instances)
                .unwrap_or(self.batching.instances),
        }
    }

    pub(crate) fn llm_limits(&self) -> crate::generation::llm::LlmLimits {
        crate::generation::llm::LlmLimits {
            max_batch: self.max_sequences,
            prefill_chunk: self.prefill_chunk,
            max_kv_tokens: self.max_kv_tokens,
            prefix_cache_bytes: self.prefix_cache_bytes,
            queue_capacity: self.queue_capacity,
        }
    }

    /// The LoRA slots of a replica: none unless its deployment takes addons; then the
    /// deployment's `num_peft_device_cached`, else `max_loras`.
    pub(crate) fn lora_slots(&self, enable_addons: bool, num_peft_device_cached: i32) -> usize {
        match (enable_addons, usize::try_from(num_peft_device_cached)) {
            (false, _) => 0,
            (true, Ok(n)) if n > 0 => n,
            (true, _) => self.max_loras,
        }
    }

    /// The configured device.
    pub(crate) fn parsed_device(&self) -> Result<crate::backend::Device, ConfigError> {
        use crate::backend::Device;
        match self.device.as_str() {
            "" | "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|n| *n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "inference.device",
                        format!("must be cpu, cuda or cuda:N, got {other:?}"),
                    )
                }),
        }
    }
}

impl Validate for InferenceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.backend.as_str(), "auto" | "tract" | "onnxruntime") {
            return Err(ConfigError::invalid(
                "inference.backend",
                format!("must be auto, tract or onnxruntime, got {:?}", self.backend),
            ));
        }
        self.parsed_device()?;
        if self.batching.max_batch_size == 0 {
            return Err(ConfigError::invalid(
                "inference.max_batch_size",
                "must be at least 1 (1 turns batching off)",
            ));
        }
        if !(1..=MAX_INSTANCES).contains(&self.batching.instances) {
            return Err(ConfigError::invalid(
                "inference.instances",
                format!(
                    "must be between 1 and {MAX_INSTANCES}, got {}",
                    self.batching.instances
                ),
            ));
        }
        for (field, value) in [
            ("inference.max_sequences", self.max_sequences),
            ("inference.prefill_chunk", self.prefill_chunk),
            ("inference.max_kv_tokens", self.max_kv_tokens),
            ("inference.max_loras", self.max_loras),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(field, "must be positive"));
            }
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::invalid(
                "inference.queue_capacity",
                "must be positive",
            ));
        }
        if self.max_cpu_loras < self.max_loras {
            return Err(ConfigError::invalid(
                "inference.max_cpu_loras",
                format!(
                    "must be at least inference.max_loras ({}), got {}",
                    self.max_loras, self.max_cpu_loras
                ),
            ));
        }
        for (i, a) in self.accelerators.iter().enumerate() {
            if a.parsed_kind().is_none() {
                return Err(ConfigError::invalid(
                    format!("inference.accelerators[{i}].type"),
                    format!(
                        "must be NVIDIA_A100_80GB, NVIDIA_H100_80GB, NVIDIA_H200_141GB, AMD_MI300X_192GB or CPU, got {:?}",
                        a.kind
                    ),
                ));
            }
            if a.count < 1 || a.memory_bytes < 0 {
                return Err(ConfigError::invalid(
                    format!("inference.accelerators[{i}]"),
                    "count must be at least 1 and memory_bytes not negative",
                ));
            }
        }
        if !self.node_id.is_empty() && kiln_core::names::id_problem(&self.node_id).is_some() {
            return Err(ConfigError::invalid(
                "inference.node_id",
                "must be 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
            ));
        }
        for (field, url) in [
            ("inference.scheduler_url", &self.scheduler_url),
            ("inference.advertise_url", &self.advertise_url),
        ] {
            if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    field,
                    format!("must be an http:// or https:// URL, got {url:?}"),
                ));
            }
        }
        if self.cpu_slots_per_core == 0 {
            return Err(ConfigError::invalid(
                "inference.cpu_slots_per_core",
                "must be at least 1",
            ));
        }
        for (i, model) in self.models.iter().enumerate() {
            if kiln_core::names::ChildName::parse("name", "models", &model.name, None).is_err() {
                return Err(ConfigError::invalid(
                    format!("inference.models[{i}].name"),
                    format!(
                        "must be accounts/{{account}}/models/{{model}}, got {:?}",
                        model.name
                    ),
                ));
            }
            if model.max_batch_size == Some(0) {
                return Err(ConfigError::invalid(
                    format!("inference.models[{i}].max_batch_size"),
                    "must be at least 1",
                ));
            }
            if let Some(n) = model.instances
                && !(1..=MAX_INSTANCES).contains(&n)
            {
                return Err(ConfigError::invalid(
                    format!("inference.models[{i}].instances"),
                    format!("must be between 1 and {MAX_INSTANCES}, got {n}"),
                ));
            }
            if !matches!(
                model.backend.as_str(),
                "" | "auto" | "tract" | "onnxruntime"
            ) {
                return Err(ConfigError::invalid(
                    format!("inference.models[{i}].backend"),
                    format!(
                        "must be auto, tract or onnxruntime, got {:?}",
                        model.backend
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_key(config: &InferenceConfig) -> Option<String> {
        match config.validate() {
            Err(ConfigError::Invalid { key, .. }) => Some(key),
            Err(other) => panic!("unexpected error: {other}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn instances_are_bounded_and_a_model_overrides_the_default() {
        let mut config = InferenceConfig::default();
        assert_eq!(invalid_key(&config), None);
        assert_eq!(config.batching_of("any").instances, 1);

        config.batching.instances = 0;
        assert_eq!(invalid_key(&config).as_deref(), Some("inference.instances"));
        config.batching.instances = MAX_INSTANCES + 1;
        assert_eq!(invalid_key(&config).as_deref(), Some("inference.instances"));
        config.batching.instances = 2;

        config.models.push(ModelConfig {
            name: "accounts/kiln/models/m".into(),
            instances: Some(3),
            ..ModelConfig::default()
        });
        assert_eq!(invalid_key(&config), None);
        assert_eq!(config.batching_of("accounts/kiln/models/m").instances, 3);
        assert_eq!(
            config.batching_of("accounts/kiln/models/other").instances,
            2
        );

        config.models[0].instances = Some(0);
        assert_eq!(
            invalid_key(&config).as_deref(),
            Some("inference.models[0].instances")
        );
    }
}
