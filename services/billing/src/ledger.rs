//! The usage ledger. One durable consumer reads every event in stream order (so a model or
//! deployment is known before its usage) and books usage as ledger entries, in batches of
//! one transaction each: a usage entry is keyed by its event's id and the other events are
//! claimed by id in the same transaction, so a redelivered, duplicated or replayed event
//! books nothing. Running dedicated replicas are billed from the moment they
//! are ready, in pieces: by the accrual loop while they run and by `replica.stopped` for the
//! rest, each piece within one UTC day and keyed by the replica and its start, so no
//! accelerator-second is billed twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use kiln_core::names::SYSTEM_ACCOUNT;
use kiln_core::time::{MICROS_PER_DAY, now_micros, timestamp_to_micros, utc_day, utc_month};
use kiln_events::consumer::BatchHandler;
use kiln_events::{Body, Event, new_event};
use kiln_proto::events::v1 as ev;
use kiln_proto::identity::v1::account::SuspendState;
use kiln_proto::scheduler::v1::Deployment;
use kiln_proto::scheduler::v1::deployment::{DeploymentType, State as DeploymentState};
use sea_orm::{DatabaseTransaction, Value};

use crate::db::{execute, int, query, value_rows};
use crate::error::Result;
use crate::quotas::QuotaKind;
use crate::service::{Billing, SOURCE};

/// The ledger consumer's default durable name.
pub const CONSUMER: &str = "billing-ledger";
/// It reads everything, in order; what it does not book it acknowledges untouched.
pub const SUBJECTS: &str = "kiln.>";
/// Processed event ids are recorded under this key whichever durable consumer delivered
/// them, so replaying the stream through a new consumer books nothing twice.
const DEDUP_KEY: &str = "billing-ledger";

const NANOS_PER_UNIT: i64 = 1_000_000_000;

/// One ledger entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entry {
    pub id: String,
    /// The account ID (not the full name).
    pub account: String,
    /// "tokens", "embedding_tokens", "requests", "accelerator_time", "training_tokens".
    pub kind: &'static str,
    /// When the usage ended; a piece of replica time: when it began, so that it counts in
    /// the day and month it lies in (pieces never cross midnight).
    pub time_micros: i64,
    /// The UTC day the usage is counted in.
    pub day: String,
    pub model: String,
    pub deployment: String,
    pub deployed_model: String,
    pub accelerator_type: i32,
    pub deployment_type: i32,
    pub request_count: i64,
    pub prompt_tokens: i64,
    pub cached_prompt_tokens: i64,
    pub completion_tokens: i64,
    pub embedding_tokens: i64,
    pub accelerator_micros: i64,
    pub training_tokens: i64,
    pub cost_nanos: i64,
}

/// A running dedicated replica, billed up to `billed_until`.
#[derive(Debug, Clone)]
pub(crate) struct OpenReplica {
    pub replica: String,
    pub account: String,
    pub deployment: String,
    pub model: String,
    pub accelerator_type: i32,
    pub accelerator_count: i64,
    pub billed_until: i64,
}

fn account_id(name: &str) -> String {
    let rest = name.strip_prefix("accounts/").unwrap_or(name);
    rest.split('/').next().unwrap_or_default().to_owned()
}

fn micros(ts: &Option<prost_types::Timestamp>, fallback: i64) -> i64 {
    ts.as_ref().map(timestamp_to_micros).unwrap_or(fallback)
}

fn event_micros(event: &Event) -> i64 {
    micros(&event.time, now_micros())
}

/// Usage events: each books one ledger entry under the event's own id.
fn is_usage(event: &Event) -> bool {
    matches!(
        event.body,
        Some(Body::UsageRecorded(_) | Body::TrainingUsageRecorded(_))
    )
}

fn is_booked(event: &Event) -> bool {
    matches!(
        event.body,
        Some(
            Body::UsageRecorded(_)
                | Body::TrainingUsageRecorded(_)
                | Body::ReplicaStarted(_)
                | Body::ReplicaStopped(_)
                | Body::ModelCreated(_)
                | Body::ModelUpdated(_)
                | Body::ModelStateChanged(_)
                | Body::DeploymentCreated(_)
                | Body::DeploymentUpdated(_)
                | Body::DeploymentStateChanged(_)
                | Body::DeploymentUndeleted(_)
                | Body::DeploymentDeleted(_)
        )
    )
}

