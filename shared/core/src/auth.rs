//! Authentication: a tower layer that turns `authorization: Bearer <api key>` into a
//! [`Principal`] in the request's extensions, through an [`Authenticator`] and a short cache.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::server::{Answer, InnerService, Layered, Middleware, Request};

use crate::Error;
use crate::names::{AccountName, SYSTEM_ACCOUNT};

/// A role a principal holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Full access inside the account, and manages its users and their keys.
    AccountAdmin,
    /// Full access to the account's resources; manages its own keys.
    User,
    /// Manages every account, quotas and the public library.
    PlatformAdmin,
    /// Another Kiln service, calling with the service credential.
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::AccountAdmin => "admin",
            Role::User => "user",
            Role::PlatformAdmin => "platform-admin",
            Role::Service => "service",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "admin" => Role::AccountAdmin,
            "user" => Role::User,
            "platform-admin" => Role::PlatformAdmin,
            "service" => Role::Service,
            _ => return None,
        })
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The account ID (not the full name).
    pub account: String,
    /// The user ID inside the account; empty for services.
    pub user: String,
    /// The API key's full name; empty for services.
    pub api_key: String,
    pub roles: Vec<Role>,
    /// The account's `Account.SuspendState` value.
    pub suspend_state: i32,
}

impl Principal {
    pub fn service() -> Self {
        Self {
            account: SYSTEM_ACCOUNT.to_owned(),
            user: String::new(),
            api_key: String::new(),
            roles: vec![Role::Service],
            suspend_state: 0,
        }
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Platform admins and services act across accounts.
    pub fn is_privileged(&self) -> bool {
        self.has(Role::PlatformAdmin) || self.has(Role::Service)
    }

    pub fn user_name(&self) -> String {
        format!("accounts/{}/users/{}", self.account, self.user)
    }

    /// What a resource this principal creates records in `created_by`: its user's name, or
    /// nothing for a caller without a user (the service credential).
    pub fn creator(&self) -> String {
        if self.user.is_empty() {
            String::new()
        } else {
            self.user_name()
        }
    }

    /// Whether this principal may see resources of `account`. Callers answer NOT_FOUND when
    /// not, so the existence of another account's resources never leaks.
    pub fn can_access(&self, account: &str) -> bool {
        self.is_privileged() || self.account == account
    }

    /// The `parent` of a new resource or a listing, where this principal may act:
    /// INVALID_ARGUMENT naming `parent` when malformed, NOT_FOUND when it is another account.
    pub fn own_parent(&self, parent: &str) -> Result<AccountName, Error> {
        let parent = AccountName::parse("parent", parent)?;
        self.check_access(&parent, &parent)?;
        Ok(parent)
    }

    /// NOT_FOUND for `resource` unless this principal may access `account`.
    pub fn check_access(
        &self,
        account: &AccountName,
        resource: impl std::fmt::Display,
    ) -> Result<(), Error> {
        if self.can_access(&account.account) {
            Ok(())
        } else {
            Err(Error::not_found(resource))
        }
    }

    /// Whether this principal administers `account` (manages its users and their keys).
    pub fn administers(&self, account: &str) -> bool {
        self.is_privileged() || (self.account == account && self.has(Role::AccountAdmin))
    }
}

/// A successful authentication and how long it holds.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub principal: Principal,
    pub expire_time: Option<SystemTime>,
}

/// Resolves an API key into a principal: identity itself does it from its tables, every
/// other service over identity's internal `AuthService`.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, api_key: &'a str) -> BoxFuture<'a, Result<Authenticated, Error>>;
}

/// Returns the principal the auth layer attached to `request`.
pub fn principal<T>(request: &tonic::Request<T>) -> Result<&Principal, Error> {
    request
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| Error::Unauthenticated("no principal on this request".into()))
}

