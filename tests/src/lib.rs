//! Helpers the end-to-end suites and benchmarks share.

pub mod echo {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kiln.bench.v1");
}

use kiln_proto::identity::v1 as idv1;
use kiln_testkit::AuthedChannel;

pub type Accounts = idv1::account_service_client::AccountServiceClient<AuthedChannel>;
pub type Users = idv1::user_service_client::UserServiceClient<AuthedChannel>;
pub type Keys = idv1::api_key_service_client::ApiKeyServiceClient<AuthedChannel>;

pub fn accounts(ch: &AuthedChannel) -> Accounts {
    Accounts::new(ch.clone())
}

pub fn users(ch: &AuthedChannel) -> Users {
    Users::new(ch.clone())
}

pub fn keys(ch: &AuthedChannel) -> Keys {
    Keys::new(ch.clone())
}

/// Creates an enterprise account `id`.
pub async fn create_account(admin: &AuthedChannel, id: &str) -> idv1::Account {
    accounts(admin)
        .create_account(idv1::CreateAccountRequest {
            account_id: id.to_owned(),
            account: Some(idv1::Account {
                email: format!("owner@{id}.example"),
                ..Default::default()
            }),
        })
        .await
        .expect("create account")
        .into_inner()
}

/// Creates user `user` in `account` with `role`.
pub async fn create_user(
    admin: &AuthedChannel,
    account: &str,
    user: &str,
    role: &str,
) -> idv1::User {
    users(admin)
        .create_user(idv1::CreateUserRequest {
            parent: format!("accounts/{account}"),
            user_id: user.to_owned(),
            user: Some(idv1::User {
                email: format!("{user}@{account}.example"),
                role: role.to_owned(),
                ..Default::default()
            }),
        })
        .await
        .expect("create user")
        .into_inner()
}

/// Creates an API key for `accounts/{account}/users/{user}`, with an optional expiry.
pub async fn create_key(
    ch: &AuthedChannel,
    account: &str,
    user: &str,
    expire_time: Option<prost_types::Timestamp>,
) -> idv1::ApiKey {
    keys(ch)
        .create_api_key(idv1::CreateApiKeyRequest {
            parent: format!("accounts/{account}/users/{user}"),
            api_key: Some(idv1::ApiKey {
                display_name: "test".to_owned(),
                expire_time,
                ..Default::default()
            }),
        })
        .await
        .expect("create api key")
        .into_inner()
}

/// An account with one admin user and that user's key: (account id, key secret).
pub async fn tenant(admin: &AuthedChannel, account: &str) -> String {
    create_account(admin, account).await;
    create_user(admin, account, "owner", "admin").await;
    create_key(admin, account, "owner", None).await.key
}

/// A folder that links the given folders of the asset cache and ONNX Runtime's, so a mesh
/// imports just those models into its library (and finds ONNX Runtime beside them).
pub fn asset_dir_with(folders: &[&str]) -> tempfile::TempDir {
    let cache = kiln_registry::library::asset_dir(&Default::default());
    let dir = tempfile::tempdir().expect("temp dir");
    for folder in folders.iter().chain(&["onnxruntime"]) {
        let source = cache.join(folder);
        assert!(
            source.is_dir(),
            "{} is missing: run `bash deploy/fetch-assets.sh` (or set KILN_ASSET_DIR)",
            source.display()
        );
        std::os::unix::fs::symlink(source, dir.path().join(folder)).expect("link");
    }
    dir
}

/// A mesh whose public library is imported from `assets` (see [`asset_dir_with`]), with
/// these inference settings.
pub async fn library_mesh(
    assets: &std::path::Path,
    inference: Option<kiln_inference::config::InferenceConfig>,
) -> kiln_testkit::TestMesh {
    library_mesh_with(
        assets,
        kiln_testkit::MeshOptions {
            inference,
            ..Default::default()
        },
    )
    .await
}

