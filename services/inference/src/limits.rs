//! Per-account admission on the node that serves a request: suspended accounts are refused
//! (FAILED_PRECONDITION), and serverless requests and tokens are rate limited per minute
//! (RESOURCE_EXHAUSTED with the delay until the next one fits, in google.rpc.RetryInfo).
//!
//! Limits are billing's `serverless-inference-rpm` / `-tpm` quotas: read once per account
//! (no billing round-trip per request), then kept current by `kiln.billing.quota.updated`
//! events and re-read after `LIMITS_TTL`. Each limit is a token bucket holding a minute's
//! worth: a burst up to the limit passes, the excess is refused. Requests are counted when
//! admitted; tokens when the answer's usage is recorded (a request is admitted while the
//! token bucket is not in debt). Each node counts on its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use kiln_core::auth::Principal;
use kiln_core::names::SYSTEM_ACCOUNT;
use kiln_events::{Body, EventBus};
use kiln_proto::billing::v1::GetQuotaRequest;
use kiln_proto::billing::v1::quota_service_client::QuotaServiceClient;
use kiln_proto::identity::v1::account::SuspendState;

use kiln_core::{Error, Result};

pub const RPM_QUOTA: &str = "serverless-inference-rpm";
pub const TPM_QUOTA: &str = "serverless-inference-tpm";
/// How long limits read from billing are trusted without an event saying they changed.
const LIMITS_TTL: Duration = Duration::from_secs(300);

/// An account's per-minute limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
}

/// Where limits are read: billing, in process or over gRPC.
#[async_trait]
pub trait LimitSource: Send + Sync + 'static {
    async fn limits(&self, account: &str) -> Result<Limits>;
}

/// Billing's QuotaService over gRPC.
#[async_trait]
impl LimitSource for QuotaServiceClient<kiln_core::server::ServiceChannel> {
    async fn limits(&self, account: &str) -> Result<Limits> {
        let read = |quota: &str| {
            let mut client = self.clone();
            let name = format!("accounts/{account}/quotas/{quota}");
            async move {
                client
                    .get_quota(GetQuotaRequest { name })
                    .await
                    .map(|q| q.into_inner().value)
                    .map_err(|status| Error::from_peer("billing GetQuota", status))
            }
        };
        Ok(Limits {
            requests_per_minute: read(RPM_QUOTA).await?,
            tokens_per_minute: read(TPM_QUOTA).await?,
        })
    }
}

/// A bucket refilled continuously at `limit` per minute, holding at most `limit`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: i64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    fn full(limit: i64, now: Instant) -> Self {
        Self {
            limit,
            level: limit as f64,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let per_second = self.limit as f64 / 60.0;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * per_second).min(self.limit as f64);
        self.updated = now;
    }

    /// How long until the level reaches `needed`.
    fn wait_for(&self, needed: f64) -> Duration {
        if self.limit <= 0 {
            return Duration::from_secs(60);
        }
        let per_second = self.limit as f64 / 60.0;
        Duration::from_secs_f64(((needed - self.level) / per_second).clamp(0.001, 3600.0))
    }

    /// A new limit: the level keeps what was used.
    fn set_limit(&mut self, limit: i64, now: Instant) {
        self.refill(now);
        let used = self.limit as f64 - self.level;
        self.limit = limit;
        self.level = (limit as f64 - used).min(limit as f64);
    }
}

struct AccountBuckets {
    requests: Bucket,
    tokens: Bucket,
    read_at: Instant,
}

/// The node's admission control.
pub(crate) struct RateLimiter {
    source: Arc<dyn LimitSource>,
    accounts: Mutex<HashMap<String, AccountBuckets>>,
}

/// Refuses a suspended account's requests.
pub(crate) fn check_not_suspended(caller: &Principal) -> Result<()> {
    if caller.suspend_state == 0 || caller.suspend_state == SuspendState::Unsuspended as i32 {
        return Ok(());
    }
    let state = SuspendState::try_from(caller.suspend_state)
        .map(|s| s.as_str_name())
        .unwrap_or("SUSPENDED");
    Err(Error::FailedPrecondition(format!(
        "account accounts/{} is suspended ({state}); inference requests are refused until it is lifted",
        caller.account
    )))
}

impl RateLimiter {
    pub fn new(source: Arc<dyn LimitSource>) -> Arc<Self> {
        Arc::new(Self {
            source,
            accounts: Mutex::new(HashMap::new()),
        })
    }

