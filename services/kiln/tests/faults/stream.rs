//! What the cluster's event stream holds, read from the start with a consumer of the test's
//! own: to count each event by its id.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt;
use kiln_events::{Body, Event};
use kiln_proto::events::v1::UsageRecorded;
use prost::Message;

/// Every event on the stream, in order.
pub async fn events(nats_url: &str) -> Vec<Event> {
    let client = async_nats::connect(nats_url).await.expect("connect NATS");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("KILN").await.expect("the KILN stream");
    let held = stream.info().await.expect("stream info").state.messages;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::with_capacity(held as usize);
    while out.len() < held as usize {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let message = next
            .expect("the stream's messages come")
            .expect("open")
            .expect("a message");
        out.push(Event::decode(message.payload.as_ref()).expect("an event"));
    }
    out
}

/// The usage events of `account` on the stream, each id asserted to appear once.
pub async fn usage_of(nats_url: &str, account: &str) -> Vec<UsageRecorded> {
    let all = events(nats_url).await;
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &all {
        *seen.entry(event.id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "events on the stream more than once: {twice:?}"
    );
    all.into_iter()
        .filter_map(|e| match e.body {
            Some(Body::UsageRecorded(u)) if u.account == account => Some(u),
            _ => None,
        })
        .collect()
}
