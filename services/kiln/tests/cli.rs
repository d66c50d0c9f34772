//! The `kiln` binary as a user runs it: `kiln dev` and the client commands; logs never hold a
//! secret; a bad configuration value stops start-up naming the key.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use kiln_tests::wait_for;
use tokio::io::AsyncReadExt;

fn kiln_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `kiln dev` has written its admin key and accepts connections.
async fn wait_until_ready(key_file: &std::path::Path, listen: &str) {
    wait_for(
        Duration::from_secs(30),
        "kiln dev to write admin.key",
        || async move {
            std::fs::read_to_string(key_file)
                .ok()
                .filter(|k| k.ends_with('\n'))
        },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "kiln dev to accept connections",
        || async move {
            tokio::net::TcpStream::connect(listen)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

async fn cli(server: &str, data_dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(kiln_binary())
        .args(["--server", server])
        .args(args)
        .env("KILN_DATA_DIR", data_dir)
        .env_remove("KILN_API_KEY")
        .env_remove("KILN_ACCOUNT")
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn kiln_dev_serves_the_cli_and_logs_no_secret() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = format!("http://{listen}");
    let mut child = tokio::process::Command::new(kiln_binary())
        .args(["dev", "--listen", &listen, "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "debug")
        .env_remove("KILN_NATS_URL")
        .env_remove("KILN_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let key_file = data.path().join("admin.key");
    wait_until_ready(&key_file, &listen).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "admin.key is private");
    }
    let admin_key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();

    let (ok, out, err) = cli(
        &server,
        data.path(),
        &["create", "account", "acme", "--email", "owner@acme.example"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("accounts/acme"), "{out}");
    let (ok, _, err) = cli(
        &server,
        data.path(),
        &[
            "create",
            "user",
            "alice",
            "--account",
            "acme",
            "--email",
            "alice@acme.example",
            "--role",
            "admin",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, out, err) = cli(
        &server,
        data.path(),
        &[
            "create",
            "api-key",
            "--account",
            "acme",
            "--user",
            "alice",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let key: serde_json::Value = serde_json::from_str(&out).unwrap();
    let alice_key = key["key"].as_str().unwrap().to_owned();
    assert!(alice_key.starts_with("kiln_"), "{out}");

    // Alice's key, through the environment, sees her account only.
    let out = tokio::process::Command::new(kiln_binary())
        .args(["--server", &server, "list", "accounts", "-o", "json"])
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

    let (ok, _, err) = cli(&server, data.path(), &["create", "account", "Bad-ID"]).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("account_id"),
        "{err}"
    );
    let (ok, out, _) = cli(
        &server,
        data.path(),
        &["list", "users", "--account", "acme"],
    )
    .await;
    assert!(ok && out.contains("accounts/acme/users/alice"), "{out}");

    // Billing: quotas, a spend limit changed, a usage report.
    let (ok, out, err) = cli(
        &server,
        data.path(),
        &["list", "quotas", "--account", "acme"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("accounts/acme/quotas/accelerator-nvidia-h100-80gb")
            && out.contains("accounts/acme/quotas/monthly-spend-usd")
            && out.contains("requests/min"),
        "{out}"
    );
    let (ok, out, err) = cli(
        &server,
        data.path(),
        &[
            "update",
            "quota",
            "monthly-spend-usd",
            "--value",
            "50",
            "--account",
            "acme",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let quota: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(quota["value"], "50", "{out}");
    let (ok, out, err) = cli(
        &server,
        data.path(),
        &[
            "get",
            "usage",
            "--account",
            "acme",
            "--group-by",
            "model,day",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("usage from") && out.contains("COST"), "{out}");
    let (ok, _, err) = cli(
        &server,
        data.path(),
        &["get", "usage", "--group-by", "colour"],
    )
    .await;
    assert!(!ok && err.contains("--group-by"), "{err}");

    // Stop it and read everything it logged.
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
    let out = tokio::process::Command::new(kiln_binary())
        .args(["serve", "identity"])
        .env("KILN_LISTEN", "not-an-address")
        .env("KILN_DATA_DIR", data.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen"), "{err}");

    let config = data.path().join("kiln.toml");
    std::fs::write(&config, "auth_cache_ttl = \"0s\"\n").unwrap();
    let out = tokio::process::Command::new(kiln_binary())
        .args(["serve", "identity", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth_cache_ttl"), "{err}");

    let out = tokio::process::Command::new(kiln_binary())
        .args(["serve", "identity"])
        .env("KILN_DATABASE_URL", "mysql://nope")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database_url"));
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
    let data = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let server = format!("http://{listen}");
    let mut child = tokio::process::Command::new(kiln_binary())
        .args(["dev", "--listen", &listen, "--data-dir"])
        .arg(data.path())
        .env("KILN_OTLP_ENDPOINT", &endpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until_ready(&data.path().join("admin.key"), &listen).await;
    let (ok, _, err) = cli(&server, data.path(), &["list", "accounts"]).await;
    assert!(ok, "{err}");
    // SIGTERM: kiln dev stops cleanly and flushes its spans.
    let pid = child.id().unwrap().to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        exit.success(),
        "kiln dev exits cleanly on SIGTERM: {exit:?}"
    );

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
    let data = tempfile::tempdir().unwrap();
    let empty_assets = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let server = format!("http://{listen}");
    let _child = tokio::process::Command::new(kiln_binary())
        .args(["dev", "--listen", &listen, "--data-dir"])
        .arg(data.path())
        // No library import in this test: its asset cache is empty.
        .env("KILN_REGISTRY__ASSET_DIR", empty_assets.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until_ready(&data.path().join("admin.key"), &listen).await;
    let assets = kiln_tests::asset("all-minilm-l6-v2/model.onnx")
        .parent()
        .unwrap()
        .to_owned();
    let run = |args: Vec<String>| {
        let server = server.clone();
        let data = data.path().to_owned();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&server, &data, &args).await
        }
    };
    let (ok, _, err) = run(vec!["create".into(), "account".into(), "acme".into()]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = run(vec![
        "--account".into(),
        "acme".into(),
        "create".into(),
        "model".into(),
        "minilm".into(),
        assets.display().to_string(),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("EMBEDDING_MODEL") && out.contains("READY"),
        "{out}"
    );
    assert!(
        err.contains("model.onnx") && err.contains("100.0%"),
        "a progress line: {err}"
    );

    let dest = data.path().join("downloaded");
    let (ok, _, err) = run(vec![
        "--account".into(),
        "acme".into(),
        "download".into(),
        "model".into(),
        "minilm".into(),
        "--dest".into(),
        dest.display().to_string(),
    ])
    .await;
    assert!(ok, "{err}");
    for file in ["model.onnx", "tokenizer.json"] {
        assert!(
            std::fs::read(dest.join(file)).unwrap() == std::fs::read(assets.join(file)).unwrap(),
            "{file} comes back identical"
        );
    }

    let jsonl = data.path().join("train.jsonl");
    let lines: Vec<String> = (0..5)
        .map(|i| format!(r#"{{"prompt": "q{i}", "completion": "a{i}"}}"#))
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let (ok, out, err) = run(vec![
        "--account".into(),
        "acme".into(),
        "create".into(),
        "dataset".into(),
        "train".into(),
        jsonl.display().to_string(),
        "-o".into(),
        "json".into(),
    ])
    .await;
    assert!(ok, "{err}");
    let dataset: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dataset["state"], "READY");
    assert_eq!(dataset["example_count"], "5");
    let (ok, out, _) = run(vec![
        "--account".into(),
        "acme".into(),
        "list".into(),
        "models".into(),
    ])
    .await;
    assert!(ok && out.contains("accounts/acme/models/minilm"), "{out}");
    // Deployed first (one CPU replica on the dev node), then it embeds (on tract: this kiln
    // dev has no ONNX Runtime library).
    let (ok, out, err) = run(vec![
        "--account".into(),
        "acme".into(),
        "create".into(),
        "deployment".into(),
        "minilm".into(),
        "--deployment-id".into(),
        "embedder".into(),
        "--wait".into(),
        "-o".into(),
        "json".into(),
    ])
    .await;
    assert!(ok, "{err}");
    let deployment: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(deployment["state"], "READY", "{out}");
    assert_eq!(deployment["accelerator_type"], "CPU", "{out}");
    let (ok, out, err) = run(vec!["list".into(), "nodes".into()]).await;
    assert!(
        ok && out.contains("READY") && out.contains("CPU"),
        "{out}{err}"
    );
    let (ok, out, err) = run(vec![
        "--account".into(),
        "acme".into(),
        "list".into(),
        "deployments".into(),
    ])
    .await;
    assert!(
        ok && out.contains("accounts/acme/deployments/embedder"),
        "{out}{err}"
    );
    let (ok, out, err) = run(vec![
        "--account".into(),
        "acme".into(),
        "embed".into(),
        "minilm".into(),
        "hello world".into(),
        "good morning".into(),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        out.matches(" 384 ").count(),
        2,
        "two 384-dimension rows: {out}"
    );
    // A deployed model cannot be deleted; once its deployment is gone, it can.
    let (ok, _, err) = run(vec![
        "--account".into(),
        "acme".into(),
        "delete".into(),
        "model".into(),
        "minilm".into(),
    ])
    .await;
    assert!(!ok && err.contains("is deployed"), "{err}");
    let (ok, _, err) = run(vec![
        "--account".into(),
        "acme".into(),
        "delete".into(),
        "deployment".into(),
        "embedder".into(),
        "--hard".into(),
        // The replica's last heartbeat may still count the embed above as in flight.
        "--ignore-checks".into(),
    ])
    .await;
    assert!(ok, "{err}");
    // The registry learns of the undeploy from the scheduler's event.
    let out = kiln_tests::wait_for(
        std::time::Duration::from_secs(20),
        "the model to be deletable",
        || async {
            let (ok, out, _) = run(vec![
                "--account".into(),
                "acme".into(),
                "delete".into(),
                "model".into(),
                "minilm".into(),
            ])
            .await;
            ok.then_some(out)
        },
    )
    .await;
    assert!(out.contains("deleted"), "{out}");
}
