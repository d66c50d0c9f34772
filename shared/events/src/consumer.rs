//! Durable, idempotent consumption: each event is handled in a transaction that also records
//! its id for this consumer, so a redelivered or replayed event changes nothing.

use kiln_core::metrics;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_store::{is_unique_violation, statement};
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, TransactionTrait};
use tokio::sync::watch;
use tracing::Instrument;

use crate::bus::{Delivery, EventBus};
use crate::{Error, Event};

/// What a consumer does with one event, inside the transaction that marks it processed.
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    async fn handle(&self, txn: &DatabaseTransaction, event: &Event) -> Result<(), Error>;
}

/// What a batching consumer does with the events delivered together; it makes them
/// idempotent itself (e.g. by claiming their ids in its transaction, as the ledger does).
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    async fn handle(&self, events: &[Event]) -> Result<(), Error>;
}

/// Outcome of handling one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Applied,
    /// Seen before by this consumer: nothing changed.
    Duplicate,
}

/// Handles `event` once for `consumer`: records the id and applies the handler atomically.
pub async fn handle_once(
    db: &DatabaseConnection,
    consumer: &str,
    event: &Event,
    handler: &dyn EventHandler,
) -> Result<Handled, Error> {
    let txn = db.begin().await?;
    let backend = txn.get_database_backend();
    let inserted = txn
        .execute(statement(
            backend,
            "INSERT INTO kiln_processed_events (consumer, event_id, processed_at) VALUES (?, ?, ?)",
            [
                consumer.into(),
                event.id.clone().into(),
                kiln_core::time::now_micros().into(),
            ],
        ))
        .await;
    match inserted {
        Ok(_) => {}
        Err(err) if is_unique_violation(&err) => {
            txn.rollback().await?;
            return Ok(Handled::Duplicate);
        }
        Err(err) => return Err(err.into()),
    }
    handler.handle(&txn, event).await?;
    txn.commit().await?;
    Ok(Handled::Applied)
}

static CONSUMER_LAG: std::sync::LazyLock<metrics::Family<metrics::Labels<1>, metrics::Gauge>> =
    std::sync::LazyLock::new(|| {
        metrics::register(
            "kiln_event_consumer_lag",
            "Events a durable consumer has yet to receive, as of its latest batch",
            false,
            metrics::Family::default(),
        )
    });

/// Opens the durable consumer `name` on `filter`, retrying every second while the bus
/// refuses; None once `shutdown` changes.
async fn open_consumer(
    bus: &dyn EventBus,
    name: &str,
    filter: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<BoxStream<'static, Result<Delivery, Error>>> {
    loop {
        match bus.consume(name, filter).await {
            Ok(stream) => return Some(stream),
            Err(err) => {
                tracing::warn!(consumer = %name, %err, "cannot open consumer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return None,
                }
            }
        }
    }
}

/// An [`EventHandler`] as a [`BatchHandler`]: each event handled once ([`handle_once`]), in
/// its own transaction, traced under the span of the call that published it.
pub struct OnceEach {
    db: DatabaseConnection,
    consumer: String,
    handler: Arc<dyn EventHandler>,
}

impl OnceEach {
    pub fn new(
        db: DatabaseConnection,
        consumer: &str,
        handler: Arc<dyn EventHandler>,
    ) -> Arc<Self> {
        Arc::new(Self {
            db,
            consumer: consumer.to_owned(),
            handler,
        })
    }
}

#[async_trait]
impl BatchHandler for OnceEach {
    async fn handle(&self, events: &[Event]) -> Result<(), Error> {
        for event in events {
            handle_once(&self.db, &self.consumer, event, self.handler.as_ref())
                .instrument(consume_span(&self.consumer, event))
                .await?;
        }
        Ok(())
    }
}

