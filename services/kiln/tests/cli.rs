//! The `kiln` binary as a user runs it: `kiln dev` and the client commands; logs never hold a
//! secret; a bad configuration value stops start-up naming the key.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_tests::{Ran, free_port, wait_for, wait_for_listener};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

#[path = "cli/compose.rs"]
mod compose;
#[path = "cli/shutdown.rs"]
mod shutdown;
#[path = "cli/trace.rs"]
mod trace;

fn kiln_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// The bootstrap admin key a server writes into `data_dir`, once it is whole.
async fn admin_key(data_dir: &Path) -> String {
    let file = data_dir.join("admin.key");
    let written = wait_for(Duration::from_secs(30), "the admin key", || async {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|k| k.ends_with('\n'))
    })
    .await;
    written.trim().to_owned()
}

/// Sends `child` (`what`) SIGTERM and waits for its clean exit.
async fn terminate(child: &mut Child, what: &str) {
    let pid = child.id().unwrap().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().await;
    assert!(sent.unwrap().success());
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} stops within its grace period"))
        .unwrap();
    assert!(exit.success(), "{what} exits cleanly on SIGTERM: {exit:?}");
}

/// A `kiln dev` of the test's own, on a free port with a data dir of its own.
struct KilnDev {
    child: Child,
    listen: String,
    data: tempfile::TempDir,
}

