//! The registry: real models up and back byte-identical, resumable and verified uploads,
//! validation that fails only the bad model, datasets, tenancy and the public library.

use std::time::Duration;

use kiln_proto::registry::v1 as regv1;
use kiln_proto::registry::v1::model::{Kind, State};
use kiln_tests::registry::{
    create_dataset, create_model, delete_model, download, download_dataset, file_messages,
    get_dataset, get_model, list_models, sha256_hex, update_model, upload, upload_dataset,
    upload_lora, upload_messages, upload_path, validate,
};
use kiln_tests::{MeshOptions, TestMesh, asset, expect_code, wait_for};
use tonic::Code;

/// A GGUF header with the given architecture and no tensors.
fn tiny_gguf(architecture: &str) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // tensors
    out.extend_from_slice(&1u64.to_le_bytes()); // metadata pairs
    let key = b"general.architecture";
    out.extend_from_slice(&(key.len() as u64).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&8u32.to_le_bytes()); // string
    out.extend_from_slice(&(architecture.len() as u64).to_le_bytes());
    out.extend_from_slice(architecture.as_bytes());
    out
}

/// Validates `model` and returns its message when it FAILED (the rest of the answer
/// agreeing).
async fn failed_validation(ch: &kiln_tests::AuthedChannel, model: &str) -> String {
    let v = validate(ch, model).await;
    assert!(!v.valid);
    let failed = v.model.unwrap();
    assert_eq!(failed.state, State::Failed as i32);
    failed.status.unwrap().message
}

