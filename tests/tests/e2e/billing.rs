//! Billing: the usage report against what clients were told (real chat and embedding
//! answers), dedicated replicas billed for their ready time, exactly-once booking across a
//! replay, a NATS outage and a billing restart, and quotas: accelerators, requests per
//! minute and the monthly spend limit.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_billing::config::{BillingConfig, TokenPrices};
use kiln_events::{Body, Event};
use kiln_proto::billing::v1::get_usage_request::GroupBy;
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_proto::scheduler::v1 as schv1;
use kiln_tests::billing::{nanos, report, set_quota, totals};
use kiln_tests::deployments::{self, wait_ready};
use kiln_tests::inference::{MINILM, client, reference};
use kiln_tests::workers::Worker;
use kiln_tests::{AuthedChannel, MeshOptions, NatsServer, SERVICE_TOKEN, TestMesh, wait_for};
use tonic::Code;

use crate::scheduler::{embed, mesh_with_private_minilm_using, on};

const SMOLLM2: &str = "accounts/kiln/models/smollm2-135m-instruct";
const H100: &str = "NVIDIA_H100_80GB";
const H100_QUOTA: &str = "accelerator-nvidia-h100-80gb";

/// Prices of the test's own, so expected costs are computed here, not by billing's code.
fn priced(prices: &[(&str, TokenPrices)]) -> BillingConfig {
    let mut config = BillingConfig::default();
    for (model, p) in prices {
        config.model_prices.insert((*model).to_owned(), p.clone());
    }
    config
}

fn tokens(input: &str, output: &str, embedding: &str) -> TokenPrices {
    TokenPrices {
        input: input.into(),
        output: output.into(),
        embedding: embedding.into(),
        ..Default::default()
    }
}

/// What clients were told, summed: requests, prompt, completion and embedding tokens.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Told {
    requests: i64,
    prompt: i64,
    completion: i64,
    embedding: i64,
}

impl Told {
    fn chat(&mut self, usage: &infv1::Usage) {
        self.requests += 1;
        self.prompt += i64::from(usage.prompt_tokens);
        self.completion += i64::from(usage.completion_tokens);
    }

    fn embeddings(&mut self, usage: &infv1::Usage) {
        self.requests += 1;
        self.embedding += i64::from(usage.prompt_tokens);
    }

    fn of(row: &kiln_proto::billing::v1::UsageRow) -> Self {
        Self {
            requests: row.request_count,
            prompt: row.prompt_tokens,
            completion: row.completion_tokens,
            embedding: row.embedding_tokens,
        }
    }
}

