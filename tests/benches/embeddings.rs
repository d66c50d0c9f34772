//! Embeddings on the real MiniLM, all in one run on the same backend (ONNX Runtime) and thread
//! count: `cargo bench -p kiln-tests --bench embeddings [-- SECONDS THREADS SAMPLES]`.
//!
//! - p50 latency of one 16-token embedding (SAMPLES calls per path, default 1,000), the paths
//!   taking turns in blocks: the backend called directly in this process (tokenize, forward,
//!   pool), the engine (plus its batcher thread), `CreateEmbeddings` called in process (the
//!   server's layers, auth, routing and the usage journal's write, on the mesh's own session)
//!   and the same through gRPC (plus loopback HTTP/2 and the client); the overhead is the
//!   median over rounds of each round's gRPC p50 over its direct p50, so drift between rounds
//!   cancels, split into the serving path's (in process over direct) and the transport's;
//!   and an authenticated call that does nothing, in a tight loop and right after a direct
//!   pass (the transport's floor: every embeddings call meets parked workers and cold caches);
//!   the forward pass's own mean time in the engine's, the in-process and the gRPC blocks
//!   (does the transport slow the pass, or add time around it? the last two share one
//!   session, whose weights' placement alone moves a pass by a few percent) and the host's
//!   steal meanwhile;
//! - embeddings/s from 32 concurrent gRPC clients, one input per request, with dynamic
//!   batching on (32 rows) and off, and on with the threads as instances of one thread
//!   each; and from 32 tasks calling the engine in process, taking turns with the gRPC
//!   clients (batching on) in one-second turns (2 x SECONDS of each), their ratio the median
//!   of the turns' ratios, with the rows per pass of each (the gRPC side's from the mesh's
//!   `kiln_model_batch_rows` metric) and where the cores went in each side's turns: the
//!   model's threads (its runner's and ONNX Runtime's), the async runtime's (server, clients,
//!   usage recording, billing), other processes (PostgreSQL, NATS), the host's steal and idle;
//! - the `onnxruntime` Python package on the same files and thread count, batches of 32
//!   (tests/python/ort_baseline.py).

use std::time::Duration;

use kiln_core::auth::Principal;
use kiln_inference::config::{Batching, InferenceConfig};
use kiln_inference::embeddings;
use kiln_inference::engine::load_tokenizer;
use kiln_inference::tensor::TensorData;
use kiln_proto::kiln_inference::v1::CreateEmbeddingsRequest;
use kiln_proto::kiln_inference::v1::inference_service_client::InferenceServiceClient;
use kiln_tests::TestMesh;
use kiln_tests::bench::{Args, CpuTicks, block_on, measure, median, ms, percentile, timed_block};
use kiln_tests::inference::*;
use kiln_tests::python::Script;

