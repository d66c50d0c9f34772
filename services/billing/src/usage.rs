//! Usage reports: the ledger summed over a time range, grouped as asked. The database sums
//! at the finest grain (model, deployment, deployed model, day, accelerator type); the rows
//! asked for are merged from those. Running dedicated replicas count up to now, not only up
//! to their last accrual.

use kiln_core::Error;
use kiln_events::records::HasRecords as _;
use kiln_store::query;
use std::collections::BTreeMap;

use kiln_core::auth::Principal;
use kiln_core::names::AccountName;
use kiln_core::page::parse_filter;
use kiln_core::time::{micros_to_timestamp, now_micros, timestamp_to_micros, utc_month_start};
use kiln_proto::billing::v1::get_usage_request::GroupBy;
use kiln_proto::billing::v1::{GetUsageRequest, GetUsageResponse, UsageRow};
use kiln_proto::common::v1::AcceleratorType;

use crate::db::int;
use crate::ledger::entry::Entry;
use crate::ledger::replicas::open_replicas;
use crate::service::Billing;
use kiln_core::Result;

/// Sums at the finest grain.
#[derive(Debug, Clone, Default)]
struct Sums {
    request_count: i64,
    prompt_tokens: i64,
    cached_prompt_tokens: i64,
    completion_tokens: i64,
    embedding_tokens: i64,
    accelerator_micros: i64,
    training_tokens: i64,
    cost_nanos: i64,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        self.request_count += other.request_count;
        self.prompt_tokens += other.prompt_tokens;
        self.cached_prompt_tokens += other.cached_prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.embedding_tokens += other.embedding_tokens;
        self.accelerator_micros += other.accelerator_micros;
        self.training_tokens += other.training_tokens;
        self.cost_nanos += other.cost_nanos;
    }

    fn from_entry(e: &Entry) -> Self {
        Sums {
            request_count: e.request_count,
            prompt_tokens: e.prompt_tokens,
            cached_prompt_tokens: e.cached_prompt_tokens,
            completion_tokens: e.completion_tokens,
            embedding_tokens: e.embedding_tokens,
            accelerator_micros: e.accelerator_micros,
            training_tokens: e.training_tokens,
            cost_nanos: e.cost_nanos,
        }
    }
}

/// (model, deployment, deployed_model, day, accelerator_type)
type Key = (String, String, String, String, i32);

/// `key` with the parts `group_by` does not name left blank.
fn group_key(key: Key, group_by: &[GroupBy]) -> Key {
    let (model, deployment, deployed_model, day, accelerator_type) = key;
    let keep = |g: GroupBy| group_by.contains(&g);
    let text = |g: GroupBy, part: String| if keep(g) { part } else { String::new() };
    (
        text(GroupBy::Model, model),
        text(GroupBy::Deployment, deployment),
        text(GroupBy::DeployedModel, deployed_model),
        text(GroupBy::Day, day),
        if keep(GroupBy::AcceleratorType) {
            accelerator_type
        } else {
            0
        },
    )
}

const FILTER_FIELDS: &[&str] = &[
    "model",
    "deployment",
    "deployed_model",
    "day",
    "accelerator_type",
];

