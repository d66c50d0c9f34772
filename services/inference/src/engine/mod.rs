//! The engine: resolves a request's model string to a loaded model, loading it on first use
//! (bundle from the cache, session from the chosen backend, a runner thread for batching).

mod addons;
mod training;
pub(crate) use training::CHECKPOINT;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_core::auth::Principal;
use kiln_core::names::ChildName;
use kiln_formats::Manifest;
use kiln_proto::registry::v1::{Model, model};
use tokenizers::Tokenizer;
use tokio::sync::Mutex;

use crate::backend::{Backends, Device, LoadOptions, TensorInfo};
use crate::bundle::{Bundle, BundleCache};
use crate::config::InferenceConfig;
use crate::generation::llm::{Llm, LlmShape, LoraOptions};
use crate::runner::{Dispatch, Runner, SubmitError};
use crate::source::ModelSource;
use crate::tensor::Tensor;
use addons::AdapterCache;
pub use addons::{with_lora_slots, with_merged_adapter};
use kiln_core::{Error, Result};

/// What a loaded model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Embedding,
    TextGeneration,
    Tensor,
}

impl Task {
    /// The manifest's task, else what the graph's interface says.
    fn of(manifest: &Manifest, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Self {
        match manifest.task.as_str() {
            "embedding" => return Task::Embedding,
            "text-generation" => return Task::TextGeneration,
            "tensor" => return Task::Tensor,
            _ => {}
        }
        let has_in = |n: &str| inputs.iter().any(|t| t.name == n);
        let has_out = |n: &str| outputs.iter().any(|t| t.name == n);
        if has_in("input_ids") && has_out("logits") {
            Task::TextGeneration
        } else if has_in("input_ids")
            && has_in("attention_mask")
            && [
                "last_hidden_state",
                "token_embeddings",
                "sentence_embedding",
            ]
            .iter()
            .any(|n| has_out(n))
        {
            Task::Embedding
        } else {
            Task::Tensor
        }
    }
}

/// How a loaded model runs: a batching runner for embedding and tensor models, a generation
/// loop for text-generation models.
pub enum Serving {
    Tensor(Runner),
    Llm(Llm),
}

/// A model ready to serve.
pub struct LoadedModel {
    /// accounts/{account}/models/{model}
    pub name: String,
    pub account: String,
    pub public: bool,
    pub task: Task,
    pub backend: &'static str,
    pub serving: Serving,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub manifest: Manifest,
    bundle_dir: PathBuf,
}

impl LoadedModel {
    /// The batching runner of an embedding or tensor model.
    pub fn runner(&self) -> Result<&Runner> {
        match &self.serving {
            Serving::Tensor(runner) => Ok(runner),
            Serving::Llm(_) => Err(Error::invalid(
                "model",
                format!(
                    "{} is a text-generation model (completions and chat completions)",
                    self.name
                ),
            )),
        }
    }

    /// The generation loop of a text-generation model.
    pub fn llm(&self) -> Option<&Llm> {
        match &self.serving {
            Serving::Llm(llm) => Some(llm),
            Serving::Tensor(_) => None,
        }
    }

    /// Runs one job through the batcher (`pad`, `dispatch`: see [`Runner::submit`]).
    pub async fn run(
        &self,
        inputs: Vec<(String, Tensor)>,
        pad: bool,
        dispatch: Dispatch,
    ) -> Result<Vec<Tensor>> {
        match self.runner()?.submit(inputs, pad, dispatch).await {
            Ok(outputs) => Ok(outputs?),
            Err(SubmitError::Full) => Err(Error::Unavailable(format!(
                "{} has too many requests waiting; retry shortly",
                self.name
            ))),
            Err(SubmitError::Stopped) => {
                Err(Error::Internal(format!("{} stopped serving", self.name)))
            }
        }
    }

    /// Whether `caller` may use it: its own account's models, and public ones.
    pub(crate) fn visible_to(&self, caller: &Principal) -> bool {
        self.public || caller.can_access(&self.account)
    }
}

/// A model's place in the engine: empty until it loads; its lock held while it loads.
type Slot = Arc<Mutex<Option<Arc<LoadedModel>>>>;

/// How a replica serves its model: on which backend (`""` or `"auto"`: the node's choice),
/// and with how many LoRA adapter slots (0: the graph as prepared, without slots). A model
/// loads once per variant it is served as.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Variant {
    pub(crate) backend: String,
    pub(crate) lora_slots: usize,
}