impl KilnDev {
    /// Starts `kiln dev` (its output discarded unless `configure` says otherwise, with the
    /// environment `configure` sets) and waits until it has written its admin key and
    /// accepts connections.
    async fn start(configure: impl FnOnce(&mut Command)) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), configure).await
    }

    /// [`KilnDev::start`] on `data` (a restart: the data dir of a stopped one).
    async fn start_in(data: tempfile::TempDir, configure: impl FnOnce(&mut Command)) -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(kiln_binary());
        command
            .args(["dev", "--listen", &listen, "--http-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        configure(&mut command);
        let child = command.spawn().unwrap();
        let dev = Self {
            child,
            listen,
            data,
        };
        admin_key(dev.data_dir()).await;
        let what = "kiln dev to accept connections";
        wait_for_listener(&dev.listen, Duration::from_secs(30), what).await;
        dev
    }

    /// SIGTERM; waits for it to exit (cleanly) and gives back its data dir.
    async fn terminate(mut self) -> tempfile::TempDir {
        terminate(&mut self.child, "kiln dev").await;
        self.data
    }

    fn server(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn data_dir(&self) -> &Path {
        self.data.path()
    }

    fn key_file(&self) -> PathBuf {
        self.data_dir().join("admin.key")
    }

    /// `kiln --server <this> …` with no key or account of the environment's.
    fn command(&self) -> Command {
        let mut command = Command::new(kiln_binary());
        command
            .args(["--server", &self.server()])
            .env_remove("KILN_API_KEY")
            .env_remove("KILN_ACCOUNT");
        command
    }

    /// Runs the CLI as the admin (its key from the data dir): the words of `line`, then
    /// `extra` as they are (paths, texts with spaces).
    async fn cli(&self, line: &str, extra: &[&str]) -> Ran {
        let out = self
            .command()
            .args(line.split_whitespace())
            .args(extra)
            .env("KILN_DATA_DIR", self.data_dir())
            .output()
            .await
            .unwrap();
        Ran::from(out)
    }

    /// [`KilnDev::cli`] that must succeed; its stdout.
    async fn ok(&self, line: &str, extra: &[&str]) -> String {
        let ran = self.cli(line, extra).await;
        assert!(ran.ok, "kiln {line} {extra:?}: {}", ran.err);
        ran.out
    }
}

#[tokio::test]
async fn kiln_dev_serves_the_cli_and_logs_no_secret() {
    let mut dev = KilnDev::start(|command| {
        command
            .env("RUST_LOG", "debug")
            .env_remove("KILN_NATS_URL")
            .env_remove("KILN_DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    })
    .await;
    let key_file = dev.key_file();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "admin.key is private");
    }
    let admin_key = admin_key(dev.data_dir()).await;
    // The containers' health check: no key, SERVING, exit 0; nothing listening: exit 1.
    let health = Ran::from(dev.command().arg("health").output().await.unwrap());
    assert!(health.ok && health.out.trim() == "SERVING", "{health:?}");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let down = Command::new(kiln_binary())
        .args(["health", "--server", &closed])
        .output()
        .await
        .unwrap();
    assert!(!Ran::from(down).ok, "nothing serves at {closed}");

    let out = dev
        .ok("create account acme --email owner@acme.example", &[])
        .await;
    assert!(out.contains("accounts/acme"), "{out}");
    let alice = "create user alice --account acme --email alice@acme.example --role admin";
    dev.ok(alice, &[]).await;
    let out = dev
        .ok("create api-key --account acme --user alice -o json", &[])
        .await;
    let key: serde_json::Value = serde_json::from_str(&out).unwrap();
    let alice_key = key["key"].as_str().unwrap().to_owned();
    assert!(alice_key.starts_with("kiln_"), "{out}");

    // Alice's key, through the environment, sees her account only.
    let out = dev
        .command()
        .args(["list", "accounts", "-o", "json"])
        .env("KILN_API_KEY", &alice_key)
        .output()
        .await
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        listed.contains("accounts/acme") && !listed.contains("accounts/kiln"),
        "{listed}"
    );

    let bad = dev.cli("create account Bad-ID", &[]).await;
    assert!(!bad.ok);
    assert!(
        bad.err.contains("InvalidArgument") && bad.err.contains("account_id"),
        "{}",
        bad.err
    );
    let out = dev.ok("list users --account acme", &[]).await;
    assert!(out.contains("accounts/acme/users/alice"), "{out}");

    // Billing: quotas, a spend limit changed, a usage report.
    let out = dev.ok("list quotas --account acme", &[]).await;
    assert!(
        out.contains("accounts/acme/quotas/accelerator-nvidia-h100-80gb")
            && out.contains("accounts/acme/quotas/monthly-spend-usd")
            && out.contains("requests/min"),
        "{out}"
    );
    let spend = "update quota monthly-spend-usd --value 50 --account acme -o json";
    let out = dev.ok(spend, &[]).await;
    let quota: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(quota["value"], "50", "{out}");
    let usage = "get usage --account acme --group-by model,day";
    let out = dev.ok(usage, &[]).await;
    assert!(out.contains("usage from") && out.contains("COST"), "{out}");
    let colour = dev.cli("get usage --group-by colour", &[]).await;
    assert!(
        !colour.ok && colour.err.contains("--group-by"),
        "{}",
        colour.err
    );

    // Stop it and read everything it logged.
    let child = &mut dev.child;
    child.start_kill().unwrap();
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .await
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    let _ = child.wait().await;
    assert!(
        stderr.contains("serving gRPC"),
        "debug logs were captured: {stderr}"
    );
    assert!(
        stdout.contains(&admin_key),
        "the admin key is printed once, on stdout"
    );
    for secret in [&admin_key, &alice_key] {
        assert!(
            !stderr.contains(secret.as_str()),
            "a secret appears in the logs"
        );
    }
    assert!(
        !stdout.contains(alice_key.as_str()),
        "a user's key is never printed by the server"
    );
}

/// Runs `kiln serve <args>` with `env` set and returns its stderr (it must fail).
async fn failed_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = tokio::process::Command::new(kiln_binary());
    command.arg("serve").args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().await.unwrap();
    assert!(!out.status.success(), "{args:?} {env:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn an_unknown_setting_or_a_missing_url_stops_startup_naming_it() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("kiln.toml");
    std::fs::write(&config, "listen_adress = \"127.0.0.1:1\"\n").unwrap();
    let path = config.display().to_string();
    let err = failed_start(&["identity", "--config", &path], &[]).await;
    assert!(
        err.contains("unknown key listen_adress") && err.contains("kiln.toml"),
        "{err}"
    );

    let err = failed_start(&["identity"], &[("KILN_LISTEN_ADDR", "127.0.0.1:1")]).await;
    assert!(
        err.contains("unknown key listen_addr") && err.contains("KILN_LISTEN_ADDR"),
        "{err}"
    );

    let err = failed_start(&["registry"], &[("KILN_REGISTRY__MAX_FILE_BYTE", "1")]).await;
    assert!(
        err.contains("registry.max_file_byte") && err.contains("KILN_REGISTRY__MAX_FILE_BYTE"),
        "{err}"
    );

    // A service alone needs the URLs of the services it calls.
    let err = failed_start(
        &["scheduler"],
        &[("KILN_IDENTITY_URL", "http://127.0.0.1:1")],
    )
    .await;
    assert!(err.contains("registry_url: is required"), "{err}");
    let err = failed_start(&["nobody"], &[]).await;
    assert!(err.contains("unknown service \"nobody\""), "{err}");
}

#[tokio::test]
async fn a_bad_config_value_stops_startup_naming_the_key() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();
    let env = [
        ("KILN_LISTEN", "not-an-address"),
        ("KILN_DATA_DIR", &data_dir),
    ];
    let err = failed_start(&["identity"], &env).await;
    assert!(err.contains("listen"), "{err}");

    let config = data.path().join("kiln.toml");
    std::fs::write(&config, "auth_cache_ttl = \"0s\"\n").unwrap();
    let path = config.display().to_string();
    let err = failed_start(&["identity", "--config", &path], &[]).await;
    assert!(err.contains("auth_cache_ttl"), "{err}");

    let env = [("KILN_DATABASE_URL", "mysql://nope")];
    let err = failed_start(&["identity"], &env).await;
    assert!(err.contains("database_url"), "{err}");
}

mod otlp {
    //! A collector of the test's own, to see what `kiln dev` exports.
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use tokio::sync::mpsc;

