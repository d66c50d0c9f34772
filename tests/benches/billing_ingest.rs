//! Usage ingestion: `cargo bench -p kiln-tests --bench billing_ingest [-- EVENTS ROUNDS]`.
//!
//! The same usage events (default 20,000), published once to a fresh JetStream stream on one
//! NATS server, are read twice per round from that stream:
//! - raw: a durable pull consumer that only decodes and acks each event;
//! - billing: billing's ledger consumer, which books every event exactly once into
//!   PostgreSQL (claiming its id, pricing it, adding it to the month's spend) in batches.
//!
//! Both rates are events per second until the last one is acknowledged (raw) or booked
//! (billing), in the same run. Afterwards the ledger holds each event once, and a replay of
//! the whole stream books nothing. PostgreSQL: `KILN_TEST_DATABASE_URL` (else the local
//! server); NATS: `KILN_TEST_NATS_URL` (else the local server).

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use kiln_events::{Body, Event, new_event};
use kiln_proto::events::v1::UsageRecorded;
use kiln_proto::scheduler::v1::deployment::DeploymentType;
use kiln_tests::bench::{Args, median};
use kiln_tests::wait_for;
use prost::Message;
use sea_orm::ConnectionTrait;

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let account = format!("accounts/bench-{}", i % 16);
            new_event(
                "kiln-inference",
                "inference.usage.recorded",
                &account,
                &account,
                Body::UsageRecorded(UsageRecorded {
                    request_id: format!("req-{i}"),
                    account: account.clone(),
                    model: "accounts/kiln/models/smollm2-135m-instruct".into(),
                    deployment: "accounts/kiln/deployments/smollm2-135m-instruct".into(),
                    deployment_type: DeploymentType::Serverless as i32,
                    api: "chat.completions".into(),
                    prompt_tokens: 20 + (i % 50) as i64,
                    completion_tokens: 10 + (i % 30) as i64,
                    node: "nodes/bench".into(),
                    ..Default::default()
                }),
            )
        })
        .collect()
}

/// Publishes `events` under `prefix` the way the bus does (event id as Nats-Msg-Id),
/// pipelined: up to 512 publishes in flight.
async fn publish(js: &jetstream::Context, prefix: &str, events: &[Event]) -> f64 {
    let started = Instant::now();
    for window in events.chunks(512) {
        let mut acks = Vec::with_capacity(window.len());
        for event in window {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.as_str());
            acks.push(
                js.publish_with_headers(
                    format!("{prefix}{}", kiln_events::subject_of(event)),
                    headers,
                    event.encode_to_vec().into(),
                )
                .await
                .expect("publish"),
            );
        }
        for ack in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            ack.expect("stored");
        }
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// Reads `n` events with a new durable pull consumer, decoding and acking each.
async fn raw_consume(stream: &jetstream::stream::Stream, prefix: &str, n: usize) -> f64 {
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(format!("raw-{}", uuid::Uuid::new_v4().simple())),
            filter_subject: format!("{prefix}kiln.>"),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let started = Instant::now();
    let mut messages = consumer.messages().await.expect("messages");
    let mut read = 0;
    while read < n {
        let msg = messages.next().await.expect("open").expect("message");
        Event::decode(msg.payload.as_ref()).expect("decodes");
        msg.ack().await.expect("ack");
        read += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn ledger_rows(db: &sea_orm::DatabaseConnection) -> (i64, i64) {
    let row = db
        .query_one(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS tokens FROM billing_ledger",
        ))
        .await
        .expect("count")
        .expect("a row");
    (
        row.try_get("", "n").expect("n"),
        row.try_get("", "tokens").expect("tokens"),
    )
}

/// Billing's ledger consumer on the stream, into a fresh schema: events/s until all booked.
async fn billing_consume(nats_url: &str, stream: &str, prefix: &str, events: &[Event]) -> f64 {
    let base = std::env::var("KILN_TEST_DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let backends = kiln_tests::Backends {
        database_url: Some(base),
        nats_url: None,
    };
    let database = kiln_tests::TestDatabase::create(&backends)
        .await
        .expect("a schema");
    let mut nats = kiln_events::nats::NatsConfig::new(nats_url);
    nats.stream = stream.to_owned();
    nats.subject_prefix = prefix.to_owned();
    let bus = std::sync::Arc::new(
        kiln_events::nats::NatsBus::connect(nats)
            .await
            .expect("NATS"),
    );
    let dir = tempfile::tempdir().expect("dir");
    let server = kiln_core::config::ServerConfig {
        data_dir: dir.path().to_path_buf(),
        database_url: database.url.clone(),
        ..Default::default()
    };
    let config = kiln_billing::config::BillingConfig {
        ledger_consumer: format!("ledger-{}", uuid::Uuid::new_v4().simple()),
        ..Default::default()
    };
    let db = kiln_store::connect(&server.database_url_for("billing"))
        .await
        .expect("db");
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut host = kiln_events::host::Host::new(&server, bus, shutdown);
    // Timed from the moment the consumer starts (migrations are done by then).
    let billing = kiln_billing::open(&config, &mut host)
        .await
        .expect("billing opens");
    let started = Instant::now();
    let n = events.len() as i64;
    let expected_tokens: i64 = events
        .iter()
        .map(|e| match &e.body {
            Some(Body::UsageRecorded(u)) => u.prompt_tokens + u.completion_tokens,
            _ => 0,
        })
        .sum();
    wait_for(
        Duration::from_secs(600),
        "every event to be booked",
        || async { (ledger_rows(&db).await.0 >= n).then_some(()) },
    )
    .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    // Exactly once: each event one row, and a replay of everything books nothing.
    assert_eq!(ledger_rows(&db).await, (n, expected_tokens));
    for chunk in events.chunks(512) {
        assert_eq!(billing.ingest(chunk).await.expect("replay"), 0);
    }
    assert_eq!(ledger_rows(&db).await, (n, expected_tokens));
    let _ = stop.send(true);
    drop(host);
    if let Some(schema) = &database.schema {
        let admin = kiln_store::connect(backends.database_url.as_deref().unwrap())
            .await
            .expect("admin");
        let _ = admin
            .execute_unprepared(&format!("DROP SCHEMA {schema} CASCADE"))
            .await;
    }
    rate
}

#[tokio::main]
async fn main() {
    let args = Args::from_env();
    let (n, rounds): (usize, usize) = (args.get(0, 20_000), args.get(1, 3));
    let nats_url = std::env::var("KILN_TEST_NATS_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let client = async_nats::connect(nats_url.as_str()).await.expect("NATS");
    let js = jetstream::new(client);
    let id = uuid::Uuid::new_v4().simple().to_string();
    let stream_name = format!("KB_{id}");
    let prefix = format!("kb{id}.");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}kiln.>")],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("stream");
    let events = events(n);
    let published = publish(&js, &prefix, &events).await;
    println!("published {n} usage events: {published:.0}/s");
    let (mut raw, mut booked) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let r = raw_consume(&stream, &prefix, n).await;
        let b = billing_consume(&nats_url, &stream_name, &prefix, &events).await;
        println!(
            "round {round}: raw JetStream consume+ack {r:.0} events/s; billing ledger into PostgreSQL, exactly once {b:.0} events/s ({:.2} of raw)",
            b / r
        );
        raw.push(r);
        booked.push(b);
    }
    let (r, b) = (median(&mut raw), median(&mut booked));
    println!(
        "median of {rounds}: raw {r:.0} events/s, billing {b:.0} events/s, ratio {:.2}",
        b / r
    );
    let _ = js.delete_stream(&stream_name).await;
}
