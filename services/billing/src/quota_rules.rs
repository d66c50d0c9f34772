//! The quota rules, apart from where quotas are stored: which quotas there are and their
//! names, units and defaults, what an update may set, and what a check answers.

use kiln_core::Error;
use kiln_core::names::SYSTEM_ACCOUNT;
use kiln_proto::billing::v1::{CheckQuotaResponse, Quota};
use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::identity::v1::account::SuspendState;

use crate::config::QuotaDefaults;

/// The accelerator types with a quota, in listing order.
const ACCELERATORS: [AcceleratorType; 5] = [
    AcceleratorType::NvidiaA10080gb,
    AcceleratorType::NvidiaH10080gb,
    AcceleratorType::NvidiaH200141gb,
    AcceleratorType::AmdMi300x192gb,
    AcceleratorType::Cpu,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QuotaKind {
    /// Accelerators of one type held by dedicated deployments.
    Accelerator(AcceleratorType),
    Deployments,
    ServerlessRpm,
    ServerlessTpm,
    FineTuningJobs,
    MonthlySpend,
}

impl QuotaKind {
    /// Every quota, in listing order.
    pub(crate) fn all() -> Vec<QuotaKind> {
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
    pub(crate) fn id(&self) -> String {
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

    fn parse(id: &str) -> Option<Self> {
        Self::all().into_iter().find(|k| k.id() == id)
    }

    pub(crate) fn unit(&self) -> &'static str {
        match self {
            Self::Accelerator(_) => "accelerators",
            Self::Deployments => "deployments",
            Self::ServerlessRpm => "requests/min",
            Self::ServerlessTpm => "tokens/min",
            Self::FineTuningJobs => "jobs",
            Self::MonthlySpend => "USD",
        }
    }

    /// Its value for an account that has not set its own.
    pub(crate) fn default_value(&self, defaults: &QuotaDefaults) -> i64 {
        match self {
            Self::Accelerator(_) => defaults.accelerators,
            Self::Deployments => defaults.deployments,
            Self::ServerlessRpm => defaults.serverless_inference_rpm,
            Self::ServerlessTpm => defaults.serverless_inference_tpm,
            Self::FineTuningJobs => defaults.fine_tuning_jobs,
            Self::MonthlySpend => defaults.monthly_spend,
        }
    }
}

/// A quota's stored or default limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub value: i64,
    pub max_value: i64,
    pub create_time: i64,
    pub update_time: i64,
}

impl Limits {
    /// The limits of a quota nobody set: `value`, which is also its max_value.
    pub(crate) fn default_of(value: i64) -> Self {
        Self {
            value,
            max_value: value,
            create_time: 0,
            update_time: 0,
        }
    }
}

/// `accounts/{a}/quotas/{q}` (or a bare quota ID when the account is known).
pub(crate) fn parse_quota_name(
    field: &str,
    name: &str,
    account: Option<&str>,
) -> Result<(String, QuotaKind), Error> {
    let parts: Vec<&str> = name.split('/').collect();
    let (account, id) = match (parts.as_slice(), account) {
        (["accounts", a, "quotas", q], _) => (a.to_string(), *q),
        ([q], Some(account)) => (account.to_owned(), *q),
        _ => {
            return Err(Error::invalid(
                field,
                format!("{name:?} is not a quota name (accounts/{{account}}/quotas/{{quota}})"),
            ));
        }
    };
    kiln_core::names::validate_id(field, &account)?;
    let kind = QuotaKind::parse(id).ok_or_else(|| {
        Error::invalid(
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

/// `before` with the fields `paths` names set from `quota` (times untouched). An account
/// sets its value up to its max_value; a platform admin (`admin`) also sets max_value, and a
/// value above it raises it.
pub(crate) fn updated_limits(
    before: Limits,
    quota: &Quota,
    paths: &[String],
    admin: bool,
) -> Result<Limits, Error> {
    let mut after = before;
    for path in paths {
        match path.as_str() {
            "value" => after.value = quota.value,
            "max_value" if admin => after.max_value = quota.max_value,
            "max_value" => {
                return Err(Error::PermissionDenied(
                    "only a platform admin changes a quota's max_value".into(),
                ));
            }
            other => {
                return Err(Error::invalid(
                    "update_mask",
                    format!("{other:?} is not an updatable field; fields: value, max_value"),
                ));
            }
        }
    }
    if after.value < 0 {
        return Err(Error::invalid("quota.value", "must not be negative"));
    }
    if after.max_value < 0 {
        return Err(Error::invalid("quota.max_value", "must not be negative"));
    }
    if after.value > after.max_value {
        if !admin {
            return Err(Error::invalid(
                "quota.value",
                format!(
                    "{} is above this quota's max_value {}; ask a platform admin to raise it",
                    after.value, after.max_value
                ),
            ));
        }
        after.max_value = after.value;
    }
    Ok(after)
}

/// Whether `account` may use `requested` more of `quota` (its value and usage now), given
/// its suspension (a `SuspendState` value) if it has one. The system account is never
/// suspended nor limited.
pub(crate) fn check(
    account: &str,
    kind: &QuotaKind,
    quota: Quota,
    requested: f64,
    suspension: Option<i32>,
) -> CheckQuotaResponse {
    let system = account == SYSTEM_ACCOUNT;
    let available = (quota.value as f64 - quota.usage).max(0.0);
    let (allowed, reason) = match suspension.filter(|_| !system) {
        Some(state) => (
            false,
            format!(
                "account suspended: {}",
                SuspendState::try_from(state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("SUSPENDED")
            ),
        ),
        None if system || requested <= available => (true, String::new()),
        None => (
            false,
            format!(
                "quota {}: {} of {} {} in use, {} requested",
                kind.id(),
                quota.usage,
                quota.value,
                kind.unit(),
                requested
            ),
        ),
    };
    CheckQuotaResponse {
        allowed,
        missing: if allowed {
            0.0
        } else {
            (requested - available).max(0.0)
        },
        available,
        quota: Some(quota),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_quota_has_one_id_that_parses_back() {
        let all = QuotaKind::all();
        assert_eq!(all.len(), 10);
        for kind in &all {
            assert_eq!(QuotaKind::parse(&kind.id()).as_ref(), Some(kind));
        }
        assert_eq!(
            QuotaKind::Accelerator(AcceleratorType::NvidiaH10080gb).id(),
            "accelerator-nvidia-h100-80gb"
        );
        assert_eq!(QuotaKind::MonthlySpend.id(), "monthly-spend-usd");
        assert_eq!(QuotaKind::parse("accelerator-unspecified"), None);
    }

    #[test]
    fn defaults_come_from_the_settings_of_each_quota() {
        let defaults = QuotaDefaults {
            accelerators: 1,
            deployments: 2,
            serverless_inference_rpm: 3,
            serverless_inference_tpm: 4,
            fine_tuning_jobs: 5,
            monthly_spend: 6,
        };
        let values: Vec<i64> = QuotaKind::all()
            .iter()
            .map(|k| k.default_value(&defaults))
            .collect();
        assert_eq!(values, [1, 1, 1, 1, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_quota_is_named_in_full_or_by_id_under_a_known_account() {
        let (account, kind) =
            parse_quota_name("name", "accounts/acme/quotas/deployments", Some("other")).unwrap();
        assert_eq!((account.as_str(), kind), ("acme", QuotaKind::Deployments));
        let (account, _) = parse_quota_name("name", "fine-tuning-jobs", Some("acme")).unwrap();
        assert_eq!(account, "acme");
        let bare = parse_quota_name("name", "fine-tuning-jobs", None);
        assert!(
            matches!(&bare, Err(Error::InvalidArgument { reason, .. }) if reason.contains("not a quota name")),
            "{bare:?}"
        );
        for bad in [
            parse_quota_name("name", "accounts/acme/quotas/gpus", None),
            parse_quota_name("name", "accounts/Acme!/quotas/deployments", None),
            parse_quota_name("name", "accounts/acme/deployments/d", None),
        ] {
            assert!(matches!(bad, Err(Error::InvalidArgument { .. })), "{bad:?}");
        }
    }

    fn limits(value: i64, max_value: i64) -> Limits {
        Limits {
            value,
            max_value,
            create_time: 1,
            update_time: 2,
        }
    }

    fn asking(value: i64, max_value: i64) -> Quota {
        Quota {
            value,
            max_value,
            ..Default::default()
        }
    }

    fn paths(names: &[&str]) -> Vec<String> {
        names.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn an_account_sets_its_value_up_to_its_max() {
        let before = limits(5, 10);
        let value = paths(&["value"]);
        assert_eq!(
            updated_limits(before, &asking(10, 99), &value, false).unwrap(),
            limits(10, 10)
        );
        assert_eq!(
            updated_limits(before, &asking(0, 0), &value, false).unwrap(),
            limits(0, 10)
        );
        let above = updated_limits(before, &asking(11, 0), &value, false);
        assert!(
            matches!(&above, Err(Error::InvalidArgument { field, .. }) if field == "quota.value"),
            "{above:?}"
        );
        let max = updated_limits(before, &asking(5, 20), &paths(&["max_value"]), false);
        assert!(matches!(max, Err(Error::PermissionDenied(_))), "{max:?}");
        let negative = updated_limits(before, &asking(-1, 0), &value, false);
        assert!(matches!(negative, Err(Error::InvalidArgument { .. })));
        let unknown = updated_limits(before, &asking(1, 1), &paths(&["unit"]), false);
        assert!(
            matches!(&unknown, Err(Error::InvalidArgument { field, .. }) if field == "update_mask"),
            "{unknown:?}"
        );
    }

    #[test]
    fn an_admin_sets_the_max_and_a_value_above_it_raises_it() {
        let before = limits(5, 10);
        assert_eq!(
            updated_limits(before, &asking(50, 0), &paths(&["value"]), true).unwrap(),
            limits(50, 50)
        );
        assert_eq!(
            updated_limits(
                before,
                &asking(7, 20),
                &paths(&["value", "max_value"]),
                true
            )
            .unwrap(),
            limits(7, 20)
        );
        // Lowering the max under the value raises it back to the value.
        assert_eq!(
            updated_limits(before, &asking(0, 2), &paths(&["max_value"]), true).unwrap(),
            limits(5, 5)
        );
        let negative = updated_limits(before, &asking(5, -1), &paths(&["max_value"]), true);
        assert!(
            matches!(&negative, Err(Error::InvalidArgument { field, .. }) if field == "quota.max_value"),
            "{negative:?}"
        );
    }

    fn in_use(value: i64, usage: f64) -> Quota {
        Quota {
            value,
            usage,
            ..Default::default()
        }
    }

    #[test]
    fn a_check_allows_up_to_what_is_left() {
        let kind = QuotaKind::Deployments;
        let fits = check("acme", &kind, in_use(10, 7.0), 3.0, None);
        assert!(fits.allowed, "{fits:?}");
        assert_eq!((fits.available, fits.missing), (3.0, 0.0));
        assert_eq!(fits.reason, "");
        let over = check("acme", &kind, in_use(10, 7.0), 5.0, None);
        assert!(!over.allowed);
        assert_eq!((over.available, over.missing), (3.0, 2.0));
        assert_eq!(
            over.reason,
            "quota deployments: 7 of 10 deployments in use, 5 requested"
        );
        // Usage above the value (the value was lowered) leaves nothing, never less.
        let lowered = check("acme", &kind, in_use(2, 5.0), 1.0, None);
        assert_eq!((lowered.allowed, lowered.available), (false, 0.0));
        assert_eq!(lowered.missing, 1.0);
    }

    #[test]
    fn a_suspended_account_gets_nothing_and_the_system_account_everything() {
        let spend_limit = Some(SuspendState::MonthlySpendLimitExceeded as i32);
        let suspended = check(
            "acme",
            &QuotaKind::Deployments,
            in_use(10, 0.0),
            1.0,
            spend_limit,
        );
        assert!(!suspended.allowed);
        assert_eq!(suspended.missing, 0.0);
        assert_eq!(
            suspended.reason,
            "account suspended: MONTHLY_SPEND_LIMIT_EXCEEDED"
        );
        let system = check(
            SYSTEM_ACCOUNT,
            &QuotaKind::Deployments,
            in_use(1, 5.0),
            100.0,
            spend_limit,
        );
        assert!(system.allowed, "{system:?}");
        assert_eq!(system.missing, 0.0);
    }
}