#[tokio::test]
async fn real_models_round_trip_and_bad_uploads_fail_only_themselves() {
    let mesh = TestMesh::start().await;
    let ch = mesh.tenant_channel("acme").await;

    // SmolLM2 GGUF (~98 MB) up, validated, its metadata on the model, and back byte-identical.
    let gguf = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let gguf_path = asset(&format!("smollm2-135m-instruct/{gguf}"));
    let smol = create_model(&ch, "acme", "smollm2", Kind::BaseModel, None).await;
    let sent = upload_path(&ch, &smol.name, gguf, &gguf_path).await;
    assert!(sent.files[0].complete);
    let v = validate(&ch, &smol.name).await;
    assert!(v.valid, "{:?}", v.errors);
    let smol = v.model.unwrap();
    assert_eq!(smol.state, State::Ready as i32);
    let details = smol.base_model_details.clone().unwrap();
    let heads = (details.num_attention_heads, details.num_key_value_heads);
    assert_eq!((details.num_layers, heads.0, heads.1), (30, 9, 3));
    assert_eq!((details.vocab_size, details.hidden_size), (49152, 576));
    assert_eq!(details.model_type, "llama");
    let parameters = details.parameter_count;
    assert!(parameters > 100_000_000, "{parameters}");
    assert!(smol.context_length > 0);
    let template = smol.conversation_config.unwrap().template;
    assert!(template.contains("im_start"), "the GGUF's ChatML template");
    let original = std::fs::read(&gguf_path).unwrap();
    let back = download(&ch, &smol.name, gguf, 0, 0).await.unwrap();
    assert_eq!(back.len(), original.len());
    assert!(back == original, "the GGUF comes back byte-identical");
    let range = download(&ch, &smol.name, gguf, 1_000_000, 70_000).await;
    assert_eq!(range.unwrap(), original[1_000_000..1_070_000]);
    drop((original, back));

    // The MiniLM ONNX bundle.
    let minilm = create_model(&ch, "acme", "minilm", Kind::EmbeddingModel, None).await;
    let onnx = std::fs::read(asset("all-minilm-l6-v2/model.onnx")).unwrap();
    let tokenizer = std::fs::read(asset("all-minilm-l6-v2/tokenizer.json")).unwrap();
    let files: [(&str, &[u8]); 2] = [("model.onnx", &onnx), ("tokenizer.json", &tokenizer)];
    upload(&ch, &minilm.name, &files).await.unwrap();
    let v = validate(&ch, &minilm.name).await;
    assert!(v.valid, "{:?}", v.errors);
    let task = v.model.unwrap().base_model_details.unwrap().task;
    assert_eq!(task, "embedding");
    for (path, bytes) in files {
        let back = download(&ch, &minilm.name, path, 0, 0).await.unwrap();
        assert!(back == bytes, "{path} comes back byte-identical");
    }
    // A READY model's files are immutable.
    let extra = upload(&ch, &minilm.name, &[("extra.txt", b"x")]).await;
    expect_code(extra, Code::FailedPrecondition);

    // A corrupted ONNX graph: that model FAILED, naming the file.
    let broken = create_model(&ch, "acme", "broken-onnx", Kind::EmbeddingModel, None).await;
    let mut garbage = onnx[..4096].to_vec();
    garbage.iter_mut().step_by(7).for_each(|b| *b ^= 0x5a);
    let files: [(&str, &[u8]); 2] = [("model.onnx", &garbage), ("tokenizer.json", &tokenizer)];
    upload(&ch, &broken.name, &files).await.unwrap();
    let message = failed_validation(&ch, &broken.name).await;
    assert!(message.starts_with("model.onnx:"), "{message}");

    // A GGUF of an architecture Kiln cannot prepare.
    let gpt2 = create_model(&ch, "acme", "gpt2", Kind::BaseModel, None).await;
    upload(&ch, &gpt2.name, &[("gpt2.gguf", &tiny_gguf("gpt2"))])
        .await
        .unwrap();
    let message = failed_validation(&ch, &gpt2.name).await;
    assert!(
        message.starts_with("gpt2.gguf:") && message.contains("gpt2"),
        "{message}"
    );

    // LoRA addons on SmolLM2: shapes that fit are READY, shapes that don't are FAILED.
    let addon = |id| create_model(&ch, "acme", id, Kind::LoraAddon, Some(&smol.name));
    let good = addon("lora-good").await;
    upload_lora(&ch, &good.name, 8, 192).await.unwrap();
    let v = validate(&ch, &good.name).await;
    assert!(v.valid, "{:?}", v.errors);
    let peft = v.model.unwrap().peft_details.unwrap();
    assert_eq!((peft.r, peft.base_model.as_str()), (8, smol.name.as_str()));
    let bad = addon("lora-bad").await;
    upload_lora(&ch, &bad.name, 8, 576).await.unwrap();
    let message = failed_validation(&ch, &bad.name).await;
    assert!(
        message.contains("v_proj.lora_B"),
        "names the tensor: {message}"
    );

    // Nothing else changed.
    for name in [&smol.name, &minilm.name, &good.name] {
        let m = get_model(&ch, name).await.unwrap();
        assert_eq!(m.state, State::Ready as i32, "{name}");
    }
    // The base cannot go while an addon needs it.
    let deleted = delete_model(&ch, &smol.name).await;
    expect_code(deleted, Code::FailedPrecondition);

    // The ONNX bundle prepares into a bundle with a manifest.
    let request = regv1::PrepareModelRequest {
        name: minilm.name.clone(),
        precision: 0,
        force: false,
    };
    let prepared = kiln_tests::registry::models(&ch)
        .prepare_model(request)
        .await
        .unwrap()
        .into_inner();
    let bundle = &prepared.prepared_bundles[0];
    assert_eq!(bundle.state, regv1::prepared_bundle::State::Ready as i32);
    assert!(bundle.files.iter().any(|f| f.path == "manifest.json"));
    mesh.shutdown().await;
}

