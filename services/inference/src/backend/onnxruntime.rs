//! ONNX Runtime through the `ort` crate, loading the shared library at run time
//! (`load-dynamic`): the CPU execution provider, and CUDA on NVIDIA devices.
//!
//! The library is found at the configured path, else `ORT_DYLIB_PATH`. When it is missing or
//! does not load, the backend reports itself unavailable with the reason; nothing panics.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::ExecutionProvider as _;
use ort::session::SessionInputValue;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, ValueType};

use super::{
    Backend, BackendError, Device, InPlaceCache, Interface, LoadOptions, Session, TensorInfo,
};
use crate::tensor::{DataType, Tensor, TensorData};

pub(crate) const NAME: &str = "onnxruntime";

/// The process-wide ONNX Runtime environment (the library can be loaded once per process).
static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

pub struct OnnxRuntime {
    library: Option<PathBuf>,
}

impl OnnxRuntime {
    /// `library`: the shared library; `None` uses `ORT_DYLIB_PATH`.
    pub fn new(library: Option<&Path>) -> Self {
        let library = library
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty());
        Self { library }
    }

    fn environment(&self) -> Result<&'static ort::environment::Environment, String> {
        ENVIRONMENT
            .get_or_init(|| {
                let Some(library) = &self.library else {
                    return Err("ONNX Runtime is unavailable: no shared library configured \
                                (set inference.ort_dylib_path or ORT_DYLIB_PATH; \
                                deploy/fetch-assets.sh fetches it)"
                        .into());
                };
                if !library.is_file() {
                    return Err(format!(
                        "ONNX Runtime is unavailable: {} does not exist",
                        library.display()
                    ));
                }
                ort::init_from(library)
                    .map_err(|e| {
                        format!(
                            "ONNX Runtime is unavailable: loading {}: {e}",
                            library.display()
                        )
                    })?
                    .with_name("kiln")
                    .build()
                    .map_err(|e| format!("ONNX Runtime is unavailable: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl Backend for OnnxRuntime {
    fn name(&self) -> &'static str {
        NAME
    }

    fn unavailable(&self, device: Device) -> Option<String> {
        if let Err(why) = self.environment() {
            return Some(why);
        }
        match device {
            Device::Cpu => None,
            Device::Cuda(_) => match ort::ep::CUDA::is_available() {
                Ok(true) => None,
                Ok(false) => Some(
                    "ONNX Runtime's CUDA execution provider is not in the loaded library \
                     (use the onnxruntime-gpu build)"
                        .into(),
                ),
                Err(e) => Some(format!("ONNX Runtime's CUDA execution provider: {e}")),
            },
        }
    }

    fn load(&self, graph: &Path, options: &LoadOptions) -> Result<Box<dyn Session>, BackendError> {
        let environment = self.environment().map_err(|m| BackendError::new(NAME, m))?;
        if let Some(why) = self.unavailable(options.device) {
            return Err(BackendError::new(NAME, why));
        }
        let err =
            |e: ort::Error| BackendError::new(NAME, format!("loading {}: {e}", graph.display()));
        let recover = |e: ort::Error<ort::session::builder::SessionBuilder>| err(e.into());
        let mut builder = ort::session::Session::builder(environment)
            .map_err(err)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(recover)?
            .with_inter_threads(1)
            .map_err(recover)?
            .with_intra_op_spinning(options.spinning)
            .map_err(recover)?
            // Unless told to spin on, stop at the end of a run: the cores go to the server's
            // own work (the answer, the usage record) rather than to threads waiting for the
            // next run.
            .with_config_entry(
                "session.force_spinning_stop",
                if options.spin_after_pass { "0" } else { "1" },
            )
            .map_err(recover)?;
        if options.intra_op_threads > 0 {
            builder = builder
                .with_intra_threads(options.intra_op_threads)
                .map_err(recover)?;
        }
        if let Device::Cuda(ordinal) = options.device {
            // error_on_failure: a CUDA deployment must not quietly fall back to the CPU.
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default()
                    .with_device_id(ordinal)
                    .build()
                    .error_on_failure()])
                .map_err(recover)?;
        }
        let session = builder.commit_from_file(graph).map_err(err)?;
        let describe = |outlet: &ort::value::Outlet| -> Result<TensorInfo, BackendError> {
            match outlet.dtype() {
                ValueType::Tensor { ty, shape, .. } => Ok(TensorInfo {
                    name: outlet.name().to_owned(),
                    dtype: data_type(*ty).map_err(|m| {
                        BackendError::new(NAME, format!("{:?}: {m}", outlet.name()))
                    })?,
                    shape: shape.iter().copied().collect(),
                }),
                other => Err(BackendError::new(
                    NAME,
                    format!("{:?} is a {other}, not a tensor", outlet.name()),
                )),
            }
        };
        let describe_all = |outlets: &[ort::value::Outlet]| -> Result<Vec<_>, BackendError> {
            outlets.iter().map(describe).collect()
        };
        let interface = Interface {
            inputs: describe_all(session.inputs())?,
            outputs: describe_all(session.outputs())?,
        };
        Ok(Box::new(OrtSession {
            session,
            interface,
            resident: Vec::new(),
            cache_names: Vec::new(),
        }))
    }
}

