//! `FineTuningService` until fine-tuning lands: served, so clients get honest answers rather
//! than UNIMPLEMENTED. Names and tenancy are checked as on every other RPC (another account's
//! parent is NOT_FOUND, a malformed name INVALID_ARGUMENT naming the field); there are no
//! jobs, so List is an empty page and Get, Cancel and Delete are NOT_FOUND; Create checks
//! what it can without a trainer, then refuses with FAILED_PRECONDITION.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::grpc::ListRpc;
use kiln_core::listing::{Field, Fields, Getter, Kind, Listing, Value, time_value};
use kiln_core::names::{ChildName, validate_display_name, validate_id};
use kiln_core::page::PageTokens;
use kiln_proto::scheduler::v1::fine_tuning_service_server::FineTuningService;
use kiln_proto::scheduler::v1::*;

const JOBS: &str = "supervisedFineTuningJobs";

/// Why no job can be created (the FAILED_PRECONDITION message).
const NO_TRAINER: &str = "supervised fine-tuning is not available on this platform yet: \
     no trainer is available to run the job";

/// The fine-tuning handlers. They hold no jobs: only the page-token key, so a List's
/// page_token is checked like any other listing's.
pub(crate) struct FineTuning {
    pages: PageTokens,
}

impl FineTuning {
    pub fn new(pages: PageTokens) -> Self {
        Self { pages }
    }
}

/// The job a Get, Cancel or Delete names: none exists, so NOT_FOUND once the name parses.
fn no_such_job<T>(caller: &Principal, name: &str) -> Result<T, Error> {
    let parsed = ChildName::parse("name", JOBS, name, Some(&caller.account))?;
    Err(Error::not_found(parsed))
}

/// A model or dataset a new job refers to, when it names one: its shape checked.
fn check_reference(
    field: &str,
    collection: &'static str,
    name: &str,
    account: &str,
) -> Result<(), Error> {
    if !name.is_empty() {
        ChildName::parse(field, collection, name, Some(account))?;
    }
    Ok(())
}

impl FineTuning {
    /// Checks what a creation can be checked for without a trainer, then refuses it.
    fn create(
        &self,
        caller: &Principal,
        r: CreateSupervisedFineTuningJobRequest,
    ) -> Result<SupervisedFineTuningJob, Error> {
        let parent = caller.own_parent(&r.parent)?;
        if !r.supervised_fine_tuning_job_id.is_empty() {
            validate_id(
                "supervised_fine_tuning_job_id",
                &r.supervised_fine_tuning_job_id,
            )?;
        }
        let job = r
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
        for (name, collection, value) in [
            ("dataset", "datasets", &job.dataset),
            ("evaluation_dataset", "datasets", &job.evaluation_dataset),
            ("base_model", "models", &job.base_model),
            ("warm_start_from", "models", &job.warm_start_from),
            ("output_model", "models", &job.output_model),
        ] {
            check_reference(&field(name), collection, value, account)?;
        }
        Err(Error::FailedPrecondition(NO_TRAINER.into()))
    }

    /// The caller's jobs: none, once the request checks out like any listing's.
    fn list(
        &self,
        caller: &Principal,
        r: &ListSupervisedFineTuningJobsRequest,
    ) -> Result<Listing<SupervisedFineTuningJob>, Error> {
        caller.own_parent(&r.parent)?;
        let query = JOB_FIELDS.query(&self.pages, &r.list_request(), &caller.account)?;
        Ok(query.page_of(&self.pages, Vec::new()))
    }
}

kiln_core::grpc_service! {
    impl FineTuningService for FineTuning {
        fn create_supervised_fine_tuning_job(CreateSupervisedFineTuningJobRequest)
            -> SupervisedFineTuningJob = |svc, caller, r| svc.create(&caller, r);
        fn get_supervised_fine_tuning_job(GetSupervisedFineTuningJobRequest)
            -> SupervisedFineTuningJob = |_svc, caller, r| no_such_job(&caller, &r.name);
        fn list_supervised_fine_tuning_jobs(ListSupervisedFineTuningJobsRequest)
            -> ListSupervisedFineTuningJobsResponse =
            |svc, caller, r| svc.list(&caller, &r).map(Into::into);
        fn cancel_supervised_fine_tuning_job(CancelSupervisedFineTuningJobRequest)
            -> SupervisedFineTuningJob = |_svc, caller, r| no_such_job(&caller, &r.name);
        fn delete_supervised_fine_tuning_job(DeleteSupervisedFineTuningJobRequest)
            -> DeleteSupervisedFineTuningJobResponse =
            |_svc, caller, r| no_such_job(&caller, &r.name);
    }
}

/// The fields a job list filters on and orders by.
static JOB_FIELDS: Fields<Getter<SupervisedFineTuningJob>> = Fields {
    collection: JOBS,
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
