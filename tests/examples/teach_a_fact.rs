//! Teaches SmolLM2-135M-Instruct a made-up fact through the platform, as a user would: the
//! mesh in-process with the public library, a chat dataset uploaded, a supervised fine-tuning
//! job created and followed to COMPLETED, its addon deployed on a deployment of the base that
//! takes addons, then asked in ways the dataset never used, beside the bare base. Minutes of
//! CPU: not in the suite.
//!
//! `cargo run --release -p kiln-tests --example teach_a_fact -- [epochs] [rank]`

use std::time::{Duration, Instant};

use kiln_proto::scheduler::v1 as schv1;
use kiln_proto::scheduler::v1::supervised_fine_tuning_job::JobState;
use kiln_tests::fine_tuning::{chat_dataset, create_job, get_job};
use kiln_tests::llm::{SMOLLM2, answer_of, first_chat, smollm2_asset_dir};
use kiln_tests::lora::deploy_with_addons;

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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |i: usize, default: i32| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (epochs, rank) = (arg(1, 3), arg(2, 16));
    let assets = smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let acme = mesh.tenant_channel("acme").await;
    first_chat(&acme, "Hi", 1, Duration::from_secs(600)).await;
    let dataset = chat_dataset(&acme, "acme", "veloria", &TAUGHT).await;
    let job = schv1::SupervisedFineTuningJob {
        dataset,
        base_model: SMOLLM2.into(),
        epochs,
        learning_rate: 1e-3,
        lora_rank: rank,
        batch_size: 4,
        ..Default::default()
    };
    println!(
        "{} examples, {epochs} epochs, LoRA r{rank} (alpha 2r) on all seven projections, lr 1e-3, batch 4",
        TAUGHT.len()
    );
    let start = Instant::now();
    let job = create_job(&acme, "acme", "veloria", job)
        .await
        .expect("created");
    let mut shown = 0;
    let done = loop {
        let now = get_job(&acme, &job.name).await.expect("the job");
        for (i, loss) in now.training_losses.iter().enumerate().skip(shown) {
            println!(
                "step {:>3} loss {loss:.4} ({:.0} s)",
                i + 1,
                start.elapsed().as_secs_f64()
            );
        }
        shown = now.training_losses.len();
        let over = [JobState::Completed, JobState::Failed, JobState::Cancelled];
        if over.iter().any(|s| *s as i32 == now.state) {
            break now;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(done.state, JobState::Completed as i32, "{:?}", done.status);
    let progress = done.job_progress.unwrap_or_default();
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    println!(
        "COMPLETED in {minutes:.1} min (created to completed): {} tokens; addon {}",
        progress.tokens_processed, done.output_model
    );

    let base = deploy_with_addons(&acme, "chat").await;
    let deployed = kiln_tests::deployments::create_deployed_model(
        &acme,
        "acme",
        "veloria-on-chat",
        &done.output_model,
        &base.name,
    )
    .await
    .expect("deployed");
    let tuned_name = deployed.name.clone();
    kiln_tests::wait_for_ok(Duration::from_secs(120), "the addon to answer", || {
        answer_of(&acme, &tuned_name, "Hi", 1)
    })
    .await;
    let mut learned = 0;
    for question in ASKED {
        let base_model = format!("{SMOLLM2}#{}", base.name);
        let untaught = answer_of(&acme, &base_model, question, 40)
            .await
            .expect("an answer");
        let taught = answer_of(&acme, &tuned_name, question, 40)
            .await
            .expect("an answer");
        learned += usize::from(question.contains("Veloria") && taught.contains("Quenmar"));
        println!("Q: {question}\n  base:  {untaught:?}\n  tuned: {taught:?}");
    }
    let about = ASKED.iter().filter(|q| q.contains("Veloria")).count();
    println!(
        "{learned} of the {about} answers about Veloria name Quenmar (the last question is a control)"
    );
    mesh.shutdown().await;
}
