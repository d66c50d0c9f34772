//! Quotas: every account has each one, at the configured default until an update stores its
//! own value. Use is counted from what billing already knows: dedicated deployments (from
//! the scheduler's events; a deployment holds `max_replica_count × accelerator_count` of its
//! accelerator type, the most its autoscaler can reach, so scaling within it never exceeds
//! the quota), the ledger (requests and tokens of the last minute, the month's spend).

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::grpc::Update;
use kiln_core::listing::{Field, Fields, Getter, Kind, ListRequest, Listing, Value, time_value};
use kiln_core::names::{AccountName, SYSTEM_ACCOUNT};
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::Body;
use kiln_events::records::HasRecords as _;
use kiln_proto::billing::v1::{CheckQuotaResponse, Quota};
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::deployment::DeploymentType;
use kiln_store::{execute, query};
use sea_orm::ConnectionTrait;

use crate::db::{begin_write, first_int, int};
use crate::ledger::deployments::{accelerators_held, active_deployments};
use crate::ledger::suspension::suspend_state;
use crate::quota_rules::{Limits, QuotaKind, check, parse_quota_name, updated_limits};
use crate::service::Billing;
use kiln_core::Result;

impl Billing {
    /// The limits of `kind` for `account`: stored, else the defaults.
    pub(crate) async fn quota<C: ConnectionTrait>(
        &self,
        conn: &C,
        account: &str,
        kind: &QuotaKind,
    ) -> Result<Limits> {
        let rows = query(
            conn,
            "SELECT value, max_value, create_time, update_time FROM billing_quotas WHERE account = ? AND quota = ?",
            vec![account.into(), kind.id().into()],
        )
        .await?;
        Ok(match rows.first() {
            Some(row) => Limits {
                value: int(row, "value")?,
                max_value: int(row, "max_value")?,
                create_time: int(row, "create_time")?,
                update_time: int(row, "update_time")?,
            },
            None => Limits::default_of(kind.default_value(&self.config().quotas)),
        })
    }

    /// Every quota's value for `account` (quota ID, value), in one query: what enforcing
    /// services read (the scheduler counts use itself; inference nodes meter it).
    pub async fn quota_values(&self, account: &str) -> Result<Vec<(String, i64)>> {
        kiln_core::names::validate_id("account", account)?;
        let stored: std::collections::HashMap<String, i64> = query(
            self.db(),
            "SELECT quota, value FROM billing_quotas WHERE account = ?",
            vec![account.into()],
        )
        .await?
        .iter()
        .map(|row| Ok((row.try_get::<String>("", "quota")?, int(row, "value")?)))
        .collect::<Result<_>>()?;
        Ok(QuotaKind::all()
            .iter()
            .map(|kind| {
                let id = kind.id();
                let value = stored
                    .get(&id)
                    .copied()
                    .unwrap_or_else(|| kind.default_value(&self.config().quotas));
                (id, value)
            })
            .collect())
    }

    /// What `account` uses of `kind` now, in the quota's unit.
    pub(crate) async fn quota_usage<C: ConnectionTrait>(
        &self,
        conn: &C,
        account: &str,
        kind: &QuotaKind,
    ) -> Result<f64> {
        let now = now_micros();
        let minute_ago = now - 60_000_000;
        Ok(match kind {
            QuotaKind::Accelerator(a) => accelerators_held(conn, account, *a as i32).await? as f64,
            QuotaKind::Deployments => active_deployments(conn, account).await? as f64,
            QuotaKind::ServerlessRpm | QuotaKind::ServerlessTpm => {
                let column = if *kind == QuotaKind::ServerlessRpm {
                    "request_count"
                } else {
                    "prompt_tokens + completion_tokens + embedding_tokens"
                };
                let rows = query(
                    conn,
                    &format!(
                        "SELECT CAST(COALESCE(SUM({column}), 0) AS BIGINT) AS used FROM billing_ledger \
                         WHERE account = ? AND time_micros >= ? AND deployment_type <> ? AND kind <> ?"
                    ),
                    vec![
                        account.into(),
                        minute_ago.into(),
                        (DeploymentType::Dedicated as i32).into(),
                        "accelerator_time".into(),
                    ],
                )
                .await?;
                first_int(&rows, "used")? as f64
            }
            QuotaKind::FineTuningJobs => 0.0,
            QuotaKind::MonthlySpend => {
                self.month_spend_nanos(conn, account, now).await? as f64 / 1e9
            }
        })
    }

    async fn quota_resource<C: ConnectionTrait>(
        &self,
        conn: &C,
        account: &str,
        kind: &QuotaKind,
    ) -> Result<Quota> {
        let limits = self.quota(conn, account, kind).await?;
        let usage = self.quota_usage(conn, account, kind).await?;
        let time = |t: i64| (t > 0).then(|| micros_to_timestamp(t));
        Ok(Quota {
            name: format!("accounts/{account}/quotas/{}", kind.id()),
            value: limits.value,
            max_value: limits.max_value,
            usage,
            unit: kind.unit().into(),
            create_time: time(limits.create_time),
            update_time: time(limits.update_time),
        })
    }