/// Calls per path in the latency comparison unless the arguments say otherwise.
const SAMPLES: usize = 1000;

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
    let args = Args::from_env();
    let (seconds, threads): (u64, usize) = (args.get(0, 5), args.get(1, 2));
    let samples_per_path: usize = args.get(2, SAMPLES);
    block_on(None, async move {
        let reference = reference();
        let (i, ids) = reference.sixteen_tokens();
        let sentence = reference.sentences[i].clone();
        assert_eq!(ids.len(), 16);

        // The backend alone: tokenize, forward, mean-pool, normalise.
        let mut session = load_session("onnxruntime", &minilm_dir().join("model.onnx"), threads);
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

        // The engine in process: the same plus the batcher's thread hop.
        let cache = tempfile::tempdir().unwrap();
        let engine = local_engine("onnxruntime", Batching::default(), threads, cache.path());
        let model = engine
            .model(&Principal::service(), "model", LOCAL_MINILM)
            .await
            .unwrap();
        let texts = vec![sentence.clone()];

        let assets = minilm_asset_dir();
        let (batched_mesh, key, ch) = mesh(threads, Batching::default(), assets.path()).await;
        // The same service in process: every layer of the gRPC call but the transport.
        let in_process = InferenceServiceClient::new(batched_mesh.in_process(&key));
        let request = CreateEmbeddingsRequest {
            model: MINILM.to_owned(),
            input: texts.clone(),
            ..Default::default()
        };

        // The paths take turns in short blocks of calls, many rounds, so drift on a shared
        // machine hits all alike; each block's first calls are not counted (call-by-call
        // interleaving would measure each session's thread pool still spinning from the
        // previous call). Plus an authenticated call that does nothing (the transport and
        // the server's layers).
        const BLOCK: usize = 20;
        const WARM: usize = 5;
        let mut samples: [Vec<Duration>; 5] = Default::default();
        let [
            direct_samples,
            engine_samples,
            in_process_samples,
            grpc_samples,
            empty_samples,
        ] = &mut samples;
        // Each round's gRPC p50 over its direct p50, and its p50 in process over the direct.
        let (mut round_ratios, mut in_process_ratios) = (Vec::new(), Vec::new());
        let mut after_pass = Vec::new();
        // The forward pass alone (the mesh's `kiln_model_pass_duration`, the same code in both
        // the engine and the server, warm-up calls included), to tell an overhead that slows
        // the pass itself (threads preempting ONNX Runtime's) from one around it.
        let passes = || batched_mesh.histogram_totals("kiln_model_pass_duration_seconds");
        let [mut engine_passes, mut in_process_passes, mut grpc_passes] = [(0.0, 0.0); 3];
        let latency_cpu = CpuTicks::now();
        for _round in 0..samples_per_path.div_ceil(BLOCK) {
            let from = [
                direct_samples.len(),
                in_process_samples.len(),
                grpc_samples.len(),
            ];
            timed_block(direct_samples, WARM, BLOCK, || {
                direct();
                std::future::ready(())
            })
            .await;
            let before = passes().await;
            timed_block(engine_samples, WARM, BLOCK, || async {
                let ids = embeddings::tokenize(&model, &texts, false).unwrap();
                std::hint::black_box(embeddings::embed(&model, ids).await.unwrap());
            })
            .await;
            let between = passes().await;
            timed_block(in_process_samples, WARM, BLOCK, || {
                let (mut client, request) = (in_process.clone(), request.clone());
                async move {
                    client.create_embeddings(request).await.unwrap();
                }
            })
            .await;
            let in_process_done = passes().await;
            timed_block(grpc_samples, WARM, BLOCK, || async {
                embed(&ch, MINILM, &texts).await.unwrap();
            })
            .await;
            let after = passes().await;
            engine_passes = add_difference(engine_passes, between, before);
            in_process_passes = add_difference(in_process_passes, in_process_done, between);
            grpc_passes = add_difference(grpc_passes, after, in_process_done);
            timed_block(empty_samples, WARM, BLOCK, || async {
                let live = kiln_proto::inference::ServerLiveRequest {};
                oip(&ch).server_live(live).await.unwrap();
            })
            .await;
            // The same empty call right after a forward pass, as every embeddings call
            // comes: the workers parked and the caches cold, the transport's floor here.
            for i in 0..WARM + BLOCK {
                direct();
                let started = std::time::Instant::now();
                let live = kiln_proto::inference::ServerLiveRequest {};
                oip(&ch).server_live(live).await.unwrap();
                if i >= WARM {
                    after_pass.push(started.elapsed());
                }
            }
            // Sorting a round's samples in place leaves the pooled p50s below as they are.
            let direct_p50 = median(&mut direct_samples[from[0]..]).as_secs_f64();
            let in_process_p50 = median(&mut in_process_samples[from[1]..]).as_secs_f64();
            let grpc_p50 = median(&mut grpc_samples[from[2]..]).as_secs_f64();
            round_ratios.push(grpc_p50 / direct_p50);
            in_process_ratios.push(in_process_p50 / direct_p50);
        }
        let latency_cpu = CpuTicks::now() - latency_cpu;
        let [direct, in_engine, served_in_process, grpc, empty] =
            samples.map(|mut s| median(&mut s));
        let overhead = median(&mut round_ratios) - 1.0;
        let in_process_overhead = median(&mut in_process_ratios) - 1.0;

        // 32 closed-loop clients of CreateEmbeddings on `ch`.
        let calls = |ch: kiln_tests::AuthedChannel| {
            let texts = texts.clone();
            move || {
                let (ch, texts) = (ch.clone(), texts.clone());
                async move {
                    embed(&ch, MINILM, &texts).await.unwrap();
                }
            }
        };
        // The engine's batching alone (32 tasks in this process, no transport or platform)
        // and the same over gRPC take turns, so drift on a shared machine hits both alike.
        let in_process = || {
            let (model, texts) = (model.clone(), texts.clone());
            move || {
                let (model, texts) = (model.clone(), texts.clone());
                async move {
                    let ids = embeddings::tokenize(&model, &texts, false).unwrap();
                    std::hint::black_box(embeddings::embed(&model, ids).await.unwrap());
                }
            }
        };
        let before = model.runner().unwrap().stats().get();
        let (mut engine_batched, mut batched) = (0.0, 0.0);
        // Each turn's gRPC rate over its engine rate, and where the cores went in each.
        let mut turn_ratios = Vec::new();
        let (mut engine_cpu, mut grpc_cpu) = (CpuTicks::default(), CpuTicks::default());
        let grpc_before = batched_mesh.histogram_totals("kiln_model_batch_rows").await;
        let turns = 2 * seconds;
        for _turn in 0..turns {
            let at = CpuTicks::now();
            let engine_rate = measure(1, 32, in_process()).await;
            let between = CpuTicks::now();
            let grpc_rate = measure(1, 32, calls(ch.clone())).await;
            engine_cpu += between - at;
            grpc_cpu += CpuTicks::now() - between;
            engine_batched += engine_rate / turns as f64;
            batched += grpc_rate / turns as f64;
            turn_ratios.push(grpc_rate / engine_rate);
        }
        let grpc_after = batched_mesh.histogram_totals("kiln_model_batch_rows").await;
        let grpc_rows_per_pass =
            (grpc_after.0 - grpc_before.0) / (grpc_after.1 - grpc_before.1).max(1.0);
        let after = model.runner().unwrap().stats().get();
        let engine_rows_per_pass = (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64;
        drop(model);
        drop(engine);
        batched_mesh.shutdown().await;

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
        println!("p50 of one 16-token input:");
        println!("  backend called directly      {:>8.3} ms", ms(direct));
        println!("  engine (batcher) in process  {:>8.3} ms", ms(in_engine));
        println!(
            "  CreateEmbeddings in process  {:>8.3} ms  (every layer of the call, no transport)",
            ms(served_in_process)
        );
        println!("  CreateEmbeddings over gRPC   {:>8.3} ms", ms(grpc));
        println!("  (an empty authenticated call {:>8.3} ms)", ms(empty));
        println!(
            "  (the same after a pass       {:>8.3} ms)",
            ms(median(&mut after_pass))
        );
        println!("  python onnxruntime           {:>8.3} ms", python_p50);
        let mean_pass = |(seconds, passes): (f64, f64)| seconds * 1e3 / passes.max(1.0);
        let [engine_pass, in_process_pass, grpc_pass] =
            [engine_passes, in_process_passes, grpc_passes].map(mean_pass);
        println!(
            "  the forward pass alone (mean): {engine_pass:.3} ms in the engine, {in_process_pass:.3} ms in process, {grpc_pass:.3} ms under gRPC ({:+.1}% on the session in process)",
            (grpc_pass / in_process_pass - 1.0) * 100.0
        );
        println!(
            "  (the host stole {:.1}% of the cores during these rounds)",
            latency_cpu.stolen()
        );
        println!(
            "  gRPC overhead over the direct call: {:.1}% (aim < 10%; median of {} rounds' ratios, the p50s above give {:.1}%)",
            overhead * 100.0,
            round_ratios.len(),
            (ms(grpc) / ms(direct) - 1.0) * 100.0
        );
        println!(
            "    of which the serving path in process: {:.1}%, the transport (loopback HTTP/2, client included): {:.1} points",
            in_process_overhead * 100.0,
            (overhead - in_process_overhead) * 100.0
        );
        println!("embeddings/s, 32 concurrent clients, one 16-token input per request:");
        println!(
            "  engine in process, batching  {engine_batched:>8.0}  ({engine_rows_per_pass:.1} rows per pass)"
        );
        let (lowest, highest) = (
            percentile(&mut turn_ratios, 0.0),
            percentile(&mut turn_ratios, 1.0),
        );
        println!(
            "  gRPC, batching on (32)       {batched:>8.0}  ({:.2} of the engine: median of {turns} turns' ratios, {lowest:.2} to {highest:.2}; aim >= 0.9; {grpc_rows_per_pass:.1} rows per pass)",
            median(&mut turn_ratios)
        );
        println!("    cores in the engine's turns: {engine_cpu}");
        println!("    cores in the gRPC turns:     {grpc_cpu}");
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

/// `total` plus what a histogram's (sum, count) grew by from `earlier` to `later`.
fn add_difference(total: (f64, f64), later: (f64, f64), earlier: (f64, f64)) -> (f64, f64) {
    (total.0 + later.0 - earlier.0, total.1 + later.1 - earlier.1)
}
