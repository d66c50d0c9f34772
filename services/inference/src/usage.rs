//! Usage: every answered request's `kiln.inference.usage.recorded` event, durable in this
//! node's database before the answer goes out, so a crash or a bus outage loses none.
//! Where a request's counts are known before its forward pass (embeddings, tensor models),
//! its usage is reserved as pending while the model runs and moved to the outbox after the
//! answer, which keeps the write off the answer's path; generation, whose counts come at
//! the end, records into the outbox directly. Writes from concurrent requests share one
//! statement (group commit), so recording costs one commit per burst, not per request.

use kiln_core::Error;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::auth::Principal;
use kiln_events::Body;
use kiln_events::outbox::Outbox;
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::events::v1::Event;
use kiln_proto::events::v1::{TrainingUsageRecorded, UsageRecorded};
use kiln_proto::scheduler::v1::deployment::DeploymentType;
use kiln_store::{statement, value_rows};
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement, TransactionTrait};
use tokio::sync::{mpsc, oneshot, watch};

use kiln_core::Result;

/// What one request used.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub request_id: String,
    pub model: String,
    /// "completions", "chat.completions", "embeddings", "model_infer".
    pub api: &'static str,
    pub prompt_tokens: i64,
    /// Of `prompt_tokens`, those whose keys and values came from the prefix cache.
    pub cached_prompt_tokens: i64,
    pub completion_tokens: i64,
    pub embedding_input_tokens: i64,
    /// When the request arrived (Unix microseconds).
    pub start_micros: i64,
    /// The deployed model and replica that served it (none on a node without a scheduler).
    pub route: Option<crate::router::RouteRef>,
}

/// A request for the writer task.
enum Op {
    /// Write the event to the outbox; answer once it is durable.
    Record(Event, Ack),
    /// Write the event down as pending (before the answer is computed); answer once durable.
    Reserve(Event, Ack),
    /// The pending event's request was answered: move its final form to the outbox.
    Confirm(Event),
    /// The pending event's request failed: forget it.
    Cancel(String),
}

type Ack = oneshot::Sender<Result<(), String>>;

/// The pending usage of requests being answered, one row per request, written before the
/// answer is computed so that the write overlaps the model's forward pass. A row moves to
/// the outbox when its answer goes out and is dropped when its request fails; rows a crash
/// left behind are billed at the next start (their answers may have gone out).
pub const MIGRATION: kiln_store::Migration = kiln_store::Migration {
    version: 1,
    name: "pending usage of requests being answered",
    sql: "CREATE TABLE IF NOT EXISTS inference_usage_pending (
            event_id TEXT PRIMARY KEY,
            node TEXT NOT NULL,
            payload {blob} NOT NULL,
            created_at BIGINT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS inference_usage_pending_node ON inference_usage_pending (node)",
};

/// Records usage events through the outbox.
#[derive(Clone)]
pub struct UsageRecorder {
    queue: mpsc::UnboundedSender<Op>,
    /// Builds the events (the writer task holds its own handle to write them).
    outbox: Outbox,
    node: Arc<str>,
    accelerator: AcceleratorType,
    /// Counts each serverless answer's tokens against its account's per-minute limit.
    limiter: Option<Arc<crate::limits::RateLimiter>>,
}

/// The pending usage of one request (see [`UsageRecorder::reserve`]). Dropping it without
/// [`Reservation::confirm`] cancels it: the request is not billed.
pub struct Reservation {
    queue: mpsc::UnboundedSender<Op>,
    event: Option<Event>,
    written: Option<oneshot::Receiver<Result<(), String>>>,
}

impl Reservation {
    /// Waits until the pending usage is durable (so a crash cannot lose the bill of an
    /// answer that went out), then hands its final form (with its end time) to the outbox
    /// without waiting for that write.
    pub async fn confirm(mut self) -> Result<()> {
        if let Some(written) = self.written.take() {
            durable(written).await?;
        }
        let Some(mut event) = self.event.take() else {
            return Ok(());
        };
        if let Some(Body::UsageRecorded(usage)) = &mut event.body {
            usage.end_time = Some(kiln_core::time::micros_to_timestamp(
                kiln_core::time::now_micros(),
            ));
        }
        self.queue.send(Op::Confirm(event)).map_err(|_| stopped())
    }
}

