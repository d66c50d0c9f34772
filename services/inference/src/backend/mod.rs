//! Backends run ONNX graphs. Each is a plugin behind [`Backend`], registered by name in
//! [`Backends`]; a deployment picks one from its accelerator and precision (see
//! [`Backends::choose`]), and config can override the choice.

pub(crate) mod onnxruntime;
mod tract;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::tensor::{DataType, Tensor};

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// An NVIDIA GPU by ordinal (CUDA).
    Cuda(i32),
}

/// How a backend should load a graph.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoadOptions {
    pub device: Device,
    /// Threads one forward pass may use (0: the backend's default).
    pub intra_op_threads: usize,
    /// Let idle worker threads spin between the operators of a pass: a pass of many small
    /// operators would otherwise wake them for each.
    pub spinning: bool,
    /// With `spinning`, let them spin on after a pass too, ready for the next one (ONNX
    /// Runtime's own default; about 30 ms of one core after a lone pass, measured on 2
    /// cores): a request's pass then starts with its workers awake, but a spinning thread
    /// takes a core from other work meanwhile (token streaming between decode steps, on a
    /// small machine).
    pub spin_after_pass: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            intra_op_threads: 0,
            spinning: true,
            spin_after_pass: false,
        }
    }
}

/// A graph input or output as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DataType,
    /// -1 for a dynamic dimension.
    pub shape: Vec<i64>,
}

/// A loaded graph's inputs and outputs, in the order the graph declares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

/// What a backend reports when it fails: shown to the caller as INTERNAL with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{backend}: {message}")]
pub struct BackendError {
    pub backend: &'static str,
    pub message: String,
}

/// A backend's failure reaches the caller with its message: it is about the model and its
/// input, not about the service.
impl From<BackendError> for kiln_core::Error {
    fn from(err: BackendError) -> Self {
        kiln_core::Error::ModelFailed(err.to_string())
    }
}

impl BackendError {
    pub fn new(backend: &'static str, message: impl std::fmt::Display) -> Self {
        Self {
            backend,
            message: message.to_string(),
        }
    }
}

/// A runtime that can load ONNX graphs.
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Why this backend cannot run on `device` (its library is missing, no CUDA…), or `None`.
    fn unavailable(&self, device: Device) -> Option<String>;
    fn load(&self, graph: &Path, options: &LoadOptions) -> Result<Box<dyn Session>, BackendError>;
}

/// The key/value cache of a run that updates it in place (see [`Session::run_in_place`]).
pub struct InPlaceCache<'a> {
    /// `past_key_values.N.key`, then `.value`, for every layer N in order: each
    /// `[rows, kv_heads, capacity, head_dim]` row-major, each also the graph's `present.N.*`.
    pub buffers: Vec<&'a mut [f32]>,
    pub shape: [usize; 4],
    /// Where the logits go, `[rows, seq, vocab]` row-major.
    pub logits: &'a mut [f32],
    pub logits_shape: [usize; 3],
}

/// A loaded graph. Runs are serialised by the caller (one batch at a time).
pub trait Session: Send + 'static {
    fn interface(&self) -> &Interface;
    fn inputs(&self) -> &[TensorInfo] {
        &self.interface().inputs
    }
    fn outputs(&self) -> &[TensorInfo] {
        &self.interface().outputs
    }
    /// Runs the graph on named inputs; returns every output, in [`Session::outputs`] order.
    fn run(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, BackendError>;
    /// Whether [`Session::run_in_place`] works.
    fn runs_in_place(&self) -> bool {
        false
    }
    /// Runs a decoder whose presents are its pasts appended in place (a graph with
    /// `kv_in_place`): the cache stays in the caller's buffers, neither copied in nor out, and
    /// the logits are written into the caller's buffer. Backends that cannot refuse.
    fn run_in_place(
        &mut self,
        inputs: Vec<(String, Tensor)>,
        cache: InPlaceCache<'_>,
    ) -> Result<(), BackendError> {
        let _ = (inputs, cache);
        Err(BackendError::new(
            "session",
            "this backend does not run with the key/value cache in place",
        ))
    }
    /// Inputs fed to every run from now on, until replaced (a generation loop's LoRA slot
    /// matrices): a backend keeps them in its own form, so a run neither copies nor converts
    /// them. Backends that cannot refuse.
    fn set_resident(&mut self, inputs: Vec<(String, Tensor)>) -> Result<(), BackendError> {
        let _ = inputs;
        Err(BackendError::new(
            "session",
            "this backend does not keep resident inputs (LoRA slots run on onnxruntime)",
        ))
    }
}

/// The backends of this process, by name.
#[derive(Clone, Default)]
pub struct Backends(BTreeMap<&'static str, Arc<dyn Backend>>);

impl Backends {
    /// tract always; ONNX Runtime from `ort_dylib_path` (or `ORT_DYLIB_PATH`) when given.
    pub fn standard(ort_dylib_path: Option<&Path>) -> Self {
        let mut backends = Self::default();
        backends.register(Arc::new(tract::Tract));
        backends.register(Arc::new(onnxruntime::OnnxRuntime::new(ort_dylib_path)));
        backends
    }

    pub(crate) fn register(&mut self, backend: Arc<dyn Backend>) {
        self.0.insert(backend.name(), backend);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Backend>> {
        self.0.get(name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.keys().copied().collect()
    }

    /// The backend for a device: the named one when `preferred` is set; otherwise ONNX
    /// Runtime when it can run there (faster; the only one with CUDA) and tract on CPU when
    /// it cannot. The error says why nothing fits.
    pub fn choose(
        &self,
        preferred: Option<&str>,
        device: Device,
    ) -> Result<Arc<dyn Backend>, String> {
        if let Some(name) = preferred.filter(|n| !n.is_empty() && *n != "auto") {
            let backend = self.get(name).ok_or_else(|| {
                format!(
                    "no backend named {name:?} (this node has {})",
                    self.names().join(", ")
                )
            })?;
            if let Some(why) = backend.unavailable(device) {
                return Err(why);
            }
            return Ok(backend.clone());
        }
        let mut reasons = Vec::new();
        for name in [onnxruntime::NAME, tract::NAME] {
            let Some(backend) = self.get(name) else {
                continue;
            };
            match backend.unavailable(device) {
                None => return Ok(backend.clone()),
                Some(why) => reasons.push(why),
            }
        }
        Err(reasons.join("; "))
    }
}
