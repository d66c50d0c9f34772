//! `FineTuningService`: supervised fine-tuning jobs that train a LoRA addon on a dataset.
//! The request's checks and the inputs' decision are pure ([`request`]); the job's life in
//! the scheduler (validation, placement on a node that trains, the node's reports, lost
//! nodes, cancel, delete) is in [`jobs`].

mod jobs;
mod placement;
mod request;

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::grpc::ListRpc;
use kiln_core::listing::{Field, Fields, Getter, Kind, Listing, Value, time_value};
use kiln_events::records::HasRecords as _;
use kiln_proto::scheduler::v1::fine_tuning_service_server::FineTuningService;
use kiln_proto::scheduler::v1::*;

use crate::service::Scheduler;
pub(crate) use jobs::on_a_node;
pub(crate) use request::is_final;

/// The fine-tuning handlers.
pub(crate) struct FineTuning {
    scheduler: Scheduler,
}

impl FineTuning {
    pub fn new(scheduler: Scheduler) -> Self {
        Self { scheduler }
    }

    async fn list(
        &self,
        caller: &Principal,
        r: &ListSupervisedFineTuningJobsRequest,
    ) -> Result<Listing<SupervisedFineTuningJob>, Error> {
        let parent = caller.own_parent(&r.parent)?;
        let pages = self.scheduler.pages();
        let query = JOB_FIELDS.query(pages, &r.list_request(), &caller.account)?;
        let jobs = self.scheduler.jobs_of(&parent.account).await;
        Ok(query.page_of(pages, jobs))
    }
}

kiln_core::grpc_service! {
    impl FineTuningService for FineTuning {
        fn create_supervised_fine_tuning_job(CreateSupervisedFineTuningJobRequest)
            -> SupervisedFineTuningJob = |svc, caller, r| svc.scheduler.create_job(&caller, r).await;
        fn get_supervised_fine_tuning_job(GetSupervisedFineTuningJobRequest)
            -> SupervisedFineTuningJob = |svc, caller, r| svc.scheduler.get_job(&caller, &r.name).await;
        fn list_supervised_fine_tuning_jobs(ListSupervisedFineTuningJobsRequest)
            -> ListSupervisedFineTuningJobsResponse =
            |svc, caller, r| svc.list(&caller, &r).await.map(Into::into);
        fn cancel_supervised_fine_tuning_job(CancelSupervisedFineTuningJobRequest)
            -> SupervisedFineTuningJob = |svc, caller, r| svc.scheduler.cancel_job(&caller, &r.name).await;
        fn delete_supervised_fine_tuning_job(DeleteSupervisedFineTuningJobRequest)
            -> DeleteSupervisedFineTuningJobResponse =
            |svc, caller, r| svc.scheduler.delete_job(&caller, &r.name).await.map(|()| Default::default());
    }
}

/// The fields a job list filters on and orders by.
static JOB_FIELDS: Fields<Getter<SupervisedFineTuningJob>> = Fields {
    collection: request::JOBS,
    fields: &[
        Field::order("name", |j| Value::Text(j.name.clone())),
        Field::order("create_time", |j| time_value(&j.create_time)),
        Field::order("update_time", |j| time_value(&j.update_time)),
        Field::order("completed_time", |j| time_value(&j.completed_time)),
        Field::filter(
            "state",
            |j| Value::Int(j.state.into()),
            Kind::Enum(|s| {
                supervised_fine_tuning_job::JobState::from_str_name(s).map(|v| v as i32)
            }),
        ),
        Field::filter(
            "base_model",
            |j| Value::Text(j.base_model.clone()),
            Kind::Text,
        ),
        Field::filter("dataset", |j| Value::Text(j.dataset.clone()), Kind::Text),
        Field::filter(
            "output_model",
            |j| Value::Text(j.output_model.clone()),
            Kind::Text,
        ),
    ],
    tie_break: |j| Value::Text(j.name.clone()),
};

#[cfg(test)]
mod tests;