    /// Follows `kiln.billing.quota.updated`, so a changed limit applies at once.
    pub(crate) async fn follow(
        self: &Arc<Self>,
        bus: &Arc<dyn EventBus>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let mut events = bus.subscribe("kiln.billing.quota.updated").await?;
        let limiter = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.next() => e,
                    _ = shutdown.wait_for(|s| *s) => return,
                };
                let Some(event) = event else { return };
                if let Some(Body::QuotaUpdated(update)) = event.body
                    && let Some(quota) = update.quota
                {
                    limiter.quota_changed(&quota.name, quota.value);
                }
            }
        }))
    }

    fn quota_changed(&self, name: &str, value: i64) {
        let Some((account, quota)) = name
            .strip_prefix("accounts/")
            .and_then(|r| r.split_once("/quotas/"))
        else {
            return;
        };
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(buckets) = accounts.get_mut(account) else {
            return;
        };
        let now = Instant::now();
        match quota {
            RPM_QUOTA => buckets.requests.set_limit(value, now),
            TPM_QUOTA => buckets.tokens.set_limit(value, now),
            _ => {}
        }
    }

    /// Admits one request of `caller`, or says how long to wait.
    pub(crate) async fn admit(&self, caller: &Principal) -> Result<()> {
        if caller.account == SYSTEM_ACCOUNT {
            return Ok(());
        }
        let fresh = {
            let accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
            accounts
                .get(&caller.account)
                .is_some_and(|b| b.read_at.elapsed() < LIMITS_TTL)
        };
        if !fresh {
            match self.source.limits(&caller.account).await {
                Ok(limits) => self.set(&caller.account, limits),
                // Billing unreachable: serve under the limits last read (none: unlimited)
                // rather than fail every request.
                Err(err) => {
                    tracing::warn!(account = %caller.account, %err, "cannot read rate limits")
                }
            }
        }
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(buckets) = accounts.get_mut(&caller.account) else {
            return Ok(());
        };
        let now = Instant::now();
        buckets.requests.refill(now);
        buckets.tokens.refill(now);
        if buckets.requests.level < 1.0 {
            return Err(exhausted(
                format!(
                    "quota {RPM_QUOTA}: accounts/{} may send {} serverless requests per minute",
                    caller.account, buckets.requests.limit
                ),
                buckets.requests.wait_for(1.0),
            ));
        }
        if buckets.tokens.level <= 0.0 {
            return Err(exhausted(
                format!(
                    "quota {TPM_QUOTA}: accounts/{} may use {} serverless tokens per minute",
                    caller.account, buckets.tokens.limit
                ),
                buckets.tokens.wait_for(1.0),
            ));
        }
        buckets.requests.level -= 1.0;
        Ok(())
    }

    /// Counts the tokens an answered request used.
    pub(crate) fn charge_tokens(&self, account: &str, tokens: i64) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(buckets) = accounts.get_mut(account) {
            buckets.tokens.refill(Instant::now());
            buckets.tokens.level -= tokens as f64;
        }
    }

    fn set(&self, account: &str, limits: Limits) {
        let now = Instant::now();
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        match accounts.get_mut(account) {
            Some(b) => {
                b.requests.set_limit(limits.requests_per_minute, now);
                b.tokens.set_limit(limits.tokens_per_minute, now);
                b.read_at = now;
            }
            None => {
                accounts.insert(
                    account.to_owned(),
                    AccountBuckets {
                        requests: Bucket::full(limits.requests_per_minute, now),
                        tokens: Bucket::full(limits.tokens_per_minute, now),
                        read_at: now,
                    },
                );
            }
        }
    }
}

fn exhausted(message: String, retry_after: Duration) -> Error {
    Error::ResourceExhausted {
        message,
        retry_after: Some(retry_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Limits);

    #[async_trait]
    impl LimitSource for Fixed {
        async fn limits(&self, _: &str) -> Result<Limits> {
            Ok(self.0)
        }
    }

    /// A limiter whose every account has these limits.
    fn limiter(requests_per_minute: i64, tokens_per_minute: i64) -> Arc<RateLimiter> {
        RateLimiter::new(Arc::new(Fixed(Limits {
            requests_per_minute,
            tokens_per_minute,
        })))
    }

    fn caller(account: &str) -> Principal {
        Principal {
            account: account.into(),
            ..Principal::service()
        }
    }

    #[tokio::test]
    async fn a_burst_over_the_rpm_limit_loses_only_the_excess() {
        let limiter = limiter(5, 1_000_000);
        let alice = caller("alice");
        let mut refused = Vec::new();
        for _ in 0..8 {
            if let Err(err) = limiter.admit(&alice).await {
                refused.push(tonic::Status::from(err));
            }
        }
        assert_eq!(refused.len(), 3);
        let status = &refused[0];
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains(RPM_QUOTA), "{}", status.message());
        // Another account has its own bucket; the system account is not limited.
        limiter.admit(&caller("bob")).await.unwrap();
        for _ in 0..10 {
            limiter.admit(&caller(SYSTEM_ACCOUNT)).await.unwrap();
        }
        // A raised limit applies at once, keeping what was used.
        limiter.quota_changed("accounts/alice/quotas/serverless-inference-rpm", 7);
        limiter.admit(&alice).await.unwrap();
        limiter.admit(&alice).await.unwrap();
        assert!(limiter.admit(&alice).await.is_err());
    }

    #[tokio::test]
    async fn tokens_in_debt_refuse_until_refilled() {
        let limiter = limiter(100, 600);
        let alice = caller("alice");
        limiter.admit(&alice).await.unwrap();
        limiter.charge_tokens("alice", 1_200);
        let err = tonic::Status::from(limiter.admit(&alice).await.unwrap_err());
        assert!(err.message().contains(TPM_QUOTA), "{}", err.message());
        // 600 tokens of debt at 10 tokens a second: about a minute.
        let details = tonic_types::StatusExt::get_details_retry_info(&err).expect("retry info");
        let delay = details.retry_delay.expect("delay");
        assert!(
            (55..=61).contains(&delay.as_secs()),
            "retry after {delay:?}"
        );
    }

    #[test]
    fn suspended_accounts_are_refused() {
        let mut p = caller("alice");
        assert!(check_not_suspended(&p).is_ok());
        p.suspend_state = SuspendState::MonthlySpendLimitExceeded as i32;
        let status = tonic::Status::from(check_not_suspended(&p).unwrap_err());
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("MONTHLY_SPEND_LIMIT_EXCEEDED"));
    }
}