/// [`library_mesh`] with the rest of `options` (billing settings, a NATS server...).
pub async fn library_mesh_with(
    assets: &std::path::Path,
    options: kiln_testkit::MeshOptions,
) -> kiln_testkit::TestMesh {
    kiln_testkit::TestMesh::start_with(kiln_testkit::MeshOptions {
        import_library: true,
        registry: Some(kiln_registry::config::RegistryConfig {
            asset_dir: assets.display().to_string(),
            ..Default::default()
        }),
        ..options
    })
    .await
}

pub mod registry {
    //! Registry clients and upload helpers for the suites.

    use kiln_proto::registry::v1 as regv1;
    use kiln_proto::registry::v1::upload_model_files_request::Payload;
    use kiln_testkit::AuthedChannel;
    use sha2::{Digest, Sha256};

    pub type Models = regv1::model_service_client::ModelServiceClient<AuthedChannel>;
    pub type Datasets = regv1::dataset_service_client::DatasetServiceClient<AuthedChannel>;

    pub fn models(ch: &AuthedChannel) -> Models {
        Models::new(ch.clone()).max_decoding_message_size(16 << 20)
    }

    pub fn datasets(ch: &AuthedChannel) -> Datasets {
        Datasets::new(ch.clone()).max_decoding_message_size(16 << 20)
    }

