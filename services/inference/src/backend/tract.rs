//! tract: pure Rust, CPU only, always available.
//!
//! tract's shape analysis of exported transformer graphs can be wrong with symbolic batch and
//! sequence dimensions (MiniLM's attention mask is inferred `[batch, 1, seq, seq]` but is
//! `[batch, 1, 1, seq]`), so a plan is optimised for each concrete set of input shapes and
//! kept, the most recently used [`PLANS`] of them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoTValue, TValue,
    TVec, Tensor as TractTensor, TypedRunnableModel, tvec,
};

/// Plans kept per session (one per distinct set of input shapes).
const PLANS: usize = 32;

use super::{Backend, BackendError, Device, Interface, LoadOptions, Session, TensorInfo};
use crate::tensor::{DataType, Tensor, TensorData};

pub const NAME: &str = "tract";

pub struct Tract;

impl Backend for Tract {
    fn name(&self) -> &'static str {
        NAME
    }

    fn unavailable(&self, device: Device) -> Option<String> {
        match device {
            Device::Cpu => None,
            Device::Cuda(_) => Some("tract runs on CPU only, not on CUDA devices".into()),
        }
    }

    fn load(&self, graph: &Path, options: &LoadOptions) -> Result<Box<dyn Session>, BackendError> {
        if let Some(why) = self.unavailable(options.device) {
            return Err(BackendError::new(NAME, why));
        }
        let err = |e: tract_onnx::prelude::TractError| {
            BackendError::new(NAME, format!("loading {}: {e:#}", graph.display()))
        };
        // Exported graphs often carry intermediate shape annotations tract disagrees with;
        // it infers them itself.
        let parsed = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(graph)
            .map_err(err)?;
        // The symbolic model, typed (not optimised: runs use plans for concrete shapes), gives
        // the interface.
        let model = parsed.clone().into_typed().map_err(err)?;
        let describe = |name: String, fact: &tract_onnx::prelude::TypedFact| {
            Ok(TensorInfo {
                name,
                dtype: data_type(fact.datum_type).map_err(|m| BackendError::new(NAME, m))?,
                shape: fact
                    .shape
                    .iter()
                    .map(|d| d.to_i64().unwrap_or(-1))
                    .collect(),
            })
        };
        let mut inputs = Vec::new();
        for (ix, outlet) in model.input_outlets().map_err(err)?.iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            inputs.push(describe(name, model.input_fact(ix).map_err(err)?)?);
        }
        let mut outputs = Vec::new();
        for outlet in model.output_outlets().map_err(err)? {
            let name = model
                .outlet_label(*outlet)
                .map(str::to_owned)
                .unwrap_or_else(|| model.node(outlet.node).name.clone());
            outputs.push(describe(name, model.outlet_fact(*outlet).map_err(err)?)?);
        }
        Ok(Box::new(TractSession {
            model: parsed,
            plans: HashMap::new(),
            runs: 0,
            interface: Interface { inputs, outputs },
        }))
    }
}

struct TractSession {
    model: InferenceModel,
    /// Plans by input shapes, with the run count at their last use.
    plans: HashMap<Vec<Vec<usize>>, (Arc<TypedRunnableModel>, u64)>,
    runs: u64,
    interface: Interface,
}

impl Session for TractSession {
    fn interface(&self) -> &Interface {
        &self.interface
    }

    fn run(&mut self, mut inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, BackendError> {
        let mut values: TVec<TValue> = tvec![];
        let mut shapes = Vec::with_capacity(self.interface.inputs.len());
        for info in &self.interface.inputs {
            let at = inputs
                .iter()
                .position(|(name, _)| *name == info.name)
                .ok_or_else(|| {
                    BackendError::new(NAME, format!("input {:?} is missing", info.name))
                })?;
            let (_, tensor) = inputs.swap_remove(at);
            shapes.push(tensor.shape.clone());
            values.push(to_tract(tensor)?.into_tvalue());
        }
        let plan = self.plan(shapes, &values)?;
        let outputs = plan
            .run(values)
            .map_err(|e| BackendError::new(NAME, format!("{e:#}")))?;
        outputs.into_iter().map(|v| from_tract(&v)).collect()
    }
}

impl TractSession {
    /// The plan for these input shapes, optimised on first use.
    fn plan(
        &mut self,
        shapes: Vec<Vec<usize>>,
        values: &[TValue],
    ) -> Result<Arc<TypedRunnableModel>, BackendError> {
        self.runs += 1;
        if let Some((plan, used)) = self.plans.get_mut(&shapes) {
            *used = self.runs;
            return Ok(plan.clone());
        }
        let err = |e: tract_onnx::prelude::TractError| BackendError::new(NAME, format!("{e:#}"));
        let mut model = self.model.clone();
        for (ix, value) in values.iter().enumerate() {
            model
                .set_input_fact(
                    ix,
                    InferenceFact::dt_shape(value.datum_type(), value.shape()),
                )
                .map_err(err)?;
        }
        let plan =
            tract_onnx::prelude::IntoRunnable::into_runnable(model.into_optimized().map_err(err)?)
                .map_err(err)?;
        if self.plans.len() >= PLANS
            && let Some(oldest) = self
                .plans
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            self.plans.remove(&oldest);
        }
        self.plans.insert(shapes, (plan.clone(), self.runs));
        Ok(plan)
    }
}

fn data_type(dt: DatumType) -> Result<DataType, String> {
    Ok(match dt {
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        DatumType::I64 => DataType::I64,
        DatumType::I32 => DataType::I32,
        DatumType::I8 => DataType::I8,
        DatumType::U8 => DataType::U8,
        DatumType::Bool => DataType::Bool,
        other => return Err(format!("element type {other:?} is not supported")),
    })
}

fn to_tract(tensor: Tensor) -> Result<TractTensor, BackendError> {
    let shape = &tensor.shape;
    let made = match &tensor.data {
        TensorData::F32(v) => TractTensor::from_shape(shape, v),
        TensorData::F64(v) => TractTensor::from_shape(shape, v),
        TensorData::I64(v) => TractTensor::from_shape(shape, v),
        TensorData::I32(v) => TractTensor::from_shape(shape, v),
        TensorData::I8(v) => TractTensor::from_shape(shape, v),
        TensorData::U8(v) => TractTensor::from_shape(shape, v),
        TensorData::Bool(v) => TractTensor::from_shape(shape, v),
    };
    made.map_err(|e| BackendError::new(NAME, format!("{e:#}")))
}

fn from_tract(value: &TractTensor) -> Result<Tensor, BackendError> {
    fn collect<T: tract_onnx::prelude::Datum + Copy>(
        value: &TractTensor,
    ) -> Result<Vec<T>, BackendError> {
        Ok(value
            .to_plain_array_view::<T>()
            .map_err(|e| BackendError::new(NAME, format!("{e:#}")))?
            .iter()
            .copied()
            .collect())
    }
    let data = match value.datum_type() {
        DatumType::F32 => TensorData::F32(collect(value)?),
        DatumType::F64 => TensorData::F64(collect(value)?),
        DatumType::I64 => TensorData::I64(collect(value)?),
        DatumType::I32 => TensorData::I32(collect(value)?),
        DatumType::I8 => TensorData::I8(collect(value)?),
        DatumType::U8 => TensorData::U8(collect(value)?),
        DatumType::Bool => TensorData::Bool(collect(value)?),
        other => {
            return Err(BackendError::new(
                NAME,
                format!("output of type {other:?} is not supported"),
            ));
        }
    };
    Ok(Tensor {
        shape: value.shape().to_vec(),
        data,
    })
}