fn stopped() -> Error {
    Error::Unavailable("usage recording stopped".into())
}

/// Waits for the writer's word that a write is durable.
async fn durable(written: oneshot::Receiver<Result<(), String>>) -> Result<()> {
    written
        .await
        .map_err(|_| stopped())?
        .map_err(|e| Error::Unavailable(format!("recording usage: {e}")))
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            // A closed queue means the writer stopped; the row is billed at the next start.
            let _ = self.queue.send(Op::Cancel(event.id));
        }
    }
}

impl UsageRecorder {
    /// Starts the writer task on `db` (whose outbox relay publishes the events). It first
    /// moves what an earlier run of `node` left pending to the outbox. Once `stopped` (the
    /// process's calls have ended) it writes what they queued and ends, so the relay's last
    /// pass publishes it: a clean stop leaves no usage behind (what comes later finds the
    /// queue closed and stays pending, billed at the next start). The task, to wait for.
    pub fn start(
        db: DatabaseConnection,
        outbox: Outbox,
        node: &str,
        accelerator: AcceleratorType,
        limiter: Option<Arc<crate::limits::RateLimiter>>,
        stopped: Option<watch::Receiver<bool>>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, mut ops) = mpsc::unbounded_channel::<Op>();
        let node_name: Arc<str> = node.into();
        let writer = Writer {
            db,
            outbox: outbox.clone(),
            node: node_name.clone(),
        };
        let task = tokio::spawn(async move {
            match writer.recover().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    events = n,
                    "billed the usage of requests a stop interrupted mid-answer"
                ),
                Err(e) => tracing::error!("cannot recover pending usage: {e}"),
            }
            let mut batch = Vec::new();
            // Settlements the database refused (it was unreachable): tried again each second,
            // so an answered request's usage is billed once the database is back, not only
            // at the node's next start.
            let mut carry: Vec<Op> = Vec::new();
            let stop = async move {
                match stopped {
                    Some(mut stopped) => drop(stopped.wait_for(|s| *s).await),
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(stop);
            loop {
                let received = tokio::select! {
                    received = ops.recv_many(&mut batch, 512) => Some(received),
                    () = tokio::time::sleep(RETRY_SETTLEMENTS), if !carry.is_empty() => None,
                    () = &mut stop => {
                        ops.close();
                        while ops.recv_many(&mut batch, 512).await > 0 {}
                        batch.append(&mut carry);
                        // What still fails stays pending, billed at the next start.
                        writer.write(std::mem::take(&mut batch)).await;
                        return;
                    }
                };
                if received == Some(0) {
                    return;
                }
                // Answers of one forward pass finish together, but the first one's record
                // wakes this task at once (ahead of the others' handlers): let them queue
                // theirs first so the pass costs one commit, not one each.
                tokio::task::yield_now().await;
                while batch.len() < 512
                    && let Ok(more) = ops.try_recv()
                {
                    batch.push(more);
                }
                batch.append(&mut carry);
                carry = writer.write(std::mem::take(&mut batch)).await;
            }
        });
        let recorder = Self {
            queue,
            outbox,
            node: node_name,
            accelerator,
            limiter,
        };
        (recorder, task)
    }

    /// Writes `usage` down as pending at once, while the request's answer is computed;
    /// [`Reservation::confirm`] when it is answered.
    pub fn reserve(&self, caller: &Principal, usage: Usage) -> Reservation {
        let event = self.event(caller, usage);
        let (done, written) = oneshot::channel();
        // On a closed queue `done` is dropped, and `confirm` reports that the writer stopped.
        let _ = self.queue.send(Op::Reserve(event.clone(), done));
        Reservation {
            queue: self.queue.clone(),
            event: Some(event),
            written: Some(written),
        }
    }

    /// Records `usage` for `caller`; returns once it is durably in the outbox.
    pub async fn record(&self, caller: &Principal, usage: Usage) -> Result<()> {
        let event = self.event(caller, usage);
        let (done, written) = oneshot::channel();
        self.queue
            .send(Op::Record(event, done))
            .map_err(|_| stopped())?;
        durable(written).await
    }

    /// Records the tokens a fine-tuning job of `account` trained on since its previous
    /// record; returns once it is durably in the outbox.
    pub async fn record_training(
        &self,
        account: &str,
        mut usage: TrainingUsageRecorded,
    ) -> Result<()> {
        usage.account = format!("accounts/{account}");
        usage.node = format!("nodes/{}", self.node);
        usage.accelerator_type = self.accelerator as i32;
        let job = usage.job.clone();
        let event = self.outbox.event(
            "inference.training_usage.recorded",
            account,
            &job,
            Body::TrainingUsageRecorded(usage),
        );
        let (done, written) = oneshot::channel();
        self.queue
            .send(Op::Record(event, done))
            .map_err(|_| stopped())?;
        durable(written).await
    }

    /// The usage event of `usage`, ending now; counts the tokens against the rate limit.
    fn event(&self, caller: &Principal, usage: Usage) -> Event {
        let route = usage.route.unwrap_or_default();
        if let Some(limiter) = &self.limiter
            && route.deployment_type != DeploymentType::Dedicated as i32
        {
            limiter.charge_tokens(
                &caller.account,
                usage.prompt_tokens.max(usage.embedding_input_tokens) + usage.completion_tokens,
            );
        }
        let body = UsageRecorded {
            request_id: usage.request_id,
            deployed_model: route.deployed_model,
            deployment: route.deployment,
            replica: route.replica,
            account: format!("accounts/{}", caller.account),
            api_key: caller.api_key.clone(),
            model: usage.model.clone(),
            deployment_type: if route.deployment_type == 0 {
                DeploymentType::Serverless as i32
            } else {
                route.deployment_type
            },
            api: usage.api.to_owned(),
            prompt_tokens: usage.prompt_tokens,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            completion_tokens: usage.completion_tokens,
            embedding_input_tokens: usage.embedding_input_tokens,
            accelerator_type: self.accelerator as i32,
            node: format!("nodes/{}", self.node),
            start_time: Some(kiln_core::time::micros_to_timestamp(usage.start_micros)),
            end_time: Some(kiln_core::time::micros_to_timestamp(
                kiln_core::time::now_micros(),
            )),
            ..Default::default()
        };
        self.outbox.event(
            "inference.usage.recorded",
            &caller.account,
            &usage.model,
            Body::UsageRecorded(body),
        )
    }
}

