//! The pure halves of fine-tuning: a create request's checks and defaults, and the decision on
//! what the job names.

use kiln_core::auth::{Principal, Role};
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::registry::v1::{BaseModelDetails, Dataset, Model, PeftDetails, PreparedBundle};
use kiln_proto::registry::v1::{base_model_details, dataset, model, prepared_bundle};
use kiln_proto::scheduler::v1::supervised_fine_tuning_job::JobState;
use tonic::Code;

use super::request::{Inputs, check_inputs, new_job};
use super::*;

/// A user of account `acme`.
fn acme() -> Principal {
    Principal {
        account: "acme".into(),
        user: "ann".into(),
        api_key: "accounts/acme/users/ann/apiKeys/k".into(),
        roles: vec![Role::User],
        suspend_state: 0,
    }
}

fn job() -> SupervisedFineTuningJob {
    SupervisedFineTuningJob {
        dataset: "accounts/acme/datasets/chats".into(),
        base_model: "accounts/kiln/models/smollm2".into(),
        ..Default::default()
    }
}

fn create(
    parent: &str,
    id: &str,
    job: Option<SupervisedFineTuningJob>,
) -> Result<SupervisedFineTuningJob, Error> {
    let request = CreateSupervisedFineTuningJobRequest {
        parent: parent.into(),
        supervised_fine_tuning_job_id: id.into(),
        supervised_fine_tuning_job: job,
    };
    new_job(&acme(), request, || "generated".into())
}

fn status(result: Result<SupervisedFineTuningJob, Error>) -> (Code, String) {
    let status = tonic::Status::from(result.expect_err("refused"));
    (status.code(), status.message().to_owned())
}

#[test]
fn a_new_job_gets_its_name_defaults_and_output_model() {
    let made = create("accounts/acme", "tune-1", Some(job())).unwrap();
    assert_eq!(made.name, "accounts/acme/supervisedFineTuningJobs/tune-1");
    assert_eq!(made.state, JobState::Creating as i32);
    assert_eq!(made.output_model, "accounts/acme/models/tune-1");
    assert_eq!((made.epochs, made.lora_rank, made.batch_size), (1, 8, 8));
    assert_eq!(made.learning_rate, 1e-4);
    assert_eq!(made.lora_alpha, 16.0);
    assert_eq!(made.target_modules.len(), 7);
    assert_eq!(made.created_by, "accounts/acme/users/ann");
    // Unset: the CPU; a GPU type: one device unless told.
    assert_eq!(
        (made.accelerator_type, made.accelerator_count),
        (AcceleratorType::Cpu as i32, 0)
    );
    let gpu = SupervisedFineTuningJob {
        accelerator_type: AcceleratorType::NvidiaH10080gb as i32,
        accelerator_indices: vec![5],
        ..job()
    };
    let made_gpu = create("accounts/acme", "tune-2", Some(gpu)).unwrap();
    assert_eq!(made_gpu.accelerator_count, 1);
    assert!(made_gpu.accelerator_indices.is_empty(), "output only");
    // Bare IDs are the caller's; without an ID one is generated.
    let bare = SupervisedFineTuningJob {
        dataset: "chats".into(),
        output_model: "mine".into(),
        lora_rank: 16,
        target_modules: vec!["v_proj".into(), "q_proj".into(), "v_proj".into()],
        ..job()
    };
    let made = create("accounts/acme", "", Some(bare)).unwrap();
    assert_eq!(
        made.name,
        "accounts/acme/supervisedFineTuningJobs/generated"
    );
    assert_eq!(made.dataset, "accounts/acme/datasets/chats");
    assert_eq!(made.output_model, "accounts/acme/models/mine");
    assert_eq!(made.lora_alpha, 32.0);
    assert_eq!(made.target_modules, ["v_proj", "q_proj"]);
}

