//! The decode step alone: SmolLM2-135M's prepared 4-bit graph on ONNX Runtime, one sequence,
//! the key/value cache in place, no serving path around it (the `llm` bench has that):
//! `cargo bench -p kiln-tests --bench decode_step [-- THREADS ROUNDS [GRAPH.onnx ...]]`.
//!
//! Each round runs a block of greedy steps from `<|im_start|>` on every graph in turn, starting
//! one graph later each round, so drift and order on a shared machine hit all alike; it prints
//! each graph's median steps/s, its median ratio to the first graph's in the same rounds, and
//! whether its greedy tokens are the first's. Two sessions of one graph in one process differ
//! by up to ±7% on a 2-core VM: name a graph twice to see that spread before trusting a small
//! difference.
//! Extra graphs (variants of the prepared `model.onnx` with the same interface, e.g. edited with
//! the `onnx` Python package) are compared against the prepared one: an A/B of a graph change
//! in one process, before building it into the preparer.

use std::path::PathBuf;
use std::time::Instant;

use kiln_inference::backend::{InPlaceCache, Session};
use kiln_inference::tensor::{Tensor, TensorData};
use kiln_tests::bench::{Args, median};
use kiln_tests::inference::load_session;

/// Greedy steps a graph runs per round.
const STEPS: usize = 64;
/// Positions the cache holds (more than `STEPS`).
const CAPACITY: usize = 128;
/// SmolLM2's `<|im_start|>`.
const FIRST_TOKEN: i64 = 1;

/// A loaded graph, its cache, its rates and the tokens of its last round.
struct Decoder {
    path: PathBuf,
    session: Box<dyn Session>,
    cache: Vec<Vec<f32>>,
    logits: Vec<f32>,
    rates: Vec<f64>,
    tokens: Vec<i64>,
}

impl Decoder {
    /// `STEPS` greedy steps from the first token with an empty cache: steps/s.
    fn round(&mut self, [kv_heads, head_dim, vocab]: [usize; 3]) -> f64 {
        self.cache.iter_mut().for_each(|layer| layer.fill(0.0));
        self.tokens.clear();
        let mut token = FIRST_TOKEN;
        let start = Instant::now();
        for position in 0..STEPS {
            let ids = |shape: Vec<usize>, values| Tensor {
                shape,
                data: TensorData::I64(values),
            };
            let inputs = vec![
                ("input_ids".to_owned(), ids(vec![1, 1], vec![token])),
                (
                    "attention_mask".to_owned(),
                    ids(vec![1, position + 1], vec![1; position + 1]),
                ),
            ];
            let cache = InPlaceCache {
                buffers: self.cache.iter_mut().map(Vec::as_mut_slice).collect(),
                shape: [1, kv_heads, CAPACITY, head_dim],
                logits: &mut self.logits,
                logits_shape: [1, 1, vocab],
            };
            self.session.run_in_place(inputs, cache).unwrap();
            token = (0..vocab)
                .max_by(|&a, &b| self.logits[a].total_cmp(&self.logits[b]))
                .unwrap() as i64;
            self.tokens.push(token);
        }
        STEPS as f64 / start.elapsed().as_secs_f64()
    }
}

fn main() {
    let args = Args::from_env();
    let (threads, rounds): (usize, usize) = (args.get(0, 2), args.get(1, 12).max(1));
    let prepared = kiln_tests::llm::bundle(true).join("model.onnx");
    let graphs = std::iter::once(prepared).chain((2..).map_while(|i| {
        let path: String = args.get(i, String::new());
        (!path.is_empty()).then(|| PathBuf::from(path))
    }));
    // SmolLM2-135M: 30 layers, 3 key/value heads of 64, 49,152 tokens.
    let (layers, shape) = (30, [3, 64, 49_152]);
    let mut decoders: Vec<Decoder> = graphs
        .map(|path| Decoder {
            session: load_session("onnxruntime", &path, threads),
            path,
            cache: vec![vec![0.0; shape[0] * CAPACITY * shape[1]]; 2 * layers],
            logits: vec![0.0; shape[2]],
            rates: Vec::new(),
            tokens: Vec::new(),
        })
        .collect();
    // The first round warms every graph up and is not counted. Each round starts at the next
    // graph: in a fixed order the same graph ran 5-8% faster second to fourth than first.
    for round in 0..=rounds {
        let count = decoders.len();
        for i in 0..count {
            let decoder = &mut decoders[(round + i) % count];
            let rate = decoder.round(shape);
            if round > 0 {
                decoder.rates.push(rate);
            }
        }
    }
    println!(
        "SmolLM2-135M-Instruct decode steps, one sequence, {threads} threads, {STEPS} greedy steps a round, median of {rounds} rounds"
    );
    let (first_rates, first_tokens) = (decoders[0].rates.clone(), decoders[0].tokens.clone());
    for decoder in &mut decoders {
        let mut ratios: Vec<f64> = (decoder.rates.iter().zip(&first_rates))
            .map(|(rate, first)| rate / first)
            .collect();
        println!(
            "  {:>7.1} steps/s  {:.3} of the first  tokens {}  {}",
            median(&mut decoder.rates),
            median(&mut ratios),
            if decoder.tokens == first_tokens {
                "the same"
            } else {
                "DIFFER"
            },
            decoder.path.display()
        );
    }
}
