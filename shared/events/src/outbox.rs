//! The transactional outbox: a service writes its state change and its event in one
//! transaction; the relay publishes what was committed and deletes it once the bus has it.
//! An event is never lost when the bus is down, and never published for a rolled-back change.

use kiln_core::metrics;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::backoff::Backoff;
use kiln_core::in_flight::InFlight;
use kiln_store::{Migration, statement, value_rows};
use prost::Message;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, TransactionTrait,
};
use tokio::sync::{Notify, watch};

use crate::bus::EventBus;
use crate::{Error, Event, subject_of};

/// The tables every service with events needs; include it in the service's migrations.
pub const MIGRATION: Migration = Migration {
    version: 1_000,
    name: "event outbox and processed event ids",
    sql: "CREATE TABLE IF NOT EXISTS kiln_outbox (
            seq {serial},
            service TEXT NOT NULL,
            event_id TEXT NOT NULL,
            subject TEXT NOT NULL,
            payload {blob} NOT NULL,
            created_at BIGINT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS kiln_outbox_service_seq ON kiln_outbox (service, seq);
        CREATE TABLE IF NOT EXISTS kiln_processed_events (
            consumer TEXT NOT NULL,
            event_id TEXT NOT NULL,
            processed_at BIGINT NOT NULL,
            PRIMARY KEY (consumer, event_id)
        )",
};

/// How many rows the relay reads at a time.
const BATCH: i64 = 256;
/// The relay looks again at least this often even without a wake-up (another instance of the
/// service may have written).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long the relay waits after a wake-up before a pass, so events committed close
/// together go out together (see [`Outbox::with_linger`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Linger {
    /// While fewer than `busy_from` requests are in flight.
    pub quiet: Duration,
    /// While `busy_from` or more requests are in flight.
    pub busy: Duration,
    /// Requests in flight from which the service counts as busy (0: never).
    pub busy_from: usize,
}

impl Linger {
    /// The same wait whatever the load.
    pub const fn fixed(wait: Duration) -> Self {
        Self {
            quiet: wait,
            busy: wait,
            busy_from: 0,
        }
    }

    /// The wait with `in_flight` requests being answered.
    pub fn with(&self, in_flight: usize) -> Duration {
        if self.busy_from > 0 && in_flight >= self.busy_from {
            self.busy
        } else {
            self.quiet
        }
    }
}

/// A service's outbox.
#[derive(Clone)]
pub struct Outbox {
    service: &'static str,
    wake: Arc<Notify>,
    linger: Linger,
    in_flight: InFlight,
}