    pub struct Collector(pub mpsc::UnboundedSender<ExportTraceServiceRequest>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let _ = self.0.send(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Starts the collector; returns its endpoint and what it receives.
    pub async fn start() -> (String, mpsc::UnboundedReceiver<ExportTraceServiceRequest>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Collector(tx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (endpoint, rx)
    }
}

#[tokio::test]
async fn spans_are_exported_over_otlp_when_an_endpoint_is_set() {
    let (endpoint, mut received) = otlp::start().await;
    let dev = KilnDev::start(|command| {
        command.env("KILN_OTLP_ENDPOINT", &endpoint);
    })
    .await;
    dev.ok("list accounts", &[]).await;
    // SIGTERM: kiln dev stops cleanly and flushes its spans.
    dev.terminate().await;

    let mut span_names = Vec::new();
    let mut service_names = Vec::new();
    while let Ok(request) = received.try_recv() {
        for resource_spans in request.resource_spans {
            if let Some(resource) = resource_spans.resource {
                for attr in resource.attributes {
                    if attr.key == "service.name" {
                        service_names.push(format!("{:?}", attr.value));
                    }
                }
            }
            for scope in resource_spans.scope_spans {
                span_names.extend(scope.spans.into_iter().map(|s| s.name));
            }
        }
    }
    assert!(
        span_names
            .iter()
            .any(|n| n == "kiln.identity.v1.AccountService/ListAccounts"),
        "the call's span was exported: {span_names:?}"
    );
    assert!(
        service_names.iter().any(|n| n.contains("\"kiln\"")),
        "{service_names:?}"
    );
}

#[tokio::test]
async fn models_and_datasets_through_the_cli() {
    let empty_assets = tempfile::tempdir().unwrap();
    let dev = KilnDev::start(|command| {
        // No library import in this test: its asset cache is empty.
        command.env("KILN_REGISTRY__ASSET_DIR", empty_assets.path());
    })
    .await;
    let assets = kiln_tests::asset("all-minilm-l6-v2/model.onnx")
        .parent()
        .unwrap()
        .to_owned();
    dev.ok("create account acme", &[]).await;
    let model_dir = assets.display().to_string();
    let created = dev
        .cli("--account acme create model minilm", &[&model_dir])
        .await;
    let (out, err) = (&created.out, &created.err);
    assert!(created.ok, "{err}");
    assert!(
        out.contains("EMBEDDING_MODEL") && out.contains("READY"),
        "{out}"
    );
    assert!(
        err.contains("model.onnx") && err.contains("100.0%"),
        "a progress line: {err}"
    );

    let dest = dev.data_dir().join("downloaded");
    let download = "--account acme download model minilm --dest";
    dev.ok(download, &[&dest.display().to_string()]).await;
    for file in ["model.onnx", "tokenizer.json"] {
        assert!(
            std::fs::read(dest.join(file)).unwrap() == std::fs::read(assets.join(file)).unwrap(),
            "{file} comes back identical"
        );
    }

    let jsonl = dev.data_dir().join("train.jsonl");
    let lines: Vec<String> = (0..5)
        .map(|i| format!(r#"{{"prompt": "q{i}", "completion": "a{i}"}}"#))
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let train = "--account acme create dataset train -o json";
    let out = dev.ok(train, &[&jsonl.display().to_string()]).await;
    let dataset: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dataset["state"], "READY");
    assert_eq!(dataset["example_count"], "5");
    let out = dev.ok("--account acme list models", &[]).await;
    assert!(out.contains("accounts/acme/models/minilm"), "{out}");
    // Deployed first (one CPU replica on the dev node), then it embeds (on tract: this kiln
    // dev has no ONNX Runtime library).
    let deploy = "--account acme create deployment minilm --deployment-id embedder --wait -o json";
    let out = dev.ok(deploy, &[]).await;
    let deployment: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(deployment["state"], "READY", "{out}");
    assert_eq!(deployment["accelerator_type"], "CPU", "{out}");
    let nodes = dev.cli("list nodes", &[]).await;
    assert!(
        nodes.ok && nodes.out.contains("READY") && nodes.out.contains("CPU"),
        "{}{}",
        nodes.out,
        nodes.err
    );
    let listed = dev.cli("--account acme list deployments", &[]).await;
    assert!(
        listed.ok && listed.out.contains("accounts/acme/deployments/embedder"),
        "{}{}",
        listed.out,
        listed.err
    );
    let texts = ["hello world", "good morning"];
    let out = dev.ok("--account acme embed minilm", &texts).await;
    assert_eq!(
        out.matches(" 384 ").count(),
        2,
        "two 384-dimension rows: {out}"
    );
    // A deployed model cannot be deleted; once its deployment is gone, it can.
    let delete_model = "--account acme delete model minilm";
    let refused = dev.cli(delete_model, &[]).await;
    assert!(
        !refused.ok && refused.err.contains("is deployed"),
        "{}",
        refused.err
    );
    // The replica's last heartbeat may still count the embed above as in flight.
    let delete_deployment = "--account acme delete deployment embedder --hard --ignore-checks";
    dev.ok(delete_deployment, &[]).await;
    // The registry learns of the undeploy from the scheduler's event.
    let what = "the model to be deletable";
    let out = wait_for(Duration::from_secs(20), what, || async {
        let deleted = dev.cli(delete_model, &[]).await;
        deleted.ok.then_some(deleted.out)
    })
    .await;
    assert!(out.contains("deleted"), "{out}");
}
