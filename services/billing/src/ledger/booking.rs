//! Booking: usage events become priced ledger entries, and entries are written once (the
//! ledger's key is the entry's id), their cost added to each account's month and its spend
//! limit checked, all in the caller's transaction.

use kiln_store::{query, value_rows};
use std::collections::{HashMap, HashSet};

use kiln_core::time::{utc_day, utc_month};
use kiln_events::records::HasRecords;
use kiln_events::{Body, Event};
use kiln_proto::events::v1 as ev;
use sea_orm::{DatabaseTransaction, Value};

use super::entry::{Entry, event_micros, micros};
use super::models::model_parameters;
use super::replicas::billed_by_time;
use crate::db::{insert_returning, int};
use crate::prices::TokenRates;
use crate::service::Billing;
use kiln_core::Result;
use kiln_core::names::account_of;

/// The entry of a usage event, its tokens priced at `rates`.
fn usage_entry(event: &Event, u: &ev::UsageRecorded, rates: &TokenRates) -> Entry {
    let end = micros(&u.end_time, event_micros(event));
    let embedding = u.api == "embeddings";
    let mut entry = Entry {
        id: event.id.clone(),
        account: account_of(&u.account).to_owned(),
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
    entry.cost_nanos = entry.embedding_tokens * rates.embedding
        + (entry.prompt_tokens - entry.cached_prompt_tokens) * rates.input
        + entry.cached_prompt_tokens * rates.cached_input
        + entry.completion_tokens * rates.output;
    entry
}

/// The entry of a fine-tuning job's usage, its tokens priced at `rates` (its base model's).
fn training_entry(event: &Event, t: &ev::TrainingUsageRecorded, rates: &TokenRates) -> Entry {
    let end = micros(&t.end_time, event_micros(event));
    Entry {
        id: event.id.clone(),
        account: account_of(&t.account).to_owned(),
        kind: "training_tokens",
        time_micros: end,
        day: utc_day(end),
        model: t.base_model.clone(),
        accelerator_type: t.accelerator_type,
        training_tokens: t.training_tokens,
        cost_nanos: t.training_tokens * rates.training,
        ..Default::default()
    }
}

/// What the `inserted` entries add to each (account, month)'s spend; entries that cost
/// nothing are left out.
fn month_spend(entries: &[Entry], inserted: &HashSet<String>) -> HashMap<(String, String), i64> {
    let mut spend: HashMap<(String, String), i64> = HashMap::new();
    for e in entries
        .iter()
        .filter(|e| e.cost_nanos != 0 && inserted.contains(&e.id))
    {
        *spend
            .entry((e.account.clone(), utc_month(e.time_micros)))
            .or_default() += e.cost_nanos;
    }
    spend
}

impl Billing {
    /// The priced entry of `event` when it is usage (of a model, or a fine-tuning job's);
    /// `parameters` keeps the batch's lookups of model sizes.
    pub(crate) async fn priced_entry(
        &self,
        txn: &DatabaseTransaction,
        event: &Event,
        parameters: &mut HashMap<String, i64>,
    ) -> Result<Option<Entry>> {
        Ok(match &event.body {
            Some(Body::UsageRecorded(u)) => {
                let rates = if billed_by_time(u.deployment_type) {
                    TokenRates::default()
                } else {
                    self.rates(txn, &u.model, parameters).await?
                };
                Some(usage_entry(event, u, &rates))
            }
            Some(Body::TrainingUsageRecorded(t)) => {
                let rates = self.rates(txn, &t.base_model, parameters).await?;
                Some(training_entry(event, t, &rates))
            }
            _ => None,
        })
    }

    async fn rates(
        &self,
        txn: &DatabaseTransaction,
        model: &str,
        parameters: &mut HashMap<String, i64>,
    ) -> Result<TokenRates> {
        let params = model_parameters(txn, model, parameters).await?;
        Ok(self.prices().token_rates(model, params))
    }

    /// Writes the `entries` the ledger does not hold yet, adds their cost to each account's
    /// month, and suspends accounts whose month reached its spend limit. Returns the ids
    /// written.
    pub(crate) async fn book(
        &self,
        txn: &DatabaseTransaction,
        entries: &[Entry],
    ) -> Result<HashSet<String>> {
        let inserted = insert(txn, entries).await?;
        let spend = month_spend(entries, &inserted);
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
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get("", "account")?,
                row.try_get("", "month")?,
                int(row, "cost_nanos")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
        self.check_spend_limits(txn, &totals).await?;
        self.announce_spend(txn, entries, &inserted, &totals)
            .await?;
        Ok(inserted)
    }

    /// Announces every priced entry this batch booked (`kiln.billing.spend.recorded`), with
    /// its account's spend in the month as of that entry: the month's total after the batch,
    /// less what the batch's later entries added.
    async fn announce_spend(
        &self,
        txn: &DatabaseTransaction,
        entries: &[Entry],
        inserted: &HashSet<String>,
        totals: &[(String, String, i64)],
    ) -> Result<()> {
        let mut to_date: HashMap<(&str, &str), i64> = totals
            .iter()
            .map(|(account, month, cost)| ((account.as_str(), month.as_str()), *cost))
            .collect();
        let months: Vec<String> = entries.iter().map(|e| utc_month(e.time_micros)).collect();
        let mut events = Vec::new();
        for (e, month) in entries.iter().zip(&months).rev() {
            if e.cost_nanos == 0 || !inserted.contains(&e.id) {
                continue;
            }
            let Some(spend) = to_date.get_mut(&(e.account.as_str(), month.as_str())) else {
                continue;
            };
            let name = format!("accounts/{}", e.account);
            let body = Body::SpendRecorded(ev::SpendRecorded {
                account: name.clone(),
                amount: Some(self.prices().money(e.cost_nanos)),
                month_to_date_spend: Some(self.prices().money(*spend)),
                month: month.clone(),
                usage_event_id: e.id.clone(),
                usage_kind: e.kind.to_owned(),
                model: e.model.clone(),
                deployment: e.deployment.clone(),
            });
            *spend -= e.cost_nanos;
            events.push(
                self.outbox()
                    .event("billing.spend.recorded", &name, &name, body),
            );
        }
        events.reverse();
        self.outbox().enqueue_all(txn, &events).await?;
        Ok(())
    }
}

/// Inserts the `entries` whose id the ledger does not hold; returns the ids inserted.
async fn insert(txn: &DatabaseTransaction, entries: &[Entry]) -> Result<HashSet<String>> {
    // 1,000 rows of 18 values stay under either backend's bind-variable limit.
    let values = |e: &Entry| -> [Value; 18] {
        [
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
        ]
    };
    Ok(insert_returning(
        txn,
        "INSERT INTO billing_ledger (id, account, kind, time_micros, day, model, deployment, deployed_model, \
         accelerator_type, deployment_type, request_count, prompt_tokens, cached_prompt_tokens, completion_tokens, \
         embedding_tokens, accelerator_micros, training_tokens, cost_nanos) VALUES {rows} \
         ON CONFLICT (id) DO NOTHING RETURNING id",
        entries,
        1_000,
        values,
        "id",
    )
    .await?)
}

#[cfg(test)]
mod tests {
    use kiln_core::time::{micros_to_timestamp, utc_midnight};
    use kiln_events::new_event;
    use kiln_proto::scheduler::v1::deployment::DeploymentType;

    use super::*;

    const RATES: TokenRates = TokenRates {
        input: 100,
        cached_input: 50,
        output: 300,
        embedding: 8,
        training: 500,
    };

    fn event(body: Body, at: i64) -> Event {
        let mut event = new_event("test", "test", "accounts/acme", "x", body);
        event.time = Some(micros_to_timestamp(at));
        event
    }

    fn recorded(api: &str, deployment_type: DeploymentType) -> ev::UsageRecorded {
        ev::UsageRecorded {
            account: "accounts/acme".into(),
            model: "accounts/kiln/models/m".into(),
            api: api.into(),
            prompt_tokens: 1_000,
            cached_prompt_tokens: 400,
            completion_tokens: 20,
            embedding_input_tokens: 3_000,
            deployment_type: deployment_type as i32,
            ..Default::default()
        }
    }

    #[test]
    fn cached_prompt_tokens_cost_the_cached_rate_and_the_rest_the_input_rate() {
        let u = recorded("chat.completions", DeploymentType::Serverless);
        let e = usage_entry(&event(Body::UsageRecorded(u.clone()), 5), &u, &RATES);
        assert_eq!(
            (e.kind, e.account.as_str(), e.request_count),
            ("tokens", "acme", 1)
        );
        assert_eq!(
            (e.prompt_tokens, e.cached_prompt_tokens, e.completion_tokens),
            (1_000, 400, 20)
        );
        assert_eq!(e.embedding_tokens, 0);
        assert_eq!(e.cost_nanos, 600 * 100 + 400 * 50 + 20 * 300);
        // Without an end time of its own, usage counts when its event happened.
        assert_eq!(e.time_micros, 5);
    }

    #[test]
    fn embeddings_count_their_inputs_once_at_the_embedding_rate() {
        let u = recorded("embeddings", DeploymentType::Serverless);
        let e = usage_entry(&event(Body::UsageRecorded(u.clone()), 5), &u, &RATES);
        assert_eq!(e.kind, "embedding_tokens");
        assert_eq!(e.embedding_tokens, 3_000);
        assert_eq!((e.prompt_tokens, e.completion_tokens), (0, 0));
        assert_eq!(e.cost_nanos, 3_000 * 8);
        let infer = recorded("model_infer", DeploymentType::Serverless);
        let e = usage_entry(
            &event(Body::UsageRecorded(infer.clone()), 5),
            &infer,
            &RATES,
        );
        assert_eq!(e.kind, "requests");
    }

    #[test]
    fn training_tokens_cost_the_training_rate_and_count_at_their_end() {
        let end = utc_midnight(2026, 3, 5) + 1;
        let t = ev::TrainingUsageRecorded {
            account: "accounts/acme".into(),
            base_model: "accounts/kiln/models/big".into(),
            training_tokens: 1_000,
            end_time: Some(micros_to_timestamp(end)),
            ..Default::default()
        };
        let e = training_entry(
            &event(Body::TrainingUsageRecorded(t.clone()), 5),
            &t,
            &RATES,
        );
        assert_eq!(e.kind, "training_tokens");
        assert_eq!((e.time_micros, e.day.as_str()), (end, "2026-03-05"));
        assert_eq!(e.model, "accounts/kiln/models/big");
        assert_eq!(e.cost_nanos, 500_000);
    }

    #[test]
    fn only_new_entries_that_cost_something_add_to_a_month() {
        let march = utc_midnight(2026, 3, 31);
        let april = utc_midnight(2026, 4, 1);
        let entry = |id: &str, account: &str, at: i64, cost: i64| Entry {
            id: id.into(),
            account: account.into(),
            time_micros: at,
            cost_nanos: cost,
            ..Default::default()
        };
        let entries = [
            entry("a", "acme", march, 10),
            entry("b", "acme", april - 1, -3),
            entry("c", "acme", april, 5),
            entry("d", "initech", april, 0),
            entry("e", "globex", april, 7),
            entry("old", "acme", march, 1_000),
        ];
        let inserted: HashSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
        let spend = month_spend(&entries, &inserted);
        let key = |a: &str, m: &str| (a.to_owned(), m.to_owned());
        assert_eq!(
            spend,
            HashMap::from([
                (key("acme", "2026-03"), 7),
                (key("acme", "2026-04"), 5),
                (key("globex", "2026-04"), 7),
            ])
        );
        assert!(month_spend(&entries, &HashSet::new()).is_empty());
    }
}
