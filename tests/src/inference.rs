//! Inference clients, the reference embeddings and an engine over local files.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{AuthedChannel, asset};
use kiln_inference::backend::Backends;
use kiln_inference::config::{Batching, InferenceConfig, ModelConfig};
use kiln_inference::engine::Engine;
use kiln_proto::kiln_inference::v1 as infv1;

pub type Client = infv1::inference_service_client::InferenceServiceClient<AuthedChannel>;
pub type Oip =
    kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<AuthedChannel>;

/// The public embedding model of the library.
pub const MINILM: &str = "accounts/kiln/models/all-minilm-l6-v2";
/// The same files served from the asset cache by a local engine.
pub const LOCAL_MINILM: &str = "accounts/local/models/all-minilm-l6-v2";

pub fn client(ch: &AuthedChannel) -> Client {
    Client::new(ch.clone()).max_decoding_message_size(64 << 20)
}

pub fn oip(ch: &AuthedChannel) -> Oip {
    Oip::new(ch.clone()).max_decoding_message_size(64 << 20)
}

/// `tests/data/embeddings/reference.json`: vectors computed by the `onnxruntime` Python
/// package and numpy from the same files (`make_reference.py` beside it).
#[derive(Debug, serde::Deserialize)]
pub struct Reference {
    pub sentences: Vec<String>,
    pub token_ids: Vec<Vec<u32>>,
    pub embeddings: Vec<Vec<f32>>,
    pub close_pairs: Vec<(usize, usize)>,
    pub unrelated_pairs: Vec<(usize, usize)>,
}

pub fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/embeddings/reference.json"
    );
    serde_json::from_slice(&std::fs::read(path).expect("reference.json")).expect("reference")
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

pub fn ort_library() -> PathBuf {
    asset("onnxruntime/libonnxruntime.so")
}

pub fn minilm_dir() -> PathBuf {
    asset("all-minilm-l6-v2/model.onnx")
        .parent()
        .expect("folder")
        .to_path_buf()
}

/// A model source with no models: engines over local bundles only.
pub struct NoRegistry;

#[async_trait::async_trait]
impl kiln_inference::source::ModelSource for NoRegistry {
    async fn get_model(
        &self,
        name: &str,
    ) -> kiln_inference::Result<kiln_proto::registry::v1::Model> {
        Err(kiln_core::Error::not_found(name).into())
    }
    async fn download(
        &self,
        name: &str,
        _: Option<i32>,
    ) -> kiln_inference::Result<kiln_inference::source::FileStream> {
        Err(kiln_core::Error::not_found(name).into())
    }
}

/// An engine serving MiniLM from the asset cache as [`LOCAL_MINILM`] on `backend`.
pub fn local_engine(
    backend: &str,
    batching: Batching,
    threads: usize,
    cache: &std::path::Path,
) -> Arc<Engine> {
    let config = InferenceConfig {
        backend: backend.to_owned(),
        intra_op_threads: threads,
        batching,
        models: vec![ModelConfig {
            name: LOCAL_MINILM.to_owned(),
            path: minilm_dir().display().to_string(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let backends = Backends::standard(Some(&ort_library()));
    Arc::new(Engine::new(config, cache, backends, Arc::new(NoRegistry)).expect("engine"))
}

/// A folder that holds only the embedding model and ONNX Runtime of the asset cache, so
/// a mesh imports just that model into its library.
pub fn minilm_asset_dir() -> tempfile::TempDir {
    super::asset_dir_with(&["all-minilm-l6-v2"])
}
