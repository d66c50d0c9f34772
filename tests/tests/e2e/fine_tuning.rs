//! FineTuningService is served and answers honestly while no trainer exists: no jobs, the
//! usual tenancy, and a creation refused as a failed precondition.

use kiln_proto::scheduler::v1 as schv1;
use kiln_proto::scheduler::v1::fine_tuning_service_client::FineTuningServiceClient;
use kiln_tests::{TestMesh, expect_code};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fine_tuning_jobs_are_served_and_refused_honestly() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let key = kiln_tests::tenant(&admin, "acme").await;
    kiln_tests::tenant(&admin, "globex").await;
    let mut jobs = FineTuningServiceClient::new(mesh.channel(Some(&key)).await);

    let none = jobs
        .list_supervised_fine_tuning_jobs(schv1::ListSupervisedFineTuningJobsRequest {
            parent: "accounts/acme".into(),
            ..Default::default()
        })
        .await
        .expect("served, not UNIMPLEMENTED")
        .into_inner();
    assert!(none.supervised_fine_tuning_jobs.is_empty());
    let other = schv1::ListSupervisedFineTuningJobsRequest {
        parent: "accounts/globex".into(),
        ..Default::default()
    };
    expect_code(
        jobs.list_supervised_fine_tuning_jobs(other).await,
        Code::NotFound,
    );
    let missing = schv1::GetSupervisedFineTuningJobRequest {
        name: "accounts/acme/supervisedFineTuningJobs/j1".into(),
    };
    expect_code(
        jobs.get_supervised_fine_tuning_job(missing).await,
        Code::NotFound,
    );

    let refused = jobs
        .create_supervised_fine_tuning_job(schv1::CreateSupervisedFineTuningJobRequest {
            parent: "accounts/acme".into(),
            supervised_fine_tuning_job_id: "j1".into(),
            supervised_fine_tuning_job: Some(schv1::SupervisedFineTuningJob {
                dataset: "accounts/acme/datasets/train".into(),
                base_model: "accounts/kiln/models/smollm2-135m-instruct".into(),
                ..Default::default()
            }),
        })
        .await;
    let refused = expect_code(refused, Code::FailedPrecondition);
    assert!(refused.message().contains("train"), "{}", refused.message());
    mesh.shutdown().await;
}
