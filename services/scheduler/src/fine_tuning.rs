//! `FineTuningService` until fine-tuning lands: served, so clients get honest answers rather
//! than UNIMPLEMENTED. Names and tenancy are checked as on every other RPC (another account's
//! parent is NOT_FOUND, a malformed name INVALID_ARGUMENT naming the field); there are no
//! jobs, so List is an empty page and Get, Cancel and Delete are NOT_FOUND; Create checks
//! what it can without a trainer, then refuses with FAILED_PRECONDITION.

use kiln_core::Error;
use kiln_core::auth::principal;
use kiln_core::grpc::{ListRpc, reply_list, split};
use kiln_core::listing::{Field, Fields, Getter, Kind, Value, time_value};
use kiln_core::names::{ChildName, validate_display_name, validate_id};
use kiln_core::page::PageTokens;
use kiln_proto::scheduler::v1::fine_tuning_service_server::FineTuningService;
use kiln_proto::scheduler::v1::*;
use tonic::{Request, Response, Status};

use crate::resource::own_parent;

type Reply<T> = Result<Response<T>, Status>;

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
fn no_such_job<T, R>(request: &Request<T>, name: &str) -> Reply<R> {
    let caller = principal(request)?;
    let parsed = ChildName::parse("name", JOBS, name, Some(&caller.account))?;
    Err(Error::not_found(parsed).into())
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

#[tonic::async_trait]
impl FineTuningService for FineTuning {
    async fn create_supervised_fine_tuning_job(
        &self,
        request: Request<CreateSupervisedFineTuningJobRequest>,
    ) -> Reply<SupervisedFineTuningJob> {
        let caller = principal(&request)?.clone();
        let r = request.into_inner();
        let parent = own_parent(&caller, &r.parent)?;
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
            return Err(Error::invalid(field("dataset"), "is required").into());
        }
        if job.base_model.is_empty() && job.warm_start_from.is_empty() {
            return Err(Error::invalid(
                field("base_model"),
                "is required (unless warm_start_from names an addon to continue)",
            )
            .into());
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
        Err(Error::FailedPrecondition(NO_TRAINER.into()).into())
    }

    async fn get_supervised_fine_tuning_job(
        &self,
        request: Request<GetSupervisedFineTuningJobRequest>,
    ) -> Reply<SupervisedFineTuningJob> {
        let name = request.get_ref().name.clone();
        no_such_job(&request, &name)
    }

    async fn list_supervised_fine_tuning_jobs(
        &self,
        request: Request<ListSupervisedFineTuningJobsRequest>,
    ) -> Reply<ListSupervisedFineTuningJobsResponse> {
        let (caller, r) = split(request)?;
        own_parent(&caller, &r.parent)?;
        let query = JOB_FIELDS.query(&self.pages, &r.list_request(), &caller.account)?;
        reply_list(Ok::<_, Error>(query.page_of(&self.pages, Vec::new())))
    }

    async fn cancel_supervised_fine_tuning_job(
        &self,
        request: Request<CancelSupervisedFineTuningJobRequest>,
    ) -> Reply<SupervisedFineTuningJob> {
        let name = request.get_ref().name.clone();
        no_such_job(&request, &name)
    }

    async fn delete_supervised_fine_tuning_job(
        &self,
        request: Request<DeleteSupervisedFineTuningJobRequest>,
    ) -> Reply<DeleteSupervisedFineTuningJobResponse> {
        let name = request.get_ref().name.clone();
        no_such_job(&request, &name)
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
