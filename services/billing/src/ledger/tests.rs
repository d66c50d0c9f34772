//! The ledger end to end on SQLite: ingest, booking, replica time and spend limits.

use kiln_core::grpc::Update;
use kiln_core::time::{MICROS_PER_DAY, micros_to_timestamp, now_micros, utc_midnight};
use kiln_events::records::HasRecords as _;
use kiln_events::{Body, Event, new_event};
use kiln_proto::billing::v1::{GetUsageRequest, Quota, UsageRow};
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::events::v1 as ev;
use kiln_proto::registry::v1::{BaseModelDetails, Model, PeftDetails};
use kiln_proto::scheduler::v1::Deployment;
use kiln_proto::scheduler::v1::deployment::DeploymentType;
use kiln_store::query;

use crate::service::Billing;
use crate::testing::{admin, billing, nanos};

fn usage(account: &str, prompt: i64, completion: i64, at: i64) -> Event {
    let mut event = new_event(
        "test",
        "inference.usage.recorded",
        account,
        account,
        Body::UsageRecorded(ev::UsageRecorded {
            request_id: uuid::Uuid::new_v4().to_string(),
            account: account.into(),
            model: "accounts/kiln/models/m".into(),
            api: "chat.completions".into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            deployment_type: DeploymentType::Serverless as i32,
            end_time: Some(micros_to_timestamp(at)),
            ..Default::default()
        }),
    );
    event.time = Some(micros_to_timestamp(at));
    event
}

fn replica_event(body: Body) -> Event {
    new_event("test", "scheduler.replica.x", "accounts/acme", "r", body)
}

