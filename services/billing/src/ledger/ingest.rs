//! Event ingest, exactly once. A batch is booked in one transaction: a usage entry is keyed
//! by its event's id, and the other events the ledger reads (replicas, models, deployments)
//! change state, so their ids are claimed in `kiln_processed_events` in the same transaction
//! first. A redelivered, duplicated or replayed event books nothing.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use kiln_core::metrics;
use kiln_events::records::HasRecords as _;

use kiln_core::time::now_micros;
use kiln_events::consumer::consume_span;
use kiln_events::{Body, Event};
use kiln_proto::events::v1 as ev;
use sea_orm::DatabaseTransaction;
use tracing::Instrument;

use super::deployments::{deployment_deleted, save_deployment};
use super::entry::{Entry, event_micros, micros};
use super::models::save_model;
use super::replicas::{self, billed_by_time};
use crate::db::{begin_write, insert_returning};
use crate::service::Billing;
use kiln_core::Result;

/// Processed event ids are recorded under this key whichever durable consumer delivered
/// them, so replaying the stream through a new consumer books nothing twice.
const DEDUP_KEY: &str = "billing-ledger";

/// How the ledger makes an event it reads count once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Once {
    /// Usage: one ledger entry under the event's own id, which the ledger's key keeps once.
    ByEntryId,
    /// State changes (replicas, models, deployments): the event's id is claimed first.
    ByClaim,
}

/// How `event` is made to count once; `None` for events the ledger does not read.
fn once(event: &Event) -> Option<Once> {
    match event.body.as_ref()? {
        Body::UsageRecorded(_) | Body::TrainingUsageRecorded(_) => Some(Once::ByEntryId),
        Body::ReplicaStarted(_)
        | Body::ReplicaStopped(_)
        | Body::ModelCreated(_)
        | Body::ModelUpdated(_)
        | Body::ModelStateChanged(_)
        | Body::DeploymentCreated(_)
        | Body::DeploymentUpdated(_)
        | Body::DeploymentStateChanged(_)
        | Body::DeploymentUndeleted(_)
        | Body::DeploymentDeleted(_) => Some(Once::ByClaim),
        _ => None,
    }
}

/// The events of a batch to apply, in order: the first of each usage event id, and each
/// claimed event whose claim was `fresh` (once, however often it comes in the batch).
fn to_apply<'a>(read: &[(&'a Event, Once)], mut fresh: HashSet<String>) -> Vec<(&'a Event, Once)> {
    let mut seen = HashSet::new();
    read.iter()
        .copied()
        .filter(|(event, once)| match once {
            Once::ByEntryId => seen.insert(event.id.as_str()),
            Once::ByClaim => fresh.remove(&event.id),
        })
        .collect()
}

static BOOKED: LazyLock<metrics::Counter> = LazyLock::new(|| {
    metrics::register(
        "kiln_billing_events_booked",
        "Events the ledger applied (usage booked, state changes recorded)",
        false,
        metrics::Counter::default(),
    )
});

static DUPLICATES: LazyLock<metrics::Counter> = LazyLock::new(|| {
    metrics::register(
        "kiln_billing_events_duplicate",
        "Events the ledger had already applied (redelivered, duplicated or replayed): dropped",
        false,
        metrics::Counter::default(),
    )
});

impl Billing {
    /// Books a batch of events in one transaction: what this ledger has not seen yet, once.
    /// Returns how many events it applied.
    pub async fn ingest(&self, events: &[Event]) -> Result<usize> {
        let read: Vec<(&Event, Once)> = events
            .iter()
            .filter_map(|e| once(e).map(|o| (e, o)))
            .collect();
        if read.is_empty() {
            return Ok(0);
        }
        let txn = begin_write(self.db()).await?;
        let claimed: Vec<&Event> = read
            .iter()
            .filter(|(_, once)| *once == Once::ByClaim)
            .map(|(e, _)| *e)
            .collect();
        let fresh = claim(&txn, &claimed).await?;
        let applying = to_apply(&read, fresh);
        let mut entries = Vec::new();
        let mut parameters = HashMap::new();
        for (event, once) in &applying {
            let span = consume_span(&self.config().ledger_consumer, event);
            async {
                match once {
                    Once::ByEntryId => {
                        entries.extend(self.priced_entry(&txn, event, &mut parameters).await?);
                    }
                    Once::ByClaim => {
                        self.apply(&txn, event, &mut entries, &mut parameters)
                            .await?;
                    }
                }
                Ok::<_, kiln_core::Error>(())
            }
            .instrument(span)
            .await?;
        }
        let inserted = self.book(&txn, &entries).await?;
        let applied = applying
            .iter()
            .filter(|(event, once)| *once == Once::ByClaim || inserted.contains(&event.id))
            .count();
        self.outbox().commit(txn).await?;
        BOOKED.inc_by(applied as u64);
        DUPLICATES.inc_by((read.len() - applied) as u64);
        Ok(applied)
    }

