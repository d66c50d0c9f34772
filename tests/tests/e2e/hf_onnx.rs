//! An ONNX LLM exported by Hugging Face optimum (not by Kiln's preparer) loads and serves:
//! a tiny random Llama exported with its config, tokenizer and chat template files
//! (tests/data/llm/hf-optimum, made by make_fixture.py with transformers and optimum), checked
//! against transformers' own logits and greedy continuations of the same weights.

use futures::StreamExt;
use kiln_inference::backend::{Backends, LoadOptions};
use kiln_inference::tensor::{Tensor, TensorData};
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_proto::registry::v1 as regv1;
use kiln_tests::inference::{client, ort_library};
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
    let bytes = std::fs::read(format!("{FIXTURE}/reference.json")).expect("reference.json");
    serde_json::from_slice(&bytes).expect("the reference")
}

fn export_dir() -> std::path::PathBuf {
    std::path::Path::new(FIXTURE).join("tiny-llama")
}

/// The graph's logits at the prompt's last position, the prompt fed whole with an empty past.
fn last_logits(backend: &str, prompt: &[u32]) -> Vec<f32> {
    let backends = Backends::standard(Some(&ort_library()));
    let mut session = backends
        .get(backend)
        .unwrap()
        .load(
            &export_dir().join("model.onnx"),
            &LoadOptions {
                intra_op_threads: 1,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{backend} loads the optimum export: {e}"));
    let n = prompt.len();
    let t = |v: Vec<i64>| Tensor::new(vec![1, n], TensorData::I64(v)).unwrap();
    let mut inputs = vec![
        (
            "input_ids".to_owned(),
            t(prompt.iter().map(|&x| i64::from(x)).collect()),
        ),
        ("attention_mask".to_owned(), t(vec![1; n])),
        ("position_ids".to_owned(), t((0..n as i64).collect())),
    ];
    for info in session.inputs().to_vec() {
        if info.name.starts_with("past_key_values.") {
            let shape = vec![1, info.shape[1] as usize, 0, info.shape[3] as usize];
            inputs.push((
                info.name,
                Tensor::new(shape, TensorData::F32(vec![])).unwrap(),
            ));
        }
    }
    let at = session
        .outputs()
        .iter()
        .position(|o| o.name == "logits")
        .expect("a logits output");
    let outputs = session.run(inputs).unwrap();
    let logits = &outputs[at];
    let vocab = logits.shape[2];
    let TensorData::F32(values) = &logits.data else {
        panic!("float32 logits")
    };
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
            let worst = got
                .iter()
                .zip(&p.last_logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-3,
                "{backend}, {:?}: logits differ from transformers' by {worst}",
                p.text
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optimum_export_uploads_and_generates_like_transformers() {
    let reference = reference();
    let mesh = kiln_tests::TestMesh::start().await;
    let admin = mesh.admin().await;
    let acme = mesh
        .channel(Some(&kiln_tests::tenant(&admin, "acme").await))
        .await;

    // The export folder as optimum wrote it, every file, no manifest of Kiln's.
    let model = reg::create_model(
        &acme,
        "acme",
        "tiny-llama",
        regv1::model::Kind::BaseModel,
        None,
    )
    .await
    .unwrap();
    let mut files: Vec<_> = std::fs::read_dir(export_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        reg::upload_path(&acme, &model.name, name, path).await;
    }
    let validated = reg::validate(&acme, &model.name).await;
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
    let broken = reg::create_model(
        &acme,
        "acme",
        "broken-llama",
        regv1::model::Kind::BaseModel,
        None,
    )
    .await
    .unwrap();
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        if name == "config.json" {
            let bad: &[u8] = br#"{"max_position_embeddings": "long"}"#;
            reg::upload(&acme, &broken.name, &[(name, bad)])
                .await
                .unwrap();
        } else {
            reg::upload_path(&acme, &broken.name, name, path).await;
        }
    }
    let refused = reg::validate(&acme, &broken.name).await;
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
            let request = infv1::CreateChatCompletionRequest {
                model: model.name.clone(),
                messages: p
                    .messages
                    .iter()
                    .map(|m| infv1::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                        name: String::new(),
                    })
                    .collect(),
                max_tokens: Some(want_tokens),
                temperature: Some(0.0),
                ..Default::default()
            };
            let answer = client(&acme)
                .create_chat_completion(request)
                .await
                .unwrap()
                .into_inner();
            let choice = &answer.choices[0];
            (
                choice.message.as_ref().unwrap().content.clone(),
                choice.finish_reason.clone(),
                answer.usage.unwrap(),
            )
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
            let mut stream = client(&acme)
                .stream_completion(request)
                .await
                .unwrap()
                .into_inner();
            let mut streamed = String::new();
            while let Some(piece) = stream.next().await {
                for c in &piece.unwrap().choices {
                    streamed.push_str(&c.text);
                }
            }
            assert_eq!(streamed, answer.choices[0].text, "{:?} streamed", p.text);
            let choice = &answer.choices[0];
            (
                choice.text.clone(),
                choice.finish_reason.clone(),
                answer.usage.unwrap(),
            )
        };
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
