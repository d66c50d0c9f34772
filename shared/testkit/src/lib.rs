//! Starts the Kiln mesh in-process on `127.0.0.1:0` for tests.
//!
//! Storage and bus follow the environment: SQLite files and the in-process bus by default;
//! PostgreSQL when `KILN_TEST_DATABASE_URL` is set (each mesh gets its own schema) and NATS
//! JetStream when `KILN_TEST_NATS_URL` is set (each mesh gets its own stream and subject
//! prefix, so tests run in parallel on one server).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use kiln::config::KilnConfig;
use kiln::mesh::Mesh;
use kiln_core::telemetry::OutgoingInterceptor;
use kiln_events::EventBus;
use kiln_events::memory::InProcessBus;
use kiln_events::nats::{NatsBus, NatsConfig};
use sea_orm::ConnectionTrait;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A channel that sends a bearer key (or none) and the trace context.
pub type AuthedChannel = InterceptedService<Channel, OutgoingInterceptor>;

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
        let guard = kiln_core::telemetry::init_with_default_filter(
            "kiln-tests",
            kiln_core::config::LogFormat::Text,
            None,
            "warn",
        )
        .expect("telemetry");
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
    pub mesh: Option<Mesh>,
    pub addr: SocketAddr,
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
        let mesh = Mesh::start(&config, listener, Some(bus.clone()))
            .await
            .expect("mesh starts");
        let admin_key = match &mesh.new_admin_key {
            Some(k) => k.clone(),
            None => String::new(),
        };
        Self {
            addr: mesh.addr,
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

    /// A channel to the mesh that sends `key` (None: no authorization header).
    pub async fn channel(&self, key: Option<&str>) -> AuthedChannel {
        channel_to(&self.url(), key).await
    }

    /// A channel with the bootstrap admin key.
    pub async fn admin(&self) -> AuthedChannel {
        self.channel(Some(&self.admin_key)).await
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

/// A channel to `url` that sends `key` as a bearer token (None: no authorization header).
pub async fn channel_to(url: &str, key: Option<&str>) -> AuthedChannel {
    let channel = kiln_core::server::endpoint(url)
        .expect("url")
        .connect()
        .await
        .expect("connect to mesh");
    InterceptedService::new(
        channel,
        OutgoingInterceptor::new(key).expect("key is a header value"),
    )
}

/// A file of the asset cache (`deploy/fetch-assets.sh` fills it; `.ci/run` runs it). Panics
/// with what to do when it is missing: tests on real models never skip silently.
pub fn asset(relative: &str) -> PathBuf {
    let dir = kiln_registry::library::asset_dir(&Default::default());
    let path = dir.join(relative);
    assert!(
        path.is_file(),
        "{} is missing: run `bash deploy/fetch-assets.sh` (or set KILN_ASSET_DIR)",
        path.display()
    );
    path
}

/// Polls `check` every 10 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A nats-server of the test's own, with JetStream and a store dir that survives restarts,
/// so a test can stop and start the bus under a running mesh.
pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<tokio::process::Child>,
}

/// The nats-server binary: `KILN_TEST_NATS_SERVER`, then PATH, then /usr/sbin.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_TEST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
    {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("nats-server not found (set KILN_TEST_NATS_SERVER or install it; .ci/run does)");
}

impl NatsServer {
    pub async fn start() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let mut server = Self {
            port,
            store: tempfile::tempdir().expect("store dir"),
            child: None,
        };
        server.resume().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and store.
    pub async fn resume(&mut self) {
        let child = tokio::process::Command::new(nats_server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for(
            Duration::from_secs(10),
            "nats-server to accept connections",
            || {
                let addr = addr.clone();
                async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
            },
        )
        .await;
    }

    /// Stops the server (kill), as an outage would.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }
}

/// An S3-compatible server of the test's own (moto's server, from PyPI: `.ci/run` installs it)
/// with one bucket, `kiln`.
pub struct S3Server {
    pub port: u16,
    child: tokio::process::Child,
}

impl S3Server {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let child = tokio::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let addr = format!("127.0.0.1:{port}");
        wait_for(
            Duration::from_secs(30),
            "the S3 server (python3 -m moto.server; `pip install 'moto[server]'`) to listen",
            || {
                let addr = addr.clone();
                async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
            },
        )
        .await;
        // Create the bucket with a plain path-style PUT (the server takes any credentials).
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!(
            "PUT /kiln HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "bucket creation: {response}"
        );
        Self { port, child }
    }

    /// Registry settings that store artifacts in this server's bucket.
    pub fn registry_config(&self) -> kiln_registry::config::RegistryConfig {
        kiln_registry::config::RegistryConfig {
            object_store_url: "s3://kiln/artifacts".to_owned(),
            s3_endpoint: format!("http://127.0.0.1:{}", self.port),
            s3_region: "us-east-1".to_owned(),
            s3_access_key_id: "test".to_owned(),
            s3_secret_access_key: "test".to_owned(),
            s3_allow_http: true,
            ..Default::default()
        }
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
