//! Embeddings on the real MiniLM, all in one run on the same backend (ONNX Runtime) and thread
//! count: `cargo bench -p kiln-tests --bench embeddings [-- SECONDS THREADS SAMPLES]`.
//!
//! - p50 latency of one 16-token embedding (SAMPLES calls per path, default 1,000), the paths
//!   taking turns in blocks: the backend called directly in this process (tokenize, forward,
//!   pool, on a session of its own), the engine (the mesh's own model and session, which
//!   every path after it runs on: two sessions of one model differ by a few percent, by where
//!   their weights landed), `CreateEmbeddings` called in process (the server's layers, auth,
//!   routing and the usage journal's write), the same through gRPC from a client task on the
//!   bench's runtime (plus loopback HTTP/2 and the client, sharing the server's workers), and
//!   from a client in a process of its own, as users' clients are (the bench's binary run
//!   again, [`ClientProcess`]); the overheads are medians over rounds of each round's p50
//!   over its direct p50 (and over its engine p50, the same session), so drift between
//!   rounds cancels, the in-runtime client's split into the serving path's (in process over
//!   direct) and the transport's; and an authenticated call that does nothing, in a tight
//!   loop and right after a direct pass (the transport's floor: every embeddings call meets
//!   parked workers and cold caches); the forward pass's own mean time in each served path's
//!   blocks (does the transport slow the pass, or add time around it?); the time on a core
//!   per call outside the model's threads in the client process's blocks (the server's
//!   async runtime over the engine's blocks, and the client process's own: what of the
//!   overhead is work, and whose); and the host's steal meanwhile;
//! - embeddings/s from 32 concurrent gRPC clients, one input per request, with dynamic
//!   batching on (32 rows) and off, and on with the threads as instances of one thread
//!   each; and from 32 tasks calling the engine in process, taking turns with the gRPC
//!   clients (batching on; tasks on the bench's runtime, then the client process) in
//!   one-second turns (2 x SECONDS of each), their ratios the medians of the turns' ratios,
//!   with the rows per pass of each (from the mesh's `kiln_model_batch_rows` metric) and
//!   where the cores went in each side's turns: the model's threads (its runner's and ONNX
//!   Runtime's), the async runtime's (server, clients, usage recording, billing), other
//!   processes (PostgreSQL, NATS, the client process), the host's steal and idle;
//! - the `onnxruntime` Python package on the same files and thread count, batches of 32
//!   (tests/python/ort_baseline.py).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::auth::Principal;
use kiln_inference::backend::LoadOptions;
use kiln_inference::config::{Batching, InferenceConfig};
use kiln_inference::embeddings;
use kiln_inference::engine::{LoadedModel, load_tokenizer};
use kiln_inference::tensor::TensorData;
use kiln_proto::kiln_inference::v1::CreateEmbeddingsRequest;
use kiln_proto::kiln_inference::v1::inference_service_client::InferenceServiceClient;
use kiln_tests::bench::{
    Args, ClientProcess, CpuTicks, ThreadsCpu, block_on, durations_line, measure, median, ms,
    percentile, serve_client_commands, timed_block,
};
use kiln_tests::inference::*;
use kiln_tests::python::Script;
use kiln_tests::{AuthedChannel, InProcess, TestMesh};

mod latency;
mod throughput;

use latency::latency_rounds;
use throughput::throughput_turns;

/// Calls per path in the latency comparison unless the arguments say otherwise.
const SAMPLES: usize = 1000;

/// Longer than a session's workers spin on after a pass (about 30 ms of a core here, 2
/// cores): the pause before another session's block, or the empty calls, so neither meets
/// the previous block's spinning threads.
const SETTLE: Duration = Duration::from_millis(60);