/// The span of `consumer` handling `event`, a child of the request that caused the event (its
/// `trace_context`), so a trace runs on from the publisher into each consumer.
pub fn consume_span(consumer: &str, event: &Event) -> tracing::Span {
    let span = tracing::info_span!(
        "event.consume",
        otel.name = %format_args!("{consumer} consume kiln.{}", event.r#type),
        otel.kind = "consumer",
        messaging.consumer.group.name = %consumer,
        messaging.message.id = %event.id,
    );
    kiln_core::telemetry::set_parent_from_traceparent(&span, &event.trace_context);
    span
}

/// How long a stopping consumer waits for one more event before it ends.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// Runs the durable consumer `name` on `filter` until `shutdown` turns true, reconnecting
/// after bus errors, handing the handler every event already waiting (up to `batch`) at
/// once. A failed batch is nacked whole and comes back. Told to stop, it first handles what
/// is already on its way (until the bus is quiet for a moment): on the in-process bus, the
/// events a stopping process published last would otherwise be lost.
pub fn spawn_consumer(
    bus: Arc<dyn EventBus>,
    name: String,
    filter: String,
    batch: usize,
    handler: Arc<dyn BatchHandler>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Some(stream) = open_consumer(bus.as_ref(), &name, &filter, &mut shutdown).await
            else {
                return;
            };
            // A reader keeps the bus's stream polled while a batch is being handled, so the
            // next batch holds everything that arrived meanwhile (a pull consumer fetches
            // only while polled).
            let batch = batch.max(1);
            let (ahead, mut waiting) = tokio::sync::mpsc::channel(batch * 2);
            let reader = tokio::spawn(async move {
                let mut stream = stream;
                while let Some(delivery) = stream.next().await {
                    if ahead.send(delivery).await.is_err() {
                        return;
                    }
                }
            });
            let _reader = AbortOnDrop(reader);
            let mut chunk = Vec::with_capacity(batch);
            let mut acking: Option<tokio::task::JoinHandle<()>> = None;
            let mut stopping = false;
            loop {
                // Everything waiting, up to `batch` (at least one; none: the stream ended).
                let received = if stopping {
                    let next = waiting.recv_many(&mut chunk, batch);
                    tokio::time::timeout(DRAIN_QUIET, next).await.unwrap_or(0)
                } else {
                    tokio::select! {
                        n = waiting.recv_many(&mut chunk, batch) => n,
                        _ = shutdown.wait_for(|s| *s) => {
                            stopping = true;
                            continue;
                        }
                    }
                };
                if received == 0 {
                    break;
                }
                let mut deliveries = Vec::with_capacity(chunk.len());
                for delivery in chunk.drain(..) {
                    match delivery {
                        Ok(d) => deliveries.push(d),
                        Err(err) => tracing::warn!(consumer = %name, %err, "consumer stream error"),
                    }
                }
                if deliveries.is_empty() {
                    continue;
                }
                if let Some(last) = deliveries.last() {
                    CONSUMER_LAG
                        .get_or_create(&[("consumer", name.clone())])
                        .set(last.pending as i64);
                }
                let events: Vec<Event> = deliveries.iter().map(|d| d.event.clone()).collect();
                let span = tracing::info_span!("event.consume_batch", consumer = %name, events = events.len());
                let result = handler.handle(&events).instrument(span).await;
                if let Err(err) = &result {
                    tracing::warn!(consumer = %name, %err, "batch handling failed; will be redelivered");
                }
                // This batch's acks go out while the next batch is handled (one batch of
                // acks in flight at most); an ack lost to a crash only brings back events
                // the handler already made idempotent.
                if let Some(previous) = acking.take() {
                    let _ = previous.await;
                }
                let ok = result.is_ok();
                let consumer = name.clone();
                acking = Some(tokio::spawn(async move {
                    let acks = deliveries
                        .into_iter()
                        .map(|d| async move { if ok { d.ack().await } else { d.nack().await } });
                    for acked in futures::future::join_all(acks).await {
                        if let Err(err) = acked {
                            tracing::warn!(consumer = %consumer, %err, "ack failed");
                        }
                    }
                }));
            }
            if let Some(previous) = acking.take() {
                let _ = previous.await;
            }
            if stopping {
                return;
            }
        }
    })
}

/// Aborts its task when dropped (a batch consumer's reader when the consumer ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
