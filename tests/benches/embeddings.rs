//! Embeddings on the real MiniLM, all in one run on the same backend (ONNX Runtime) and thread
//! count: `cargo bench -p kiln-tests --bench embeddings [-- SECONDS THREADS]`.
//!
//! - p50 latency of one 16-token embedding, the paths taking turns in blocks: the backend
//!   called directly in this process (tokenize, forward, pool), the engine (plus its batcher
//!   thread), and `CreateEmbeddings` through gRPC (plus loopback HTTP/2, auth and the usage
//!   event's outbox commit);
//! - embeddings/s from 32 concurrent gRPC clients, one input per request, with dynamic
//!   batching on (32 rows) and off, and on with the threads as instances of one thread
//!   each; and from 32 tasks calling the engine in process;
//! - the `onnxruntime` Python package on the same files and thread count, batches of 32
//!   (tests/python/ort_baseline.py).

use std::time::{Duration, Instant};

use kiln_core::auth::Principal;
use kiln_inference::config::{Batching, InferenceConfig};
use kiln_inference::embeddings;
use kiln_inference::engine::load_tokenizer;
use kiln_inference::tensor::{Tensor, TensorData};
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_tests::bench::measure;
use kiln_tests::inference::*;
use kiln_tests::{TestMesh, wait_for};

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Calls per path in the latency comparison.
const SAMPLES: usize = 600;

async fn mesh(
    threads: usize,
    batching: Batching,
    assets: &std::path::Path,
) -> (TestMesh, kiln_tests::AuthedChannel) {
    let mesh = kiln_tests::library_mesh(
        assets,
        Some(InferenceConfig {
            backend: "onnxruntime".into(),
            intra_op_threads: threads,
            batching,
            ..Default::default()
        }),
    )
    .await;
    let admin = mesh.admin().await;
    let key = kiln_tests::tenant(&admin, "bench").await;
    let ch = mesh.channel(Some(&key)).await;
    wait_for(
        Duration::from_secs(120),
        "the public MiniLM to answer",
        || {
            let ch = ch.clone();
            async move { client(&ch).create_embeddings(request("warm up")).await.ok() }
        },
    )
    .await;
    (mesh, ch)
}

