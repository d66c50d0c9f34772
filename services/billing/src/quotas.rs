//! Quotas: every account has each one, at the configured default until an update stores its
//! own value. Use is counted from what billing already knows: dedicated deployments (from
//! the scheduler's events; a deployment holds `max_replica_count × accelerator_count` of its
//! accelerator type, the most its autoscaler can reach, so scaling within it never exceeds
//! the quota), the ledger (requests and tokens of the last minute, the month's spend).

use kiln_core::Error as ApiError;
use kiln_core::auth::Principal;
use kiln_core::names::{AccountName, SYSTEM_ACCOUNT};
use kiln_core::page::{Page, mask_paths, parse_filter, parse_order_by};
use kiln_core::time::{micros_to_timestamp, now_micros, utc_month};
use kiln_events::{Body, new_event};
use kiln_proto::billing::v1::{CheckQuotaResponse, Quota};
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::deployment::DeploymentType;
use kiln_store::listing::Listing;
use sea_orm::ConnectionTrait;

use crate::db::{execute, int, query};
use crate::error::Result;
use crate::service::{Billing, SOURCE};

/// The accelerator types with a quota, in listing order.
const ACCELERATORS: [AcceleratorType; 5] = [
    AcceleratorType::NvidiaA10080gb,
    AcceleratorType::NvidiaH10080gb,
    AcceleratorType::NvidiaH200141gb,
    AcceleratorType::AmdMi300x192gb,
    AcceleratorType::Cpu,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaKind {
    /// Accelerators of one type held by dedicated deployments.
    Accelerator(AcceleratorType),
    Deployments,
    ServerlessRpm,
    ServerlessTpm,
    FineTuningJobs,
    MonthlySpend,
}

impl QuotaKind {
    pub fn all() -> Vec<QuotaKind> {
        let mut all: Vec<QuotaKind> = ACCELERATORS.iter().map(|a| Self::Accelerator(*a)).collect();
        all.extend([
            Self::Deployments,
            Self::ServerlessRpm,
            Self::ServerlessTpm,
            Self::FineTuningJobs,
            Self::MonthlySpend,
        ]);
        all
    }

    /// The quota ID, e.g. `accelerator-nvidia-h100-80gb`.
    pub fn id(&self) -> String {
        match self {
            Self::Accelerator(a) => {
                format!(
                    "accelerator-{}",
                    a.as_str_name().to_lowercase().replace('_', "-")
                )
            }
            Self::Deployments => "deployments".into(),
            Self::ServerlessRpm => "serverless-inference-rpm".into(),
            Self::ServerlessTpm => "serverless-inference-tpm".into(),
            Self::FineTuningJobs => "fine-tuning-jobs".into(),
            Self::MonthlySpend => "monthly-spend-usd".into(),
        }
    }

    pub fn parse(id: &str) -> Option<Self> {
        Self::all().into_iter().find(|k| k.id() == id)
    }

    /// The accelerator quota of `accelerator_type` (a value of `AcceleratorType`).
    pub fn accelerator(accelerator_type: i32) -> Option<Self> {
        AcceleratorType::try_from(accelerator_type)
            .ok()
            .filter(|a| ACCELERATORS.contains(a))
            .map(Self::Accelerator)
    }

    pub fn unit(&self) -> &'static str {
        match self {
            Self::Accelerator(_) => "accelerators",
            Self::Deployments => "deployments",
            Self::ServerlessRpm => "requests/min",
            Self::ServerlessTpm => "tokens/min",
            Self::FineTuningJobs => "jobs",
            Self::MonthlySpend => "USD",
        }
    }
}

/// A quota's stored or default limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub value: i64,
    pub max_value: i64,
    pub create_time: i64,
    pub update_time: i64,
}

