//! Kiln's event bus.
//!
//! Every fact is an [`Event`] envelope on subject `kiln.<area>.<resource>.<verb>`. Services
//! write their state change and its event in one transaction ([`outbox`]); a relay publishes
//! it, so an event survives a bus outage. Consumers are durable and record processed ids
//! ([`consumer`]), so a redelivered event changes nothing.

pub mod auth_cache;
pub mod bus;
pub mod consumer;
pub mod host;
pub mod memory;
pub mod nats;
pub mod outbox;
pub mod records;

pub use bus::{Delivery, EventBus, subject_matches};
pub use kiln_proto::events::v1::{Event, event::Body};

/// An event bus failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nats: {0}")]
    Nats(String),
    #[error("event bus closed")]
    Closed,
    #[error("event payload on {subject} does not decode: {source}")]
    Decode {
        subject: String,
        source: prost::DecodeError,
    },
    #[error(transparent)]
    Store(#[from] kiln_store::Error),
    #[error("database: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("handler: {0}")]
    Handler(String),
}

impl From<Error> for kiln_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Nats(_) | Error::Closed => kiln_core::Error::Unavailable(err.to_string()),
            other => kiln_core::Error::Internal(other.to_string()),
        }
    }
}

/// A handler's failure, as the bus reports it (the event is redelivered).
impl From<kiln_core::Error> for Error {
    fn from(err: kiln_core::Error) -> Self {
        Error::Handler(err.to_string())
    }
}

/// Builds an event: a fresh UUIDv7 id, now, and the current trace context.
/// `event_type` is the subject without its leading `kiln.`, e.g. `identity.account.created`.
pub fn new_event(
    source: &str,
    event_type: &str,
    account: &str,
    resource: &str,
    body: Body,
) -> Event {
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        r#type: event_type.to_owned(),
        source: source.to_owned(),
        time: Some(kiln_core::time::micros_to_timestamp(
            kiln_core::time::now_micros(),
        )),
        account: account.to_owned(),
        resource: resource.to_owned(),
        trace_context: kiln_core::telemetry::current_traceparent(),
        body: Some(body),
    }
}

/// The subject an event is published on: `kiln.` followed by its type.
pub fn subject_of(event: &Event) -> String {
    format!("kiln.{}", event.r#type)
}

/// The bus a server configuration asks for: NATS JetStream when `nats_url` is set, the
/// in-process bus otherwise.
pub async fn connect_bus(
    config: &kiln_core::config::ServerConfig,
) -> Result<std::sync::Arc<dyn EventBus>, Error> {
    Ok(match &config.nats_url {
        Some(url) => {
            let mut nats = nats::NatsConfig::new(url.clone());
            nats.stream = config.nats_stream.clone();
            std::sync::Arc::new(nats::NatsBus::connect(nats).await?)
        }
        None => std::sync::Arc::new(memory::InProcessBus::new()),
    })
}