    pub fn sha256_hex(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Creates a model of `kind` in `account`.
    pub async fn create_model(
        ch: &AuthedChannel,
        account: &str,
        id: &str,
        kind: regv1::model::Kind,
        base: Option<&str>,
    ) -> Result<regv1::Model, tonic::Status> {
        models(ch)
            .create_model(regv1::CreateModelRequest {
                parent: format!("accounts/{account}"),
                model_id: id.to_owned(),
                model: Some(regv1::Model {
                    kind: kind as i32,
                    peft_details: base.map(|b| regv1::PeftDetails {
                        base_model: b.to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// The upload messages of in-memory files: each a header then 1 MiB chunks from `from`.
    pub fn file_messages(
        model: &str,
        files: &[(&str, &[u8])],
        from: usize,
        until: Option<usize>,
    ) -> Vec<regv1::UploadModelFilesRequest> {
        let mut out = Vec::new();
        for (path, bytes) in files {
            out.push(regv1::UploadModelFilesRequest {
                payload: Some(Payload::Header(regv1::ModelFileHeader {
                    model: model.to_owned(),
                    path: (*path).to_owned(),
                    size_bytes: bytes.len() as i64,
                    sha256: sha256_hex(bytes),
                })),
            });
            let end = until.unwrap_or(bytes.len()).min(bytes.len());
            let mut at = from;
            while at < end {
                let next = (at + (1 << 20)).min(end);
                out.push(regv1::UploadModelFilesRequest {
                    payload: Some(Payload::Chunk(regv1::FileChunk {
                        offset: at as i64,
                        data: bytes[at..next].to_vec().into(),
                    })),
                });
                at = next;
            }
        }
        out
    }

    /// Uploads in-memory files whole.
    pub async fn upload(
        ch: &AuthedChannel,
        model: &str,
        files: &[(&str, &[u8])],
    ) -> Result<regv1::UploadModelFilesResponse, tonic::Status> {
        let messages = file_messages(model, files, 0, None);
        models(ch)
            .upload_model_files(futures::stream::iter(messages))
            .await
            .map(|r| r.into_inner())
    }

    /// Uploads a local file through the same stream the CLI uses.
    pub async fn upload_path(
        ch: &AuthedChannel,
        model: &str,
        path_in_model: &str,
        local: &std::path::Path,
    ) -> regv1::UploadModelFilesResponse {
        let (sha, size) = kiln_registry::library::hash_file(local).await.unwrap();
        let stream = kiln_registry::library::file_upload_stream(
            model.to_owned(),
            path_in_model.to_owned(),
            local.to_owned(),
            size,
            sha,
            0,
            |_| {},
        );
        models(ch)
            .upload_model_files(stream)
            .await
            .expect("upload")
            .into_inner()
    }

    pub async fn validate(ch: &AuthedChannel, model: &str) -> regv1::ValidateModelUploadResponse {
        models(ch)
            .validate_model_upload(regv1::ValidateModelUploadRequest {
                name: model.to_owned(),
                validate_only: false,
            })
            .await
            .expect("validate")
            .into_inner()
    }

    /// Downloads a file (or a range) of a model.
    pub async fn download(
        ch: &AuthedChannel,
        model: &str,
        path: &str,
        offset: i64,
        length: i64,
    ) -> Result<Vec<u8>, tonic::Status> {
        use futures::StreamExt;
        let mut stream = models(ch)
            .download_model_files(regv1::DownloadModelFilesRequest {
                name: model.to_owned(),
                path: path.to_owned(),
                offset,
                length,
                bundle_precision: None,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            assert_eq!(
                piece.offset as usize,
                offset as usize + out.len(),
                "pieces arrive in order"
            );
            out.extend_from_slice(&piece.data);
        }
        Ok(out)
    }
}

pub mod inference {
    //! Inference clients, the reference embeddings and an engine over local files.

    use std::path::PathBuf;
    use std::sync::Arc;

    use kiln_inference::backend::Backends;
    use kiln_inference::config::{Batching, InferenceConfig, ModelConfig};
    use kiln_inference::engine::Engine;
    use kiln_proto::kiln_inference::v1 as infv1;
    use kiln_testkit::{AuthedChannel, asset};

    pub type Client = infv1::inference_service_client::InferenceServiceClient<AuthedChannel>;
    pub type Oip = kiln_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        AuthedChannel,
    >;

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
}

pub mod bench {
    //! What the benchmarks share.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// Runs `call` from `concurrency` tasks for `seconds` (after a one-second warm-up) and
    /// returns completed calls per second.
    pub async fn measure<F, Fut>(seconds: u64, concurrency: usize, call: F) -> f64
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let call = Arc::new(call);
        let warmup = Instant::now() + Duration::from_secs(1);
        let end = warmup + Duration::from_secs(seconds);
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let call = call.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    call().await;
                    if now >= warmup {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        done.load(Ordering::Relaxed) as f64 / seconds as f64
    }
}

pub mod llm {
    //! The chat model's reference data and a prepared bundle of it.

    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use kiln_testkit::asset;

    pub const SMOLLM2: &str = "accounts/kiln/models/smollm2-135m-instruct";
    pub const GGUF: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

    /// `tests/data/llm/reference.json`: llama.cpp (llama-cpp-python) on the same GGUF, made by
    /// `make_reference.py` beside it.
    #[derive(Debug, serde::Deserialize)]
    pub struct Reference {
        pub prompts: Vec<Prompt>,
        pub tokenization: Vec<Tokenized>,
        pub chat: Vec<Chat>,
    }

    #[derive(Debug, serde::Deserialize)]
    pub struct Prompt {
        pub text: String,
        pub tokens: Vec<u32>,
        pub argmax_next: Vec<u32>,
        pub argmax_margin: Vec<f32>,
    }

    #[derive(Debug, serde::Deserialize)]
    pub struct Tokenized {
        pub text: String,
        pub tokens: Vec<u32>,
    }

    #[derive(Debug, serde::Deserialize)]
    pub struct Chat {
        pub question: String,
        pub prompt_tokens: Vec<u32>,
        pub answer_tokens: Vec<u32>,
        pub answer: String,
    }

    pub fn reference() -> Reference {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/llm/reference.json");
        serde_json::from_slice(&std::fs::read(path).expect("reference.json")).expect("reference")
    }

    /// The GGUF prepared into an ONNX bundle: float32 weights, or (`blocks`) the checkpoint's
    /// 4- and 8-bit blocks for MatMulNBits. Kept beside the asset cache, keyed by the
    /// preparer's version, so test processes and runs share one conversion (written to a
    /// private folder, then renamed into place).
    pub fn bundle(blocks: bool) -> &'static Path {
        static DIRS: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
        DIRS[usize::from(blocks)].get_or_init(|| {
            let gguf = asset(GGUF);
            let variant = if blocks { "int4" } else { "fp32" };
            let dir = gguf.parent().unwrap().join(format!(
                "prepared-{variant}-{}",
                kiln_formats::GGUF_ONNX_VERSION
            ));
            if dir.join("manifest.json").is_file() {
                return dir;
            }
            // Bundles of earlier preparer versions go.
            for entry in std::fs::read_dir(gguf.parent().unwrap()).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("prepared-{variant}-")) && entry.path() != dir {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            let bytes = std::fs::read(&gguf).expect("the GGUF");
            let converted = kiln_formats::convert_gguf(&bytes, blocks).expect("converts");
            let staging = dir.with_extension(format!("partial-{}", std::process::id()));
            std::fs::create_dir_all(&staging).unwrap();
            // manifest.json last: its presence marks a complete bundle.
            let mut files = converted.files;
            files.sort_by_key(|(path, _)| *path == "manifest.json");
            for (path, data) in files {
                std::fs::write(staging.join(path), data).unwrap();
            }
            if std::fs::rename(&staging, &dir).is_err() {
                // Another process finished first.
                let _ = std::fs::remove_dir_all(&staging);
            }
            dir
        })
    }

    /// A folder that holds only the chat model and ONNX Runtime of the asset cache.
    pub fn smollm2_asset_dir() -> tempfile::TempDir {
        super::asset_dir_with(&["smollm2-135m-instruct"])
    }
}

pub mod workers {
    //! Extra inference nodes for scheduler suites: each registers with the mesh's scheduler,
    //! authenticates through its identity and reads models from its registry, like a worker
    //! of a real deployment. Both its gRPC server and its scheduler stream go through TCP
    //! proxies, so a test can kill the node: every connection drops at once, as when a
    //! machine dies.

    use std::net::SocketAddr;
    use std::sync::Arc;

    use kiln_inference::config::{AcceleratorConfig, InferenceConfig};
    use kiln_testkit::{SERVICE_TOKEN, TestMesh};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    /// A TCP proxy to `target` whose `kill` drops every connection and refuses new ones.
    pub struct Proxy {
        pub addr: SocketAddr,
        kill: watch::Sender<bool>,
    }

    impl Proxy {
        pub async fn start(target: SocketAddr) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
            let addr = listener.local_addr().expect("proxy addr");
            let (kill, killed) = watch::channel(false);
            tokio::spawn(async move {
                let mut stop = killed.clone();
                loop {
                    let (mut inbound, _) = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok(conn) => conn,
                            Err(_) => break,
                        },
                        _ = stop.changed() => break,
                    };
                    let mut stop = killed.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = stop.changed() => {}
                        }
                    });
                }
            });
            Self { addr, kill }
        }

        pub fn kill(&self) {
            let _ = self.kill.send(true);
        }
    }

    /// A running worker node.
    pub struct Worker {
        pub node_id: String,
        /// Where callers (and other nodes) reach it.
        pub url: String,
        server: Proxy,
        scheduler: Proxy,
        stop: watch::Sender<bool>,
        _data: tempfile::TempDir,
    }

    impl Worker {
        /// Starts a node named `node_id` offering `accelerators` (simulated: the CPU backend
        /// runs the models) against `mesh`.
        pub async fn start(mesh: &TestMesh, node_id: &str, accelerators: &[(&str, i32)]) -> Self {
            let data = tempfile::tempdir().expect("temp dir");
            let real = TcpListener::bind("127.0.0.1:0").await.expect("bind node");
            let server_proxy = Proxy::start(real.local_addr().expect("addr")).await;
            let scheduler_proxy = Proxy::start(mesh.addr).await;
            let url = format!("http://{}", server_proxy.addr);
            let server = kiln_core::config::ServerConfig {
                data_dir: data.path().to_path_buf(),
                service_token: Some(SERVICE_TOKEN.to_owned()),
                identity_url: Some(mesh.url()),
                registry_url: Some(mesh.url()),
                page_token_secret: Some("test-page-token-secret".to_owned()),
                ..Default::default()
            };
            let config = InferenceConfig {
                ort_dylib_path: crate::inference::ort_library().display().to_string(),
                node_id: node_id.to_owned(),
                accelerators: accelerators
                    .iter()
                    .map(|(kind, count)| AcceleratorConfig {
                        kind: (*kind).to_owned(),
                        count: *count,
                        memory_bytes: 0,
                    })
                    .collect(),
                intra_op_threads: 1,
                ..Default::default()
            };
            let (stop, shutdown) = watch::channel(false);
            let mut host = kiln_events::host::Host::new(&server, mesh.bus.clone(), shutdown);
            let link = Arc::new(
                kiln_inference::node::RemoteScheduler::new(
                    &format!("http://{}", scheduler_proxy.addr),
                    SERVICE_TOKEN,
                )
                .expect("scheduler link"),
            );
            let source = Arc::new(
                kiln_inference::source::RemoteRegistry::new(&mesh.url(), SERVICE_TOKEN)
                    .expect("registry"),
            );
            kiln_inference::open(
                &server,
                &config,
                &mut host,
                source,
                Some(kiln_inference::Scheduling {
                    address: url.clone(),
                    link,
                }),
                Some(Arc::new(
                    kiln_inference::limits::RemoteLimits::new(&mesh.url(), SERVICE_TOKEN)
                        .expect("billing"),
                )),
            )
            .await
            .expect("open the node");
            let authenticator = Arc::new(
                kiln_core::auth_client::RemoteAuthenticator::new(&mesh.url(), SERVICE_TOKEN)
                    .expect("authenticator"),
            );
            host.serve(real, authenticator)
                .await
                .expect("serve the node");
            Self {
                node_id: node_id.to_owned(),
                url,
                server: server_proxy,
                scheduler: scheduler_proxy,
                stop,
                _data: data,
            }
        }

        /// The node dies: its connections drop, it stops answering and reporting.
        pub fn kill(&self) {
            self.server.kill();
            self.scheduler.kill();
            let _ = self.stop.send(true);
        }
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            self.kill();
        }
    }
}

pub mod deployments {
    //! Scheduler clients and waits for the suites.

