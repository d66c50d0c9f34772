//! Entry points for the fuzz targets (tests/fuzz): the parts of serving that read what a
//! caller or an uploaded model controls, reached without a loaded model.

use kiln_proto::inference::ModelInferRequest;
use kiln_proto::kiln_inference::v1::ChatMessage;
use prost::Message;

use crate::backend::TensorInfo;
use crate::tensor::DataType;

/// Decodes `bytes` as an Open Inference Protocol request and its tensors against a model
/// with MiniLM's inputs (int64 [-1, -1] each) and a fixed-shape float one.
pub fn oip_request(bytes: &[u8]) {
    let Ok(request) = ModelInferRequest::decode(bytes) else {
        return;
    };
    let ids = |name: &str| TensorInfo {
        name: name.to_owned(),
        dtype: DataType::I64,
        shape: vec![-1, -1],
    };
    let declared = [
        ids("input_ids"),
        ids("attention_mask"),
        TensorInfo {
            name: "pixels".to_owned(),
            dtype: DataType::F32,
            shape: vec![1, 3, -1],
        },
    ];
    let _ = crate::oip::decode_tensors(&declared, "fuzz", &request);
}

/// Renders a chat with the template before the first NUL of `bytes`, the text after it as
/// the messages (one per line, `role: content`; other roles are taken as `user`).
pub fn chat_template(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let (template, rest) = text.split_once('\0').unwrap_or((&text, "user: hi"));
    let messages: Vec<ChatMessage> = rest
        .lines()
        .map(|line| {
            let (role, content) = line.split_once(": ").unwrap_or(("user", line));
            // Roles are checked before the template runs: keep them valid so it runs.
            let role = match role {
                "system" | "assistant" => role,
                _ => "user",
            };
            ChatMessage {
                role: role.to_owned(),
                content: content.to_owned(),
                name: String::new(),
            }
        })
        .collect();
    let _ = crate::chat::render(template, &messages, "<s>", "</s>", true);
}
