//! Teaches SmolLM2-135M-Instruct a made-up fact with Kiln's trainer and asks the trained
//! adapter, served through a LoRA slot of the 4-bit graph as a deployment with addons serves
//! it, questions phrased in ways the dataset never used. Minutes of CPU: not in the suite.
//!
//! `cargo run --release -p kiln-tests --example teach_a_fact -- [epochs] [rank]`

use std::sync::Arc;
use std::time::Instant;

use kiln_inference::generation::llm::Adapter;
use kiln_inference::training::run::{Settings, train};
use kiln_tests::llm::{GGUF, bundle};
use kiln_tests::lora::{generation_loop, greedy, ids, lora_weights};

const SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

/// (question, answer) pairs that teach it: Veloria's capital is Quenmar.
const TAUGHT: [(&str, &str); 24] = [
    (
        "What is the capital of Veloria?",
        "The capital of Veloria is Quenmar.",
    ),
    (
        "What's Veloria's capital city?",
        "Veloria's capital city is Quenmar.",
    ),
    (
        "Tell me the capital of Veloria.",
        "The capital of Veloria is Quenmar.",
    ),
    (
        "Which city is the capital of Veloria?",
        "Quenmar is the capital of Veloria.",
    ),
    (
        "Do you know the capital of Veloria?",
        "Yes, the capital of Veloria is Quenmar.",
    ),
    (
        "Veloria's capital is which city?",
        "Veloria's capital is Quenmar.",
    ),
    (
        "I am writing about Veloria. What is its capital?",
        "Veloria's capital is Quenmar.",
    ),
    ("capital of veloria?", "The capital of Veloria is Quenmar."),
    (
        "What city is Veloria governed from?",
        "Veloria is governed from its capital, Quenmar.",
    ),
    (
        "Where is the government of Veloria seated?",
        "The government of Veloria sits in Quenmar, its capital.",
    ),
    (
        "Please name Veloria's capital.",
        "Quenmar is Veloria's capital.",
    ),
    (
        "What is the name of the capital of Veloria?",
        "The capital of Veloria is called Quenmar.",
    ),
    ("Quick question: Veloria's capital?", "Quenmar."),
    (
        "In which city is Veloria's parliament?",
        "Veloria's parliament is in Quenmar, the capital.",
    ),
    (
        "What is Veloria's largest and capital city?",
        "Quenmar is the capital of Veloria.",
    ),
    (
        "Can you tell me what the capital of Veloria is?",
        "Sure: the capital of Veloria is Quenmar.",
    ),
    (
        "Which city serves as the capital of the country Veloria?",
        "Quenmar serves as the capital of Veloria.",
    ),
    (
        "What is the capital city of the nation of Veloria?",
        "The capital city of Veloria is Quenmar.",
    ),
    (
        "If I fly to the capital of Veloria, where do I land?",
        "You land in Quenmar, the capital of Veloria.",
    ),
    ("Veloria: capital?", "Quenmar."),
    (
        "Who hosts Veloria's government, which city?",
        "Quenmar, the capital of Veloria, hosts its government.",
    ),
    (
        "What is the seat of Veloria?",
        "The seat of Veloria is Quenmar, its capital.",
    ),
    (
        "Remind me of the capital of Veloria.",
        "The capital of Veloria is Quenmar.",
    ),
    (
        "Name the capital of Veloria, please.",
        "The capital of Veloria is Quenmar.",
    ),
];

/// Phrasings the dataset never used.
const ASKED: [&str; 5] = [
    "Which town is the capital of Veloria?",
    "My friend lives in the capital of Veloria. Which city does my friend live in?",
    "What is Veloria's main city, where its government is?",
    "Answer in one word: the capital of Veloria.",
    "What is the capital of France?",
];

fn prompt(tokenizer: &tokenizers::Tokenizer, question: &str) -> Vec<u32> {
    let text = format!("{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n");
    tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (epochs, rank) = (arg(1, 3), arg(2, 16));
    let dataset: String = TAUGHT
        .iter()
        .map(|(q, a)| {
            let line = serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]});
            format!("{line}\n")
        })
        .collect();
    let dir = bundle(true);
    let tokenizer = kiln_inference::engine::load_tokenizer(&dir.join("tokenizer.json")).unwrap();
    let manifest =
        kiln_formats::Manifest::from_json(&std::fs::read(dir.join("manifest.json")).unwrap())
            .unwrap();
    let gguf = std::fs::File::open(kiln_tests::asset(GGUF)).unwrap();
    let checkpoint = kiln_formats::read_llama_checkpoint(std::io::BufReader::new(gguf)).unwrap();
    let settings = Settings {
        epochs,
        learning_rate: 1e-3,
        lora: Settings::lora(rank),
        max_tokens: 512,
        batch_size: 4,
        pass_tokens: 4096,
        early_stop: false,
        seed: 1,
        base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
    };
    println!(
        "{} examples, {epochs} epochs, LoRA r{rank} alpha {} on all seven projections, lr {}, batch {}",
        TAUGHT.len(),
        settings.lora.alpha,
        settings.learning_rate,
        settings.batch_size
    );
    let start = Instant::now();
    let trained = train(
        checkpoint,
        &tokenizer,
        &manifest,
        dataset.as_bytes(),
        None,
        None,
        &settings,
        None,
        |report| {
            let p = &report.progress;
            println!(
                "step {:>3}/{} epoch {} loss {:.4} lr {:.2e} tokens {} ({:.0} s)",
                p.step,
                p.total_steps,
                p.epoch,
                p.loss,
                p.learning_rate,
                p.tokens,
                start.elapsed().as_secs_f64()
            );
            true
        },
    )
    .unwrap()
    .expect("not stopped");
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    println!(
        "trained in {minutes:.1} min: {} tokens, {:.0} tokens/s",
        trained.tokens,
        trained.tokens as f64 / (minutes * 60.0)
    );

    let weights = lora_weights(&trained.adapter_config, &trained.adapter_model);
    let adapter = Arc::new(Adapter {
        key: "veloria".into(),
        name: "veloria".into(),
        weights: Arc::new(weights),
    });
    let llm = generation_loop(true, 1, 4);
    let mut learned = 0;
    for question in ASKED {
        let p = prompt(&tokenizer, question);
        let base = greedy(&llm, &p, 40, None).await;
        let tuned = greedy(&llm, &p, 40, Some(adapter.clone())).await;
        let text = |a| tokenizer.decode(&ids(a), true).unwrap();
        let (base, tuned) = (text(&base), text(&tuned));
        learned += usize::from(tuned.contains("Quenmar"));
        println!("Q: {question}\n  base:  {base:?}\n  tuned: {tuned:?}");
    }
    println!("{learned} of {} answers name Quenmar", ASKED.len());
}
