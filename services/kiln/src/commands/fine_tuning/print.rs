//! How fine-tuning jobs print: a table row in listings; one field a line, with the loss
//! curve, when one job is shown (`get`, `cancel`, `create`); the resource with `-o json`.

use kiln_proto::scheduler::v1 as schv1;
use schv1::supervised_fine_tuning_job::JobState;

use super::chart::{loss_curve, loss_text};
use crate::client::{Format, enum_name, print_one, printable, say, time, yes_no};

printable!(schv1::SupervisedFineTuningJob, "kiln.scheduler.v1.SupervisedFineTuningJob" {
    "NAME" => |j| j.name.clone(),
    "STATE" => |j| state_text(j.state),
    "BASE MODEL" => |j| dash(&j.base_model),
    "DATASET" => |j| j.dataset.clone(),
    "OUTPUT MODEL" => |j| j.output_model.clone(),
    "PROGRESS" => percent_text,
    "CREATED" => |j| time(&j.create_time),
});

/// Prints one job: its fields and loss curve, or the resource as JSON.
pub(super) fn print_job(format: Format, job: &schv1::SupervisedFineTuningJob) {
    match format {
        Format::Json => print_one(format, job),
        Format::Table => say!("{}", details(job)),
    }
}

/// A job state's proto name, e.g. `JOB_STATE_RUNNING` (the name filters take).
pub(super) fn state_text(state: i32) -> String {
    enum_name(state, JobState::as_str_name)
}

/// The job's status message (empty when it has none).
pub(super) fn status_message(job: &schv1::SupervisedFineTuningJob) -> &str {
    job.status.as_ref().map_or("", |s| s.message.as_str())
}

/// `text`, or `-` when it is empty.
fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// A hyper-parameter: `0` (unset) shows as `default`.
fn number<T: PartialEq + Default + ToString>(value: T, default: &str) -> String {
    if value == T::default() {
        default.to_owned()
    } else {
        value.to_string()
    }
}

/// `45%`, or `-` before the job reports progress.
fn percent_text(job: &schv1::SupervisedFineTuningJob) -> String {
    job.job_progress
        .as_ref()
        .map_or("-".to_owned(), |p| format!("{}%", p.percent.clamp(0, 100)))
}

/// `epoch 2/3` (`epoch 2` when the job's epochs are not known).
pub(super) fn epoch_text(epoch: i32, epochs: i32) -> String {
    if epochs > 0 {
        format!("epoch {epoch}/{epochs}")
    } else {
        format!("epoch {epoch}")
    }
}

/// The latest evaluation loss: the progress's, else the last of the per-epoch ones.
pub(super) fn eval_loss(job: &schv1::SupervisedFineTuningJob) -> Option<f32> {
    job.job_progress
        .as_ref()
        .map(|p| p.eval_loss)
        .filter(|l| *l != 0.0)
        .or_else(|| job.evaluation_losses.last().copied())
}

