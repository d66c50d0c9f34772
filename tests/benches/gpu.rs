//! The GPU check (`bash tests/gpu/run.sh`, which finds or installs the `onnxruntime-gpu`
//! library and runs this): MiniLM and SmolLM2 served through Kiln's gRPC API on ONNX
//! Runtime's CUDA provider, then on its CPU provider with the same float32 bundles, in one run.
//! The outputs are compared (embeddings by cosine, greedy chat answers by their first words)
//! and embeddings/s (32 clients) and decode tokens/s (1 and 16 streams) are printed.
//!
//! It fails loudly when CUDA is not used: the inference node registers the CUDA provider with
//! `error_on_failure` (no quiet fallback to the CPU), and this process must hold memory on the
//! GPU (`nvidia-smi`) while the models serve.
//! `KILN_ORT_GPU_LIBRARY=/path/libonnxruntime.so cargo bench -p kiln-tests --bench gpu [-- SECONDS]`

use std::time::{Duration, Instant};

use kiln_inference::config::InferenceConfig;
use kiln_tests::bench::{Args, block_on, measure};
use kiln_tests::inference::{MINILM, cosine, embed, first_embeddings};
use kiln_tests::llm::{answer_text, chat, first_chat, timed_stream};

const QUESTIONS: [&str; 4] = [
    "What is the capital of Japan?",
    "Explain how a bicycle works.",
    "Write a haiku about the sea.",
    "List three uses of copper.",
];

/// What one provider answered and how fast.
struct Run {
    embeddings: Vec<Vec<f32>>,
    answers: Vec<String>,
    embeddings_per_s: f64,
    /// (streams, decode tokens/s)
    tokens_per_s: Vec<(usize, f64)>,
    /// MiB this process held on the GPU while serving (None: not listed by nvidia-smi).
    gpu_mib: Option<u64>,
}

/// The GPU memory `nvidia-smi` lists for this process.
fn gpu_memory_of_this_process() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let pid = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (p, mib) = line.split_once(',')?;
            (p.trim() == pid).then(|| mib.trim().parse().ok())?
        })
}

async fn run_on(assets: &std::path::Path, inference: InferenceConfig, seconds: u64) -> Run {
    let mesh = kiln_tests::library_mesh(assets, Some(inference)).await;
    let ch = mesh.tenant_channel("gpu").await;
    let sentences: Vec<String> = kiln_tests::inference::reference().sentences[..8].to_vec();
    let long = Duration::from_secs(900);
    first_embeddings(&ch, MINILM, &sentences[..1], long).await;
    first_chat(&ch, QUESTIONS[0], 2, long).await;

    let embedded = embed(&ch, MINILM, &sentences).await.unwrap();
    let embeddings = embedded.data.into_iter().map(|e| e.embedding).collect();
    let mut answers = Vec::new();
    for question in QUESTIONS {
        let answer = chat(&ch, question, 32).await.unwrap();
        answers.push(answer_text(&answer).to_owned());
    }
    let gpu_mib = gpu_memory_of_this_process();

    let one = sentences[..1].to_vec();
    let calls = {
        let ch = ch.clone();
        move || {
            let (ch, one) = (ch.clone(), one.clone());
            async move {
                embed(&ch, MINILM, &one).await.unwrap();
            }
        }
    };
    let embeddings_per_s = measure(seconds, 32, calls).await;
    let mut tokens_per_s = Vec::new();
    for streams in [1usize, 16] {
        let start = Instant::now();
        let tokens: usize = futures::future::join_all(
            (0..streams).map(|i| timed_stream(ch.clone(), QUESTIONS[i % QUESTIONS.len()], 128)),
        )
        .await
        .into_iter()
        .map(|(_, tokens)| tokens)
        .sum();
        tokens_per_s.push((streams, tokens as f64 / start.elapsed().as_secs_f64()));
    }
    mesh.shutdown().await;
    Run {
        embeddings,
        answers,
        embeddings_per_s,
        tokens_per_s,
        gpu_mib,
    }
}

/// The first `n` words of `text`.
fn first_words(text: &str, n: usize) -> Vec<&str> {
    text.split_whitespace().take(n).collect()
}

fn main() {
    let args = Args::from_env();
    let seconds: u64 = args.get(0, 10);
    let library = std::env::var("KILN_ORT_GPU_LIBRARY")
        .expect("KILN_ORT_GPU_LIBRARY: the onnxruntime-gpu library (tests/gpu/run.sh sets it)");
    block_on(None, async move {
        let assets = kiln_tests::asset_dir_with(&["all-minilm-l6-v2", "smollm2-135m-instruct"]);
        let cuda = InferenceConfig {
            backend: "onnxruntime".into(),
            ort_dylib_path: library,
            device: "cuda".into(),
            max_sequences: 16,
            ..Default::default()
        };
        let gpu = run_on(assets.path(), cuda, seconds).await;
        // The same float32 bundles on the CPU (INT4 serves only there).
        let cpu = InferenceConfig {
            backend: "onnxruntime".into(),
            prefer_int4: false,
            max_sequences: 16,
            ..Default::default()
        };
        let cpu = run_on(assets.path(), cpu, seconds).await;

        let mut failures = Vec::new();
        match gpu.gpu_mib {
            Some(mib) if mib > 0 => println!("GPU memory held while serving: {mib} MiB"),
            _ => {
                failures.push("nvidia-smi lists no GPU memory of this process: CUDA unused".into())
            }
        }
        let worst = gpu
            .embeddings
            .iter()
            .zip(&cpu.embeddings)
            .map(|(g, c)| cosine(g, c))
            .fold(1f32, f32::min);
        println!("MiniLM embeddings, CUDA against CPU: lowest cosine {worst:.6}");
        if worst < 0.999 {
            failures.push(format!("embeddings differ: cosine {worst}"));
        }
        for (question, (g, c)) in QUESTIONS.iter().zip(gpu.answers.iter().zip(&cpu.answers)) {
            // Greedy decoding on other hardware may part at a near-tie, never at the start.
            let agree = first_words(g, 5) == first_words(c, 5);
            println!("{question}\n  CUDA: {g:?}\n  CPU:  {c:?}");
            if !agree {
                failures.push(format!("answers to {question:?} differ from the start"));
            }
        }
        println!("                        CUDA      CPU (float32, same threads)");
        println!(
            "embeddings/s (32 clients) {:>8.0} {:>8.0}",
            gpu.embeddings_per_s, cpu.embeddings_per_s
        );
        for ((streams, g), (_, c)) in gpu.tokens_per_s.iter().zip(&cpu.tokens_per_s) {
            println!("tokens/s, {streams:>2} streams      {g:>8.1} {c:>8.1}");
        }
        if !failures.is_empty() {
            eprintln!("GPU CHECK FAILED:\n  {}", failures.join("\n  "));
            std::process::exit(1);
        }
        println!("GPU check passed");
    });
}