impl Variant {
    fn key(&self) -> Self {
        Self {
            backend: if self.backend == "auto" {
                String::new()
            } else {
                self.backend.clone()
            },
            lora_slots: self.lora_slots,
        }
    }
}

/// Loaded models by name and backend ("": the node's choice), each behind its own lock so
/// loads of different models overlap and concurrent first requests for one model load it
/// once.
pub struct Engine {
    config: InferenceConfig,
    device: Device,
    backends: Backends,
    cache: BundleCache,
    source: Arc<dyn ModelSource>,
    models: std::sync::Mutex<HashMap<(String, Variant), Slot>>,
    adapters: std::sync::Mutex<AdapterCache>,
}

impl Engine {
    pub fn new(
        config: InferenceConfig,
        data_dir: &std::path::Path,
        backends: Backends,
        source: Arc<dyn ModelSource>,
    ) -> Result<Self> {
        let device = config
            .parsed_device()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let cache = BundleCache::new(config.cache_dir(data_dir), config.cache_max_bytes);
        let adapters = std::sync::Mutex::new(AdapterCache::new(config.max_cpu_loras));
        Ok(Self {
            adapters,
            config,
            device,
            backends,
            cache,
            source,
            models: Default::default(),
        })
    }

    pub(crate) fn config(&self) -> &InferenceConfig {
        &self.config
    }

    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    pub(crate) fn device(&self) -> Device {
        self.device
    }

    /// The model a request names, loaded, if `caller` may use it. `field` names the request
    /// field in errors.
    pub async fn model(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<Arc<LoadedModel>> {
        self.model_on(caller, field, name, &Variant::default())
            .await
    }

    /// [`Engine::model`] served as a replica's [`Variant`].
    pub(crate) async fn model_on(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
        variant: &Variant,
    ) -> Result<Arc<LoadedModel>> {
        let model_name = resolve(field, name)?;
        let variant = variant.key();
        let slot = self
            .models
            .lock()
            .expect("models")
            .entry((model_name.clone(), variant.clone()))
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(loaded) = slot.as_ref() {
            return if loaded.visible_to(caller) {
                Ok(loaded.clone())
            } else {
                Err(Error::not_found(name))
            };
        }
        let loaded = Arc::new(self.load(caller, name, &model_name, &variant).await?);
        *slot = Some(loaded.clone());
        Ok(loaded)
    }

    /// The backend for `name`: the one asked for, else the model's own setting, else the
    /// node's, on the node's device.
    fn backend_for(&self, name: &str, asked: &str) -> Result<Arc<dyn crate::backend::Backend>> {
        let preferred = Some(asked)
            .filter(|b| !b.is_empty())
            .or_else(|| {
                self.config
                    .model(name)
                    .map(|m| m.backend.as_str())
                    .filter(|b| !b.is_empty())
            })
            .unwrap_or(&self.config.backend);
        self.backends
            .choose(Some(preferred), self.device)
            .map_err(|why| Error::FailedPrecondition(format!("cannot serve {name}: {why}")))
    }

    async fn load(
        &self,
        caller: &Principal,
        requested: &str,
        name: &str,
        variant: &Variant,
    ) -> Result<LoadedModel> {
        let backend = self.backend_for(name, &variant.backend)?;
        if variant.lora_slots > 0 && backend.name() != crate::backend::onnxruntime::NAME {
            return Err(Error::FailedPrecondition(format!(
                "cannot serve {name} with LoRA addons on {}: LoRA slots run on onnxruntime",
                backend.name()
            )));
        }
        let local = self.config.model(name).filter(|m| !m.path.is_empty());
        // Bundles in blocks (INT4, MatMulNBits) run on ONNX Runtime only, and on the CPU: their
        // graph attends with GroupQueryAttention in float32, which ONNX Runtime's CUDA
        // provider does not run (it takes float16 there).
        let blocks_ok = self.config.prefer_int4
            && backend.name() == crate::backend::onnxruntime::NAME
            && self.device == Device::Cpu;
        let mut merge = None;
        let (bundle, account, public) = match local {
            Some(local) => {
                let bundle = Bundle::open(std::path::Path::new(&local.path), Manifest::default())?;
                let account = ChildName::parse("model", "models", name, None)?.account;
                (bundle, account, false)
            }
            None => {
                let model = match self.source.get_model(name).await {
                    Ok(model) => model,
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        return Err(Error::not_found(requested));
                    }
                    Err(e) => return Err(e),
                };
                let account = ChildName::parse("model", "models", &model.name, None)?.account;
                if !(model.public || caller.can_access(&account)) {
                    return Err(Error::not_found(requested));
                }
                if model.kind == model::Kind::LoraAddon as i32 {
                    // Live merge: the addon served as a model of its own, on its base's bundle.
                    let (bundle, adapter) = self.merge_sources(&model, blocks_ok).await?;
                    merge = Some(adapter);
                    (bundle, account, model.public)
                } else {
                    check_servable(&model)?;
                    let bundle = self
                        .cache
                        .fetch(self.source.as_ref(), &model, blocks_ok)
                        .await?;
                    (bundle, account, model.public)
                }
            }
        };
        let loaded = self
            .open_bundle(
                name,
                backend,
                bundle.clone(),
                account,
                public,
                LoraOptions {
                    slots: variant.lora_slots,
                    pinned: merge,
                },
            )
            .await;
        if loaded.is_err() {
            self.cache.unpin(&bundle.dir);
        }
        loaded
    }

