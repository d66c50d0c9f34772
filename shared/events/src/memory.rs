//! The in-process bus: `kiln dev` and unit tests. Same semantics as the NATS one within a
//! process: deduplication by event id, fan-out subscriptions, durable consumers that resume
//! where they left off and redeliver what was not acknowledged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use crate::bus::{Delivery, EventBus, subject_matches};
use crate::{Error, Event};

/// Events kept for durable consumers; the oldest are dropped past this.
const RETAINED_EVENTS: usize = 100_000;
/// How long a delivery may stay unacknowledged before it is delivered again.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Pause before redelivering a negatively acknowledged event.
const NACK_DELAY: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Log {
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    entries: VecDeque<(String, Event)>,
    seen_ids: HashSet<String>,
    seen_order: VecDeque<String>,
    /// Next sequence each durable consumer will look at.
    cursors: HashMap<String, u64>,
}

/// An in-process event bus.
#[derive(Clone)]
pub struct InProcessBus {
    log: Arc<Mutex<Log>>,
    appended: Arc<Notify>,
    live: broadcast::Sender<(String, Event)>,
}

impl Default for InProcessBus {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessBus {
    pub fn new() -> Self {
        Self {
            log: Arc::default(),
            appended: Arc::new(Notify::new()),
            live: broadcast::channel(4096).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl EventBus for InProcessBus {
    async fn publish(&self, subject: &str, event: &Event) -> Result<(), Error> {
        {
            let mut log = self.lock();
            if !log.seen_ids.insert(event.id.clone()) {
                return Ok(());
            }
            log.seen_order.push_back(event.id.clone());
            log.entries.push_back((subject.to_owned(), event.clone()));
            while log.entries.len() > RETAINED_EVENTS {
                log.entries.pop_front();
                log.first_seq += 1;
                if let Some(old) = log.seen_order.pop_front() {
                    log.seen_ids.remove(&old);
                }
            }
        }
        self.appended.notify_waiters();
        // No live subscribers is fine: subscriptions only see what comes after them.
        let _ = self.live.send((subject.to_owned(), event.clone()));
        Ok(())
    }

    async fn subscribe(&self, filter: &str) -> Result<BoxStream<'static, Event>, Error> {
        let filter = filter.to_owned();
        let rx = self.live.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| {
            let keep = match item {
                Ok((subject, event)) if subject_matches(&filter, &subject) => Some(event),
                Ok(_) => None,
                Err(lagged) => {
                    tracing::warn!(%lagged, "in-process subscriber fell behind; events skipped");
                    None
                }
            };
            futures::future::ready(keep)
        });
        Ok(stream.boxed())
    }

    async fn consume(
        &self,
        name: &str,
        filter: &str,
    ) -> Result<BoxStream<'static, Result<Delivery, Error>>, Error> {
        let (tx, rx) = mpsc::channel(1);
        let bus = self.clone();
        let name = name.to_owned();
        let filter = filter.to_owned();
        tokio::spawn(async move { bus.feed_consumer(name, filter, tx).await });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

impl InProcessBus {
    /// Delivers the consumer's events one at a time, in order, advancing its cursor on ack.
    async fn feed_consumer(
        self,
        name: String,
        filter: String,
        tx: mpsc::Sender<Result<Delivery, Error>>,
    ) {
        let mut attempt = 0u64;
        let mut last_seq = None;
        loop {
            let appended = self.appended.notified();
            let next = {
                let mut log = self.lock();
                let first_seq = log.first_seq;
                let cursor = log.cursors.entry(name.clone()).or_insert(0);
                *cursor = (*cursor).max(first_seq);
                let mut seq = *cursor;
                let mut found = None;
                while let Some((subject, event)) = log.entries.get((seq - first_seq) as usize) {
                    if subject_matches(&filter, subject) {
                        let after = log.entries.len() as u64 - (seq - first_seq) - 1;
                        found = Some((seq, subject.clone(), event.clone(), after));
                        break;
                    }
                    seq += 1;
                }
                if found.is_none() {
                    log.cursors.insert(name.clone(), seq);
                }
                found
            };
            let Some((seq, subject, event, pending)) = next else {
                tokio::select! {
                    _ = appended => continue,
                    _ = tx.closed() => return,
                }
            };
            attempt = if last_seq == Some(seq) {
                attempt + 1
            } else {
                1
            };
            last_seq = Some(seq);
            let (ack_tx, ack_rx) = oneshot::channel::<bool>();
            let acker = Box::new(move |ok: bool| {
                let _ = ack_tx.send(ok);
                Box::pin(async { Ok(()) }) as futures::future::BoxFuture<'static, _>
            });
            if tx
                .send(Ok(Delivery::new(subject, event, attempt, pending, acker)))
                .await
                .is_err()
            {
                return;
            }
            match tokio::time::timeout(ACK_WAIT, ack_rx).await {
                Ok(Ok(true)) => {
                    let mut log = self.lock();
                    log.cursors.insert(name.clone(), seq + 1);
                }
                Ok(Ok(false)) => tokio::time::sleep(NACK_DELAY).await,
                // Dropped without an answer, or too slow: deliver again.
                Ok(Err(_)) | Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::events::v1::{AccountDeleted, event::Body};

    fn event(id: &str) -> Event {
        Event {
            id: id.to_owned(),
            r#type: "identity.account.deleted".into(),
            body: Some(Body::AccountDeleted(AccountDeleted {
                name: format!("accounts/{id}"),
            })),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn durable_consumer_resumes_and_dedups() {
        let bus = InProcessBus::new();
        let subject = "kiln.identity.account.deleted";
        bus.publish(subject, &event("a")).await.unwrap();
        bus.publish(subject, &event("a")).await.unwrap();
        bus.publish("kiln.other.thing.x", &event("x"))
            .await
            .unwrap();
        bus.publish(subject, &event("b")).await.unwrap();

        let mut stream = bus.consume("c1", "kiln.identity.>").await.unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.event.id, "a");
        first.ack().await.unwrap();
        // Not acked: the next consumer incarnation gets it again.
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(second.event.id, "b");
        drop(second);
        drop(stream);

        let mut again = bus.consume("c1", "kiln.identity.>").await.unwrap();
        let redelivered = again.next().await.unwrap().unwrap();
        assert_eq!(redelivered.event.id, "b");
        redelivered.ack().await.unwrap();
    }

    #[tokio::test]
    async fn subscribers_see_only_new_matching_events() {
        let bus = InProcessBus::new();
        bus.publish("kiln.identity.user.created", &event("old"))
            .await
            .unwrap();
        let mut sub = bus.subscribe("kiln.identity.>").await.unwrap();
        bus.publish("kiln.billing.quota.updated", &event("q"))
            .await
            .unwrap();
        bus.publish("kiln.identity.user.created", &event("new"))
            .await
            .unwrap();
        assert_eq!(sub.next().await.unwrap().id, "new");
    }
}