    use std::time::Duration;

    use kiln_proto::scheduler::v1 as schv1;
    use kiln_testkit::AuthedChannel;

    pub type Deployments = schv1::deployment_service_client::DeploymentServiceClient<AuthedChannel>;
    pub type Nodes = schv1::node_service_client::NodeServiceClient<AuthedChannel>;

    pub fn deployments(ch: &AuthedChannel) -> Deployments {
        schv1::deployment_service_client::DeploymentServiceClient::new(ch.clone())
    }

    pub fn nodes(ch: &AuthedChannel) -> Nodes {
        schv1::node_service_client::NodeServiceClient::new(ch.clone())
    }

    pub fn deployed_models(
        ch: &AuthedChannel,
    ) -> schv1::deployed_model_service_client::DeployedModelServiceClient<AuthedChannel> {
        schv1::deployed_model_service_client::DeployedModelServiceClient::new(ch.clone())
    }

    pub async fn create(
        ch: &AuthedChannel,
        parent: &str,
        id: &str,
        deployment: schv1::Deployment,
    ) -> Result<schv1::Deployment, tonic::Status> {
        deployments(ch)
            .create_deployment(schv1::CreateDeploymentRequest {
                parent: parent.to_owned(),
                deployment_id: id.to_owned(),
                deployment: Some(deployment),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get(ch: &AuthedChannel, name: &str) -> schv1::Deployment {
        deployments(ch)
            .get_deployment(schv1::GetDeploymentRequest {
                name: name.to_owned(),
            })
            .await
            .expect("get deployment")
            .into_inner()
    }

    /// Waits until `check` holds for the deployment, and returns it.
    pub async fn wait_until(
        ch: &AuthedChannel,
        name: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&schv1::Deployment) -> bool,
    ) -> schv1::Deployment {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let d = get(ch, name).await;
            if check(&d) {
                return d;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; the deployment is {d:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the deployment is READY with `ready` ready replicas.
    pub async fn wait_ready(ch: &AuthedChannel, name: &str, ready: i32) -> schv1::Deployment {
        wait_until(
            ch,
            name,
            Duration::from_secs(120),
            "the deployment to be ready",
            |d| {
                d.state == schv1::deployment::State::Ready as i32
                    && d.replica_stats.as_ref().map(|s| s.ready_replica_count) == Some(ready)
            },
        )
        .await
    }

    /// Deploys `model` (accounts/{a}/models/{m}) in its account with every default and waits
    /// until it serves.
    pub async fn deploy(ch: &AuthedChannel, model: &str) -> schv1::Deployment {
        let account = model.split('/').nth(1).expect("a model name");
        let created = create(
            ch,
            &format!("accounts/{account}"),
            "",
            schv1::Deployment {
                base_model: model.to_owned(),
                ..Default::default()
            },
        )
        .await
        .expect("create the deployment");
        wait_ready(ch, &created.name, 1).await
    }

    /// The nodes holding the deployment's replicas (admin only).
    pub async fn replica_nodes(admin: &AuthedChannel, deployment: &str) -> Vec<String> {
        let listed = nodes(admin)
            .list_nodes(schv1::ListNodesRequest::default())
            .await
            .expect("list nodes")
            .into_inner();
        let mut held: Vec<String> = listed
            .nodes
            .iter()
            .filter(|n| n.replicas.iter().any(|r| r.deployment == deployment))
            .map(|n| n.name.clone())
            .collect();
        held.sort();
        held
    }
}

pub mod billing {
    //! Billing clients for the suites.

    use kiln_proto::billing::v1 as bilv1;
    use kiln_testkit::AuthedChannel;

    pub type Usage = bilv1::usage_service_client::UsageServiceClient<AuthedChannel>;
    pub type Quotas = bilv1::quota_service_client::QuotaServiceClient<AuthedChannel>;

    pub fn usage(ch: &AuthedChannel) -> Usage {
        Usage::new(ch.clone())
    }

    pub fn quotas(ch: &AuthedChannel) -> Quotas {
        Quotas::new(ch.clone())
    }

    /// The month-to-date report of `parent`, grouped by `group_by`.
    pub async fn report(
        ch: &AuthedChannel,
        parent: &str,
        group_by: &[bilv1::get_usage_request::GroupBy],
    ) -> Result<bilv1::GetUsageResponse, tonic::Status> {
        usage(ch)
            .get_usage(bilv1::GetUsageRequest {
                parent: parent.to_owned(),
                group_by: group_by.iter().map(|g| *g as i32).collect(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// The report's totals.
    pub async fn totals(ch: &AuthedChannel, parent: &str) -> bilv1::UsageRow {
        report(ch, parent, &[])
            .await
            .expect("usage report")
            .totals
            .expect("totals")
    }

    /// Sets `accounts/{account}/quotas/{quota}` to `value`.
    pub async fn set_quota(
        ch: &AuthedChannel,
        account: &str,
        quota: &str,
        value: i64,
    ) -> Result<bilv1::Quota, tonic::Status> {
        quotas(ch)
            .update_quota(bilv1::UpdateQuotaRequest {
                quota: Some(bilv1::Quota {
                    name: format!("accounts/{account}/quotas/{quota}"),
                    value,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["value".into()],
                }),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Money as nano-units.
    pub fn nanos(money: &Option<kiln_proto::common::v1::Money>) -> i64 {
        let m = money.as_ref().expect("an amount");
        m.units * 1_000_000_000 + i64::from(m.nanos)
    }
}
