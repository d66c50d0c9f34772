//! The latency rounds: each path's p50 of one 16-token embedding, the paths taking turns.

use super::*;

/// What the latency rounds measured: per path (direct, after a gap, engine, in process,
/// gRPC, client process, empty call) its p50; the empty call's p50 right after a pass; the
/// medians of the rounds' ratios; the forward pass's mean per served path; the cores.
pub(crate) struct Latency {
    p50: [Duration; 7],
    empty_after_pass: Duration,
    /// gRPC, in process, client process and direct after a gap over direct; gRPC and client
    /// process over the engine; each the median of the rounds' ratios, less one.
    overheads: [f64; 6],
    /// The mean forward pass (ms) in the engine's, in process, gRPC's and the client
    /// process's blocks.
    passes: [f64; 4],
    /// Time on a core per call in the engine's blocks and in the client process's: the
    /// async runtime's (the server's, with usage recording and billing) in each, and the
    /// client process's own.
    cpu_per_call: [Duration; 3],
    cpu: CpuTicks,
    rounds: usize,
}

/// The paths take turns in short blocks of calls, many rounds, so drift on a shared machine
/// hits all alike; each block's first calls are not counted (call-by-call interleaving
/// would measure each session's thread pool still spinning from the previous call). Plus
/// an authenticated call that does nothing (the transport and the server's layers).
pub(crate) async fn latency_rounds(
    served: &mut Served<'_>,
    direct: &mut impl FnMut(),
    samples_per_path: usize,
) -> Latency {
    const BLOCK: usize = 20;
    const WARM: usize = 5;
    let request = CreateEmbeddingsRequest {
        model: MINILM.to_owned(),
        input: served.texts.clone(),
        ..Default::default()
    };
    let Served {
        mesh,
        model,
        texts,
        in_process,
        ch,
        client_process,
    } = served;
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
    let mut ratios: [Vec<f64>; 6] = Default::default();
    let mut after_pass = Vec::new();
    // The forward pass alone (the mesh's `kiln_model_pass_duration`, the same code in both
    // the engine and the server, warm-up calls included), to tell an overhead that slows
    // the pass itself (threads preempting ONNX Runtime's) from one around it.
    let passes = || mesh.histogram_totals("kiln_model_pass_duration_seconds");
    let mut pass_totals = [(0.0, 0.0); 4];
    // (time on a core, calls) of the runtime in the engine's and client process's blocks,
    // and of the client process in its blocks.
    let mut cores = [(Duration::ZERO, 0); 3];
    let cpu = CpuTicks::now();
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
        // The direct session's workers spin on after its passes: let them stop before the
        // mesh's session takes its turn.
        tokio::time::sleep(SETTLE).await;
        let mut at = [passes().await; 5];
        let runtime_at = ThreadsCpu::runtime();
        // More calls to warm up after the pause: its first passes meet cold caches.
        timed_block(engine_samples, 4 * WARM, BLOCK, || {
            engine_call(model, texts)
        })
        .await;
        add_cpu(
            &mut cores[0],
            ThreadsCpu::runtime().since(&runtime_at),
            4 * WARM + BLOCK,
        );
        at[1] = passes().await;
        timed_block(in_process_samples, WARM, BLOCK, || {
            let (mut client, request) = (in_process.clone(), request.clone());
            async move {
                client.create_embeddings(request).await.unwrap();
            }
        })
        .await;
        at[2] = passes().await;
        timed_block(grpc_samples, WARM, BLOCK, || async {
            embed(ch, MINILM, texts).await.unwrap();
        })
        .await;
        at[3] = passes().await;
        let client_at = client_cpu(client_process).await;
        let runtime_at = ThreadsCpu::runtime();
        client_process
            .ask_durations(&format!("embed {WARM} {BLOCK}"), process_samples)
            .await;
        add_cpu(
            &mut cores[1],
            ThreadsCpu::runtime().since(&runtime_at),
            WARM + BLOCK,
        );
        let client_used = client_cpu(client_process).await.saturating_sub(client_at);
        add_cpu(&mut cores[2], client_used, WARM + BLOCK);
        at[4] = passes().await;
        for (path, total) in pass_totals.iter_mut().enumerate() {
            *total = add_difference(*total, at[path + 1], at[path]);
        }
        tokio::time::sleep(SETTLE).await;
        timed_block(empty_samples, WARM, BLOCK, || async {
            let live = kiln_proto::inference::ServerLiveRequest {};
            oip(ch).server_live(live).await.unwrap();
        })
        .await;
        // The same empty call right after a forward pass, as every embeddings call comes:
        // the workers parked and the caches cold, the transport's floor here.
        for i in 0..WARM + BLOCK {
            direct();
            let started = std::time::Instant::now();
            let live = kiln_proto::inference::ServerLiveRequest {};
            oip(ch).server_live(live).await.unwrap();
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
    Latency {
        rounds: ratios[0].len(),
        p50: samples.map(|mut s| median(&mut s)),
        empty_after_pass: median(&mut after_pass),
        overheads: ratios.map(|mut r| median(&mut r) - 1.0),
        passes: pass_totals.map(|(seconds, passes)| seconds * 1e3 / passes.max(1.0)),
        cpu_per_call: cores.map(|(used, calls)| used / calls.max(1)),
        cpu: CpuTicks::now() - cpu,
    }
}

/// Adds `used` over `calls` to a (time on a core, calls) total.
fn add_cpu(total: &mut (Duration, u32), used: Duration, calls: usize) {
    total.0 += used;
    total.1 += calls as u32;
}

/// The client process's time on a core so far (its live threads').
async fn client_cpu(client: &mut ClientProcess) -> Duration {
    let answer = client.ask("cpu").await;
    Duration::from_nanos(answer.parse().unwrap_or_else(|_| panic!("{answer:?}")))
}

impl Latency {
    pub(crate) fn print(&self, python_p50: f64) {
        let [
            direct,
            after_gap,
            in_engine,
            served_in_process,
            grpc,
            from_process,
            empty,
        ] = self.p50;
        let [
            overhead,
            in_process_overhead,
            process_overhead,
            gap_penalty,
            grpc_over_engine,
            process_over_engine,
        ] = self.overheads;
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
            ms(self.empty_after_pass)
        );
        println!("  python onnxruntime           {python_p50:>8.3} ms");
        let [engine_pass, in_process_pass, grpc_pass, process_pass] = self.passes;
        println!(
            "  the forward pass alone (mean, one session): {engine_pass:.3} ms in the engine, {in_process_pass:.3} ms in process, {grpc_pass:.3} ms under gRPC, {process_pass:.3} ms from the client process"
        );
        let [engine_runtime, served_runtime, client] = self.cpu_per_call;
        println!(
            "  time on a core per call outside the model's threads, client process blocks: the server's async runtime {:.3} ms more than in the engine's (layers, transport, usage recording, billing), the client process {:.3} ms",
            ms(served_runtime.saturating_sub(engine_runtime)),
            ms(client)
        );
        println!(
            "  (the host stole {:.1}% of the cores during these rounds)",
            self.cpu.stolen()
        );
        println!(
            "  gRPC overhead over the direct call (aim < 10%; medians of {} rounds' ratios):",
            self.rounds
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
    }
}