#[test]
fn create_checks_the_parent_and_its_tenancy_first() {
    let (code, message) = status(create("acme/x", "", Some(job())));
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.starts_with("parent:"), "{message}");
    let (code, message) = status(create("accounts/other", "", Some(job())));
    assert_eq!(code, Code::NotFound);
    assert!(message.contains("accounts/other"), "{message}");
    // Another account's dataset is as absent as a missing one.
    let theirs = SupervisedFineTuningJob {
        dataset: "accounts/other/datasets/chats".into(),
        ..job()
    };
    assert_eq!(
        status(create("accounts/acme", "", Some(theirs))).0,
        Code::NotFound
    );
}

#[test]
fn create_names_the_field_it_refuses() {
    let field = |parent: &str, id: &str, job| {
        let (code, message) = status(create(parent, id, job));
        assert_eq!(code, Code::InvalidArgument, "{message}");
        message.split(':').next().unwrap_or_default().to_owned()
    };
    assert_eq!(
        field("accounts/acme", "Bad_ID", Some(job())),
        "supervised_fine_tuning_job_id"
    );
    assert_eq!(
        field("accounts/acme", "", None),
        "supervised_fine_tuning_job"
    );
    type Edit = fn(&mut SupervisedFineTuningJob);
    let cases: [(&str, Edit); 16] = [
        ("dataset", |j| j.dataset.clear()),
        ("base_model", |j| j.base_model.clear()),
        ("dataset", |j| {
            j.dataset = "accounts/acme/models/chats".into()
        }),
        ("evaluation_dataset", |j| {
            j.evaluation_dataset = "a/b".into()
        }),
        ("output_model", |j| {
            j.output_model = "accounts/acme/models/Not An ID".into()
        }),
        ("output_model", |j| {
            j.output_model = "accounts/other/models/x".into()
        }),
        ("display_name", |j| j.display_name = "x".repeat(257)),
        ("epochs", |j| j.epochs = 101),
        ("lora_rank", |j| j.lora_rank = 2),
        ("batch_size", |j| j.batch_size = -1),
        ("learning_rate", |j| j.learning_rate = 2.0),
        ("lora_alpha", |j| j.lora_alpha = -1.0),
        ("target_modules[1]", |j| {
            j.target_modules = vec!["q_proj".into(), "lm_head".into()]
        }),
        ("accelerator_type", |j| j.accelerator_type = 999),
        ("accelerator_count", |j| j.accelerator_count = 2),
        ("accelerator_count", |j| {
            j.accelerator_type = AcceleratorType::NvidiaH10080gb as i32;
            j.accelerator_count = 9;
        }),
    ];
    for (name, edit) in cases {
        let mut bad = job();
        edit(&mut bad);
        assert_eq!(
            field("accounts/acme", "", Some(bad)),
            format!("supervised_fine_tuning_job.{name}")
        );
    }
}

fn ready_dataset() -> Dataset {
    Dataset {
        name: "accounts/acme/datasets/chats".into(),
        state: dataset::State::Ready as i32,
        format: dataset::Format::Chat as i32,
        example_count: 10,
        ..Default::default()
    }
}