impl OpenReplica {
    /// The entries for `[from, to)` of this replica's time, one per UTC day it spans; a
    /// negative span (the replica stopped before time already billed, e.g. at a lost node's
    /// last heartbeat) is one correcting entry.
    pub(crate) fn pieces(&self, billing: &Billing, from: i64, to: i64) -> Vec<Entry> {
        let base = Entry {
            account: self.account.clone(),
            kind: "accelerator_time",
            model: self.model.clone(),
            deployment: self.deployment.clone(),
            accelerator_type: self.accelerator_type,
            deployment_type: DeploymentType::Dedicated as i32,
            ..Default::default()
        };
        let priced = |mut e: Entry, span: i64| {
            e.accelerator_micros = span * self.accelerator_count;
            e.cost_nanos = billing
                .prices()
                .accelerator_cost(self.accelerator_type, e.accelerator_micros);
            e
        };
        if to < from {
            return vec![priced(
                Entry {
                    id: format!("{}@{from}~{to}", self.replica),
                    time_micros: to,
                    day: utc_day(to),
                    ..base
                },
                to - from,
            )];
        }
        let mut pieces = Vec::new();
        let mut start = from;
        while start < to {
            let midnight = (start.div_euclid(MICROS_PER_DAY) + 1) * MICROS_PER_DAY;
            let end = to.min(midnight);
            pieces.push(priced(
                Entry {
                    id: format!("{}@{start}", self.replica),
                    time_micros: start,
                    day: utc_day(start),
                    ..base.clone()
                },
                end - start,
            ));
            start = end;
        }
        pieces
    }
}

impl Billing {
    /// Books a batch of events in one transaction: what this ledger has not seen yet, once.
    /// A usage event's entry carries the event's id, so the ledger's own key keeps it once;
    /// the other events (replicas, models, deployments) change state and are claimed by id
    /// first. Returns how many events it applied.
    pub async fn ingest(&self, events: &[Event]) -> Result<usize> {
        let booked: Vec<&Event> = events.iter().filter(|e| is_booked(e)).collect();
        if booked.is_empty() {
            return Ok(0);
        }
        let txn = crate::db::begin_write(self.db()).await?;
        let stateful: Vec<&Event> = booked.iter().copied().filter(|e| !is_usage(e)).collect();
        let mut fresh = claim(&txn, &stateful).await?;
        let mut entries = Vec::new();
        let mut parameters = HashMap::new();
        let mut seen = HashSet::new();
        let mut applied = 0;
        for event in booked.iter().copied() {
            if is_usage(event) {
                if !seen.insert(event.id.as_str()) {
                    continue;
                }
            } else if fresh.remove(&event.id) {
                applied += 1;
            } else {
                continue;
            }
            self.apply(&txn, event, &mut entries, &mut parameters)
                .await?;
        }
        let inserted = self.book(&txn, &entries).await?;
        applied += seen.iter().filter(|id| inserted.contains(**id)).count();
        self.outbox().commit(txn).await?;
        Ok(applied)
    }

