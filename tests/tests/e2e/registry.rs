//! The registry: real models up and back byte-identical, resumable and verified uploads,
//! validation that fails only the bad model, datasets, tenancy and the public library.

use std::time::Duration;

use kiln_proto::registry::v1 as regv1;
use kiln_proto::registry::v1::model::{Kind, State};
use kiln_tests::registry::{
    create_model, datasets, download, file_messages, models, sha256_hex, upload, upload_path,
    validate,
};
use kiln_tests::tenant;
use kiln_tests::{MeshOptions, TestMesh, asset, wait_for};
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

/// A safetensors file of F32 zeros with the given tensor shapes.
fn safetensors(tensors: &[(&str, [u64; 2])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let len = shape[0] * shape[1] * 4;
        header.insert((*name).to_owned(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.resize(out.len() + offset as usize, 0);
    out
}

pub(crate) fn lora(r: u64, v_out: u64) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"});
    let weights = safetensors(&[
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            [r, 576],
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            [576, r],
        ),
        (
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
            [r, 576],
        ),
        (
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
            [v_out, r],
        ),
    ]);
    (serde_json::to_vec(&config).unwrap(), weights)
}

#[tokio::test]
async fn real_models_round_trip_and_bad_uploads_fail_only_themselves() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let key = tenant(&admin, "acme").await;
    let ch = mesh.channel(Some(&key)).await;

    // SmolLM2 GGUF (~98 MB) up, validated, its metadata on the model, and back byte-identical.
    let gguf_path = asset("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let smol = create_model(&ch, "acme", "smollm2", Kind::BaseModel, None)
        .await
        .unwrap();
    let sent = upload_path(
        &ch,
        &smol.name,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        &gguf_path,
    )
    .await;
    assert!(sent.files[0].complete);
    let v = validate(&ch, &smol.name).await;
    assert!(v.valid, "{:?}", v.errors);
    let smol = v.model.unwrap();
    assert_eq!(smol.state, State::Ready as i32);
    let details = smol.base_model_details.clone().unwrap();
    assert_eq!(
        (
            details.num_layers,
            details.num_attention_heads,
            details.num_key_value_heads
        ),
        (30, 9, 3)
    );
    assert_eq!((details.vocab_size, details.hidden_size), (49152, 576));
    assert_eq!(details.model_type, "llama");
    assert!(
        details.parameter_count > 100_000_000,
        "{}",
        details.parameter_count
    );
    assert!(smol.context_length > 0);
    assert!(
        smol.conversation_config
            .unwrap()
            .template
            .contains("im_start"),
        "the GGUF's ChatML template"
    );
    let original = std::fs::read(&gguf_path).unwrap();
    let back = download(&ch, &smol.name, "SmolLM2-135M-Instruct.Q4_1.gguf", 0, 0)
        .await
        .unwrap();
    assert_eq!(back.len(), original.len());
    assert!(back == original, "the GGUF comes back byte-identical");
    let range = download(
        &ch,
        &smol.name,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        1_000_000,
        70_000,
    )
    .await
    .unwrap();
    assert_eq!(range, original[1_000_000..1_070_000]);
    drop((original, back));

    // The MiniLM ONNX bundle.
    let minilm = create_model(&ch, "acme", "minilm", Kind::EmbeddingModel, None)
        .await
        .unwrap();
    let onnx = std::fs::read(asset("all-minilm-l6-v2/model.onnx")).unwrap();
    let tokenizer = std::fs::read(asset("all-minilm-l6-v2/tokenizer.json")).unwrap();
    upload(
        &ch,
        &minilm.name,
        &[("model.onnx", &onnx), ("tokenizer.json", &tokenizer)],
    )
    .await
    .unwrap();
    let v = validate(&ch, &minilm.name).await;
    assert!(v.valid, "{:?}", v.errors);
    assert_eq!(
        v.model.unwrap().base_model_details.unwrap().task,
        "embedding"
    );
    assert!(
        download(&ch, &minilm.name, "model.onnx", 0, 0)
            .await
            .unwrap()
            == onnx
    );
    assert!(
        download(&ch, &minilm.name, "tokenizer.json", 0, 0)
            .await
            .unwrap()
            == tokenizer
    );
    // A READY model's files are immutable.
    let status = upload(&ch, &minilm.name, &[("extra.txt", b"x")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // A corrupted ONNX graph: that model FAILED, naming the file.
    let broken = create_model(&ch, "acme", "broken-onnx", Kind::EmbeddingModel, None)
        .await
        .unwrap();
    let mut garbage = onnx[..4096].to_vec();
    garbage.iter_mut().step_by(7).for_each(|b| *b ^= 0x5a);
    upload(
        &ch,
        &broken.name,
        &[("model.onnx", &garbage), ("tokenizer.json", &tokenizer)],
    )
    .await
    .unwrap();
    let v = validate(&ch, &broken.name).await;
    assert!(!v.valid);
    let failed = v.model.unwrap();
    assert_eq!(failed.state, State::Failed as i32);
    assert!(
        failed.status.unwrap().message.starts_with("model.onnx:"),
        "{:?}",
        v.errors
    );

    // A GGUF of an architecture Kiln cannot prepare.
    let gpt2 = create_model(&ch, "acme", "gpt2", Kind::BaseModel, None)
        .await
        .unwrap();
    upload(&ch, &gpt2.name, &[("gpt2.gguf", &tiny_gguf("gpt2"))])
        .await
        .unwrap();
    let v = validate(&ch, &gpt2.name).await;
    assert!(!v.valid);
    let message = v.model.unwrap().status.unwrap().message;
    assert!(
        message.starts_with("gpt2.gguf:") && message.contains("gpt2"),
        "{message}"
    );

    // LoRA addons on SmolLM2: shapes that fit are READY, shapes that don't are FAILED.
    let good = create_model(&ch, "acme", "lora-good", Kind::LoraAddon, Some(&smol.name))
        .await
        .unwrap();
    let (config, weights) = lora(8, 192);
    upload(
        &ch,
        &good.name,
        &[
            ("adapter_config.json", &config),
            ("adapter_model.safetensors", &weights),
        ],
    )
    .await
    .unwrap();
    let v = validate(&ch, &good.name).await;
    assert!(v.valid, "{:?}", v.errors);
    let peft = v.model.unwrap().peft_details.unwrap();
    assert_eq!((peft.r, peft.base_model.as_str()), (8, smol.name.as_str()));
    let bad = create_model(&ch, "acme", "lora-bad", Kind::LoraAddon, Some(&smol.name))
        .await
        .unwrap();
    let (config, weights) = lora(8, 576);
    upload(
        &ch,
        &bad.name,
        &[
            ("adapter_config.json", &config),
            ("adapter_model.safetensors", &weights),
        ],
    )
    .await
    .unwrap();
    let v = validate(&ch, &bad.name).await;
    assert!(!v.valid);
    let message = v.model.unwrap().status.unwrap().message;
    assert!(
        message.contains("v_proj.lora_B"),
        "names the tensor: {message}"
    );

    // Nothing else changed.
    for (name, state) in [
        (&smol.name, State::Ready),
        (&minilm.name, State::Ready),
        (&good.name, State::Ready),
    ] {
        let m = models(&ch)
            .get_model(regv1::GetModelRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(m.state, state as i32, "{name}");
    }
    // The base cannot go while an addon needs it.
    let status = models(&ch)
        .delete_model(regv1::DeleteModelRequest {
            name: smol.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);

    // The ONNX bundle prepares into a bundle with a manifest.
    let prepared = models(&ch)
        .prepare_model(regv1::PrepareModelRequest {
            name: minilm.name.clone(),
            precision: 0,
            force: false,
        })
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
    let admin = mesh.admin().await;
    let key = tenant(&admin, "acme").await;
    let ch = mesh.channel(Some(&key)).await;
    let model = create_model(&ch, "acme", "weights", Kind::TensorModel, None)
        .await
        .unwrap();
    let bytes: Vec<u8> = (0..6_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();

    // A wrong SHA-256: refused, nothing stored, nothing READY.
    let mut messages = file_messages(&model.name, &[("model.onnx", &bytes)], 0, None);
    if let Some(regv1::upload_model_files_request::Payload::Header(h)) =
        messages[0].payload.as_mut()
    {
        h.sha256 = sha256_hex(b"something else");
    }
    let status = models(&ch)
        .upload_model_files(futures::stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("SHA-256"), "{}", status.message());
    let m = models(&ch)
        .get_model(regv1::GetModelRequest {
            name: model.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state, State::Uploading as i32);
    assert_eq!(m.files[0].uploaded_bytes, 0);
    assert!(!validate(&ch, &model.name).await.valid);

    // Cut half-way: what arrived stays, and GetModel says where to resume.
    let half = file_messages(&model.name, &[("model.onnx", &bytes)], 0, Some(3 << 20));
    models(&ch)
        .upload_model_files(futures::stream::iter(half))
        .await
        .unwrap();
    let m = models(&ch)
        .get_model(regv1::GetModelRequest {
            name: model.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let stored = m.files[0].uploaded_bytes as usize;
    assert_eq!(stored, 3 << 20);
    assert!(!m.files[0].complete);
    // A chunk that does not continue the stored bytes is refused.
    let wrong = file_messages(&model.name, &[("model.onnx", &bytes)], 0, Some(1 << 20));
    let status = models(&ch)
        .upload_model_files(futures::stream::iter(wrong))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    // The rest, from the stored offset.
    let rest = file_messages(&model.name, &[("model.onnx", &bytes)], stored, None);
    let done = models(&ch)
        .upload_model_files(futures::stream::iter(rest))
        .await
        .unwrap()
        .into_inner();
    assert!(done.files[0].complete);
    assert_eq!(
        done.received_bytes as usize,
        bytes.len() - stored,
        "only the missing bytes were sent"
    );
    assert!(
        download(&ch, &model.name, "model.onnx", 0, 0)
            .await
            .unwrap()
            == bytes
    );
    mesh.shutdown().await;
}

fn chat_line(i: usize) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": format!("question {i}")}, {"role": "assistant", "content": format!("answer {i}")}]}).to_string()
}

async fn upload_dataset(
    ch: &kiln_tests::AuthedChannel,
    name: &str,
    bytes: &[u8],
) -> Result<regv1::Dataset, tonic::Status> {
    let mut messages = vec![regv1::UploadDatasetRequest {
        payload: Some(regv1::upload_dataset_request::Payload::Header(
            regv1::DatasetFileHeader {
                dataset: name.to_owned(),
                size_bytes: bytes.len() as i64,
                sha256: sha256_hex(bytes),
            },
        )),
    }];
    for (i, chunk) in bytes.chunks(1000).enumerate() {
        messages.push(regv1::UploadDatasetRequest {
            payload: Some(regv1::upload_dataset_request::Payload::Chunk(
                regv1::FileChunk {
                    offset: (i * 1000) as i64,
                    data: chunk.to_vec().into(),
                },
            )),
        });
    }
    datasets(ch)
        .upload_dataset(futures::stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

async fn create_dataset(ch: &kiln_tests::AuthedChannel, account: &str, id: &str) -> regv1::Dataset {
    datasets(ch)
        .create_dataset(regv1::CreateDatasetRequest {
            parent: format!("accounts/{account}"),
            dataset_id: id.to_owned(),
            dataset: Some(regv1::Dataset {
                format: regv1::dataset::Format::Chat as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn datasets_are_checked_line_by_line_and_immutable_once_ready() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let key = tenant(&admin, "acme").await;
    let ch = mesh.channel(Some(&key)).await;

    let bad = create_dataset(&ch, "acme", "bad").await;
    let mut lines: Vec<String> = (1..=100).map(chat_line).collect();
    lines[36] = r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#.to_owned();
    let status = upload_dataset(&ch, &bad.name, lines.join("\n").as_bytes())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("line 37"), "{}", status.message());
    let got = datasets(&ch)
        .get_dataset(regv1::GetDatasetRequest {
            name: bad.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state, regv1::dataset::State::Failed as i32);
    assert!(got.status.unwrap().message.contains("line 37"));

    let good = create_dataset(&ch, "acme", "good").await;
    let text = (1..=100).map(chat_line).collect::<Vec<_>>().join("\n") + "\n";
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

    use futures::StreamExt;
    let mut stream = datasets(&ch)
        .download_dataset(regv1::DownloadDatasetRequest {
            name: good.name.clone(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(piece) = stream.next().await {
        back.extend_from_slice(&piece.unwrap().data);
    }
    assert_eq!(back, text.as_bytes());

    let few = create_dataset(&ch, "acme", "few").await;
    let status = upload_dataset(
        &ch,
        &few.name,
        (1..=2)
            .map(chat_line)
            .collect::<Vec<_>>()
            .join("\n")
            .as_bytes(),
    )
    .await
    .unwrap_err();
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
    let mut events = mesh.bus.subscribe("kiln.registry.>").await.unwrap();
    let acme = mesh.channel(Some(&tenant(&admin, "acme").await)).await;
    let globex = mesh.channel(Some(&tenant(&admin, "globex").await)).await;

    let private = create_model(&acme, "acme", "secret", Kind::TensorModel, None)
        .await
        .unwrap();
    let status = models(&globex)
        .get_model(regv1::GetModelRequest {
            name: private.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = models(&globex)
        .delete_model(regv1::DeleteModelRequest {
            name: private.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let listed = models(&globex)
        .list_models(regv1::ListModelsRequest {
            parent: "accounts/acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.models.is_empty(),
        "another account's private models do not list"
    );
    let ds = create_dataset(&acme, "acme", "train").await;
    let status = datasets(&globex)
        .get_dataset(regv1::GetDatasetRequest { name: ds.name })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = models(&acme)
        .create_model(regv1::CreateModelRequest {
            parent: "accounts/acme".into(),
            model_id: "mine".into(),
            model: Some(regv1::Model {
                kind: Kind::TensorModel as i32,
                public: true,
                ..Default::default()
            }),
        })
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
    let library = wait_for(
        Duration::from_secs(120),
        "the public library to be imported",
        || {
            let globex = globex.clone();
            async move {
                let listed = models(&globex)
                    .list_models(regv1::ListModelsRequest {
                        parent: "accounts/kiln".into(),
                        filter: "state = READY".into(),
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                (listed.models.len() == 2).then_some(listed.models)
            }
        },
    )
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
    let status = models(&globex)
        .update_model(regv1::UpdateModelRequest {
            model: Some(regv1::Model {
                name: minilm.clone(),
                display_name: "mine now".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = models(&globex)
        .delete_model(regv1::DeleteModelRequest {
            name: minilm.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // The admin may change the library.
    models(&admin)
        .update_model(regv1::UpdateModelRequest {
            model: Some(regv1::Model {
                name: minilm.clone(),
                description: "Sentence embeddings, 384 dimensions".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into()],
            }),
        })
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
    let admin = mesh.admin().await;
    let ch = mesh.channel(Some(&tenant(&admin, "acme").await)).await;
    let model = create_model(&ch, "acme", "served", Kind::TensorModel, None)
        .await
        .unwrap();
    let deployed = DeployedModel {
        name: "accounts/acme/deployedModels/served-1".into(),
        model: model.name.clone(),
        deployment: "accounts/acme/deployments/d1".into(),
        default: true,
        state: deployed_model::State::Deployed as i32,
        ..Default::default()
    };
    // What the scheduler publishes when it deploys the model.
    let event = kiln_events::new_event(
        "kiln-scheduler",
        "scheduler.deployed_model.created",
        "accounts/acme",
        &deployed.name,
        kiln_events::Body::DeployedModelCreated(ev::DeployedModelCreated {
            deployed_model: Some(deployed.clone()),
        }),
    );
    mesh.bus
        .publish("kiln.scheduler.deployed_model.created", &event)
        .await
        .unwrap();
    mesh.bus
        .publish("kiln.scheduler.deployed_model.created", &event)
        .await
        .unwrap();
    let refs = wait_for(
        Duration::from_secs(10),
        "the deployed model to show on the model",
        || {
            let ch = ch.clone();
            let name = model.name.clone();
            async move {
                let m = models(&ch)
                    .get_model(regv1::GetModelRequest { name })
                    .await
                    .ok()?
                    .into_inner();
                (!m.deployed_model_refs.is_empty()).then_some(m.deployed_model_refs)
            }
        },
    )
    .await;
    assert_eq!(refs.len(), 1, "a redelivered event adds nothing");
    assert_eq!(
        (refs[0].state.as_str(), refs[0].default),
        ("DEPLOYED", true)
    );
    // A metadata change keeps the refs.
    models(&ch)
        .update_model(regv1::UpdateModelRequest {
            model: Some(regv1::Model {
                name: model.name.clone(),
                description: "in service".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into()],
            }),
        })
        .await
        .unwrap();
    let status = models(&ch)
        .delete_model(regv1::DeleteModelRequest {
            name: model.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("served-1"),
        "{}",
        status.message()
    );

    let gone = kiln_events::new_event(
        "kiln-scheduler",
        "scheduler.deployed_model.deleted",
        "accounts/acme",
        &deployed.name,
        kiln_events::Body::DeployedModelDeleted(ev::DeployedModelDeleted {
            name: deployed.name.clone(),
            model: model.name.clone(),
            deployment: deployed.deployment.clone(),
        }),
    );
    mesh.bus
        .publish("kiln.scheduler.deployed_model.deleted", &gone)
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the ref to go", || {
        let ch = ch.clone();
        let name = model.name.clone();
        async move {
            let m = models(&ch)
                .get_model(regv1::GetModelRequest { name })
                .await
                .ok()?
                .into_inner();
            m.deployed_model_refs.is_empty().then_some(())
        }
    })
    .await;
    models(&ch)
        .delete_model(regv1::DeleteModelRequest {
            name: model.name.clone(),
        })
        .await
        .unwrap();
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
    let admin = mesh.admin().await;
    let ch = mesh.channel(Some(&tenant(&admin, "acme").await)).await;
    let minilm = create_model(&ch, "acme", "minilm", Kind::EmbeddingModel, None)
        .await
        .unwrap();
    let onnx = std::fs::read(asset("all-minilm-l6-v2/model.onnx")).unwrap();
    let tokenizer = std::fs::read(asset("all-minilm-l6-v2/tokenizer.json")).unwrap();
    // Half, then the rest: resuming works the same over S3.
    let half = file_messages(&minilm.name, &[("model.onnx", &onnx)], 0, Some(10 << 20));
    models(&ch)
        .upload_model_files(futures::stream::iter(half))
        .await
        .unwrap();
    let rest = file_messages(&minilm.name, &[("model.onnx", &onnx)], 10 << 20, None);
    models(&ch)
        .upload_model_files(futures::stream::iter(rest))
        .await
        .unwrap();
    upload(&ch, &minilm.name, &[("tokenizer.json", &tokenizer)])
        .await
        .unwrap();
    let v = validate(&ch, &minilm.name).await;
    assert!(v.valid, "{:?}", v.errors);
    assert!(
        download(&ch, &minilm.name, "model.onnx", 0, 0)
            .await
            .unwrap()
            == onnx
    );
    assert_eq!(
        download(&ch, &minilm.name, "tokenizer.json", 100, 50)
            .await
            .unwrap(),
        tokenizer[100..150]
    );
    // The bytes are in the bucket, not on the local disk.
    assert!(!mesh.data_dir.path().join("objects").exists());
    mesh.shutdown().await;
    s3.stop().await;
}
