//! The NATS JetStream bus: one stream holds every subject under `kiln.>`; the event id is the
//! `Nats-Msg-Id`, so JetStream drops duplicates within its window; durable pull consumers
//! with explicit acks; trace context in the `traceparent` header.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use prost::Message;

use crate::bus::{Delivery, EventBus};
use crate::{Error, Event};

/// How the bus reaches NATS.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    /// The JetStream stream (default `KILN`).
    pub stream: String,
    /// Put before every subject; empty in production. Tests use it to share one server.
    pub subject_prefix: String,
    /// How long the stream keeps events.
    pub max_age: Duration,
    /// Window in which JetStream drops a second publish of the same event id.
    pub duplicate_window: Duration,
}

impl NatsConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream: "KILN".to_owned(),
            subject_prefix: String::new(),
            max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(10 * 60),
        }
    }
}

/// A JetStream-backed bus.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
}

fn nats_err(e: impl std::fmt::Display) -> Error {
    Error::Nats(e.to_string())
}

impl NatsBus {
    /// Connects (retrying in the background if NATS is not up yet) and creates the stream if
    /// it does not exist.
    pub async fn connect(config: NatsConfig) -> Result<Self, Error> {
        let client = async_nats::ConnectOptions::new()
            .name("kiln")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(config.url.as_str())
            .await
            .map_err(nats_err)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        let bus = Self { client, js, config };
        bus.ensure_stream().await?;
        Ok(bus)
    }

    /// The subject on the wire for a logical subject.
    pub fn wire_subject(&self, subject: &str) -> String {
        format!("{}{subject}", self.config.subject_prefix)
    }

    async fn ensure_stream(&self) -> Result<stream::Stream, Error> {
        self.js
            .get_or_create_stream(stream::Config {
                name: self.config.stream.clone(),
                subjects: vec![self.wire_subject("kiln.>")],
                storage: stream::StorageType::File,
                max_age: self.config.max_age,
                duplicate_window: self.config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(nats_err)
    }

    /// Deletes the stream (tests clean up with it).
    pub async fn delete_stream(&self) -> Result<(), Error> {
        self.js
            .delete_stream(&self.config.stream)
            .await
            .map(|_| ())
            .map_err(nats_err)
    }
}

fn decode(subject: &str, payload: &[u8]) -> Result<Event, Error> {
    Event::decode(payload).map_err(|source| Error::Decode {
        subject: subject.to_owned(),
        source,
    })
}

#[async_trait]
impl EventBus for NatsBus {
    async fn publish(&self, subject: &str, event: &Event) -> Result<(), Error> {
        let (_, result) = self.publish_all(&[(subject, event)]).await;
        result
    }

    /// Sends every event, then waits for JetStream's acks in order: one round trip for the
    /// batch rather than one an event.
    async fn publish_all(&self, events: &[(&str, &Event)]) -> (usize, Result<(), Error>) {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return (0, Err(Error::Nats("not connected".into())));
        }
        let mut acks = Vec::with_capacity(events.len());
        let mut send_failure = None;
        for (subject, event) in events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.as_str());
            if !event.trace_context.is_empty() {
                headers.insert("traceparent", event.trace_context.as_str());
            }
            let sent = self
                .js
                .publish_with_headers(
                    self.wire_subject(subject),
                    headers,
                    event.encode_to_vec().into(),
                )
                .await;
            match sent {
                Ok(ack) => acks.push(ack),
                Err(err) => {
                    send_failure = Some(nats_err(err));
                    break;
                }
            }
        }
        let sent = acks.len();
        for (stored, ack) in acks.into_iter().enumerate() {
            if let Err(err) = ack.await {
                return (stored, Err(nats_err(err)));
            }
        }
        match send_failure {
            Some(err) => (sent, Err(err)),
            None => (sent, Ok(())),
        }
    }

    async fn subscribe(&self, filter: &str) -> Result<BoxStream<'static, Event>, Error> {
        let subscriber = self
            .client
            .subscribe(self.wire_subject(filter))
            .await
            .map_err(nats_err)?;
        Ok(subscriber
            .filter_map(|msg| async move {
                match decode(msg.subject.as_str(), &msg.payload) {
                    Ok(event) => Some(event),
                    Err(err) => {
                        tracing::warn!(%err, "skipping undecodable event");
                        None
                    }
                }
            })
            .boxed())
    }

    async fn consume(
        &self,
        name: &str,
        filter: &str,
    ) -> Result<BoxStream<'static, Result<Delivery, Error>>, Error> {
        let stream = self.ensure_stream().await?;
        let consumer = stream
            .get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.to_owned()),
                    filter_subject: self.wire_subject(filter),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(nats_err)?;
        // Up to 1,024 events buffered ahead: batching consumers (the billing ledger) take
        // what is waiting in one transaction; 15 s heartbeats as the client's default.
        let messages = consumer
            .stream()
            .max_messages_per_batch(1_024)
            .heartbeat(Duration::from_secs(15))
            .messages()
            .await
            .map_err(nats_err)?;
        let prefix_len = self.config.subject_prefix.len();
        Ok(messages
            .map(move |item| {
                let msg = item.map_err(nats_err)?;
                let (attempt, pending) = msg
                    .info()
                    .map(|i| (i.delivered as u64, i.pending))
                    .unwrap_or((1, 0));
                let subject = msg.subject.as_str()[prefix_len..].to_owned();
                let event = decode(&subject, &msg.payload)?;
                let acker = Box::new(move |ok: bool| {
                    Box::pin(async move {
                        let kind = if ok {
                            jetstream::AckKind::Ack
                        } else {
                            jetstream::AckKind::Nak(Some(Duration::from_millis(500)))
                        };
                        msg.ack_with(kind).await.map_err(nats_err)
                    }) as futures::future::BoxFuture<'static, _>
                });
                Ok(Delivery::new(subject, event, attempt, pending, acker))
            })
            .boxed())
    }
}
