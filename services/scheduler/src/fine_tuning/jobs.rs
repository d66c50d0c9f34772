//! The life of a fine-tuning job in the scheduler: created and stored, validated against the
//! registry, placed on a node that trains, followed through the node's reports, moved back to
//! PENDING when its node is lost, cancelled, deleted. Every change is stored with its event.

use kiln_core::auth::Principal;
use kiln_core::names::ChildName;
use kiln_core::{Error, Result};
use kiln_events::Body;
use kiln_events::records::HasRecords as _;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1 as ev;
use kiln_proto::registry::v1::Model;
use kiln_proto::scheduler::v1::supervised_fine_tuning_job::JobState;
use kiln_proto::scheduler::v1::{
    Assignment, CancelFineTuningJob, CreateSupervisedFineTuningJobRequest, FineTuningJobReport,
    SchedulerMessage, StartFineTuningJob, SupervisedFineTuningJob, assignment, scheduler_message,
};
use prost::Message;
use sea_orm::{EntityTrait, TransactionTrait};

use super::request::{Inputs, JOBS, check_inputs, is_final, new_job};
use crate::db::fine_tuning_job as rows;
use crate::quota;
use crate::service::Scheduler;
use crate::state::State;
use crate::time::now;

/// The states in which a node works on the job.
pub(crate) fn on_a_node(state: i32) -> bool {
    [
        JobState::Running,
        JobState::WritingResults,
        JobState::Cancelling,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

fn state_name(state: i32) -> &'static str {
    JobState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("JOB_STATE_UNSPECIFIED")
}

impl Scheduler {
    /// Stores `job` (a new row when `insert`) with one event, in one transaction.
    async fn save_job(
        &self,
        job: &SupervisedFineTuningJob,
        insert: bool,
        event_type: &str,
        body: Body,
    ) -> Result<()> {
        let name = ChildName::parse("name", JOBS, &job.name, None)?;
        let row = rows::Model {
            account_id: name.account.clone(),
            job_id: name.id.clone(),
            state: job.state,
            dataset: job.dataset.clone(),
            base_model: job.base_model.clone(),
            output_model: job.output_model.clone(),
            create_time: kiln_core::time::micros_of(&job.create_time),
            update_time: kiln_core::time::micros_of(&job.update_time),
            resource: job.encode_to_vec(),
        };
        let txn = self.db().begin().await?;
        kiln_store::save(&txn, rows::ActiveModel::from(row), insert, &name).await?;
        self.outbox()
            .commit_event(txn, event_type, &name.account, &job.name, body)
            .await?;
        Ok(())
    }

    /// Moves `job` to `to` with `status`, stored with its `state_changed` event (and
    /// `completed` when it completed). Memory keeps the old state when the write fails.
    async fn set_job_state(
        &self,
        job: &mut SupervisedFineTuningJob,
        to: JobState,
        status: Option<ResourceStatus>,
    ) -> Result<()> {
        let before = job.clone();
        job.state = to as i32;
        job.status = status;
        job.update_time = Some(now());
        if is_final(job.state) {
            job.completed_time = job.update_time;
        }
        let changed =
            Body::SupervisedFineTuningJobStateChanged(ev::SupervisedFineTuningJobStateChanged {
                supervised_fine_tuning_job: Some(job.clone()),
                previous_state: before.state,
            });
        let mut result = self
            .save_job(
                job,
                false,
                "scheduler.supervised_fine_tuning_job.state_changed",
                changed,
            )
            .await;
        if result.is_ok() && to == JobState::Completed {
            let completed =
                Body::SupervisedFineTuningJobCompleted(ev::SupervisedFineTuningJobCompleted {
                    supervised_fine_tuning_job: Some(job.clone()),
                    output_model: job.output_model.clone(),
                });
            let name = ChildName::parse("name", JOBS, &job.name, None)?;
            result = self
                .emit(
                    "scheduler.supervised_fine_tuning_job.completed",
                    &name.account,
                    &job.name,
                    completed,
                )
                .await;
        }
        match &result {
            Ok(()) => tracing::info!(
                job = %job.name,
                from = state_name(before.state),
                to = state_name(job.state),
                "fine-tuning job"
            ),
            Err(_) => *job = before,
        }
        result
    }

    /// CreateSupervisedFineTuningJob: stored as CREATING, then validated in the background.
    pub(crate) async fn create_job(
        &self,
        caller: &Principal,
        request: CreateSupervisedFineTuningJobRequest,
    ) -> Result<SupervisedFineTuningJob> {
        let job = new_job(caller, request, || {
            let id = uuid::Uuid::now_v7().simple().to_string();
            format!("sftj-{}", &id[id.len() - 12..])
        })?;
        let account = ChildName::parse("name", JOBS, &job.name, None)?.account;
        quota::check_not_suspended(caller, &account)?;
        let limits = quota::read_limits(self.quotas(), &account).await?;
        let mut state = self.lock().await;
        if state.jobs.contains_key(&job.name) {
            return Err(Error::already_exists(&job.name));
        }
        quota::check_fine_tuning_job(limits.as_ref(), &state, &account)?;
        let created = Body::SupervisedFineTuningJobCreated(ev::SupervisedFineTuningJobCreated {
            supervised_fine_tuning_job: Some(job.clone()),
        });
        self.save_job(
            &job,
            true,
            "scheduler.supervised_fine_tuning_job.created",
            created,
        )
        .await?;
        state.jobs.insert(job.name.clone(), job.clone());
        drop(state);
        self.spawn_validation(job.name.clone());
        Ok(job)
    }

    /// Validates again the jobs a stop left CREATING or VALIDATING.
    pub(crate) async fn resume_validations(&self) {
        let waiting: Vec<String> = self
            .lock()
            .await
            .jobs
            .values()
            .filter(|j| [JobState::Creating as i32, JobState::Validating as i32].contains(&j.state))
            .map(|j| j.name.clone())
            .collect();
        for name in waiting {
            self.spawn_validation(name);
        }
    }

    /// Validates a job in the background (see [`Scheduler::validate_job`]).
    pub(crate) fn spawn_validation(&self, name: String) {
        let scheduler = self.clone();
        tokio::spawn(async move {
            if let Err(err) = scheduler.validate_job(&name).await {
                tracing::warn!(job = %name, %err, "cannot validate the fine-tuning job; retrying at the next start");
            }
        });
    }

    /// VALIDATING: reads what the job names from the registry, then PENDING (waiting for a
    /// node) or FAILED with what is wrong.
    async fn validate_job(&self, name: &str) -> Result<()> {
        let job = {
            let mut state = self.lock().await;
            let Some(job) = state.jobs.get_mut(name) else {
                return Ok(());
            };
            if job.state == JobState::Creating as i32 {
                self.set_job_state(job, JobState::Validating, None).await?;
            }
            if job.state != JobState::Validating as i32 {
                return Ok(());
            }
            job.clone()
        };
        let inputs = self.read_inputs(&job).await?;
        let decision = check_inputs(&job, &inputs);
        let mut state = self.lock().await;
        let Some(job) = state.jobs.get_mut(name) else {
            return Ok(());
        };
        if job.state != JobState::Validating as i32 {
            return Ok(()); // cancelled meanwhile
        }
        match decision {
            Ok(base) => {
                job.base_model = base;
                self.set_job_state(job, JobState::Pending, None).await?;
                drop(state);
                self.wake();
            }
            Err(why) => {
                let status = ResourceStatus {
                    code: tonic::Code::FailedPrecondition as i32,
                    message: why,
                };
                self.set_job_state(job, JobState::Failed, Some(status))
                    .await?;
            }
        }
        Ok(())
    }

    /// What `job` names, as the registry has it. What another account holds (and does not
    /// publish) counts as absent; so does what the registry does not find.
    async fn read_inputs(&self, job: &SupervisedFineTuningJob) -> Result<Inputs> {
        let account = ChildName::parse("name", JOBS, &job.name, None)?.account;
        let own = |name: &str| name.starts_with(&format!("accounts/{account}/"));
        // Relayed from a remote registry or raised here alike.
        let absent = Error::is_not_found;
        let dataset = |name: String| async move {
            if name.is_empty() || !own(&name) {
                return Ok(None);
            }
            match self.catalog().get_dataset(&name).await {
                Ok(d) => Ok(Some(d)),
                Err(e) if absent(&e) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let model = |name: String| async move {
            if name.is_empty() {
                return Ok::<Option<Model>, Error>(None);
            }
            match self.catalog().get_model(&name).await {
                Ok(m) if m.public || own(&m.name) => Ok(Some(m)),
                Ok(_) => Ok(None),
                Err(e) if absent(&e) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let warm_start_from = model(job.warm_start_from.clone())
            .await?
            .filter(|m| own(&m.name));
        let base_name = match (&job.base_model, &warm_start_from) {
            (b, _) if !b.is_empty() => b.clone(),
            (_, Some(addon)) => addon.peft_details.clone().unwrap_or_default().base_model,
            _ => String::new(),
        };
        Ok(Inputs {
            dataset: dataset(job.dataset.clone()).await?,
            evaluation_dataset: dataset(job.evaluation_dataset.clone()).await?,
            base_model: model(base_name).await?,
            warm_start_from,
            output_taken: match self.catalog().get_model(&job.output_model).await {
                Ok(_) => true,
                Err(e) if absent(&e) => false,
                Err(e) => return Err(e),
            },
        })
    }

    /// The reconcile pass's part: jobs whose node is gone go back to PENDING (a CANCELLING
    /// one is CANCELLED), and PENDING jobs go to free nodes that train, oldest first.
    pub(crate) async fn reconcile_jobs(&self, state: &mut State) {
        let names: Vec<String> = state.jobs.keys().cloned().collect();
        for name in &names {
            let job = state.jobs.get(name).expect("listed");
            let node_ready = state.nodes.get(&job.node).is_some_and(|n| n.is_ready());
            if !on_a_node(job.state) || node_ready {
                continue;
            }
            let cancelling = job.state == JobState::Cancelling as i32;
            let lost = job.node.clone();
            let job = state.jobs.get_mut(name).expect("listed");
            job.node.clear();
            job.accelerator_indices.clear();
            let (to, status) = if cancelling {
                (JobState::Cancelled, None)
            } else {
                let message = format!("{lost} was lost; the job waits for another node");
                let status = ResourceStatus {
                    code: tonic::Code::Unavailable as i32,
                    message,
                };
                (JobState::Pending, Some(status))
            };
            if let Err(err) = self.set_job_state(job, to, status).await {
                tracing::warn!(job = %name, %err, "cannot requeue the fine-tuning job");
            }
        }
        let mut pending: Vec<(i64, String)> = state
            .jobs
            .values()
            .filter(|j| j.state == JobState::Pending as i32)
            .map(|j| (kiln_core::time::micros_of(&j.create_time), j.name.clone()))
            .collect();
        pending.sort();
        for (_, name) in pending {
            let job = state.jobs.get(&name).expect("listed");
            let Some((node, indices)) = super::placement::place_job(job, state) else {
                // Nothing free for it now (a job that needs less may still fit): say why,
                // unless it already does (a job whose node was lost says so).
                if job.status.is_none() {
                    let why = super::placement::why_waiting(job);
                    let job = state.jobs.get_mut(&name).expect("listed");
                    let status = ResourceStatus {
                        code: tonic::Code::Unavailable as i32,
                        message: why,
                    };
                    if let Err(err) = self
                        .set_job_state(job, JobState::Pending, Some(status))
                        .await
                    {
                        tracing::warn!(job = %name, %err, "cannot record why the job waits");
                    }
                }
                continue;
            };
            let Some(sender) = state.nodes.get(&node).and_then(|n| n.sender.clone()) else {
                continue;
            };
            let job = state.jobs.get_mut(&name).expect("listed");
            let message = SchedulerMessage {
                payload: Some(scheduler_message::Payload::Assignment(Assignment {
                    assignment_id: format!("train-{name}"),
                    action: Some(assignment::Action::StartFineTuningJob(StartFineTuningJob {
                        job: Some(job.clone()),
                        backend: "candle".into(),
                        accelerator_type: job.accelerator_type,
                        accelerator_indices: indices.clone(),
                    })),
                })),
            };
            if sender.try_send(Ok(message)).is_err() {
                continue; // its stream is full or gone: the next pass tries again
            }
            job.node = node;
            job.accelerator_indices = indices;
            if let Err(err) = self.set_job_state(job, JobState::Running, None).await {
                tracing::warn!(job = %name, %err, "cannot record the fine-tuning job's start");
            }
        }
    }

    /// A node's report of a job it trains.
    pub(crate) async fn job_reported(
        &self,
        state: &mut State,
        node: &str,
        report: FineTuningJobReport,
    ) {
        let Some(job) = state
            .jobs
            .get_mut(&report.job)
            .filter(|j| j.node == node && on_a_node(j.state))
        else {
            // Not (or no longer) this node's: tell it to stop unless it has.
            if !is_final(report.state)
                && let Some(sender) = state.nodes.get(node).and_then(|n| n.sender.clone())
            {
                let _ = sender.try_send(Ok(cancel_assignment(&report.job)));
            }
            return;
        };
        if let Some(progress) = report.job_progress {
            // A run reports the losses since it started, which may be a resumption: they end
            // at its current step (and epoch), and replace what the history holds from there.
            merge_history(
                &mut job.training_losses,
                report.training_losses,
                progress.step,
            );
            let epochs_done = progress.step * i64::from(job.epochs) / progress.total_steps.max(1);
            merge_history(
                &mut job.evaluation_losses,
                report.evaluation_losses,
                epochs_done,
            );
            job.job_progress = Some(progress);
        }
        let to = JobState::try_from(report.state).unwrap_or(JobState::Unspecified);
        let stays = to == JobState::Unspecified
            || to as i32 == job.state
            || (job.state == JobState::Cancelling as i32 && !is_final(to as i32));
        let result = if stays {
            job.update_time = Some(now());
            let name = job.name.clone();
            let progress =
                Body::SupervisedFineTuningJobProgress(ev::SupervisedFineTuningJobProgress {
                    name: name.clone(),
                    job_progress: job.job_progress,
                });
            self.save_job(
                job,
                false,
                "scheduler.supervised_fine_tuning_job.progress",
                progress,
            )
            .await
        } else {
            if to == JobState::Completed && !report.output_model.is_empty() {
                job.output_model = report.output_model;
            }
            self.set_job_state(job, to, report.status).await
        };
        if let Err(err) = result {
            tracing::warn!(job = %report.job, %err, "cannot record the fine-tuning job's report");
        }
    }

    /// The job `name` as `caller` may see it (NOT_FOUND otherwise).
    pub(crate) async fn get_job(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<SupervisedFineTuningJob> {
        let parsed = ChildName::parse("name", JOBS, name, Some(&caller.account))?;
        if !caller.can_access(&parsed.account) {
            return Err(Error::not_found(parsed));
        }
        let state = self.lock().await;
        state
            .jobs
            .get(&parsed.to_string())
            .cloned()
            .ok_or_else(|| Error::not_found(parsed))
    }

    /// The jobs of `account`.
    pub(crate) async fn jobs_of(&self, account: &str) -> Vec<SupervisedFineTuningJob> {
        let prefix = format!("accounts/{account}/");
        let state = self.lock().await;
        state
            .jobs
            .values()
            .filter(|j| j.name.starts_with(&prefix))
            .cloned()
            .collect()
    }

    /// CancelSupervisedFineTuningJob: a job not on a node yet is CANCELLED at once; a running
    /// one is CANCELLING until its node says it stopped.
    pub(crate) async fn cancel_job(
        &self,
        caller: &Principal,
        name: &str,
    ) -> Result<SupervisedFineTuningJob> {
        let name = self.get_job(caller, name).await?.name;
        let mut state = self.lock().await;
        let node_sender = {
            let job = state
                .jobs
                .get(&name)
                .ok_or_else(|| Error::not_found(&name))?;
            if is_final(job.state) {
                return Err(Error::FailedPrecondition(format!(
                    "{name} is already over ({})",
                    state_name(job.state)
                )));
            }
            state.nodes.get(&job.node).and_then(|n| n.sender.clone())
        };
        let job = state.jobs.get_mut(&name).expect("present");
        if job.state == JobState::Cancelling as i32 {
            return Ok(job.clone());
        }
        match node_sender.filter(|_| on_a_node(job.state)) {
            Some(sender) => {
                let _ = sender.try_send(Ok(cancel_assignment(&name)));
                self.set_job_state(job, JobState::Cancelling, None).await?;
            }
            None => {
                job.node.clear();
                self.set_job_state(job, JobState::Cancelled, None).await?;
            }
        }
        Ok(job.clone())
    }

    /// DeleteSupervisedFineTuningJob: only a job that is over; its output model stays.
    pub(crate) async fn delete_job(&self, caller: &Principal, name: &str) -> Result<()> {
        let name = self.get_job(caller, name).await?.name;
        let mut state = self.lock().await;
        let job = state
            .jobs
            .get(&name)
            .ok_or_else(|| Error::not_found(&name))?;
        if !is_final(job.state) {
            return Err(Error::FailedPrecondition(format!(
                "{name} is {}; cancel it first",
                state_name(job.state)
            )));
        }
        let parsed = ChildName::parse("name", JOBS, &name, None)?;
        let txn = self.db().begin().await?;
        rows::Entity::delete_by_id((parsed.account.clone(), parsed.id.clone()))
            .exec(&txn)
            .await?;
        let deleted = Body::SupervisedFineTuningJobDeleted(ev::SupervisedFineTuningJobDeleted {
            name: name.clone(),
        });
        self.outbox()
            .commit_event(
                txn,
                "scheduler.supervised_fine_tuning_job.deleted",
                &parsed.account,
                &name,
                deleted,
            )
            .await?;
        state.jobs.remove(&name);
        Ok(())
    }
}

/// `history` with `latest` as its entries up to number `last` (from 1).
pub(super) fn merge_history(history: &mut Vec<f32>, latest: Vec<f32>, last: i64) {
    if latest.is_empty() {
        return;
    }
    let last = usize::try_from(last).unwrap_or(0).max(latest.len());
    history.truncate(last - latest.len());
    history.resize(last - latest.len(), f32::NAN);
    history.extend(latest);
}

/// Tells a node to stop training `job`.
fn cancel_assignment(job: &str) -> SchedulerMessage {
    SchedulerMessage {
        payload: Some(scheduler_message::Payload::Assignment(Assignment {
            assignment_id: format!("cancel-{job}"),
            action: Some(assignment::Action::CancelFineTuningJob(
                CancelFineTuningJob {
                    job: job.to_owned(),
                },
            )),
        })),
    }
}
