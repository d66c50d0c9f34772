//! The scheduler with real worker nodes: placement by inventory (simulated accelerators, the
//! CPU backend runs the model), the three ways to name a deployed model, a node killed
//! mid-traffic, scale-to-zero and back, and a deployment waiting for capacity.

use std::time::Duration;

use futures::StreamExt;

use kiln_proto::kiln_inference::v1 as infv1;
use kiln_proto::scheduler::v1 as schv1;
use kiln_tests::deployments::{self, wait_ready, wait_until};
use kiln_tests::inference::*;
use kiln_tests::registry as reg;
use kiln_tests::workers::Worker;
use kiln_tests::{AuthedChannel, TestMesh, wait_for};
use tonic::Code;

const H100: &str = "NVIDIA_H100_80GB";
const A100: &str = "NVIDIA_A100_80GB";
const H200: &str = "NVIDIA_H200_141GB";

/// A mesh (with MiniLM in its library) and a tenant that owns a private copy of MiniLM.
async fn mesh_with_private_minilm() -> (TestMesh, tempfile::TempDir, AuthedChannel, String) {
    mesh_with_private_minilm_using(kiln_tests::MeshOptions::default()).await
}

/// [`mesh_with_private_minilm`] started with `options`.
pub(crate) async fn mesh_with_private_minilm_using(
    options: kiln_tests::MeshOptions,
) -> (TestMesh, tempfile::TempDir, AuthedChannel, String) {
    let assets = minilm_asset_dir();
    let mesh = kiln_tests::library_mesh_with(assets.path(), options).await;
    let admin = mesh.admin().await;
    // The library's serverless MiniLM first, on the mesh's own CPU node: created later, its
    // default accelerator would be the GPU kind of whichever workers a test has started.
    wait_for(
        Duration::from_secs(60),
        "the library's MiniLM to be served",
        || async {
            let d = deployments::deployments(&admin)
                .get_deployment(schv1::GetDeploymentRequest {
                    name: "accounts/kiln/deployments/all-minilm-l6-v2".into(),
                })
                .await
                .ok()?
                .into_inner();
            (d.state == schv1::deployment::State::Ready as i32).then_some(())
        },
    )
    .await;
    let key = kiln_tests::tenant(&admin, "acme").await;
    let acme = mesh.channel(Some(&key)).await;
    let model = reg::create_model(
        &acme,
        "acme",
        "minilm",
        kiln_proto::registry::v1::model::Kind::EmbeddingModel,
        None,
    )
    .await
    .unwrap();
    for file in ["model.onnx", "tokenizer.json"] {
        reg::upload_path(&acme, &model.name, file, &minilm_dir().join(file)).await;
    }
    assert!(reg::validate(&acme, &model.name).await.valid);
    (mesh, assets, acme, model.name)
}

pub(crate) fn on(kind: &str, count: i32) -> schv1::Deployment {
    schv1::Deployment {
        accelerator_type: kiln_proto::common::v1::AcceleratorType::from_str_name(kind)
            .expect("kind") as i32,
        accelerator_count: count,
        ..Default::default()
    }
}