/// Recently resolved API keys, keyed by the SHA-256 of the secret (never the secret itself).
#[derive(Debug)]
pub struct AuthCache {
    ttl: Duration,
    entries: RwLock<HashMap<[u8; 32], (Authenticated, Instant)>>,
    /// Bumped by every invalidation: an answer looked up before one is not cached after it
    /// (it may be the state the invalidation is about).
    generation: std::sync::atomic::AtomicU64,
}

const MAX_CACHED_KEYS: usize = 100_000;

impl AuthCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: RwLock::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The invalidation count, read before looking a key up with the authenticator.
    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn get(&self, digest: &[u8; 32]) -> Option<Authenticated> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (auth, at) = entries.get(digest)?;
        if at.elapsed() > self.ttl {
            return None;
        }
        if auth.expire_time.is_some_and(|t| t <= SystemTime::now()) {
            return None;
        }
        Some(auth.clone())
    }

    /// Caches `auth`, looked up when the invalidation count was `generation`, unless an
    /// invalidation came since.
    fn insert(&self, digest: [u8; 32], auth: Authenticated, generation: u64) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if self.generation() != generation {
            return;
        }
        if entries.len() >= MAX_CACHED_KEYS {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| at.elapsed() <= ttl);
            if entries.len() >= MAX_CACHED_KEYS {
                entries.clear();
            }
        }
        entries.insert(digest, (auth, Instant::now()));
    }

    /// Drops every cached key that `resource` covers: the key itself, its user or its account.
    pub fn invalidate(&self, resource: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.retain(|_, (auth, _)| {
            let p = &auth.principal;
            !(p.api_key == resource
                || (!p.user.is_empty() && p.user_name() == resource)
                || format!("accounts/{}", p.account) == resource)
        });
    }

    pub fn clear(&self) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        entries.clear();
    }
}

/// SHA-256 of an API key secret: what identity stores and what the cache is keyed by.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Lowercase hex of bytes (digests as stored and shown).
pub fn hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The tower layer that authenticates every call except health checks and reflection.
#[derive(Clone)]
pub struct AuthLayer {
    inner: Arc<AuthState>,
}

struct AuthState {
    authenticator: Arc<dyn Authenticator>,
    cache: Arc<AuthCache>,
    /// The service credentials accepted (two while one is rotated).
    service_token_digests: Vec<[u8; 32]>,
}

impl AuthLayer {
    /// Authenticates API keys with `authenticator` (through `cache`); each of
    /// `service_tokens` is a service credential.
    pub fn new(
        authenticator: Arc<dyn Authenticator>,
        cache: Arc<AuthCache>,
        service_tokens: &[&str],
    ) -> Self {
        Self {
            inner: Arc::new(AuthState {
                authenticator,
                cache,
                service_token_digests: service_tokens.iter().map(|t| hash_secret(t)).collect(),
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Layered<Self, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Layered::new(self.clone(), inner)
    }
}

impl Middleware for AuthLayer {
    fn handle<S: InnerService>(&self, mut request: Request, mut inner: S) -> Answer<S::Error> {
        let state = self.inner.clone();
        Box::pin(async move {
            if !is_public(request.uri().path()) {
                match state.resolve(request.headers()).await {
                    Ok(principal) => {
                        request.extensions_mut().insert(principal);
                    }
                    Err(err) => {
                        let status: tonic::Status = err.into();
                        return Ok(status.into_http());
                    }
                }
            }
            inner.call(request).await
        })
    }
}

/// Paths anyone may call: discovery and health.
fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

impl AuthState {
    async fn resolve(&self, headers: &http::HeaderMap) -> Result<Principal, Error> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| {
                Error::Unauthenticated("missing authorization: Bearer <api key>".into())
            })?
            .to_str()
            .map_err(|_| Error::Unauthenticated("malformed authorization header".into()))?;
        let secret = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::Unauthenticated("authorization must be 'Bearer <api key>'".into())
            })?;
        let digest = hash_secret(secret);
        let service = self
            .service_token_digests
            .iter()
            .fold(subtle::Choice::from(0), |any, token| {
                any | token.ct_eq(&digest)
            });
        if bool::from(service) {
            return Ok(Principal::service());
        }
        if let Some(hit) = self.cache.get(&digest) {
            return Ok(hit.principal);
        }
        let generation = self.cache.generation();
        let auth = self.authenticator.authenticate(secret).await?;
        let principal = auth.principal.clone();
        self.cache.insert(digest, auth, generation);
        Ok(principal)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn auth(key: &str, user: &str, account: &str) -> Authenticated {
        Authenticated {
            principal: Principal {
                account: account.into(),
                user: user.into(),
                api_key: format!("accounts/{account}/users/{user}/apiKeys/{key}"),
                roles: vec![Role::User],
                suspend_state: 0,
            },
            expire_time: None,
        }
    }

