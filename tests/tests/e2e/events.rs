//! Events: every change is published and decodes with the generated types; the outbox keeps
//! them through a NATS outage; consumers are idempotent; trace context crosses every hop.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use counting::handler;
use futures::StreamExt;
use kiln_events::consumer::{EventHandler, Handled, OnceEach, handle_once, spawn_consumer};
use kiln_events::{Body, Event};
use kiln_proto::identity::v1 as idv1;
use kiln_tests::{MeshOptions, NatsServer, TestMesh, wait_for};
use kiln_tests::{
    accounts, create_account, create_key, create_user, delete_account, delete_key, delete_user,
    update_account, update_user,
};
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement};

/// A mesh whose bus is NATS: the environment's server, or one of the test's own.
async fn mesh_on_nats() -> (TestMesh, Option<NatsServer>) {
    let mesh = TestMesh::start().await;
    if mesh.nats.is_some() {
        return (mesh, None);
    }
    mesh.shutdown().await;
    let server = NatsServer::start().await;
    let mesh = TestMesh::start_with(MeshOptions {
        nats_url: Some(server.url()),
        ..Default::default()
    })
    .await;
    (mesh, Some(server))
}

#[tokio::test]
async fn every_change_reaches_a_plain_nats_subscriber() {
    let (mesh, _server) = mesh_on_nats().await;
    let nats = mesh.nats.clone().expect("on NATS");
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let mut sub = client
        .subscribe(mesh.wire_subject("kiln.identity.>"))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let admin = mesh.admin().await;
    create_account(&admin, "acme").await;
    let renamed = idv1::Account {
        name: "accounts/acme".into(),
        display_name: "Acme".into(),
        ..Default::default()
    };
    update_account(&admin, renamed, &["display_name"])
        .await
        .unwrap();
    create_user(&admin, "acme", "alice", "user").await;
    let alice = "accounts/acme/users/alice";
    let promoted = idv1::User {
        name: alice.into(),
        role: "admin".into(),
        ..Default::default()
    };
    update_user(&admin, promoted, &["role"]).await.unwrap();
    let key = create_key(&admin, "acme", "alice", None).await;
    delete_key(&admin, &key.name).await.unwrap();
    delete_user(&admin, alice).await.unwrap();
    delete_account(&admin, "accounts/acme").await.unwrap();

    let mut got: Vec<(String, Event)> = Vec::new();
    while got.len() < 8 {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("events arrive")
            .expect("subscription open");
        let event = Event::decode(msg.payload.as_ref()).expect("decodes as kiln.events.v1.Event");
        if event.account != "accounts/acme" {
            // The bootstrap's own events may still be on their way out of the outbox.
            continue;
        }
        let msg_id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned());
        assert_eq!(
            msg_id.as_deref(),
            Some(event.id.as_str()),
            "the event id is the Nats-Msg-Id"
        );
        assert_eq!(
            msg.subject.as_str(),
            mesh.wire_subject(&format!("kiln.{}", event.r#type))
        );
        assert_eq!(event.source, "kiln-identity");
        got.push((event.r#type.clone(), event));
    }
    let types: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "identity.account.created",
            "identity.account.updated",
            "identity.user.created",
            "identity.user.updated",
            "identity.api_key.created",
            "identity.api_key.deleted",
            "identity.user.deleted",
            "identity.account.deleted",
        ]
    );
    for (_, event) in &got {
        assert_eq!(event.account, "accounts/acme");
        assert!(event.time.is_some());
        match event.body.as_ref().expect("a body") {
            Body::AccountCreated(b) => {
                assert_eq!(b.account.as_ref().unwrap().name, "accounts/acme")
            }
            Body::AccountUpdated(b) => {
                assert_eq!(b.account.as_ref().unwrap().display_name, "Acme");
                assert_eq!(b.update_mask.as_ref().unwrap().paths, ["display_name"]);
            }
            Body::UserCreated(b) => {
                assert_eq!(b.user.as_ref().unwrap().name, "accounts/acme/users/alice")
            }
            Body::UserUpdated(b) => assert_eq!(b.user.as_ref().unwrap().role, "admin"),
            Body::ApiKeyCreated(b) => {
                let k = b.api_key.as_ref().unwrap();
                assert_eq!(k.name, key.name);
                assert!(k.key.is_empty(), "events never carry the secret");
            }
            Body::ApiKeyDeleted(b) => assert_eq!(b.name, key.name),
            Body::UserDeleted(b) => assert_eq!(b.name, "accounts/acme/users/alice"),
            Body::AccountDeleted(b) => assert_eq!(b.name, "accounts/acme"),
            other => panic!("unexpected body {other:?}"),
        }
    }
    mesh.shutdown().await;
}

async fn outbox_rows(db: &sea_orm::DatabaseConnection) -> i64 {
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM kiln_outbox".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

/// Waits until the outbox holds no event.
async fn outbox_drained(db: &sea_orm::DatabaseConnection, timeout: Duration, what: &str) {
    wait_for(timeout, what, || async {
        (outbox_rows(db).await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_outbox_delivers_every_event_exactly_once_across_a_nats_outage() {
    let mut server = NatsServer::start().await;
    let mesh = TestMesh::start_with(MeshOptions {
        nats_url: Some(server.url()),
        ..Default::default()
    })
    .await;
    let nats = mesh.nats.clone().unwrap();
    let admin = mesh.admin().await;
    let db = mesh.identity_db().await;
    create_account(&admin, "acme").await;
    for i in 0..5 {
        create_user(&admin, "acme", &format!("before-{i}"), "user").await;
    }
    outbox_drained(
        &db,
        Duration::from_secs(10),
        "the first events to be relayed",
    )
    .await;

    server.stop().await;
    // Writes go on while NATS is down; their events wait in the outbox.
    for i in 0..10 {
        create_user(&admin, "acme", &format!("during-{i}"), "user").await;
    }
    assert_eq!(outbox_rows(&db).await, 10, "the events wait in the outbox");

    server.resume().await;
    let what = "the outbox to drain after NATS is back";
    outbox_drained(&db, Duration::from_secs(30), what).await;

    // Read the whole stream back: every event once.
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&nats.stream).await.unwrap();
    // bootstrap (account, user, key), the mesh's node registering with the scheduler, acme,
    // users
    let expected = 3 + 1 + 1 + 5 + 10;
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.state.messages, expected,
        "JetStream holds each event once"
    );
    let mut ids = HashSet::new();
    let mut user_names = HashSet::new();
    for seq in 1..=info.state.last_sequence {
        let raw = stream.get_raw_message(seq).await.unwrap();
        let event = Event::decode(raw.payload.as_ref()).unwrap();
        assert!(
            ids.insert(event.id.clone()),
            "event {} stored twice",
            event.id
        );
        if let Some(Body::UserCreated(u)) = event.body {
            user_names.insert(u.user.unwrap().name);
        }
    }
    for i in 0..10 {
        assert!(user_names.contains(&format!("accounts/acme/users/during-{i}")));
    }
    assert_eq!(ids.len() as u64, expected);
    mesh.shutdown().await;
}

mod counting {
    //! A counting handler for the idempotency tests.
    use super::*;

    pub struct Counter {
        pub fail_first: std::sync::Mutex<HashSet<String>>,
    }

    #[async_trait::async_trait]
    impl EventHandler for Counter {
        async fn handle(
            &self,
            txn: &DatabaseTransaction,
            event: &Event,
        ) -> Result<(), kiln_events::Error> {
            // Fail the first delivery of selected events: they must come back and count once.
            if self.fail_first.lock().unwrap().remove(&event.id) {
                return Err(kiln_events::Error::Handler("first attempt fails".into()));
            }
            let backend = txn.get_database_backend();
            txn.execute(kiln_store::statement(
                backend,
                "INSERT INTO test_counts (event_id) VALUES (?)",
                [event.id.clone().into()],
            ))
            .await?;
            Ok(())
        }
    }

    pub fn handler(fail_first: &[&str]) -> Arc<Counter> {
        Arc::new(Counter {
            fail_first: std::sync::Mutex::new(fail_first.iter().map(|s| s.to_string()).collect()),
        })
    }
}

async fn counts(db: &sea_orm::DatabaseConnection) -> HashMap<String, i64> {
    let rows = db
        .query_all(Statement::from_string(
            db.get_database_backend(),
            "SELECT event_id, COUNT(*) AS n FROM test_counts GROUP BY event_id".to_owned(),
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.try_get::<String>("", "event_id").unwrap(),
                r.try_get::<i64>("", "n").unwrap(),
            )
        })
        .collect()
}

fn test_event(id: &str) -> Event {
    Event {
        id: id.to_owned(),
        r#type: "identity.user.deleted".into(),
        body: Some(Body::UserDeleted(kiln_proto::events::v1::UserDeleted {
            name: format!("accounts/t/users/{id}"),
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn redelivered_and_replayed_events_change_nothing() {
    let mesh = TestMesh::start().await;
    let db = mesh.identity_db().await;
    db.execute_unprepared("CREATE TABLE test_counts (event_id TEXT NOT NULL)")
        .await
        .unwrap();

    // Directly: the second handling of one id is a no-op.
    let h = handler(&[]);
    let e = test_event(&uuid::Uuid::now_v7().to_string());
    assert_eq!(
        handle_once(&db, "test-consumer", &e, h.as_ref())
            .await
            .unwrap(),
        Handled::Applied
    );
    assert_eq!(
        handle_once(&db, "test-consumer", &e, h.as_ref())
            .await
            .unwrap(),
        Handled::Duplicate
    );
    assert_eq!(counts(&db).await.get(&e.id), Some(&1));

    // Through the bus: one event fails its first delivery and comes back; a duplicate
    // publish of another is dropped; all count exactly once.
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let h = handler(&[ids[1].as_str()]);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let name = format!("test-{}", uuid::Uuid::new_v4().simple());
    let once_each = OnceEach::new(db.clone(), &name, h);
    let task = spawn_consumer(
        mesh.bus.clone(),
        name,
        "kiln.identity.user.deleted".into(),
        1,
        once_each,
        shutdown,
    );
    for id in &ids {
        mesh.bus
            .publish("kiln.identity.user.deleted", &test_event(id))
            .await
            .unwrap();
    }
    mesh.bus
        .publish("kiln.identity.user.deleted", &test_event(&ids[0]))
        .await
        .unwrap();
    let final_counts = wait_for(
        Duration::from_secs(20),
        "all three events to be handled",
        || {
            let db = db.clone();
            let ids = ids.clone();
            async move {
                let c = counts(&db).await;
                ids.iter().all(|id| c.contains_key(id)).then_some(c)
            }
        },
    )
    .await;
    for id in &ids {
        assert_eq!(final_counts[id], 1, "{id} handled once");
    }
    let _ = stop.send(true);
    task.await.unwrap();
    mesh.shutdown().await;
}

#[tokio::test]
async fn trace_context_crosses_grpc_into_events() {
    let mesh = TestMesh::start().await;
    let mut events = mesh.subscribe("kiln.identity.account.created").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(idv1::CreateAccountRequest {
        account_id: "traced".into(),
        account: None,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    accounts(&mesh.admin().await)
        .create_account(request)
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        event.trace_context.contains(trace_id),
        "the event carries the caller's trace: {:?}",
        event.trace_context
    );
    mesh.shutdown().await;
}

/// The example consumer in Python (examples/events/usage_meter.py: nats-py, code generated
/// from proto/) against the mesh on NATS: it counts every answer's usage once, a second run
/// finds nothing new, and a replay from the stream's start adds nothing to what it counted
/// (or, with a fresh record of ids, counts the same again).
#[tokio::test]
async fn the_python_usage_meter_counts_each_answer_once() {
    use kiln_tests::inference::{MINILM, embed, first_embeddings, minilm_asset_dir};
    use kiln_tests::python::Script;

    let assets = minilm_asset_dir();
    let server = match kiln_tests::Backends::from_env().nats_url {
        Some(_) => None,
        None => Some(NatsServer::start().await),
    };
    let mesh = kiln_tests::library_mesh_with(
        assets.path(),
        MeshOptions {
            nats_url: server.as_ref().map(NatsServer::url),
            ..Default::default()
        },
    )
    .await;
    let nats = mesh.nats.clone().expect("on NATS");
    let ch = mesh.tenant_channel("metered").await;
    let texts = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut prompt_tokens = i64::from(
        first_embeddings(&ch, MINILM, &texts(&["warm up"]), Duration::from_secs(120))
            .await
            .usage
            .unwrap()
            .prompt_tokens,
    );
    let mut requests = 1;
    for input in [&["one sentence"][..], &["two", "inputs here"]] {
        let answer = embed(&ch, MINILM, &texts(input)).await.unwrap();
        prompt_tokens += i64::from(answer.usage.unwrap().prompt_tokens);
        requests += 1;
    }

    let state = tempfile::tempdir().unwrap();
    let subject = mesh.wire_subject("kiln.inference.usage.recorded");
    let meter = |state_file: &str, replay: bool| {
        let script = Script::example("events/usage_meter.py")
            .arg("--nats", &nats.url)
            .arg("--stream", &nats.stream)
            .arg("--subject", &subject)
            .arg("--durable", "meter")
            .arg("--state", state.path().join(state_file).display())
            .arg("--idle-exit", 2)
            .switch("--replay", replay)
            .switch("--json", true);
        // The mesh runs on this test's runtime while the script runs.
        async move {
            let ran = tokio::task::spawn_blocking(move || script.run()).await;
            ran.unwrap().unwrap_or_else(|e| panic!("{e}"))
        }
    };
    let metered = |report: &serde_json::Value| -> (i64, i64) {
        let counted = report["counted"].as_array().unwrap();
        let ours = counted
            .iter()
            .filter(|u| u["account"] == "accounts/metered" && u["model"] == MINILM);
        ours.fold((0, 0), |(n, tokens), u| {
            (n + 1, tokens + u["prompt_tokens"].as_i64().unwrap())
        })
    };
    // The usage leaves each answer's outbox shortly after it: meter until all of it came.
    let mut total = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while total.0 < requests && tokio::time::Instant::now() < deadline {
        let (n, tokens) = metered(&meter("seen.db", false).await);
        total = (total.0 + n, total.1 + tokens);
    }
    assert_eq!(
        total,
        (requests, prompt_tokens),
        "each answer once, its tokens"
    );

    assert_eq!(
        metered(&meter("seen.db", false).await),
        (0, 0),
        "nothing new"
    );
    let replayed = meter("seen.db", true).await;
    assert_eq!(metered(&replayed), (0, 0), "a replay adds nothing");
    assert!(replayed["skipped"].as_i64().unwrap() >= requests);
    assert_eq!(
        metered(&meter("fresh.db", true).await),
        (requests, prompt_tokens),
        "the stream still holds every event"
    );
    mesh.shutdown().await;
}
