//! The one bus abstraction: publish, fan-out subscriptions and durable consumers.

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::{Error, Event};

/// One event handed to a durable consumer; it is delivered again until acknowledged.
pub struct Delivery {
    pub subject: String,
    pub event: Event,
    /// How many times this event has been delivered to this consumer (1 the first time).
    pub attempt: u64,
    /// How many events the consumer has yet to receive after this one (its lag). On the
    /// in-process bus: the events after it in the log, whatever their subject.
    pub pending: u64,
    acker: Box<dyn FnOnce(bool) -> BoxFuture<'static, Result<(), Error>> + Send>,
}

impl Delivery {
    pub fn new(
        subject: String,
        event: Event,
        attempt: u64,
        pending: u64,
        acker: Box<dyn FnOnce(bool) -> BoxFuture<'static, Result<(), Error>> + Send>,
    ) -> Self {
        Self {
            subject,
            event,
            attempt,
            pending,
            acker,
        }
    }

    /// Done with it: it will not be delivered again.
    pub async fn ack(self) -> Result<(), Error> {
        (self.acker)(true).await
    }

    /// Failed: deliver it again later.
    pub async fn nack(self) -> Result<(), Error> {
        (self.acker)(false).await
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("event_id", &self.event.id)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// Where events go. Subjects given here are logical (`kiln.identity.>`); an implementation
/// may place them under a prefix of its own.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes `event` on `subject`; its id is the deduplication id, so publishing the same
    /// event twice stores it once.
    async fn publish(&self, subject: &str, event: &Event) -> Result<(), Error>;

    /// Publishes `events` in order; returns how many of them, from the first, are stored, and
    /// the error that stopped the rest. A backend may pipeline them: an event after a failure
    /// may be stored too without being counted, and is deduplicated when published again.
    async fn publish_all(&self, events: &[(&str, &Event)]) -> (usize, Result<(), Error>) {
        for (i, (subject, event)) in events.iter().enumerate() {
            if let Err(err) = self.publish(subject, event).await {
                return (i, Err(err));
            }
        }
        (events.len(), Ok(()))
    }

    /// Events on `filter` (NATS wildcards) published from now on, to this subscriber alone.
    /// Not durable: for caches and watchers that every instance must see.
    async fn subscribe(&self, filter: &str) -> Result<BoxStream<'static, Event>, Error>;

    /// The durable consumer `name` on `filter`: every event from the start of the stream
    /// not yet acknowledged by this consumer, redelivered until acked; instances of one
    /// service share it.
    async fn consume(
        &self,
        name: &str,
        filter: &str,
    ) -> Result<BoxStream<'static, Result<Delivery, Error>>, Error>;
}

/// NATS subject matching: `*` matches one token, `>` the rest (one or more tokens).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn wildcards_follow_nats() {
        assert!(subject_matches(
            "kiln.identity.>",
            "kiln.identity.account.created"
        ));
        assert!(!subject_matches("kiln.identity.>", "kiln.identity"));
        assert!(subject_matches(
            "kiln.*.account.created",
            "kiln.identity.account.created"
        ));
        assert!(!subject_matches(
            "kiln.*.created",
            "kiln.identity.account.created"
        ));
        assert!(subject_matches("kiln.a", "kiln.a"));
        assert!(!subject_matches("kiln.a", "kiln.b"));
    }
}
