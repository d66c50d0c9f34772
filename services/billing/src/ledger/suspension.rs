//! Spend limits. An account whose month's spend reaches its monthly spend limit is suspended
//! (MONTHLY_SPEND_LIMIT_EXCEEDED: a row in `billing_suspensions` and an
//! `account.suspended` event); a new month, or a limit raised above the spend, lifts it
//! (`account.unsuspended`). The system account is never suspended.

use kiln_events::records::HasRecords as _;
use kiln_store::{execute, query};
use std::collections::HashMap;

use kiln_core::names::SYSTEM_ACCOUNT;
use kiln_core::time::{now_micros, utc_month};
use kiln_events::Body;
use kiln_proto::events::v1 as ev;
use kiln_proto::identity::v1::account::SuspendState;
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseTransaction, Value};

use super::replicas::open_replicas;
use crate::db::{first_int, int};
use crate::prices::{NANOS_PER_UNIT, format_nanos};
use crate::quota_rules::QuotaKind;
use crate::service::Billing;
use kiln_core::Result;

/// Where a month's spend stands against its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// The system account: no limit applies.
    Exempt,
    Under,
    /// The spend reached the limit: the account is to be suspended.
    Reached,
}

/// Where `account`'s month stands: `month_spend` nano-units against a `limit` of whole
/// currency units (reaching it counts; a limit of 0 is reached at once).
pub(crate) fn standing(account: &str, month_spend: i64, limit: i64) -> Standing {
    if account == SYSTEM_ACCOUNT {
        Standing::Exempt
    } else if month_spend < limit.saturating_mul(NANOS_PER_UNIT) {
        Standing::Under
    } else {
        Standing::Reached
    }
}

/// Why an account was suspended, as its event and its row say.
fn suspension_reason(month_spend: i64, limit: i64, currency: &str) -> String {
    format!(
        "the month's spend ({} {currency}) reached the monthly spend limit of {limit} {currency}",
        format_nanos(month_spend),
    )
}

/// The accounts whose spend of `this_month` the `totals` (account, month, spend) moved,
/// with that spend; other months and the system account are past checking.
fn spends_to_check(totals: &[(String, String, i64)], this_month: &str) -> Vec<(String, i64)> {
    totals
        .iter()
        .filter(|(account, month, _)| month == this_month && account != SYSTEM_ACCOUNT)
        .map(|(account, _, spend)| (account.clone(), *spend))
        .collect()
}

impl Billing {
    /// Suspends the accounts whose month's spend, now `totals` (account, month, spend),
    /// reached their limit (stored, else the default), in `txn`.
    pub(crate) async fn check_spend_limits(
        &self,
        txn: &DatabaseTransaction,
        totals: &[(String, String, i64)],
    ) -> Result<()> {
        let current = spends_to_check(totals, &utc_month(now_micros()));
        if current.is_empty() {
            return Ok(());
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
            if standing(&account, month_spend, limit) == Standing::Reached {
                self.suspend(txn, &account, month_spend, limit).await?;
            }
        }
        Ok(())
    }

    /// Applies `account`'s new monthly spend `limit` to the month so far: lowered under its
    /// spend, the account is suspended now; raised above it, a spend-limit suspension lifts.
    pub(crate) async fn spend_limit_changed(
        &self,
        txn: &DatabaseTransaction,
        account: &str,
        limit: i64,
        now: i64,
    ) -> Result<()> {
        lock_month_spend(txn, account, now).await?;
        let spend = self.month_spend_nanos(txn, account, now).await?;
        match standing(account, spend, limit) {
            Standing::Exempt => {}
            Standing::Under => {
                self.lift_suspension(txn, account, "the monthly spend limit was raised")
                    .await?;
            }
            Standing::Reached => self.suspend(txn, account, spend, limit).await?,
        }
        Ok(())
    }

    /// Suspends `account` (MONTHLY_SPEND_LIMIT_EXCEEDED) unless it is suspended already: a
    /// row here and its event, in `txn`.
    async fn suspend(
        &self,
        txn: &DatabaseTransaction,
        account: &str,
        month_spend: i64,
        limit: i64,
    ) -> Result<()> {
        let now = now_micros();
        let reason = suspension_reason(month_spend, limit, &self.prices().currency_code);
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
        if inserted == 0 {
            return Ok(());
        }
        tracing::info!(account, %reason, "account suspended");
        self.announce(txn, account, "billing.account.suspended", |account| {
            Body::AccountSuspended(ev::AccountSuspended {
                account,
                suspend_state: SuspendState::MonthlySpendLimitExceeded as i32,
                reason,
            })
        })
        .await
    }

