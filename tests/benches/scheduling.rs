//! The scheduler: `cargo bench -p kiln-tests --bench scheduling [-- PASSES DEPLOYS]`.
//!
//! - one placement pass placing 10,000 waiting replicas (1, 2 or 4 accelerators each, as
//!   6:3:1) over 1,000 simulated nodes of 16 H100s, which they fill exactly: time per pass;
//! - CreateDeployment → READY through gRPC on a mesh whose node already holds the model (so
//!   model loading is excluded): the create, the reconcile pass, the node's assignment and
//!   report, and the state change, timed by the `deployment.state_changed` event.

use std::time::{Duration, Instant};

use kiln_events::Body;
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::scheduler::v1 as schv1;
use kiln_scheduler::placement::{DeviceGroup, Need, NodeCapacity, place};
use kiln_tests::bench::{Args, block_on, ms, percentile};
use kiln_tests::events::next_event;
use kiln_tests::inference::*;

const H100: i32 = AcceleratorType::NvidiaH10080gb as i32;

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
        ms(percentile(&mut times, 0.5)),
        ms(*times.iter().min().unwrap()),
    );
}

async fn create_to_ready(deploys: usize) {
    let assets = minilm_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let ch = mesh.tenant_channel("bench").await;
    // The serverless MiniLM loads the model on the node first.
    let warm_up = ["warm up".to_owned()];
    first_embeddings(&ch, MINILM, &warm_up, Duration::from_secs(120)).await;
    let mut changes = mesh
        .subscribe("kiln.scheduler.deployment.state_changed")
        .await;
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
        let ready = schv1::deployment::State::Ready as i32;
        next_event(
            &mut changes,
            Duration::from_secs(120),
            "READY",
            |body| match body {
                Body::DeploymentStateChanged(c) => c
                    .deployment
                    .filter(|d| d.name == created.name && d.state == ready),
                _ => None,
            },
        )
        .await;
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
        ms(percentile(&mut times, 0.5)),
        ms(percentile(&mut times, 0.9)),
    );
    mesh.shutdown().await;
}

fn main() {
    let args = Args::from_env();
    let (passes, deploys): (usize, usize) = (args.get(0, 20), args.get(1, 20));
    placement(passes);
    block_on(Some(2), create_to_ready(deploys));
}
