//! An ONNX LLM exported by Hugging Face optimum (not by Kiln's preparer) loads and serves:
//! a tiny random Llama exported with its config, tokenizer and chat template files
//! (tests/data/llm/hf-optimum, made by make_fixture.py with transformers and optimum), checked
//! against transformers' own logits and greedy continuations of the same weights.

use kiln_proto::kiln_inference::v1 as infv1;
use kiln_proto::registry::v1 as regv1;
use kiln_tests::inference::{client, load_session, max_abs_diff};
use kiln_tests::llm::{answer_text, decoder_logits, read_stream, send_chat};
use kiln_tests::registry as reg;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/llm/hf-optimum");

#[derive(serde::Deserialize)]
struct Reference {
    prompts: Vec<Prompt>,
}

#[derive(serde::Deserialize)]
struct Prompt {
    kind: String,
    text: String,
    input_ids: Vec<u32>,
    new_ids: Vec<u32>,
    new_text: String,
    last_logits: Vec<f32>,
    #[serde(default)]
    messages: Vec<Message>,
}

#[derive(serde::Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn reference() -> Reference {
    kiln_tests::data_json("llm/hf-optimum/reference.json")
}

fn export_dir() -> std::path::PathBuf {
    std::path::Path::new(FIXTURE).join("tiny-llama")
}

/// The graph's logits at the prompt's last position, the prompt fed whole with an empty past.
fn last_logits(backend: &str, prompt: &[u32]) -> Vec<f32> {
    let mut session = load_session(backend, &export_dir().join("model.onnx"), 1);
    let n = prompt.len();
    let ids = prompt.iter().map(|&x| i64::from(x)).collect();
    let positions = (0..n as i64).collect();
    let (values, vocab) = decoder_logits(session.as_mut(), [1, n], ids, vec![1; n], positions);
    values[(n - 1) * vocab..n * vocab].to_vec()
}

/// On ONNX Runtime. (tract 0.23 refuses this graph at load: its shape analysis cannot follow
/// the Flatten of the attention-mask expansion over symbolic lengths.)
#[test]
fn the_optimum_export_gives_transformers_logits_on_onnx_runtime() {
    let reference = reference();
    for backend in ["onnxruntime"] {
        for p in &reference.prompts {
            let got = last_logits(backend, &p.input_ids);
            assert_eq!(got.len(), p.last_logits.len());
            let worst = max_abs_diff(&got, &p.last_logits);
            assert!(
                worst < 1e-3,
                "{backend}, {:?}: logits differ from transformers' by {worst}",
                p.text
            );
        }
    }
}

