//! The mesh in-process on `127.0.0.1:0`: every service, as `kiln dev` runs them.
//!
//! Storage and bus follow the environment: SQLite files and the in-process bus by default;
//! PostgreSQL when `KILN_TEST_DATABASE_URL` is set (each mesh gets its own schema) and NATS
//! JetStream when `KILN_TEST_NATS_URL` is set (each mesh gets its own stream and subject
//! prefix, so tests run in parallel on one server).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use kiln_server::{KilnConfig, Roles, Running};

use crate::channel_to;
use kiln_core::telemetry::OutgoingInterceptor;
use kiln_events::EventBus;
use kiln_events::memory::InProcessBus;
use kiln_events::nats::{NatsBus, NatsConfig};
use sea_orm::ConnectionTrait;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A channel that sends a bearer key (or none) and the trace context.
pub type AuthedChannel = InterceptedService<Channel, OutgoingInterceptor>;

/// A mesh's services in process with a key (see [`TestMesh::in_process`]).
pub type InProcess = InterceptedService<kiln_core::server::LocalService, OutgoingInterceptor>;

/// The service credential every test mesh uses.
pub const SERVICE_TOKEN: &str = "test-service-token-0123456789";

/// Which storage and bus tests run on, from the environment.
#[derive(Debug, Clone)]
pub struct Backends {
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
}

impl Backends {
    pub fn from_env() -> Self {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Self {
            database_url: var("KILN_TEST_DATABASE_URL"),
            nats_url: var("KILN_TEST_NATS_URL"),
        }
    }
}

/// Installs tracing (with the OpenTelemetry layer, so trace context propagates) once per
/// test binary. Logs go to stderr at `warn` unless `RUST_LOG` says otherwise.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let guard = kiln_core::telemetry::init_for_tests("kiln-tests").expect("telemetry");
        std::mem::forget(guard);
    });
}

/// Storage for one mesh: a fresh schema on PostgreSQL, or a SQLite data dir.
pub struct TestDatabase {
    /// Passed as `database_url` (None: SQLite under the data dir).
    pub url: Option<String>,
    pub schema: Option<String>,
}

impl TestDatabase {
    pub async fn create(backends: &Backends) -> anyhow::Result<Self> {
        let Some(base) = &backends.database_url else {
            return Ok(Self {
                url: None,
                schema: None,
            });
        };
        let schema = format!("kt_{}", uuid::Uuid::new_v4().simple());
        let admin = kiln_store::connect(base).await?;
        admin
            .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
            .await?;
        admin.close().await?;
        let sep = if base.contains('?') { '&' } else { '?' };
        Ok(Self {
            url: Some(format!("{base}{sep}options=-c%20search_path%3D{schema}")),
            schema: Some(schema),
        })
    }
}

/// A running mesh plus what a test needs to talk to it.
pub struct TestMesh {
    pub mesh: Option<Running>,
    pub addr: SocketAddr,
    /// Where `GET /metrics` answers.
    pub metrics_addr: SocketAddr,
    /// The HTTP edge.
    pub http_addr: SocketAddr,
    pub admin_key: String,
    pub config: KilnConfig,
    pub bus: Arc<dyn EventBus>,
    /// Set when the bus is NATS.
    pub nats: Option<NatsInfo>,
    /// The stream this mesh created, deleted at shutdown.
    own_stream: Option<NatsBus>,
    pub data_dir: tempfile::TempDir,
}

/// Where a mesh's events go on NATS.
#[derive(Debug, Clone)]
pub struct NatsInfo {
    pub url: String,
    /// Put before every subject on the wire.
    pub prefix: String,
    pub stream: String,
}