#[tokio::test]
async fn uploads_are_verified_and_resume_where_they_stopped() {
    let mesh = TestMesh::start().await;
    let ch = mesh.tenant_channel("acme").await;
    let model = create_model(&ch, "acme", "weights", Kind::TensorModel, None).await;
    let bytes: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = [("model.onnx", bytes.as_slice())];

    // A wrong SHA-256: refused, nothing stored, nothing READY.
    let mut messages = file_messages(&model.name, &file, 0, None);
    if let Some(regv1::upload_model_files_request::Payload::Header(h)) =
        messages[0].payload.as_mut()
    {
        h.sha256 = sha256_hex(b"something else");
    }
    let status = expect_code(upload_messages(&ch, messages).await, Code::InvalidArgument);
    assert!(status.message().contains("SHA-256"), "{}", status.message());
    let m = get_model(&ch, &model.name).await.unwrap();
    assert_eq!(m.state, State::Uploading as i32);
    assert_eq!(m.files[0].uploaded_bytes, 0);
    assert!(!validate(&ch, &model.name).await.valid);

    // Cut half-way: what arrived stays, and GetModel says where to resume.
    let half = file_messages(&model.name, &file, 0, Some(3 << 20));
    upload_messages(&ch, half).await.unwrap();
    let m = get_model(&ch, &model.name).await.unwrap();
    let stored = m.files[0].uploaded_bytes as usize;
    assert_eq!(stored, 3 << 20);
    assert!(!m.files[0].complete);
    // A chunk that does not continue the stored bytes is refused.
    let wrong = file_messages(&model.name, &file, 0, Some(1 << 20));
    expect_code(upload_messages(&ch, wrong).await, Code::FailedPrecondition);
    // The rest, from the stored offset.
    let rest = file_messages(&model.name, &file, stored, None);
    let done = upload_messages(&ch, rest).await.unwrap();
    assert!(done.files[0].complete);
    assert_eq!(
        done.received_bytes as usize,
        bytes.len() - stored,
        "only the missing bytes were sent"
    );
    let back = download(&ch, &model.name, "model.onnx", 0, 0).await;
    assert!(back.unwrap() == bytes);
    mesh.shutdown().await;
}

fn chat_line(i: usize) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": format!("question {i}")}, {"role": "assistant", "content": format!("answer {i}")}]}).to_string()
}

#[tokio::test]
async fn datasets_are_checked_line_by_line_and_immutable_once_ready() {
    let mesh = TestMesh::start().await;
    let ch = mesh.tenant_channel("acme").await;
    let lines = |n| (1..=n).map(chat_line).collect::<Vec<_>>();

    let bad = create_dataset(&ch, "acme", "bad").await;
    let mut wizard = lines(100);
    wizard[36] = r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#.to_owned();
    let refused = upload_dataset(&ch, &bad.name, wizard.join("\n").as_bytes()).await;
    let status = expect_code(refused, Code::InvalidArgument);
    assert!(status.message().contains("line 37"), "{}", status.message());
    let got = get_dataset(&ch, &bad.name).await.unwrap();
    assert_eq!(got.state, regv1::dataset::State::Failed as i32);
    assert!(got.status.unwrap().message.contains("line 37"));

    let good = create_dataset(&ch, "acme", "good").await;
    let text = lines(100).join("\n") + "\n";
    let ready = upload_dataset(&ch, &good.name, text.as_bytes())
        .await
        .unwrap();
    assert_eq!(ready.state, regv1::dataset::State::Ready as i32);
    assert_eq!(ready.example_count, 100);
    assert_eq!(ready.size_bytes as usize, text.len());
    let status = upload_dataset(&ch, &good.name, text.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "a READY dataset refuses new content"
    );
    assert_eq!(download_dataset(&ch, &good.name).await, text.as_bytes());

    let few = create_dataset(&ch, "acme", "few").await;
    let refused = upload_dataset(&ch, &few.name, lines(2).join("\n").as_bytes()).await;
    let status = refused.unwrap_err();
    assert!(
        status.message().contains("at least 3"),
        "{}",
        status.message()
    );
    mesh.shutdown().await;
}

