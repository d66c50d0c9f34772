//! The flags of `kiln create supervised-fine-tuning-job`, and the job they ask for.

use clap::Args;
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::scheduler::v1 as schv1;

use crate::commands::flags::parse_optional_enum;

/// The projections a LoRA adapter may train.
const TARGET_MODULES: [&str; 7] = kiln_formats::LORA_MODULE_NAMES;

#[derive(Debug, Args)]
pub struct CreateJobArgs {
    /// The job ID (default: generated).
    pub job_id: Option<String>,
    /// The training dataset (an ID in the account, or a full name).
    #[arg(long)]
    pub dataset: String,
    /// The base model to train (an ID in the account, or a full name like
    /// accounts/kiln/models/smollm2-135m-instruct); with --warm-start-from, the addon's base.
    #[arg(long, required_unless_present = "warm_start_from")]
    pub base_model: Option<String>,
    /// The LoRA addon to create (an ID in the account, or a full name; default: the job ID).
    #[arg(long)]
    pub output_model: Option<String>,
    /// Passes over the dataset (default 1).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub epochs: Option<i32>,
    /// The peak learning rate (default 1e-4).
    #[arg(long, value_parser = positive_number)]
    pub learning_rate: Option<f32>,
    /// The adapter's rank (default 8).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub lora_rank: Option<i32>,
    /// LoRA alpha: the adapter's scale is alpha / rank (default: twice the rank).
    #[arg(long, value_parser = positive_number)]
    pub lora_alpha: Option<f32>,
    /// The projections to train, comma-separated (default: all seven).
    #[arg(long, value_delimiter = ',', value_parser = TARGET_MODULES)]
    pub target_modules: Vec<String>,
    /// Longer examples are cut (default: the base model's context length).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_context_length: Option<i32>,
    /// Examples per step (default 8).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub batch_size: Option<i32>,
    /// A dataset to evaluate after each epoch (an ID in the account, or a full name).
    #[arg(long)]
    pub eval_dataset: Option<String>,
    /// A LoRA addon to continue training (an ID in the account, or a full name).
    #[arg(long)]
    pub warm_start_from: Option<String>,
    /// Stop when the evaluation loss stops improving.
    #[arg(long, requires = "eval_dataset")]
    pub early_stop: bool,
    /// Train on GPUs of this type (e.g. NVIDIA_H100_80GB; default: a node's CPU).
    #[arg(long)]
    pub accelerator_type: Option<String>,
    /// GPUs of --accelerator-type on one node (default 1).
    #[arg(long, requires = "accelerator_type", value_parser = clap::value_parser!(i32).range(1..))]
    pub accelerator_count: Option<i32>,
    #[arg(long)]
    pub display_name: Option<String>,
    /// Follow the job until it ends, with its progress on stderr (Ctrl-C stops following,
    /// not the job); fails unless the job COMPLETED.
    #[arg(long)]
    pub wait: bool,
}

/// Parses a float flag that must be a positive number.
fn positive_number(text: &str) -> Result<f32, String> {
    text.trim()
        .parse::<f32>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("{text:?} is not a positive number"))
}

