//! The scheduler: `cargo bench -p kiln-tests --bench scheduling [-- PASSES DEPLOYS]`.
//!
//! - one placement pass placing 10,000 waiting replicas (1, 2 or 4 accelerators each, as
//!   6:3:1) over 1,000 simulated nodes of 16 H100s, which they fill exactly: time per pass;
//! - CreateDeployment → READY through gRPC on a mesh whose node already holds the model (so
//!   model loading is excluded): the create, the reconcile pass, the node's assignment and
//!   report, and the state change, timed by the `deployment.state_changed` event.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::scheduler::v1 as schv1;
use kiln_scheduler::placement::{DeviceGroup, Need, NodeCapacity, place};
use kiln_tests::inference::*;
use kiln_tests::wait_for;

const H100: i32 = AcceleratorType::NvidiaH10080gb as i32;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn placement(passes: usize) {
    let nodes: Vec<NodeCapacity> = (0..1000)
        .map(|i| NodeCapacity {
            name: format!("nodes/n{i}"),
            groups: vec![DeviceGroup::new(H100, 16, 80 << 30)],
        })
        .collect();
    let needs: Vec<Need> = (0..10_000)
        .map(|i| Need {
            kind: H100,
            count: match i % 10 {
                0..=5 => 1,
                6..=8 => 2,
                _ => 4,
            },
            model_bytes: 2 << 30,
        })
        .collect();
    let mut times = Vec::with_capacity(passes);
    let mut placed = 0;
    for _ in 0..passes {
        let mut fresh = nodes.clone();
        let started = Instant::now();
        let result = place(&mut fresh, &needs);
        times.push(started.elapsed());
        placed = result.iter().filter(|p| p.is_some()).count();
    }
    println!(
        "placement pass, 10,000 replicas over 1,000 nodes: p50 {:.1} ms, min {:.1} ms ({placed} placed, {passes} passes)",
        percentile(&mut times, 0.5).as_secs_f64() * 1e3,
        times.iter().min().unwrap().as_secs_f64() * 1e3,
    );
}

async fn create_to_ready(deploys: usize) {
    let assets = minilm_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let admin = mesh.admin().await;
    let key = kiln_tests::tenant(&admin, "bench").await;
    let ch = mesh.channel(Some(&key)).await;
    // The serverless MiniLM loads the model on the node first.
    wait_for(Duration::from_secs(120), "the public MiniLM", || async {
        client(&ch)
            .create_embeddings(kiln_proto::kiln_inference::v1::CreateEmbeddingsRequest {
                model: MINILM.into(),
                input: vec!["warm up".into()],
                ..Default::default()
            })
            .await
            .ok()
    })
    .await;
    let mut changes = mesh
        .bus
        .subscribe("kiln.scheduler.deployment.state_changed")
        .await
        .expect("subscribe");
    let deployments = kiln_tests::deployments::deployments(&ch);
    let mut times = Vec::with_capacity(deploys);
    for i in 0..deploys {
        let started = Instant::now();
        let created = deployments
            .clone()
            .create_deployment(schv1::CreateDeploymentRequest {
                parent: "accounts/bench".into(),
                deployment_id: format!("d{i}"),
                deployment: Some(schv1::Deployment {
                    base_model: MINILM.into(),
                    ..Default::default()
                }),
                disable_auto_deploy: true,
                ..Default::default()
            })
            .await
            .expect("create")
            .into_inner();
        loop {
            let event = changes.next().await.expect("event");
            if let Some(kiln_events::Body::DeploymentStateChanged(c)) = event.body
                && let Some(d) = c.deployment
                && d.name == created.name
                && d.state == schv1::deployment::State::Ready as i32
            {
                break;
            }
        }
        times.push(started.elapsed());
        deployments
            .clone()
            .delete_deployment(schv1::DeleteDeploymentRequest {
                name: created.name,
                hard: true,
                ignore_checks: true,
            })
            .await
            .expect("delete");
    }
    println!(
        "CreateDeployment -> READY (model already on the node), {deploys} deployments: p50 {:.1} ms, p90 {:.1} ms",
        percentile(&mut times, 0.5).as_secs_f64() * 1e3,
        percentile(&mut times, 0.9).as_secs_f64() * 1e3,
    );
    mesh.shutdown().await;
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let passes = args.first().copied().unwrap_or(20);
    let deploys = args.get(1).copied().unwrap_or(20);
    placement(passes);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(create_to_ready(deploys));
}