#[tokio::test]
async fn private_is_private_and_the_public_library_is_read_only() {
    let mesh = TestMesh::start_with(MeshOptions {
        import_library: true,
        ..Default::default()
    })
    .await;
    let admin = mesh.admin().await;
    let mut events = mesh.subscribe("kiln.registry.>").await;
    let acme = mesh.tenant_channel("acme").await;
    let globex = mesh.tenant_channel("globex").await;

    let private = create_model(&acme, "acme", "secret", Kind::TensorModel, None).await;
    expect_code(get_model(&globex, &private.name).await, Code::NotFound);
    expect_code(delete_model(&globex, &private.name).await, Code::NotFound);
    let listed = list_models(&globex, "accounts/acme", "").await.unwrap();
    assert!(
        listed.is_empty(),
        "another account's private models do not list"
    );
    let ds = create_dataset(&acme, "acme", "train").await;
    expect_code(get_dataset(&globex, &ds.name).await, Code::NotFound);
    let public = regv1::Model {
        kind: Kind::TensorModel as i32,
        public: true,
        ..Default::default()
    };
    let request = regv1::CreateModelRequest {
        parent: "accounts/acme".into(),
        model_id: "mine".into(),
        model: Some(public),
    };
    let status = kiln_tests::registry::models(&acme)
        .create_model(request)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "only the admin publishes"
    );

    // The library, imported at start from the asset cache, is READY and readable by all.
    asset("all-minilm-l6-v2/model.onnx");
    asset("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let what = "the public library to be imported";
    let library = wait_for(Duration::from_secs(120), what, || async {
        let listed = list_models(&globex, "accounts/kiln", "state = READY").await;
        listed.ok().filter(|models| models.len() == 2)
    })
    .await;
    let names: Vec<&str> = library.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "accounts/kiln/models/all-minilm-l6-v2",
            "accounts/kiln/models/smollm2-135m-instruct"
        ]
    );
    assert!(library.iter().all(|m| m.public));
    let minilm = "accounts/kiln/models/all-minilm-l6-v2".to_owned();
    let head = download(&globex, &minilm, "tokenizer.json", 0, 100)
        .await
        .unwrap();
    assert_eq!(head.len(), 100);
    let described = |field: regv1::Model| regv1::Model {
        name: minilm.clone(),
        ..field
    };
    let renamed = described(regv1::Model {
        display_name: "mine now".into(),
        ..Default::default()
    });
    let status = update_model(&globex, renamed, &["display_name"]).await;
    expect_code(status, Code::PermissionDenied);
    expect_code(delete_model(&globex, &minilm).await, Code::PermissionDenied);
    // The admin may change the library.
    let description = described(regv1::Model {
        description: "Sentence embeddings, 384 dimensions".into(),
        ..Default::default()
    });
    update_model(&admin, description, &["description"])
        .await
        .unwrap();

    // Every change went out as an event.
    let mut types = std::collections::HashSet::new();
    while types.len() < 3 {
        let event = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut events),
        )
        .await
        .unwrap()
        .unwrap();
        types.insert(event.r#type);
    }
    assert!(
        types.contains("registry.model.created") && types.contains("registry.dataset.created"),
        "{types:?}"
    );
    mesh.shutdown().await;
}

