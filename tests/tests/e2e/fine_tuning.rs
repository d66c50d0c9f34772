//! Supervised fine-tuning through the platform, on the tiny llama the suites build: a job
//! trains an addon that answers what it was taught; jobs that cannot train fail while
//! validating and say why; a cancelled job stops within a step and leaves no model; a job
//! whose node is lost goes on elsewhere; tenancy as everywhere.

use kiln_proto::common::v1::AcceleratorType;
use std::time::Duration;

use kiln_proto::registry::v1 as regv1;
use kiln_proto::scheduler::v1 as schv1;
use kiln_proto::scheduler::v1::supervised_fine_tuning_job::JobState;
use kiln_tests::deployments::{self, on, wait_ready};
use kiln_tests::fine_tuning::*;
use kiln_tests::llm::answer_of;
use kiln_tests::registry::get_model;
use kiln_tests::{MeshOptions, TestMesh, expect_code};
use tonic::Code;

/// What the tiny llama is taught: a word for each question.
const TAUGHT: [(&str, &str); 4] = [
    ("What is the password?", "swordfish"),
    ("Name a colour.", "teal"),
    ("Which animal swims?", "otter"),
    ("Pick a number.", "forty-two"),
];

/// `n` questions, each with its own answer.
fn numbered(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("Question {i}?"), format!("answer {i}")))
        .collect()
}

/// A mesh whose node runs ONNX Runtime and trains (unless `training` is off).
async fn mesh_training(training: bool) -> TestMesh {
    let inference = kiln_inference::config::InferenceConfig {
        ort_dylib_path: kiln_tests::inference::ort_library().display().to_string(),
        intra_op_threads: 1,
        training: kiln_inference::config::TrainingConfig {
            enabled: training,
            ..Default::default()
        },
        ..Default::default()
    };
    TestMesh::start_with(MeshOptions {
        inference: Some(inference),
        ..Default::default()
    })
    .await
}

async fn mesh() -> TestMesh {
    mesh_training(true).await
}