impl Outbox {
    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            wake: Arc::new(Notify::new()),
            linger: Linger::default(),
            in_flight: InFlight::default(),
        }
    }

    /// Lets the relay wait after a wake-up before publishing, so events committed close
    /// together go out in one pass: for high-rate events (usage, one per request) where
    /// some delay costs less than a relay pass (and a burst of work downstream) per few
    /// events. The wait is `linger.busy` while `in_flight` (the requests the service is
    /// answering) counts many, else `linger.quiet`.
    pub fn with_linger(mut self, linger: Linger, in_flight: InFlight) -> Self {
        self.linger = linger;
        self.in_flight = in_flight;
        self
    }

    /// The requests in flight its relay's wait follows ([`Outbox::with_linger`]).
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// Writes `event` into the outbox inside the caller's transaction.
    pub async fn enqueue<C: ConnectionTrait>(&self, conn: &C, event: &Event) -> Result<(), Error> {
        self.insert(conn, std::slice::from_ref(event)).await
    }

    /// Writes `events` into the outbox inside the caller's transaction, in one statement.
    pub async fn enqueue_all<C: ConnectionTrait>(
        &self,
        conn: &C,
        events: &[Event],
    ) -> Result<(), Error> {
        self.insert(conn, events).await
    }

    /// Writes `events` in one statement, which commits on its own (atomically, all or
    /// none), and wakes the relay: for events that are not part of a state change, such as
    /// usage records.
    pub async fn publish_all(
        &self,
        db: &DatabaseConnection,
        events: &[Event],
    ) -> Result<(), Error> {
        self.insert(db, events).await?;
        self.wake.notify_one();
        Ok(())
    }

    async fn insert<C: ConnectionTrait>(&self, conn: &C, events: &[Event]) -> Result<(), Error> {
        if events.is_empty() {
            return Ok(());
        }
        let now = kiln_core::time::now_micros();
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(events.len() * 5);
        for event in events {
            values.extend([
                self.service.into(),
                event.id.clone().into(),
                subject_of(event).into(),
                event.encode_to_vec().into(),
                now.into(),
            ]);
        }
        let sql = format!(
            "INSERT INTO kiln_outbox (service, event_id, subject, payload, created_at) VALUES {}",
            value_rows(events.len(), 5)
        );
        conn.execute(statement(conn.get_database_backend(), &sql, values))
            .await?;
        Ok(())
    }

    /// Commits `txn` and wakes the relay, so committed events go out at once.
    pub async fn commit(&self, txn: DatabaseTransaction) -> Result<(), Error> {
        txn.commit().await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Writes `event` into `txn` and commits: the change and its event land together.
    pub async fn commit_with(&self, txn: DatabaseTransaction, event: &Event) -> Result<(), Error> {
        self.enqueue(&txn, event).await?;
        self.commit(txn).await
    }

    /// An event of this service (`source` `kiln-<service>`; see [`crate::new_event`]) about
    /// `resource` of `accounts/{account}`.
    pub fn event(
        &self,
        event_type: &str,
        account: &str,
        resource: &str,
        body: crate::Body,
    ) -> Event {
        let source = format!("kiln-{}", self.service);
        let account = kiln_core::names::account_name(account);
        crate::new_event(&source, event_type, &account, resource, body)
    }

    /// Builds the event of a change (see [`Outbox::event`]), writes it into `txn` and
    /// commits both together.
    pub async fn commit_event(
        &self,
        txn: DatabaseTransaction,
        event_type: &str,
        account: &str,
        resource: &str,
        body: crate::Body,
    ) -> Result<(), Error> {
        let event = self.event(event_type, account, resource, body);
        self.commit_with(txn, &event).await
    }

    /// Runs the relay until `shutdown` turns true.
    pub fn spawn_relay(
        &self,
        db: DatabaseConnection,
        bus: Arc<dyn EventBus>,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let outbox = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(50), MAX_BACKOFF);
            loop {
                match outbox.relay_once(&db, bus.as_ref()).await {
                    // A full batch: more may be waiting.
                    Ok(sent) if sent as i64 == BATCH => {
                        backoff.reset();
                        continue;
                    }
                    // Commits after the read left a wake-up permit, so none is missed.
                    Ok(_) => {
                        backoff.reset();
                        let woken = tokio::select! {
                            _ = outbox.wake.notified() => true,
                            _ = tokio::time::sleep(POLL_INTERVAL) => false,
                            _ = shutdown.changed() => false,
                        };
                        let linger = outbox.linger.with(outbox.in_flight.get());
                        if woken && !linger.is_zero() {
                            tokio::select! {
                                _ = tokio::time::sleep(linger) => {}
                                _ = shutdown.changed() => {}
                            }
                        }
                    }
                    Err(err) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(service = outbox.service, %err, retry_in = ?delay, "outbox relay could not publish; will retry");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                if *shutdown.borrow() {
                    // One last pass so what was committed before shutdown goes out if it can.
                    let _ = outbox.relay_once(&db, bus.as_ref()).await;
                    return;
                }
            }
        })
    }

    /// Publishes one batch in order and deletes what was published. Returns how many went out.
    pub async fn relay_once(
        &self,
        db: &DatabaseConnection,
        bus: &dyn EventBus,
    ) -> Result<usize, Error> {
        let backend = db.get_database_backend();
        let rows = db
            .query_all(statement(
                backend,
                &format!(
                    "SELECT seq, subject, payload FROM kiln_outbox WHERE service = ? ORDER BY seq LIMIT {BATCH}"
                ),
                [self.service.into()],
            ))
            .await?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get("", "seq")?;
            let subject: String = row.try_get("", "subject")?;
            let payload: Vec<u8> = row.try_get("", "payload")?;
            let event = Event::decode(payload.as_slice()).map_err(|source| Error::Decode {
                subject: subject.clone(),
                source,
            })?;
            batch.push((seq, subject, event));
        }
        let events: Vec<(&str, &Event)> = batch.iter().map(|(_, s, e)| (s.as_str(), e)).collect();
        let started = std::time::Instant::now();
        let (sent, published) = bus.publish_all(&events).await;
        let failure = published.err();
        let labels = [("service", self.service.to_owned())];
        if sent > 0 {
            // The batch's publishes overlap: each is counted at the batch's mean latency.
            let each = started.elapsed().as_secs_f64() / sent as f64;
            let histogram = OUTBOX.publish_duration.get_or_create(&labels);
            for _ in 0..sent {
                histogram.observe(each);
            }
            OUTBOX.published.get_or_create(&labels).inc_by(sent as u64);
        }
        let last_seq = sent.checked_sub(1).map(|last| batch[last].0);
        if let Some(last) = last_seq {
            delete_through(db, backend, self.service, last).await?;
        }
        // What is left: none after a short batch that all went out; else counted.
        let backlog = if failure.is_none() && rows.len() < BATCH as usize {
            0
        } else {
            self.backlog(db).await?
        };
        OUTBOX
            .backlog
            .get_or_create(&[("service", self.service.to_owned())])
            .set(backlog);
        match failure {
            Some(err) => Err(err),
            None => Ok(sent),
        }
    }
}

