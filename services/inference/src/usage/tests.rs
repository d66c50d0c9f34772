//! The usage recorder against a SQLite database and a journal of its own.

use super::*;

async fn node_db(dir: &std::path::Path) -> DatabaseConnection {
    let url = format!("sqlite://{}?mode=rwc", dir.join("node.db").display());
    let db = kiln_store::connect(&url).await.unwrap();
    kiln_store::migrate(&db, crate::SERVICE, crate::MIGRATIONS)
        .await
        .unwrap();
    db
}

fn start(
    db: &DatabaseConnection,
    journal_dir: &Path,
    stopped: Option<watch::Receiver<bool>>,
    settle: Linger,
) -> (UsageRecorder, tokio::task::JoinHandle<()>) {
    let recording = Recording {
        node: "n1",
        accelerator: AcceleratorType::Cpu,
        limiter: None,
        journal_dir,
    };
    let outbox = Outbox::new(crate::SERVICE);
    UsageRecorder::start_settling(db.clone(), outbox, recording, stopped, settle).unwrap()
}

fn acme() -> Principal {
    Principal {
        account: "acme".into(),
        ..Principal::service()
    }
}

fn usage(request_id: &str, tokens: i64) -> Usage {
    Usage {
        request_id: request_id.into(),
        model: "accounts/kiln/models/m".into(),
        api: "embeddings",
        prompt_tokens: tokens,
        embedding_input_tokens: tokens,
        start_micros: kiln_core::time::now_micros(),
        ..Default::default()
    }
}

/// The usage events in the outbox, in order.
async fn billed(db: &DatabaseConnection) -> Vec<UsageRecorded> {
    db.query_all(Statement::from_string(
        db.get_database_backend(),
        "SELECT payload FROM kiln_outbox ORDER BY seq",
    ))
    .await
    .unwrap()
    .iter()
    .map(|row| {
        let payload: Vec<u8> = row.try_get("", "payload").unwrap();
        match Event::decode(payload.as_slice()).unwrap().body {
            Some(Body::UsageRecorded(u)) => u,
            other => panic!("not a usage event: {other:?}"),
        }
    })
    .collect()
}

fn request_ids(billed: &[UsageRecorded]) -> Vec<&str> {
    billed.iter().map(|u| u.request_id.as_str()).collect()
}

#[tokio::test]
async fn a_confirmed_reservation_is_billed_once_a_dropped_one_never() {
    let dir = tempfile::tempdir().unwrap();
    let db = node_db(dir.path()).await;
    let journal = dir.path().join("journal");
    // Settlements wait for the stop here, so what the writer holds can be seen.
    let (stop, stopped) = watch::channel(false);
    let (usage_of, writer) = start(
        &db,
        &journal,
        Some(stopped),
        Linger::fixed(Duration::from_secs(3600)),
    );

    let answered = usage_of
        .reserve(&acme(), usage("embd-answered", 7))
        .unwrap();
    let failed = usage_of.reserve(&acme(), usage("embd-failed", 9)).unwrap();
    assert_eq!(unsettled_in(&journal).unwrap(), 2, "in the journal at once");
    answered.confirm();
    drop(failed);
    // A record is written at once; the settlements wait to share a commit.
    usage_of
        .record(&acme(), usage("embd-recorded", 1))
        .await
        .unwrap();
    assert_eq!(request_ids(&billed(&db).await), ["embd-recorded"]);
    assert_eq!(unsettled_in(&journal).unwrap(), 2, "neither settled yet");
    stop.send(true).unwrap();
    writer.await.unwrap();

    let billed = billed(&db).await;
    assert_eq!(request_ids(&billed), ["embd-recorded", "embd-answered"]);
    let answered = &billed[1];
    assert_eq!(answered.account, "accounts/acme");
    assert_eq!(answered.embedding_input_tokens, 7);
    assert_eq!(answered.node, "nodes/n1");
    let time = |t: Option<prost_types::Timestamp>| {
        let t = t.unwrap();
        t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
    };
    assert!(time(answered.end_time) >= time(answered.start_time));
    assert_eq!(unsettled_in(&journal).unwrap(), 0, "nothing left unsettled");
}

#[tokio::test]
async fn settlements_are_written_a_moment_after_the_answer_without_more_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let db = node_db(dir.path()).await;
    let journal = dir.path().join("journal");
    let (usage_of, _writer) = start(&db, &journal, None, SETTLE);
    for i in 0..3 {
        let reservation = usage_of.reserve(&acme(), usage(&format!("embd-{i}"), 2));
        reservation.unwrap().confirm();
    }
    // The journal's marks follow the outbox commit: wait for both.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while billed(&db).await.len() < 3 || unsettled_in(&journal).unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(billed(&db).await.len(), 3);
}

#[tokio::test]
async fn usage_a_crash_left_reserved_is_billed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = node_db(dir.path()).await;
    let journal = dir.path().join("journal");
    // A run that crashed mid-answer: its reservation is in the journal, unsettled.
    let crashed = UsageRecorder {
        queue: mpsc::unbounded_channel().0,
        settling: Arc::default(),
        outbox: Outbox::new(crate::SERVICE),
        journal: Arc::new(Journal::open(&journal).unwrap().0),
        node: "n1".into(),
        accelerator: AcceleratorType::Cpu,
        limiter: None,
    };
    std::mem::forget(crashed.reserve(&acme(), usage("embd-journal", 5)).unwrap());
    // And rows the pending table of an older version kept, of this node and another.
    for node in ["n1", "n2"] {
        let event = crashed.event(&acme(), usage(&format!("embd-table-{node}"), 3));
        db.execute(statement(
            db.get_database_backend(),
            "INSERT INTO inference_usage_pending (event_id, node, payload, created_at) \
             VALUES (?, ?, ?, 0)",
            [
                event.id.clone().into(),
                node.into(),
                event.encode_to_vec().into(),
            ],
        ))
        .await
        .unwrap();
    }
    drop(crashed);
    assert!(billed(&db).await.is_empty());

    let (restarted, _writer) = start(&db, &journal, None, SETTLE);
    restarted
        .record(&acme(), usage("embd-barrier", 1))
        .await
        .unwrap();
    assert_eq!(
        request_ids(&billed(&db).await),
        ["embd-journal", "embd-table-n1", "embd-barrier"],
        "what the crash left is billed first"
    );
    assert_eq!(unsettled_in(&journal).unwrap(), 0);
    let left = db
        .query_all(Statement::from_string(
            db.get_database_backend(),
            "SELECT node FROM inference_usage_pending",
        ))
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "another node's rows are its own");
}
