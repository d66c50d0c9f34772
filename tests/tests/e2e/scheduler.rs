//! The scheduler with real worker nodes: placement by inventory (simulated accelerators, the
//! CPU backend runs the model), the three ways to name a deployed model, a node killed
//! mid-traffic, scale-to-zero and back, and a deployment waiting for capacity.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kiln_proto::kiln_inference::v1 as infv1;
use kiln_proto::scheduler::v1 as schv1;
use kiln_tests::deployments::{self, on, replica_nodes, replicas, wait_ready, wait_until};
use kiln_tests::events::{next_event, next_usage};
use kiln_tests::inference::*;
use kiln_tests::registry as reg;
use kiln_tests::workers::Worker;
use kiln_tests::{AuthedChannel, MeshOptions, TestMesh, expect_code, wait_for};
use tonic::Code;

const H100: &str = "NVIDIA_H100_80GB";
const A100: &str = "NVIDIA_A100_80GB";
const H200: &str = "NVIDIA_H200_141GB";

/// A mesh (with MiniLM in its library) and a tenant that owns a private copy of MiniLM.
async fn mesh_with_private_minilm() -> (TestMesh, tempfile::TempDir, AuthedChannel, String) {
    kiln_tests::inference::mesh_with_private_minilm(MeshOptions::default()).await
}

