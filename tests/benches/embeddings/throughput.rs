//! The throughput turns: 32 closed-loop clients of the engine and of gRPC, taking turns.

use super::*;

/// What the throughput turns measured, per side (the engine, gRPC clients on this runtime,
/// gRPC clients in the client process): its mean rate, rows per pass and cores; the gRPC
/// sides' turns' ratios to the engine's.
pub(crate) struct Throughput {
    engine: f64,
    pub(crate) grpc: f64,
    process: f64,
    rows_per_pass: [f64; 3],
    cpu: [CpuTicks; 3],
    turn_ratios: [Vec<f64>; 2],
}

/// 32 tasks calling the engine in process, 32 gRPC clients on this runtime and 32 in the
/// client process take one-second turns, 2 x `seconds` of each, so drift on a shared
/// machine hits all alike.
pub(crate) async fn throughput_turns(served: &mut Served<'_>, seconds: u64) -> Throughput {
    // A task calling the engine in process (no transport or platform).
    let engine_calls = || {
        let (model, texts) = (served.model.clone(), served.texts.clone());
        move || {
            let (model, texts) = (model.clone(), texts.clone());
            async move { engine_call(&model, &texts).await }
        }
    };
    let (mut rates, mut rows, mut cpu) = ([0.0; 3], [(0.0, 0.0); 3], [CpuTicks::default(); 3]);
    let mut turn_ratios: [Vec<f64>; 2] = Default::default();
    let mesh = served.mesh;
    let batch_rows = || mesh.histogram_totals("kiln_model_batch_rows");
    let turns = 2 * seconds;
    for _turn in 0..turns {
        let mut rate = [0.0; 3];
        for side in 0..3 {
            let rows_at = batch_rows().await;
            let at = CpuTicks::now();
            rate[side] = match side {
                0 => measure(1, 32, engine_calls()).await,
                1 => {
                    let calls = closed_loop_call(served.ch.clone(), served.texts.clone());
                    measure(1, 32, calls).await
                }
                _ => {
                    let answer = served.client_process.ask("rate 1 32").await;
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
    let [engine, grpc, process] = rates;
    Throughput {
        engine,
        grpc,
        process,
        rows_per_pass: rows.map(|(rows, passes)| rows / passes.max(1.0)),
        cpu,
        turn_ratios,
    }
}

impl Throughput {
    pub(crate) fn print(&self) {
        let turns = self.turn_ratios[0].len();
        let [engine_rows, grpc_rows, process_rows] = self.rows_per_pass;
        println!("embeddings/s, 32 concurrent clients, one 16-token input per request:");
        println!(
            "  engine in process, batching  {:>8.0}  ({engine_rows:.1} rows per pass)",
            self.engine
        );
        let [mut grpc_ratios, mut process_ratios] = self.turn_ratios.clone();
        for (label, rate, ratios, rows) in [
            (
                "gRPC, batching on (32)      ",
                self.grpc,
                &mut grpc_ratios,
                grpc_rows,
            ),
            (
                "  the same, client process  ",
                self.process,
                &mut process_ratios,
                process_rows,
            ),
        ] {
            let (lowest, highest) = (percentile(ratios, 0.0), percentile(ratios, 1.0));
            println!(
                "  {label}{rate:>8.0}  ({:.2} of the engine: median of {turns} turns' ratios, {lowest:.2} to {highest:.2}; aim >= 0.9; {rows:.1} rows per pass)",
                median(ratios)
            );
        }
        let [engine_cpu, grpc_cpu, process_cpu] = self.cpu;
        println!("    cores in the engine's turns:         {engine_cpu}");
        println!("    cores in the gRPC turns:             {grpc_cpu}");
        println!(
            "    cores in the client process's turns: {process_cpu} (the client among other processes)"
        );
    }
}