#[tokio::test]
async fn a_deployed_model_cannot_be_deleted_and_refs_follow_scheduler_events() {
    use kiln_proto::events::v1 as ev;
    use kiln_proto::scheduler::v1::{DeployedModel, deployed_model};
    let mesh = TestMesh::start().await;
    let ch = mesh.tenant_channel("acme").await;
    let model = create_model(&ch, "acme", "served", Kind::TensorModel, None).await;
    let deployed = DeployedModel {
        name: "accounts/acme/deployedModels/served-1".into(),
        model: model.name.clone(),
        deployment: "accounts/acme/deployments/d1".into(),
        default: true,
        state: deployed_model::State::Deployed as i32,
        ..Default::default()
    };
    // What the scheduler publishes when it deploys the model (here twice: a redelivery).
    let event = |what: &str, body| {
        let kind = format!("scheduler.deployed_model.{what}");
        kiln_events::new_event(
            "kiln-scheduler",
            &kind,
            "accounts/acme",
            &deployed.name,
            body,
        )
    };
    let created = event(
        "created",
        kiln_events::Body::DeployedModelCreated(ev::DeployedModelCreated {
            deployed_model: Some(deployed.clone()),
        }),
    );
    for _ in 0..2 {
        let subject = "kiln.scheduler.deployed_model.created";
        mesh.bus.publish(subject, &created).await.unwrap();
    }
    let model_refs = || async {
        let model = get_model(&ch, &model.name).await.ok()?;
        Some(model.deployed_model_refs)
    };
    let what = "the deployed model to show on the model";
    let refs = wait_for(Duration::from_secs(10), what, || async {
        model_refs().await.filter(|refs| !refs.is_empty())
    })
    .await;
    assert_eq!(refs.len(), 1, "a redelivered event adds nothing");
    assert_eq!(
        (refs[0].state.as_str(), refs[0].default),
        ("DEPLOYED", true)
    );
    // A metadata change keeps the refs.
    let described = regv1::Model {
        name: model.name.clone(),
        description: "in service".into(),
        ..Default::default()
    };
    update_model(&ch, described, &["description"])
        .await
        .unwrap();
    let status = expect_code(
        delete_model(&ch, &model.name).await,
        Code::FailedPrecondition,
    );
    assert!(
        status.message().contains("served-1"),
        "{}",
        status.message()
    );

    let gone = event(
        "deleted",
        kiln_events::Body::DeployedModelDeleted(ev::DeployedModelDeleted {
            name: deployed.name.clone(),
            model: model.name.clone(),
            deployment: deployed.deployment.clone(),
        }),
    );
    let subject = "kiln.scheduler.deployed_model.deleted";
    mesh.bus.publish(subject, &gone).await.unwrap();
    wait_for(Duration::from_secs(10), "the ref to go", || async {
        model_refs().await.filter(Vec::is_empty).map(drop)
    })
    .await;
    delete_model(&ch, &model.name).await.unwrap();
    mesh.shutdown().await;
}

#[tokio::test]
async fn artifacts_live_in_an_s3_compatible_store_when_configured() {
    let s3 = kiln_tests::S3Server::start().await;
    let mesh = TestMesh::start_with(MeshOptions {
        registry: Some(s3.registry_config()),
        ..Default::default()
    })
    .await;
    let ch = mesh.tenant_channel("acme").await;
    let minilm = create_model(&ch, "acme", "minilm", Kind::EmbeddingModel, None).await;
    let onnx = std::fs::read(asset("all-minilm-l6-v2/model.onnx")).unwrap();
    let tokenizer = std::fs::read(asset("all-minilm-l6-v2/tokenizer.json")).unwrap();
    // Half, then the rest: resuming works the same over S3.
    let file = [("model.onnx", onnx.as_slice())];
    let half = file_messages(&minilm.name, &file, 0, Some(10 << 20));
    upload_messages(&ch, half).await.unwrap();
    let rest = file_messages(&minilm.name, &file, 10 << 20, None);
    upload_messages(&ch, rest).await.unwrap();
    upload(&ch, &minilm.name, &[("tokenizer.json", &tokenizer)])
        .await
        .unwrap();
    let v = validate(&ch, &minilm.name).await;
    assert!(v.valid, "{:?}", v.errors);
    let back = download(&ch, &minilm.name, "model.onnx", 0, 0).await;
    assert!(back.unwrap() == onnx);
    let range = download(&ch, &minilm.name, "tokenizer.json", 100, 50).await;
    assert_eq!(range.unwrap(), tokenizer[100..150]);
    // The bytes are in the bucket, not on the local disk.
    assert!(!mesh.data_dir.path().join("objects").exists());
    mesh.shutdown().await;
    s3.stop().await;
}
