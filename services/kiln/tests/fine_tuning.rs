//! The fine-tuning commands as a user runs them, against a scripted `FineTuningService`: a
//! job followed with `--wait` to its end (progress on stderr, the job on stdout, the exit
//! status from its final state), and `get`, `list`, `cancel`, `delete` by short and full
//! names.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_proto::common::v1 as commonv1;
use kiln_proto::scheduler::v1 as schv1;
use kiln_tests::Ran;
use schv1::fine_tuning_service_server::{FineTuningService, FineTuningServiceServer};
use schv1::supervised_fine_tuning_job::JobState;
use tokio::process::Command;
use tonic::{Request, Response, Status};

const NAME: &str = "accounts/acme/supervisedFineTuningJobs/tone";

/// What the fake service answers and what it was asked.
#[derive(Default)]
struct Script {
    /// The job each Get answers in turn (the last one again once they run out).
    gets: Vec<schv1::SupervisedFineTuningJob>,
    gets_answered: usize,
    /// The requests, in order, as `Rpc name`.
    calls: Vec<String>,
    created: Option<schv1::CreateSupervisedFineTuningJobRequest>,
    list: Option<schv1::ListSupervisedFineTuningJobsRequest>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap()
    }
}

#[tonic::async_trait]
impl FineTuningService for Fake {
    async fn create_supervised_fine_tuning_job(
        &self,
        request: Request<schv1::CreateSupervisedFineTuningJobRequest>,
    ) -> Result<Response<schv1::SupervisedFineTuningJob>, Status> {
        let request = request.into_inner();
        let mut script = self.script();
        script.calls.push(format!("Create {}", request.parent));
        let mut job = request
            .supervised_fine_tuning_job
            .clone()
            .unwrap_or_default();
        job.name = format!(
            "{}/supervisedFineTuningJobs/{}",
            request.parent, request.supervised_fine_tuning_job_id
        );
        job.state = JobState::Creating as i32;
        script.created = Some(request);
        Ok(Response::new(job))
    }

    async fn get_supervised_fine_tuning_job(
        &self,
        request: Request<schv1::GetSupervisedFineTuningJobRequest>,
    ) -> Result<Response<schv1::SupervisedFineTuningJob>, Status> {
        let mut script = self.script();
        script.calls.push(format!("Get {}", request.get_ref().name));
        let n = script
            .gets_answered
            .min(script.gets.len().saturating_sub(1));
        script.gets_answered += 1;
        match script.gets.get(n) {
            Some(job) => Ok(Response::new(job.clone())),
            None => Err(Status::not_found(request.into_inner().name)),
        }
    }

    async fn list_supervised_fine_tuning_jobs(
        &self,
        request: Request<schv1::ListSupervisedFineTuningJobsRequest>,
    ) -> Result<Response<schv1::ListSupervisedFineTuningJobsResponse>, Status> {
        let mut script = self.script();
        script
            .calls
            .push(format!("List {}", request.get_ref().parent));
        script.list = Some(request.into_inner());
        Ok(Response::new(schv1::ListSupervisedFineTuningJobsResponse {
            supervised_fine_tuning_jobs: script.gets.last().cloned().into_iter().collect(),
            ..Default::default()
        }))
    }

    async fn cancel_supervised_fine_tuning_job(
        &self,
        request: Request<schv1::CancelSupervisedFineTuningJobRequest>,
    ) -> Result<Response<schv1::SupervisedFineTuningJob>, Status> {
        let name = request.into_inner().name;
        self.script().calls.push(format!("Cancel {name}"));
        Ok(Response::new(job(&name, JobState::Cancelling)))
    }

    async fn delete_supervised_fine_tuning_job(
        &self,
        request: Request<schv1::DeleteSupervisedFineTuningJobRequest>,
    ) -> Result<Response<schv1::DeleteSupervisedFineTuningJobResponse>, Status> {
        let name = request.into_inner().name;
        self.script().calls.push(format!("Delete {name}"));
        Ok(Response::new(Default::default()))
    }
}

fn job(name: &str, state: JobState) -> schv1::SupervisedFineTuningJob {
    schv1::SupervisedFineTuningJob {
        name: name.into(),
        state: state as i32,
        dataset: "accounts/acme/datasets/train".into(),
        base_model: "accounts/kiln/models/m".into(),
        output_model: "accounts/acme/models/tone".into(),
        epochs: 2,
        ..Default::default()
    }
}

/// The job at `step` of 4 (two epochs of two steps), its losses so far.
fn running(step: i64) -> schv1::SupervisedFineTuningJob {
    let losses = [2.0, 1.5, 1.0, 0.5];
    schv1::SupervisedFineTuningJob {
        job_progress: Some(schv1::JobProgress {
            percent: (step * 25) as i32,
            epoch: if step > 2 { 2 } else { 1 },
            step,
            total_steps: 4,
            loss: losses[step as usize - 1],
            tokens_processed: step * 100,
            examples: 8,
            ..Default::default()
        }),
        training_losses: losses[..step as usize].to_vec(),
        node: "nodes/n1".into(),
        ..job(NAME, JobState::Running)
    }
}

/// Serves `fake` on a free port; answers its URL.
async fn serve(fake: Fake) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FineTuningServiceServer::new(fake))
            .serve_with_incoming(incoming),
    );
    format!("http://{addr}")
}

/// Runs `kiln <line>` in the account acme against `server`.
async fn kiln(server: &str, line: &str) -> Ran {
    let out = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_kiln")))
        .args([
            "--server",
            server,
            "--api-key",
            "kiln_test",
            "--account",
            "acme",
        ])
        .args(line.split_whitespace())
        .output()
        .await
        .unwrap();
    Ran::from(out)
}

