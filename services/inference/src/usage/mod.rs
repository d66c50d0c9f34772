//! Usage: every answered request's `kiln.inference.usage.recorded` event, durable before
//! the answer goes out, so a crash or a bus outage loses none.
//! Where a request's counts are known before its forward pass (embeddings, tensor models),
//! its usage is reserved in the node's journal (a file append on the request's thread,
//! [`journal`]) and moved to the outbox after the answer; generation, whose counts come at
//! the end, records into the outbox directly. Outbox writes from concurrent requests share
//! one statement (group commit), and settlements wait a moment for others (nobody waits for
//! them), so recording costs a commit per burst or per 100 ms, not one per request.

mod journal;

pub use journal::unsettled_in;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::auth::Principal;
use kiln_core::{Error, Result};
use kiln_events::Body;
use kiln_events::outbox::{Linger, Outbox};
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::events::v1::Event;
use kiln_proto::events::v1::{TrainingUsageRecorded, UsageRecorded};
use kiln_proto::scheduler::v1::deployment::DeploymentType;
use kiln_store::statement;
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement, TransactionTrait};
use tokio::sync::{mpsc, oneshot, watch};

use journal::Journal;

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
    /// The reserved event's request was answered: move its final form to the outbox.
    Confirm(Event),
    /// The reserved event's request failed: forget it.
    Cancel(String),
}

type Ack = oneshot::Sender<Result<(), String>>;

/// Pending usage as versions before the journal kept it, one row per request; what an
/// older version left there is billed at start.
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

/// Where and for whom usage is recorded.
pub struct Recording<'a> {
    /// The node's name (its ID without `nodes/`).
    pub node: &'a str,
    pub accelerator: AcceleratorType,
    /// Counts each serverless answer's tokens against its account's per-minute limit.
    pub limiter: Option<Arc<crate::limits::RateLimiter>>,
    /// The journal's directory (one node's own).
    pub journal_dir: &'a Path,
}

/// Records usage events through the outbox.
#[derive(Clone)]
pub struct UsageRecorder {
    queue: mpsc::UnboundedSender<Op>,
    settling: Arc<Settling>,
    /// Builds the events (the writer task holds its own handle to write them).
    outbox: Outbox,
    journal: Arc<Journal>,
    node: Arc<str>,
    accelerator: AcceleratorType,
    limiter: Option<Arc<crate::limits::RateLimiter>>,
}

/// The reserved usage of one request (see [`UsageRecorder::reserve`]). Dropping it without
/// [`Reservation::confirm`] cancels it: the request is not billed.
pub struct Reservation {
    settling: Arc<Settling>,
    event: Option<Event>,
}

impl Reservation {
    /// Hands the usage's final form (with its end time) to the outbox, without waiting for
    /// that write: the journal already holds it (and bills it at the next start should the
    /// writer have stopped).
    pub fn confirm(mut self) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        if let Some(Body::UsageRecorded(usage)) = &mut event.body {
            usage.end_time = Some(kiln_core::time::micros_to_timestamp(
                kiln_core::time::now_micros(),
            ));
        }
        self.settling.push(Op::Confirm(event));
    }
}

/// Settlements on their way to the writer, handed over without waking it for each request
/// (a wake-up per answer preempted the model's threads): it is told when the first of a
/// batch arrives, and takes them all a moment later ([`SETTLE`]).
#[derive(Default)]
struct Settling {
    ops: std::sync::Mutex<Vec<Op>>,
    arrived: tokio::sync::Notify,
}

impl Settling {
    fn push(&self, op: Op) {
        let waiting = {
            let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
            ops.push(op);
            ops.len()
        };
        if waiting == 1 || waiting == MAX_BATCH {
            self.arrived.notify_one();
        }
    }

    fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn is_full(&self) -> bool {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).len() >= MAX_BATCH
    }
}

/// The most operations one write takes.
const MAX_BATCH: usize = 512;

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
            // Should the writer have stopped, the journal bills it at the next start.
            self.settling.push(Op::Cancel(event.id));
        }
    }
}