    #[test]
    fn cache_invalidates_by_key_user_and_account() {
        let cache = AuthCache::new(Duration::from_secs(60));
        cache.insert([1; 32], auth("k1", "u1", "a"), 0);
        cache.insert([2; 32], auth("k2", "u2", "a"), 0);
        cache.insert([3; 32], auth("k3", "u3", "b"), 0);
        cache.invalidate("accounts/a/users/u1/apiKeys/k1");
        assert!(cache.get(&[1; 32]).is_none());
        assert!(cache.get(&[2; 32]).is_some());
        cache.invalidate("accounts/a/users/u2");
        assert!(cache.get(&[2; 32]).is_none());
        cache.invalidate("accounts/b");
        assert!(cache.get(&[3; 32]).is_none());
    }

    #[test]
    fn expired_keys_are_not_served_from_cache() {
        let cache = AuthCache::new(Duration::from_secs(60));
        let mut a = auth("k", "u", "a");
        a.expire_time = Some(SystemTime::now() - Duration::from_secs(1));
        cache.insert([9; 32], a, 0);
        assert!(cache.get(&[9; 32]).is_none());
    }

    #[test]
    fn a_lookup_that_raced_an_invalidation_is_not_cached() {
        let cache = AuthCache::new(Duration::from_secs(60));
        // Looked up (say, still suspended) before the account's change was invalidated...
        let before = cache.generation();
        cache.invalidate("accounts/a");
        cache.insert([4; 32], auth("k4", "u4", "a"), before);
        // ...so it is not served from cache: the next call asks again.
        assert!(cache.get(&[4; 32]).is_none());
        cache.insert([4; 32], auth("k4", "u4", "a"), cache.generation());
        assert!(cache.get(&[4; 32]).is_some());
    }

    /// An identity that knows no API key.
    pub(crate) struct NoKeys;

    impl Authenticator for NoKeys {
        fn authenticate<'a>(
            &'a self,
            _api_key: &'a str,
        ) -> BoxFuture<'a, Result<Authenticated, Error>> {
            Box::pin(async { Err(Error::Unauthenticated("no keys here".into())) })
        }
    }

    #[tokio::test]
    async fn during_a_rotation_both_service_tokens_are_accepted_and_only_they() {
        let old = "the-old-service-token-0123";
        let new = "the-new-service-token-4567";
        let cache = Arc::new(AuthCache::new(Duration::from_secs(60)));
        let layer = AuthLayer::new(Arc::new(NoKeys), cache, &[new, old]);
        let bearer = |token: &str| {
            let mut headers = http::HeaderMap::new();
            let value = format!("Bearer {token}").parse().unwrap();
            headers.insert(http::header::AUTHORIZATION, value);
            headers
        };
        for token in [old, new] {
            let principal = layer.inner.resolve(&bearer(token)).await.unwrap();
            assert!(principal.can_access("any-account"), "{token} is a service");
        }
        let other = layer.inner.resolve(&bearer("the-older-token-000000")).await;
        assert!(matches!(other, Err(Error::Unauthenticated(_))));
    }

    #[test]
    fn access_is_account_scoped() {
        let p = auth("k", "u", "a").principal;
        assert!(p.can_access("a"));
        assert!(!p.can_access("b"));
        assert!(Principal::service().can_access("b"));
    }
}
