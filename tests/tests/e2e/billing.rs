//! Billing: the usage report against what clients were told (real chat and embedding
//! answers), dedicated replicas billed for their ready time, exactly-once booking across a
//! replay, a NATS outage and a billing restart. Quotas are in `quotas.rs`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_billing::config::{BillingConfig, TokenPrices};
use kiln_events::{Body, Event};
use kiln_proto::billing::v1 as bilv1;
use kiln_proto::billing::v1::get_usage_request::GroupBy;
use kiln_proto::kiln_inference::v1 as infv1;
use kiln_proto::scheduler::v1 as schv1;
use kiln_tests::billing::{nanos, report, totals};
use kiln_tests::deployments::{self, on, wait_ready};
use kiln_tests::events::Events;
use kiln_tests::inference::{MINILM, embed, first_embeddings, mesh_with_private_minilm, reference};
use kiln_tests::llm::{SMOLLM2, chat_request, first_chat, send_chat, stream_chat};
use kiln_tests::workers::Worker;
use kiln_tests::{
    AuthedChannel, MeshOptions, NatsServer, SERVICE_TOKEN, TestMesh, expect_code, wait_for,
    wait_for_ok,
};
use tonic::Code;

pub(crate) const H100: &str = "NVIDIA_H100_80GB";

/// Prices of the test's own, so expected costs are computed here, not by billing's code.
pub(crate) fn priced(prices: &[(&str, TokenPrices)]) -> BillingConfig {
    let mut config = BillingConfig::default();
    for (model, p) in prices {
        config.model_prices.insert((*model).to_owned(), p.clone());
    }
    config
}

pub(crate) fn tokens(input: &str, output: &str, embedding: &str) -> TokenPrices {
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

/// Waits until `parent`'s month-to-date totals are `told`, and returns them.
async fn wait_for_totals(
    ch: &AuthedChannel,
    parent: &str,
    told: Told,
    what: &str,
) -> bilv1::UsageRow {
    wait_for_ok(Duration::from_secs(60), what, || async {
        let row = totals(ch, parent).await;
        let reported = Told::of(&row);
        if reported == told {
            Ok(row)
        } else {
            Err(format!(
                "the report says {reported:?}, clients were told {told:?}"
            ))
        }
    })
    .await
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
    let acme = mesh.tenant_channel("acme").await;
    let mut chat = Told::default();
    let mut embedding = Told::default();
    // The first answer comes once the library is prepared and served; it counts too.
    let first = first_chat(&acme, "Hi", 4, Duration::from_secs(300)).await;
    chat.chat(first.usage.as_ref().expect("usage"));
    for (question, max_tokens) in [
        ("What is the capital of France?", 12),
        ("Name three colours.", 8),
    ] {
        let answer = send_chat(&acme, chat_request(question, max_tokens)).await;
        chat.chat(answer.expect("chat").usage.as_ref().expect("usage"));
    }
    // A streamed answer: its usage is on the last chunk.
    let streamed = stream_chat(&acme, chat_request("Count to five.", 10)).await;
    chat.chat(&streamed.usage);
    let sentences = reference().sentences;
    for batch in [&sentences[..1], &sentences[1..4], &sentences[4..]] {
        let answer = first_embeddings(&acme, MINILM, batch, Duration::from_secs(60)).await;
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
        .get_usage(bilv1::GetUsageRequest {
            filter: format!("model = \"{MINILM}\""),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Told::of(filtered.totals.as_ref().unwrap()), embedding);

    // Reports are the account's own: another account sees nothing of acme's, and its name
    // is NOT_FOUND; the platform admin sees every account.
    let globex = mesh.tenant_channel("globex").await;
    assert_eq!(Told::of(&totals(&globex, "").await), Told::default());
    let err = report(&globex, "accounts/acme", &[]).await;
    expect_code(err, Code::NotFound);
    let everyone = totals(&admin, "accounts/-").await;
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
    events: &mut Events,
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
    let (mesh, _assets, acme, model) = mesh_with_private_minilm(MeshOptions {
        billing: Some(config),
        ..Default::default()
    })
    .await;
    let _node = Worker::start(&mesh, "node-gpu", &[(H100, 4)]).await;
    let mut events = mesh.subscribe("kiln.scheduler.replica.>").await;
    let two_of_two = schv1::Deployment {
        base_model: model.clone(),
        min_replica_count: 2,
        max_replica_count: 2,
        ..on(H100, 2)
    };
    let deployment = deployments::create(&acme, "accounts/acme", "billed", two_of_two)
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
    deployments::delete(&acme, &deployment.name).await.unwrap();
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
    let (key, acme) = mesh.tenant("acme").await;
    let database = kiln_tests::TestDatabase::create(&kiln_tests::Backends::from_env())
        .await
        .unwrap();
    let billing_dir = tempfile::tempdir().unwrap();
    let standalone = StandaloneBilling::start(&mesh, &database, billing_dir.path()).await;

    let sentences = reference().sentences;
    let mut told = Told::default();
    let first = first_embeddings(&acme, MINILM, &sentences[..1], Duration::from_secs(120)).await;
    told.embeddings(first.usage.as_ref().expect("usage"));
    let pairs = (0..5).map(|i| &sentences[i..i + 2]);
    embed_batches(&acme, &mut told, pairs).await;
    // NATS goes away mid-traffic: answers go on, their usage waits in the node's outbox.
    nats.stop().await;
    let singles = (0..10).map(|i| &sentences[i % 6..i % 6 + 1]);
    embed_batches(&acme, &mut told, singles).await;
    // Billing stops too while more traffic comes.
    standalone.stop().await;
    nats.resume().await;
    let triples = (0..5).map(|i| &sentences[i..i + 3]);
    embed_batches(&acme, &mut told, triples).await;
    // The mesh's billing catches up with everything, once.
    let after_outage = "the mesh's billing after the outage";
    wait_for_totals(&acme, "accounts/acme", told, after_outage).await;
    // The restarted billing reads on from where it stopped, and counts nothing twice.
    let standalone = StandaloneBilling::start(&mesh, &database, billing_dir.path()).await;
    let remote = kiln_tests::channel_to(&standalone.url, Some(&key)).await;
    wait_for_totals(&remote, "accounts/acme", told, "the restarted billing").await;
    // A little later, still nothing twice.
    embed_batches(&acme, &mut told, [&sentences[..2]]).await;
    let later = "the restarted billing, later";
    wait_for_totals(&remote, "accounts/acme", told, later).await;
    wait_for_totals(&acme, "accounts/acme", told, "the mesh's billing, later").await;
    standalone.stop().await;
    mesh.shutdown().await;
}

/// Embeds each batch in turn on the library's MiniLM, adding what each answer says to `told`.
async fn embed_batches<'a>(
    ch: &AuthedChannel,
    told: &mut Told,
    batches: impl IntoIterator<Item = &'a [String]>,
) {
    for batch in batches {
        let answer = embed(ch, MINILM, batch).await.expect("embeddings");
        told.embeddings(answer.usage.as_ref().expect("usage"));
    }
}
