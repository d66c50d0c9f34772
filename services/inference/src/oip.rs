//! The Open Inference Protocol v2 (`inference.GRPCInferenceService`) over the engine: any
//! loaded ONNX model as a tensor model. Answers carry tensors in `raw_output_contents`
//! (little-endian, row-major), as Triton does; requests may use typed contents or raw bytes.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_proto::inference::model_infer_request::InferInputTensor;
use kiln_proto::inference::model_infer_response::InferOutputTensor;
use kiln_proto::inference::model_metadata_response::TensorMetadata;
use kiln_proto::inference::*;
use tonic::{Request, Response};

use crate::backend::TensorInfo;
use crate::engine::LoadedModel;
use crate::router::{Target, forward, peer_status};
use crate::runner::Dispatch;
use crate::service::{Inference, Reply, caller};
use crate::tensor::{DataType, Tensor, TensorData};
use crate::usage::Usage;
use kiln_core::Result;
use kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;

/// The one version every model has.
const VERSION: &str = "1";

impl Inference {
    pub(crate) async fn model_infer(
        &self,
        caller: &Principal,
        served: crate::router::Served,
        request: ModelInferRequest,
    ) -> Result<ModelInferResponse> {
        let start_micros = kiln_core::time::now_micros();
        check_version("model_version", &request.model_version)?;
        let model = served.model;
        let inputs = decode_inputs(&model, &request)?;
        let wanted = requested_outputs(&model, &request)?;
        // Written down while the model runs; billed once the answer is ready.
        let usage = self.usage.reserve(
            caller,
            Usage {
                request_id: if request.id.is_empty() {
                    format!("infer-{}", uuid::Uuid::now_v7().simple())
                } else {
                    request.id.clone()
                },
                model: model.name.clone(),
                api: "model_infer",
                start_micros,
                route: served.route,
                ..Default::default()
            },
        )?;
        let outputs = model.run(inputs, false, Dispatch::Alone).await?;
        let mut response = ModelInferResponse {
            model_name: request.model_name.clone(),
            model_version: VERSION.into(),
            id: request.id.clone(),
            ..Default::default()
        };
        for (info, tensor) in model.runner()?.outputs().iter().zip(outputs) {
            if !wanted.is_empty() && !wanted.contains(&info.name.as_str()) {
                continue;
            }
            response.outputs.push(InferOutputTensor {
                name: info.name.clone(),
                datatype: tensor.dtype().oip_name().into(),
                shape: tensor.shape.iter().map(|&d| d as i64).collect(),
                ..Default::default()
            });
            response
                .raw_output_contents
                .push(encode_raw(&tensor.data).into());
        }
        usage.confirm();
        Ok(response)
    }
}

fn check_version(field: &str, version: &str) -> Result<()> {
    if version.is_empty() || version == VERSION {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("models have one version, \"{VERSION}\"; got {version:?}"),
        ))
    }
}

fn names(infos: &[TensorInfo]) -> String {
    infos
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn requested_outputs<'a>(
    model: &LoadedModel,
    request: &'a ModelInferRequest,
) -> Result<Vec<&'a str>> {
    let outputs = model.runner()?.outputs();
    for (i, wanted) in request.outputs.iter().enumerate() {
        if !outputs.iter().any(|t| t.name == wanted.name) {
            return Err(Error::invalid(
                format!("outputs[{i}].name"),
                format!(
                    "{:?} is not an output of {} (its outputs: {})",
                    wanted.name,
                    model.name,
                    names(outputs)
                ),
            ));
        }
    }
    Ok(request.outputs.iter().map(|o| o.name.as_str()).collect())
}

/// The request's tensors, checked against the model's inputs: every input present once, of
/// its type, rank and fixed dimensions, with as many elements as its shape says.
fn decode_inputs(
    model: &LoadedModel,
    request: &ModelInferRequest,
) -> Result<Vec<(String, Tensor)>> {
    decode_tensors(model.runner()?.inputs(), &model.name, request)
}

/// [`decode_inputs`] against the declared inputs of model `model`.
pub(crate) fn decode_tensors(
    declared: &[TensorInfo],
    model: &str,
    request: &ModelInferRequest,
) -> Result<Vec<(String, Tensor)>> {
    let raw = &request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(Error::invalid(
            "raw_input_contents",
            format!(
                "holds {} tensors for {} inputs",
                raw.len(),
                request.inputs.len()
            ),
        ));
    }
    let mut decoded = Vec::with_capacity(declared.len());
    for (i, input) in request.inputs.iter().enumerate() {
        let field = format!("inputs[{i}] ({})", input.name);
        let Some(info) = declared.iter().find(|t| t.name == input.name) else {
            return Err(Error::invalid(
                format!("inputs[{i}].name"),
                format!(
                    "{:?} is not an input of {model} (its inputs: {})",
                    input.name,
                    names(declared)
                ),
            ));
        };
        if decoded
            .iter()
            .any(|(n, _): &(String, Tensor)| *n == input.name)
        {
            return Err(Error::invalid(field, "is given twice"));
        }
        let dtype = DataType::from_oip_name(&input.datatype).ok_or_else(|| {
            Error::invalid(
                &field,
                format!("datatype {:?} is not supported", input.datatype),
            )
        })?;
        if dtype != info.dtype {
            return Err(Error::invalid(
                &field,
                format!(
                    "datatype is {}, the model expects {}",
                    input.datatype, info.dtype
                ),
            ));
        }
        let shape_ok = input.shape.len() == info.shape.len()
            && input
                .shape
                .iter()
                .zip(&info.shape)
                .all(|(&got, &want)| got >= 0 && (want < 0 || got == want));
        if !shape_ok {
            return Err(Error::invalid(
                &field,
                format!(
                    "shape {:?} does not fit the model's {:?} (-1: any size)",
                    input.shape, info.shape
                ),
            ));
        }
        let shape: Vec<usize> = input.shape.iter().map(|&d| d as usize).collect();
        let data = match raw.get(i) {
            Some(bytes) => {
                decode_raw(dtype, bytes).map_err(|reason| Error::invalid(&field, reason))?
            }
            None => {
                decode_contents(dtype, input).map_err(|reason| Error::invalid(&field, reason))?
            }
        };
        let tensor = Tensor::new(shape, data).map_err(|reason| Error::invalid(&field, reason))?;
        decoded.push((input.name.clone(), tensor));
    }
    if let Some(missing) = declared
        .iter()
        .find(|t| !decoded.iter().any(|(n, _)| *n == t.name))
    {
        return Err(Error::invalid(
            "inputs",
            format!("input {:?} of {model} is missing", missing.name),
        ));
    }
    Ok(decoded)
}

