//! `kiln chat` (streams the model's answer in the terminal; a conversation when no message is
//! given) and `kiln embed`.

use std::io::{BufRead, Write};

use clap::Args;
use futures::StreamExt;
use kiln_proto::kiln_inference::v1 as infv1;

use crate::client::{Authed, Client, Format, print_list, printable};

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The model: accounts/{a}/models/{m}, or a model ID in the current account (use
    /// accounts/kiln/models/smollm2-135m-instruct for the public chat model).
    pub model: String,
    /// The message; without one, a conversation reads lines from the terminal.
    pub message: Option<String>,
    /// A system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: i32,
    /// 0 is greedy (default 1: sampled).
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub seed: Option<i64>,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// The embedding model (e.g. accounts/kiln/models/all-minilm-l6-v2).
    pub model: String,
    /// The texts to embed.
    #[arg(required = true)]
    pub input: Vec<String>,
    /// Cut inputs longer than the model's limit instead of failing.
    #[arg(long)]
    pub truncate: bool,
}

fn inference(client: &Client) -> infv1::inference_service_client::InferenceServiceClient<Authed> {
    infv1::inference_service_client::InferenceServiceClient::new(client.authed())
        .max_decoding_message_size(64 << 20)
}

// One row per input: its size and first values (`-o json` prints every value).
printable!(infv1::Embedding, "kiln.inference.v1.Embedding" {
    "INDEX" => |e| e.index.to_string(),
    "DIMENSIONS" => |e| e.embedding.len().to_string(),
    "FIRST VALUES" => first_values,
});

/// The first four values of an embedding, then `...`.
fn first_values(e: &infv1::Embedding) -> String {
    let head: Vec<String> = e
        .embedding
        .iter()
        .take(4)
        .map(|v| format!("{v:.4}"))
        .collect();
    format!("{} ...", head.join(" "))
}

/// Streams one answer to stdout; returns its text.
async fn answer(
    client: &Client,
    args: &ChatArgs,
    model: &str,
    messages: &[infv1::ChatMessage],
) -> anyhow::Result<String> {
    let request = infv1::CreateChatCompletionRequest {
        model: model.to_owned(),
        messages: messages.to_vec(),
        max_tokens: Some(args.max_tokens),
        temperature: args.temperature,
        seed: args.seed,
        ..Default::default()
    };
    let mut stream = inference(client)
        .stream_chat_completion(request)
        .await?
        .into_inner();
    let mut text = String::new();
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        for choice in chunk?.choices {
            if let Some(delta) = choice.delta {
                text.push_str(&delta.content);
                if out
                    .write_all(delta.content.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    return Ok(text);
                }
            }
        }
    }
    let _ = writeln!(out);
    Ok(text)
}

pub(crate) async fn chat(client: &Client, args: ChatArgs) -> anyhow::Result<()> {
    let model = client.full_name("models", &args.model).await?;
    let message = |role: &str, content: String| infv1::ChatMessage {
        role: role.into(),
        content,
        name: String::new(),
    };
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(message("system", system.clone()));
    }
    if let Some(text) = &args.message {
        messages.push(message("user", text.clone()));
        answer(client, &args, &model, &messages).await?;
        return Ok(());
    }
    eprintln!("Chatting with {model}; an empty line or Ctrl-D ends.");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(message("user", line.trim_end().to_owned()));
        let reply = answer(client, &args, &model, &messages).await?;
        messages.push(message("assistant", reply));
    }
}

pub(crate) async fn embed(client: &Client, format: Format, args: EmbedArgs) -> anyhow::Result<()> {
    let response = inference(client)
        .create_embeddings(infv1::CreateEmbeddingsRequest {
            model: client.full_name("models", &args.model).await?,
            input: args.input,
            truncate: args.truncate,
            ..Default::default()
        })
        .await?
        .into_inner();
    print_list(format, &response.data);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Printable, to_json};

    #[test]
    fn embeddings_print_their_head() {
        let e = infv1::Embedding {
            index: 1,
            embedding: vec![0.5, -0.25, 1.0, 2.0, 3.0],
            ..Default::default()
        };
        assert_eq!(e.row(), ["1", "5", "0.5000 -0.2500 1.0000 2.0000 ..."]);
        assert_eq!(to_json(infv1::Embedding::PROTO_NAME, &e)["index"], 1);
    }
}