/// `accounts/{a}/quotas/{q}` (or a bare quota ID when the account is known).
fn parse_quota_name(field: &str, name: &str, account: Option<&str>) -> Result<(String, QuotaKind)> {
    let parts: Vec<&str> = name.split('/').collect();
    let (account, id) = match parts.as_slice() {
        ["accounts", a, "quotas", q] => (a.to_string(), *q),
        [q] if account.is_some() => (account.unwrap_or_default().to_owned(), *q),
        _ => {
            return Err(ApiError::invalid(
                field,
                format!("{name:?} is not a quota name (accounts/{{account}}/quotas/{{quota}})"),
            )
            .into());
        }
    };
    kiln_core::names::validate_id(field, &account)?;
    let kind = QuotaKind::parse(id).ok_or_else(|| {
        ApiError::invalid(
            field,
            format!(
                "{id:?} is not a quota; quotas: {}",
                QuotaKind::all()
                    .iter()
                    .map(QuotaKind::id)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    Ok((account, kind))
}

impl Billing {
    fn default_limits(&self, kind: &QuotaKind) -> i64 {
        let q = &self.config().quotas;
        match kind {
            QuotaKind::Accelerator(_) => q.accelerators,
            QuotaKind::Deployments => q.deployments,
            QuotaKind::ServerlessRpm => q.serverless_inference_rpm,
            QuotaKind::ServerlessTpm => q.serverless_inference_tpm,
            QuotaKind::FineTuningJobs => q.fine_tuning_jobs,
            QuotaKind::MonthlySpend => q.monthly_spend,
        }
    }

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
            None => {
                let value = self.default_limits(kind);
                Limits {
                    value,
                    max_value: value,
                    create_time: 0,
                    update_time: 0,
                }
            }
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
                    .unwrap_or_else(|| self.default_limits(kind));
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
        let one = |rows: Vec<sea_orm::QueryResult>| -> Result<i64> {
            Ok(rows
                .first()
                .map(|r| int(r, "used"))
                .transpose()?
                .unwrap_or(0))
        };
        Ok(match kind {
            QuotaKind::Accelerator(a) => one(
                query(
                    conn,
                    "SELECT CAST(COALESCE(SUM(accelerator_count * max_replica_count), 0) AS BIGINT) AS used \
                     FROM billing_deployments WHERE account = ? AND active = ? AND deployment_type = ? AND accelerator_type = ?",
                    vec![
                        account.into(),
                        true.into(),
                        (DeploymentType::Dedicated as i32).into(),
                        (*a as i32).into(),
                    ],
                )
                .await?,
            )? as f64,
            QuotaKind::Deployments => one(
                query(
                    conn,
                    "SELECT COUNT(*) AS used FROM billing_deployments WHERE account = ? AND active = ?",
                    vec![account.into(), true.into()],
                )
                .await?,
            )? as f64,
            QuotaKind::ServerlessRpm | QuotaKind::ServerlessTpm => {
                let column = if *kind == QuotaKind::ServerlessRpm {
                    "request_count"
                } else {
                    "prompt_tokens + completion_tokens + embedding_tokens"
                };
                one(
                    query(
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
                    .await?,
                )? as f64
            }
            QuotaKind::FineTuningJobs => 0.0,
            QuotaKind::MonthlySpend => self.month_spend_nanos(conn, account, now).await? as f64 / 1e9,
        })
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
        let booked = rows
            .first()
            .map(|r| int(r, "cost_nanos"))
            .transpose()?
            .unwrap_or(0);
        let unbilled: i64 = crate::ledger::open_replicas(conn, None)
            .await?
            .into_iter()
            .filter(|r| r.account == account && r.billed_until < now)
            .map(|r| {
                self.prices().accelerator_cost(
                    r.accelerator_type,
                    (now - r.billed_until) * r.accelerator_count,
                )
            })
            .sum();
        Ok(booked + unbilled)
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

    pub async fn get_quota(&self, caller: &Principal, name: &str) -> Result<Quota> {
        let (account, kind) = parse_quota_name("name", name, Some(&caller.account))?;
        if !caller.can_access(&account) {
            return Err(ApiError::not_found(name).into());
        }
        self.quota_resource(self.db(), &account, &kind).await
    }

    pub async fn list_quotas(
        &self,
        caller: &Principal,
        parent: &str,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<Listing<Quota>> {
        let account = if parent.is_empty() {
            AccountName::new(caller.account.clone())
        } else {
            AccountName::parse("parent", parent)?
        };
        caller.check_access(&account, format!("accounts/{}", account.account))?;
        let terms = parse_filter(filter, &["name", "unit"])?;
        let order = parse_order_by(order_by, &["name", "update_time"])?;
        let mut quotas = Vec::new();
        for kind in QuotaKind::all() {
            quotas.push(
                self.quota_resource(self.db(), &account.account, &kind)
                    .await?,
            );
        }
        for term in &terms {
            quotas.retain(|q| {
                let value = if term.field == "unit" {
                    q.unit.as_str()
                } else {
                    q.name.as_str()
                };
                let matches = value == term.value
                    || (term.field == "name"
                        && q.name.rsplit('/').next() == Some(term.value.as_str()));
                matches != term.negated
            });
        }
        for key in order.iter().rev() {
            let stamp = |q: &Quota| {
                q.update_time
                    .as_ref()
                    .map(kiln_core::time::timestamp_to_micros)
                    .unwrap_or(0)
            };
            quotas.sort_by(|a, b| {
                let ordering = if key.field == "update_time" {
                    stamp(a).cmp(&stamp(b))
                } else {
                    a.name.cmp(&b.name)
                };
                if key.descending {
                    ordering.reverse()
                } else {
                    ordering
                }
            });
        }
        let scope = format!("quotas|{}|{filter}|{order_by}", account.account);
        let page = Page::from_request(self.pages(), &scope, page_size, page_token)?;
        let total = quotas.len() as u64;
        let items = quotas
            .into_iter()
            .skip(page.offset as usize)
            .take(page.limit as usize)
            .collect();
        Ok(Listing {
            items,
            next_page_token: page.next_token(self.pages(), &scope, total),
            total_size: total as i32,
        })
    }

    /// Sets a quota's value (up to its max_value; platform admins also set max_value and go
    /// beyond it). Raising the monthly spend limit above the month's spend lifts a
    /// spend-limit suspension.
    pub async fn update_quota(
        &self,
        caller: &Principal,
        quota: Quota,
        update_mask: Option<prost_types::FieldMask>,
    ) -> Result<Quota> {
        let (account, kind) = parse_quota_name("quota.name", &quota.name, Some(&caller.account))?;
        if !caller.can_access(&account) {
            return Err(ApiError::not_found(&quota.name).into());
        }
        let admin = caller.is_privileged();
        let mut paths = mask_paths(update_mask);
        if paths.is_empty() {
            paths.push("value".into());
        }
        let txn = crate::db::begin_write(self.db()).await?;
        let before = self.quota(&txn, &account, &kind).await?;
        let mut after = before;
        for path in &paths {
            match path.as_str() {
                "value" => after.value = quota.value,
                "max_value" if admin => after.max_value = quota.max_value,
                "max_value" => {
                    return Err(ApiError::PermissionDenied(
                        "only a platform admin changes a quota's max_value".into(),
                    )
                    .into());
                }
                other => {
                    return Err(ApiError::invalid(
                        "update_mask",
                        format!("{other:?} is not an updatable field; fields: value, max_value"),
                    )
                    .into());
                }
            }
        }
        if after.value < 0 {
            return Err(ApiError::invalid("quota.value", "must not be negative").into());
        }
        if after.max_value < 0 {
            return Err(ApiError::invalid("quota.max_value", "must not be negative").into());
        }
        if after.value > after.max_value {
            if admin {
                after.max_value = after.value;
            } else {
                return Err(ApiError::invalid(
                    "quota.value",
                    format!(
                        "{} is above this quota's max_value {}; ask a platform admin to raise it",
                        after.value, after.max_value
                    ),
                )
                .into());
            }
        }
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
            // The new limit applies to the month so far: lowered under its spend, the
            // account is suspended now; raised above it, a spend-limit suspension lifts.
            lock_month_spend(&txn, &account, now).await?;
            let spend = self.month_spend_nanos(&txn, &account, now).await?;
            if spend < after.value.saturating_mul(1_000_000_000) {
                self.lift_suspension(&txn, &account, "the monthly spend limit was raised")
                    .await?;
            } else {
                self.enforce_spend_limit(&txn, &account, spend, after.value)
                    .await?;
            }
        }
        let resource = self.quota_resource(&txn, &account, &kind).await?;
        let event = new_event(
            SOURCE,
            "billing.quota.updated",
            &format!("accounts/{account}"),
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
    pub async fn check_quota(
        &self,
        caller: &Principal,
        account: &str,
        quota: &str,
        requested: f64,
    ) -> Result<CheckQuotaResponse> {
        if !caller.has(kiln_core::auth::Role::Service)
            && !caller.has(kiln_core::auth::Role::PlatformAdmin)
        {
            return Err(
                ApiError::PermissionDenied("CheckQuota is for Kiln services".into()).into(),
            );
        }
        let account = AccountName::parse("account", account)?.account;
        let (_, kind) = parse_quota_name("quota", quota, Some(&account))?;
        if !requested.is_finite() || requested < 0.0 {
            return Err(ApiError::invalid("requested", "must be a non-negative number").into());
        }
        let resource = self.quota_resource(self.db(), &account, &kind).await?;
        let available = (resource.value as f64 - resource.usage).max(0.0);
        let suspension = if account == SYSTEM_ACCOUNT {
            None
        } else {
            query(
                self.db(),
                "SELECT suspend_state FROM billing_suspensions WHERE account = ?",
                vec![account.clone().into()],
            )
            .await?
            .first()
            .map(|r| r.try_get::<i32>("", "suspend_state"))
            .transpose()?
        };
        let (allowed, reason) = match suspension {
            Some(state) => (
                false,
                format!(
                    "account suspended: {}",
                    kiln_proto::identity::v1::account::SuspendState::try_from(state)
                        .map(|s| s.as_str_name())
                        .unwrap_or("SUSPENDED")
                ),
            ),
            None if account == SYSTEM_ACCOUNT || requested <= available => (true, String::new()),
            None => (
                false,
                format!(
                    "quota {}: {} of {} {} in use, {} requested",
                    kind.id(),
                    resource.usage,
                    resource.value,
                    kind.unit(),
                    requested
                ),
            ),
        };
        Ok(CheckQuotaResponse {
            allowed,
            missing: if allowed {
                0.0
            } else {
                (requested - available).max(0.0)
            },
            available,
            quota: Some(resource),
            reason,
        })
    }
}

/// Holds the month's spend row of `account` until `txn` ends, so a usage booking that read
/// the old limit cannot suspend the account after this transaction lifted its suspension
/// (PostgreSQL, read committed: the booking upserts this row first, so one waits for the
/// other). SQLite write transactions are serial already.
async fn lock_month_spend(
    txn: &sea_orm::DatabaseTransaction,
    account: &str,
    now: i64,
) -> Result<()> {
    if txn.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
        query(
            txn,
            "SELECT cost_nanos FROM billing_monthly_spend WHERE account = ? AND month = ? FOR UPDATE",
            vec![account.into(), utc_month(now).into()],
        )
        .await?;
    }
    Ok(())
}
