//! `create supervised-fine-tuning-job --wait`: following a job until it ends, with a progress
//! line on stderr.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{anyhow, bail};
use kiln_proto::scheduler::v1 as schv1;
use schv1::fine_tuning_service_client::FineTuningServiceClient;
use schv1::supervised_fine_tuning_job::JobState;

use super::chart::{loss_text, progress_bar};
use super::print::{epoch_text, eval_loss, state_text, status_message};
use crate::client::{Authed, ProgressLine};

/// How often the job is asked for.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The progress bar's width.
const BAR_WIDTH: usize = 20;

/// Polls in a row that may fail with the server unreachable before following gives up.
const MAX_UNREACHABLE_POLLS: u32 = 30;

/// One line of a job's progress: `JOB_STATE_RUNNING  █████████░░░░░░░░░░░  45%  epoch 2/3
/// step 45/100  loss 1.2346  eval loss 1.5000  <status message>` (the parts known so far).
pub(super) fn progress_text(job: &schv1::SupervisedFineTuningJob) -> String {
    let mut parts = vec![state_text(job.state)];
    if let Some(p) = &job.job_progress {
        let percent = p.percent.clamp(0, 100);
        parts.push(format!(
            "{} {percent:>3}%",
            progress_bar(percent, BAR_WIDTH)
        ));
        parts.push(epoch_text(p.epoch, job.epochs));
        parts.push(format!("step {}/{}", p.step, p.total_steps));
        if p.step > 0 {
            parts.push(format!("loss {}", loss_text(p.loss)));
        }
    }
    match eval_loss(job) {
        Some(loss) => parts.push(format!("eval loss {}", loss_text(loss))),
        None if job.job_progress.is_some() && !job.evaluation_dataset.is_empty() => {
            parts.push("eval loss -".to_owned());
        }
        None => {}
    }
    let message = status_message(job);
    if !message.is_empty() {
        parts.push(message.to_owned());
    }
    parts.join("  ")
}

/// Whether following ends: the job runs no more (COMPLETED, FAILED, CANCELLED, or being
/// deleted).
pub(super) fn is_over(job: &schv1::SupervisedFineTuningJob) -> bool {
    matches!(
        JobState::try_from(job.state),
        Ok(JobState::Completed | JobState::Failed | JobState::Cancelled | JobState::Deleting)
    )
}

/// What a job that is over means for the command: success when it COMPLETED, else an error
/// with its status message.
pub(super) fn outcome(job: &schv1::SupervisedFineTuningJob) -> anyhow::Result<()> {
    let message = match status_message(job) {
        "" => "no status message",
        m => m,
    };
    let name = &job.name;
    match JobState::try_from(job.state) {
        Ok(JobState::Completed) => Ok(()),
        Ok(JobState::Failed) => Err(anyhow!("{name} failed: {message}")),
        Ok(JobState::Cancelled) => Err(anyhow!("{name} was cancelled: {message}")),
        _ => Err(anyhow!(
            "{name} is {} and will not complete: {message}",
            state_text(job.state)
        )),
    }
}

/// Whether a failed poll may be retried: the server is unreachable for now.
fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
    )
}

