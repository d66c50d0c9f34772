//! A Kiln of separate processes, as an operator runs it: identity, registry, billing, the
//! scheduler and inference nodes, each `kiln serve <service>` on its own port and data dir,
//! on a NATS server of the test's own and PostgreSQL (`KILN_TEST_DATABASE_URL`, one schema
//! for the cluster) or a SQLite file per service. Each process can be killed (SIGKILL),
//! stopped (SIGTERM) and started again on the same port and state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use kiln_tests::inference::ort_library;
use kiln_tests::{
    AuthedChannel, Backends, NatsServer, TestDatabase, channel_to, free_port, wait_for,
    wait_for_listener,
};
use sea_orm::{ConnectionTrait, Statement};
use tokio::process::{Child, Command};

pub const SERVICE_TOKEN: &str = "faults-service-token-0123456789abcdef";

/// One `kiln serve` process.
pub struct Process {
    service: &'static str,
    listen: String,
    /// `https` when the cluster runs over TLS.
    scheme: &'static str,
    data: tempfile::TempDir,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Process {
    fn log(&self) -> PathBuf {
        self.data.path().join("kiln.log")
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file");
        let mut command = Command::new(super::kiln_binary());
        command
            .args(["serve", self.service])
            .env_remove("KILN_DATABASE_URL")
            .env_remove("KILN_NATS_URL")
            .env("KILN_LISTEN", &self.listen)
            .env("KILN_DATA_DIR", self.data.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(command.spawn().expect("kiln serve starts"));
    }

    /// SIGKILL: the process ends at once, as a crash or an OOM kill ends it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("SIGKILL");
        }
    }

    /// SIGTERM, then waits for its exit (within `within`); whether it exited cleanly.
    async fn terminate(&mut self, within: Duration) -> bool {
        let mut child = self.child.take().expect("running");
        let pid = child.id().expect("not reaped").to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().await;
        assert!(sent.unwrap().success(), "kill -TERM {pid}");
        let exit = tokio::time::timeout(within, child.wait()).await;
        let exit = exit.unwrap_or_else(|_| panic!("{} exits within {within:?}", self.service));
        exit.expect("wait").success()
    }

    /// Sets `KILN_*` variable `key` for its next start (None: unsets it).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// SIGTERM (a clean stop within the grace), then a start on the same port and data.
    pub async fn rolling_restart(&mut self) {
        assert!(
            self.terminate(Duration::from_secs(20)).await,
            "{} stops cleanly",
            self.service
        );
        self.restart().await;
    }

    /// Starts it again on the same port and data, and waits until it listens.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is stopped first", self.service);
        self.start();
        self.listening().await;
    }

    async fn listening(&self) {
        let what = format!("{} to listen on {}", self.service, self.listen);
        wait_for_listener(&self.listen, Duration::from_secs(60), &what).await;
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.listen)
    }
}

/// The processes of one Kiln, by name (`identity`, `inference-1`...).
pub struct Cluster {
    pub nats: NatsServer,
    /// PostgreSQL's URL (with the cluster's schema), or None: SQLite files.
    database_url: Option<String>,
    pub processes: BTreeMap<String, Process>,
    pub admin_key: String,
    /// The CA and server certificate of a cluster over TLS.
    pub tls: Option<Certificates>,
}