/// A mesh serving MiniLM with `batching`, and its bench account's key with a channel that
/// sends it.
async fn mesh(
    threads: usize,
    batching: Batching,
    assets: &std::path::Path,
) -> (TestMesh, String, kiln_tests::AuthedChannel) {
    let inference = InferenceConfig {
        backend: "onnxruntime".into(),
        intra_op_threads: threads,
        batching,
        ..Default::default()
    };
    let mesh = kiln_tests::library_mesh(assets, Some(inference)).await;
    let (key, ch) = mesh.tenant("bench").await;
    // The throughput turns send more than the default 6,000 requests a minute; the limiter
    // still admits each call.
    let admin = mesh.admin().await;
    kiln_tests::billing::set_quota(&admin, "bench", "serverless-inference-rpm", 1_000_000)
        .await
        .expect("raise the bench account's request quota");
    let warm_up = ["warm up".to_owned()];
    first_embeddings(&ch, MINILM, &warm_up, Duration::from_secs(120)).await;
    (mesh, key, ch)
}

fn main() {
    // In the client process: the sentence is read once, not for each command.
    let mut sentence = None;
    if serve_client_commands(|ch, command| {
        let texts = vec![sentence.get_or_insert_with(sixteen_token_sentence).clone()];
        client_command(ch, texts, command)
    }) {
        return;
    }
    let args = Args::from_env();
    let (seconds, threads): (u64, usize) = (args.get(0, 5), args.get(1, 2));
    let samples_per_path: usize = args.get(2, SAMPLES);
    block_on(None, async move {
        let sentence = sixteen_token_sentence();

        // The backend alone: tokenize, forward, mean-pool, normalise.
        // Its workers spin on after a pass, as the engine's embedding models' do.
        let options = LoadOptions {
            intra_op_threads: threads,
            spin_after_pass: true,
            ..Default::default()
        };
        let graph = minilm_dir().join("model.onnx");
        let mut session = load_session_with("onnxruntime", &graph, &options);
        let tokenizer = load_tokenizer(&minilm_dir().join("tokenizer.json")).unwrap();
        let mut direct = || {
            let encoding = tokenizer.encode(sentence.as_str(), true).unwrap();
            let n = encoding.get_ids().len();
            let out = session.run(minilm_inputs(encoding.get_ids())).unwrap();
            let TensorData::F32(h) = &out[0].data else {
                unreachable!()
            };
            let mut v = vec![0f32; 384];
            for row in h.chunks_exact(384) {
                v.iter_mut().zip(row).for_each(|(a, b)| *a += b / n as f32);
            }
            embeddings::normalize(&mut v);
            std::hint::black_box(v);
        };

        let texts = vec![sentence.clone()];
        let assets = minilm_asset_dir();
        let (batched_mesh, key, ch) = mesh(threads, Batching::default(), assets.path()).await;
        // The engine in process: the mesh's own model, the session its calls run on (two
        // sessions of one model differ by a few percent, by where their weights landed), so
        // the served paths over it are their cost alone.
        let engine = batched_mesh.mesh.as_ref().unwrap().engine.clone().unwrap();
        let model = engine
            .model(&Principal::service(), "model", MINILM)
            .await
            .unwrap();
        let served_passes = model.runner().unwrap().stats().get().0;
        assert!(
            served_passes > 0,
            "the mesh's calls ran on another copy of the model"
        );
        let mut served = Served {
            mesh: &batched_mesh,
            model,
            texts: texts.clone(),
            in_process: InferenceServiceClient::new(batched_mesh.in_process(&key)),
            ch,
            client_process: ClientProcess::spawn(&batched_mesh.url(), &key),
        };
        let latency = latency_rounds(&mut served, &mut direct, samples_per_path).await;
        let throughput = throughput_turns(&mut served, seconds).await;
        drop(served);
        drop(engine);
        batched_mesh.shutdown().await;

        let calls = |ch: AuthedChannel| closed_loop_call(ch, texts.clone());
        let (unbatched_mesh, _, ch) = mesh(
            threads,
            Batching {
                max_batch_size: 1,
                max_queue_delay: Duration::ZERO,
                instances: 1,
            },
            assets.path(),
        )
        .await;
        let unbatched = measure(seconds, 32, calls(ch)).await;
        unbatched_mesh.shutdown().await;

        // The same threads as copies of the model, one thread each, passes side by side.
        let (instances_mesh, _, ch) = mesh(
            1,
            Batching {
                instances: threads,
                ..Batching::default()
            },
            assets.path(),
        )
        .await;
        let instances = measure(seconds, 32, calls(ch)).await;
        instances_mesh.shutdown().await;

        let python = Script::new("ort_baseline.py")
            .arg("--model-dir", minilm_dir().display())
            .arg("--threads", threads)
            .arg("--seconds", seconds)
            .arg("--clients", 32)
            .arg("--batch", 32)
            .run()
            .unwrap_or_else(|e| panic!("{e}"));
        let python_rate = python["embeddings_per_s"].as_f64().unwrap();
        let python_p50 = python["p50_ms_single"].as_f64().unwrap();

        println!(
            "MiniLM-L6 (int8) embeddings, ONNX Runtime, {threads} intra-op threads, {seconds} s per throughput run"
        );
        latency.print(python_p50);
        throughput.print();
        println!("  gRPC, batching off           {unbatched:>8.0}");
        println!("  gRPC, batching on, {threads} instances of 1 thread {instances:>8.0}");
        println!("  python onnxruntime, batch 32 {python_rate:>8.0}");
        println!(
            "  batched / python: {:.2}, with instances {:.2} (aim > 1); batched / unbatched: {:.2}",
            throughput.grpc / python_rate,
            instances / python_rate,
            throughput.grpc / unbatched
        );
    });
}