/// How long refused settlements wait before they are tried again.
const RETRY_SETTLEMENTS: Duration = Duration::from_secs(1);

/// The writer task's database work.
struct Writer {
    db: DatabaseConnection,
    outbox: Outbox,
    node: Arc<str>,
}

impl Writer {
    /// One batch of operations: pending rows first (a cancel in the same batch may name
    /// them), then the outbox rows and the removal of settled pending rows in one commit.
    /// Returns the settlements to try again (the commit failed).
    async fn write(&self, batch: Vec<Op>) -> Vec<Op> {
        let mut reserved = Vec::new();
        let mut reserve_acks = Vec::new();
        let mut outgoing = Vec::new();
        let mut record_acks = Vec::new();
        let mut settled = Vec::new();
        let mut settlements = Vec::new();
        for op in batch {
            match op {
                Op::Record(event, ack) => {
                    outgoing.push(event);
                    record_acks.push(ack);
                }
                Op::Reserve(event, ack) => {
                    reserved.push(event);
                    reserve_acks.push(ack);
                }
                Op::Confirm(event) => {
                    settled.push(event.id.clone());
                    outgoing.push(event.clone());
                    settlements.push(Op::Confirm(event));
                }
                Op::Cancel(id) => {
                    settled.push(id.clone());
                    settlements.push(Op::Cancel(id));
                }
            }
        }
        if !reserved.is_empty() {
            let written = self
                .insert_pending(&reserved)
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &written {
                tracing::error!("cannot write pending usage: {e}");
            }
            for ack in reserve_acks {
                let _ = ack.send(written.clone());
            }
        }
        if outgoing.is_empty() && settled.is_empty() {
            return Vec::new();
        }
        let written = if settled.is_empty() {
            // One statement, committing on its own.
            self.outbox
                .publish_all(&self.db, &outgoing)
                .await
                .map_err(|e| e.to_string())
        } else {
            self.settle(&outgoing, &settled)
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(e) = &written {
            tracing::error!("cannot write usage to the outbox (tried again in a moment): {e}");
        }
        let failed = written.is_err();
        for ack in record_acks {
            let _ = ack.send(written.clone());
        }
        if failed { settlements } else { Vec::new() }
    }

    async fn insert_pending(&self, events: &[Event]) -> std::result::Result<(), sea_orm::DbErr> {
        let now = kiln_core::time::now_micros();
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(events.len() * 4);
        for event in events {
            values.extend([
                event.id.clone().into(),
                self.node.to_string().into(),
                event.encode_to_vec().into(),
                now.into(),
            ]);
        }
        let sql = format!(
            "INSERT INTO inference_usage_pending (event_id, node, payload, created_at) VALUES {}",
            value_rows(events.len(), 4)
        );
        self.db
            .execute(statement(self.db.get_database_backend(), &sql, values))
            .await?;
        Ok(())
    }

    /// Writes `outgoing` to the outbox and removes the `settled` pending rows, in one commit.
    async fn settle(
        &self,
        outgoing: &[Event],
        settled: &[String],
    ) -> std::result::Result<(), kiln_events::Error> {
        let txn = self.db.begin().await?;
        self.outbox.enqueue_all(&txn, outgoing).await?;
        let sql = format!(
            "DELETE FROM inference_usage_pending WHERE event_id IN {}",
            value_rows(1, settled.len())
        );
        let ids = settled.iter().map(|id| id.clone().into());
        txn.execute(statement(self.db.get_database_backend(), &sql, ids))
            .await?;
        self.outbox.commit(txn).await
    }

    /// Moves this node's pending rows (requests a stop interrupted, answered or not) to the
    /// outbox: billing a request whose answer may not have gone out rather than losing one
    /// whose answer did. Returns how many.
    async fn recover(&self) -> std::result::Result<usize, kiln_events::Error> {
        let backend = self.db.get_database_backend();
        let txn = self.db.begin().await?;
        let rows = txn
            .query_all(self.of_this_node(
                backend,
                "SELECT payload FROM inference_usage_pending WHERE node =",
            ))
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload: Vec<u8> = row.try_get("", "payload")?;
            events.push(Event::decode(payload.as_slice()).map_err(|source| {
                kiln_events::Error::Decode {
                    subject: "inference_usage_pending".into(),
                    source,
                }
            })?);
        }
        self.outbox.enqueue_all(&txn, &events).await?;
        txn.execute(self.of_this_node(backend, "DELETE FROM inference_usage_pending WHERE node ="))
            .await?;
        self.outbox.commit(txn).await?;
        Ok(events.len())
    }

