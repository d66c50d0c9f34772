//! Inference clients, the reference embeddings, an engine over local files, backends
//! called directly, and a mesh with a tenant's own copy of MiniLM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::{AuthedChannel, MeshOptions, TestMesh, asset, wait_for};
use kiln_inference::backend::{Backends, LoadOptions, Session};
use kiln_inference::config::{Batching, InferenceConfig, ModelConfig};
use kiln_inference::engine::Engine;
use kiln_inference::tensor::{Tensor, TensorData};
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_proto::scheduler::v1 as schv1;

/// The public embedding model of the library.
pub const MINILM: &str = "accounts/kiln/models/all-minilm-l6-v2";
/// The same files served from the asset cache by a local engine.
pub const LOCAL_MINILM: &str = "accounts/local/models/all-minilm-l6-v2";

clients! {
    Client, client = infv1::inference_service_client::InferenceServiceClient<AuthedChannel>, limit 64 << 20;
    Oip, oip = kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<AuthedChannel>, limit 64 << 20;
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
    crate::data_json("embeddings/reference.json")
}

impl Reference {
    /// The 16-token sentence of the reference set: its index and token ids.
    pub fn sixteen_tokens(&self) -> (usize, &[u32]) {
        let found = self
            .token_ids
            .iter()
            .enumerate()
            .find(|(_, ids)| ids.len() == 16);
        let (i, ids) = found.expect("a 16-token sentence");
        (i, ids)
    }
}

/// The answer is MiniLM's (against the independent reference vectors) for the first
/// reference sentence.
pub fn assert_minilm(answer: &infv1::CreateEmbeddingsResponse) {
    let similarity = cosine(&answer.data[0].embedding, &reference().embeddings[0]);
    assert!(similarity >= 0.999, "cosine {similarity}");
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// The largest difference between two vectors, element by element.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    let diffs = a.iter().zip(b).map(|(x, y)| (x - y).abs());
    diffs.fold(0f32, f32::max)
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

/// Loads `graph` on `backend` (ONNX Runtime from the asset cache) with `threads` intra-op
/// threads (0: the backend's default).
pub fn load_session(backend: &str, graph: &Path, threads: usize) -> Box<dyn Session> {
    let options = LoadOptions {
        intra_op_threads: threads,
        ..Default::default()
    };
    load_session_with(backend, graph, &options)
}

/// Loads `graph` on `backend` (ONNX Runtime from the asset cache) as `options` say.
pub fn load_session_with(backend: &str, graph: &Path, options: &LoadOptions) -> Box<dyn Session> {
    let backends = Backends::standard(Some(&ort_library()));
    let loaded = backends
        .get(backend)
        .expect("a backend")
        .load(graph, options);
    loaded.unwrap_or_else(|e| panic!("{backend} loads {}: {e}", graph.display()))
}

/// MiniLM's inputs for one sequence of token ids: the ids, a full mask, segment 0.
pub fn minilm_inputs(ids: &[u32]) -> Vec<(String, Tensor)> {
    let n = ids.len();
    let t = |v: Vec<i64>| Tensor::new(vec![1, n], TensorData::I64(v)).unwrap();
    vec![
        (
            "input_ids".into(),
            t(ids.iter().map(|&x| i64::from(x)).collect()),
        ),
        ("attention_mask".into(), t(vec![1; n])),
        ("token_type_ids".into(), t(vec![0; n])),
    ]
}

/// A model source with no models: engines over local bundles only.
pub struct NoRegistry;

#[async_trait::async_trait]
impl kiln_inference::source::ModelSource for NoRegistry {
    async fn get_model(
        &self,
        name: &str,
    ) -> kiln_inference::Result<kiln_proto::registry::v1::Model> {
        Err(kiln_core::Error::not_found(name))
    }
    async fn download(
        &self,
        name: &str,
        _: Option<i32>,
    ) -> kiln_inference::Result<kiln_inference::source::FileStream> {
        Err(kiln_core::Error::not_found(name))
    }
    async fn read_dataset(&self, name: &str) -> kiln_inference::Result<Vec<u8>> {
        Err(kiln_core::Error::not_found(name))
    }
    async fn upload_model(
        &self,
        parent: &str,
        _: &str,
        _: kiln_proto::registry::v1::Model,
        _: Vec<(String, Vec<u8>)>,
        _: bool,
    ) -> kiln_inference::Result<kiln_proto::registry::v1::Model> {
        Err(kiln_core::Error::not_found(parent))
    }
    async fn delete_model(&self, name: &str) -> kiln_inference::Result<()> {
        Err(kiln_core::Error::not_found(name))
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

/// CreateEmbeddings of `input` on `model`.
pub async fn embed(
    ch: &AuthedChannel,
    model: &str,
    input: &[String],
) -> Result<infv1::CreateEmbeddingsResponse, tonic::Status> {
    let request = infv1::CreateEmbeddingsRequest {
        model: model.to_owned(),
        input: input.to_vec(),
        ..Default::default()
    };
    Ok(client(ch).create_embeddings(request).await?.into_inner())
}

/// CreateEmbeddings of the first reference sentence (what [`assert_minilm`] checks) on `model`.
pub async fn embed_reference(
    ch: &AuthedChannel,
    model: &str,
) -> Result<infv1::CreateEmbeddingsResponse, tonic::Status> {
    embed(ch, model, &reference().sentences[..1]).await
}

/// The first answer of `model` to `input`, waited for up to `timeout` (a library model
/// answers once it is imported and served, in the background).
pub async fn first_embeddings(
    ch: &AuthedChannel,
    model: &str,
    input: &[String],
    timeout: Duration,
) -> infv1::CreateEmbeddingsResponse {
    let what = format!("{model} to answer");
    wait_for(timeout, &what, || async {
        embed(ch, model, input).await.ok()
    })
    .await
}

/// Creates model `id` in `account` from MiniLM's files and validates it; its name.
pub async fn private_minilm(ch: &AuthedChannel, account: &str, id: &str) -> String {
    let kind = kiln_proto::registry::v1::model::Kind::EmbeddingModel;
    let name = crate::registry::create_model(ch, account, id, kind, None)
        .await
        .name;
    let files = ["model.onnx", "tokenizer.json"];
    crate::registry::upload_dir(ch, &name, &minilm_dir(), &files).await;
    assert!(crate::registry::validate(ch, &name).await.valid);
    name
}

/// A mesh started with `options` (MiniLM in its library) and a tenant, acme, that owns a
/// private copy of MiniLM: (mesh, its asset folder, acme's channel, the model's name).
pub async fn mesh_with_private_minilm(
    options: MeshOptions,
) -> (TestMesh, tempfile::TempDir, AuthedChannel, String) {
    let assets = minilm_asset_dir();
    let mesh = crate::library_mesh_with(assets.path(), options).await;
    let admin = mesh.admin().await;
    // The library's serverless MiniLM first, on the mesh's own CPU node: created later, its
    // default accelerator would be the GPU kind of whichever workers a test has started.
    let library = "accounts/kiln/deployments/all-minilm-l6-v2";
    let ready = schv1::deployment::State::Ready as i32;
    let what = "the library's MiniLM to be served";
    wait_for(Duration::from_secs(60), what, || async {
        let d = crate::get_deployment(&admin, library).await.ok()?;
        (d.state == ready).then_some(())
    })
    .await;
    let acme = mesh.tenant_channel("acme").await;
    let model = private_minilm(&acme, "acme", "minilm").await;
    (mesh, assets, acme, model)
}