fn decode_raw(dtype: DataType, bytes: &[u8]) -> Result<TensorData, String> {
    let size = dtype.size();
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "raw contents of {} bytes are not whole {dtype} elements",
            bytes.len()
        ));
    }
    macro_rules! le {
        ($t:ty, $variant:ident) => {
            TensorData::$variant(
                bytes
                    .chunks_exact(size)
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("element size")))
                    .collect(),
            )
        };
    }
    Ok(match dtype {
        DataType::F32 => le!(f32, F32),
        DataType::F64 => le!(f64, F64),
        DataType::I64 => le!(i64, I64),
        DataType::I32 => le!(i32, I32),
        DataType::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
        DataType::U8 => TensorData::U8(bytes.to_vec()),
        DataType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
    })
}

fn decode_contents(dtype: DataType, input: &InferInputTensor) -> Result<TensorData, String> {
    let c = input.contents.clone().unwrap_or_default();
    let narrow = |v: Vec<i32>, min: i32, max: i32| -> Result<Vec<i32>, String> {
        match v.iter().find(|x| **x < min || **x > max) {
            Some(x) => Err(format!("value {x} is out of range for {dtype}")),
            None => Ok(v),
        }
    };
    Ok(match dtype {
        DataType::F32 => TensorData::F32(c.fp32_contents),
        DataType::F64 => TensorData::F64(c.fp64_contents),
        DataType::I64 => TensorData::I64(c.int64_contents),
        DataType::I32 => TensorData::I32(c.int_contents),
        DataType::I8 => TensorData::I8(
            narrow(c.int_contents, -128, 127)?
                .into_iter()
                .map(|x| x as i8)
                .collect(),
        ),
        DataType::U8 => TensorData::U8(
            c.uint_contents
                .iter()
                .map(|&x| {
                    u8::try_from(x).map_err(|_| format!("value {x} is out of range for {dtype}"))
                })
                .collect::<Result<_, _>>()?,
        ),
        DataType::Bool => TensorData::Bool(c.bool_contents),
    })
}

fn encode_raw(data: &TensorData) -> Vec<u8> {
    match data {
        TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::I8(v) => v.iter().map(|&x| x as u8).collect(),
        TensorData::U8(v) => v.clone(),
        TensorData::Bool(v) => v.iter().map(|&x| u8::from(x)).collect(),
    }
}

fn metadata(infos: &[TensorInfo]) -> Vec<TensorMetadata> {
    infos
        .iter()
        .map(|t| TensorMetadata {
            name: t.name.clone(),
            datatype: t.dtype.oip_name().into(),
            shape: t.shape.clone(),
        })
        .collect()
}

#[tonic::async_trait]
impl grpc_inference_service_server::GrpcInferenceService for Inference {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Reply<ServerLiveResponse> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Reply<ServerReadyResponse> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    /// Ready when the model can be served to this caller (it is loaded on first use).
    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Reply<ModelReadyResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        check_version("version", &r.version)?;
        let ready = match &self.node {
            // Ready when some replica serves it now (asking does not start one).
            Some(node) => node.router.is_ready(&p, &r.name),
            None => self.engine.model(&p, "name", &r.name).await.is_ok(),
        };
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Reply<ServerMetadataResponse> {
        Ok(Response::new(ServerMetadataResponse {
            name: "kiln".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Reply<ModelMetadataResponse> {
        let p = caller(&request)?;
        check_version("version", &request.get_ref().version)?;
        let name = request.get_ref().name.clone();
        let model = match self.route(&request, &p, "name", &name).await? {
            Target::Remote(channel, _guard) => {
                return GrpcInferenceServiceClient::new(channel)
                    .model_metadata(forward(request))
                    .await
                    .map_err(peer_status);
            }
            Target::Local(served) => served.model,
        };
        let r = request.into_inner();
        Ok(Response::new(ModelMetadataResponse {
            name: r.name,
            versions: vec![VERSION.into()],
            platform: format!("{}_onnx", model.backend),
            inputs: metadata(model.runner()?.inputs()),
            outputs: metadata(model.runner()?.outputs()),
        }))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Reply<ModelInferResponse> {
        let name = request.get_ref().model_name.clone();
        self.serve(
            request,
            "model_name",
            name,
            |channel, r| async move {
                GrpcInferenceServiceClient::new(channel)
                    .model_infer(r)
                    .await
            },
            |p, served, r| async move { self.model_infer(&p, served, r).await },
        )
        .await
    }
}
