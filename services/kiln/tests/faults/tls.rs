//! Kiln over TLS: every service serves only TLS and calls the others at `https://` URLs
//! (identity for keys, the registry for files, the scheduler for nodes, node to node), and a
//! client without the cluster's CA, or without TLS, is refused.

use kiln_tests::deployments::replicas;
use kiln_tests::inference::embed_reference;
use tokio::process::Command;

use crate::cluster::{Cluster, Shape};

#[tokio::test]
async fn a_cluster_over_tls_serves_and_refuses_clients_without_its_ca() {
    let shape = Shape {
        tls: true,
        ..Shape::nodes(2)
    };
    let (cluster, key, model, deployment) = Cluster::serving_minilm(shape).await;
    assert!(cluster.processes["identity"].url().starts_with("https://"));
    // Each node answers: the one holding the replica itself, the other by forwarding to it.
    let held = replicas(&cluster.channel("scheduler", None).await, &deployment).await;
    assert_eq!(held.len(), 1, "{held:?}");
    for node in ["inference-1", "inference-2"] {
        let ch = cluster.channel(node, Some(&key)).await;
        let answer = embed_reference(&ch, &model).await;
        kiln_tests::inference::assert_minilm(&answer.expect("an answer over TLS"));
    }

    // A client that trusts only the system's roots is refused at the handshake; one that
    // speaks plaintext to the TLS port gets no answer.
    let url = cluster.processes["identity"].url();
    let untrusting = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
        .unwrap()
        .connect()
        .await;
    let refused = untrusting.expect_err("a client without the CA is refused");
    let source = format!("{:?}", std::error::Error::source(&refused));
    assert!(source.contains("UnknownIssuer"), "{source}");
    let plain = url.replace("https://", "http://");
    let health = |extra: &[&str]| {
        let mut command = Command::new(crate::kiln_binary());
        command.args(["health", "--server"]).args(extra);
        command.env_remove("KILN_TLS_CA_FILE");
        command
    };
    let ran = health(&[&plain]).output().await.unwrap();
    assert!(
        !ran.status.success(),
        "plaintext to a TLS server is refused"
    );
    let ran = health(&[&url]).output().await.unwrap();
    assert!(
        !ran.status.success(),
        "kiln health without the CA is refused"
    );
    let certs = cluster.tls.as_ref().unwrap();
    let ca = certs.path("ca.pem");
    let ran = health(&[&url, "--tls-ca-file", &ca])
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&ran.stdout);
    let err = String::from_utf8_lossy(&ran.stderr);
    assert!(
        ran.status.success() && out.trim() == "SERVING",
        "{out} {err}"
    );
}