impl Billing {
    pub(crate) async fn get_usage(
        &self,
        caller: &Principal,
        request: GetUsageRequest,
    ) -> Result<GetUsageResponse> {
        // `accounts/-`: every account (platform admins).
        let account = match request.parent.as_str() {
            "accounts/-" | "-" if caller.is_privileged() => None,
            "" => Some(caller.account.clone()),
            parent => {
                let account = AccountName::parse("parent", parent)?;
                caller.check_access(&account, format!("accounts/{}", account.account))?;
                Some(account.account)
            }
        };
        let now = now_micros();
        let start = request
            .start_time
            .as_ref()
            .map(timestamp_to_micros)
            .unwrap_or_else(|| utc_month_start(now));
        let end = request
            .end_time
            .as_ref()
            .map(timestamp_to_micros)
            .unwrap_or(now);
        if end <= start {
            return Err(Error::invalid("end_time", "must be after start_time"));
        }
        let mut group_by = Vec::new();
        for (i, g) in request.group_by.iter().enumerate() {
            match GroupBy::try_from(*g) {
                Ok(GroupBy::Unspecified) | Err(_) => {
                    return Err(Error::invalid(
                        format!("group_by[{i}]"),
                        "must be MODEL, DEPLOYMENT, DAY, ACCELERATOR_TYPE or DEPLOYED_MODEL",
                    ));
                }
                Ok(g) if !group_by.contains(&g) => group_by.push(g),
                Ok(_) => {}
            }
        }
        let terms = parse_filter(&request.filter, FILTER_FIELDS)?;

        let mut fine: BTreeMap<Key, Sums> = BTreeMap::new();
        let (scope, mut values) = match &account {
            Some(a) => ("account = ? AND ", vec![a.clone().into()]),
            None => ("", vec![]),
        };
        values.extend([start.into(), end.into()]);
        let sum = |c: &str| format!("CAST(COALESCE(SUM({c}), 0) AS BIGINT) AS {c}");
        let rows = query(
            self.db(),
            &format!(
                "SELECT model, deployment, deployed_model, day, accelerator_type, {}, {}, {}, {}, {}, {}, {}, {} \
                 FROM billing_ledger WHERE {scope}time_micros >= ? AND time_micros < ? \
                 GROUP BY model, deployment, deployed_model, day, accelerator_type",
                sum("request_count"),
                sum("prompt_tokens"),
                sum("cached_prompt_tokens"),
                sum("completion_tokens"),
                sum("embedding_tokens"),
                sum("accelerator_micros"),
                sum("training_tokens"),
                sum("cost_nanos"),
            ),
            values,
        )
        .await?;
        for row in rows {
            let key: Key = (
                row.try_get("", "model")?,
                row.try_get("", "deployment")?,
                row.try_get("", "deployed_model")?,
                row.try_get("", "day")?,
                row.try_get("", "accelerator_type")?,
            );
            let sums = Sums {
                request_count: int(&row, "request_count")?,
                prompt_tokens: int(&row, "prompt_tokens")?,
                cached_prompt_tokens: int(&row, "cached_prompt_tokens")?,
                completion_tokens: int(&row, "completion_tokens")?,
                embedding_tokens: int(&row, "embedding_tokens")?,
                accelerator_micros: int(&row, "accelerator_micros")?,
                training_tokens: int(&row, "training_tokens")?,
                cost_nanos: int(&row, "cost_nanos")?,
            };
            fine.entry(key).or_default().add(&sums);
        }
        // Running replicas: the time since their last accrual, inside the range.
        let until = end.min(now);
        for open in open_replicas(self.db(), None).await? {
            if account.as_ref().is_some_and(|a| *a != open.account) {
                continue;
            }
            let from = open.billed_until.max(start);
            if from >= until {
                continue;
            }
            for piece in open.pieces(self.prices(), from, until) {
                let key: Key = (
                    piece.model.clone(),
                    piece.deployment.clone(),
                    String::new(),
                    piece.day.clone(),
                    piece.accelerator_type,
                );
                fine.entry(key).or_default().add(&Sums::from_entry(&piece));
            }
        }

        let mut grouped: BTreeMap<Key, Sums> = BTreeMap::new();
        let mut totals = Sums::default();
        'rows: for (key, sums) in fine {
            for term in &terms {
                let value = match term.field.as_str() {
                    "model" => key.0.clone(),
                    "deployment" => key.1.clone(),
                    "deployed_model" => key.2.clone(),
                    "day" => key.3.clone(),
                    _ => AcceleratorType::try_from(key.4)
                        .map(|a| a.as_str_name().to_owned())
                        .unwrap_or_default(),
                };
                if (value == term.value) == term.negated {
                    continue 'rows;
                }
            }
            totals.add(&sums);
            grouped
                .entry(group_key(key, &group_by))
                .or_default()
                .add(&sums);
        }
        let rows = if group_by.is_empty() {
            vec![self.usage_row(Key::default(), &totals)]
        } else {
            grouped
                .into_iter()
                .map(|(key, sums)| self.usage_row(key, &sums))
                .collect()
        };
        Ok(GetUsageResponse {
            rows,
            totals: Some(self.usage_row(Key::default(), &totals)),
            start_time: Some(micros_to_timestamp(start)),
            end_time: Some(micros_to_timestamp(end)),
        })
    }

    fn usage_row(&self, key: Key, sums: &Sums) -> UsageRow {
        let (model, deployment, deployed_model, day, accelerator_type) = key;
        UsageRow {
            model,
            deployment,
            day,
            accelerator_type,
            deployed_model,
            request_count: sums.request_count,
            prompt_tokens: sums.prompt_tokens,
            cached_prompt_tokens: sums.cached_prompt_tokens,
            completion_tokens: sums.completion_tokens,
            embedding_tokens: sums.embedding_tokens,
            gpu_seconds: sums.accelerator_micros as f64 / 1e6,
            training_tokens: sums.training_tokens,
            cost: Some(self.prices().money(sums.cost_nanos)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_keeps_only_the_parts_asked_for() {
        let key: Key = ("m".into(), "d".into(), "dm".into(), "2026-03-05".into(), 3);
        assert_eq!(group_key(key.clone(), &[]), Key::default());
        assert_eq!(
            group_key(key.clone(), &[GroupBy::Day, GroupBy::AcceleratorType]),
            (
                String::new(),
                String::new(),
                String::new(),
                "2026-03-05".into(),
                3
            )
        );
        assert_eq!(
            group_key(key.clone(), &[GroupBy::Model]),
            ("m".into(), String::new(), String::new(), String::new(), 0)
        );
        assert_eq!(
            group_key(
                key.clone(),
                &[GroupBy::Model, GroupBy::Deployment, GroupBy::DeployedModel]
            ),
            ("m".into(), "d".into(), "dm".into(), String::new(), 0)
        );
    }
}