/// How to start a mesh.
#[derive(Default, Clone)]
pub struct MeshOptions {
    /// Use this NATS server (URL) instead of the environment's choice.
    pub nats_url: Option<String>,
    /// Share an existing bus (a second replica in the same test).
    pub bus: Option<Arc<dyn EventBus>>,
    /// Reuse a database (a second replica): its URL, or None for SQLite under `data_dir`.
    pub database: Option<(Option<String>, PathBuf)>,
    /// Authenticate API keys through this identity (a replica that delegates).
    pub identity_url: Option<String>,
    /// Import the public library from the asset cache, as `kiln dev` does.
    pub import_library: bool,
    /// The registry's settings (e.g. an S3-compatible store).
    pub registry: Option<kiln_registry::config::RegistryConfig>,
    /// The inference node's settings (batching, backend…).
    pub inference: Option<kiln_inference::config::InferenceConfig>,
    /// Billing's settings (prices, quota defaults, accrual interval).
    pub billing: Option<kiln_billing::config::BillingConfig>,
}

impl TestMesh {
    /// A mesh on the environment's backends.
    pub async fn start() -> Self {
        Self::start_with(MeshOptions::default()).await
    }

    pub async fn start_with(options: MeshOptions) -> Self {
        init_tracing();
        let backends = Backends::from_env();
        let data_dir = tempfile::tempdir().expect("temp dir");
        let (database_url, state_dir) = match options.database.clone() {
            Some((url, dir)) => (url, dir),
            None => {
                let db = TestDatabase::create(&backends)
                    .await
                    .expect("test database");
                (db.url, data_dir.path().to_path_buf())
            }
        };
        let mut config = KilnConfig::default();
        config.server.data_dir = state_dir;
        config.server.database_url = database_url;
        config.server.service_token = Some(SERVICE_TOKEN.to_owned());
        config.server.page_token_secret = Some("test-page-token-secret".to_owned());
        config.server.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.server.identity_url = options.identity_url.clone();
        config.import_library = options.import_library;
        if let Some(registry) = options.registry.clone() {
            config.registry = registry;
        }
        if let Some(inference) = options.inference.clone() {
            config.inference = inference;
        }
        if let Some(billing) = options.billing.clone() {
            config.billing = billing;
        }

        let nats_url = options.nats_url.clone().or(backends.nats_url.clone());
        let mut own_stream = None;
        let (bus, nats): (Arc<dyn EventBus>, _) = match (options.bus.clone(), nats_url) {
            (Some(bus), _) => (bus, None),
            (None, Some(url)) => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let mut cfg = NatsConfig::new(url.clone());
                cfg.stream = format!("KT_{id}");
                cfg.subject_prefix = format!("kt{id}.");
                cfg.max_age = Duration::from_secs(3600);
                let info = NatsInfo {
                    url: url.clone(),
                    prefix: cfg.subject_prefix.clone(),
                    stream: cfg.stream.clone(),
                };
                let bus = NatsBus::connect(cfg).await.expect("connect NATS");
                own_stream = Some(bus.clone());
                config.server.nats_url = Some(url.clone());
                (Arc::new(bus), Some(info))
            }
            (None, None) => (Arc::new(InProcessBus::new()), None),
        };

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mesh = kiln_server::serve(Roles::all(), &config, listener, Some(bus.clone()))
            .await
            .expect("mesh starts");
        let admin_key = match &mesh.new_admin_key {
            Some(k) => k.clone(),
            None => String::new(),
        };
        Self {
            addr: mesh.addr,
            metrics_addr: mesh.metrics_addr.expect("metrics_listen is set"),
            http_addr: mesh.gateway_addr.expect("the gateway runs in the mesh"),
            mesh: Some(mesh),
            admin_key,
            config,
            bus,
            nats,
            own_stream,
            data_dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The HTTP edge's base URL.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// What `GET /metrics` answers (the process's metrics: every mesh of a test binary
    /// shares them).
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .expect("connect to the metrics endpoint");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: kiln\r\n\r\n")
            .await
            .expect("ask");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(
            head.starts_with("HTTP/1.") && head.contains(" 200 "),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        body.to_owned()
    }

    /// The histogram `name`'s `_sum` and `_count` so far, each summed over its label sets, from
    /// one scrape.
    pub async fn histogram_totals(&self, name: &str) -> (f64, f64) {
        let metrics = self.scrape().await;
        let total = |suffix: &str| -> f64 {
            metrics
                .lines()
                .filter(|line| {
                    line.strip_prefix(name)
                        .and_then(|rest| rest.strip_prefix(suffix))
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        (total("_sum"), total("_count"))
    }

    /// A channel to the mesh that sends `key` (None: no authorization header).
    pub async fn channel(&self, key: Option<&str>) -> AuthedChannel {
        channel_to(&self.url(), key).await
    }

    /// The mesh's services called in process with `key` (every layer of a network call,
    /// no transport): wrap it in any generated client, as a channel.
    pub fn in_process(&self, key: &str) -> InProcess {
        let mesh = self.mesh.as_ref().expect("a running mesh");
        crate::with_key(mesh.local.clone(), Some(key))
    }

    /// A channel with the bootstrap admin key.
    pub async fn admin(&self) -> AuthedChannel {
        self.channel(Some(&self.admin_key)).await
    }

    /// A new tenant (see [`crate::tenant`]): its owner's key and a channel that sends it.
    pub async fn tenant(&self, account: &str) -> (String, AuthedChannel) {
        let key = crate::tenant(&self.admin().await, account).await;
        let channel = self.channel(Some(&key)).await;
        (key, channel)
    }

    /// A channel with the key of a new tenant (see [`crate::tenant`]).
    pub async fn tenant_channel(&self, account: &str) -> AuthedChannel {
        self.tenant(account).await.1
    }

    /// The events of the mesh's bus whose subjects match `filter`, from now on.
    pub async fn subscribe(&self, filter: &str) -> crate::events::Events {
        let subscribed = self.bus.subscribe(filter).await;
        subscribed.unwrap_or_else(|e| panic!("subscribe to {filter}: {e}"))
    }

    /// The subject on the wire for a logical subject (NATS prefix applied).
    pub fn wire_subject(&self, subject: &str) -> String {
        match &self.nats {
            Some(nats) => format!("{}{subject}", nats.prefix),
            None => subject.to_owned(),
        }
    }

    /// A connection of the test's own to the mesh's identity database.
    pub async fn identity_db(&self) -> sea_orm::DatabaseConnection {
        kiln_store::connect(&self.config.server.database_url_for("identity"))
            .await
            .expect("connect to the identity database")
    }

    /// Stops the mesh and waits for its background work.
    pub async fn shutdown(mut self) {
        if let Some(mesh) = self.mesh.take() {
            mesh.shutdown().await.expect("clean shutdown");
        }
        if let Some(bus) = self.own_stream.take() {
            // Best effort: the server may be one the test already stopped.
            let _ = tokio::time::timeout(Duration::from_secs(2), bus.delete_stream()).await;
        }
    }
}

/// A folder that links the given folders of the asset cache and ONNX Runtime's, so a mesh
/// imports just those models into its library (and finds ONNX Runtime beside them).
pub fn asset_dir_with(folders: &[&str]) -> tempfile::TempDir {
    let cache = kiln_registry::asset_dir(&Default::default());
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
) -> crate::TestMesh {
    library_mesh_with(
        assets,
        crate::MeshOptions {
            inference,
            ..Default::default()
        },
    )
    .await
}

/// [`library_mesh`] with the rest of `options` (billing settings, a NATS server...).
pub async fn library_mesh_with(
    assets: &std::path::Path,
    options: crate::MeshOptions,
) -> crate::TestMesh {
    crate::TestMesh::start_with(crate::MeshOptions {
        import_library: true,
        registry: Some(kiln_registry::config::RegistryConfig {
            asset_dir: assets.display().to_string(),
            ..Default::default()
        }),
        ..options
    })
    .await
}
