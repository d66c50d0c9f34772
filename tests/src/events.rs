//! Waiting for events on the bus.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_events::{Body, Event};
use kiln_proto::events::v1::UsageRecorded;

/// The events of a subscription (`mesh.bus.subscribe(…)`).
pub type Events = BoxStream<'static, Event>;

/// Reads `events` until `pick` takes one (returns `Some`), for at most `timeout`; panics
/// naming `what` when none comes.
pub async fn next_event<T>(
    events: &mut Events,
    timeout: Duration,
    what: &str,
    mut pick: impl FnMut(Body) -> Option<T>,
) -> T {
    let picked = tokio::time::timeout(timeout, async {
        loop {
            let event = events.next().await.expect("the bus is open");
            if let Some(picked) = event.body.and_then(&mut pick) {
                return picked;
            }
        }
    })
    .await;
    picked.unwrap_or_else(|_| panic!("no {what} event within {timeout:?}"))
}

/// The next usage event of `account`'s requests (10 s at most).
pub async fn next_usage(events: &mut Events, account: &str) -> UsageRecorded {
    next_event(
        events,
        Duration::from_secs(10),
        &format!("usage for {account}"),
        |body| match body {
            Body::UsageRecorded(usage) if usage.account == account => Some(usage),
            _ => None,
        },
    )
    .await
}
