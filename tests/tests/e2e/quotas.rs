//! Quotas: accelerators, requests per minute and the monthly spend limit, each refusing what
//! is over it and only that.

use std::time::Duration;

use kiln_events::Body;
use kiln_proto::billing::v1 as bilv1;
use kiln_proto::scheduler::v1 as schv1;
use kiln_tests::billing::{nanos, set_quota, totals};
use kiln_tests::deployments::{self, on, wait_ready};
use kiln_tests::events::{Events, next_event};
use kiln_tests::inference::{MINILM, embed_reference, mesh_with_private_minilm};
use kiln_tests::workers::Worker;
use kiln_tests::{MeshOptions, expect_code, wait_for};
use tonic::Code;

use crate::billing::{H100, priced, tokens};

const H100_QUOTA: &str = "accelerator-nvidia-h100-80gb";

/// The next event of billing's that `pick` takes (30 s at most).
async fn next_billing_event<T>(
    events: &mut Events,
    what: &str,
    pick: impl FnMut(Body) -> Option<T>,
) -> T {
    next_event(events, Duration::from_secs(30), what, pick).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_what_is_over_them_and_only_that() {
    // MiniLM at $0.05 a token, so a few requests cross a $1 spend limit.
    let billing = priced(&[(MINILM, tokens("", "", "50000"))]);
    let (mesh, _assets, acme, model) = mesh_with_private_minilm(MeshOptions {
        billing: Some(billing),
        ..Default::default()
    })
    .await;
    let admin = mesh.admin().await;
    let _node = Worker::start(&mesh, "node-q", &[(H100, 8)]).await;
    let mut billing_events = mesh.subscribe("kiln.billing.>").await;

    // Every account has every quota, at the defaults.
    let listed = kiln_tests::billing::quotas(&acme)
        .list_quotas(bilv1::ListQuotasRequest::default())
        .await
        .unwrap()
        .into_inner();
    let quota = |id: &str| {
        listed
            .quotas
            .iter()
            .find(|q| q.name == format!("accounts/acme/quotas/{id}"))
            .unwrap_or_else(|| panic!("{id} in {:?}", listed.quotas))
            .clone()
    };
    assert_eq!(
        (quota(H100_QUOTA).value, quota(H100_QUOTA).unit.as_str()),
        (16, "accelerators")
    );
    assert_eq!(quota("monthly-spend-usd").value, 1_000);
    assert_eq!(quota("serverless-inference-rpm").unit, "requests/min");

    // A user may not go beyond max_value, nor change it; the admin sets anything.
    let err = set_quota(&acme, "acme", H100_QUOTA, 100).await;
    let err = expect_code(err, Code::InvalidArgument);
    assert!(err.message().contains("quota.value"), "{}", err.message());
    let raised = bilv1::Quota {
        name: format!("accounts/acme/quotas/{H100_QUOTA}"),
        max_value: 100,
        ..Default::default()
    };
    let err = kiln_tests::billing::update_quota(&acme, raised, &["max_value"]).await;
    expect_code(err, Code::PermissionDenied);
    let other = mesh.tenant_channel("globex").await;
    let err = set_quota(&other, "acme", H100_QUOTA, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "another account's quota");
    let set = set_quota(&admin, "acme", H100_QUOTA, 4).await.unwrap();
    assert_eq!((set.value, set.max_value), (4, 16));
    let updated = next_billing_event(&mut billing_events, "quota.updated", |b| match b {
        Body::QuotaUpdated(u) => Some(u),
        _ => None,
    })
    .await;
    assert_eq!(updated.previous_value, 16);
    assert_eq!(updated.quota.unwrap().value, 4);

    // Accelerators: a deployment that could hold 2 × 3 H100 is over 4, and nothing of it
    // is stored or placed.
    let create = |id: &'static str, max: i32, count: i32| {
        let deployment = schv1::Deployment {
            base_model: model.clone(),
            min_replica_count: 1,
            max_replica_count: max,
            ..on(H100, count)
        };
        let acme = acme.clone();
        async move { deployments::create(&acme, "accounts/acme", id, deployment).await }
    };
    let err = expect_code(create("big", 3, 2).await, Code::ResourceExhausted);
    assert!(err.message().contains(H100_QUOTA), "{}", err.message());
    let listed = deployments::deployments(&acme)
        .list_deployments(schv1::ListDeploymentsRequest {
            parent: "accounts/acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.deployments.is_empty(), "{:?}", listed.deployments);
    // Exactly at the quota fits; one more accelerator at once after it does not.
    let fits = create("fits", 2, 2).await.unwrap();
    expect_code(create("second", 1, 1).await, Code::ResourceExhausted);
    let wider = schv1::Deployment {
        name: fits.name.clone(),
        max_replica_count: 3,
        ..Default::default()
    };
    let err = deployments::update_deployment(&acme, wider, &["max_replica_count"]).await;
    expect_code(err, Code::ResourceExhausted);
    wait_ready(&acme, &fits.name, 1).await;
    assert_eq!(
        deployments::replica_nodes(&admin, &fits.name).await,
        vec!["nodes/node-q".to_owned()]
    );
    // Billing's view of the quota follows the scheduler's events.
    wait_for(Duration::from_secs(30), "the quota's usage", || async {
        let request = bilv1::GetQuotaRequest {
            name: H100_QUOTA.into(),
        };
        let quota = kiln_tests::billing::quotas(&acme).get_quota(request).await;
        (quota.unwrap().into_inner().usage == 4.0).then_some(())
    })
    .await;
    // Freed accelerators can be used again; a restored deployment is checked again.
    deployments::delete(&acme, &fits.name).await.unwrap();
    create("second", 1, 3)
        .await
        .expect("3 of 4 once the first is deleted");
    let restored = deployments::deployments(&acme)
        .undelete_deployment(schv1::UndeleteDeploymentRequest {
            name: fits.name.clone(),
        })
        .await;
    expect_code(restored, Code::ResourceExhausted);

    // Requests per minute: a burst over the limit loses only the excess, with a retry delay.
    set_quota(&admin, "globex", "serverless-inference-rpm", 5)
        .await
        .unwrap();
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let other = other.clone();
            tokio::spawn(async move { embed_reference(&other, MINILM).await })
        })
        .collect();
    let mut refused = Vec::new();
    let mut answered = 0;
    for call in burst {
        match call.await.unwrap() {
            Ok(_) => answered += 1,
            Err(status) => refused.push(status),
        }
    }
    assert_eq!((answered, refused.len()), (5, 3), "{refused:?}");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("serverless-inference-rpm"),
            "{}",
            status.message()
        );
        let retry = tonic_types::StatusExt::get_details_retry_info(status).expect("RetryInfo");
        assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
    }
    // Other accounts are not limited by globex's quota.
    embed_reference(&acme, MINILM)
        .await
        .expect("acme is under its own limits");

    // The monthly spend limit: acme lowers its own to $1; requests cost about $0.50 each, so
    // a few of them suspend the account, by an event, and then are refused.
    let lowered = set_quota(&acme, "acme", "monthly-spend-usd", 1)
        .await
        .unwrap();
    assert_eq!(lowered.value, 1);
    let what = "the account to be suspended";
    let refusal = wait_for(Duration::from_secs(60), what, || async {
        match embed_reference(&acme, MINILM).await {
            Err(status) if status.code() == Code::FailedPrecondition => Some(status),
            Err(status) => panic!("unexpected {status:?}"),
            Ok(_) => None,
        }
    })
    .await;
    assert!(
        refusal.message().contains("MONTHLY_SPEND_LIMIT_EXCEEDED"),
        "{}",
        refusal.message()
    );
    let suspended = next_billing_event(&mut billing_events, "account.suspended", |b| match b {
        Body::AccountSuspended(s) => Some(s),
        _ => None,
    })
    .await;
    assert_eq!(suspended.account, "accounts/acme");
    let account = kiln_tests::get_account(&acme, "accounts/acme")
        .await
        .unwrap();
    assert_eq!(
        account.suspend_state,
        kiln_proto::identity::v1::account::SuspendState::MonthlySpendLimitExceeded as i32
    );
    let spent = totals(&acme, "accounts/acme").await;
    assert!(nanos(&spent.cost) >= 1_000_000_000, "{:?}", spent.cost);
    expect_code(create("third", 1, 1).await, Code::FailedPrecondition);
    // Still refused a moment later: the suspension holds until the limit is raised.
    let refused = embed_reference(&acme, MINILM).await;
    expect_code(refused, Code::FailedPrecondition);

    set_quota(&admin, "acme", "monthly-spend-usd", 2_000)
        .await
        .unwrap();
    next_billing_event(&mut billing_events, "account.unsuspended", |b| match b {
        Body::AccountUnsuspended(u) if u.account == "accounts/acme" => Some(()),
        _ => None,
    })
    .await;
    let what = "requests to be served again";
    wait_for(Duration::from_secs(30), what, || async {
        embed_reference(&acme, MINILM).await.ok()
    })
    .await;
    mesh.shutdown().await;
}
