//! Training throughput: Kiln's trainer against PyTorch + PEFT training the same LoRA (rank,
//! alpha, the seven projections of every layer) on SmolLM2-135M's shapes with the same batch,
//! sequence length and threads, every token learned. Kiln trains on the real checkpoint's
//! weights; PyTorch on random ones of the same shapes (tests/python/train_baseline.py, which
//! needs requirements-reference.txt; skipped with a note when they are missing).
//!
//! `cargo bench -p kiln-tests --bench training -- [steps] [batch] [seq] [rank]`

use std::time::Instant;

use kiln_tests::llm::GGUF;
use kiln_tests::python::Script;
use kiln_trainer::{
    Adapter, Base, DType, Device, Example, LoraConfig, Module, TrainOptions, Trainer,
};

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .filter(|a| !a.starts_with('-'))
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (steps, batch, seq, rank) = (arg(1, 3), arg(2, 4), arg(3, 128), arg(4, 8));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!(
        "LoRA r{rank} on all seven projections, batch {batch} x {seq} tokens, {steps} timed steps after one, {threads} threads"
    );

    let gguf = std::fs::File::open(kiln_tests::asset(GGUF)).expect("the GGUF");
    let checkpoint =
        kiln_formats::read_llama_checkpoint(std::io::BufReader::new(gguf)).expect("reads");
    let base = Base::new(checkpoint, DType::F32, &Device::Cpu).expect("base");
    let vocab = base.config().vocab as u64;
    // splitmix64 token ids: every token learned.
    let mut state = 1u64;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % vocab) as u32
    };
    let examples: Vec<Example> = (0..batch * (steps + 1))
        .map(|_| Example {
            tokens: (0..seq).map(|_| next()).collect(),
            learned: vec![true; seq],
        })
        .collect();
    let lora = LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        modules: Module::ALL.to_vec(),
    };
    let adapter = Adapter::init(lora, base.config(), DType::F32, &Device::Cpu, 1).expect("adapter");
    let options = TrainOptions {
        epochs: 1,
        learning_rate: 1e-4,
        warmup_steps: 0,
        batch_size: batch,
        pass_tokens: batch * seq,
        weight_decay: 0.0,
        seed: 1,
        threads,
    };
    let mut trainer = Trainer::new(&base, adapter, examples, options).expect("trainer");
    trainer.step().expect("warm-up step");
    let start = Instant::now();
    for _ in 0..steps {
        trainer.step().expect("step");
    }
    let seconds = start.elapsed().as_secs_f64();
    let kiln = (steps * batch * seq) as f64 / seconds;
    println!("kiln trainer (candle): {kiln:.1} tokens/s");

    let baseline = Script::new("train_baseline.py")
        .arg("--threads", threads)
        .arg("--batch", batch)
        .arg("--seq", seq)
        .arg("--steps", steps)
        .arg("--rank", rank)
        .run();
    match baseline {
        Ok(json) => {
            let torch = json["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "pytorch {} + peft: {torch:.1} tokens/s; kiln / pytorch = {:.2}",
                json["torch"].as_str().unwrap_or("?"),
                kiln / torch
            );
        }
        Err(e) => println!(
            "pytorch baseline not run: {}",
            e.lines().next().unwrap_or("")
        ),
    }
}