    /// Applies a state change: replicas start and stop (a stop books the rest of the
    /// replica's time into `entries`), models and deployments are copied.
    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        event: &Event,
        entries: &mut Vec<Entry>,
        parameters: &mut HashMap<String, i64>,
    ) -> Result<()> {
        match &event.body {
            Some(Body::ReplicaStarted(r)) if billed_by_time(r.deployment_type) => {
                let start = micros(&r.start_time, event_micros(event));
                replicas::open(txn, r, start).await?;
            }
            Some(Body::ReplicaStopped(r)) if billed_by_time(r.deployment_type) => {
                let stop = micros(&r.stop_time, event_micros(event));
                entries.extend(replicas::close(txn, self.prices(), r, stop).await?);
            }
            Some(
                Body::ModelCreated(ev::ModelCreated { model: Some(m) })
                | Body::ModelUpdated(ev::ModelUpdated { model: Some(m), .. })
                | Body::ModelStateChanged(ev::ModelStateChanged { model: Some(m), .. }),
            ) => save_model(txn, m, parameters).await?,
            Some(
                Body::DeploymentCreated(ev::DeploymentCreated {
                    deployment: Some(d),
                })
                | Body::DeploymentUpdated(ev::DeploymentUpdated {
                    deployment: Some(d),
                    ..
                })
                | Body::DeploymentStateChanged(ev::DeploymentStateChanged {
                    deployment: Some(d),
                    ..
                })
                | Body::DeploymentUndeleted(ev::DeploymentUndeleted {
                    deployment: Some(d),
                }),
            ) => save_deployment(txn, d).await?,
            Some(Body::DeploymentDeleted(d)) => deployment_deleted(txn, &d.name).await?,
            _ => {}
        }
        Ok(())
    }
}

/// Records the ids of `events` as processed; returns those not processed before.
async fn claim(txn: &DatabaseTransaction, events: &[&Event]) -> Result<HashSet<String>> {
    let now = now_micros();
    Ok(insert_returning(
        txn,
        "INSERT INTO kiln_processed_events (consumer, event_id, processed_at) VALUES {rows} \
         ON CONFLICT DO NOTHING RETURNING event_id",
        events,
        500,
        |e| [DEDUP_KEY.into(), e.id.clone().into(), now.into()],
        "event_id",
    )
    .await?)
}

#[cfg(test)]
mod tests {
    use kiln_events::new_event;

    use super::*;

    fn event(id: &str, body: Body) -> Event {
        let mut event = new_event("test", "test", "accounts/acme", "x", body);
        event.id = id.into();
        event
    }

    fn usage(id: &str) -> Event {
        event(id, Body::UsageRecorded(ev::UsageRecorded::default()))
    }

    fn started(id: &str) -> Event {
        event(id, Body::ReplicaStarted(ev::ReplicaStarted::default()))
    }

    #[test]
    fn usage_is_kept_once_by_its_entry_and_state_changes_by_a_claim() {
        assert_eq!(once(&usage("u")), Some(Once::ByEntryId));
        let training = event(
            "t",
            Body::TrainingUsageRecorded(ev::TrainingUsageRecorded::default()),
        );
        assert_eq!(once(&training), Some(Once::ByEntryId));
        assert_eq!(once(&started("r")), Some(Once::ByClaim));
        let deleted = event(
            "d",
            Body::DeploymentDeleted(ev::DeploymentDeleted::default()),
        );
        assert_eq!(once(&deleted), Some(Once::ByClaim));
        let model = event("m", Body::ModelCreated(ev::ModelCreated::default()));
        assert_eq!(once(&model), Some(Once::ByClaim));
        // What billing itself says, and events without a body, are not read.
        let suspended = event("s", Body::AccountSuspended(ev::AccountSuspended::default()));
        assert_eq!(once(&suspended), None);
        let mut empty = usage("e");
        empty.body = None;
        assert_eq!(once(&empty), None);
    }

    #[test]
    fn a_batch_applies_each_event_once_in_order() {
        let (a, b, r1, r2) = (usage("a"), usage("b"), started("r1"), started("r2"));
        let read = [
            (&a, Once::ByEntryId),
            (&r1, Once::ByClaim),
            (&a, Once::ByEntryId),
            (&b, Once::ByEntryId),
            (&r1, Once::ByClaim),
            (&r2, Once::ByClaim),
        ];
        // r2 was processed before: its claim is not fresh.
        let fresh = HashSet::from(["r1".to_owned()]);
        let ids: Vec<&str> = to_apply(&read, fresh)
            .iter()
            .map(|(e, _)| e.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "r1", "b"]);
        assert!(to_apply(&read[4..], HashSet::new()).is_empty());
    }
}