    /// Lifts `account`'s spend-limit suspension, with its event, in `txn` (when it has one).
    async fn lift_suspension(
        &self,
        txn: &DatabaseTransaction,
        account: &str,
        why: &str,
    ) -> Result<()> {
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
            return Ok(());
        }
        tracing::info!(account, why, "account unsuspended");
        self.announce(txn, account, "billing.account.unsuspended", |account| {
            Body::AccountUnsuspended(ev::AccountUnsuspended {
                account,
                previous_suspend_state: SuspendState::MonthlySpendLimitExceeded as i32,
            })
        })
        .await
    }

    /// Enqueues the event `subject` about `account`, in `txn`; `body` gets its full name.
    async fn announce(
        &self,
        txn: &DatabaseTransaction,
        account: &str,
        subject: &str,
        body: impl FnOnce(String) -> Body,
    ) -> Result<()> {
        let name = format!("accounts/{account}");
        let event = self
            .outbox()
            .event(subject, &name, &name, body(name.clone()));
        self.outbox().enqueue(txn, &event).await?;
        Ok(())
    }

    /// Lifts the spend-limit suspensions of months before the one holding `now`.
    pub(crate) async fn lift_ended_months(
        &self,
        txn: &DatabaseTransaction,
        now: i64,
    ) -> Result<()> {
        let ended = query(
            txn,
            "SELECT account FROM billing_suspensions WHERE month < ? AND suspend_state = ?",
            vec![
                utc_month(now).into(),
                (SuspendState::MonthlySpendLimitExceeded as i32).into(),
            ],
        )
        .await?;
        for row in ended {
            let account: String = row.try_get("", "account")?;
            self.lift_suspension(txn, &account, "a new month began")
                .await?;
        }
        Ok(())
    }

    /// The spend of the month holding `now`, running replicas' unbilled time included.
    pub(crate) async fn month_spend_nanos<C: ConnectionTrait>(
        &self,
        conn: &C,
        account: &str,
        now: i64,
    ) -> Result<i64> {
        let rows = query(
            conn,
            "SELECT cost_nanos FROM billing_monthly_spend WHERE account = ? AND month = ?",
            vec![account.into(), utc_month(now).into()],
        )
        .await?;
        let booked = first_int(&rows, "cost_nanos")?;
        let unbilled: i64 = open_replicas(conn, None)
            .await?
            .iter()
            .filter(|r| r.account == account)
            .map(|r| r.unbilled_cost(self.prices(), now))
            .sum();
        Ok(booked + unbilled)
    }
}

/// `account`'s suspension (a `SuspendState` value), if it has one.
pub(crate) async fn suspend_state<C: ConnectionTrait>(
    conn: &C,
    account: &str,
) -> Result<Option<i32>> {
    Ok(query(
        conn,
        "SELECT suspend_state FROM billing_suspensions WHERE account = ?",
        vec![account.into()],
    )
    .await?
    .first()
    .map(|r| r.try_get::<i32>("", "suspend_state"))
    .transpose()?)
}

/// Holds the month's spend row of `account` until `txn` ends, so a usage booking that read
/// the old limit cannot suspend the account after this transaction lifted its suspension
/// (PostgreSQL, read committed: the booking upserts this row first, so one waits for the
/// other). SQLite write transactions are serial already.
async fn lock_month_spend(txn: &DatabaseTransaction, account: &str, now: i64) -> Result<()> {
    if txn.get_database_backend() == DatabaseBackend::Postgres {
        query(
            txn,
            "SELECT cost_nanos FROM billing_monthly_spend WHERE account = ? AND month = ? FOR UPDATE",
            vec![account.into(), utc_month(now).into()],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const USD: i64 = NANOS_PER_UNIT;

    #[test]
    fn reaching_the_limit_suspends_and_one_nano_under_does_not() {
        assert_eq!(standing("acme", 10 * USD, 10), Standing::Reached);
        assert_eq!(standing("acme", 10 * USD + 1, 10), Standing::Reached);
        assert_eq!(standing("acme", 10 * USD - 1, 10), Standing::Under);
        assert_eq!(standing("acme", 0, 10), Standing::Under);
        // A limit of 0 allows nothing; a huge one does not overflow.
        assert_eq!(standing("acme", 0, 0), Standing::Reached);
        assert_eq!(standing("acme", i64::MAX - 1, i64::MAX), Standing::Under);
        // Corrections can leave a month negative.
        assert_eq!(standing("acme", -USD, 0), Standing::Under);
    }

    #[test]
    fn the_system_account_has_no_limit() {
        assert_eq!(standing(SYSTEM_ACCOUNT, 100 * USD, 1), Standing::Exempt);
        assert_eq!(standing(SYSTEM_ACCOUNT, 0, 1), Standing::Exempt);
    }

    #[test]
    fn only_this_months_spend_of_a_customer_is_checked() {
        let totals = [
            ("acme".to_owned(), "2026-03".to_owned(), 5),
            ("acme".to_owned(), "2026-02".to_owned(), 7),
            (SYSTEM_ACCOUNT.to_owned(), "2026-03".to_owned(), 9),
            ("globex".to_owned(), "2026-03".to_owned(), 11),
        ];
        assert_eq!(
            spends_to_check(&totals, "2026-03"),
            [("acme".to_owned(), 5), ("globex".to_owned(), 11)]
        );
        assert_eq!(spends_to_check(&totals, "2026-04"), []);
    }

    #[test]
    fn the_reason_names_the_spend_and_the_limit() {
        assert_eq!(
            suspension_reason(12_500_000_000, 10, "USD"),
            "the month's spend (12.5 USD) reached the monthly spend limit of 10 USD"
        );
    }
}
