//! Extra inference nodes for scheduler suites: each registers with the mesh's scheduler,
//! authenticates through its identity and reads models from its registry, like a worker
//! of a real deployment. Both its gRPC server and its scheduler stream go through TCP
//! proxies, so a test can kill the node: every connection drops at once, as when a
//! machine dies.

use std::net::SocketAddr;

use kiln_inference::config::{AcceleratorConfig, InferenceConfig};
use kiln_server::{KilnConfig, Role, Roles, Running};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{SERVICE_TOKEN, TestMesh};

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
    running: Running,
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
            billing_url: Some(mesh.url()),
            page_token_secret: Some("test-page-token-secret".to_owned()),
            ..Default::default()
        };
        let inference = InferenceConfig {
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
            scheduler_url: format!("http://{}", scheduler_proxy.addr),
            advertise_url: url.clone(),
            ..Default::default()
        };
        let config = KilnConfig {
            server,
            inference,
            ..Default::default()
        };
        // The node as `kiln serve inference` runs it, on the mesh's bus.
        let roles: Roles = [Role::Inference].into_iter().collect();
        let running = kiln_server::serve(roles, &config, real, Some(mesh.bus.clone()))
            .await
            .expect("serve the node");
        Self {
            node_id: node_id.to_owned(),
            url,
            server: server_proxy,
            scheduler: scheduler_proxy,
            running,
            _data: data,
        }
    }

    /// The node dies: its connections drop, it stops answering and reporting.
    pub fn kill(&self) {
        self.server.kill();
        self.scheduler.kill();
        self.running.stop();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}
