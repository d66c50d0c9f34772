//! SIGTERM to `kiln dev` in the middle of eight streaming chats: every client gets its whole
//! answer or a clean UNAVAILABLE, the ledger holds exactly the usage of the answered ones,
//! and neither the stopped nor the restarted `kiln dev` has anything left in its outboxes.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use kiln_tests::billing::totals;
use kiln_tests::inference::client;
use kiln_tests::llm::{chat, chat_request, first_chat, smollm2_asset_dir};
use kiln_tests::{AuthedChannel, channel_to, wait_for};
use sea_orm::{ConnectionTrait, Statement};
use tokio::sync::mpsc;

use super::KilnDev;

/// How a stream ended for its client.
#[derive(Debug)]
enum Outcome {
    /// The whole answer, with its usage.
    Answered { prompt: i64, completion: i64 },
    /// Ended by the server's stop.
    Unavailable,
}

/// Streams a chat; says on `started` when its first words arrive (or it ends).
async fn stream(ch: AuthedChannel, max_tokens: i32, started: mpsc::Sender<()>) -> Outcome {
    let request = chat_request("Tell me a long story about a lighthouse.", max_tokens);
    let mut chunks = client(&ch)
        .stream_chat_completion(request)
        .await
        .expect("the stream opens")
        .into_inner();
    let mut first = true;
    let mut finished = false;
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Outcome::Unavailable;
            }
            Err(status) => panic!("a stream ended with {status:?}"),
        };
        finished |= chunk.choices.iter().any(|c| !c.finish_reason.is_empty());
        let words = chunk
            .choices
            .iter()
            .any(|c| c.delta.as_ref().is_some_and(|d| !d.content.is_empty()));
        if first && (words || finished) {
            first = false;
            let _ = started.send(()).await;
        }
        if let Some(usage) = chunk.usage {
            assert!(finished, "the usage comes after the last words");
            return Outcome::Answered {
                prompt: i64::from(usage.prompt_tokens),
                completion: i64::from(usage.completion_tokens),
            };
        }
    }
    panic!("a stream ended without its usage or an error");
}

/// Rows left in the outboxes of every database in `data`, and usage left in inference's journal.
async fn unsent(data: &Path) -> i64 {
    let mut left = 0;
    for entry in std::fs::read_dir(data).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "db") {
            continue;
        }
        let db = kiln_store::connect(&format!("sqlite://{}?mode=ro", path.display()))
            .await
            .unwrap();
        let counted = db
            .query_one(Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM kiln_outbox",
            ))
            .await;
        if let Ok(Some(row)) = counted {
            left += row.try_get::<i64>("", "n").unwrap();
        }
    }
    left + kiln_inference::unsettled_usage(data).unwrap() as i64
}

/// The kiln account's (requests, prompt tokens, completion tokens) in the ledger.
async fn ledger(ch: &AuthedChannel) -> (i64, i64, i64) {
    let row = totals(ch, "accounts/kiln").await;
    (row.request_count, row.prompt_tokens, row.completion_tokens)
}

async fn admin(dev: &KilnDev) -> AuthedChannel {
    let key = super::admin_key(dev.data_dir()).await;
    channel_to(&dev.server(), Some(&key)).await
}

#[tokio::test]
async fn sigterm_during_streaming_chats_loses_and_double_bills_nothing() {
    let assets = smollm2_asset_dir();
    let configure = |command: &mut tokio::process::Command| {
        command
            .env("KILN_REGISTRY__ASSET_DIR", assets.path())
            .env("KILN_SHUTDOWN_GRACE", "3s")
            .env_remove("KILN_NATS_URL")
            .env_remove("KILN_DATABASE_URL");
    };
    let dev = KilnDev::start(configure).await;
    let ch = admin(&dev).await;
    let warm = first_chat(&ch, "Hi", 4, Duration::from_secs(600)).await;
    let warm = warm.usage.unwrap();
    let mut expected = (
        1,
        i64::from(warm.prompt_tokens),
        i64::from(warm.completion_tokens),
    );

    // Four short answers, which end within the grace period, and four long ones, which
    // cannot.
    let (started, mut first_words) = mpsc::channel(8);
    let streams: Vec<_> = [6, 6, 6, 6, 2000, 2000, 2000, 2000]
        .into_iter()
        .map(|max_tokens| tokio::spawn(stream(ch.clone(), max_tokens, started.clone())))
        .collect();
    for _ in 0..8 {
        first_words.recv().await.expect("each stream starts");
    }
    let data = dev.terminate().await;
    // A clean stop publishes everything it recorded, the usage of its last answers included.
    assert_eq!(
        unsent(data.path()).await,
        0,
        "outboxes empty after the stop"
    );

    let mut cut = 0;
    for outcome in futures::future::join_all(streams).await {
        match outcome.unwrap() {
            Outcome::Answered { prompt, completion } => {
                expected.0 += 1;
                expected.1 += prompt;
                expected.2 += completion;
            }
            Outcome::Unavailable => cut += 1,
        }
    }
    assert!(cut > 0, "the long answers outlast a grace of three seconds");
    assert!(expected.0 > 1, "the short answers end within it");

    // Restarted, it publishes what the stop left and bills each answered request once.
    let dev = KilnDev::start_in(data, configure).await;
    let ch = admin(&dev).await;
    wait_for(Duration::from_secs(60), "empty outboxes", || async {
        (unsent(dev.data_dir()).await == 0).then_some(())
    })
    .await;
    wait_for(
        Duration::from_secs(60),
        "the answered usage booked",
        || async { (ledger(&ch).await == expected).then_some(()) },
    )
    .await;
    // One more answer, booked after anything still on its way: nothing else was.
    let after = chat(&ch, "Hi", 4).await.unwrap().usage.unwrap();
    let expected = (
        expected.0 + 1,
        expected.1 + i64::from(after.prompt_tokens),
        expected.2 + i64::from(after.completion_tokens),
    );
    wait_for(
        Duration::from_secs(60),
        "the last answer booked",
        || async { (ledger(&ch).await == expected).then_some(()) },
    )
    .await;
    assert_eq!(ledger(&ch).await, expected, "exactly the answered usage");
    dev.terminate().await;
}
