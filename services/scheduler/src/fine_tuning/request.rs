//! What a new job must be, decided without I/O: the request's shape and defaults
//! ([`new_job`]), then, once the scheduler has read what the job names from the registry,
//! whether it can train ([`check_inputs`]).

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::names::{ChildName, validate_display_name, validate_id};
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::registry::v1::{
    Dataset, Model, base_model_details, dataset, model, prepared_bundle,
};
use kiln_proto::scheduler::v1::supervised_fine_tuning_job::JobState;
use kiln_proto::scheduler::v1::{CreateSupervisedFineTuningJobRequest, SupervisedFineTuningJob};

pub(crate) const JOBS: &str = "supervisedFineTuningJobs";

/// The hyper-parameters' defaults and bounds.
pub(crate) const DEFAULT_EPOCHS: i32 = 1;
pub(crate) const MAX_EPOCHS: i32 = 100;
pub(crate) const DEFAULT_LEARNING_RATE: f32 = 1e-4;
pub(crate) const DEFAULT_LORA_RANK: i32 = 8;
pub(crate) const DEFAULT_BATCH_SIZE: i32 = 8;
pub(crate) const MAX_BATCH_SIZE: i32 = 1024;
/// GPUs one job may train on (one node's).
pub(crate) const MAX_ACCELERATORS: i32 = 8;
/// The LoRA ranks the platform serves.
const LORA_RANKS: std::ops::RangeInclusive<i32> =
    (*kiln_formats::LORA_RANKS.start() as i32)..=(*kiln_formats::LORA_RANKS.end() as i32);
/// The projections an adapter may train.
const TARGET_MODULES: [&str; 7] = kiln_formats::LORA_MODULE_NAMES;