fn tunable_base() -> Model {
    Model {
        name: "accounts/kiln/models/smollm2".into(),
        kind: model::Kind::BaseModel as i32,
        state: model::State::Ready as i32,
        base_model_details: Some(BaseModelDetails {
            tunable: true,
            checkpoint_format: base_model_details::CheckpointFormat::Gguf as i32,
            ..Default::default()
        }),
        prepared_bundles: vec![PreparedBundle {
            state: prepared_bundle::State::Ready as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn inputs() -> Inputs {
    Inputs {
        dataset: Some(ready_dataset()),
        evaluation_dataset: None,
        base_model: Some(tunable_base()),
        warm_start_from: None,
        output_taken: false,
    }
}

#[test]
fn what_the_job_names_decides_whether_it_can_train() {
    let j = create("accounts/acme", "tune-1", Some(job())).unwrap();
    assert_eq!(
        check_inputs(&j, &inputs()).unwrap(),
        "accounts/kiln/models/smollm2"
    );

    type Edit = fn(&mut Inputs);
    let cases: [(&str, Edit); 8] = [
        ("has no prepared bundle", |i| {
            i.base_model.as_mut().unwrap().prepared_bundles.clear()
        }),
        ("dataset accounts/acme/datasets/chats was not found", |i| {
            i.dataset = None
        }),
        ("is not READY (it is UPLOADING)", |i| {
            i.dataset.as_mut().unwrap().state = dataset::State::Uploading as i32
        }),
        ("neither a chat nor a completion dataset", |i| {
            i.dataset.as_mut().unwrap().format = 0
        }),
        (
            "base model accounts/kiln/models/smollm2 was not found",
            |i| i.base_model = None,
        ),
        ("cannot be fine-tuned", |i| {
            let details = i
                .base_model
                .as_mut()
                .unwrap()
                .base_model_details
                .as_mut()
                .unwrap();
            details.checkpoint_format = base_model_details::CheckpointFormat::Onnx as i32;
        }),
        ("is not a base model", |i| {
            i.base_model.as_mut().unwrap().kind = model::Kind::LoraAddon as i32
        }),
        (
            "output model accounts/acme/models/tune-1 already exists",
            |i| i.output_taken = true,
        ),
    ];
    for (why, edit) in cases {
        let mut given = inputs();
        edit(&mut given);
        let problem = check_inputs(&j, &given).unwrap_err();
        assert!(problem.contains(why), "{problem} (expected {why:?})");
    }
}

#[test]
fn a_warm_start_trains_on_its_addons_base() {
    let warm = SupervisedFineTuningJob {
        base_model: String::new(),
        warm_start_from: "accounts/acme/models/adapter".into(),
        ..job()
    };
    let j = create("accounts/acme", "tune-2", Some(warm)).unwrap();
    let addon = Model {
        name: "accounts/acme/models/adapter".into(),
        kind: model::Kind::LoraAddon as i32,
        state: model::State::Ready as i32,
        peft_details: Some(PeftDetails {
            base_model: "accounts/kiln/models/smollm2".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let with_addon = || Inputs {
        warm_start_from: Some(addon.clone()),
        ..inputs()
    };
    assert_eq!(
        check_inputs(&j, &with_addon()).unwrap(),
        "accounts/kiln/models/smollm2"
    );
    let other_base = SupervisedFineTuningJob {
        base_model: "accounts/acme/models/other".into(),
        ..j.clone()
    };
    let problem = check_inputs(&other_base, &with_addon()).unwrap_err();
    assert!(
        problem.contains("not of base_model accounts/acme/models/other"),
        "{problem}"
    );
    let problem = check_inputs(&j, &inputs()).unwrap_err();
    assert!(
        problem.contains("warm_start_from accounts/acme/models/adapter was not found"),
        "{problem}"
    );
}

#[test]
fn only_completed_failed_and_cancelled_jobs_are_over() {
    let over: Vec<JobState> = [
        JobState::Creating,
        JobState::Validating,
        JobState::Pending,
        JobState::Running,
        JobState::WritingResults,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelling,
        JobState::Cancelled,
    ]
    .into_iter()
    .filter(|s| is_final(*s as i32))
    .collect();
    assert_eq!(
        over,
        [JobState::Completed, JobState::Failed, JobState::Cancelled]
    );
}

#[test]
fn a_resumed_run_rewrites_the_history_from_where_it_resumed() {
    let mut history = Vec::new();
    jobs::merge_history(&mut history, vec![5.0, 4.0, 3.0], 3);
    assert_eq!(history, [5.0, 4.0, 3.0]);
    jobs::merge_history(&mut history, vec![5.0, 4.0, 3.0, 2.5], 4);
    assert_eq!(history, [5.0, 4.0, 3.0, 2.5]);
    // Resumed at step 3 (from a checkpoint after step 2) on another node.
    jobs::merge_history(&mut history, vec![2.9], 3);
    assert_eq!(history, [5.0, 4.0, 2.9]);
    jobs::merge_history(&mut history, vec![], 9);
    assert_eq!(history, [5.0, 4.0, 2.9]);
}