/// Creates base model `id` in acme from the export's files, as optimum wrote them but for
/// `replaced` (a file's name and other content), and validates it.
async fn upload_export(
    acme: &kiln_tests::AuthedChannel,
    id: &str,
    replaced: Option<(&str, &[u8])>,
) -> regv1::ValidateModelUploadResponse {
    let kind = regv1::model::Kind::BaseModel;
    let model = reg::create_model(acme, "acme", id, kind, None).await;
    let mut files: Vec<_> = std::fs::read_dir(export_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        match replaced {
            Some((file, bytes)) if file == name => {
                reg::upload(acme, &model.name, &[(name, bytes)])
                    .await
                    .unwrap();
            }
            _ => {
                reg::upload_path(acme, &model.name, name, path).await;
            }
        }
    }
    reg::validate(acme, &model.name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optimum_export_uploads_and_generates_like_transformers() {
    let reference = reference();
    let mesh = kiln_tests::TestMesh::start().await;
    let acme = mesh.tenant_channel("acme").await;

    // The export folder as optimum wrote it, every file, no manifest of Kiln's.
    let validated = upload_export(&acme, "tiny-llama", None).await;
    assert!(validated.valid, "{validated:?}");
    let model = validated.model.expect("the validated model");
    assert_eq!(model.state, regv1::model::State::Ready as i32);
    // What the Hugging Face files say shows on the model.
    assert_eq!(model.context_length, 256);
    let details = model.base_model_details.as_ref().unwrap();
    assert_eq!(details.task, "text-generation");
    assert_eq!(details.model_type, "llama");
    let template = std::fs::read_to_string(export_dir().join("chat_template.jinja")).unwrap();
    assert_eq!(
        model.conversation_config.as_ref().unwrap().template,
        template
    );

    // The same export with a broken config.json fails, naming the file; the good one is
    // untouched.
    let bad: &[u8] = br#"{"max_position_embeddings": "long"}"#;
    let refused = upload_export(&acme, "broken-llama", Some(("config.json", bad))).await;
    assert!(!refused.valid);
    let failed = refused.model.unwrap();
    assert_eq!(failed.state, regv1::model::State::Failed as i32);
    assert_eq!(
        failed.status.unwrap().message,
        "config.json: max_position_embeddings must be a positive integer, got \"long\""
    );

    kiln_tests::deployments::deploy(&acme, &model.name).await;

    for p in &reference.prompts {
        let want_tokens = p.new_ids.len() as i32;
        let (text, finish, usage) = if p.kind == "chat" {
            // Rendered through the export's own chat template.
            let messages = p.messages.iter().map(|m| infv1::ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
                name: String::new(),
            });
            let request = infv1::CreateChatCompletionRequest {
                model: model.name.clone(),
                messages: messages.collect(),
                max_tokens: Some(want_tokens),
                temperature: Some(0.0),
                ..Default::default()
            };
            let answer = send_chat(&acme, request).await.unwrap();
            let text = answer_text(&answer).to_owned();
            (text, answer.choices[0].finish_reason.clone(), answer.usage)
        } else {
            let request = infv1::CreateCompletionRequest {
                model: model.name.clone(),
                prompt: p.text.clone(),
                max_tokens: Some(want_tokens),
                temperature: Some(0.0),
                ..Default::default()
            };
            let answer = client(&acme)
                .create_completion(request.clone())
                .await
                .unwrap()
                .into_inner();
            // The stream gives the same text, piece by piece.
            let streamed = read_stream(client(&acme).stream_completion(request)).await;
            let choice = &answer.choices[0];
            assert_eq!(streamed.text, choice.text, "{:?} streamed", p.text);
            (
                choice.text.clone(),
                choice.finish_reason.clone(),
                answer.usage,
            )
        };
        let usage = usage.unwrap();
        assert_eq!(
            usage.prompt_tokens,
            p.input_ids.len() as i32,
            "{:?}: prompt tokens",
            p.text
        );
        assert_eq!(usage.completion_tokens, want_tokens, "{:?}", p.text);
        assert_eq!(finish, "length", "{:?}", p.text);
        assert_eq!(
            text, p.new_text,
            "{:?}: the greedy continuation differs from transformers'",
            p.text
        );
    }
    mesh.shutdown().await;
}

/// LoRA on an optimum export: the graph rewritten with slots, the adapter fed through them,
/// answers as the graph with the adapter merged into its weights; with a zero adapter it
/// answers exactly as the export.
#[test]
fn lora_slots_and_live_merge_agree_on_an_optimum_export() {
    use kiln_formats::{LoraLinear, LoraWeights};
    // hidden 64, k/v 32, ffn 128, 2 layers (config.json).
    let features = [
        ("q_proj", 64, 64),
        ("k_proj", 64, 32),
        ("v_proj", 64, 32),
        ("o_proj", 64, 64),
        ("gate_proj", 64, 128),
        ("up_proj", 64, 128),
        ("down_proj", 128, 64),
    ];
    let rank = 4;
    let mut state = 7u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
    };
    let adapter = |zero: bool, next: &mut dyn FnMut() -> f32| {
        let mut linears = std::collections::BTreeMap::new();
        for layer in 0..2 {
            for &(module, inputs, outputs) in &features {
                let a = (0..rank * inputs).map(|_| next()).collect();
                let b = (0..outputs * rank)
                    .map(|_| if zero { 0.0 } else { next() })
                    .collect();
                linears.insert(
                    (layer, module),
                    LoraLinear {
                        inputs,
                        outputs,
                        a,
                        b,
                    },
                );
            }
        }
        LoraWeights { rank, linears }
    };
    let (random, zero) = (adapter(false, &mut next), adapter(true, &mut next));
    let original = std::fs::read(export_dir().join("model.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let (slotted, linears) = kiln_formats::add_lora_slots(&original).unwrap();
    assert_eq!(linears.len(), 14);
    let slotted = write("slotted.onnx", slotted);
    let merged = kiln_formats::merge_lora(&original, &random)
        .unwrap()
        .unwrap();
    let merged = write("merged.onnx", merged);

    let prompt = &reference().prompts[0].input_ids;
    let n = prompt.len();
    let ids: Vec<i64> = prompt.iter().map(|&x| i64::from(x)).collect();
    let logits = |path: &std::path::Path, weights: Option<&LoraWeights>| {
        let mut session = load_session("onnxruntime", path, 1);
        if let Some(w) = weights {
            let resident = kiln_tests::lora::alone_in_slots(session.inputs(), w, 1);
            session.set_resident(resident).unwrap();
        }
        let (values, vocab) = decoder_logits(
            session.as_mut(),
            [1, n],
            ids.clone(),
            vec![1; n],
            (0..n as i64).collect(),
        );
        values[(n - 1) * vocab..].to_vec()
    };
    let base = logits(&export_dir().join("model.onnx"), None);
    let through_zero = logits(&slotted, Some(&zero));
    assert_eq!(
        through_zero.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        base.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let through_slots = logits(&slotted, Some(&random));
    let through_merge = logits(&merged, None);
    let gap = max_abs_diff(&through_slots, &through_merge);
    let change = max_abs_diff(&through_slots, &base);
    assert!(gap < 1e-4, "slots and merge differ by {gap}");
    assert!(
        change > 1e-2,
        "the adapter changes the logits by {change} only"
    );
}