/// The job as `get` shows it: one field a line (`field: value`), the values aligned.
pub(super) fn details(job: &schv1::SupervisedFineTuningJob) -> String {
    /// Adds a field that is shown only when set.
    fn optional(fields: &mut Vec<(&'static str, String)>, field: &'static str, value: &str) {
        if !value.is_empty() {
            fields.push((field, value.to_owned()));
        }
    }
    let mut fields = vec![("name", job.name.clone())];
    optional(&mut fields, "display name", &job.display_name);
    fields.push(("state", state_text(job.state)));
    optional(&mut fields, "status", status_message(job));
    fields.push(("dataset", job.dataset.clone()));
    optional(&mut fields, "eval dataset", &job.evaluation_dataset);
    fields.push(("base model", dash(&job.base_model)));
    optional(&mut fields, "warm start from", &job.warm_start_from);
    fields.push(("output model", dash(&job.output_model)));
    let modules = match job.target_modules.as_slice() {
        [] => "default".to_owned(),
        modules => modules.join(", "),
    };
    fields.extend([
        ("epochs", number(job.epochs, "default")),
        ("learning rate", number(job.learning_rate, "default")),
        ("lora rank", number(job.lora_rank, "default")),
        ("lora alpha", number(job.lora_alpha, "default")),
        ("target modules", modules),
        ("batch size", number(job.batch_size, "default")),
        (
            "max context",
            number(job.max_context_length, "the base model's"),
        ),
        ("early stop", yes_no(job.early_stop)),
    ]);
    match &job.job_progress {
        Some(p) => fields.extend([
            (
                "progress",
                format!(
                    "{}%  {}  step {}/{}",
                    p.percent.clamp(0, 100),
                    epoch_text(p.epoch, job.epochs),
                    p.step,
                    p.total_steps
                ),
            ),
            ("tokens", p.tokens_processed.to_string()),
            (
                "loss",
                if p.step > 0 {
                    loss_text(p.loss)
                } else {
                    dash("")
                },
            ),
            (
                "truncated",
                format!("{} of {} examples", p.truncated_examples, p.examples),
            ),
        ]),
        None => fields.push(("progress", dash(""))),
    }
    if let Some(loss) = eval_loss(job) {
        fields.push(("eval loss", loss_text(loss)));
    }
    fields.push(("node", dash(&job.node)));
    fields.push(("created", time(&job.create_time)));
    optional(&mut fields, "created by", &job.created_by);
    fields.push(("completed", time(&job.completed_time)));
    let curve = loss_curve(&job.training_losses);
    fields.push(("loss curve", curve.unwrap_or_else(|| dash(""))));
    if !job.evaluation_losses.is_empty() {
        let losses: Vec<String> = job
            .evaluation_losses
            .iter()
            .map(|l| loss_text(*l))
            .collect();
        fields.push(("eval losses", losses.join(" ")));
    }
    let width = fields.iter().map(|(f, _)| f.len()).max().unwrap_or(0) + 1;
    let lines: Vec<String> = fields
        .iter()
        .map(|(field, value)| format!("{:<width$} {value}", format!("{field}:")))
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use kiln_proto::common::v1 as commonv1;

    use super::*;
    use crate::client::{Printable, to_json};

    fn running() -> schv1::SupervisedFineTuningJob {
        schv1::SupervisedFineTuningJob {
            name: "accounts/a/supervisedFineTuningJobs/j".into(),
            state: JobState::Running as i32,
            dataset: "accounts/a/datasets/d".into(),
            evaluation_dataset: "accounts/a/datasets/e".into(),
            base_model: "accounts/kiln/models/m".into(),
            output_model: "accounts/a/models/j".into(),
            epochs: 3,
            learning_rate: 2e-4,
            lora_rank: 8,
            lora_alpha: 16.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            batch_size: 4,
            early_stop: true,
            job_progress: Some(schv1::JobProgress {
                percent: 45,
                epoch: 2,
                tokens_processed: 12_345,
                loss: 1.23456,
                step: 45,
                total_steps: 100,
                eval_loss: 1.5,
                truncated_examples: 3,
                examples: 120,
            }),
            training_losses: vec![4.0, 3.0, 2.0, 1.0],
            evaluation_losses: vec![1.75, 1.5],
            node: "nodes/n1".into(),
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_listing_row_shows_state_models_and_progress() {
        assert_eq!(
            running().row(),
            [
                "accounts/a/supervisedFineTuningJobs/j",
                "JOB_STATE_RUNNING",
                "accounts/kiln/models/m",
                "accounts/a/datasets/d",
                "accounts/a/models/j",
                "45%",
                "2023-11-14T22:13:20Z"
            ]
        );
        let empty = schv1::SupervisedFineTuningJob::default();
        assert_eq!(
            empty.row(),
            ["", "JOB_STATE_UNSPECIFIED", "-", "", "", "-", "-"]
        );
    }

    #[test]
    fn details_show_every_part_of_a_job() {
        let expected = "\
name:           accounts/a/supervisedFineTuningJobs/j
state:          JOB_STATE_RUNNING
dataset:        accounts/a/datasets/d
eval dataset:   accounts/a/datasets/e
base model:     accounts/kiln/models/m
output model:   accounts/a/models/j
epochs:         3
learning rate:  0.0002
lora rank:      8
lora alpha:     16
target modules: q_proj, v_proj
batch size:     4
max context:    the base model's
early stop:     yes
progress:       45%  epoch 2/3  step 45/100
tokens:         12345
loss:           1.2346
truncated:      3 of 120 examples
eval loss:      1.5000
node:           nodes/n1
created:        2023-11-14T22:13:20Z
completed:      -
loss curve:     █▆▃▁  first 4.0000  last 1.0000  min 1.0000  max 4.0000  (4 steps)
eval losses:    1.7500 1.5000";
        assert_eq!(details(&running()), expected);
    }

    #[test]
    fn details_of_a_failed_job_without_progress() {
        let job = schv1::SupervisedFineTuningJob {
            name: "accounts/a/supervisedFineTuningJobs/j".into(),
            display_name: "tone".into(),
            state: JobState::Failed as i32,
            status: Some(commonv1::Status {
                code: 9,
                message: "dataset accounts/a/datasets/d is not READY".into(),
            }),
            warm_start_from: "accounts/a/models/old".into(),
            created_by: "accounts/a/users/alice".into(),
            ..Default::default()
        };
        let text = details(&job);
        for line in [
            "display name:    tone",
            "state:           JOB_STATE_FAILED",
            "status:          dataset accounts/a/datasets/d is not READY",
            "base model:      -",
            "warm start from: accounts/a/models/old",
            "epochs:          default",
            "target modules:  default",
            "progress:        -",
            "created by:      accounts/a/users/alice",
            "loss curve:      -",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
        for absent in ["eval dataset", "eval loss", "tokens", "eval losses"] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
    }

    #[test]
    fn eval_loss_falls_back_to_the_last_epoch() {
        let mut job = running();
        assert_eq!(eval_loss(&job), Some(1.5));
        job.job_progress.as_mut().unwrap().eval_loss = 0.0;
        job.evaluation_losses = vec![2.0, 1.25];
        assert_eq!(eval_loss(&job), Some(1.25));
        job.evaluation_losses.clear();
        assert_eq!(eval_loss(&job), None);
    }

    #[test]
    fn json_is_the_whole_resource() {
        let json = to_json(schv1::SupervisedFineTuningJob::PROTO_NAME, &running());
        assert_eq!(json["state"], "JOB_STATE_RUNNING");
        assert_eq!(json["job_progress"]["total_steps"], "100");
        assert_eq!(
            json["training_losses"],
            serde_json::json!([4.0, 3.0, 2.0, 1.0])
        );
        assert_eq!(
            json["target_modules"],
            serde_json::json!(["q_proj", "v_proj"])
        );
        assert_eq!(json["lora_alpha"], 16.0);
        assert_eq!(json["warm_start_from"], "");
    }
}
