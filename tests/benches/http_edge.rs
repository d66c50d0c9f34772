//! The HTTP edge against the gRPC path it transcodes to, in one run on one mesh:
//! `cargo bench -p kiln-tests --bench http_edge [-- SECONDS]`.
//!
//! - p50 and p99 latency of a small chat completion (SmolLM2, greedy, 4 tokens) and of one
//!   16-token embedding (MiniLM), the two paths taking turns in blocks: `CreateChatCompletion`
//!   / `CreateEmbeddings` over gRPC, and `POST /inference/v1/chat/completions` /
//!   `/inference/v1/embeddings` over HTTP/1.1 with keep-alive (the edge parses the JSON,
//!   calls the same RPC over loopback gRPC and writes the OpenAI-style JSON back);
//! - requests/s of each from concurrent clients (16 for embeddings, 4 for chat), the paths
//!   taking turns over three rounds, the median round reported.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kiln_tests::bench::{Args, block_on, cores, measure, median, ms, percentile, timed_block};
use kiln_tests::inference::{MINILM, embed, first_embeddings, reference};
use kiln_tests::llm::{SMOLLM2, chat, first_chat};

/// Calls per path in the latency comparison.
const SAMPLES: usize = 400;
/// Throughput runs per path.
const ROUNDS: usize = 3;

#[derive(Clone)]
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    key: String,
}

impl Http {
    /// POSTs `body` to `path`; the answer's bytes (a status other than 200 panics).
    async fn post(&self, path: &str, body: &serde_json::Value) -> Bytes {
        let request = http::Request::post(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        bytes
    }
}

fn main() {
    let args = Args::from_env();
    let seconds: u64 = args.get(0, 5);
    block_on(None, async move {
        let assets = kiln_tests::asset_dir_with(&["smollm2-135m-instruct", "all-minilm-l6-v2"]);
        // Thousands of requests a minute: no rate limit in the way.
        let mut billing = kiln_billing::config::BillingConfig::default();
        billing.quotas.serverless_inference_rpm = 1 << 40;
        billing.quotas.serverless_inference_tpm = 1 << 40;
        let options = kiln_tests::MeshOptions {
            billing: Some(billing),
            ..Default::default()
        };
        let mesh = kiln_tests::library_mesh_with(assets.path(), options).await;
        let (key, ch) = mesh.tenant("bench").await;
        first_chat(&ch, "Hi", 1, Duration::from_secs(300)).await;
        first_embeddings(&ch, MINILM, &["x".to_owned()], Duration::from_secs(120)).await;
        let http = Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("{}/inference/v1", mesh.http_url()),
            key,
        };
        let reference = reference();
        let (i, _) = reference.sixteen_tokens();
        let sentence = reference.sentences[i].clone();
        let texts = vec![sentence.clone()];
        let question = "What is the capital of France?";
        let chat_body = serde_json::json!({
            "model": SMOLLM2, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": question}],
        });
        let embed_body =
            serde_json::json!({"model": MINILM, "input": sentence, "encoding_format": "float"});

        const BLOCK: usize = 20;
        const WARM: usize = 3;
        let mut samples: [Vec<Duration>; 4] = Default::default();
        let [chat_grpc, chat_http, embed_grpc, embed_http] = &mut samples;
        for _round in 0..SAMPLES / BLOCK {
            timed_block(embed_grpc, WARM, BLOCK, || async {
                embed(&ch, MINILM, &texts).await.unwrap();
            })
            .await;
            timed_block(embed_http, WARM, BLOCK, || async {
                http.post("/embeddings", &embed_body).await;
            })
            .await;
        }
        for _round in 0..SAMPLES / BLOCK / 4 {
            timed_block(chat_grpc, WARM, BLOCK, || async {
                chat(&ch, question, 4).await.unwrap();
            })
            .await;
            timed_block(chat_http, WARM, BLOCK, || async {
                http.post("/chat/completions", &chat_body).await;
            })
            .await;
        }
        let quantiles = |s: &mut Vec<Duration>| (ms(percentile(s, 0.5)), ms(percentile(s, 0.99)));
        let [chat_grpc, chat_http, embed_grpc, embed_http] = samples.map(|mut s| quantiles(&mut s));

        let throughput = |concurrency: usize, over_http: bool, chat_call: bool| {
            let (ch, http, texts) = (ch.clone(), http.clone(), texts.clone());
            let (chat_body, embed_body) = (chat_body.clone(), embed_body.clone());
            measure(seconds, concurrency, move || {
                let (ch, http, texts) = (ch.clone(), http.clone(), texts.clone());
                let (chat_body, embed_body) = (chat_body.clone(), embed_body.clone());
                async move {
                    match (over_http, chat_call) {
                        (false, false) => drop(embed(&ch, MINILM, &texts).await.unwrap()),
                        (true, false) => drop(http.post("/embeddings", &embed_body).await),
                        (false, true) => drop(chat(&ch, question, 4).await.unwrap()),
                        (true, true) => drop(http.post("/chat/completions", &chat_body).await),
                    }
                }
            })
        };
        // The paths take turns, three rounds each; the median round counts (a 2-core machine
        // drifts from run to run more than the edge costs).
        let mut rounds: [Vec<f64>; 4] = Default::default();
        for _ in 0..ROUNDS {
            rounds[0].push(throughput(16, false, false).await);
            rounds[1].push(throughput(16, true, false).await);
            rounds[2].push(throughput(4, false, true).await);
            rounds[3].push(throughput(4, true, true).await);
        }
        let [embed_grpc_rps, embed_http_rps, chat_grpc_rps, chat_http_rps] =
            rounds.map(|mut r| median(&mut r));

        println!(
            "HTTP edge against gRPC, {} cores, {seconds} s per throughput run",
            cores()
        );
        println!("| call | path | p50 ms | p99 ms | requests/s |");
        println!("|---|---|---|---|---|");
        for (call, path, (p50, p99), rps) in [
            ("chat, 4 tokens", "gRPC", chat_grpc, chat_grpc_rps),
            ("chat, 4 tokens", "HTTP", chat_http, chat_http_rps),
            ("embedding, 16 tokens", "gRPC", embed_grpc, embed_grpc_rps),
            ("embedding, 16 tokens", "HTTP", embed_http, embed_http_rps),
        ] {
            println!("| {call} | {path} | {p50:.2} | {p99:.2} | {rps:.1} |");
        }
        println!(
            "edge cost: chat p50 {:+.1}%, p99 {:+.1}%, throughput {:.3}x; embedding p50 {:+.1}%, p99 {:+.1}%, throughput {:.3}x",
            (chat_http.0 / chat_grpc.0 - 1.0) * 100.0,
            (chat_http.1 / chat_grpc.1 - 1.0) * 100.0,
            chat_http_rps / chat_grpc_rps,
            (embed_http.0 / embed_grpc.0 - 1.0) * 100.0,
            (embed_http.1 / embed_grpc.1 - 1.0) * 100.0,
            embed_http_rps / embed_grpc_rps,
        );
        mesh.shutdown().await;
    });
}