fn request(text: &str) -> infv1::CreateEmbeddingsRequest {
    infv1::CreateEmbeddingsRequest {
        model: MINILM.into(),
        input: vec![text.to_owned()],
        ..Default::default()
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let reference = reference();
        let (sentence, ids) = reference
            .sentences
            .iter()
            .zip(&reference.token_ids)
            .find(|(_, ids)| ids.len() == 16)
            .expect("a 16-token sentence");
        let sentence = sentence.clone();
        assert_eq!(ids.len(), 16);

        // The backend alone: tokenize, forward, mean-pool, normalise.
        let backends = kiln_inference::backend::Backends::standard(Some(&ort_library()));
        let mut session = backends
            .get("onnxruntime")
            .unwrap()
            .load(
                &minilm_dir().join("model.onnx"),
                &kiln_inference::backend::LoadOptions {
                    intra_op_threads: threads,
                    ..Default::default()
                },
            )
            .unwrap();
        let tokenizer = load_tokenizer(&minilm_dir().join("tokenizer.json")).unwrap();
        let mut direct = || {
            let encoding = tokenizer.encode(sentence.as_str(), true).unwrap();
            let n = encoding.get_ids().len();
            let t = |v: Vec<i64>| Tensor::new(vec![1, n], TensorData::I64(v)).unwrap();
            let out = session
                .run(vec![
                    ("input_ids".into(), t(encoding.get_ids().iter().map(|&x| i64::from(x)).collect())),
                    ("attention_mask".into(), t(vec![1; n])),
                    ("token_type_ids".into(), t(vec![0; n])),
                ])
                .unwrap();
            let TensorData::F32(h) = &out[0].data else { unreachable!() };
            let mut v = vec![0f32; 384];
            for row in h.chunks_exact(384) {
                v.iter_mut().zip(row).for_each(|(a, b)| *a += b / n as f32);
            }
            embeddings::normalize(&mut v);
            std::hint::black_box(v);
        };

        // The engine in process: the same plus the batcher's thread hop.
        let cache = tempfile::tempdir().unwrap();
        let engine = local_engine("onnxruntime", Batching::default(), threads, cache.path());
        let model = engine.model(&Principal::service(), "model", LOCAL_MINILM).await.unwrap();
        let texts = vec![sentence.clone()];

        let assets = minilm_asset_dir();
        let (batched_mesh, ch) = mesh(threads, Batching::default(), assets.path()).await;

        // The paths take turns in short blocks of calls, many rounds, so drift on a shared
        // machine hits all alike; each block's first calls are not counted (call-by-call
        // interleaving would measure each session's thread pool still spinning from the
        // previous call). Plus an authenticated call that does nothing (the transport and
        // the server's layers).
        const BLOCK: usize = 20;
        const WARM: usize = 5;
        let mut samples: [Vec<Duration>; 4] = Default::default();
        for _round in 0..SAMPLES / BLOCK {
            for i in 0..BLOCK + WARM {
                let t = Instant::now();
                direct();
                if i >= WARM {
                    samples[0].push(t.elapsed());
                }
            }
            for i in 0..BLOCK + WARM {
                let t = Instant::now();
                let ids = embeddings::tokenize(&model, &texts, false).unwrap();
                std::hint::black_box(embeddings::embed(&model, ids).await.unwrap());
                if i >= WARM {
                    samples[1].push(t.elapsed());
                }
            }
            for i in 0..BLOCK + WARM {
                let t = Instant::now();
                client(&ch).create_embeddings(request(&sentence)).await.unwrap();
                if i >= WARM {
                    samples[2].push(t.elapsed());
                }
            }
            for i in 0..BLOCK + WARM {
                let t = Instant::now();
                oip(&ch)
                    .server_live(kiln_proto::inference::ServerLiveRequest {})
                    .await
                    .unwrap();
                if i >= WARM {
                    samples[3].push(t.elapsed());
                }
            }
        }
        let [direct, in_engine, grpc, empty] = samples.map(p50);

        // The engine's batching alone: 32 tasks in this process, no transport or platform.
        let before = model.runner().unwrap().stats().get();
        let engine_batched = {
            let model = model.clone();
            let texts = texts.clone();
            measure(seconds, 32, move || {
                let model = model.clone();
                let texts = texts.clone();
                async move {
                    let ids = embeddings::tokenize(&model, &texts, false).unwrap();
                    std::hint::black_box(embeddings::embed(&model, ids).await.unwrap());
                }
            })
            .await
        };
        let after = model.runner().unwrap().stats().get();
        let engine_rows_per_pass = (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64;
        drop(model);
        drop(engine);

        // 32 closed-loop clients of CreateEmbeddings on `ch`.
        let calls = |ch: kiln_tests::AuthedChannel| {
            let sentence = sentence.clone();
            move || {
                let ch = ch.clone();
                let r = request(&sentence);
                async move {
                    client(&ch).create_embeddings(r).await.unwrap();
                }
            }
        };
        let batched = measure(seconds, 32, calls(ch.clone())).await;
        batched_mesh.shutdown().await;

        let (unbatched_mesh, ch) = mesh(
            threads,
            Batching {
                max_batch_size: 1,
                max_queue_delay_ms: 0,
                instances: 1,
            },
            assets.path(),
        )
        .await;
        let unbatched = measure(seconds, 32, calls(ch)).await;
        unbatched_mesh.shutdown().await;

        // The same threads as copies of the model, one thread each, passes side by side.
        let (instances_mesh, ch) = mesh(
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

        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/ort_baseline.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .args(["--model-dir", &minilm_dir().display().to_string()])
            .args(["--threads", &threads.to_string(), "--seconds", &seconds.to_string()])
            .args(["--clients", "32", "--batch", "32"])
            .output()
            .expect("python3 runs (tests/python/requirements.txt installed)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let python: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let python_rate = python["embeddings_per_s"].as_f64().unwrap();
        let python_p50 = python["p50_ms_single"].as_f64().unwrap();

        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!("MiniLM-L6 (int8) embeddings, ONNX Runtime, {threads} intra-op threads, {seconds} s per throughput run");
        println!("p50 of one 16-token input:");
        println!("  backend called directly      {:>8.3} ms", ms(direct));
        println!("  engine (batcher) in process  {:>8.3} ms", ms(in_engine));
        println!("  CreateEmbeddings over gRPC   {:>8.3} ms", ms(grpc));
        println!("  (an empty authenticated call {:>8.3} ms)", ms(empty));
        println!("  python onnxruntime           {:>8.3} ms", python_p50);
        println!(
            "  gRPC overhead over the direct call: {:.1}% (aim < 10%)",
            (ms(grpc) / ms(direct) - 1.0) * 100.0
        );
        println!("embeddings/s, 32 concurrent clients, one 16-token input per request:");
        println!("  engine in process, batching  {engine_batched:>8.0}  ({engine_rows_per_pass:.1} rows per pass)");
        println!("  gRPC, batching on (32)       {batched:>8.0}");
        println!("  gRPC, batching off           {unbatched:>8.0}");
        println!("  gRPC, batching on, {threads} instances of 1 thread {instances:>8.0}");
        println!("  python onnxruntime, batch 32 {python_rate:>8.0}");
        println!(
            "  batched / python: {:.2}, with instances {:.2} (aim > 1); batched / unbatched: {:.2}",
            batched / python_rate,
            instances / python_rate,
            batched / unbatched
        );
    });
}