    async fn apply(
        &self,
        txn: &DatabaseTransaction,
        event: &Event,
        entries: &mut Vec<Entry>,
        parameters: &mut HashMap<String, i64>,
    ) -> Result<()> {
        match &event.body {
            Some(Body::UsageRecorded(u)) => {
                let entry = self.usage_entry(txn, event, u, parameters).await?;
                entries.push(entry);
            }
            Some(Body::TrainingUsageRecorded(t)) => {
                let params = model_parameters(txn, &t.base_model, parameters).await?;
                let rates = self.prices().token_rates(&t.base_model, params);
                let end = micros(&t.end_time, event_micros(event));
                entries.push(Entry {
                    id: event.id.clone(),
                    account: account_id(&t.account),
                    kind: "training_tokens",
                    time_micros: end,
                    day: utc_day(end),
                    model: t.base_model.clone(),
                    accelerator_type: t.accelerator_type,
                    training_tokens: t.training_tokens,
                    cost_nanos: t.training_tokens * rates.training,
                    ..Default::default()
                });
            }
            Some(Body::ReplicaStarted(r))
                if r.deployment_type == DeploymentType::Dedicated as i32 =>
            {
                let start = micros(&r.start_time, event_micros(event));
                execute(
                    txn,
                    "INSERT INTO billing_replicas (replica, account, deployment, model, accelerator_type, accelerator_count, start_micros, billed_until) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (replica) DO NOTHING",
                    vec![
                        r.replica.clone().into(),
                        account_id(&r.deployment).into(),
                        r.deployment.clone().into(),
                        r.model.clone().into(),
                        r.accelerator_type.into(),
                        i64::from(r.accelerator_count.max(1)).into(),
                        start.into(),
                        start.into(),
                    ],
                )
                .await?;
            }
            Some(Body::ReplicaStopped(r))
                if r.deployment_type == DeploymentType::Dedicated as i32 =>
            {
                let stop = micros(&r.stop_time, event_micros(event));
                entries.extend(self.close_replica(txn, r, stop).await?);
            }
            Some(
                Body::ModelCreated(ev::ModelCreated { model: Some(m) })
                | Body::ModelUpdated(ev::ModelUpdated { model: Some(m), .. })
                | Body::ModelStateChanged(ev::ModelStateChanged { model: Some(m), .. }),
            ) => {
                let params = m
                    .base_model_details
                    .as_ref()
                    .map(|d| d.parameter_count)
                    .unwrap_or(0);
                let base = m
                    .peft_details
                    .as_ref()
                    .map(|p| p.base_model.clone())
                    .unwrap_or_default();
                execute(
                    txn,
                    "INSERT INTO billing_models (name, parameter_count, base_model) VALUES (?, ?, ?) \
                     ON CONFLICT (name) DO UPDATE SET parameter_count = excluded.parameter_count, base_model = excluded.base_model",
                    vec![m.name.clone().into(), params.into(), base.into()],
                )
                .await?;
                parameters.remove(&m.name);
            }
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
            Some(Body::DeploymentDeleted(d)) => {
                execute(
                    txn,
                    "UPDATE billing_deployments SET active = ? WHERE name = ?",
                    vec![false.into(), d.name.clone().into()],
                )
                .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The rest of a stopped replica's time, from what was billed of it up to `stop`; its
    /// row goes. The row is taken only as it was read (an accrual that moved it meanwhile
    /// makes this read again), so a piece is never billed by both.
    async fn close_replica(
        &self,
        txn: &DatabaseTransaction,
        r: &ev::ReplicaStopped,
        stop: i64,
    ) -> Result<Vec<Entry>> {
        for _ in 0..8 {
            let Some(open) = open_replicas(txn, Some(&r.replica)).await?.pop() else {
                // Its start was never seen (it began before this ledger): the event carries
                // the whole span.
                let whole = OpenReplica {
                    replica: r.replica.clone(),
                    account: account_id(&r.deployment),
                    deployment: r.deployment.clone(),
                    model: r.model.clone(),
                    accelerator_type: r.accelerator_type,
                    accelerator_count: i64::from(r.accelerator_count.max(1)),
                    billed_until: 0,
                };
                return Ok(whole.pieces(self, micros(&r.start_time, stop), stop));
            };
            let taken = execute(
                txn,
                "DELETE FROM billing_replicas WHERE replica = ? AND billed_until = ?",
                vec![r.replica.clone().into(), open.billed_until.into()],
            )
            .await?;
            if taken == 1 {
                return Ok(open.pieces(self, open.billed_until, stop));
            }
        }
        Err(crate::Error::Contended(format!(
            "replica {} kept moving while it was being closed; the batch will be retried",
            r.replica
        )))
    }

    async fn usage_entry(
        &self,
        txn: &DatabaseTransaction,
        event: &Event,
        u: &ev::UsageRecorded,
        parameters: &mut HashMap<String, i64>,
    ) -> Result<Entry> {
        let end = micros(&u.end_time, event_micros(event));
        let embedding = u.api == "embeddings";
        let mut entry = Entry {
            id: event.id.clone(),
            account: account_id(&u.account),
            kind: if embedding {
                "embedding_tokens"
            } else if u.api == "model_infer" {
                "requests"
            } else {
                "tokens"
            },
            time_micros: end,
            day: utc_day(end),
            model: u.model.clone(),
            deployment: u.deployment.clone(),
            deployed_model: u.deployed_model.clone(),
            accelerator_type: u.accelerator_type,
            deployment_type: u.deployment_type,
            request_count: 1,
            ..Default::default()
        };
        if embedding {
            entry.embedding_tokens = u.embedding_input_tokens.max(u.prompt_tokens);
        } else {
            entry.prompt_tokens = u.prompt_tokens;
            entry.cached_prompt_tokens = u.cached_prompt_tokens;
            entry.completion_tokens = u.completion_tokens;
        }
        // Dedicated deployments are billed by replica time; their tokens are reported only.
        if u.deployment_type != DeploymentType::Dedicated as i32 {
            let params = model_parameters(txn, &u.model, parameters).await?;
            let rates = self.prices().token_rates(&u.model, params);
            entry.cost_nanos = entry.embedding_tokens * rates.embedding
                + (entry.prompt_tokens - entry.cached_prompt_tokens) * rates.input
                + entry.cached_prompt_tokens * rates.cached_input
                + entry.completion_tokens * rates.output;
        }
        Ok(entry)
    }

    /// Writes the `entries` the ledger does not hold yet, adds their cost to each account's
    /// month, and suspends accounts whose month reached its spend limit. Returns the ids
    /// written.
    pub(crate) async fn book(
        &self,
        txn: &DatabaseTransaction,
        entries: &[Entry],
    ) -> Result<HashSet<String>> {
        const COLUMNS: usize = 18;
        let mut inserted = HashSet::with_capacity(entries.len());
        // 1,000 rows of 18 values stay under either backend's bind-variable limit.
        for chunk in entries.chunks(1_000) {
            let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * COLUMNS);
            for e in chunk {
                values.extend([
                    e.id.clone().into(),
                    e.account.clone().into(),
                    e.kind.into(),
                    e.time_micros.into(),
                    e.day.clone().into(),
                    e.model.clone().into(),
                    e.deployment.clone().into(),
                    e.deployed_model.clone().into(),
                    e.accelerator_type.into(),
                    e.deployment_type.into(),
                    e.request_count.into(),
                    e.prompt_tokens.into(),
                    e.cached_prompt_tokens.into(),
                    e.completion_tokens.into(),
                    e.embedding_tokens.into(),
                    e.accelerator_micros.into(),
                    e.training_tokens.into(),
                    e.cost_nanos.into(),
                ]);
            }
            let rows = query(
                txn,
                &format!(
                    "INSERT INTO billing_ledger (id, account, kind, time_micros, day, model, deployment, deployed_model, \
                     accelerator_type, deployment_type, request_count, prompt_tokens, cached_prompt_tokens, completion_tokens, \
                     embedding_tokens, accelerator_micros, training_tokens, cost_nanos) VALUES {} \
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    value_rows(chunk.len(), COLUMNS)
                ),
                values,
            )
            .await?;
            for row in rows {
                inserted.insert(row.try_get::<String>("", "id")?);
            }
        }
        let mut spend: HashMap<(String, String), i64> = HashMap::new();
        for e in entries
            .iter()
            .filter(|e| e.cost_nanos != 0 && inserted.contains(&e.id))
        {
            *spend
                .entry((e.account.clone(), utc_month(e.time_micros)))
                .or_default() += e.cost_nanos;
        }
        if spend.is_empty() {
            return Ok(inserted);
        }
        // Every account's month in one statement; then the limits of those whose current
        // month moved, in one more.
        let mut values: Vec<Value> = Vec::with_capacity(spend.len() * 3);
        for ((account, month), cost) in &spend {
            values.extend([account.clone().into(), month.clone().into(), (*cost).into()]);
        }
        let totals = query(
            txn,
            &format!(
                "INSERT INTO billing_monthly_spend (account, month, cost_nanos) VALUES {} \
                 ON CONFLICT (account, month) DO UPDATE SET cost_nanos = billing_monthly_spend.cost_nanos + excluded.cost_nanos \
                 RETURNING account, month, cost_nanos",
                value_rows(spend.len(), 3)
            ),
            values,
        )
        .await?;
        let this_month = utc_month(now_micros());
        let mut current: Vec<(String, i64)> = Vec::new();
        for row in &totals {
            let month: String = row.try_get("", "month")?;
            let account: String = row.try_get("", "account")?;
            if month == this_month && account != SYSTEM_ACCOUNT {
                current.push((account, int(row, "cost_nanos")?));
            }
        }
        if current.is_empty() {
            return Ok(inserted);
        }
        let mut values: Vec<Value> = vec![QuotaKind::MonthlySpend.id().into()];
        values.extend(current.iter().map(|(a, _)| Value::from(a.clone())));
        let stored: HashMap<String, i64> = query(
            txn,
            &format!(
                "SELECT account, value FROM billing_quotas WHERE quota = ? AND account IN ({})",
                vec!["?"; current.len()].join(", ")
            ),
            values,
        )
        .await?
        .iter()
        .map(|row| Ok((row.try_get::<String>("", "account")?, int(row, "value")?)))
        .collect::<Result<_>>()?;
        let default = self.config().quotas.monthly_spend;
        for (account, month_spend) in current {
            let limit = stored.get(&account).copied().unwrap_or(default);
            self.enforce_spend_limit(txn, &account, month_spend, limit)
                .await?;
        }
        Ok(inserted)
    }

    /// Suspends `account` (MONTHLY_SPEND_LIMIT_EXCEEDED) when `month_spend` reached its
    /// `limit` (whole currency units) and it is not suspended yet: a row here and its event,
    /// in `txn`.
    pub(crate) async fn enforce_spend_limit(
        &self,
        txn: &DatabaseTransaction,
        account: &str,
        month_spend: i64,
        limit: i64,
    ) -> Result<()> {
        if account == SYSTEM_ACCOUNT {
            return Ok(());
        }
        if month_spend < limit.saturating_mul(NANOS_PER_UNIT) {
            return Ok(());
        }
        let now = now_micros();
        let reason = format!(
            "the month's spend ({} {}) reached the monthly spend limit of {limit} {}",
            crate::prices::format_nanos(month_spend),
            self.prices().currency_code,
            self.prices().currency_code,
        );
        let inserted = execute(
            txn,
            "INSERT INTO billing_suspensions (account, suspend_state, month, reason, since_micros) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (account) DO NOTHING",
            vec![
                account.into(),
                (SuspendState::MonthlySpendLimitExceeded as i32).into(),
                utc_month(now).into(),
                reason.clone().into(),
                now.into(),
            ],
        )
        .await?;
        if inserted > 0 {
            tracing::info!(account, %reason, "account suspended");
            let name = format!("accounts/{account}");
            let event = new_event(
                SOURCE,
                "billing.account.suspended",
                &name,
                &name,
                Body::AccountSuspended(ev::AccountSuspended {
                    account: name.clone(),
                    suspend_state: SuspendState::MonthlySpendLimitExceeded as i32,
                    reason,
                }),
            );
            self.outbox().enqueue(txn, &event).await?;
        }
        Ok(())
    }

    /// Lifts `account`'s spend-limit suspension, with its event, in `txn` (when it has one).
    pub(crate) async fn lift_suspension(
        &self,
        txn: &DatabaseTransaction,
        account: &str,
        why: &str,
    ) -> Result<bool> {
        let lifted = execute(
            txn,
            "DELETE FROM billing_suspensions WHERE account = ? AND suspend_state = ?",
            vec![
                account.into(),
                (SuspendState::MonthlySpendLimitExceeded as i32).into(),
            ],
        )
        .await?;
        if lifted == 0 {
            return Ok(false);
        }
        tracing::info!(account, why, "account unsuspended");
        let name = format!("accounts/{account}");
        let event = new_event(
            SOURCE,
            "billing.account.unsuspended",
            &name,
            &name,
            Body::AccountUnsuspended(ev::AccountUnsuspended {
                account: name.clone(),
                previous_suspend_state: SuspendState::MonthlySpendLimitExceeded as i32,
            }),
        );
        self.outbox().enqueue(txn, &event).await?;
        Ok(true)
    }

    /// Bills every running dedicated replica up to `now`, and lifts spend-limit suspensions
    /// of a month that has ended.
    pub async fn accrue(&self, now: i64) -> Result<()> {
        let txn = crate::db::begin_write(self.db()).await?;
        let mut entries = Vec::new();
        for open in open_replicas(&txn, None).await? {
            if open.billed_until >= now {
                continue;
            }
            let moved = execute(
                &txn,
                "UPDATE billing_replicas SET billed_until = ? WHERE replica = ? AND billed_until = ?",
                vec![now.into(), open.replica.clone().into(), open.billed_until.into()],
            )
            .await?;
            if moved == 1 {
                entries.extend(open.pieces(self, open.billed_until, now));
            }
        }
        self.book(&txn, &entries).await?;
        let month = utc_month(now);
        let ended = query(
            &txn,
            "SELECT account FROM billing_suspensions WHERE month < ? AND suspend_state = ?",
            vec![
                month.into(),
                (SuspendState::MonthlySpendLimitExceeded as i32).into(),
            ],
        )
        .await?;
        for row in ended {
            let account: String = row.try_get("", "account")?;
            self.lift_suspension(&txn, &account, "a new month began")
                .await?;
        }
        self.outbox().commit(txn).await?;
        Ok(())
    }
}

/// Records the ids of `events` as processed; returns those not processed before.
async fn claim(txn: &DatabaseTransaction, events: &[&Event]) -> Result<HashSet<String>> {
    let now = now_micros();
    let mut fresh = HashSet::new();
    for chunk in events.chunks(500) {
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
        for e in chunk {
            values.extend([DEDUP_KEY.into(), e.id.clone().into(), now.into()]);
        }
        let rows = query(
            txn,
            &format!(
                "INSERT INTO kiln_processed_events (consumer, event_id, processed_at) VALUES {} \
                 ON CONFLICT DO NOTHING RETURNING event_id",
                value_rows(chunk.len(), 3)
            ),
            values,
        )
        .await?;
        for row in rows {
            fresh.insert(row.try_get::<String>("", "event_id")?);
        }
    }
    Ok(fresh)
}

/// The parameter count prices are tiered by: a LoRA addon's is its base model's; a model
/// this ledger has not seen counts as 0 (the smallest tier).
async fn model_parameters(
    txn: &DatabaseTransaction,
    model: &str,
    known: &mut HashMap<String, i64>,
) -> Result<i64> {
    if let Some(p) = known.get(model) {
        return Ok(*p);
    }
    let mut name = model.to_owned();
    let mut parameters = 0;
    // An addon names its base; one more step finds the base's count.
    for _ in 0..2 {
        let rows = query(
            txn,
            "SELECT parameter_count, base_model FROM billing_models WHERE name = ?",
            vec![name.clone().into()],
        )
        .await?;
        let Some(row) = rows.first() else { break };
        parameters = int(row, "parameter_count")?;
        let base: String = row.try_get("", "base_model")?;
        if base.is_empty() {
            break;
        }
        name = base;
    }
    known.insert(model.to_owned(), parameters);
    Ok(parameters)
}

async fn save_deployment(txn: &DatabaseTransaction, d: &Deployment) -> Result<()> {
    let active = !matches!(
        DeploymentState::try_from(d.state),
        Ok(DeploymentState::Deleting | DeploymentState::Deleted)
    );
    execute(
        txn,
        "INSERT INTO billing_deployments (name, account, deployment_type, accelerator_type, accelerator_count, max_replica_count, active) \
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET deployment_type = excluded.deployment_type, \
         accelerator_type = excluded.accelerator_type, accelerator_count = excluded.accelerator_count, \
         max_replica_count = excluded.max_replica_count, active = excluded.active",
        vec![
            d.name.clone().into(),
            account_id(&d.name).into(),
            d.deployment_type.into(),
            d.accelerator_type.into(),
            i64::from(d.accelerator_count).into(),
            i64::from(d.max_replica_count).into(),
            active.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Running dedicated replicas (one, or all).
pub(crate) async fn open_replicas<C: sea_orm::ConnectionTrait>(
    conn: &C,
    replica: Option<&str>,
) -> Result<Vec<OpenReplica>> {
    let select = "SELECT replica, account, deployment, model, accelerator_type, accelerator_count, billed_until FROM billing_replicas";
    let rows = match replica {
        Some(r) => query(conn, &format!("{select} WHERE replica = ?"), vec![r.into()]).await?,
        None => query(conn, select, vec![]).await?,
    };
    rows.iter()
        .map(|row| {
            Ok(OpenReplica {
                replica: row.try_get("", "replica")?,
                account: row.try_get("", "account")?,
                deployment: row.try_get("", "deployment")?,
                model: row.try_get("", "model")?,
                accelerator_type: row.try_get("", "accelerator_type")?,
                accelerator_count: int(row, "accelerator_count")?,
                billed_until: int(row, "billed_until")?,
            })
        })
        .collect()
}

/// Hands each batch the durable consumer delivers to [`Billing::ingest`].
struct LedgerConsumer(Billing);

#[async_trait]
impl BatchHandler for LedgerConsumer {
    async fn handle(&self, events: &[Event]) -> Result<(), kiln_events::Error> {
        self.0.ingest(events).await.map(|_| ()).map_err(Into::into)
    }
}

/// Starts the ledger consumer (its durable name from config) and the accrual loop.
pub fn spawn(
    billing: &Billing,
    host: &kiln_events::host::Host,
) -> Vec<tokio::task::JoinHandle<()>> {
    let consumer = kiln_events::consumer::spawn_batch_consumer(
        host.bus.clone(),
        billing.config().ledger_consumer.clone(),
        SUBJECTS.to_owned(),
        billing.config().ingest_batch,
        Arc::new(LedgerConsumer(billing.clone())),
        host.shutdown.clone(),
    );
    let accrual = {
        let billing = billing.clone();
        let mut shutdown = host.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(billing.config().accrual_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                if let Err(err) = billing.accrue(now_micros()).await {
                    tracing::warn!(%err, "billing running replicas failed; retrying next tick");
                }
            }
        })
    };
    vec![consumer, accrual]
}

#[cfg(test)]
mod tests {
    use kiln_core::auth::{Principal, Role};
    use kiln_core::time::{micros_to_timestamp, utc_midnight};
    use kiln_proto::billing::v1::{GetUsageRequest, Quota};
    use kiln_proto::common::v1::AcceleratorType;

    use super::*;
    use crate::config::BillingConfig;

    async fn billing(dir: &tempfile::TempDir) -> Billing {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("billing.db").display()
        );
        let db = kiln_store::connect(&url).await.unwrap();
        kiln_store::migrate(&db, crate::service::SERVICE, crate::db::MIGRATIONS)
            .await
            .unwrap();
        Billing::new(
            db,
            kiln_core::page::PageTokens::new(b"test"),
            BillingConfig::default(),
        )
        .unwrap()
    }

    fn admin() -> Principal {
        Principal {
            roles: vec![Role::PlatformAdmin],
            ..Principal::service()
        }
    }

    fn usage(account: &str, prompt: i64, completion: i64, at: i64) -> Event {
        let mut event = new_event(
            "test",
            "inference.usage.recorded",
            account,
            account,
            Body::UsageRecorded(ev::UsageRecorded {
                request_id: uuid::Uuid::new_v4().to_string(),
                account: account.into(),
                model: "accounts/kiln/models/m".into(),
                api: "chat.completions".into(),
                prompt_tokens: prompt,
                completion_tokens: completion,
                deployment_type: DeploymentType::Serverless as i32,
                end_time: Some(micros_to_timestamp(at)),
                ..Default::default()
            }),
        );
        event.time = Some(micros_to_timestamp(at));
        event
    }

    fn replica_event(body: Body) -> Event {
        new_event("test", "scheduler.replica.x", "accounts/acme", "r", body)
    }

    async fn report(billing: &Billing, start: i64, end: i64) -> kiln_proto::billing::v1::UsageRow {
        billing
            .get_usage(
                &admin(),
                GetUsageRequest {
                    parent: "accounts/acme".into(),
                    start_time: Some(micros_to_timestamp(start)),
                    end_time: Some(micros_to_timestamp(end)),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .totals
            .unwrap()
    }

    #[tokio::test]
    async fn an_event_is_booked_once_however_often_it_comes() {
        let dir = tempfile::tempdir().unwrap();
        let billing = billing(&dir).await;
        let now = now_micros();
        let a = usage("accounts/acme", 10, 5, now);
        let b = usage("accounts/acme", 7, 3, now);
        // A duplicate inside one batch, then the whole batch again (a replay).
        assert_eq!(
            billing
                .ingest(&[a.clone(), a.clone(), b.clone()])
                .await
                .unwrap(),
            2
        );
        assert_eq!(billing.ingest(&[b, a]).await.unwrap(), 0);
        let row = report(&billing, now - 1_000_000, now + 1_000_000).await;
        assert_eq!(
            (row.request_count, row.prompt_tokens, row.completion_tokens),
            (2, 17, 8)
        );
        // 135M-parameter tier: $0.10 per million prompt and completion tokens.
        assert_eq!(
            crate::prices::money_nanos(row.cost.as_ref().unwrap()),
            25 * 100
        );
    }

    #[tokio::test]
    async fn training_tokens_are_priced_by_the_base_models_tier() {
        let dir = tempfile::tempdir().unwrap();
        let billing = billing(&dir).await;
        let now = now_micros();
        // A 70B base model (the unbounded tier: $3.00 per million training tokens).
        let base = kiln_proto::registry::v1::Model {
            name: "accounts/kiln/models/big".into(),
            base_model_details: Some(kiln_proto::registry::v1::BaseModelDetails {
                parameter_count: 70_000_000_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = new_event(
            "test",
            "registry.model.created",
            "accounts/kiln",
            "accounts/kiln/models/big",
            Body::ModelCreated(ev::ModelCreated { model: Some(base) }),
        );
        let trained = new_event(
            "test",
            "inference.training_usage.recorded",
            "accounts/acme",
            "accounts/acme/supervisedFineTuningJobs/j",
            Body::TrainingUsageRecorded(ev::TrainingUsageRecorded {
                job: "accounts/acme/supervisedFineTuningJobs/j".into(),
                account: "accounts/acme".into(),
                base_model: "accounts/kiln/models/big".into(),
                training_tokens: 1_000,
                end_time: Some(micros_to_timestamp(now)),
                ..Default::default()
            }),
        );
        assert_eq!(billing.ingest(&[created, trained]).await.unwrap(), 2);
        let row = report(&billing, now - 1_000_000, now + 1_000_000).await;
        assert_eq!(row.training_tokens, 1_000);
        assert_eq!(
            crate::prices::money_nanos(row.cost.as_ref().unwrap()),
            1_000 * 3_000
        );
    }

    #[tokio::test]
    async fn replica_time_is_billed_per_day_in_pieces_that_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let billing = billing(&dir).await;
        let h100 = AcceleratorType::NvidiaH10080gb as i32;
        // Ready at 23:59:00 on 2026-03-04, stopped at 00:01:00 the next day; billed once in
        // between, at 00:00:30.
        let start = utc_midnight(2026, 3, 5) - 60_000_000;
        let stop = start + 120_000_000;
        let started = replica_event(Body::ReplicaStarted(ev::ReplicaStarted {
            replica: "accounts/acme/deployments/d/replicas/r1".into(),
            deployment: "accounts/acme/deployments/d".into(),
            model: "accounts/acme/models/m".into(),
            accelerator_type: h100,
            accelerator_count: 2,
            deployment_type: DeploymentType::Dedicated as i32,
            start_time: Some(micros_to_timestamp(start)),
            ..Default::default()
        }));
        billing
            .ingest(std::slice::from_ref(&started))
            .await
            .unwrap();
        billing.accrue(start + 90_000_000).await.unwrap();
        let stopped = replica_event(Body::ReplicaStopped(ev::ReplicaStopped {
            replica: "accounts/acme/deployments/d/replicas/r1".into(),
            deployment: "accounts/acme/deployments/d".into(),
            model: "accounts/acme/models/m".into(),
            accelerator_type: h100,
            accelerator_count: 2,
            deployment_type: DeploymentType::Dedicated as i32,
            start_time: Some(micros_to_timestamp(start)),
            stop_time: Some(micros_to_timestamp(stop)),
            accelerator_seconds: 240.0,
            ..Default::default()
        }));
        billing
            .ingest(std::slice::from_ref(&stopped))
            .await
            .unwrap();
        // Replayed start and stop, and a later accrual, add nothing.
        assert_eq!(billing.ingest(&[started, stopped]).await.unwrap(), 0);
        billing.accrue(stop + 60_000_000).await.unwrap();
        let whole = report(&billing, start - 1, stop + 1).await;
        assert!(
            (whole.gpu_seconds - 240.0).abs() < 1e-9,
            "{}",
            whole.gpu_seconds
        );
        let first_day = report(&billing, start - 1, utc_midnight(2026, 3, 5)).await;
        assert!(
            (first_day.gpu_seconds - 120.0).abs() < 1e-9,
            "{}",
            first_day.gpu_seconds
        );
        // $5.80 an H100-hour: 240 s is 0.3866... USD, rounded per piece.
        let cost = crate::prices::money_nanos(whole.cost.as_ref().unwrap());
        assert!((cost - 386_666_667).abs() <= 2, "{cost}");
    }

    #[tokio::test]
    async fn a_spend_limit_suspends_and_a_new_month_or_a_higher_limit_lifts_it() {
        let dir = tempfile::tempdir().unwrap();
        let billing = billing(&dir).await;
        let quota = |value| Quota {
            name: "accounts/acme/quotas/monthly-spend-usd".into(),
            value,
            ..Default::default()
        };
        billing
            .update_quota(&admin(), quota(1), None)
            .await
            .unwrap();
        let suspended = || async {
            query(
                billing.db(),
                "SELECT account FROM billing_suspensions",
                vec![],
            )
            .await
            .unwrap()
            .len()
        };
        // $0.10 per million tokens: 10 million tokens are $1.
        let now = now_micros();
        billing
            .ingest(&[usage("accounts/acme", 6_000_000, 0, now)])
            .await
            .unwrap();
        assert_eq!(suspended().await, 0);
        billing
            .ingest(&[usage("accounts/acme", 4_000_000, 0, now)])
            .await
            .unwrap();
        assert_eq!(suspended().await, 1, "the month reached $1");
        // The system account is never suspended.
        billing
            .ingest(&[usage("accounts/kiln", 100_000_000, 0, now)])
            .await
            .unwrap();
        assert_eq!(suspended().await, 1);
        billing
            .update_quota(&admin(), quota(2), None)
            .await
            .unwrap();
        assert_eq!(suspended().await, 0, "raised above the month's spend");
        // Lowered under the month's spend: suspended again at once.
        billing
            .update_quota(&admin(), quota(1), None)
            .await
            .unwrap();
        assert_eq!(suspended().await, 1);
        let next_month = kiln_core::time::utc_month_start(now) + 40 * MICROS_PER_DAY;
        billing.accrue(next_month).await.unwrap();
        assert_eq!(suspended().await, 0, "a new month began");
        let events = query(
            billing.db(),
            "SELECT subject FROM kiln_outbox ORDER BY seq",
            vec![],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "subject").unwrap())
        .filter(|s| s.contains(".account."))
        .collect::<Vec<_>>();
        assert_eq!(
            events,
            [
                "kiln.billing.account.suspended",
                "kiln.billing.account.unsuspended",
                "kiln.billing.account.suspended",
                "kiln.billing.account.unsuspended",
            ]
        );
    }
}
