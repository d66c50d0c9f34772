//! Replica time. A running dedicated replica is billed from the moment it is ready, in
//! pieces: by the accrual loop while it runs and by `replica.stopped` for the rest, each piece
//! within one UTC day and keyed by the replica and its start, so no accelerator-second is
//! billed twice. `billing_replicas` holds the running ones and how far each is billed.

use kiln_core::time::{MICROS_PER_DAY, utc_day};
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::deployment::DeploymentType;
use kiln_store::{execute, query};
use sea_orm::{ConnectionTrait, DatabaseTransaction};

use super::entry::{Entry, micros};
use crate::db::int;
use crate::prices::Prices;
use kiln_core::Result;
use kiln_core::names::account_of;

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

/// Whether a deployment of `deployment_type` is billed by its replicas' time (dedicated)
/// rather than by its tokens, which it then reports only.
pub(crate) fn billed_by_time(deployment_type: i32) -> bool {
    deployment_type == DeploymentType::Dedicated as i32
}

/// `[from, to)` cut at each UTC midnight: the `(start, end)` of each piece, in order; none
/// when the span is empty or negative.
pub(crate) fn day_pieces(from: i64, to: i64) -> Vec<(i64, i64)> {
    let mut pieces = Vec::new();
    let mut start = from;
    while start < to {
        let midnight = (start.div_euclid(MICROS_PER_DAY) + 1) * MICROS_PER_DAY;
        let end = to.min(midnight);
        pieces.push((start, end));
        start = end;
    }
    pieces
}

impl OpenReplica {
    /// A replica whose start this ledger never saw (it began before the ledger): the stop
    /// event carries all there is to bill.
    fn unseen(r: &ev::ReplicaStopped) -> Self {
        Self {
            replica: r.replica.clone(),
            account: account_of(&r.deployment).to_owned(),
            deployment: r.deployment.clone(),
            model: r.model.clone(),
            accelerator_type: r.accelerator_type,
            accelerator_count: i64::from(r.accelerator_count.max(1)),
            billed_until: 0,
        }
    }

    /// The entries for `[from, to)` of this replica's time, one per UTC day it spans; a
    /// negative span (the replica stopped before time already billed, e.g. at a lost node's
    /// last heartbeat) is one correcting entry.
    pub(crate) fn pieces(&self, prices: &Prices, from: i64, to: i64) -> Vec<Entry> {
        let priced = |id: String, time_micros: i64, span: i64| {
            let accelerator_micros = span * self.accelerator_count;
            Entry {
                id,
                account: self.account.clone(),
                kind: "accelerator_time",
                time_micros,
                day: utc_day(time_micros),
                model: self.model.clone(),
                deployment: self.deployment.clone(),
                accelerator_type: self.accelerator_type,
                deployment_type: DeploymentType::Dedicated as i32,
                accelerator_micros,
                cost_nanos: prices.accelerator_cost(self.accelerator_type, accelerator_micros),
                ..Default::default()
            }
        };
        if to < from {
            return vec![priced(
                format!("{}@{from}~{to}", self.replica),
                to,
                to - from,
            )];
        }
        day_pieces(from, to)
            .into_iter()
            .map(|(start, end)| priced(format!("{}@{start}", self.replica), start, end - start))
            .collect()
    }

    /// What its time since the last accrual up to `now` costs (nothing billed yet).
    pub(crate) fn unbilled_cost(&self, prices: &Prices, now: i64) -> i64 {
        if self.billed_until >= now {
            return 0;
        }
        prices.accelerator_cost(
            self.accelerator_type,
            (now - self.billed_until) * self.accelerator_count,
        )
    }
}