fn seconds(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

/// Creates deployment `id` of acme serving `model`, as the rest of `deployment` says (its
/// hardware: [`on`]).
async fn deploy_on(
    acme: &AuthedChannel,
    id: &str,
    model: &str,
    deployment: schv1::Deployment,
) -> schv1::Deployment {
    let deployment = schv1::Deployment {
        base_model: model.to_owned(),
        ..deployment
    };
    let created = deployments::create(acme, "accounts/acme", id, deployment).await;
    created.expect("create the deployment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_lands_where_it_fits_and_answers_by_every_name() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let admin = mesh.admin().await;
    let _a = Worker::start(&mesh, "node-a", &[(H100, 1)]).await;
    let _b = Worker::start(&mesh, "node-b", &[(A100, 4)]).await;
    let _c = Worker::start(&mesh, "node-c", &[(H100, 4)]).await;
    wait_for(Duration::from_secs(30), "three workers", || async {
        (deployments::list_nodes(&admin).await.len() >= 4).then_some(())
    })
    .await;
    let mut usage = mesh.subscribe("kiln.inference.usage.recorded").await;

    let deployment = deploy_on(&acme, "embedder", &model, on(H100, 2)).await;
    assert_eq!(
        deployment.deployment_type,
        schv1::deployment::DeploymentType::Dedicated as i32
    );
    let ready = wait_ready(&acme, &deployment.name, 1).await;
    assert_eq!(ready.replica_count, 1);
    assert_eq!(
        replica_nodes(&admin, &deployment.name).await,
        vec!["nodes/node-c".to_owned()],
        "2 × H100 fit only on node-c"
    );

    // The mesh's own node holds no replica: it forwards to node-c, by each name.
    let by_deployment = format!("{model}#{}", deployment.name);
    let deployed_model = "accounts/acme/deployedModels/minilm";
    let names = [model.as_str(), deployed_model, by_deployment.as_str()];
    for name in names {
        let answer = embed_reference(&acme, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_minilm(&answer);
        let recorded = next_usage(&mut usage, "accounts/acme").await;
        assert_eq!(recorded.node, "nodes/node-c", "{name}");
        assert_eq!(recorded.deployment, deployment.name);
        assert_eq!(recorded.deployed_model, deployed_model);
        assert_eq!(
            recorded.deployment_type,
            schv1::deployment::DeploymentType::Dedicated as i32
        );
    }
    // Another account sees none of it.
    let other = mesh.tenant_channel("globex").await;
    for name in names {
        let code = embed_reference(&other, name).await.unwrap_err().code();
        assert_eq!(code, Code::NotFound, "{name}");
    }
    let hidden = deployments::get_deployment(&other, &deployment.name).await;
    expect_code(hidden, Code::NotFound);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fails_its_requests_fast_and_its_replica_moves() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let first = Worker::start(&mesh, "node-x", &[(H100, 1)]).await;
    let deployment = deploy_on(&acme, "moving", &model, on(H100, 1)).await;
    wait_ready(&acme, &deployment.name, 1).await;
    let second = Worker::start(&mesh, "node-y", &[(H100, 1)]).await;
    embed_reference(&acme, &model)
        .await
        .expect("served on node-x");
    // Traffic while the node dies: every request ends (answered or UNAVAILABLE), none hangs.
    let ended = Arc::new(AtomicUsize::new(0));
    let traffic: Vec<_> = (0..4)
        .map(|_| {
            let (acme, model, ended) = (acme.clone(), model.clone(), ended.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for _ in 0..30 {
                    let outcome = tokio::time::timeout(
                        Duration::from_secs(20),
                        embed_reference(&acme, &model),
                    )
                    .await;
                    let code = match outcome {
                        Err(_) => panic!("a request hung past 20 s"),
                        Ok(Ok(answer)) => {
                            assert_minilm(&answer);
                            Code::Ok
                        }
                        Ok(Err(status)) => status.code(),
                    };
                    outcomes.push(code);
                    ended.fetch_add(1, Ordering::Relaxed);
                }
                outcomes
            })
        })
        .collect();
    wait_for(Duration::from_secs(20), "the traffic to flow", || async {
        (ended.load(Ordering::Relaxed) >= 4).then_some(())
    })
    .await;
    first.kill();
    let mut outcomes = Vec::new();
    for task in traffic {
        outcomes.extend(task.await.unwrap());
    }
    for code in &outcomes {
        assert!(
            matches!(code, Code::Ok | Code::Unavailable),
            "a request ended with {code:?}"
        );
    }

    // The replica is rebuilt on node-y, and requests succeed again.
    let admin = mesh.admin().await;
    wait_for(Duration::from_secs(60), "the replica on node-y", || async {
        let d = deployments::get(&acme, &deployment.name).await;
        let ready = d.replica_stats.map(|s| s.ready_replica_count) == Some(1);
        (ready && replica_nodes(&admin, &deployment.name).await == ["nodes/node-y"]).then_some(())
    })
    .await;
    let answer = wait_for(Duration::from_secs(30), "a request to succeed", || async {
        embed_reference(&acme, &model).await.ok()
    })
    .await;
    assert_minilm(&answer);
    drop(second);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_scaled_to_zero_wakes_for_a_request() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let _node = Worker::start(&mesh, "node-z", &[(A100, 1)]).await;
    let sleepy = schv1::Deployment {
        min_replica_count: 0,
        autoscaling_policy: Some(schv1::AutoscalingPolicy {
            scale_to_zero_window: Some(seconds(2)),
            ..Default::default()
        }),
        ..on(A100, 1)
    };
    let deployment = deploy_on(&acme, "sleepy", &model, sleepy).await;
    let ready = schv1::deployment::State::Ready as i32;
    // Ready (it may scale to zero before a poll sees its replica).
    let timeout = Duration::from_secs(60);
    wait_until(
        &acme,
        &deployment.name,
        timeout,
        "the deployment to be ready",
        |d| d.state == ready,
    )
    .await;
    let asleep = wait_until(
        &acme,
        &deployment.name,
        Duration::from_secs(30),
        "scale to zero",
        |d| d.desired_replica_count == 0 && d.replica_count == 0,
    )
    .await;
    assert_eq!(asleep.state, ready);

    // The request waits while a replica starts, then gets the model's answer.
    let answer = tokio::time::timeout(Duration::from_secs(60), embed_reference(&acme, &model))
        .await
        .expect("answered within the cold start")
        .expect("the request succeeds");
    assert_minilm(&answer);
    let awake = deployments::get(&acme, &deployment.name).await;
    assert_eq!(awake.desired_replica_count, 1);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_waits_for_capacity_and_says_what_is_missing() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let _small = Worker::start(&mesh, "node-small", &[(H200, 1)]).await;
    let deployment = deploy_on(&acme, "big", &model, on(H200, 2)).await;
    // The first pass may run before node-small has connected; wait for the one that saw it.
    let what = "a status saying what node-small lacks";
    let waiting = wait_until(
        &acme,
        &deployment.name,
        Duration::from_secs(30),
        what,
        |d| {
            d.status
                .as_ref()
                .is_some_and(|s| s.message.contains("nodes/node-small"))
        },
    )
    .await;
    assert_eq!(waiting.state, schv1::deployment::State::Creating as i32);
    let status = waiting.status.unwrap();
    assert_eq!(status.code, Code::ResourceExhausted as i32);
    assert!(
        status.message.contains("needs 2 × NVIDIA_H200_141GB")
            && status
                .message
                .contains("nodes/node-small has only 1 NVIDIA_H200_141GB"),
        "{}",
        status.message
    );
    // validate_only says the same before anything is created.
    let request = schv1::CreateDeploymentRequest {
        parent: "accounts/acme".into(),
        deployment: Some(schv1::Deployment {
            base_model: model.clone(),
            ..on(H200, 2)
        }),
        validate_only: true,
        ..Default::default()
    };
    let refused = deployments::deployments(&acme)
        .create_deployment(request)
        .await;
    expect_code(refused, Code::FailedPrecondition);

    let _big = Worker::start(&mesh, "node-big", &[(H200, 2)]).await;
    let ready = wait_ready(&acme, &deployment.name, 1).await;
    assert_eq!(ready.status.unwrap_or_default().message, "");
    let answer = embed_reference(&acme, &model).await;
    assert_minilm(&answer.expect("served on node-big"));
    mesh.shutdown().await;
}

/// A completion of one token of "Hi" by `model`.
async fn say_hi(
    ch: &AuthedChannel,
    model: &str,
) -> Result<tonic::Response<infv1::Completion>, tonic::Status> {
    let request = infv1::CreateCompletionRequest {
        model: model.to_owned(),
        prompt: "Hi".into(),
        max_tokens: Some(1),
        ..Default::default()
    };
    client(ch).create_completion(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addons_are_loaded_onto_ready_replicas_and_unloaded_when_undeployed() {
    use kiln_tests::llm::SMOLLM2;
    let assets = kiln_tests::llm::smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let admin = mesh.admin().await;
    let acme = mesh.tenant_channel("acme").await;
    // The library's SmolLM2, prepared and served (so a replica of it loads at once).
    wait_for(Duration::from_secs(300), "SmolLM2 to be served", || async {
        say_hi(&acme, SMOLLM2).await.ok()
    })
    .await;
    // Two LoRA addons of it in acme.
    let mut addons = Vec::new();
    for id in ["tone", "style"] {
        let kind = kiln_proto::registry::v1::model::Kind::LoraAddon;
        let addon = reg::create_model(&acme, "acme", id, kind, Some(SMOLLM2)).await;
        reg::upload_lora(&acme, &addon.name, 8, 192).await.unwrap();
        assert!(reg::validate(&acme, &addon.name).await.valid);
        addons.push(addon.name);
    }
    let with_addons = schv1::Deployment {
        enable_addons: true,
        ..on("CPU", 1)
    };
    let deployment = deploy_on(&acme, "chat", SMOLLM2, with_addons).await;
    wait_ready(&acme, &deployment.name, 1).await;

    // Deploying an addon loads its files onto the ready replica; then it is DEPLOYED.
    let tone =
        deployments::create_deployed_model(&acme, "acme", "tone", &addons[0], &deployment.name)
            .await
            .unwrap();
    let deployed_state = schv1::deployed_model::State::Deployed as i32;
    let deployed = wait_for(
        Duration::from_secs(60),
        "the addon to be deployed",
        || async {
            let dm = deployments::get_deployed_model(&acme, &tone.name)
                .await
                .unwrap();
            (dm.state == deployed_state).then_some(dm)
        },
    )
    .await;
    assert_eq!(deployed.model, addons[0]);
    let loaded = replicas(&admin, &deployment.name).await;
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].loaded_addons, vec![addons[0].clone()]);
    // It answers through its weights (zeros here: exactly the base's greedy answer, the
    // same log-probabilities), and its usage is booked as the addon's on its deployed model.
    let mut usage = mesh.subscribe("kiln.inference.usage.recorded").await;
    let greedy = |model: &str| infv1::CreateCompletionRequest {
        model: model.to_owned(),
        prompt: "The capital of France is".into(),
        max_tokens: Some(6),
        temperature: Some(0.0),
        logprobs: Some(1),
        ..Default::default()
    };
    let through_addon = client(&acme)
        .create_completion(greedy(&tone.name))
        .await
        .unwrap()
        .into_inner();
    let recorded = next_usage(&mut usage, "accounts/acme").await;
    assert_eq!(recorded.model, addons[0]);
    assert_eq!(recorded.deployed_model, tone.name);
    assert_eq!(recorded.deployment, deployment.name);
    let base = client(&acme)
        .create_completion(greedy(SMOLLM2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(through_addon.choices[0].text, base.choices[0].text);
    assert_eq!(through_addon.choices[0].logprobs, base.choices[0].logprobs);

    // Undeploying unloads it from the replica.
    deployments::deployed_models(&acme)
        .delete_deployed_model(schv1::DeleteDeployedModelRequest {
            name: tone.name.clone(),
        })
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the addon to be unloaded",
        || async {
            let loaded = replicas(&admin, &deployment.name).await;
            (loaded.len() == 1 && loaded[0].loaded_addons.is_empty()).then_some(())
        },
    )
    .await;
    // A deployment without enable_addons takes none.
    let plain = deploy_on(&acme, "plain", SMOLLM2, on("CPU", 1)).await;
    let err =
        deployments::create_deployed_model(&acme, "acme", "style", &addons[1], &plain.name).await;
    expect_code(err, Code::FailedPrecondition);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_deployment_runs_on_the_backend_it_names() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let admin = mesh.admin().await;
    let mut deployed = Vec::new();
    for backend in ["tract", "onnxruntime"] {
        let on_backend = schv1::Deployment {
            backend: backend.into(),
            ..on("CPU", 1)
        };
        let d = deploy_on(&acme, &format!("on-{backend}"), &model, on_backend).await;
        wait_ready(&acme, &d.name, 1).await;
        deployed.push((backend, d.name));
    }
    for (backend, deployment) in &deployed {
        let on_node = replicas(&admin, deployment).await;
        assert_eq!(on_node.len(), 1);
        assert_eq!(on_node[0].backend, *backend);
        // The same model on one node, loaded once per backend: each deployment's requests
        // run on its own, and both give MiniLM's answer.
        let target = format!("{model}#{deployment}");
        let metadata = oip(&acme)
            .model_metadata(kiln_proto::inference::ModelMetadataRequest {
                name: target.clone(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(metadata.platform, format!("{backend}_onnx"), "{deployment}");
        assert_minilm(&embed_reference(&acme, &target).await.unwrap());
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_scales_a_deployment_up_and_its_end_scales_it_down() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let mut scaled = mesh.subscribe("kiln.scheduler.deployment.scaled").await;
    let elastic = schv1::Deployment {
        min_replica_count: 1,
        max_replica_count: 2,
        autoscaling_policy: Some(schv1::AutoscalingPolicy {
            scale_up_window: Some(seconds(1)),
            scale_down_window: Some(seconds(2)),
            scale_to_zero_window: Some(seconds(3600)),
            load_targets: [("requests_per_second".to_owned(), 20.0)].into(),
        }),
        ..on("CPU", 1)
    };
    let deployment = deploy_on(&acme, "elastic", &model, elastic).await;
    wait_ready(&acme, &deployment.name, 1).await;

    // Six clients without pause: well over 20 requests a second for one replica.
    let stop = Arc::new(AtomicBool::new(false));
    let target = format!("{model}#{}", deployment.name);
    let load: Vec<_> = (0..6)
        .map(|_| {
            let (acme, target, stop) = (acme.clone(), target.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let answer = embed_reference(&acme, &target).await;
                    assert_minilm(&answer.expect("served under load"));
                }
            })
        })
        .collect();
    let what = "the load to bring a second replica";
    let up = wait_until(
        &acme,
        &deployment.name,
        Duration::from_secs(60),
        what,
        |d| {
            let ready = d.replica_stats.as_ref().map(|s| s.ready_replica_count);
            d.desired_replica_count == 2 && ready == Some(2)
        },
    )
    .await;
    assert_eq!(up.state, schv1::deployment::State::Ready as i32);
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    // No load for the scale-down window: back to the minimum, never under it.
    let what = "the deployment to scale back down";
    let down = wait_until(
        &acme,
        &deployment.name,
        Duration::from_secs(60),
        what,
        |d| d.desired_replica_count == 1 && d.replica_count == 1,
    )
    .await;
    assert_eq!(down.state, schv1::deployment::State::Ready as i32);
    let mut reasons = Vec::new();
    while reasons.len() < 2 {
        let scaling = next_event(
            &mut scaled,
            Duration::from_secs(10),
            "scaled",
            |body| match body {
                kiln_events::Body::DeploymentScaled(s) if s.name == deployment.name => Some(s),
                _ => None,
            },
        )
        .await;
        reasons.push((scaling.desired_replica_count, scaling.reason));
    }
    assert_eq!(
        reasons,
        vec![(2, "autoscaler".to_owned()), (1, "autoscaler".to_owned())]
    );
    mesh.shutdown().await;
}
