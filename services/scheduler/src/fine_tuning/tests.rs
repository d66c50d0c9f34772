use kiln_core::auth::{Principal, Role};
use kiln_core::grpc::Reply;
use tonic::{Code, Request};

use super::*;

fn service() -> FineTuning {
    FineTuning::new(PageTokens::new(b"test page tokens"))
}

/// A user of account `acme`.
fn acme() -> Principal {
    Principal {
        account: "acme".into(),
        user: "ann".into(),
        api_key: "accounts/acme/users/ann/apiKeys/k".into(),
        roles: vec![Role::User],
        suspend_state: 0,
    }
}

fn as_caller<T>(caller: Principal, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(caller);
    request
}

/// The code and message of a call that must fail.
fn refused<T: std::fmt::Debug>(reply: Reply<T>) -> (Code, String) {
    let status = reply.expect_err("the call is refused");
    (status.code(), status.message().to_owned())
}

fn job() -> SupervisedFineTuningJob {
    SupervisedFineTuningJob {
        dataset: "accounts/acme/datasets/chats".into(),
        base_model: "accounts/kiln/models/qwen".into(),
        ..Default::default()
    }
}

fn create(parent: &str, id: &str, job: Option<SupervisedFineTuningJob>) -> (Code, String) {
    let request = CreateSupervisedFineTuningJobRequest {
        parent: parent.into(),
        supervised_fine_tuning_job_id: id.into(),
        supervised_fine_tuning_job: job,
    };
    let reply = answer(service().create_supervised_fine_tuning_job(as_caller(acme(), request)));
    refused(reply)
}

/// Runs a handler (they do no I/O) to its answer.
fn answer<T>(call: impl std::future::Future<Output = Reply<T>>) -> Reply<T> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(call)
}

#[test]
fn a_well_formed_create_is_refused_because_nothing_can_train() {
    let (code, message) = create("accounts/acme", "tune-1", Some(job()));
    assert_eq!(code, Code::FailedPrecondition);
    assert!(message.contains("no trainer is available"), "{message}");
    // Without an ID, and with an addon to continue instead of a base model: the same.
    let warm = SupervisedFineTuningJob {
        base_model: String::new(),
        warm_start_from: "accounts/acme/models/adapter".into(),
        ..job()
    };
    assert_eq!(
        create("accounts/acme", "", Some(warm)).0,
        Code::FailedPrecondition
    );
}

#[test]
fn create_checks_the_parent_and_its_tenancy_first() {
    let (code, message) = create("acme/x", "", Some(job()));
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.starts_with("parent:"), "{message}");
    let (code, message) = create("accounts/other", "", Some(job()));
    assert_eq!(code, Code::NotFound);
    assert!(message.contains("accounts/other"), "{message}");
}

#[test]
fn create_names_the_field_it_refuses() {
    let field = |parent: &str, id: &str, job| {
        let (code, message) = create(parent, id, job);
        assert_eq!(code, Code::InvalidArgument, "{message}");
        message.split(':').next().unwrap_or_default().to_owned()
    };
    assert_eq!(
        field("accounts/acme", "Bad_ID", Some(job())),
        "supervised_fine_tuning_job_id"
    );
    assert_eq!(
        field("accounts/acme", "", None),
        "supervised_fine_tuning_job"
    );
    type Edit = fn(&mut SupervisedFineTuningJob);
    let cases: [(&str, Edit); 6] = [
        ("dataset", |j| j.dataset.clear()),
        ("base_model", |j| j.base_model.clear()),
        ("dataset", |j| {
            j.dataset = "accounts/acme/models/chats".into()
        }),
        ("evaluation_dataset", |j| {
            j.evaluation_dataset = "a/b".into()
        }),
        ("output_model", |j| {
            j.output_model = "accounts/acme/models/Not An ID".into()
        }),
        ("display_name", |j| j.display_name = "x".repeat(257)),
    ];
    for (name, edit) in cases {
        let mut bad = job();
        edit(&mut bad);
        assert_eq!(
            field("accounts/acme", "", Some(bad)),
            format!("supervised_fine_tuning_job.{name}")
        );
    }
}