#[tokio::test]
async fn create_wait_follows_the_job_to_completion() {
    let fake = Fake::default();
    let mut completed = running(4);
    completed.state = JobState::Completed as i32;
    completed.job_progress.as_mut().unwrap().percent = 100;
    fake.script().gets = vec![
        job(NAME, JobState::Pending),
        running(1),
        running(3),
        completed,
    ];
    let server = serve(fake.clone()).await;
    let line = "create sftj tone --dataset train --base-model accounts/kiln/models/m \
                --eval-dataset eval --epochs 2 --target-modules q_proj,v_proj --wait";
    let ran = kiln(&server, line).await;
    assert!(ran.ok, "{}", ran.err);
    // Short IDs are names in the account; full names stay.
    let created = fake.script().created.clone().unwrap();
    assert_eq!(created.parent, "accounts/acme");
    assert_eq!(created.supervised_fine_tuning_job_id, "tone");
    let asked = created.supervised_fine_tuning_job.unwrap();
    assert_eq!(asked.dataset, "accounts/acme/datasets/train");
    assert_eq!(asked.evaluation_dataset, "accounts/acme/datasets/eval");
    assert_eq!(asked.base_model, "accounts/kiln/models/m");
    assert_eq!((asked.epochs, asked.target_modules.len()), (2, 2));
    // Off a terminal: one progress line per change, on stderr.
    let progress: Vec<&str> = ran.err.lines().collect();
    assert_eq!(
        progress,
        [
            "JOB_STATE_PENDING",
            "JOB_STATE_RUNNING  █████░░░░░░░░░░░░░░░  25%  epoch 1/2  step 1/4  loss 2.0000",
            "JOB_STATE_RUNNING  ███████████████░░░░░  75%  epoch 2/2  step 3/4  loss 1.0000",
            "JOB_STATE_COMPLETED  ████████████████████ 100%  epoch 2/2  step 4/4  loss 0.5000",
        ]
    );
    // The job as it ended, as `get` shows it.
    assert!(
        ran.out.contains("state:          JOB_STATE_COMPLETED\n"),
        "{}",
        ran.out
    );
    assert!(
        ran.out
            .contains("loss curve:     █▆▃▁  first 2.0000  last 0.5000"),
        "{}",
        ran.out
    );
}

#[tokio::test]
async fn create_wait_fails_with_the_status_of_a_failed_job() {
    let fake = Fake::default();
    let mut failed = running(2);
    failed.state = JobState::Failed as i32;
    failed.status = Some(commonv1::Status {
        code: 13,
        message: "the loss is NaN at step 2".into(),
    });
    fake.script().gets = vec![failed];
    let server = serve(fake.clone()).await;
    let ran = kiln(
        &server,
        "create sftj tone --dataset d --base-model m --wait",
    )
    .await;
    assert!(!ran.ok);
    assert!(
        ran.err.ends_with(&format!(
            "error: {NAME} failed: the loss is NaN at step 2\n"
        )),
        "{}",
        ran.err
    );
    let status = "status:         the loss is NaN at step 2\n";
    assert!(ran.out.contains(status), "{}", ran.out);
    // Without --wait: the job as created, and no Get.
    let ran = kiln(
        &server,
        "create sftj tone --dataset d --base-model m -o json",
    )
    .await;
    assert!(ran.ok, "{}", ran.err);
    let json: serde_json::Value = serde_json::from_str(&ran.out).unwrap();
    assert_eq!(json["state"], "JOB_STATE_CREATING");
    assert_eq!(json["base_model"], "accounts/acme/models/m");
    let gets = fake
        .script()
        .calls
        .iter()
        .filter(|c| c.starts_with("Get"))
        .count();
    assert_eq!(gets, 1);
}

#[tokio::test]
async fn get_list_cancel_and_delete_name_the_job() {
    let fake = Fake::default();
    fake.script().gets = vec![running(2)];
    let server = serve(fake.clone()).await;

    let ran = kiln(&server, "get sftj tone").await;
    assert!(ran.ok, "{}", ran.err);
    assert!(
        ran.out
            .contains("progress:       50%  epoch 1/2  step 2/4\n"),
        "{}",
        ran.out
    );
    let ran = kiln(
        &server,
        &format!("get supervised-fine-tuning-job {NAME} -o json"),
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&ran.out).unwrap();
    assert_eq!(json["training_losses"], serde_json::json!([2.0, 1.5]));

    let ran = kiln(
        &server,
        "list sftj --filter state=JOB_STATE_RUNNING --order-by name",
    )
    .await;
    assert!(ran.ok, "{}", ran.err);
    let lines: Vec<&str> = ran.out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", ran.out);
    assert!(lines[0].starts_with("NAME") && lines[0].contains("PROGRESS"));
    assert!(
        lines[1].starts_with(NAME) && lines[1].contains(" 50% "),
        "{}",
        lines[1]
    );
    let list = fake.script().list.clone().unwrap();
    assert_eq!(list.parent, "accounts/acme");
    assert_eq!(
        (list.filter.as_str(), list.order_by.as_str()),
        ("state=JOB_STATE_RUNNING", "name")
    );

    let ran = kiln(&server, "cancel sftj tone").await;
    assert!(ran.ok, "{}", ran.err);
    assert!(ran.out.contains("JOB_STATE_CANCELLING"), "{}", ran.out);
    let ran = kiln(&server, "delete sftj tone").await;
    assert!(ran.ok, "{}", ran.err);
    assert_eq!(ran.out, format!("deleted {NAME}\n"));

    let calls = fake.script().calls.clone();
    assert_eq!(
        calls,
        [
            format!("Get {NAME}"),
            format!("Get {NAME}"),
            "List accounts/acme".to_owned(),
            format!("Cancel {NAME}"),
            format!("Delete {NAME}"),
        ]
    );
}