impl CreateJobArgs {
    /// The job the flags ask for, its datasets and models named as given (the caller
    /// resolves IDs with [`references`]).
    pub(super) fn job(&self) -> anyhow::Result<schv1::SupervisedFineTuningJob> {
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        let accelerator_type = parse_optional_enum::<AcceleratorType>(
            "accelerator-type",
            self.accelerator_type.as_deref(),
        )?;
        Ok(schv1::SupervisedFineTuningJob {
            display_name: text(&self.display_name),
            dataset: self.dataset.clone(),
            base_model: text(&self.base_model),
            output_model: text(&self.output_model),
            epochs: self.epochs.unwrap_or_default(),
            learning_rate: self.learning_rate.unwrap_or_default(),
            lora_rank: self.lora_rank.unwrap_or_default(),
            lora_alpha: self.lora_alpha.unwrap_or_default(),
            target_modules: self.target_modules.clone(),
            max_context_length: self.max_context_length.unwrap_or_default(),
            batch_size: self.batch_size.unwrap_or_default(),
            evaluation_dataset: text(&self.eval_dataset),
            warm_start_from: text(&self.warm_start_from),
            early_stop: self.early_stop,
            accelerator_type,
            accelerator_count: self.accelerator_count.unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// The fields of a job that name a dataset or a model, each with its collection in the
/// account: what `create` resolves from IDs to full names.
pub(super) fn references(
    job: &mut schv1::SupervisedFineTuningJob,
) -> [(&'static str, &mut String); 5] {
    [
        ("datasets", &mut job.dataset),
        ("datasets", &mut job.evaluation_dataset),
        ("models", &mut job.base_model),
        ("models", &mut job.warm_start_from),
        ("models", &mut job.output_model),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::flags::parse_flags as parse;

    fn create_args(args: &[&str]) -> CreateJobArgs {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn error(args: &[&str]) -> String {
        parse::<CreateJobArgs>(args).unwrap_err().to_string()
    }

    #[test]
    fn flags_fill_the_job() {
        let args = create_args(&[
            "tone-v1",
            "--dataset",
            "train",
            "--base-model",
            "accounts/kiln/models/m",
            "--output-model",
            "tone",
            "--epochs",
            "3",
            "--learning-rate",
            "2e-4",
            "--lora-rank",
            "16",
            "--lora-alpha",
            "32",
            "--target-modules",
            "q_proj,v_proj",
            "--max-context-length",
            "1024",
            "--batch-size",
            "4",
            "--eval-dataset",
            "eval",
            "--warm-start-from",
            "tone-v0",
            "--early-stop",
            "--display-name",
            "Tone",
            "--accelerator-type",
            "nvidia_h100_80gb",
            "--accelerator-count",
            "2",
            "--wait",
        ]);
        assert_eq!(args.job_id.as_deref(), Some("tone-v1"));
        assert!(args.wait);
        let job = args.job().unwrap();
        assert_eq!(
            job,
            schv1::SupervisedFineTuningJob {
                display_name: "Tone".into(),
                dataset: "train".into(),
                base_model: "accounts/kiln/models/m".into(),
                output_model: "tone".into(),
                epochs: 3,
                learning_rate: 2e-4,
                lora_rank: 16,
                lora_alpha: 32.0,
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                max_context_length: 1024,
                batch_size: 4,
                evaluation_dataset: "eval".into(),
                warm_start_from: "tone-v0".into(),
                early_stop: true,
                accelerator_type: AcceleratorType::NvidiaH10080gb as i32,
                accelerator_count: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn flags_not_given_leave_the_server_defaults() {
        let args = create_args(&["--dataset", "d", "--base-model", "m"]);
        assert_eq!(args.job_id, None);
        assert!(!args.wait);
        assert_eq!(
            args.job().unwrap(),
            schv1::SupervisedFineTuningJob {
                dataset: "d".into(),
                base_model: "m".into(),
                ..Default::default()
            }
        );
        // A warm start may leave the base model out.
        let args = create_args(&["--dataset", "d", "--warm-start-from", "addon"]);
        assert_eq!(args.job().unwrap().base_model, "");
    }

    #[test]
    fn bad_flags_are_refused_before_any_call() {
        let e = error(&["--dataset", "d"]);
        assert!(e.contains("--base-model"), "{e}");
        let e = error(&["--base-model", "m"]);
        assert!(e.contains("--dataset"), "{e}");
        let e = error(&["--dataset", "d", "--base-model", "m", "--early-stop"]);
        assert!(e.contains("--eval-dataset"), "{e}");
        let e = error(&[
            "--dataset",
            "d",
            "--base-model",
            "m",
            "--target-modules",
            "q,v_proj",
        ]);
        assert!(
            e.contains("invalid value 'q'") && e.contains("gate_proj"),
            "{e}"
        );
        for bad in ["0", "-1e-4", "NaN", "inf", "fast"] {
            let flag = format!("--learning-rate={bad}");
            let e = error(&["--dataset", "d", "--base-model", "m", &flag]);
            assert!(e.contains("is not a positive number"), "{bad}: {e}");
        }
        let e = error(&["--dataset", "d", "--base-model", "m", "--lora-alpha", "0"]);
        assert!(e.contains("is not a positive number"), "{e}");
        for flag in [
            "--epochs",
            "--lora-rank",
            "--batch-size",
            "--max-context-length",
        ] {
            let e = error(&["--dataset", "d", "--base-model", "m", flag, "0"]);
            assert!(e.contains(flag), "{flag}: {e}");
        }
    }

    #[test]
    fn references_name_each_dataset_and_model_field_once() {
        let mut job = schv1::SupervisedFineTuningJob::default();
        for (i, (_, field)) in references(&mut job).into_iter().enumerate() {
            *field = i.to_string();
        }
        assert_eq!(
            [
                job.dataset.as_str(),
                &job.evaluation_dataset,
                &job.base_model,
                &job.warm_start_from,
                &job.output_model
            ],
            ["0", "1", "2", "3", "4"]
        );
        let collections = references(&mut job).map(|(c, _)| c);
        assert_eq!(
            collections,
            ["datasets", "datasets", "models", "models", "models"]
        );
    }
}