    /// `sql`, which ends in `node =`, completed with this node's ID.
    fn of_this_node(&self, backend: DatabaseBackend, sql: &str) -> Statement {
        statement(backend, &format!("{sql} ?"), [self.node.to_string().into()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn node_db(dir: &std::path::Path) -> DatabaseConnection {
        let url = format!("sqlite://{}?mode=rwc", dir.join("node.db").display());
        let db = kiln_store::connect(&url).await.unwrap();
        kiln_store::migrate(&db, crate::SERVICE, crate::MIGRATIONS)
            .await
            .unwrap();
        db
    }

    fn recorder(db: &DatabaseConnection, node: &str) -> UsageRecorder {
        UsageRecorder::start(
            db.clone(),
            Outbox::new(crate::SERVICE),
            node,
            AcceleratorType::Cpu,
            None,
            None,
        )
        .0
    }

    fn acme() -> Principal {
        Principal {
            account: "acme".into(),
            ..Principal::service()
        }
    }

    fn usage(request_id: &str, tokens: i64) -> Usage {
        Usage {
            request_id: request_id.into(),
            model: "accounts/kiln/models/m".into(),
            api: "embeddings",
            prompt_tokens: tokens,
            embedding_input_tokens: tokens,
            start_micros: kiln_core::time::now_micros(),
            ..Default::default()
        }
    }

    /// The usage events in the outbox, by request id.
    async fn billed(db: &DatabaseConnection) -> Vec<UsageRecorded> {
        db.query_all(Statement::from_string(
            db.get_database_backend(),
            "SELECT payload FROM kiln_outbox ORDER BY seq",
        ))
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let payload: Vec<u8> = row.try_get("", "payload").unwrap();
            match Event::decode(payload.as_slice()).unwrap().body {
                Some(Body::UsageRecorded(u)) => u,
                other => panic!("not a usage event: {other:?}"),
            }
        })
        .collect()
    }

    async fn pending(db: &DatabaseConnection, node: &str) -> usize {
        db.query_all(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT event_id FROM inference_usage_pending WHERE node = '{node}'"),
        ))
        .await
        .unwrap()
        .len()
    }

