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
/// Events a durable consumer may hold unacknowledged at once.
const WINDOW: usize = 256;

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
    /// The next events (up to [`WINDOW`]) for consumer `name` on `filter`, from its cursor,
    /// with how many events follow each; moves the cursor past events that do not match.
    fn next_window(&self, name: &str, filter: &str) -> Vec<(u64, String, Event, u64)> {
        let mut log = self.lock();
        let first_seq = log.first_seq;
        let end = first_seq + log.entries.len() as u64;
        let cursor = log.cursors.entry(name.to_owned()).or_insert(0);
        *cursor = (*cursor).max(first_seq);
        let mut seq = *cursor;
        let mut window = Vec::new();
        while seq < end && window.len() < WINDOW {
            let (subject, event) = &log.entries[(seq - first_seq) as usize];
            if subject_matches(filter, subject) {
                window.push((seq, subject.clone(), event.clone(), end - seq - 1));
            } else if window.is_empty() {
                // Nothing to acknowledge before it: skip for good.
                *log.cursors.get_mut(name).expect("inserted above") = seq + 1;
            }
            seq += 1;
        }
        window
    }

    /// Delivers the consumer's events in order, up to [`WINDOW`] unacknowledged at once (as a
    /// JetStream consumer's max_ack_pending), so a batching consumer gets them in batches; the
    /// cursor advances over each acknowledged event in order. A negative or missing
    /// acknowledgement delivers again from that event on.
    async fn feed_consumer(
        self,
        name: String,
        filter: String,
        tx: mpsc::Sender<Result<Delivery, Error>>,
    ) {
        // Deliveries of each sequence so far, for the ones not yet acknowledged.
        let mut attempts: HashMap<u64, u64> = HashMap::new();
        loop {
            let appended = self.appended.notified();
            let window = self.next_window(&name, &filter);
            if window.is_empty() {
                tokio::select! {
                    _ = appended => continue,
                    _ = tx.closed() => return,
                }
            }
            let mut acks = Vec::with_capacity(window.len());
            for (seq, subject, event, pending) in window {
                let attempt = attempts.entry(seq).or_insert(0);
                *attempt += 1;
                let (ack_tx, ack_rx) = oneshot::channel::<bool>();
                let acker = Box::new(move |ok: bool| {
                    let _ = ack_tx.send(ok);
                    Box::pin(async { Ok(()) }) as futures::future::BoxFuture<'static, _>
                });
                let delivery = Delivery::new(subject, event, *attempt, pending, acker);
                if tx.send(Ok(delivery)).await.is_err() {
                    return;
                }
                acks.push((seq, ack_rx));
            }
            for (seq, ack) in acks {
                match tokio::time::timeout(ACK_WAIT, ack).await {
                    Ok(Ok(true)) => {
                        attempts.remove(&seq);
                        let mut log = self.lock();
                        log.cursors.insert(name.clone(), seq + 1);
                    }
                    Ok(Ok(false)) => {
                        tokio::time::sleep(NACK_DELAY).await;
                        break;
                    }
                    // Dropped without an answer, or too slow: deliver again from here.
                    Ok(Err(_)) | Err(_) => break,
                }
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
    async fn a_consumer_holds_many_unacknowledged_events_and_a_nack_redelivers_from_there() {
        let bus = InProcessBus::new();
        let subject = "kiln.identity.account.deleted";
        for i in 0..10 {
            bus.publish(subject, &event(&format!("e{i}")))
                .await
                .unwrap();
            bus.publish("kiln.other.thing.x", &event(&format!("x{i}")))
                .await
                .unwrap();
        }
        let mut stream = bus.consume("c1", "kiln.identity.>").await.unwrap();
        // All ten arrive before any is acknowledged (a batching consumer's one batch).
        let mut got = Vec::new();
        for _ in 0..10 {
            got.push(stream.next().await.unwrap().unwrap());
        }
        let ids: Vec<&str> = got.iter().map(|d| d.event.id.as_str()).collect();
        assert_eq!(ids, (0..10).map(|i| format!("e{i}")).collect::<Vec<_>>());
        // Acknowledged up to e6, e7 refused: e7 and what follows it come again.
        let mut got = got.into_iter();
        for delivery in got.by_ref().take(7) {
            delivery.ack().await.unwrap();
        }
        got.next().unwrap().nack().await.unwrap();
        let again = stream.next().await.unwrap().unwrap();
        assert_eq!((again.event.id.as_str(), again.attempt), ("e7", 2));
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
