//! Supervised fine-tuning jobs (`sftj` for short): `kiln create|get|list|cancel|delete
//! supervised-fine-tuning-job`. `create --wait` follows the job with a progress line; `get`
//! shows its fields and its loss curve.

mod args;
mod chart;
mod print;
mod wait;

use clap::Subcommand;
use kiln_proto::scheduler::v1 as schv1;
use schv1::fine_tuning_service_client::FineTuningServiceClient;

use crate::client::{
    Authed, Client, CreateRpc, Format, GetRpc, InParent, ListArgs, delete_and_print,
    list_and_print, resource,
};
pub use args::CreateJobArgs;
use print::print_job;

#[derive(Debug, Subcommand)]
pub enum Create {
    /// Create a supervised fine-tuning job: train a LoRA addon of a base model on a dataset
    /// (--wait: follow it until it ends).
    #[command(visible_alias = "sftj")]
    SupervisedFineTuningJob(Box<CreateJobArgs>),
}

#[derive(Debug, Subcommand)]
pub enum Get {
    /// Show a supervised fine-tuning job: its settings, progress and loss curve (an ID in
    /// the account, or a full name).
    #[command(visible_alias = "sftj")]
    SupervisedFineTuningJob { job: String },
}

#[derive(Debug, Subcommand)]
pub enum List {
    /// List the account's supervised fine-tuning jobs (filter fields: state, base_model,
    /// dataset, output_model; order by name, create_time, update_time, completed_time).
    #[command(
        visible_aliases = ["sftj", "sftjs"],
        alias = "supervised-fine-tuning-job"
    )]
    SupervisedFineTuningJobs(ListArgs),
}

#[derive(Debug, Subcommand)]
pub enum Cancel {
    /// Stop a supervised fine-tuning job that is not finished (an ID in the account, or a
    /// full name).
    #[command(visible_alias = "sftj")]
    SupervisedFineTuningJob { job: String },
}

#[derive(Debug, Subcommand)]
pub enum Delete {
    /// Delete a finished supervised fine-tuning job (its output model stays).
    #[command(visible_alias = "sftj")]
    SupervisedFineTuningJob { job: String },
}

fn jobs(client: &Client) -> FineTuningServiceClient<Authed> {
    // A job holds a loss per step.
    FineTuningServiceClient::new(client.authed()).max_decoding_message_size(64 << 20)
}

resource!(schv1::SupervisedFineTuningJob, jobs {
    create: create_supervised_fine_tuning_job(schv1::CreateSupervisedFineTuningJobRequest),
    get: get_supervised_fine_tuning_job(schv1::GetSupervisedFineTuningJobRequest)
        in "supervisedFineTuningJobs",
    list: list_supervised_fine_tuning_jobs(schv1::ListSupervisedFineTuningJobsRequest, parent)
        => supervised_fine_tuning_jobs,
    delete: delete_supervised_fine_tuning_job(schv1::DeleteSupervisedFineTuningJobRequest),
});

type Job = schv1::SupervisedFineTuningJob;

pub(crate) async fn create(client: &Client, format: Format, command: Create) -> anyhow::Result<()> {
    let Create::SupervisedFineTuningJob(args) = command;
    let mut job = args.job()?;
    for (collection, reference) in args::references(&mut job) {
        if !reference.is_empty() {
            *reference = client.full_name(collection, reference).await?;
        }
    }
    let request = schv1::CreateSupervisedFineTuningJobRequest {
        parent: client.account().await?,
        supervised_fine_tuning_job_id: args.job_id.clone().unwrap_or_default(),
        supervised_fine_tuning_job: Some(job),
    };
    let created = Job::create(client, request).await?;
    if !args.wait {
        print_job(format, &created);
        return Ok(());
    }
    let ended = wait::follow(jobs(client), &created.name).await?;
    print_job(format, &ended);
    wait::outcome(&ended)
}

pub(crate) async fn get(client: &Client, format: Format, command: Get) -> anyhow::Result<()> {
    let Get::SupervisedFineTuningJob { job } = command;
    let name = client.full_name(Job::COLLECTION, &job).await?;
    print_job(format, &Job::get(client, name).await?);
    Ok(())
}

pub(crate) async fn list(client: &Client, format: Format, command: List) -> anyhow::Result<()> {
    let List::SupervisedFineTuningJobs(list) = command;
    let request = InParent::in_parent(client.account().await?);
    list_and_print::<Job>(client, format, &list, request).await
}

pub(crate) async fn cancel(client: &Client, format: Format, command: Cancel) -> anyhow::Result<()> {
    let Cancel::SupervisedFineTuningJob { job } = command;
    let name = client.full_name(Job::COLLECTION, &job).await?;
    let request = schv1::CancelSupervisedFineTuningJobRequest { name };
    let cancelled = jobs(client)
        .cancel_supervised_fine_tuning_job(request)
        .await?;
    print_job(format, cancelled.get_ref());
    Ok(())
}

pub(crate) async fn delete(client: &Client, format: Format, command: Delete) -> anyhow::Result<()> {
    let Delete::SupervisedFineTuningJob { job } = command;
    delete_and_print::<Job>(client, format, &job).await
}
