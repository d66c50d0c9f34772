//! Servers a test runs itself: a NATS server it can stop and start, an S3-compatible store.

use std::path::PathBuf;
use std::time::Duration;

use crate::{free_port, wait_for_listener};

/// Starts `program` with `args`, its output discarded; killed when dropped.
fn spawn_quiet(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(program.as_ref())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{} starts: {e}", program.as_ref().display()))
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
        let mut server = Self {
            port: free_port(),
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
        let port = self.port.to_string();
        let store = self.store.path().display().to_string();
        let args = ["-a", "127.0.0.1", "-p", &port, "-js", "-sd", &store];
        self.child = Some(spawn_quiet(nats_server_binary(), &args));
        let addr = format!("127.0.0.1:{port}");
        let what = "nats-server to accept connections";
        wait_for_listener(&addr, Duration::from_secs(10), what).await;
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
        let port = free_port();
        let args = [
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ];
        let child = spawn_quiet("python3", &args);
        let addr = format!("127.0.0.1:{port}");
        let what = "the S3 server (python3 -m moto.server; `pip install 'moto[server]'`) to listen";
        wait_for_listener(&addr, Duration::from_secs(30), what).await;
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