/// The mesh serving MiniLM with batching on, and what calls it: its own model (the engine
/// path), the service in process, a gRPC channel from this process and a client process.
struct Served<'a> {
    mesh: &'a TestMesh,
    model: Arc<LoadedModel>,
    texts: Vec<String>,
    /// The same service in process: every layer of the gRPC call but the transport.
    in_process: InferenceServiceClient<InProcess>,
    ch: AuthedChannel,
    /// A client in a process of its own, as users' clients are.
    client_process: ClientProcess,
}

/// The engine's call: tokenize `texts`, embed them on `model` (no transport or platform).
async fn engine_call(model: &LoadedModel, texts: &[String]) {
    let ids = embeddings::tokenize(model, texts, false).unwrap();
    std::hint::black_box(embeddings::embed(model, ids).await.unwrap());
}

/// `total` plus what a histogram's (sum, count) grew by from `earlier` to `later`.
fn add_difference(total: (f64, f64), later: (f64, f64), earlier: (f64, f64)) -> (f64, f64) {
    (total.0 + later.0 - earlier.0, total.1 + later.1 - earlier.1)
}

/// The first reference sentence of sixteen tokens.
fn sixteen_token_sentence() -> String {
    let reference = reference();
    let (i, ids) = reference.sixteen_tokens();
    assert_eq!(ids.len(), 16);
    reference.sentences[i].clone()
}

/// A closed-loop client's call: CreateEmbeddings of `texts` on `ch` (the same code on the
/// bench's runtime and in the client process).
fn closed_loop_call(
    ch: AuthedChannel,
    texts: Vec<String>,
) -> impl Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync + 'static {
    move || {
        let (ch, texts) = (ch.clone(), texts.clone());
        Box::pin(async move {
            embed(&ch, MINILM, &texts).await.unwrap();
        })
    }
}

/// The client process's commands: `embed WARM COUNT` times CreateEmbeddings of `texts`
/// (the sixteen-token sentence), COUNT calls after WARM, one after another, and answers their
/// durations; `rate SECONDS CLIENTS` answers embeddings per second from CLIENTS closed-loop
/// tasks; `cpu` answers the process's time on a core so far (ns); `ping` answers at once.
async fn client_command(ch: AuthedChannel, texts: Vec<String>, command: String) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    let number = |i: usize| -> usize {
        let word = words.get(i).and_then(|w| w.parse().ok());
        word.unwrap_or_else(|| panic!("argument {i} of {command:?}"))
    };
    match words.first() {
        Some(&"embed") => {
            let mut samples = Vec::new();
            let call = closed_loop_call(ch, texts);
            timed_block(&mut samples, number(1), number(2), &call).await;
            durations_line(&samples)
        }
        Some(&"ping") => "pong".to_owned(),
        Some(&"cpu") => ThreadsCpu::process().total().as_nanos().to_string(),
        Some(&"rate") => {
            let rate = measure(number(1) as u64, number(2), closed_loop_call(ch, texts)).await;
            rate.to_string()
        }
        _ => panic!("unknown command {command:?}"),
    }
}