/// A CA of the test's own and a certificate it signed for 127.0.0.1 (openssl makes them).
pub struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    fn make() -> Self {
        let dir = tempfile::tempdir().expect("a dir");
        let script = r#"set -e
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -keyout ca.key -out ca.pem -days 3650 -subj "/CN=Kiln test CA"
openssl req $ec -keyout server.key -out server.csr -subj "/CN=localhost"
printf "subjectAltName=IP:127.0.0.1,DNS:localhost
" > san.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
  -extfile san.ext -out server.pem"#;
        crate::run_ok(
            std::process::Command::new("bash")
                .args(["-c", script])
                .current_dir(dir.path()),
        );
        Self { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

/// What a cluster runs beside identity, registry, billing and the scheduler.
pub struct Shape {
    /// Inference nodes (`inference-1`...).
    pub nodes: usize,
    /// More `KILN_*` settings for every process.
    pub env: Vec<(&'static str, String)>,
    /// Every process serves TLS and calls the others at `https://` URLs, trusting a CA of
    /// the test's own (which the test's channels trust too).
    pub tls: bool,
    /// A PostgreSQL of the scenario's own (its URL) instead of the suite's database.
    pub database_url: Option<String>,
}

impl Shape {
    /// `nodes` inference nodes, plaintext, on the suite's database.
    pub fn nodes(nodes: usize) -> Self {
        Self {
            nodes,
            env: vec![],
            tls: false,
            database_url: None,
        }
    }
}

impl Cluster {
    pub async fn start(shape: Shape) -> Self {
        kiln_tests::init_tracing();
        let nats = NatsServer::start().await;
        let database_url = match shape.database_url {
            Some(url) => Some(url),
            None => {
                let db = TestDatabase::create(&Backends::from_env()).await;
                db.expect("test database").url
            }
        };
        let ports: BTreeMap<&str, String> = ["identity", "registry", "billing", "scheduler"]
            .into_iter()
            .map(|s| (s, format!("127.0.0.1:{}", free_port())))
            .collect();
        let tls = shape.tls.then(Certificates::make);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = |s: &str| format!("{scheme}://{}", ports[s]);
        let mut shared = vec![
            ("KILN_NATS_URL".to_owned(), nats.url()),
            ("KILN_SERVICE_TOKEN".to_owned(), SERVICE_TOKEN.to_owned()),
            ("KILN_IDENTITY_URL".to_owned(), url("identity")),
            ("KILN_REGISTRY_URL".to_owned(), url("registry")),
            ("KILN_BILLING_URL".to_owned(), url("billing")),
            ("KILN_SHUTDOWN_GRACE".to_owned(), "5s".to_owned()),
            // Faults are noticed within a second or two rather than the defaults' ten.
            (
                "KILN_SCHEDULER__HEARTBEAT_INTERVAL".to_owned(),
                "500ms".to_owned(),
            ),
            (
                "KILN_SCHEDULER__NODE_LOST_AFTER".to_owned(),
                "2s".to_owned(),
            ),
            ("RUST_LOG".to_owned(), "info".to_owned()),
            (
                "KILN_INFERENCE__ORT_DYLIB_PATH".to_owned(),
                ort_library().display().to_string(),
            ),
        ];
        if let Some(db) = &database_url {
            shared.push(("KILN_DATABASE_URL".to_owned(), db.clone()));
        }
        if let Some(certs) = &tls {
            shared.push(("KILN_TLS_CERT_FILE".to_owned(), certs.path("server.pem")));
            shared.push(("KILN_TLS_KEY_FILE".to_owned(), certs.path("server.key")));
            shared.push(("KILN_TLS_CA_FILE".to_owned(), certs.path("ca.pem")));
            let ca = std::fs::read(certs.path("ca.pem")).expect("the CA");
            kiln_core::tls::trust(&ca);
        }
        shared.extend(shape.env.into_iter().map(|(k, v)| (k.to_owned(), v)));
        let process = |service: &'static str, listen: String, extra: Vec<(String, String)>| {
            let mut env = shared.clone();
            if service == "identity" {
                env.retain(|(k, _)| k != "KILN_IDENTITY_URL");
            }
            env.extend(extra);
            Process {
                service,
                listen,
                scheme,
                data: tempfile::tempdir().expect("data dir"),
                env,
                child: None,
            }
        };
        let mut processes = BTreeMap::new();
        for service in ["identity", "registry", "billing", "scheduler"] {
            let p = process(service, ports[service].clone(), vec![]);
            processes.insert(service.to_owned(), p);
        }
        for n in 1..=shape.nodes {
            let id = format!("inference-{n}");
            let extra = vec![
                ("KILN_INFERENCE__SCHEDULER_URL".to_owned(), url("scheduler")),
                ("KILN_INFERENCE__NODE_ID".to_owned(), id.clone()),
            ];
            let listen = format!("127.0.0.1:{}", free_port());
            processes.insert(id, process("inference", listen, extra));
        }
        let mut cluster = Self {
            nats,
            database_url,
            processes,
            admin_key: String::new(),
            tls,
        };
        // Identity first: it makes the admin key the others' callers need.
        for name in ["identity", "registry", "billing", "scheduler"] {
            let p = cluster.process(name);
            p.start();
            p.listening().await;
        }
        let key_file = cluster.processes["identity"].data.path().join("admin.key");
        cluster.admin_key = wait_for(Duration::from_secs(30), "the admin key", || async {
            let key = std::fs::read_to_string(&key_file).ok()?;
            key.ends_with('\n').then(|| key.trim().to_owned())
        })
        .await;
        let nodes: Vec<String> = (1..=shape.nodes)
            .map(|n| format!("inference-{n}"))
            .collect();
        for node in &nodes {
            let p = cluster.process(node);
            p.start();
            p.listening().await;
        }
        cluster.nodes_ready(Duration::from_secs(60)).await;
        cluster
    }

    /// Waits until the scheduler lists every inference node of the cluster as READY.
    pub async fn nodes_ready(&self, timeout: Duration) {
        let nodes = self
            .processes
            .keys()
            .filter(|n| n.starts_with("inference-"))
            .count();
        let admin = self.channel("scheduler", None).await;
        let ready = kiln_proto::scheduler::v1::node::State::Ready as i32;
        wait_for(timeout, "every node registered", || async {
            let listed = kiln_tests::deployments::list_nodes(&admin).await;
            let up = listed.iter().filter(|n| n.state == ready).count();
            (up == nodes).then_some(())
        })
        .await;
    }

    /// SIGTERM to every process at once; the ones that did not exit cleanly.
    pub async fn terminate_all(&mut self, within: Duration) -> Vec<String> {
        let stops = self
            .processes
            .iter_mut()
            .map(|(name, p)| async move { (!p.terminate(within).await).then(|| name.clone()) });
        futures::future::join_all(stops)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Starts every process again, in the order of a first start.
    pub async fn restart_all(&mut self) {
        let names: Vec<String> = self.processes.keys().cloned().collect();
        let (services, nodes): (Vec<_>, Vec<_>) = names
            .into_iter()
            .partition(|n| !n.starts_with("inference-"));
        for name in ["identity", "registry", "billing", "scheduler"] {
            assert!(services.iter().any(|s| s == name));
            self.process(name).restart().await;
        }
        for node in nodes {
            self.process(&node).restart().await;
        }
    }

    /// A cluster of `shape` where tenant acme's own MiniLM is deployed and ready:
    /// (cluster, acme's key, the model's name, the deployment's name).
    pub async fn serving_minilm(shape: Shape) -> (Self, String, String, String) {
        let cluster = Self::start(shape).await;
        let key = cluster.tenant("acme").await;
        let registry = cluster.channel("registry", Some(&key)).await;
        let model = kiln_tests::inference::private_minilm(&registry, "acme", "minilm").await;
        let scheduler = cluster.channel("scheduler", Some(&key)).await;
        let deployment = kiln_tests::deployments::deploy(&scheduler, &model)
            .await
            .name;
        (cluster, key, model, deployment)
    }

    pub fn process(&mut self, name: &str) -> &mut Process {
        self.processes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Process `name`'s data dir.
    pub fn data_dir(&self, name: &str) -> &std::path::Path {
        self.processes[name].data.path()
    }

    /// A channel to process `name` with `key` (None: the admin's).
    pub async fn channel(&self, name: &str, key: Option<&str>) -> AuthedChannel {
        let key = key.unwrap_or(&self.admin_key);
        channel_to(&self.processes[name].url(), Some(key)).await
    }

    /// A new tenant `account`: its owner's key.
    pub async fn tenant(&self, account: &str) -> String {
        kiln_tests::tenant(&self.channel("identity", None).await, account).await
    }

    /// Events recorded in outboxes and not yet published (`service subject`), over every
    /// process's database, and usage an inference node has not yet written to its outbox
    /// (`usage pending`, in its journal).
    pub async fn unsent(&self) -> Vec<String> {
        let urls: Vec<String> = match &self.database_url {
            Some(url) => vec![url.clone()],
            None => self
                .processes
                .values()
                .flat_map(|p| std::fs::read_dir(p.data.path()).expect("data dir"))
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "db"))
                .map(|p| format!("sqlite://{}?mode=ro", p.display()))
                .collect(),
        };
        let mut left = Vec::new();
        for url in urls {
            let db = kiln_store::connect(&url).await.expect("connect");
            let backend = db.get_database_backend();
            let outbox = "SELECT service, subject FROM kiln_outbox";
            // A database without the table (another service's) holds none.
            if let Ok(rows) = db.query_all(Statement::from_string(backend, outbox)).await {
                for row in rows {
                    let service: String = row.try_get("", "service").expect("service");
                    let subject: String = row.try_get("", "subject").expect("subject");
                    left.push(format!("{service} {subject}"));
                }
            }
        }
        for process in self.processes.values() {
            let n = kiln_inference::unsettled_usage(process.data.path()).expect("journal");
            left.extend((0..n).map(|_| "usage pending".to_owned()));
        }
        left
    }
}

impl Drop for Cluster {
    /// A failed scenario shows the end of each process's log.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (name, p) in &self.processes {
            let log = std::fs::read_to_string(p.log()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(25)..].join("\n");
            eprintln!("---- {name} (last lines of its log)\n{tail}");
        }
    }
}
