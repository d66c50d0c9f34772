//! Fine-tuning for the suites: the tiny llama as a tenant's base model, chat datasets, and
//! jobs created and followed through FineTuningService.

use std::time::Duration;

use kiln_proto::registry::v1 as regv1;
use kiln_proto::scheduler::v1 as schv1;
use kiln_proto::scheduler::v1::fine_tuning_service_client::FineTuningServiceClient;
use kiln_proto::scheduler::v1::supervised_fine_tuning_job::JobState;

use crate::AuthedChannel;
use crate::registry::{create_model, models, upload, upload_dataset, validate};

pub fn jobs(ch: &AuthedChannel) -> FineTuningServiceClient<AuthedChannel> {
    FineTuningServiceClient::new(ch.clone())
}

/// Uploads the tiny llama (seed 1) as `account`'s base model `id`, validated and prepared
/// in float32; returns its name.
pub async fn tiny_base(ch: &AuthedChannel, account: &str, id: &str) -> String {
    let model = create_model(ch, account, id, regv1::model::Kind::BaseModel, None).await;
    let bytes = crate::tiny_llama::tiny_llama_gguf(1);
    upload(ch, &model.name, &[("tiny-llama.gguf", &bytes)])
        .await
        .expect("upload the tiny llama");
    assert!(validate(ch, &model.name).await.valid);
    let request = regv1::PrepareModelRequest {
        name: model.name.clone(),
        precision: kiln_proto::common::v1::Precision::Fp32 as i32,
        force: false,
    };
    let prepared = models(ch).prepare_model(request).await.expect("prepare");
    let state = prepared.into_inner().prepared_bundles[0].state;
    assert_eq!(state, regv1::prepared_bundle::State::Ready as i32);
    model.name
}

/// A READY chat dataset `id` of `account` with one user question and its answer per pair.
pub async fn chat_dataset<Q: AsRef<str>, A: AsRef<str>>(
    ch: &AuthedChannel,
    account: &str,
    id: &str,
    pairs: &[(Q, A)],
) -> String {
    let dataset = crate::registry::create_dataset(ch, account, id).await;
    let jsonl: String = pairs
        .iter()
        .map(|(q, a)| {
            let line = serde_json::json!({"messages": [
                {"role": "user", "content": q.as_ref()},
                {"role": "assistant", "content": a.as_ref()},
            ]});
            format!("{line}\n")
        })
        .collect();
    let uploaded = upload_dataset(ch, &dataset.name, jsonl.as_bytes())
        .await
        .expect("upload the dataset");
    assert_eq!(
        uploaded.state,
        regv1::dataset::State::Ready as i32,
        "{uploaded:?}"
    );
    dataset.name
}

/// Creates job `id` in `account`.
pub async fn create_job(
    ch: &AuthedChannel,
    account: &str,
    id: &str,
    job: schv1::SupervisedFineTuningJob,
) -> Result<schv1::SupervisedFineTuningJob, tonic::Status> {
    let request = schv1::CreateSupervisedFineTuningJobRequest {
        parent: format!("accounts/{account}"),
        supervised_fine_tuning_job_id: id.to_owned(),
        supervised_fine_tuning_job: Some(job),
    };
    Ok(jobs(ch)
        .create_supervised_fine_tuning_job(request)
        .await?
        .into_inner())
}

pub async fn get_job(
    ch: &AuthedChannel,
    name: &str,
) -> Result<schv1::SupervisedFineTuningJob, tonic::Status> {
    let request = schv1::GetSupervisedFineTuningJobRequest {
        name: name.to_owned(),
    };
    Ok(jobs(ch)
        .get_supervised_fine_tuning_job(request)
        .await?
        .into_inner())
}

/// Job `name` once `done` holds of it (within `timeout`).
pub async fn wait_job(
    ch: &AuthedChannel,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&schv1::SupervisedFineTuningJob) -> bool,
) -> schv1::SupervisedFineTuningJob {
    crate::wait_for(timeout, what, || async {
        let job = get_job(ch, name).await.ok()?;
        done(&job).then_some(job)
    })
    .await
}

/// Job `name` once it is over (COMPLETED, FAILED or CANCELLED).
pub async fn wait_over(
    ch: &AuthedChannel,
    name: &str,
    timeout: Duration,
) -> schv1::SupervisedFineTuningJob {
    let over = [JobState::Completed, JobState::Failed, JobState::Cancelled].map(|s| s as i32);
    wait_job(ch, name, timeout, "the job to end", |j| {
        over.contains(&j.state)
    })
    .await
}