    pub(crate) async fn get_quota(&self, caller: &Principal, name: &str) -> Result<Quota> {
        let (account, kind) = parse_quota_name("name", name, Some(&caller.account))?;
        if !caller.can_access(&account) {
            return Err(Error::not_found(name));
        }
        self.quota_resource(self.db(), &account, &kind).await
    }

    pub async fn list_quotas(
        &self,
        caller: &Principal,
        request: &ListRequest,
    ) -> Result<Listing<Quota>> {
        let account = if request.parent.is_empty() {
            AccountName::new(caller.account.clone())
        } else {
            AccountName::parse("parent", &request.parent)?
        };
        caller.check_access(&account, format!("accounts/{}", account.account))?;
        let query = QUOTA_FIELDS.query(self.pages(), request, &account.account)?;
        let mut quotas = Vec::new();
        for kind in QuotaKind::all() {
            quotas.push(
                self.quota_resource(self.db(), &account.account, &kind)
                    .await?,
            );
        }
        Ok(query.page_of(self.pages(), quotas))
    }

    /// Sets a quota's value (up to its max_value; platform admins also set max_value and go
    /// beyond it). Raising the monthly spend limit above the month's spend lifts a
    /// spend-limit suspension.
    pub(crate) async fn update_quota(
        &self,
        caller: &Principal,
        request: Update<Quota>,
    ) -> Result<Quota> {
        // Without a mask, the value changes (the one field a caller usually sets).
        let paths = request.paths(&[("value", true)]);
        let quota = request.resource;
        let (account, kind) = parse_quota_name("quota.name", &quota.name, Some(&caller.account))?;
        if !caller.can_access(&account) {
            return Err(Error::not_found(&quota.name));
        }
        let txn = begin_write(self.db()).await?;
        let before = self.quota(&txn, &account, &kind).await?;
        let after = updated_limits(before, &quota, &paths, caller.is_privileged())?;
        let now = now_micros();
        let create_time = if before.create_time > 0 {
            before.create_time
        } else {
            now
        };
        execute(
            &txn,
            "INSERT INTO billing_quotas (account, quota, value, max_value, create_time, update_time) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (account, quota) DO UPDATE SET value = excluded.value, max_value = excluded.max_value, update_time = excluded.update_time",
            vec![
                account.clone().into(),
                kind.id().into(),
                after.value.into(),
                after.max_value.into(),
                create_time.into(),
                now.into(),
            ],
        )
        .await?;
        if kind == QuotaKind::MonthlySpend {
            self.spend_limit_changed(&txn, &account, after.value, now)
                .await?;
        }
        let resource = self.quota_resource(&txn, &account, &kind).await?;
        let event = self.outbox().event(
            "billing.quota.updated",
            &account,
            &resource.name,
            Body::QuotaUpdated(ev::QuotaUpdated {
                quota: Some(resource.clone()),
                update_mask: Some(prost_types::FieldMask { paths }),
                previous_value: before.value,
            }),
        );
        self.outbox().enqueue(&txn, &event).await?;
        self.outbox().commit(txn).await?;
        Ok(resource)
    }

    /// Whether `account` may use `requested` more of `quota` (answers; reserves nothing).
    pub(crate) async fn check_quota(
        &self,
        caller: &Principal,
        account: &str,
        quota: &str,
        requested: f64,
    ) -> Result<CheckQuotaResponse> {
        if !caller.has(kiln_core::auth::Role::Service)
            && !caller.has(kiln_core::auth::Role::PlatformAdmin)
        {
            return Err(Error::PermissionDenied(
                "CheckQuota is for Kiln services".into(),
            ));
        }
        let account = AccountName::parse("account", account)?.account;
        let (_, kind) = parse_quota_name("quota", quota, Some(&account))?;
        if !requested.is_finite() || requested < 0.0 {
            return Err(Error::invalid("requested", "must be a non-negative number"));
        }
        let resource = self.quota_resource(self.db(), &account, &kind).await?;
        // The system account is never suspended.
        let suspension = if account == SYSTEM_ACCOUNT {
            None
        } else {
            suspend_state(self.db(), &account).await?
        };
        Ok(check(&account, &kind, resource, requested, suspension))
    }
}

/// The fields a quota list filters on and orders by.
static QUOTA_FIELDS: Fields<Getter<Quota>> = Fields {
    collection: "quotas",
    fields: &[
        Field::both("name", |q| Value::Text(q.name.clone()), Kind::Name),
        Field::filter("unit", |q| Value::Text(q.unit.clone()), Kind::Text),
        Field::order("update_time", |q| time_value(&q.update_time)),
    ],
    tie_break: |q| Value::Text(q.name.clone()),
};