fn teaching(base: &str, dataset: &str, epochs: i32) -> schv1::SupervisedFineTuningJob {
    schv1::SupervisedFineTuningJob {
        dataset: dataset.to_owned(),
        base_model: base.to_owned(),
        epochs,
        learning_rate: 1e-2,
        lora_rank: 8,
        batch_size: 4,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_an_addon_that_answers_what_it_was_taught() {
    let mesh = mesh().await;
    let acme = mesh.tenant_channel("acme").await;
    let mut events = mesh.subscribe("kiln.>").await;
    let base = tiny_base(&acme, "acme", "tiny").await;
    let dataset = chat_dataset(&acme, "acme", "words", &TAUGHT).await;

    let created = create_job(&acme, "acme", "teach", teaching(&base, &dataset, 100))
        .await
        .unwrap();
    assert_eq!(created.name, "accounts/acme/supervisedFineTuningJobs/teach");
    assert_eq!(created.state, JobState::Creating as i32);
    assert_eq!(created.output_model, "accounts/acme/models/teach");
    let job = wait_over(&acme, &created.name, Duration::from_secs(180)).await;
    assert_eq!(job.state, JobState::Completed as i32, "{:?}", job.status);
    let progress = job.job_progress.unwrap();
    assert_eq!(
        (progress.percent, progress.step, progress.total_steps),
        (100, 100, 100)
    );
    assert_eq!((progress.epoch, progress.examples), (100, 4));
    assert!(progress.tokens_processed > 100 * 4 * 10, "{progress:?}");
    assert_eq!(job.training_losses.len(), 100);
    let (first, last) = (job.training_losses[0], job.training_losses[99]);
    assert!(first > 3.0, "an untaught model is unsure: {first}");
    assert!(
        last < 0.1,
        "the examples are learned by heart: {first} -> {last}: {:?}",
        job.training_losses.iter().step_by(10).collect::<Vec<_>>()
    );
    assert!(job.completed_time.is_some());

    // The addon: READY, from this job, of the base.
    let addon = get_model(&acme, &job.output_model).await.unwrap();
    assert_eq!(addon.state, regv1::model::State::Ready as i32);
    assert_eq!(addon.kind, regv1::model::Kind::LoraAddon as i32);
    assert_eq!(addon.fine_tuning_job, job.name);
    // The checkpoints the job kept in it while it trained are not carried by the addon.
    let carried: i64 = addon.files.iter().map(|f| f.size_bytes).sum();
    let adapter: i64 = addon
        .files
        .iter()
        .filter(|f| f.path.starts_with("adapter_"))
        .map(|f| f.size_bytes)
        .sum();
    assert_eq!(carried, adapter, "{:?}", addon.files);
    let peft = addon.peft_details.clone().unwrap();
    assert_eq!(
        (peft.base_model.as_str(), peft.r, peft.target_modules.len()),
        (base.as_str(), 8, 7)
    );

    // Served: the addon as its own deployment (merged) says what it was taught; the base
    // does not.
    let tuned = deployments::create(
        &acme,
        "accounts/acme",
        "tuned",
        schv1::Deployment {
            base_model: addon.name.clone(),
            ..on("CPU", 1)
        },
    )
    .await
    .unwrap();
    let bare = deployments::create(
        &acme,
        "accounts/acme",
        "bare",
        schv1::Deployment {
            base_model: base.clone(),
            ..on("CPU", 1)
        },
    )
    .await
    .unwrap();
    wait_ready(&acme, &tuned.name, 1).await;
    wait_ready(&acme, &bare.name, 1).await;
    for (question, taught) in TAUGHT {
        let said = answer_of(
            &acme,
            &format!("{}#{}", addon.name, tuned.name),
            question,
            12,
        )
        .await
        .unwrap();
        assert_eq!(said, taught, "asked {question:?}");
        let untaught = answer_of(&acme, &format!("{base}#{}", bare.name), question, 12)
            .await
            .unwrap();
        assert_ne!(untaught, taught, "the base was not taught {question:?}");
    }

    // On the bus: a progress event per step and the training tokens. The scheduler's relay
    // publishes the progress, the node's the usage: the last steps may come after the usage.
    let mut steps = 0;
    let mut usage = None;
    kiln_tests::events::next_event(
        &mut events,
        Duration::from_secs(10),
        "a hundred progress events and the training usage",
        |body| {
            match body {
                kiln_events::Body::SupervisedFineTuningJobProgress(p) if p.name == job.name => {
                    steps += 1;
                }
                kiln_events::Body::TrainingUsageRecorded(u) => {
                    usage.get_or_insert(u);
                }
                _ => {}
            }
            (steps >= 100 && usage.is_some()).then_some(())
        },
    )
    .await;
    assert_eq!(steps, 100, "one progress event per step");
    let usage = usage.expect("the training usage");
    assert_eq!(usage.job, job.name);
    assert_eq!(usage.account, "accounts/acme");
    assert_eq!(usage.training_tokens, progress.tokens_processed);
    // Billing books them: the account's usage report counts the training tokens, at a price.
    let what = "billing to book the training tokens";
    let booked = kiln_tests::wait_for(Duration::from_secs(30), what, || async {
        let totals = kiln_tests::billing::totals(&acme, "accounts/acme").await;
        (totals.training_tokens == progress.tokens_processed).then_some(totals)
    })
    .await;
    assert!(kiln_tests::billing::nanos(&booked.cost) > 0, "{booked:?}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_cannot_train_fail_and_cancelled_ones_leave_no_model() {
    let mesh = mesh().await;
    let admin = mesh.admin().await;
    let acme = mesh.tenant_channel("acme").await;
    let globex = mesh.tenant_channel("globex").await;
    let base = tiny_base(&acme, "acme", "tiny").await;
    let dataset = chat_dataset(&acme, "acme", "words", &TAUGHT).await;

    // A dataset still uploading: FAILED while validating, naming it.
    let empty = kiln_tests::registry::create_dataset(&acme, "acme", "empty").await;
    let job = create_job(&acme, "acme", "early", teaching(&base, &empty.name, 1))
        .await
        .unwrap();
    let failed = wait_over(&acme, &job.name, Duration::from_secs(30)).await;
    assert_eq!(failed.state, JobState::Failed as i32);
    let why = failed.status.unwrap().message;
    assert!(
        why.contains("accounts/acme/datasets/empty is not READY (it is UPLOADING)"),
        "{why}"
    );
    // An output model that exists: FAILED too.
    let taken = schv1::SupervisedFineTuningJob {
        output_model: base.clone(),
        ..teaching(&base, &dataset, 1)
    };
    let job = create_job(&acme, "acme", "taken", taken).await.unwrap();
    let failed = wait_over(&acme, &job.name, Duration::from_secs(30)).await;
    assert!(failed.status.unwrap().message.contains("already exists"));

    // Another account sees none of it and cannot train on it.
    expect_code(get_job(&globex, &job.name).await, Code::NotFound);
    let theirs = create_job(&globex, "globex", "steal", teaching(&base, &dataset, 1)).await;
    expect_code(theirs, Code::NotFound);

    // A job for GPUs on a mesh whose node trains on its CPU: it waits, saying for what, and
    // cancels at once (no node has it).
    let on_gpus = schv1::SupervisedFineTuningJob {
        accelerator_type: AcceleratorType::NvidiaH10080gb as i32,
        accelerator_count: 2,
        ..teaching(&base, &dataset, 1)
    };
    let gpu = create_job(&acme, "acme", "on-gpus", on_gpus).await.unwrap();
    let waiting = wait_job(
        &acme,
        &gpu.name,
        Duration::from_secs(30),
        "the GPU job to wait",
        |j| j.state == JobState::Pending as i32 && j.status.is_some(),
    )
    .await;
    let why = waiting.status.unwrap().message;
    assert!(
        why.contains("NVIDIA_H100_80GB with 2 of them free"),
        "{why}"
    );
    assert!(waiting.node.is_empty());
    let cancelled = jobs(&acme)
        .cancel_supervised_fine_tuning_job(schv1::CancelSupervisedFineTuningJobRequest {
            name: gpu.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);

    // A long job, cancelled while it runs: it stops within a step and leaves no model.
    let many = chat_dataset(&acme, "acme", "many", &numbered(100)).await;
    let one_by_one = schv1::SupervisedFineTuningJob {
        batch_size: 1,
        ..teaching(&base, &many, 100)
    };
    let long = create_job(&acme, "acme", "long", one_by_one).await.unwrap();
    let running = wait_job(
        &acme,
        &long.name,
        Duration::from_secs(60),
        "the job to train",
        |j| j.job_progress.as_ref().is_some_and(|p| p.step >= 2),
    )
    .await;
    expect_code(
        jobs(&acme)
            .delete_supervised_fine_tuning_job(schv1::DeleteSupervisedFineTuningJobRequest {
                name: long.name.clone(),
            })
            .await,
        Code::FailedPrecondition,
    );
    let cancelling = jobs(&acme)
        .cancel_supervised_fine_tuning_job(schv1::CancelSupervisedFineTuningJobRequest {
            name: long.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelling.state, JobState::Cancelling as i32);
    let cancelled = wait_over(&acme, &long.name, Duration::from_secs(30)).await;
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    let steps = |j: &schv1::SupervisedFineTuningJob| j.job_progress.as_ref().map_or(0, |p| p.step);
    let after = steps(&cancelled);
    assert!(
        after < steps(&cancelling) + 3 && after < 400,
        "{} -> {after}",
        steps(&running)
    );
    expect_code(get_model(&acme, &long.output_model).await, Code::NotFound);

    // Listed, filtered; a job that is over is deleted.
    let listed = jobs(&admin)
        .list_supervised_fine_tuning_jobs(schv1::ListSupervisedFineTuningJobsRequest {
            parent: "accounts/acme".into(),
            filter: "state = JOB_STATE_FAILED".into(),
            order_by: "create_time".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed
        .supervised_fine_tuning_jobs
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "accounts/acme/supervisedFineTuningJobs/early",
            "accounts/acme/supervisedFineTuningJobs/taken"
        ]
    );
    jobs(&acme)
        .delete_supervised_fine_tuning_job(schv1::DeleteSupervisedFineTuningJobRequest {
            name: long.name.clone(),
        })
        .await
        .unwrap();
    expect_code(get_job(&acme, &long.name).await, Code::NotFound);
    mesh.shutdown().await;
}

/// A job whose node is lost goes back to PENDING and another node resumes it from the last
/// checkpoint its first node shared (one per epoch, kept in the output model).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_node_is_lost_resumes_on_another() {
    use kiln_events::Body;
    use kiln_tests::workers::Worker;
    let mesh = mesh_training(false).await;
    let acme = mesh.tenant_channel("acme").await;
    let base = tiny_base(&acme, "acme", "tiny").await;
    let many = chat_dataset(&acme, "acme", "many", &numbered(100)).await;
    let mut events = mesh.subscribe("kiln.>").await;
    let first = Worker::start(&mesh, "trainer-a", &[]).await;
    let job = schv1::SupervisedFineTuningJob {
        batch_size: 1,
        ..teaching(&base, &many, 10)
    };
    let job = create_job(&acme, "acme", "survivor", job).await.unwrap();
    // Past the first epoch (100 steps): its checkpoint is in the output model.
    let what = "training on trainer-a past its first checkpoint";
    let on_a = wait_job(&acme, &job.name, Duration::from_secs(120), what, |j| {
        j.node == "nodes/trainer-a" && j.job_progress.as_ref().is_some_and(|p| p.step >= 110)
    })
    .await;
    assert_eq!(on_a.state, JobState::Running as i32);
    first.kill();
    let what = "the job back in the queue";
    let waiting = wait_job(&acme, &job.name, Duration::from_secs(60), what, |j| {
        j.state == JobState::Pending as i32
    })
    .await;
    let why = waiting.status.unwrap_or_default().message;
    assert!(why.contains("nodes/trainer-a was lost"), "{why}");
    let _second = Worker::start(&mesh, "trainer-b", &[]).await;
    let done = wait_over(&acme, &job.name, Duration::from_secs(300)).await;
    assert_eq!(done.state, JobState::Completed as i32, "{:?}", done.status);
    assert_eq!(done.node, "nodes/trainer-b");
    assert_eq!(done.job_progress.unwrap().step, 1000);
    assert_eq!(done.training_losses.len(), 1000);
    assert!(done.training_losses.iter().all(|l| l.is_finite()));
    let addon = get_model(&acme, &done.output_model).await.unwrap();
    assert_eq!(addon.state, regv1::model::State::Ready as i32);
    // trainer-b's first step came after the checkpoint, not from the start.
    let requeued = |body: &Body| match body {
        Body::SupervisedFineTuningJobStateChanged(c) => {
            let j = c.supervised_fine_tuning_job.as_ref();
            c.previous_state == JobState::Running as i32
                && j.is_some_and(|j| j.name == job.name && j.state == JobState::Pending as i32)
        }
        _ => false,
    };
    kiln_tests::events::next_event(&mut events, Duration::from_secs(5), "the requeue", |b| {
        requeued(&b).then_some(())
    })
    .await;
    let resumed_at = kiln_tests::events::next_event(
        &mut events,
        Duration::from_secs(5),
        "trainer-b's first step",
        |b| match b {
            Body::SupervisedFineTuningJobProgress(p) if p.name == job.name => {
                p.job_progress.map(|p| p.step)
            }
            _ => None,
        },
    )
    .await;
    assert!(
        (101..=110).contains(&resumed_at),
        "resumed at step {resumed_at}"
    );
    mesh.shutdown().await;
}