async fn report(billing: &Billing, start: i64, end: i64) -> UsageRow {
    billing
        .get_usage(
            &admin(),
            GetUsageRequest {
                parent: "accounts/acme".into(),
                start_time: Some(micros_to_timestamp(start)),
                end_time: Some(micros_to_timestamp(end)),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .totals
        .unwrap()
}

#[tokio::test]
async fn an_event_is_booked_once_however_often_it_comes() {
    let dir = tempfile::tempdir().unwrap();
    let billing = billing(&dir).await;
    let now = now_micros();
    let a = usage("accounts/acme", 10, 5, now);
    let b = usage("accounts/acme", 7, 3, now);
    // A duplicate inside one batch, then the whole batch again (a replay).
    assert_eq!(
        billing
            .ingest(&[a.clone(), a.clone(), b.clone()])
            .await
            .unwrap(),
        2
    );
    assert_eq!(billing.ingest(&[b, a]).await.unwrap(), 0);
    let row = report(&billing, now - 1_000_000, now + 1_000_000).await;
    assert_eq!(
        (row.request_count, row.prompt_tokens, row.completion_tokens),
        (2, 17, 8)
    );
    // 135M-parameter tier: $0.10 per million prompt and completion tokens.
    assert_eq!(nanos(row.cost.as_ref()), 25 * 100);
}

/// The SpendRecorded bodies in the outbox, in order.
async fn spend_recorded(billing: &Billing) -> Vec<ev::SpendRecorded> {
    use prost::Message as _;
    query(
        billing.db(),
        "SELECT payload FROM kiln_outbox WHERE subject = 'kiln.billing.spend.recorded' ORDER BY seq",
        vec![],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| {
        let payload: Vec<u8> = row.try_get("", "payload").unwrap();
        match Event::decode(&payload[..]).unwrap().body {
            Some(Body::SpendRecorded(spend)) => spend,
            other => panic!("not a SpendRecorded: {other:?}"),
        }
    })
    .collect()
}

#[tokio::test]
async fn each_priced_usage_is_announced_with_the_months_spend_so_far() {
    let dir = tempfile::tempdir().unwrap();
    let billing = billing(&dir).await;
    let now = now_micros();
    let a = usage("accounts/acme", 1_000, 500, now);
    let b = usage("accounts/acme", 2_000, 0, now);
    billing.ingest(&[a.clone(), b.clone()]).await.unwrap();
    // A replay books nothing and announces nothing.
    billing.ingest(std::slice::from_ref(&a)).await.unwrap();
    let spend = spend_recorded(&billing).await;
    let ids: Vec<&str> = spend.iter().map(|s| s.usage_event_id.as_str()).collect();
    assert_eq!(ids, [a.id.as_str(), b.id.as_str()]);
    let cost = |s: &ev::SpendRecorded| {
        let m = s.amount.as_ref().unwrap();
        m.units * 1_000_000_000 + i64::from(m.nanos)
    };
    let to_date = |s: &ev::SpendRecorded| {
        let m = s.month_to_date_spend.as_ref().unwrap();
        m.units * 1_000_000_000 + i64::from(m.nanos)
    };
    assert!(cost(&spend[0]) > 0 && cost(&spend[1]) > 0);
    assert_eq!(to_date(&spend[0]), cost(&spend[0]));
    assert_eq!(to_date(&spend[1]), cost(&spend[0]) + cost(&spend[1]));
    assert_eq!(spend[1].account, "accounts/acme");
    assert_eq!(spend[1].usage_kind, "tokens");
    assert_eq!(spend[0].month, kiln_core::time::utc_month(now));
}

/// A 70B base model: the unbounded tier ($0.90 per million input tokens, $3.00 per million
/// training tokens).
fn big_base_model() -> Event {
    model_created(Model {
        name: "accounts/kiln/models/big".into(),
        base_model_details: Some(BaseModelDetails {
            parameter_count: 70_000_000_000,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn model_created(model: Model) -> Event {
    let name = model.name.clone();
    new_event(
        "test",
        "registry.model.created",
        "accounts/kiln",
        &name,
        Body::ModelCreated(ev::ModelCreated { model: Some(model) }),
    )
}

#[tokio::test]
async fn training_tokens_are_priced_by_the_base_models_tier() {
    let dir = tempfile::tempdir().unwrap();
    let billing = billing(&dir).await;
    let now = now_micros();
    let trained = new_event(
        "test",
        "inference.training_usage.recorded",
        "accounts/acme",
        "accounts/acme/supervisedFineTuningJobs/j",
        Body::TrainingUsageRecorded(ev::TrainingUsageRecorded {
            job: "accounts/acme/supervisedFineTuningJobs/j".into(),
            account: "accounts/acme".into(),
            base_model: "accounts/kiln/models/big".into(),
            training_tokens: 1_000,
            end_time: Some(micros_to_timestamp(now)),
            ..Default::default()
        }),
    );
    assert_eq!(
        billing.ingest(&[big_base_model(), trained]).await.unwrap(),
        2
    );
    let row = report(&billing, now - 1_000_000, now + 1_000_000).await;
    assert_eq!(row.training_tokens, 1_000);
    assert_eq!(nanos(row.cost.as_ref()), 1_000 * 3_000);
}

#[tokio::test]
async fn an_addon_is_priced_by_its_base_models_tier() {
    let dir = tempfile::tempdir().unwrap();
    let billing = billing(&dir).await;
    let now = now_micros();
    let addon = model_created(Model {
        name: "accounts/acme/models/lora".into(),
        peft_details: Some(PeftDetails {
            base_model: "accounts/kiln/models/big".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut used = usage("accounts/acme", 1_000, 0, now);
    if let Some(Body::UsageRecorded(u)) = &mut used.body {
        u.model = "accounts/acme/models/lora".into();
    }
    billing
        .ingest(&[big_base_model(), addon, used])
        .await
        .unwrap();
    let row = report(&billing, now - 1_000_000, now + 1_000_000).await;
    assert_eq!(nanos(row.cost.as_ref()), 1_000 * 900);
}

#[tokio::test]
async fn deployments_count_against_quotas_until_they_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let billing = billing(&dir).await;
    let name = "accounts/acme/deployments/d";
    let created = new_event(
        "test",
        "scheduler.deployment.created",
        "accounts/acme",
        name,
        Body::DeploymentCreated(ev::DeploymentCreated {
            deployment: Some(Deployment {
                name: name.into(),
                deployment_type: DeploymentType::Dedicated as i32,
                accelerator_type: AcceleratorType::NvidiaH10080gb as i32,
                accelerator_count: 2,
                max_replica_count: 3,
                ..Default::default()
            }),
        }),
    );
    let usage = |quota: &'static str| {
        let billing = billing.clone();
        async move {
            let name = format!("accounts/acme/quotas/{quota}");
            billing.get_quota(&admin(), &name).await.unwrap().usage
        }
    };
    billing.ingest(&[created]).await.unwrap();
    // Two H100s a replica, up to three replicas.
    assert_eq!(usage("accelerator-nvidia-h100-80gb").await, 6.0);
    assert_eq!(usage("accelerator-nvidia-a100-80gb").await, 0.0);
    assert_eq!(usage("deployments").await, 1.0);
    let deleted = new_event(
        "test",
        "scheduler.deployment.deleted",
        "accounts/acme",
        name,
        Body::DeploymentDeleted(ev::DeploymentDeleted {
            name: name.into(),
            ..Default::default()
        }),
    );
    billing.ingest(&[deleted]).await.unwrap();
    assert_eq!(usage("accelerator-nvidia-h100-80gb").await, 0.0);
    assert_eq!(usage("deployments").await, 0.0);
}

#[tokio::test]
async fn replica_time_is_billed_per_day_in_pieces_that_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let billing = billing(&dir).await;
    let h100 = AcceleratorType::NvidiaH10080gb as i32;
    // Ready at 23:59:00 on 2026-03-04, stopped at 00:01:00 the next day; billed once in
    // between, at 00:00:30.
    let start = utc_midnight(2026, 3, 5) - 60_000_000;
    let stop = start + 120_000_000;
    let started = replica_event(Body::ReplicaStarted(ev::ReplicaStarted {
        replica: "accounts/acme/deployments/d/replicas/r1".into(),
        deployment: "accounts/acme/deployments/d".into(),
        model: "accounts/acme/models/m".into(),
        accelerator_type: h100,
        accelerator_count: 2,
        deployment_type: DeploymentType::Dedicated as i32,
        start_time: Some(micros_to_timestamp(start)),
        ..Default::default()
    }));
    billing
        .ingest(std::slice::from_ref(&started))
        .await
        .unwrap();
    billing.accrue(start + 90_000_000).await.unwrap();
    let stopped = replica_event(Body::ReplicaStopped(ev::ReplicaStopped {
        replica: "accounts/acme/deployments/d/replicas/r1".into(),
        deployment: "accounts/acme/deployments/d".into(),
        model: "accounts/acme/models/m".into(),
        accelerator_type: h100,
        accelerator_count: 2,
        deployment_type: DeploymentType::Dedicated as i32,
        start_time: Some(micros_to_timestamp(start)),
        stop_time: Some(micros_to_timestamp(stop)),
        accelerator_seconds: 240.0,
        ..Default::default()
    }));
    billing
        .ingest(std::slice::from_ref(&stopped))
        .await
        .unwrap();
    // Replayed start and stop, and a later accrual, add nothing.
    assert_eq!(billing.ingest(&[started, stopped]).await.unwrap(), 0);
    billing.accrue(stop + 60_000_000).await.unwrap();
    let whole = report(&billing, start - 1, stop + 1).await;
    assert!(
        (whole.gpu_seconds - 240.0).abs() < 1e-9,
        "{}",
        whole.gpu_seconds
    );
    let first_day = report(&billing, start - 1, utc_midnight(2026, 3, 5)).await;
    assert!(
        (first_day.gpu_seconds - 120.0).abs() < 1e-9,
        "{}",
        first_day.gpu_seconds
    );
    // $5.80 an H100-hour: 240 s is 0.3866... USD, rounded per piece.
    let cost = nanos(whole.cost.as_ref());
    assert!((cost - 386_666_667).abs() <= 2, "{cost}");
}

#[tokio::test]
async fn a_spend_limit_suspends_and_a_new_month_or_a_higher_limit_lifts_it() {
    let dir = tempfile::tempdir().unwrap();
    let billing = billing(&dir).await;
    let quota = |value| Quota {
        name: "accounts/acme/quotas/monthly-spend-usd".into(),
        value,
        ..Default::default()
    };
    billing
        .update_quota(
            &admin(),
            Update::new("quota", Some(quota(1)), None).unwrap(),
        )
        .await
        .unwrap();
    let suspended = || async {
        query(
            billing.db(),
            "SELECT account FROM billing_suspensions",
            vec![],
        )
        .await
        .unwrap()
        .len()
    };
    // $0.10 per million tokens: 10 million tokens are $1.
    let now = now_micros();
    billing
        .ingest(&[usage("accounts/acme", 6_000_000, 0, now)])
        .await
        .unwrap();
    assert_eq!(suspended().await, 0);
    billing
        .ingest(&[usage("accounts/acme", 4_000_000, 0, now)])
        .await
        .unwrap();
    assert_eq!(suspended().await, 1, "the month reached $1");
    // The system account is never suspended.
    billing
        .ingest(&[usage("accounts/kiln", 100_000_000, 0, now)])
        .await
        .unwrap();
    assert_eq!(suspended().await, 1);
    billing
        .update_quota(
            &admin(),
            Update::new("quota", Some(quota(2)), None).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(suspended().await, 0, "raised above the month's spend");
    // Lowered under the month's spend: suspended again at once.
    billing
        .update_quota(
            &admin(),
            Update::new("quota", Some(quota(1)), None).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(suspended().await, 1);
    let next_month = kiln_core::time::utc_month_start(now) + 40 * MICROS_PER_DAY;
    billing.accrue(next_month).await.unwrap();
    assert_eq!(suspended().await, 0, "a new month began");
    let events = query(
        billing.db(),
        "SELECT subject FROM kiln_outbox ORDER BY seq",
        vec![],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.try_get::<String>("", "subject").unwrap())
    .filter(|s| s.contains(".account."))
    .collect::<Vec<_>>();
    assert_eq!(
        events,
        [
            "kiln.billing.account.suspended",
            "kiln.billing.account.unsuspended",
            "kiln.billing.account.suspended",
            "kiln.billing.account.unsuspended",
        ]
    );
}