async fn embed_texts(
    ch: &AuthedChannel,
    texts: &[String],
) -> Result<infv1::CreateEmbeddingsResponse, tonic::Status> {
    client(ch)
        .create_embeddings(infv1::CreateEmbeddingsRequest {
            model: MINILM.into(),
            input: texts.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn chat_request(question: &str, max_tokens: i32) -> infv1::CreateChatCompletionRequest {
    infv1::CreateChatCompletionRequest {
        model: SMOLLM2.into(),
        messages: vec![infv1::ChatMessage {
            role: "user".into(),
            content: question.into(),
            name: String::new(),
        }],
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// Waits until `parent`'s month-to-date totals are `told`, and returns them.
async fn wait_for_totals(
    ch: &AuthedChannel,
    parent: &str,
    told: Told,
    what: &str,
) -> kiln_proto::billing::v1::UsageRow {
    let mut last = Told::default();
    let row = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let row = totals(ch, parent).await;
            last = Told::of(&row);
            if last == told {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    row.unwrap_or_else(|_| panic!("{what}: the report says {last:?}, clients were told {told:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_report_adds_up_to_what_clients_were_told() {
    let assets = kiln_tests::asset_dir_with(&["all-minilm-l6-v2", "smollm2-135m-instruct"]);
    let billing = priced(&[
        (SMOLLM2, tokens("0.20", "0.40", "")),
        (MINILM, tokens("", "", "0.02")),
    ]);
    let mesh = kiln_tests::library_mesh_with(
        assets.path(),
        MeshOptions {
            billing: Some(billing),
            ..Default::default()
        },
    )
    .await;
    let admin = mesh.admin().await;
    let acme = mesh
        .channel(Some(&kiln_tests::tenant(&admin, "acme").await))
        .await;
    let mut chat = Told::default();
    let mut embedding = Told::default();
    // The first answer comes once the library is prepared and served; it counts too.
    let first = wait_for(
        Duration::from_secs(300),
        "SmolLM2 to be prepared and served",
        || async {
            client(&acme)
                .create_chat_completion(chat_request("Hi", 4))
                .await
                .ok()
        },
    )
    .await
    .into_inner();
    chat.chat(first.usage.as_ref().expect("usage"));
    for (question, max_tokens) in [
        ("What is the capital of France?", 12),
        ("Name three colours.", 8),
    ] {
        let answer = client(&acme)
            .create_chat_completion(chat_request(question, max_tokens))
            .await
            .expect("chat")
            .into_inner();
        chat.chat(answer.usage.as_ref().expect("usage"));
    }
    // A streamed answer: its usage is on the last chunk.
    let mut stream = client(&acme)
        .stream_chat_completion(chat_request("Count to five.", 10))
        .await
        .expect("stream")
        .into_inner();
    let mut streamed = None;
    while let Some(chunk) = stream.next().await {
        if let Some(usage) = chunk.expect("chunk").usage {
            streamed = Some(usage);
        }
    }
    chat.chat(&streamed.expect("the last chunk carries usage"));
    let sentences = reference().sentences;
    for batch in [&sentences[..1], &sentences[1..4], &sentences[4..]] {
        let answer = wait_for(Duration::from_secs(60), "MiniLM to answer", || async {
            embed_texts(&acme, batch).await.ok()
        })
        .await;
        embedding.embeddings(answer.usage.as_ref().expect("usage"));
    }
    let told = Told {
        requests: chat.requests + embedding.requests,
        prompt: chat.prompt,
        completion: chat.completion,
        embedding: embedding.embedding,
    };
    // $0.20 and $0.40 per million prompt and completion tokens, $0.02 per million embedded.
    let chat_cost = chat.prompt * 200 + chat.completion * 400;
    let embedding_cost = embedding.embedding * 20;

    let booked = wait_for_totals(&acme, "accounts/acme", told, "acme's usage").await;
    assert_eq!(
        nanos(&booked.cost),
        chat_cost + embedding_cost,
        "to the nano"
    );
    assert_eq!(booked.cost.as_ref().unwrap().currency_code, "USD");

    let by_model = report(&acme, "accounts/acme", &[GroupBy::Model])
        .await
        .unwrap();
    let rows: BTreeMap<String, _> = by_model
        .rows
        .iter()
        .map(|r| (r.model.clone(), r.clone()))
        .collect();
    assert_eq!(rows.len(), 2, "{:?}", by_model.rows);
    assert_eq!(Told::of(&rows[SMOLLM2]), chat);
    assert_eq!(nanos(&rows[SMOLLM2].cost), chat_cost);
    assert_eq!(Told::of(&rows[MINILM]), embedding);
    assert_eq!(nanos(&rows[MINILM].cost), embedding_cost);
    let by_day = report(&acme, "", &[GroupBy::Day, GroupBy::Deployment])
        .await
        .unwrap();
    let today = kiln_core::time::utc_day(kiln_core::time::now_micros());
    for row in &by_day.rows {
        // The public models answer on the library's serverless deployments.
        assert!(
            row.deployment.starts_with("accounts/kiln/deployments/"),
            "{row:?}"
        );
        assert_eq!(row.day, today);
    }
    assert_eq!(by_day.rows.len(), 2, "one row per deployment");
    let filtered = kiln_tests::billing::usage(&acme)
        .get_usage(kiln_proto::billing::v1::GetUsageRequest {
            filter: format!("model = \"{MINILM}\""),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Told::of(filtered.totals.as_ref().unwrap()), embedding);

    // Reports are the account's own: another account sees nothing of acme's, and its name
    // is NOT_FOUND; the platform admin sees every account.
    let globex = mesh
        .channel(Some(&kiln_tests::tenant(&admin, "globex").await))
        .await;
    assert_eq!(
        Told::of(&kiln_tests::billing::totals(&globex, "").await),
        Told::default()
    );
    let err = report(&globex, "accounts/acme", &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let everyone = kiln_tests::billing::totals(&admin, "accounts/-").await;
    assert_eq!(Told::of(&everyone), told);

    // Replaying the whole stream (a new durable consumer from the first event) books nothing:
    // every usage event is already claimed.
    let billing = mesh
        .mesh
        .as_ref()
        .and_then(|m| m.billing.as_ref())
        .expect("billing runs in the mesh");
    let mut replay = mesh
        .bus
        .consume(
            &format!("replay-{}", uuid::Uuid::new_v4().simple()),
            "kiln.>",
        )
        .await
        .unwrap();
    let mut events: Vec<Event> = Vec::new();
    let mut usage_events = 0;
    while usage_events < told.requests {
        let delivery = tokio::time::timeout(Duration::from_secs(10), replay.next())
            .await
            .expect("the replay delivers the whole stream")
            .expect("open")
            .expect("a delivery");
        if matches!(delivery.event.body, Some(Body::UsageRecorded(_))) {
            usage_events += 1;
        }
        events.push(delivery.event.clone());
        delivery.ack().await.unwrap();
    }
    // Twice over, and as duplicates inside one batch.
    let doubled: Vec<Event> = events.iter().chain(&events).cloned().collect();
    assert_eq!(billing.ingest(&doubled).await.unwrap(), 0, "nothing is new");
    let after = totals(&acme, "accounts/acme").await;
    assert_eq!(Told::of(&after), told);
    assert_eq!(nanos(&after.cost), chat_cost + embedding_cost);
    mesh.shutdown().await;
}

/// The replica events of one deployment, collected from the bus.
async fn replica_events(
    events: &mut futures::stream::BoxStream<'static, Event>,
    deployment: &str,
    started: usize,
    stopped: usize,
) -> (
    Vec<kiln_proto::events::v1::ReplicaStarted>,
    Vec<kiln_proto::events::v1::ReplicaStopped>,
) {
    let (mut starts, mut stops) = (Vec::new(), Vec::new());
    tokio::time::timeout(Duration::from_secs(60), async {
        while starts.len() < started || stops.len() < stopped {
            match events.next().await.expect("bus open").body {
                Some(Body::ReplicaStarted(r)) if r.deployment == deployment => starts.push(r),
                Some(Body::ReplicaStopped(r)) if r.deployment == deployment => stops.push(r),
                _ => {}
            }
        }
    })
    .await
    .expect("the replica events");
    (starts, stops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_replicas_are_billed_for_their_ready_time() {
    // Bill running replicas often, so reports see the accrual path as well as the stop.
    let config = BillingConfig {
        accrual_interval: Duration::from_millis(300),
        ..Default::default()
    };
    let (mesh, _assets, acme, model) = mesh_with_private_minilm_using(MeshOptions {
        billing: Some(config),
        ..Default::default()
    })
    .await;
    let _node = Worker::start(&mesh, "node-gpu", &[(H100, 4)]).await;
    let mut events = mesh
        .bus
        .subscribe("kiln.scheduler.replica.>")
        .await
        .unwrap();
    let deployment = deployments::create(
        &acme,
        "accounts/acme",
        "billed",
        schv1::Deployment {
            base_model: model.clone(),
            min_replica_count: 2,
            max_replica_count: 2,
            ..on(H100, 2)
        },
    )
    .await
    .unwrap();
    wait_ready(&acme, &deployment.name, 2).await;
    let ready_at = Instant::now();
    let (starts, _) = replica_events(&mut events, &deployment.name, 2, 0).await;
    assert!(starts.iter().all(|s| s.accelerator_count == 2));

    // Without traffic, time is billed as it passes: once the replicas have run 2 s, the report
    // counts 4 accelerators for the time so far, less at most an accrual interval and the
    // delivery of its events (allowed: 1 s), never more than the time (plus 1 s: the replicas
    // were ready a little before this test saw it). A report without accrual stays at 0.
    let (mid, elapsed) = wait_for(
        Duration::from_secs(20),
        "running replicas' time to be billed as it passes",
        || async {
            let row = totals(&acme, "accounts/acme").await;
            let elapsed = ready_at.elapsed().as_secs_f64();
            (elapsed >= 2.0 && row.gpu_seconds >= 4.0 * (elapsed - 1.0)).then_some((row, elapsed))
        },
    )
    .await;
    assert!(
        mid.gpu_seconds <= 4.0 * (elapsed + 1.0),
        "mid-way: {} GPU-seconds after {elapsed:.2} s ready",
        mid.gpu_seconds
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    deployments::deployments(&acme)
        .delete_deployment(schv1::DeleteDeploymentRequest {
            name: deployment.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ready_for = ready_at.elapsed().as_secs_f64();
    let (_, stops) = replica_events(&mut events, &deployment.name, 0, 2).await;
    let stopped_seconds: f64 = stops.iter().map(|s| s.accelerator_seconds).sum();

    // Exactly the replicas' own accelerator-seconds, and 4·T within the heartbeat resolution
    // (a replica is ready when its node says so).
    let billed = wait_for(
        Duration::from_secs(30),
        "the stops to be booked",
        || async {
            let row = totals(&acme, "accounts/acme").await;
            ((row.gpu_seconds - stopped_seconds).abs() < 1e-4).then_some(row)
        },
    )
    .await;
    let heartbeat = mesh.config.scheduler.heartbeat_interval.as_secs_f64();
    assert!(
        (billed.gpu_seconds - 4.0 * ready_for).abs() <= 4.0 * heartbeat,
        "{} GPU-seconds for 2 replicas × 2 H100 ready {ready_for:.2} s",
        billed.gpu_seconds
    );
    // $5.80 an H100-hour, rounded to the nano once per ledger entry.
    let exact = billed.gpu_seconds * 5.80 / 3600.0 * 1e9;
    let cost = nanos(&billed.cost) as f64;
    assert!((cost - exact).abs() < 100.0, "{cost} nanos for {exact}");
    let by_accelerator = report(
        &acme,
        "accounts/acme",
        &[GroupBy::AcceleratorType, GroupBy::Deployment],
    )
    .await
    .unwrap();
    assert_eq!(by_accelerator.rows.len(), 1);
    let row = &by_accelerator.rows[0];
    assert_eq!(row.deployment, deployment.name);
    assert_eq!(
        row.accelerator_type,
        kiln_proto::common::v1::AcceleratorType::NvidiaH10080gb as i32
    );
    // Stopped replicas cost nothing more.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let later = totals(&acme, "accounts/acme").await;
    assert!((later.gpu_seconds - billed.gpu_seconds).abs() < 1e-6);
    assert_eq!(nanos(&later.cost), nanos(&billed.cost));
    mesh.shutdown().await;
}

/// A billing service of its own (its own database and durable consumer) on the mesh's bus,
/// checking keys with the mesh's identity, as a separate deployment of billing would.
struct StandaloneBilling {
    url: String,
    running: kiln_server::Running,
}

impl StandaloneBilling {
    async fn start(
        mesh: &TestMesh,
        database: &kiln_tests::TestDatabase,
        dir: &std::path::Path,
    ) -> Self {
        let mut server = kiln_core::config::ServerConfig {
            data_dir: dir.to_path_buf(),
            database_url: database.url.clone(),
            service_token: Some(SERVICE_TOKEN.to_owned()),
            identity_url: Some(mesh.url()),
            ..Default::default()
        };
        server.page_token_secret = Some("standalone-billing".into());
        let config = BillingConfig {
            ledger_consumer: "billing-standalone".into(),
            ..Default::default()
        };
        let config = kiln_server::KilnConfig {
            server,
            billing: config,
            ..Default::default()
        };
        let roles = [kiln_server::Role::Billing].into_iter().collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = kiln_server::serve(roles, &config, listener, Some(mesh.bus.clone()))
            .await
            .expect("billing serves");
        Self {
            url: format!("http://{}", running.addr),
            running,
        }
    }

    async fn stop(self) {
        self.running.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usage_is_lost_or_doubled_across_a_nats_outage_and_a_billing_restart() {
    let mut nats = NatsServer::start().await;
    let assets = kiln_tests::inference::minilm_asset_dir();
    let mesh = kiln_tests::library_mesh_with(
        assets.path(),
        MeshOptions {
            nats_url: Some(nats.url()),
            ..Default::default()
        },
    )
    .await;
    let admin = mesh.admin().await;
    let key = kiln_tests::tenant(&admin, "acme").await;
    let acme = mesh.channel(Some(&key)).await;
    let database = kiln_tests::TestDatabase::create(&kiln_tests::Backends::from_env())
        .await
        .unwrap();
    let billing_dir = tempfile::tempdir().unwrap();
    let standalone = StandaloneBilling::start(&mesh, &database, billing_dir.path()).await;

    let sentences = reference().sentences;
    let mut told = Told::default();
    let traffic = |told: &mut Told, answer: infv1::CreateEmbeddingsResponse| {
        told.embeddings(answer.usage.as_ref().expect("usage"));
    };
    let first = wait_for(Duration::from_secs(120), "MiniLM to answer", || async {
        embed_texts(&acme, &sentences[..1]).await.ok()
    })
    .await;
    traffic(&mut told, first);
    for i in 0..5 {
        traffic(
            &mut told,
            embed_texts(&acme, &sentences[i..i + 2]).await.unwrap(),
        );
    }
    // NATS goes away mid-traffic: answers go on, their usage waits in the node's outbox.
    nats.stop().await;
    for i in 0..10 {
        traffic(
            &mut told,
            embed_texts(&acme, &sentences[i % 6..i % 6 + 1])
                .await
                .unwrap(),
        );
    }
    // Billing stops too while more traffic comes.
    standalone.stop().await;
    nats.resume().await;
    for i in 0..5 {
        traffic(
            &mut told,
            embed_texts(&acme, &sentences[i..i + 3]).await.unwrap(),
        );
    }
    // The mesh's billing catches up with everything, once.
    wait_for_totals(
        &acme,
        "accounts/acme",
        told,
        "the mesh's billing after the outage",
    )
    .await;
    // The restarted billing reads on from where it stopped, and counts nothing twice.
    let standalone = StandaloneBilling::start(&mesh, &database, billing_dir.path()).await;
    let remote = kiln_tests::channel_to(&standalone.url, Some(&key)).await;
    wait_for_totals(&remote, "accounts/acme", told, "the restarted billing").await;
    // A little later, still nothing twice.
    traffic(
        &mut told,
        embed_texts(&acme, &sentences[..2]).await.unwrap(),
    );
    wait_for_totals(
        &remote,
        "accounts/acme",
        told,
        "the restarted billing, later",
    )
    .await;
    wait_for_totals(&acme, "accounts/acme", told, "the mesh's billing, later").await;
    standalone.stop().await;
    mesh.shutdown().await;
}

async fn next_event(
    events: &mut futures::stream::BoxStream<'static, Event>,
    what: &str,
    matches: impl Fn(&Body) -> bool,
) -> Body {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let event = events.next().await.expect("bus open");
            if let Some(body) = event.body
                && matches(&body)
            {
                return body;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} event"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_what_is_over_them_and_only_that() {
    // MiniLM at $0.05 a token, so a few requests cross a $1 spend limit.
    let billing = priced(&[(MINILM, tokens("", "", "50000"))]);
    let (mesh, _assets, acme, model) = mesh_with_private_minilm_using(MeshOptions {
        billing: Some(billing),
        ..Default::default()
    })
    .await;
    let admin = mesh.admin().await;
    let _node = Worker::start(&mesh, "node-q", &[(H100, 8)]).await;
    let mut billing_events = mesh.bus.subscribe("kiln.billing.>").await.unwrap();

    // Every account has every quota, at the defaults.
    let listed = kiln_tests::billing::quotas(&acme)
        .list_quotas(kiln_proto::billing::v1::ListQuotasRequest::default())
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
    let err = set_quota(&acme, "acme", H100_QUOTA, 100).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("quota.value"), "{}", err.message());
    let err = kiln_tests::billing::quotas(&acme)
        .update_quota(kiln_proto::billing::v1::UpdateQuotaRequest {
            quota: Some(kiln_proto::billing::v1::Quota {
                name: format!("accounts/acme/quotas/{H100_QUOTA}"),
                max_value: 100,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["max_value".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let other = mesh
        .channel(Some(&kiln_tests::tenant(&admin, "globex").await))
        .await;
    let err = set_quota(&other, "acme", H100_QUOTA, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "another account's quota");
    let set = set_quota(&admin, "acme", H100_QUOTA, 4).await.unwrap();
    assert_eq!((set.value, set.max_value), (4, 16));
    match next_event(&mut billing_events, "quota.updated", |b| {
        matches!(b, Body::QuotaUpdated(_))
    })
    .await
    {
        Body::QuotaUpdated(u) => {
            assert_eq!(u.previous_value, 16);
            assert_eq!(u.quota.unwrap().value, 4);
        }
        _ => unreachable!(),
    }

    // Accelerators: a deployment that could hold 2 × 3 H100 is over 4, and nothing of it
    // is stored or placed.
    let deployment = |max: i32, count: i32| schv1::Deployment {
        base_model: model.clone(),
        min_replica_count: 1,
        max_replica_count: max,
        ..on(H100, count)
    };
    let err = deployments::create(&acme, "accounts/acme", "big", deployment(3, 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
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
    let fits = deployments::create(&acme, "accounts/acme", "fits", deployment(2, 2))
        .await
        .unwrap();
    let err = deployments::create(&acme, "accounts/acme", "second", deployment(1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let err = deployments::deployments(&acme)
        .update_deployment(schv1::UpdateDeploymentRequest {
            deployment: Some(schv1::Deployment {
                name: fits.name.clone(),
                max_replica_count: 3,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["max_replica_count".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    wait_ready(&acme, &fits.name, 1).await;
    assert_eq!(
        deployments::replica_nodes(&admin, &fits.name).await,
        vec!["nodes/node-q".to_owned()]
    );
    // Billing's view of the quota follows the scheduler's events.
    wait_for(Duration::from_secs(30), "the quota's usage", || async {
        let q = kiln_tests::billing::quotas(&acme)
            .get_quota(kiln_proto::billing::v1::GetQuotaRequest {
                name: H100_QUOTA.into(),
            })
            .await
            .unwrap()
            .into_inner();
        (q.usage == 4.0).then_some(())
    })
    .await;
    // Freed accelerators can be used again; a restored deployment is checked again.
    deployments::deployments(&acme)
        .delete_deployment(schv1::DeleteDeploymentRequest {
            name: fits.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    deployments::create(&acme, "accounts/acme", "second", deployment(1, 3))
        .await
        .expect("3 of 4 once the first is deleted");
    let err = deployments::deployments(&acme)
        .undelete_deployment(schv1::UndeleteDeploymentRequest {
            name: fits.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // Requests per minute: a burst over the limit loses only the excess, with a retry delay.
    set_quota(&admin, "globex", "serverless-inference-rpm", 5)
        .await
        .unwrap();
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let other = other.clone();
            tokio::spawn(async move { embed(&other, MINILM).await })
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
    embed(&acme, MINILM)
        .await
        .expect("acme is under its own limits");

    // The monthly spend limit: acme lowers its own to $1; requests cost about $0.50 each, so
    // a few of them suspend the account, by an event, and then are refused.
    let lowered = set_quota(&acme, "acme", "monthly-spend-usd", 1)
        .await
        .unwrap();
    assert_eq!(lowered.value, 1);
    let refusal = wait_for(
        Duration::from_secs(60),
        "the account to be suspended",
        || async {
            match embed(&acme, MINILM).await {
                Err(status) if status.code() == Code::FailedPrecondition => Some(status),
                Err(status) => panic!("unexpected {status:?}"),
                Ok(_) => None,
            }
        },
    )
    .await;
    assert!(
        refusal.message().contains("MONTHLY_SPEND_LIMIT_EXCEEDED"),
        "{}",
        refusal.message()
    );
    match next_event(&mut billing_events, "account.suspended", |b| {
        matches!(b, Body::AccountSuspended(_))
    })
    .await
    {
        Body::AccountSuspended(s) => assert_eq!(s.account, "accounts/acme"),
        _ => unreachable!(),
    }
    let account = kiln_tests::accounts(&acme)
        .get_account(kiln_proto::identity::v1::GetAccountRequest {
            name: "accounts/acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        account.suspend_state,
        kiln_proto::identity::v1::account::SuspendState::MonthlySpendLimitExceeded as i32
    );
    let spent = totals(&acme, "accounts/acme").await;
    assert!(nanos(&spent.cost) >= 1_000_000_000, "{:?}", spent.cost);
    let err = deployments::create(&acme, "accounts/acme", "third", deployment(1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    // Still refused a moment later: the suspension holds until the limit is raised.
    assert_eq!(
        embed(&acme, MINILM).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    set_quota(&admin, "acme", "monthly-spend-usd", 2_000)
        .await
        .unwrap();
    next_event(
        &mut billing_events,
        "account.unsuspended",
        |b| matches!(b, Body::AccountUnsuspended(u) if u.account == "accounts/acme"),
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "requests to be served again",
        || async { embed(&acme, MINILM).await.ok() },
    )
    .await;
    mesh.shutdown().await;
}