struct OrtSession {
    session: ort::session::Session,
    interface: Interface,
    /// Inputs of every run, converted once (see [`Session::set_resident`]).
    resident: Vec<(String, DynValue)>,
    /// `(past_key_values.N.kind, present.N.kind)` of an in-place run's cache buffers.
    cache_names: Vec<(String, String)>,
}

impl Session for OrtSession {
    fn interface(&self) -> &Interface {
        &self.interface
    }

    fn run(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, BackendError> {
        let fail = |e: ort::Error| BackendError::new(NAME, e.to_string());
        let mut values: Vec<(&str, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len() + self.resident.len());
        let mut owned = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            owned.push((name, to_ort(tensor).map_err(fail)?));
        }
        for (name, value) in &owned {
            values.push((name, value.into()));
        }
        for (name, value) in &self.resident {
            values.push((name, value.into()));
        }
        let outputs = self.session.run(values).map_err(fail)?;
        self.interface
            .outputs
            .iter()
            .map(|info| {
                let value = outputs.get(&info.name).ok_or_else(|| {
                    BackendError::new(NAME, format!("output {:?} is missing", info.name))
                })?;
                from_ort(value).map_err(fail)
            })
            .collect()
    }

    fn runs_in_place(&self) -> bool {
        true
    }

    fn run_in_place(
        &mut self,
        inputs: Vec<(String, Tensor)>,
        cache: InPlaceCache<'_>,
    ) -> Result<(), BackendError> {
        use ort::value::TensorRefMut;
        let fail = |e: ort::Error| BackendError::new(NAME, e.to_string());
        let owned = inputs
            .into_iter()
            .map(|(name, tensor)| Ok((name, to_ort(tensor).map_err(fail)?)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        let values: Vec<(&str, kiln_ort_run::ValuePtr<'_>)> = owned
            .iter()
            .chain(&self.resident)
            .map(|(name, value)| (name.as_str(), value as kiln_ort_run::ValuePtr<'_>))
            .collect();
        let mut views = Vec::with_capacity(cache.buffers.len());
        for buffer in cache.buffers {
            views.push(TensorRefMut::from_array_view_mut((cache.shape, buffer)).map_err(fail)?);
        }
        // The cache's input and output names, built once: this runs every decode step.
        if self.cache_names.len() != views.len() {
            self.cache_names = (0..views.len())
                .map(|i| {
                    let kind = if i % 2 == 0 { "key" } else { "value" };
                    (
                        format!("past_key_values.{}.{kind}", i / 2),
                        format!("present.{}.{kind}", i / 2),
                    )
                })
                .collect();
        }
        let names = &self.cache_names;
        let mut in_place: Vec<kiln_ort_run::InPlace<'_, '_>> = views
            .iter_mut()
            .zip(names)
            .map(|(view, (input, output))| kiln_ort_run::InPlace {
                input,
                output,
                value: view,
            })
            .collect();
        let mut logits =
            TensorRefMut::from_array_view_mut((cache.logits_shape, cache.logits)).map_err(fail)?;
        kiln_ort_run::run_into(
            &mut self.session,
            &values,
            &mut in_place,
            &mut [("logits", &mut logits)],
        )
        .map_err(fail)
    }

    fn set_resident(&mut self, inputs: Vec<(String, Tensor)>) -> Result<(), BackendError> {
        let fail = |e: ort::Error| BackendError::new(NAME, e.to_string());
        self.resident = inputs
            .into_iter()
            .map(|(name, tensor)| Ok((name, to_ort(tensor).map_err(fail)?)))
            .collect::<Result<_, BackendError>>()?;
        Ok(())
    }
}

fn data_type(ty: TensorElementType) -> Result<DataType, String> {
    Ok(match ty {
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        TensorElementType::Int64 => DataType::I64,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int8 => DataType::I8,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Bool => DataType::Bool,
        other => return Err(format!("element type {other} is not supported")),
    })
}

fn to_ort(tensor: Tensor) -> Result<DynValue, ort::Error> {
    use ort::value::Tensor as T;
    let shape = tensor.shape;
    Ok(match tensor.data {
        TensorData::F32(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::F64(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::I64(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::I32(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::I8(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::U8(v) => T::from_array((shape, v))?.into_dyn(),
        TensorData::Bool(v) => T::from_array((shape, v))?.into_dyn(),
    })
}

fn from_ort(value: &DynValue) -> Result<Tensor, ort::Error> {
    fn take<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug>(
        value: &DynValue,
    ) -> Result<(Vec<usize>, Vec<T>), ort::Error> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
    }
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(ort::Error::new(format!(
                "an output is a {other}, not a tensor"
            )));
        }
    };
    let (shape, data) = match ty {
        TensorElementType::Float32 => take::<f32>(value).map(|(s, d)| (s, TensorData::F32(d)))?,
        TensorElementType::Float64 => take::<f64>(value).map(|(s, d)| (s, TensorData::F64(d)))?,
        TensorElementType::Int64 => take::<i64>(value).map(|(s, d)| (s, TensorData::I64(d)))?,
        TensorElementType::Int32 => take::<i32>(value).map(|(s, d)| (s, TensorData::I32(d)))?,
        TensorElementType::Int8 => take::<i8>(value).map(|(s, d)| (s, TensorData::I8(d)))?,
        TensorElementType::Uint8 => take::<u8>(value).map(|(s, d)| (s, TensorData::U8(d)))?,
        TensorElementType::Bool => take::<bool>(value).map(|(s, d)| (s, TensorData::Bool(d)))?,
        other => {
            return Err(ort::Error::new(format!(
                "output element type {other} is not supported"
            )));
        }
    };
    Ok(Tensor { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test in this binary that touches the process-wide environment.
    #[test]
    fn a_missing_library_makes_the_backend_unavailable_with_the_reason() {
        let backend = OnnxRuntime::new(Some(Path::new("/nonexistent/libonnxruntime.so")));
        let why = backend.unavailable(Device::Cpu).expect("unavailable");
        assert!(
            why.contains("/nonexistent/libonnxruntime.so does not exist"),
            "{why}"
        );
        let err = backend
            .load(Path::new("model.onnx"), &LoadOptions::default())
            .err()
            .expect("load refused");
        assert!(
            err.to_string()
                .starts_with("onnxruntime: ONNX Runtime is unavailable"),
            "{err}"
        );
    }
}