fn list(
    caller: Principal,
    request: ListSupervisedFineTuningJobsRequest,
) -> Reply<ListSupervisedFineTuningJobsResponse> {
    answer(service().list_supervised_fine_tuning_jobs(as_caller(caller, request)))
}

#[test]
fn list_is_an_empty_page_of_the_callers_account() {
    let page = list(
        acme(),
        ListSupervisedFineTuningJobsRequest {
            parent: "accounts/acme".into(),
            page_size: 10,
            filter: "state = JOB_STATE_RUNNING".into(),
            order_by: "create_time desc".into(),
            ..Default::default()
        },
    )
    .expect("an empty page")
    .into_inner();
    assert_eq!(page, ListSupervisedFineTuningJobsResponse::default());
    // A platform admin lists any account's.
    let admin = Principal {
        roles: vec![Role::PlatformAdmin],
        ..acme()
    };
    let other = ListSupervisedFineTuningJobsRequest {
        parent: "accounts/other".into(),
        ..Default::default()
    };
    assert!(list(admin, other.clone()).is_ok());
    let (code, _) = refused(list(acme(), other));
    assert_eq!(code, Code::NotFound);
}

#[test]
fn list_checks_its_request_like_every_listing() {
    let field = |request| {
        let (code, message) = refused(list(acme(), request));
        assert_eq!(code, Code::InvalidArgument, "{message}");
        message.split(':').next().unwrap_or_default().to_owned()
    };
    let request = |parent: &str| ListSupervisedFineTuningJobsRequest {
        parent: parent.into(),
        ..Default::default()
    };
    assert_eq!(field(request("accounts/acme/jobs")), "parent");
    assert_eq!(
        field(ListSupervisedFineTuningJobsRequest {
            page_size: -1,
            ..request("accounts/acme")
        }),
        "page_size"
    );
    assert_eq!(
        field(ListSupervisedFineTuningJobsRequest {
            page_token: "forged".into(),
            ..request("accounts/acme")
        }),
        "page_token"
    );
    assert_eq!(
        field(ListSupervisedFineTuningJobsRequest {
            filter: "node = nodes/n1".into(),
            ..request("accounts/acme")
        }),
        "filter"
    );
    assert_eq!(
        field(ListSupervisedFineTuningJobsRequest {
            order_by: "loss".into(),
            ..request("accounts/acme")
        }),
        "order_by"
    );
}

#[test]
fn get_cancel_and_delete_find_no_job() {
    let ft = service();
    let answers = |name: &str| {
        let get = GetSupervisedFineTuningJobRequest { name: name.into() };
        let cancel = CancelSupervisedFineTuningJobRequest { name: name.into() };
        let delete = DeleteSupervisedFineTuningJobRequest { name: name.into() };
        [
            refused(answer(
                ft.get_supervised_fine_tuning_job(as_caller(acme(), get)),
            )),
            refused(answer(
                ft.cancel_supervised_fine_tuning_job(as_caller(acme(), cancel)),
            )),
            refused(answer(
                ft.delete_supervised_fine_tuning_job(as_caller(acme(), delete)),
            )),
        ]
    };
    for (code, message) in answers("accounts/acme/supervisedFineTuningJobs/tune-1") {
        assert_eq!(code, Code::NotFound);
        assert!(
            message.contains("accounts/acme/supervisedFineTuningJobs/tune-1"),
            "{message}"
        );
    }
    // A bare ID is in the caller's account; another account's job is as absent.
    for (code, message) in answers("tune-1") {
        assert_eq!(code, Code::NotFound);
        assert!(message.contains("accounts/acme/"), "{message}");
    }
    for (code, _) in answers("accounts/other/supervisedFineTuningJobs/tune-1") {
        assert_eq!(code, Code::NotFound);
    }
    for (code, message) in answers("accounts/acme/deployments/tune-1") {
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.starts_with("name:"), "{message}");
    }
}

#[test]
fn a_call_without_a_principal_is_unauthenticated() {
    let request = Request::new(GetSupervisedFineTuningJobRequest {
        name: "tune-1".into(),
    });
    let (code, _) = refused(answer(service().get_supervised_fine_tuning_job(request)));
    assert_eq!(code, Code::Unauthenticated);
}