    async fn open_bundle(
        &self,
        name: &str,
        backend: Arc<dyn crate::backend::Backend>,
        bundle: Bundle,
        account: String,
        public: bool,
        mut lora: LoraOptions,
    ) -> Result<LoadedModel> {
        let mut graph = bundle.graph()?;
        let generation = bundle.manifest.task == "text-generation";
        if (lora.slots > 0 || lora.pinned.is_some()) && !generation {
            return Err(Error::FailedPrecondition(format!(
                "{name} is not a text-generation model: it takes no LoRA addons"
            )));
        }
        if let Some(adapter) = lora.pinned.take() {
            // The adapter every row goes through (live merge): float weights take the update;
            // a graph in blocks serves it pinned in a LoRA slot instead.
            let (base, for_merge) = (graph.clone(), adapter.clone());
            let merged =
                tokio::task::spawn_blocking(move || with_merged_adapter(&base, &for_merge))
                    .await
                    .map_err(|e| Error::Internal(format!("merging {name}: {e}")))??;
            match merged {
                Some(merged) => graph = merged,
                None => {
                    lora.pinned = Some(adapter);
                    lora.slots = lora.slots.max(1);
                }
            }
        }
        if lora.slots > 0 {
            graph = tokio::task::spawn_blocking(move || with_lora_slots(&graph))
                .await
                .map_err(|e| Error::Internal(format!("adding LoRA slots to {name}: {e}")))??;
        }
        let spinning = self.config.intra_op_spinning.unwrap_or(true);
        let options = LoadOptions {
            device: self.device,
            intra_op_threads: self.config.intra_op_threads,
            // Workers spin within a pass (spinning for text generation too measured 1-stream
            // decode 136-153 -> 182-193 tokens/s: 2 cores, the fused 4-bit graph's 789
            // operators each waking the workers otherwise).
            spinning,
            // A text-generation model's workers stop at a pass's end, so the token streaming
            // between decode steps keeps the cores. An embedding or tensor model's spin on,
            // awake for the next request: a 16-token MiniLM embedding over gRPC measured p50
            // 4.65-5.26 -> 3.71-3.84 ms (2 cores; its workers slept through every wait between
            // requests otherwise).
            spin_after_pass: spinning && !generation,
        };
        let tokenizer_path = bundle.tokenizer();
        let started = std::time::Instant::now();
        let batching = self.config.batching_of(name);
        // A text-generation model is one instance (its decode loop batches sequences).
        let instances = if generation { 1 } else { batching.instances };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = match self.config.intra_op_threads {
            0 => cores,
            n => n,
        };
        if instances > 1 && instances * threads > cores {
            // Instances that together want more threads than there are cores slow each other.
            tracing::warn!(
                model = name,
                instances,
                intra_op_threads = threads,
                cores,
                "the model's instances want more threads than the node has cores: \
                 set inference.intra_op_threads to at most cores / instances"
            );
        }
        let (session, mut copies, tokenizer) = tokio::task::spawn_blocking({
            let backend = backend.clone();
            move || -> Result<_> {
                let session = backend.load(&graph, &options)?;
                let copies = (1..instances)
                    .map(|_| backend.load(&graph, &options))
                    .collect::<Result<Vec<_>, _>>()?;
                let tokenizer = tokenizer_path.map(|p| load_tokenizer(&p)).transpose()?;
                Ok((session, copies, tokenizer))
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("loading {name}: {e}")))??;
        let task = Task::of(&bundle.manifest, session.inputs(), session.outputs());
        if matches!(task, Task::Embedding | Task::TextGeneration) && tokenizer.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "{name} has no tokenizer.json, which its {task:?} task needs"
            )));
        }
        let serving = if task == Task::TextGeneration {
            let tokenizer = Arc::new(tokenizer.clone().expect("checked above"));
            let shape = llm_shape(&bundle.manifest, session.inputs(), &tokenizer)?;
            Serving::Llm(Llm::start(
                name,
                session,
                shape,
                tokenizer,
                self.config.llm_limits(),
                lora,
            )?)
        } else {
            let mut sessions = vec![session];
            sessions.append(&mut copies);
            Serving::Tensor(Runner::start(
                name,
                sessions,
                batching,
                self.config.queue_capacity,
            )?)
        };
        tracing::info!(
            model = name,
            backend = backend.name(),
            ?task,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(LoadedModel {
            name: name.to_owned(),
            account,
            public,
            task,
            backend: backend.name(),
            serving,
            tokenizer: tokenizer.map(Arc::new),
            manifest: bundle.manifest,
            bundle_dir: bundle.dir,
        })
    }

    /// Drops model `name` served as `variant` (as given to [`Engine::model_on`]).
    pub(crate) async fn unload(&self, name: &str, variant: &Variant) {
        let slot = self
            .models
            .lock()
            .expect("models")
            .remove(&(name.to_owned(), variant.key()));
        if let Some(slot) = slot
            && let Some(loaded) = slot.lock().await.take()
        {
            self.cache.unpin(&loaded.bundle_dir);
        }
    }
}

