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
//!   blocks (does the transport slow the pass, or add time around it?) and the host's steal
//!   meanwhile;
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
use std::time::Duration;

use kiln_core::auth::Principal;
use kiln_inference::backend::LoadOptions;
use kiln_inference::config::{Batching, InferenceConfig};
use kiln_inference::embeddings;
use kiln_inference::engine::load_tokenizer;
use kiln_inference::tensor::TensorData;
use kiln_proto::kiln_inference::v1::CreateEmbeddingsRequest;
use kiln_proto::kiln_inference::v1::inference_service_client::InferenceServiceClient;
use kiln_tests::bench::{
    Args, ClientProcess, CpuTicks, block_on, durations_line, measure, median, ms, percentile,
    serve_client_commands, timed_block,
};
use kiln_tests::inference::*;
use kiln_tests::python::Script;
use kiln_tests::{AuthedChannel, TestMesh};

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
        // A client in a process of its own, as users' clients are.
        let mut client_process = ClientProcess::spawn(&batched_mesh.url(), &key);
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
        let mut samples: [Vec<Duration>; 7] = Default::default();
        let [
            direct_samples,
            after_gap_samples,
            engine_samples,
            in_process_samples,
            grpc_samples,
            process_samples,
            empty_samples,
        ] = &mut samples;
        // Each round's p50s over its direct p50 (gRPC, in process, gRPC from the client
        // process, direct after a gap) and over its engine p50 (gRPC, gRPC from the client
        // process).
        let mut ratios: [Vec<f64>; 6] = Default::default();
        let mut after_pass = Vec::new();
        // The forward pass alone (the mesh's `kiln_model_pass_duration`, the same code in both
        // the engine and the server, warm-up calls included), to tell an overhead that slows
        // the pass itself (threads preempting ONNX Runtime's) from one around it.
        let passes = || batched_mesh.histogram_totals("kiln_model_pass_duration_seconds");
        let [
            mut engine_passes,
            mut in_process_passes,
            mut grpc_passes,
            mut process_passes,
        ] = [(0.0, 0.0); 4];
        let latency_cpu = CpuTicks::now();
        for _round in 0..samples_per_path.div_ceil(BLOCK) {
            let from = [
                direct_samples.len(),
                after_gap_samples.len(),
                engine_samples.len(),
                in_process_samples.len(),
                grpc_samples.len(),
                process_samples.len(),
            ];
            timed_block(direct_samples, WARM, BLOCK, || {
                direct();
                std::future::ready(())
            })
            .await;
            // The same after an idle gap: each call waits first for a round trip to the client
            // process, as a server's pass waits for the client's next request.
            for i in 0..WARM + BLOCK {
                client_process.ask("ping").await;
                let started = std::time::Instant::now();
                direct();
                if i >= WARM {
                    after_gap_samples.push(started.elapsed());
                }
            }
            // The direct session's workers spin on after its passes: let them stop before
            // the mesh's session takes its turn.
            tokio::time::sleep(SETTLE).await;
            let before = passes().await;
            // More calls to warm up after the pause: its first passes meet cold caches.
            timed_block(engine_samples, 4 * WARM, BLOCK, || async {
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
            let grpc_done = passes().await;
            client_process
                .ask_durations(&format!("embed {WARM} {BLOCK}"), process_samples)
                .await;
            let after = passes().await;
            engine_passes = add_difference(engine_passes, between, before);
            in_process_passes = add_difference(in_process_passes, in_process_done, between);
            grpc_passes = add_difference(grpc_passes, grpc_done, in_process_done);
            process_passes = add_difference(process_passes, after, grpc_done);
            tokio::time::sleep(SETTLE).await;
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
            let [
                direct_p50,
                after_gap_p50,
                engine_p50,
                in_process_p50,
                grpc_p50,
                process_p50,
            ] = [
                &mut direct_samples[from[0]..],
                &mut after_gap_samples[from[1]..],
                &mut engine_samples[from[2]..],
                &mut in_process_samples[from[3]..],
                &mut grpc_samples[from[4]..],
                &mut process_samples[from[5]..],
            ]
            .map(|round| median(round).as_secs_f64());
            for (ratios, ratio) in ratios.iter_mut().zip([
                grpc_p50 / direct_p50,
                in_process_p50 / direct_p50,
                process_p50 / direct_p50,
                after_gap_p50 / direct_p50,
                grpc_p50 / engine_p50,
                process_p50 / engine_p50,
            ]) {
                ratios.push(ratio);
            }
        }
        let latency_cpu = CpuTicks::now() - latency_cpu;
        let rounds = ratios[0].len();
        let [
            direct,
            after_gap,
            in_engine,
            served_in_process,
            grpc,
            from_process,
            empty,
        ] = samples.map(|mut s| median(&mut s));
        let [
            overhead,
            in_process_overhead,
            process_overhead,
            gap_penalty,
            grpc_over_engine,
            process_over_engine,
        ] = ratios.map(|mut r| median(&mut r) - 1.0);

        // 32 closed-loop clients of CreateEmbeddings on `ch`.
        let calls = |ch: AuthedChannel| closed_loop_call(ch, texts.clone());
        // A task calling the engine in process (no transport or platform).
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
        // The engine alone (32 tasks in this process), gRPC clients on this runtime and gRPC
        // clients in the client process take turns, so drift on a shared machine hits all
        // alike: per side its mean rate, (rows, passes) and where the cores went.
        let (mut rates, mut rows, mut cpu) = ([0.0; 3], [(0.0, 0.0); 3], [CpuTicks::default(); 3]);
        // Each turn's gRPC rates (client on this runtime, in its process) over its engine rate.
        let mut turn_ratios: [Vec<f64>; 2] = Default::default();
        let batch_rows = || batched_mesh.histogram_totals("kiln_model_batch_rows");
        let turns = 2 * seconds;
        for _turn in 0..turns {
            let mut rate = [0.0; 3];
            for side in 0..3 {
                let rows_at = batch_rows().await;
                let at = CpuTicks::now();
                rate[side] = match side {
                    0 => measure(1, 32, in_process()).await,
                    1 => measure(1, 32, calls(ch.clone())).await,
                    _ => {
                        let answer = client_process.ask("rate 1 32").await;
                        answer
                            .parse()
                            .unwrap_or_else(|_| panic!("a rate: {answer:?}"))
                    }
                };
                cpu[side] += CpuTicks::now() - at;
                rows[side] = add_difference(rows[side], batch_rows().await, rows_at);
                rates[side] += rate[side] / turns as f64;
            }
            turn_ratios[0].push(rate[1] / rate[0]);
            turn_ratios[1].push(rate[2] / rate[0]);
        }
        let [engine_batched, batched, process_batched] = rates;
        let [
            engine_rows_per_pass,
            grpc_rows_per_pass,
            process_rows_per_pass,
        ] = rows.map(|(rows, passes)| rows / passes.max(1.0));
        drop(client_process);
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
        println!(
            "  the same after an idle gap   {:>8.3} ms  ({:+.1}%: each call after a round trip to the client process, as a server's pass comes after a wait)",
            ms(after_gap),
            gap_penalty * 100.0
        );
        println!(
            "  engine in process            {:>8.3} ms  (the mesh's model, the session every path below runs on)",
            ms(in_engine)
        );
        println!(
            "  CreateEmbeddings in process  {:>8.3} ms  (every layer of the call, no transport)",
            ms(served_in_process)
        );
        println!(
            "  CreateEmbeddings over gRPC   {:>8.3} ms  (the client a task on the server's runtime)",
            ms(grpc)
        );
        println!(
            "  the same, client process     {:>8.3} ms  (the client in a process of its own)",
            ms(from_process)
        );
        println!("  (an empty authenticated call {:>8.3} ms)", ms(empty));
        println!(
            "  (the same after a pass       {:>8.3} ms)",
            ms(median(&mut after_pass))
        );
        println!("  python onnxruntime           {:>8.3} ms", python_p50);
        let mean_pass = |(seconds, passes): (f64, f64)| seconds * 1e3 / passes.max(1.0);
        let [engine_pass, in_process_pass, grpc_pass, process_pass] = [
            engine_passes,
            in_process_passes,
            grpc_passes,
            process_passes,
        ]
        .map(mean_pass);
        println!(
            "  the forward pass alone (mean, one session): {engine_pass:.3} ms in the engine, {in_process_pass:.3} ms in process, {grpc_pass:.3} ms under gRPC, {process_pass:.3} ms from the client process"
        );
        println!(
            "  (the host stole {:.1}% of the cores during these rounds)",
            latency_cpu.stolen()
        );
        println!(
            "  gRPC overhead over the direct call (aim < 10%; medians of {rounds} rounds' ratios):"
        );
        println!(
            "    client process {:>5.1}%, client on the server's runtime {:.1}% (the p50s above give {:.1}%)",
            process_overhead * 100.0,
            overhead * 100.0,
            (ms(grpc) / ms(direct) - 1.0) * 100.0
        );
        println!(
            "    of the latter, the serving path in process: {:.1}%, the transport (loopback HTTP/2, client included): {:.1} points",
            in_process_overhead * 100.0,
            (overhead - in_process_overhead) * 100.0
        );
        println!(
            "  over the engine on the same session: client process {:.1}%, client on the server's runtime {:.1}%",
            process_over_engine * 100.0,
            grpc_over_engine * 100.0
        );
        println!("embeddings/s, 32 concurrent clients, one 16-token input per request:");
        println!(
            "  engine in process, batching  {engine_batched:>8.0}  ({engine_rows_per_pass:.1} rows per pass)"
        );
        let [grpc_ratios, process_ratios] = &mut turn_ratios;
        for (label, rate, ratios, rows) in [
            (
                "gRPC, batching on (32)      ",
                batched,
                grpc_ratios,
                grpc_rows_per_pass,
            ),
            (
                "  the same, client process  ",
                process_batched,
                process_ratios,
                process_rows_per_pass,
            ),
        ] {
            let (lowest, highest) = (percentile(ratios, 0.0), percentile(ratios, 1.0));
            println!(
                "  {label}{rate:>8.0}  ({:.2} of the engine: median of {turns} turns' ratios, {lowest:.2} to {highest:.2}; aim >= 0.9; {rows:.1} rows per pass)",
                median(ratios)
            );
        }
        let [engine_cpu, grpc_cpu, process_cpu] = cpu;
        println!("    cores in the engine's turns:         {engine_cpu}");
        println!("    cores in the gRPC turns:             {grpc_cpu}");
        println!(
            "    cores in the client process's turns: {process_cpu} (the client among other processes)"
        );
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
/// tasks; `ping` answers at once.
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
        Some(&"rate") => {
            let rate = measure(number(1) as u64, number(2), closed_loop_call(ch, texts)).await;
            rate.to_string()
        }
        _ => panic!("unknown command {command:?}"),
    }
}