impl Outbox {
    /// Events committed and not yet published.
    async fn backlog(&self, db: &DatabaseConnection) -> Result<i64, Error> {
        let row = db
            .query_one(statement(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM kiln_outbox WHERE service = ?",
                [self.service.into()],
            ))
            .await?;
        Ok(row
            .map(|r| r.try_get::<i64>("", "n"))
            .transpose()?
            .unwrap_or(0))
    }
}

struct OutboxMetrics {
    published: metrics::Family<metrics::Labels<1>, metrics::Counter>,
    publish_duration: metrics::HistogramFamily<metrics::Labels<1>>,
    backlog: metrics::Family<metrics::Labels<1>, metrics::Gauge>,
}

static OUTBOX: std::sync::LazyLock<OutboxMetrics> = std::sync::LazyLock::new(|| OutboxMetrics {
    published: metrics::register(
        "kiln_events_published",
        "Events the outbox relay published to the bus, by service",
        false,
        metrics::Family::default(),
    ),
    publish_duration: metrics::register(
        "kiln_event_publish_duration",
        "Time to publish one event (the bus's acknowledgement included)",
        true,
        metrics::Family::new_with_constructor(metrics::seconds_histogram),
    ),
    backlog: metrics::register(
        "kiln_outbox_backlog",
        "Events committed to a service's outbox and not yet published",
        false,
        metrics::Family::default(),
    ),
});

async fn delete_through(
    db: &DatabaseConnection,
    backend: DbBackend,
    service: &str,
    last_seq: i64,
) -> Result<(), Error> {
    let txn = db.begin().await?;
    txn.execute(statement(
        backend,
        "DELETE FROM kiln_outbox WHERE service = ? AND seq <= ?",
        [service.into(), last_seq.into()],
    ))
    .await?;
    txn.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_with_the_requests_in_flight() {
        let linger = Linger {
            quiet: Duration::from_millis(200),
            busy: Duration::from_secs(1),
            busy_from: 4,
        };
        let in_flight = InFlight::default();
        assert_eq!(linger.with(in_flight.get()), Duration::from_millis(200));
        let mut guards: Vec<_> = (0..3).map(|_| in_flight.enter()).collect();
        assert_eq!(linger.with(in_flight.get()), Duration::from_millis(200));
        guards.push(in_flight.enter());
        assert_eq!(in_flight.get(), 4);
        assert_eq!(linger.with(in_flight.get()), Duration::from_secs(1));
        // Answered requests leave the count.
        guards.truncate(1);
        assert_eq!(in_flight.get(), 1);
        assert_eq!(linger.with(in_flight.get()), Duration::from_millis(200));
        // Without a busy threshold (the default) the wait never grows.
        let quiet_only = Linger {
            busy_from: 0,
            ..linger
        };
        assert_eq!(quiet_only.with(1_000), Duration::from_millis(200));
        assert_eq!(Linger::default().with(1_000), Duration::ZERO);
        let fixed = Linger::fixed(Duration::from_secs(3));
        assert_eq!(fixed.with(0), fixed.with(1_000));
    }
}
