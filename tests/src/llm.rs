//! The chat model: its reference data, a prepared bundle of it, requests and a decoder run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use kiln_inference::backend::Session;
use kiln_inference::tensor::{Tensor, TensorData};
use kiln_proto::kiln_inference::v1 as infv1;

use crate::inference::client;
use crate::{AuthedChannel, asset, wait_for};

pub const SMOLLM2: &str = "accounts/kiln/models/smollm2-135m-instruct";
pub const GGUF: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `tests/data/llm/reference.json`: llama.cpp (llama-cpp-python) on the same GGUF, made by
/// `make_reference.py` beside it.
#[derive(Debug, serde::Deserialize)]
pub struct Reference {
    /// Prompts with llama.cpp's greedy next token after each of their positions.
    pub prompts: Vec<Prompt>,
    /// Texts as llama.cpp's tokenizer splits them.
    pub tokenization: Vec<Tokenized>,
    /// Greedy chat answers through the model's own template.
    pub chat: Vec<Chat>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Tokenized {
    pub text: String,
    pub tokens: Vec<u32>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Prompt {
    #[serde(flatten)]
    pub tokenized: Tokenized,
    /// The argmax of the logits at each position of `tokens`.
    pub argmax_next: Vec<u32>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Chat {
    pub question: String,
    pub prompt_tokens: Vec<u32>,
    pub answer_tokens: Vec<u32>,
    pub answer: String,
}

pub fn reference() -> Reference {
    crate::data_json("llm/reference.json")
}

/// A greedy chat request of one user message to SmolLM2.
pub fn chat_request(question: &str, max_tokens: i32) -> infv1::CreateChatCompletionRequest {
    infv1::CreateChatCompletionRequest {
        model: SMOLLM2.into(),
        messages: vec![infv1::ChatMessage {
            role: "user".into(),
            content: question.into(),
            name: String::new(),
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

pub async fn send_chat(
    ch: &AuthedChannel,
    request: infv1::CreateChatCompletionRequest,
) -> Result<infv1::ChatCompletion, tonic::Status> {
    Ok(client(ch)
        .create_chat_completion(request)
        .await?
        .into_inner())
}

/// SmolLM2's greedy answer to `question`.
pub async fn chat(
    ch: &AuthedChannel,
    question: &str,
    max_tokens: i32,
) -> Result<infv1::ChatCompletion, tonic::Status> {
    send_chat(ch, chat_request(question, max_tokens)).await
}

/// The greedy answer of `model` (a model, deployed model or `model#deployment`) to
/// `question`, as text.
pub async fn answer_of(
    ch: &AuthedChannel,
    model: &str,
    question: &str,
    max_tokens: i32,
) -> Result<String, tonic::Status> {
    let request = infv1::CreateChatCompletionRequest {
        model: model.to_owned(),
        ..chat_request(question, max_tokens)
    };
    Ok(answer_text(&send_chat(ch, request).await?).to_owned())
}

/// The text of an answer's first choice.
pub fn answer_text(answer: &infv1::ChatCompletion) -> &str {
    let message = answer.choices[0].message.as_ref();
    &message.expect("a message").content
}

/// What a stream of answers said: its new pieces joined, the finish reason, the usage (on the last
/// chunk) and how many chunks came.
pub struct Streamed {
    pub text: String,
    pub finish: String,
    pub usage: infv1::Usage,
    pub chunks: usize,
}

/// A piece of a stream of answers: a chat chunk or a completion piece.
pub trait Piece {
    /// Each choice's new text and its finish reason (empty until its last piece).
    fn parts(&self) -> Vec<(&str, &str)>;
    fn usage(&self) -> Option<&infv1::Usage>;
}

impl Piece for infv1::ChatCompletionChunk {
    fn parts(&self) -> Vec<(&str, &str)> {
        let parts = self.choices.iter().map(|c| {
            let delta = c.delta.as_ref().expect("a delta");
            (delta.content.as_str(), c.finish_reason.as_str())
        });
        parts.collect()
    }

    fn usage(&self) -> Option<&infv1::Usage> {
        self.usage.as_ref()
    }
}

impl Piece for infv1::Completion {
    fn parts(&self) -> Vec<(&str, &str)> {
        let parts = self
            .choices
            .iter()
            .map(|c| (c.text.as_str(), c.finish_reason.as_str()));
        parts.collect()
    }

    fn usage(&self) -> Option<&infv1::Usage> {
        self.usage.as_ref()
    }
}

/// Reads a stream of answers to its end: `started` is the call that starts it
/// (`client(&ch).stream_completion(request)`).
pub async fn read_stream<P: Piece>(
    started: impl std::future::Future<
        Output = Result<tonic::Response<tonic::Streaming<P>>, tonic::Status>,
    >,
) -> Streamed {
    let mut stream = started.await.expect("the stream starts").into_inner();
    let (mut text, mut finish, mut usage, mut chunks) = (String::new(), String::new(), None, 0);
    while let Some(piece) = stream.next().await {
        let piece = piece.expect("a piece of the stream");
        chunks += 1;
        for (new, finished) in piece.parts() {
            text.push_str(new);
            if !finished.is_empty() {
                finish = finished.to_owned();
            }
        }
        usage = piece.usage().cloned().or(usage);
    }
    let usage = usage.expect("the last piece carries usage");
    Streamed {
        text,
        finish,
        usage,
        chunks,
    }
}

/// Sends a chat request as a stream and reads it to the end.
pub async fn stream_chat(
    ch: &AuthedChannel,
    request: infv1::CreateChatCompletionRequest,
) -> Streamed {
    read_stream(client(ch).stream_chat_completion(request)).await
}

/// SmolLM2's first answer to `question`, waited for up to `timeout` (the library prepares
/// and serves it in the background).
pub async fn first_chat(
    ch: &AuthedChannel,
    question: &str,
    max_tokens: i32,
    timeout: Duration,
) -> infv1::ChatCompletion {
    let what = "SmolLM2 to be prepared and served";
    wait_for(timeout, what, || async {
        chat(ch, question, max_tokens).await.ok()
    })
    .await
}

/// Runs a decoder-with-past graph (Kiln's prepared bundle, or an optimum export) on whole
/// prompts with an empty past. `ids`, `mask` and `positions` are `[batch, width]`, row by
/// row; returns the logits, `[batch, width, vocab]` row by row, and `vocab`.
pub fn decoder_logits(
    session: &mut dyn Session,
    [batch, width]: [usize; 2],
    ids: Vec<i64>,
    mask: Vec<i64>,
    positions: Vec<i64>,
) -> (Vec<f32>, usize) {
    let t = |v: Vec<i64>| Tensor::new(vec![batch, width], TensorData::I64(v)).unwrap();
    let mut inputs = vec![
        ("input_ids".to_owned(), t(ids)),
        ("attention_mask".to_owned(), t(mask)),
        ("position_ids".to_owned(), t(positions)),
    ];
    // Graphs that derive positions from the mask (GroupQueryAttention) take none.
    inputs.retain(|(name, _)| session.inputs().iter().any(|t| &t.name == name));
    for info in session.inputs().to_vec() {
        if info.name.starts_with("past_key_values.") {
            let shape = vec![batch, info.shape[1] as usize, 0, info.shape[3] as usize];
            let empty = Tensor::new(shape, TensorData::F32(vec![])).unwrap();
            inputs.push((info.name, empty));
        }
    }
    let at = session.outputs().iter().position(|o| o.name == "logits");
    let at = at.expect("a logits output");
    let mut outputs = session.run(inputs).unwrap();
    let logits = outputs.swap_remove(at);
    let vocab = logits.shape[2];
    let TensorData::F32(values) = logits.data else {
        panic!("float32 logits")
    };
    (values, vocab)
}

/// The GGUF prepared into an ONNX bundle: float32 weights, or (`blocks`) the checkpoint's
/// 4- and 8-bit blocks for MatMulNBits. Kept beside the asset cache, keyed by the
/// preparer's version, so test processes and runs share one conversion (written to a
/// private folder, then renamed into place).
pub fn bundle(blocks: bool) -> &'static Path {
    static DIRS: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    DIRS[usize::from(blocks)].get_or_init(|| {
        let gguf = asset(GGUF);
        let variant = if blocks { "int4" } else { "fp32" };
        let dir = gguf.parent().unwrap().join(format!(
            "prepared-{variant}-{}",
            kiln_formats::GGUF_ONNX_VERSION
        ));
        if dir.join("manifest.json").is_file() {
            return dir;
        }
        // Bundles of earlier preparer versions go.
        for entry in std::fs::read_dir(gguf.parent().unwrap()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("prepared-{variant}-")) && entry.path() != dir {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let bytes = std::fs::read(&gguf).expect("the GGUF");
        let converted = kiln_formats::convert_gguf(&bytes, blocks).expect("converts");
        let staging = dir.with_extension(format!("partial-{}", std::process::id()));
        std::fs::create_dir_all(&staging).unwrap();
        // manifest.json last: its presence marks a complete bundle.
        let mut files = converted.files;
        files.sort_by_key(|(path, _)| *path == "manifest.json");
        for (path, data) in files {
            std::fs::write(staging.join(path), data).unwrap();
        }
        if std::fs::rename(&staging, &dir).is_err() {
            // Another process finished first.
            let _ = std::fs::remove_dir_all(&staging);
        }
        dir
    })
}

/// A folder that holds only the chat model and ONNX Runtime of the asset cache.
pub fn smollm2_asset_dir() -> tempfile::TempDir {
    super::asset_dir_with(&["smollm2-135m-instruct"])
}

/// Streams a greedy chat answer to `question` of up to `max_tokens` and reads it to the end:
/// (time to its first content, completion tokens). For the benchmarks.
pub async fn timed_stream(ch: AuthedChannel, question: &str, max_tokens: i32) -> (Duration, usize) {
    let start = std::time::Instant::now();
    let mut s = client(&ch)
        .stream_chat_completion(chat_request(question, max_tokens))
        .await
        .unwrap()
        .into_inner();
    let mut first = None;
    let mut tokens = 0;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        if first.is_none()
            && chunk
                .choices
                .iter()
                .any(|c| c.delta.as_ref().is_some_and(|d| !d.content.is_empty()))
        {
            first = Some(start.elapsed());
        }
        if let Some(u) = chunk.usage {
            tokens = u.completion_tokens as usize;
        }
    }
    (first.unwrap_or_default(), tokens)
}