/// Running dedicated replicas (one, or all).
pub(crate) async fn open_replicas<C: ConnectionTrait>(
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

/// Records a replica that became ready at `start` (once: a replayed start changes nothing).
pub(crate) async fn open(
    txn: &DatabaseTransaction,
    r: &ev::ReplicaStarted,
    start: i64,
) -> Result<()> {
    execute(
        txn,
        "INSERT INTO billing_replicas (replica, account, deployment, model, accelerator_type, accelerator_count, start_micros, billed_until) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (replica) DO NOTHING",
        vec![
            r.replica.clone().into(),
            account_of(&r.deployment).to_owned().into(),
            r.deployment.clone().into(),
            r.model.clone().into(),
            r.accelerator_type.into(),
            i64::from(r.accelerator_count.max(1)).into(),
            start.into(),
            start.into(),
        ],
    )
    .await?;
    Ok(())
}

/// The rest of a stopped replica's time, from what was billed of it up to `stop`; its row
/// goes. The row is taken only as it was read (an accrual that moved it meanwhile makes this
/// read again), so a piece is never billed by both.
pub(crate) async fn close(
    txn: &DatabaseTransaction,
    prices: &Prices,
    r: &ev::ReplicaStopped,
    stop: i64,
) -> Result<Vec<Entry>> {
    for _ in 0..8 {
        let Some(open) = open_replicas(txn, Some(&r.replica)).await?.pop() else {
            let whole = OpenReplica::unseen(r);
            return Ok(whole.pieces(prices, micros(&r.start_time, stop), stop));
        };
        let taken = execute(
            txn,
            "DELETE FROM billing_replicas WHERE replica = ? AND billed_until = ?",
            vec![r.replica.clone().into(), open.billed_until.into()],
        )
        .await?;
        if taken == 1 {
            return Ok(open.pieces(prices, open.billed_until, stop));
        }
    }
    Err(crate::Error::Aborted(format!(
        "replica {} kept moving while it was being closed; the batch will be retried",
        r.replica
    )))
}

/// Every running replica's time up to `now` not billed yet; each row moves to `now` as its
/// pieces are taken (only as it was read, so a concurrent close bills the rest).
pub(crate) async fn accrue(
    txn: &DatabaseTransaction,
    prices: &Prices,
    now: i64,
) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for open in open_replicas(txn, None).await? {
        if open.billed_until >= now {
            continue;
        }
        let moved = execute(
            txn,
            "UPDATE billing_replicas SET billed_until = ? WHERE replica = ? AND billed_until = ?",
            vec![
                now.into(),
                open.replica.clone().into(),
                open.billed_until.into(),
            ],
        )
        .await?;
        if moved == 1 {
            entries.extend(open.pieces(prices, open.billed_until, now));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use kiln_core::time::utc_midnight;
    use kiln_proto::common::v1::AcceleratorType;

    use super::*;
    use crate::config::BillingConfig;

    const SECOND: i64 = 1_000_000;

    fn h100s(count: i64, billed_until: i64) -> OpenReplica {
        OpenReplica {
            replica: "accounts/acme/deployments/d/replicas/r".into(),
            account: "acme".into(),
            deployment: "accounts/acme/deployments/d".into(),
            model: "accounts/acme/models/m".into(),
            accelerator_type: AcceleratorType::NvidiaH10080gb as i32,
            accelerator_count: count,
            billed_until,
        }
    }

    fn prices() -> Prices {
        BillingConfig::default().prices().unwrap()
    }

    #[test]
    fn dedicated_deployments_are_billed_by_time() {
        assert!(billed_by_time(DeploymentType::Dedicated as i32));
        assert!(!billed_by_time(DeploymentType::Serverless as i32));
        assert!(!billed_by_time(DeploymentType::Unspecified as i32));
    }

    #[test]
    fn time_is_cut_at_each_utc_midnight() {
        let midnight = utc_midnight(2026, 3, 5);
        assert_eq!(
            day_pieces(midnight - 60 * SECOND, midnight + 60 * SECOND),
            [
                (midnight - 60 * SECOND, midnight),
                (midnight, midnight + 60 * SECOND)
            ]
        );
        // A span that starts or ends at midnight is not cut there.
        assert_eq!(
            day_pieces(midnight, midnight + MICROS_PER_DAY),
            [(midnight, midnight + MICROS_PER_DAY)]
        );
        assert_eq!(
            day_pieces(midnight - SECOND, midnight),
            [(midnight - SECOND, midnight)]
        );
        // Two days and a bit: three pieces, covering it once.
        let pieces = day_pieces(midnight - SECOND, midnight + 2 * MICROS_PER_DAY);
        assert_eq!(pieces.len(), 3);
        assert!(pieces.windows(2).all(|w| w[0].1 == w[1].0));
        assert_eq!(
            pieces[2],
            (midnight + MICROS_PER_DAY, midnight + 2 * MICROS_PER_DAY)
        );
        assert_eq!(day_pieces(midnight, midnight), []);
        assert_eq!(day_pieces(midnight, midnight - SECOND), []);
    }

    #[test]
    fn pieces_are_keyed_by_their_start_and_priced_per_piece() {
        let prices = prices();
        let midnight = utc_midnight(2026, 3, 5);
        let replica = h100s(2, 0);
        let pieces = replica.pieces(&prices, midnight - 60 * SECOND, midnight + 30 * SECOND);
        let ids: Vec<&str> = pieces.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                format!("{}@{}", replica.replica, midnight - 60 * SECOND),
                format!("{}@{midnight}", replica.replica)
            ]
        );
        assert_eq!(pieces[0].day, "2026-03-04");
        assert_eq!(pieces[1].day, "2026-03-05");
        assert_eq!(pieces[1].time_micros, midnight);
        // Two H100s: accelerator time counts both; $5.80 an hour each.
        assert_eq!(pieces[0].accelerator_micros, 120 * SECOND);
        assert_eq!(pieces[1].accelerator_micros, 60 * SECOND);
        assert_eq!(pieces[0].cost_nanos, 193_333_333);
        assert_eq!(pieces[1].cost_nanos, 96_666_667);
        assert!(pieces.iter().all(|e| e.account == "acme"
            && e.kind == "accelerator_time"
            && e.deployment_type == DeploymentType::Dedicated as i32));
    }

    #[test]
    fn time_billed_past_the_stop_is_given_back_in_one_entry() {
        let prices = prices();
        let replica = h100s(1, 100 * SECOND);
        let pieces = replica.pieces(&prices, 100 * SECOND, 40 * SECOND);
        assert_eq!(pieces.len(), 1);
        let correction = &pieces[0];
        assert_eq!(
            correction.id,
            format!("{}@{}~{}", replica.replica, 100 * SECOND, 40 * SECOND)
        );
        assert_eq!(correction.time_micros, 40 * SECOND);
        assert_eq!(correction.accelerator_micros, -60 * SECOND);
        assert_eq!(correction.cost_nanos, -96_666_667);
    }

    #[test]
    fn only_time_after_the_last_accrual_is_unbilled() {
        let prices = prices();
        let replica = h100s(2, 100 * SECOND);
        assert_eq!(replica.unbilled_cost(&prices, 100 * SECOND), 0);
        assert_eq!(replica.unbilled_cost(&prices, 50 * SECOND), 0);
        assert_eq!(replica.unbilled_cost(&prices, 160 * SECOND), 193_333_333);
    }
}