    #[tokio::test]
    async fn a_confirmed_reservation_is_billed_once_a_dropped_one_never() {
        let dir = tempfile::tempdir().unwrap();
        let db = node_db(dir.path()).await;
        let usage_of = recorder(&db, "n1");

        let answered = usage_of.reserve(&acme(), usage("embd-answered", 7));
        let failed = usage_of.reserve(&acme(), usage("embd-failed", 9));
        answered.confirm().await.unwrap();
        drop(failed);
        // The writer works in order: once a later record is durable, so are those two.
        usage_of
            .record(&acme(), usage("embd-barrier", 1))
            .await
            .unwrap();

        let billed = billed(&db).await;
        let ids: Vec<&str> = billed.iter().map(|u| u.request_id.as_str()).collect();
        assert_eq!(ids, ["embd-answered", "embd-barrier"]);
        let answered = &billed[0];
        assert_eq!(answered.account, "accounts/acme");
        assert_eq!(answered.embedding_input_tokens, 7);
        assert_eq!(answered.node, "nodes/n1");
        let time = |t: Option<prost_types::Timestamp>| {
            let t = t.unwrap();
            t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000
        };
        assert!(time(answered.end_time) >= time(answered.start_time));
        assert_eq!(pending(&db, "n1").await, 0, "nothing left pending");
    }

    #[tokio::test]
    async fn usage_a_stop_left_pending_is_billed_at_the_next_start_by_its_own_node() {
        let dir = tempfile::tempdir().unwrap();
        let db = node_db(dir.path()).await;
        // Two nodes stopped mid-answer, their requests' usage durable but not yet settled.
        for node in ["n1", "n2"] {
            let stopped = UsageRecorder {
                queue: mpsc::unbounded_channel().0,
                outbox: Outbox::new(crate::SERVICE),
                node: node.into(),
                accelerator: AcceleratorType::Cpu,
                limiter: None,
            };
            let event = stopped.event(&acme(), usage(&format!("embd-{node}"), 5));
            let writer = Writer {
                db: db.clone(),
                outbox: Outbox::new(crate::SERVICE),
                node: node.into(),
            };
            writer.insert_pending(&[event]).await.unwrap();
        }
        assert!(billed(&db).await.is_empty());

        let restarted = recorder(&db, "n1");
        restarted
            .record(&acme(), usage("embd-barrier", 1))
            .await
            .unwrap();
        let ids: Vec<String> = billed(&db)
            .await
            .into_iter()
            .map(|u| u.request_id)
            .collect();
        assert_eq!(
            ids,
            ["embd-n1", "embd-barrier"],
            "n1's pending usage billed first"
        );
        assert_eq!(pending(&db, "n1").await, 0);
        assert_eq!(
            pending(&db, "n2").await,
            1,
            "another node's requests are its own"
        );
    }
}