/// Whether a job in `state` is over (it runs no more and may be deleted).
pub(crate) fn is_final(state: i32) -> bool {
    [JobState::Completed, JobState::Failed, JobState::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

/// The job a create request asks for, checked field by field (INVALID_ARGUMENT naming the
/// field), with its name and defaults filled in; `generated_id` when the request has none.
pub(crate) fn new_job(
    caller: &Principal,
    r: CreateSupervisedFineTuningJobRequest,
    generated_id: impl FnOnce() -> String,
) -> Result<SupervisedFineTuningJob, Error> {
    let parent = caller.own_parent(&r.parent)?;
    let id = if r.supervised_fine_tuning_job_id.is_empty() {
        generated_id()
    } else {
        validate_id(
            "supervised_fine_tuning_job_id",
            &r.supervised_fine_tuning_job_id,
        )?;
        r.supervised_fine_tuning_job_id
    };
    let mut job = r
        .supervised_fine_tuning_job
        .ok_or_else(|| Error::invalid("supervised_fine_tuning_job", "is required"))?;
    let field = |name: &str| format!("supervised_fine_tuning_job.{name}");
    validate_display_name(&field("display_name"), &job.display_name)?;
    if job.dataset.is_empty() {
        return Err(Error::invalid(field("dataset"), "is required"));
    }
    if job.base_model.is_empty() && job.warm_start_from.is_empty() {
        return Err(Error::invalid(
            field("base_model"),
            "is required (unless warm_start_from names an addon to continue)",
        ));
    }
    let account = &parent.account;
    if job.output_model.is_empty() {
        job.output_model = format!("accounts/{account}/models/{id}");
    }
    for (name, collection, value) in [
        ("dataset", "datasets", &mut job.dataset),
        (
            "evaluation_dataset",
            "datasets",
            &mut job.evaluation_dataset,
        ),
        ("base_model", "models", &mut job.base_model),
        ("warm_start_from", "models", &mut job.warm_start_from),
        ("output_model", "models", &mut job.output_model),
    ] {
        if !value.is_empty() {
            // Bare IDs are the caller's; full names are kept as given.
            *value = ChildName::parse(&field(name), collection, value, Some(account))?.to_string();
        }
    }
    // Datasets are only ever the caller's: another account's is as absent as a missing one.
    for value in [&job.dataset, &job.evaluation_dataset] {
        if !value.is_empty() && !value.starts_with(&format!("accounts/{account}/")) {
            return Err(Error::not_found(value));
        }
    }
    if !job
        .output_model
        .starts_with(&format!("accounts/{account}/"))
    {
        return Err(Error::invalid(
            field("output_model"),
            format!("must be a model of accounts/{account}"),
        ));
    }
    let int = |name: &str, value: &mut i32, default: i32, range: std::ops::RangeInclusive<i32>| {
        if *value == 0 {
            *value = default;
        }
        if range.contains(value) {
            Ok(())
        } else {
            Err(Error::invalid(
                field(name),
                format!(
                    "must be between {} and {}, got {value}",
                    range.start(),
                    range.end()
                ),
            ))
        }
    };
    int("epochs", &mut job.epochs, DEFAULT_EPOCHS, 1..=MAX_EPOCHS)?;
    int(
        "lora_rank",
        &mut job.lora_rank,
        DEFAULT_LORA_RANK,
        LORA_RANKS,
    )?;
    int(
        "batch_size",
        &mut job.batch_size,
        DEFAULT_BATCH_SIZE,
        1..=MAX_BATCH_SIZE,
    )?;
    int(
        "max_context_length",
        &mut job.max_context_length,
        0,
        0..=1 << 20,
    )?;
    if job.learning_rate == 0.0 {
        job.learning_rate = DEFAULT_LEARNING_RATE;
    }
    match AcceleratorType::try_from(job.accelerator_type) {
        Err(_) => {
            return Err(Error::invalid(
                field("accelerator_type"),
                format!("{} is not an accelerator type", job.accelerator_type),
            ));
        }
        Ok(AcceleratorType::Unspecified | AcceleratorType::Cpu) => {
            job.accelerator_type = AcceleratorType::Cpu as i32;
            if job.accelerator_count != 0 {
                return Err(Error::invalid(
                    field("accelerator_count"),
                    "is for GPUs: a job on CPU trains on its node's cores",
                ));
            }
        }
        Ok(_) => int(
            "accelerator_count",
            &mut job.accelerator_count,
            1,
            1..=MAX_ACCELERATORS,
        )?,
    }
    job.accelerator_indices.clear();
    if !(job.learning_rate > 0.0 && job.learning_rate <= 1.0) {
        return Err(Error::invalid(
            field("learning_rate"),
            format!("must be in (0, 1], got {}", job.learning_rate),
        ));
    }
    if job.lora_alpha == 0.0 {
        job.lora_alpha = 2.0 * job.lora_rank as f32;
    }
    if !(job.lora_alpha.is_finite() && job.lora_alpha > 0.0) {
        return Err(Error::invalid(field("lora_alpha"), "must be positive"));
    }
    if job.target_modules.is_empty() {
        job.target_modules = TARGET_MODULES.map(String::from).to_vec();
    }
    for (i, m) in job.target_modules.iter().enumerate() {
        if !TARGET_MODULES.contains(&m.as_str()) {
            return Err(Error::invalid(
                format!("{}[{i}]", field("target_modules")),
                format!("{m:?} is not one of {}", TARGET_MODULES.join(", ")),
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    job.target_modules.retain(|m| seen.insert(m.clone()));
    // What the caller does not set.
    let now = crate::time::now();
    Ok(SupervisedFineTuningJob {
        name: format!("{parent}/{JOBS}/{id}"),
        create_time: Some(now),
        update_time: Some(now),
        state: JobState::Creating as i32,
        status: None,
        created_by: caller.creator(),
        completed_time: None,
        job_progress: None,
        node: String::new(),
        training_losses: Vec::new(),
        evaluation_losses: Vec::new(),
        ..job
    })
}

/// What a job's inputs are, as the registry has them (None: not found or not the caller's).
pub(crate) struct Inputs {
    pub dataset: Option<Dataset>,
    pub evaluation_dataset: Option<Dataset>,
    pub base_model: Option<Model>,
    pub warm_start_from: Option<Model>,
    /// Whether a model already has the output model's name.
    pub output_taken: bool,
}

/// Whether the job can train on `inputs`: the base model it trains on (a warm start's base
/// when it names none), or why not, as its FAILED status says it.
pub(crate) fn check_inputs(
    job: &SupervisedFineTuningJob,
    inputs: &Inputs,
) -> Result<String, String> {
    check_dataset("dataset", &job.dataset, inputs.dataset.as_ref())?;
    if !job.evaluation_dataset.is_empty() {
        check_dataset(
            "evaluation dataset",
            &job.evaluation_dataset,
            inputs.evaluation_dataset.as_ref(),
        )?;
    }
    let mut base_name = job.base_model.clone();
    if !job.warm_start_from.is_empty() {
        let addon = inputs
            .warm_start_from
            .as_ref()
            .ok_or_else(|| format!("warm_start_from {} was not found", job.warm_start_from))?;
        if addon.kind != model::Kind::LoraAddon as i32 || addon.state != model::State::Ready as i32
        {
            return Err(format!(
                "warm_start_from {} is not a READY LoRA addon",
                addon.name
            ));
        }
        let its_base = addon.peft_details.as_ref().map(|p| p.base_model.clone());
        let its_base = its_base.unwrap_or_default();
        if !base_name.is_empty() && base_name != its_base {
            return Err(format!(
                "warm_start_from {} is an addon of {its_base}, not of base_model {base_name}",
                addon.name
            ));
        }
        base_name = its_base;
    }
    let base = inputs
        .base_model
        .as_ref()
        .ok_or_else(|| format!("base model {base_name} was not found"))?;
    let details = base.base_model_details.clone().unwrap_or_default();
    if base.kind != model::Kind::BaseModel as i32 {
        return Err(format!("{} is not a base model", base.name));
    }
    if base.state != model::State::Ready as i32 {
        return Err(format!("base model {} is not READY", base.name));
    }
    if !details.tunable
        || details.checkpoint_format != base_model_details::CheckpointFormat::Gguf as i32
    {
        return Err(format!(
            "base model {} cannot be fine-tuned: Kiln trains LoRA addons of llama-family GGUF \
             checkpoints",
            base.name
        ));
    }
    let prepared = prepared_bundle::State::Ready as i32;
    if !base.prepared_bundles.iter().any(|b| b.state == prepared) {
        return Err(format!(
            "base model {} has no prepared bundle (its tokenizer and chat template): prepare it first",
            base.name
        ));
    }
    if inputs.output_taken {
        return Err(format!("output model {} already exists", job.output_model));
    }
    Ok(base.name.clone())
}

fn check_dataset(what: &str, name: &str, dataset: Option<&Dataset>) -> Result<(), String> {
    let dataset = dataset.ok_or_else(|| format!("{what} {name} was not found"))?;
    if dataset.state != dataset::State::Ready as i32 {
        let state = dataset::State::try_from(dataset.state)
            .map(|s| s.as_str_name())
            .unwrap_or("UNSPECIFIED");
        return Err(format!("{what} {name} is not READY (it is {state})"));
    }
    let format = dataset.format;
    if format != dataset::Format::Chat as i32 && format != dataset::Format::Completion as i32 {
        return Err(format!(
            "{what} {name} is neither a chat nor a completion dataset"
        ));
    }
    if dataset.example_count < 1 {
        return Err(format!("{what} {name} has no examples"));
    }
    Ok(())
}