/// The cache shape of a decoder-with-past graph (from its `past_key_values.N.key` inputs),
/// its context length and end-of-sequence tokens (from the manifest, else the tokenizer's
/// usual names).
fn llm_shape(
    manifest: &Manifest,
    inputs: &[TensorInfo],
    tokenizer: &Tokenizer,
) -> Result<LlmShape> {
    let pasts: Vec<&TensorInfo> = inputs
        .iter()
        .filter(|t| t.name.starts_with("past_key_values.") && t.name.ends_with(".key"))
        .collect();
    let Some(first) = pasts.first() else {
        return Err(Error::FailedPrecondition(
            "the graph has no past_key_values.N.key inputs (it must be a decoder with past)".into(),
        ));
    };
    let dim = |i: usize| {
        first
            .shape
            .get(i)
            .copied()
            .filter(|d| *d > 0)
            .map(|d| d as usize)
    };
    let (Some(kv_heads), Some(head_dim)) = (dim(1), dim(3)) else {
        return Err(Error::FailedPrecondition(format!(
            "input {} must have fixed heads and head size, has {:?}",
            first.name, first.shape
        )));
    };
    let mut eos: Vec<u32> = manifest.eos_token_id.into_iter().collect();
    for &id in &manifest.eos_token_ids {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    for name in ["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"] {
        if eos.is_empty()
            && let Some(id) = tokenizer.token_to_id(name)
        {
            eos.push(id);
        }
    }
    Ok(LlmShape {
        layers: pasts.len(),
        kv_heads,
        head_dim,
        context_length: usize::try_from(manifest.context_length)
            .ok()
            .filter(|c| *c > 0)
            .unwrap_or(2048),
        eos,
        kv_in_place: manifest.kv_in_place,
    })
}

/// The model a request's model string names. Until the scheduler serves deployments, a model
/// name is served directly; deployed models and `model#deployment` forms are unknown.
fn resolve(field: &str, name: &str) -> Result<String> {
    if name.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if name.contains('#') || name.contains("/deployedModels/") {
        return Err(Error::not_found(name));
    }
    let parsed = ChildName::parse(field, "models", name, None)?;
    Ok(format!("accounts/{}/models/{}", parsed.account, parsed.id))
}

fn check_servable(model: &Model) -> Result<()> {
    if model.state != model::State::Ready as i32 {
        return Err(Error::FailedPrecondition(format!(
            "model {} is not READY",
            model.name
        )));
    }
    if model.kind == model::Kind::LoraAddon as i32 {
        return Err(Error::FailedPrecondition(format!(
            "model {} is a LoRA addon: it is served on a deployment of its base model",
            model.name
        )));
    }
    Ok(())
}

/// Loads `tokenizer.json` with its fixed padding and truncation off: the engine pads batches
/// itself and decides about over-long inputs.
pub fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| {
        Error::FailedPrecondition(format!("{}: not a valid tokenizer: {e}", path.display()))
    })?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    Ok(tokenizer)
}