impl UsageRecorder {
    /// Opens the journal and starts the writer task on `db` (whose outbox relay publishes
    /// the events). The task first bills what earlier runs left reserved. Once `stopped`
    /// (the process's calls have ended) it writes what they queued and ends, so the relay's
    /// last pass publishes it: a clean stop leaves no usage behind (what comes later finds
    /// the queue closed and stays reserved, billed at the next start). The task, to wait for.
    pub fn start(
        db: DatabaseConnection,
        outbox: Outbox,
        recording: Recording<'_>,
        stopped: Option<watch::Receiver<bool>>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>)> {
        Self::start_settling(db, outbox, recording, stopped, SETTLE)
    }

    /// [`UsageRecorder::start`], settlements waiting for others as `settle` says.
    fn start_settling(
        db: DatabaseConnection,
        outbox: Outbox,
        recording: Recording<'_>,
        stopped: Option<watch::Receiver<bool>>,
        settle: Linger,
    ) -> Result<(Self, tokio::task::JoinHandle<()>)> {
        let (journal, earlier) = Journal::open(recording.journal_dir)
            .map_err(|e| Error::internal("opening the usage journal", e))?;
        let journal = Arc::new(journal);
        let (queue, mut ops) = mpsc::unbounded_channel::<Op>();
        let settling = Arc::new(Settling::default());
        let node_name: Arc<str> = recording.node.into();
        let in_flight = outbox.in_flight().clone();
        let writer = Writer {
            db,
            outbox: outbox.clone(),
            node: node_name.clone(),
            journal: journal.clone(),
        };
        let task = tokio::spawn({
            let settling = settling.clone();
            async move {
                match writer.recover(earlier).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        events = n,
                        "billed the usage of requests a stop interrupted mid-answer"
                    ),
                    Err(e) => tracing::error!("cannot bill the usage earlier runs left: {e}"),
                }
                let mut batch = Vec::new();
                // Settlements (answered or failed requests) wait in `settling` until `due`: they
                // need no answer, so many requests share one commit instead of one each (the
                // journal holds them meanwhile). Those the database refused wait
                // `RETRY_SETTLEMENTS` in `retry`, so an answered request's usage is billed once the
                // database is back, not only at the node's next start.
                let mut retry: Vec<Op> = Vec::new();
                let mut due: Option<tokio::time::Instant> = None;
                let stop = async move {
                    match stopped {
                        Some(mut stopped) => drop(stopped.wait_for(|s| *s).await),
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        received = ops.recv_many(&mut batch, MAX_BATCH) => {
                            if received == 0 {
                                // Every recorder is gone: write what waits and end.
                                let mut rest = settling.take();
                                rest.append(&mut retry);
                                writer.write(rest).await;
                                return;
                            }
                            // Records of one burst arrive together, but the first one wakes this
                            // task at once (ahead of the others' handlers): let them queue theirs
                            // first so the burst costs one commit, not one each.
                            tokio::task::yield_now().await;
                            while batch.len() < MAX_BATCH
                                && let Ok(more) = ops.try_recv()
                            {
                                batch.push(more);
                            }
                            writer.write(std::mem::take(&mut batch)).await;
                        }
                        () = settling.arrived.notified() => {
                            let now = tokio::time::Instant::now();
                            due = if settling.is_full() {
                                Some(now)
                            } else {
                                due.or(Some(now + settle.with(in_flight.get())))
                            };
                        }
                        () = sleep_until(due), if due.is_some() => {
                            let mut now = settling.take();
                            now.append(&mut retry);
                            retry = writer.write(now).await;
                            due = (!retry.is_empty())
                                .then(|| tokio::time::Instant::now() + RETRY_SETTLEMENTS);
                        }
                        () = &mut stop => {
                            ops.close();
                            while ops.recv_many(&mut batch, MAX_BATCH).await > 0 {}
                            batch.append(&mut settling.take());
                            batch.append(&mut retry);
                            // What still fails stays in the journal, billed at the next start.
                            writer.write(std::mem::take(&mut batch)).await;
                            return;
                        }
                    }
                }
            }
        });
        let recorder = Self {
            queue,
            settling,
            outbox,
            journal,
            node: node_name,
            accelerator: recording.accelerator,
            limiter: recording.limiter,
        };
        Ok((recorder, task))
    }

    /// Writes `usage` down in the journal, before the request's answer is computed;
    /// [`Reservation::confirm`] when it is answered.
    pub fn reserve(&self, caller: &Principal, usage: Usage) -> Result<Reservation> {
        let event = self.event(caller, usage);
        self.journal.reserve(&event).map_err(|e| {
            tracing::error!("cannot write usage to the journal: {e}");
            Error::Unavailable("cannot record usage".into())
        })?;
        Ok(Reservation {
            settling: self.settling.clone(),
            event: Some(event),
        })
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

/// How long settlements wait for others to share their commit: a tenth of a second, and
/// half a second while the node is busy by the usage relay's rule (under load each commit
/// sets off a burst of database and relay work that preempts the model's threads; measured,
/// 32 embedding clients on 2 cores: the model's threads 91.7-92.6% of the cores with 500 ms
/// against 90.4-91.3% with 100 ms, the usage relay lingering as [`crate::USAGE_LINGER`] says).
const SETTLE: Linger = Linger {
    quiet: Duration::from_millis(100),
    busy: Duration::from_millis(500),
    busy_from: crate::USAGE_LINGER.busy_from,
};
/// How long refused settlements wait before they are tried again.
const RETRY_SETTLEMENTS: Duration = Duration::from_secs(1);

/// Sleeps until `due` (forever without one).
async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// The writer task's database work.
struct Writer {
    db: DatabaseConnection,
    outbox: Outbox,
    node: Arc<str>,
    journal: Arc<Journal>,
}

impl Writer {
    /// One batch of operations: the outbox rows in one statement, then the settled
    /// reservations marked in the journal. Returns the confirmations to try again (the
    /// write failed).
    async fn write(&self, batch: Vec<Op>) -> Vec<Op> {
        let mut outgoing = Vec::new();
        let mut record_acks = Vec::new();
        let mut confirmed = Vec::new();
        let mut cancelled = Vec::new();
        for op in batch {
            match op {
                Op::Record(event, ack) => {
                    outgoing.push(event);
                    record_acks.push(ack);
                }
                Op::Confirm(event) => confirmed.push(event),
                Op::Cancel(id) => cancelled.push(id),
            }
        }
        self.journal.settle(cancelled.iter().map(String::as_str));
        let records = outgoing.len();
        outgoing.extend(confirmed);
        if outgoing.is_empty() {
            return Vec::new();
        }
        let written = self
            .outbox
            .publish_all(&self.db, &outgoing)
            .await
            .map_err(|e| e.to_string());
        for ack in record_acks {
            let _ = ack.send(written.clone());
        }
        let confirmed = outgoing.split_off(records);
        if let Err(e) = &written {
            tracing::error!("cannot write usage to the outbox (tried again in a moment): {e}");
            return confirmed.into_iter().map(Op::Confirm).collect();
        }
        self.journal
            .settle(confirmed.iter().map(|event| event.id.as_str()));
        Vec::new()
    }

    /// Moves to the outbox what earlier runs left reserved (requests a stop interrupted,
    /// answered or not: billing a request whose answer may not have gone out rather than
    /// losing one whose answer did): `earlier` from the journal, and this node's rows of
    /// the table older versions kept. Returns how many.
    async fn recover(&self, earlier: Vec<Event>) -> std::result::Result<usize, kiln_events::Error> {
        let backend = self.db.get_database_backend();
        let txn = self.db.begin().await?;
        let rows = txn
            .query_all(self.of_this_node(
                backend,
                "SELECT payload FROM inference_usage_pending WHERE node =",
            ))
            .await?;
        if rows.is_empty() && earlier.is_empty() {
            self.journal.forget_earlier();
            return Ok(0);
        }
        let mut events = earlier;
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
        self.journal.forget_earlier();
        Ok(events.len())
    }

    /// `sql`, which ends in `node =`, completed with this node's ID.
    fn of_this_node(&self, backend: DatabaseBackend, sql: &str) -> Statement {
        statement(backend, &format!("{sql} ?"), [self.node.to_string().into()])
    }
}

#[cfg(test)]
mod tests;
