//! Usage is booked exactly once whatever stops under traffic: billing killed and restarted,
//! the NATS server stopped and started.

use std::time::Duration;

use kiln_tests::billing::totals;
use kiln_tests::wait_for;
use tonic::Code;

use crate::cluster::{Cluster, Shape};
use crate::stream;
use crate::traffic::{Tally, Traffic};

/// Once the outboxes are empty, the ledger holds exactly `tally`'s answers and tokens for
/// `account`, and the stream one usage event per answer.
pub(crate) async fn booked_exactly(cluster: &Cluster, account: &str, tally: &Tally) {
    wait_for(Duration::from_secs(60), "empty outboxes", || async {
        cluster.unsent().await.is_empty().then_some(())
    })
    .await;
    let billing = cluster.channel("billing", None).await;
    let expected = (tally.answered, tally.tokens);
    let what = format!("the ledger to hold {expected:?}");
    wait_for(Duration::from_secs(60), &what, || async {
        let row = totals(&billing, account).await;
        ((row.request_count, row.embedding_tokens) == expected).then_some(())
    })
    .await;
    let usage: Vec<_> = stream::usage_of(&cluster.nats.url(), account)
        .await
        .into_iter()
        .filter(|u| u.api == "embeddings")
        .collect();
    let tokens: i64 = usage.iter().map(|u| u.embedding_input_tokens).sum();
    assert_eq!(
        (usage.len() as i64, tokens),
        expected,
        "one usage event per answer on the stream"
    );
}

#[tokio::test]
async fn billing_killed_and_restarted_under_traffic_books_each_answer_once() {
    let (mut cluster, key, model, _) = Cluster::serving_minilm(Shape::nodes(1)).await;
    let inference = cluster.channel("inference-1", Some(&key)).await;
    let traffic = Traffic::embeddings(&inference, &model, 4, &[Code::Unavailable]);
    traffic.answers(20).await;
    cluster.process("billing").kill().await;
    // Inference goes on without billing: usage waits in its outbox, on the stream.
    let during = traffic.answers(20).await;
    cluster.process("billing").restart().await;
    traffic.answers(20).await;
    let tally = traffic.stop().await;
    assert!(
        during.answered >= 40,
        "answers while billing was down: {during:?}"
    );
    booked_exactly(&cluster, "accounts/acme", &tally).await;
}

#[tokio::test]
async fn the_bus_stopped_and_started_under_traffic_loses_and_repeats_nothing() {
    let (mut cluster, key, model, _) = Cluster::serving_minilm(Shape::nodes(1)).await;
    let inference = cluster.channel("inference-1", Some(&key)).await;
    let traffic = Traffic::embeddings(&inference, &model, 4, &[Code::Unavailable]);
    traffic.answers(20).await;
    cluster.nats.stop().await;
    // Answers go on: their usage waits in the outbox until the bus is back.
    traffic.answers(20).await;
    assert!(
        !cluster.unsent().await.is_empty(),
        "usage waits while the bus is down"
    );
    cluster.nats.resume().await;
    traffic.answers(20).await;
    let tally = traffic.stop().await;
    booked_exactly(&cluster, "accounts/acme", &tally).await;
}

#[tokio::test]
async fn sigterm_to_every_service_under_traffic_ends_each_call_cleanly_and_loses_no_usage() {
    let (mut cluster, key, model, _) = Cluster::serving_minilm(Shape::nodes(1)).await;
    let inference = cluster.channel("inference-1", Some(&key)).await;
    // Once everything stops, calls are refused: the connection is gone (UNAVAILABLE), or
    // was going as the call was sent (CANCELLED: the server's GOAWAY said it never ran; the
    // ledger check below proves no such call was answered).
    let clean = &[Code::Unavailable, Code::Cancelled];
    let traffic = Traffic::embeddings(&inference, &model, 4, clean);
    traffic.answers(40).await;
    let unclean = cluster.terminate_all(Duration::from_secs(20)).await;
    assert!(
        unclean.is_empty(),
        "exited uncleanly on SIGTERM: {unclean:?}"
    );
    // A clean stop publishes what it recorded: nothing waits in an outbox.
    let unsent = cluster.unsent().await;
    assert!(
        unsent.is_empty(),
        "outboxes empty after the stop: {unsent:?}"
    );
    let refused = traffic.calls(8).await;
    let tally = traffic.stop().await;
    assert!(refused.refused.contains_key("Unavailable"), "{refused:?}");

    cluster.restart_all().await;
    booked_exactly(&cluster, "accounts/acme", &tally).await;
}