pub(crate) async fn embed(
    ch: &AuthedChannel,
    model: &str,
) -> Result<infv1::CreateEmbeddingsResponse, tonic::Status> {
    client(ch)
        .create_embeddings(infv1::CreateEmbeddingsRequest {
            model: model.to_owned(),
            input: reference().sentences[..1].to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// The answer is MiniLM's (against the independent reference vectors).
pub(crate) fn assert_minilm(answer: &infv1::CreateEmbeddingsResponse) {
    let similarity = cosine(&answer.data[0].embedding, &reference().embeddings[0]);
    assert!(similarity >= 0.999, "cosine {similarity}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_lands_where_it_fits_and_answers_by_every_name() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let admin = mesh.admin().await;
    let _a = Worker::start(&mesh, "node-a", &[(H100, 1)]).await;
    let _b = Worker::start(&mesh, "node-b", &[(A100, 4)]).await;
    let _c = Worker::start(&mesh, "node-c", &[(H100, 4)]).await;
    wait_for(Duration::from_secs(30), "three workers", || async {
        let listed = deployments::nodes(&admin)
            .list_nodes(schv1::ListNodesRequest::default())
            .await
            .unwrap()
            .into_inner();
        (listed.nodes.len() >= 4).then_some(())
    })
    .await;
    let mut usage = mesh
        .bus
        .subscribe("kiln.inference.usage.recorded")
        .await
        .unwrap();

    let deployment = deployments::create(
        &acme,
        "accounts/acme",
        "embedder",
        schv1::Deployment {
            base_model: model.clone(),
            ..on(H100, 2)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        deployment.deployment_type,
        schv1::deployment::DeploymentType::Dedicated as i32
    );
    let ready = wait_ready(&acme, &deployment.name, 1).await;
    assert_eq!(ready.replica_count, 1);
    assert_eq!(
        deployments::replica_nodes(&admin, &deployment.name).await,
        vec!["nodes/node-c".to_owned()],
        "2 × H100 fit only on node-c"
    );

    // The mesh's own node holds no replica: it forwards to node-c, by each name.
    let by_deployment = format!("{model}#{}", deployment.name);
    for name in [
        model.as_str(),
        "accounts/acme/deployedModels/minilm",
        by_deployment.as_str(),
    ] {
        let answer = embed(&acme, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_minilm(&answer);
        let recorded = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let event = usage.next().await.expect("event");
                if let Some(kiln_events::Body::UsageRecorded(u)) = event.body
                    && u.account == "accounts/acme"
                {
                    return u;
                }
            }
        })
        .await
        .expect("a usage event");
        assert_eq!(recorded.node, "nodes/node-c", "{name}");
        assert_eq!(recorded.deployment, deployment.name);
        assert_eq!(
            recorded.deployed_model,
            "accounts/acme/deployedModels/minilm"
        );
        assert_eq!(
            recorded.deployment_type,
            schv1::deployment::DeploymentType::Dedicated as i32
        );
    }
    // Another account sees none of it.
    let other = mesh
        .channel(Some(&kiln_tests::tenant(&admin, "globex").await))
        .await;
    for name in [
        model.as_str(),
        "accounts/acme/deployedModels/minilm",
        by_deployment.as_str(),
    ] {
        assert_eq!(
            embed(&other, name).await.unwrap_err().code(),
            Code::NotFound,
            "{name}"
        );
    }
    let err = deployments::deployments(&other)
        .get_deployment(schv1::GetDeploymentRequest {
            name: deployment.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fails_its_requests_fast_and_its_replica_moves() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let first = Worker::start(&mesh, "node-x", &[(H100, 1)]).await;
    let deployment = deployments::create(
        &acme,
        "accounts/acme",
        "moving",
        schv1::Deployment {
            base_model: model.clone(),
            ..on(H100, 1)
        },
    )
    .await
    .unwrap();
    wait_ready(&acme, &deployment.name, 1).await;
    let second = Worker::start(&mesh, "node-y", &[(H100, 1)]).await;
    embed(&acme, &model).await.expect("served on node-x");

    // Traffic while the node dies: every request ends (answered or UNAVAILABLE), none hangs.
    let traffic: Vec<_> = (0..4)
        .map(|_| {
            let (acme, model) = (acme.clone(), model.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for _ in 0..30 {
                    let outcome =
                        tokio::time::timeout(Duration::from_secs(20), embed(&acme, &model)).await;
                    let code = match outcome {
                        Err(_) => panic!("a request hung past 20 s"),
                        Ok(Ok(answer)) => {
                            assert_minilm(&answer);
                            Code::Ok
                        }
                        Ok(Err(status)) => status.code(),
                    };
                    outcomes.push(code);
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
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
        (ready
            && deployments::replica_nodes(&admin, &deployment.name).await
                == vec!["nodes/node-y".to_owned()])
        .then_some(())
    })
    .await;
    let answer = wait_for(Duration::from_secs(30), "a request to succeed", || async {
        embed(&acme, &model).await.ok()
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
    let deployment = deployments::create(
        &acme,
        "accounts/acme",
        "sleepy",
        schv1::Deployment {
            base_model: model.clone(),
            min_replica_count: 0,
            autoscaling_policy: Some(schv1::AutoscalingPolicy {
                scale_to_zero_window: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..on(A100, 1)
        },
    )
    .await
    .unwrap();
    // Ready (it may scale to zero before a poll sees its replica).
    wait_until(
        &acme,
        &deployment.name,
        Duration::from_secs(60),
        "the deployment to be ready",
        |d| d.state == schv1::deployment::State::Ready as i32,
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
    assert_eq!(asleep.state, schv1::deployment::State::Ready as i32);

    // The request waits while a replica starts, then gets the model's answer.
    let answer = tokio::time::timeout(Duration::from_secs(60), embed(&acme, &model))
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
    let deployment = deployments::create(
        &acme,
        "accounts/acme",
        "big",
        schv1::Deployment {
            base_model: model.clone(),
            ..on(H200, 2)
        },
    )
    .await
    .unwrap();
    let waiting = wait_until(
        &acme,
        &deployment.name,
        Duration::from_secs(30),
        "a status saying what is missing",
        |d| d.status.as_ref().is_some_and(|s| !s.message.is_empty()),
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
    let refused = deployments::deployments(&acme)
        .create_deployment(schv1::CreateDeploymentRequest {
            parent: "accounts/acme".into(),
            deployment: Some(schv1::Deployment {
                base_model: model.clone(),
                ..on(H200, 2)
            }),
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let _big = Worker::start(&mesh, "node-big", &[(H200, 2)]).await;
    let ready = wait_ready(&acme, &deployment.name, 1).await;
    assert_eq!(ready.status.unwrap_or_default().message, "");
    assert_minilm(&embed(&acme, &model).await.expect("served on node-big"));
    mesh.shutdown().await;
}

/// The replicas of `deployment` as ListNodes shows them (admin).
async fn replicas_of(admin: &AuthedChannel, deployment: &str) -> Vec<schv1::Replica> {
    deployments::nodes(admin)
        .list_nodes(schv1::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .flat_map(|n| n.replicas)
        .filter(|r| r.deployment == deployment)
        .collect()
}

async fn deployed_model(ch: &AuthedChannel, name: &str) -> schv1::DeployedModel {
    deployments::deployed_models(ch)
        .get_deployed_model(schv1::GetDeployedModelRequest {
            name: name.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addons_are_loaded_onto_ready_replicas_and_unloaded_when_undeployed() {
    const SMOLLM2: &str = "accounts/kiln/models/smollm2-135m-instruct";
    let assets = kiln_tests::llm::smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let admin = mesh.admin().await;
    let acme = mesh
        .channel(Some(&kiln_tests::tenant(&admin, "acme").await))
        .await;
    // The library's SmolLM2, prepared and served (so a replica of it loads at once).
    wait_for(Duration::from_secs(300), "SmolLM2 to be served", || async {
        client(&acme)
            .create_completion(infv1::CreateCompletionRequest {
                model: SMOLLM2.into(),
                prompt: "Hi".into(),
                max_tokens: Some(1),
                ..Default::default()
            })
            .await
            .ok()
    })
    .await;
    // Two LoRA addons of it in acme.
    let mut addons = Vec::new();
    for id in ["tone", "style"] {
        let addon = reg::create_model(
            &acme,
            "acme",
            id,
            kiln_proto::registry::v1::model::Kind::LoraAddon,
            Some(SMOLLM2),
        )
        .await
        .unwrap();
        let (config, weights) = crate::registry::lora(8, 192);
        reg::upload(
            &acme,
            &addon.name,
            &[
                ("adapter_config.json", &config),
                ("adapter_model.safetensors", &weights),
            ],
        )
        .await
        .unwrap();
        assert!(reg::validate(&acme, &addon.name).await.valid);
        addons.push(addon.name);
    }
    let deployment = deployments::create(
        &acme,
        "accounts/acme",
        "chat",
        schv1::Deployment {
            base_model: SMOLLM2.into(),
            enable_addons: true,
            ..on("CPU", 1)
        },
    )
    .await
    .unwrap();
    wait_ready(&acme, &deployment.name, 1).await;

    // Deploying an addon loads its files onto the ready replica; then it is DEPLOYED.
    let tone = deployments::deployed_models(&acme)
        .create_deployed_model(schv1::CreateDeployedModelRequest {
            parent: "accounts/acme".into(),
            deployed_model_id: "tone".into(),
            deployed_model: Some(schv1::DeployedModel {
                model: addons[0].clone(),
                deployment: deployment.name.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let deployed = wait_for(
        Duration::from_secs(60),
        "the addon to be deployed",
        || async {
            let dm = deployed_model(&acme, &tone.name).await;
            (dm.state == schv1::deployed_model::State::Deployed as i32).then_some(dm)
        },
    )
    .await;
    assert_eq!(deployed.model, addons[0]);
    let replicas = replicas_of(&admin, &deployment.name).await;
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0].loaded_addons, vec![addons[0].clone()]);
    // Its requests are refused, saying why: the weights are not applied yet, and the bare
    // base model must not answer in the addon's name.
    let refused = client(&acme)
        .create_completion(infv1::CreateCompletionRequest {
            model: tone.name.clone(),
            prompt: "Hi".into(),
            max_tokens: Some(1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("LoRA"), "{}", refused.message());

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
            let replicas = replicas_of(&admin, &deployment.name).await;
            (replicas.len() == 1 && replicas[0].loaded_addons.is_empty()).then_some(())
        },
    )
    .await;
    // A deployment without enable_addons takes none.
    let plain = deployments::create(
        &acme,
        "accounts/acme",
        "plain",
        schv1::Deployment {
            base_model: SMOLLM2.into(),
            ..on("CPU", 1)
        },
    )
    .await
    .unwrap();
    let err = deployments::deployed_models(&acme)
        .create_deployed_model(schv1::CreateDeployedModelRequest {
            parent: "accounts/acme".into(),
            deployed_model_id: "style".into(),
            deployed_model: Some(schv1::DeployedModel {
                model: addons[1].clone(),
                deployment: plain.name.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_deployment_runs_on_the_backend_it_names() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let admin = mesh.admin().await;
    let mut deployed = Vec::new();
    for backend in ["tract", "onnxruntime"] {
        let d = deployments::create(
            &acme,
            "accounts/acme",
            &format!("on-{backend}"),
            schv1::Deployment {
                base_model: model.clone(),
                backend: backend.into(),
                ..on("CPU", 1)
            },
        )
        .await
        .unwrap();
        wait_ready(&acme, &d.name, 1).await;
        deployed.push((backend, d.name));
    }
    for (backend, deployment) in &deployed {
        let replicas = replicas_of(&admin, deployment).await;
        assert_eq!(replicas.len(), 1);
        assert_eq!(replicas[0].backend, *backend);
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
        assert_minilm(&embed(&acme, &target).await.unwrap());
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_scales_a_deployment_up_and_its_end_scales_it_down() {
    let (mesh, _assets, acme, model) = mesh_with_private_minilm().await;
    let mut scaled = mesh
        .bus
        .subscribe("kiln.scheduler.deployment.scaled")
        .await
        .unwrap();
    let seconds = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let deployment = deployments::create(
        &acme,
        "accounts/acme",
        "elastic",
        schv1::Deployment {
            base_model: model.clone(),
            min_replica_count: 1,
            max_replica_count: 2,
            autoscaling_policy: Some(schv1::AutoscalingPolicy {
                scale_up_window: seconds(1),
                scale_down_window: seconds(2),
                scale_to_zero_window: seconds(3600),
                load_targets: [("requests_per_second".to_owned(), 20.0)].into(),
            }),
            ..on("CPU", 1)
        },
    )
    .await
    .unwrap();
    wait_ready(&acme, &deployment.name, 1).await;

    // Six clients without pause: well over 20 requests a second for one replica.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target = format!("{model}#{}", deployment.name);
    let load: Vec<_> = (0..6)
        .map(|_| {
            let (acme, target, stop) = (acme.clone(), target.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_minilm(&embed(&acme, &target).await.expect("served under load"));
                }
            })
        })
        .collect();
    let up = wait_until(
        &acme,
        &deployment.name,
        Duration::from_secs(60),
        "the load to bring a second replica",
        |d| {
            d.desired_replica_count == 2
                && d.replica_stats
                    .as_ref()
                    .is_some_and(|s| s.ready_replica_count == 2)
        },
    )
    .await;
    assert_eq!(up.state, schv1::deployment::State::Ready as i32);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    // No load for the scale-down window: back to the minimum, never under it.
    let down = wait_until(
        &acme,
        &deployment.name,
        Duration::from_secs(60),
        "the deployment to scale back down",
        |d| d.desired_replica_count == 1 && d.replica_count == 1,
    )
    .await;
    assert_eq!(down.state, schv1::deployment::State::Ready as i32);
    let mut reasons = Vec::new();
    while reasons.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), scaled.next())
            .await
            .expect("scaled events")
            .expect("bus open");
        if let Some(kiln_events::Body::DeploymentScaled(s)) = event.body
            && s.name == deployment.name
        {
            reasons.push((s.desired_replica_count, s.reason));
        }
    }
    assert_eq!(
        reasons,
        vec![(2, "autoscaler".to_owned()), (1, "autoscaler".to_owned())]
    );
    mesh.shutdown().await;
}