/// Polls the job every second, showing its progress on stderr, until it is over; answers
/// the job as it ended. Ctrl-C stops following (the job goes on).
pub(super) async fn follow(
    mut jobs: FineTuningServiceClient<Authed>,
    name: &str,
) -> anyhow::Result<schv1::SupervisedFineTuningJob> {
    let mut err = std::io::stderr();
    let mut line = ProgressLine::new(err.is_terminal());
    // One listener for the whole wait: a Ctrl-C during a poll is not lost.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut unreachable = 0;
    loop {
        let request = schv1::GetSupervisedFineTuningJobRequest {
            name: name.to_owned(),
        };
        let polled = tokio::select! {
            polled = jobs.get_supervised_fine_tuning_job(request) => polled,
            _ = &mut interrupted => break,
        };
        match polled {
            Ok(job) => {
                unreachable = 0;
                let job = job.into_inner();
                let _ = line.show(&mut err, &progress_text(&job));
                if is_over(&job) {
                    let _ = line.finish(&mut err);
                    return Ok(job);
                }
            }
            Err(status) if is_transient(&status) && unreachable < MAX_UNREACHABLE_POLLS => {
                unreachable += 1;
            }
            Err(status) => {
                let _ = line.finish(&mut err);
                return Err(status.into());
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = &mut interrupted => break,
        }
    }
    let _ = line.finish(&mut err);
    bail!(
        "stopped following {name}; the job goes on (`kiln get sftj {name}` shows it, \
         `kiln cancel sftj {name}` stops it)"
    )
}

#[cfg(test)]
mod tests {
    use kiln_proto::common::v1 as commonv1;

    use super::*;

    fn job(state: JobState) -> schv1::SupervisedFineTuningJob {
        schv1::SupervisedFineTuningJob {
            name: "accounts/a/supervisedFineTuningJobs/j".into(),
            state: state as i32,
            epochs: 3,
            ..Default::default()
        }
    }

    fn with_status(
        mut job: schv1::SupervisedFineTuningJob,
        message: &str,
    ) -> schv1::SupervisedFineTuningJob {
        job.status = Some(commonv1::Status {
            code: 9,
            message: message.into(),
        });
        job
    }

    #[test]
    fn the_progress_line_shows_what_is_known() {
        let pending = with_status(job(JobState::Pending), "waiting for a node");
        assert_eq!(
            progress_text(&pending),
            "JOB_STATE_PENDING  waiting for a node"
        );
        let mut running = job(JobState::Running);
        running.job_progress = Some(schv1::JobProgress {
            percent: 45,
            epoch: 2,
            step: 45,
            total_steps: 100,
            loss: 1.23456,
            ..Default::default()
        });
        assert_eq!(
            progress_text(&running),
            "JOB_STATE_RUNNING  █████████░░░░░░░░░░░  45%  epoch 2/3  step 45/100  loss 1.2346"
        );
        // With an evaluation dataset: its loss, or `-` before the first evaluation.
        running.evaluation_dataset = "accounts/a/datasets/e".into();
        assert!(progress_text(&running).ends_with("loss 1.2346  eval loss -"));
        running.job_progress.as_mut().unwrap().eval_loss = 1.5;
        assert!(progress_text(&running).ends_with("loss 1.2346  eval loss 1.5000"));
        // Before the first step: no loss yet.
        let mut started = job(JobState::Running);
        started.job_progress = Some(schv1::JobProgress {
            epoch: 1,
            total_steps: 10,
            ..Default::default()
        });
        started.epochs = 0;
        assert_eq!(
            progress_text(&started),
            "JOB_STATE_RUNNING  ░░░░░░░░░░░░░░░░░░░░   0%  epoch 1  step 0/10"
        );
    }

    #[test]
    fn following_ends_in_a_final_state_only() {
        for state in [
            JobState::Creating,
            JobState::Validating,
            JobState::Pending,
            JobState::Running,
            JobState::WritingResults,
            JobState::Cancelling,
        ] {
            assert!(!is_over(&job(state)), "{state:?}");
        }
        for state in [
            JobState::Completed,
            JobState::Failed,
            JobState::Cancelled,
            JobState::Deleting,
        ] {
            assert!(is_over(&job(state)), "{state:?}");
        }
        assert!(!is_over(&schv1::SupervisedFineTuningJob {
            state: 99,
            ..Default::default()
        }));
    }

    #[test]
    fn only_a_completed_job_succeeds() {
        let error = |job| format!("{:#}", outcome(&job).unwrap_err());
        assert!(outcome(&job(JobState::Completed)).is_ok());
        assert_eq!(
            error(with_status(
                job(JobState::Failed),
                "the loss is NaN at step 7"
            )),
            "accounts/a/supervisedFineTuningJobs/j failed: the loss is NaN at step 7"
        );
        assert_eq!(
            error(job(JobState::Cancelled)),
            "accounts/a/supervisedFineTuningJobs/j was cancelled: no status message"
        );
        assert_eq!(
            error(job(JobState::Deleting)),
            "accounts/a/supervisedFineTuningJobs/j is JOB_STATE_DELETING and will not \
             complete: no status message"
        );
    }

    #[test]
    fn only_an_unreachable_server_is_retried() {
        assert!(is_transient(&tonic::Status::unavailable(
            "connection refused"
        )));
        assert!(is_transient(&tonic::Status::deadline_exceeded("slow")));
        assert!(!is_transient(&tonic::Status::not_found("no such job")));
        assert!(!is_transient(&tonic::Status::permission_denied("no")));
    }
}
