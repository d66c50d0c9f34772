//! Accounts are read on every GetAccount and every check of a parent account, and change
//! rarely: a short read cache keeps those reads off the database. This process's own writes
//! drop entries at once; other replicas' writes drop them through `kiln.identity.account.*`
//! events; the TTL bounds staleness if events are lost.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::db::account;

pub struct AccountCache {
    ttl: Duration,
    /// Bumped by every invalidation; a read that raced one does not store its result.
    generation: AtomicU64,
    entries: RwLock<HashMap<String, (account::Model, Instant)>>,
}

const MAX_ENTRIES: usize = 100_000;

impl AccountCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            generation: AtomicU64::new(0),
            entries: RwLock::new(HashMap::new()),
        }
    }

    pub fn get(&self, id: &str) -> Option<account::Model> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(id)
            .filter(|(_, at)| at.elapsed() <= self.ttl)
            .map(|(m, _)| m.clone())
    }

    /// The generation to pass to [`Self::insert`] for a read that starts now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Stores `model` read from the database, unless an invalidation happened since the read
    /// began (`generation`), which could make it stale.
    pub fn insert(&self, generation: u64, model: account::Model) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(model.id.clone(), (model, Instant::now()));
    }

    pub fn invalidate(&self, id: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.remove(id);
    }

    /// Drops the account that `resource` names, if it names an account (and not something
    /// in one: a change to a user leaves its account's entry alone).
    pub fn invalidate_resource(&self, resource: &str) {
        if let Some(id) = account_id(resource) {
            self.invalidate(id);
        }
    }
}

/// The account ID of an account's name, `accounts/{id}`; `None` for any other name.
fn account_id(resource: &str) -> Option<&str> {
    resource
        .strip_prefix("accounts/")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_account_name_names_a_cached_account() {
        assert_eq!(account_id("accounts/acme"), Some("acme"));
        for other in [
            "accounts/acme/users/carol",
            "accounts/acme/users/carol/apiKeys/k",
            "accounts/",
            "acme",
            "models/accounts/acme",
            "",
        ] {
            assert_eq!(account_id(other), None, "{other:?}");
        }
    }

    fn row(id: &str) -> account::Model {
        crate::rules::test_support::account_row(id)
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_stored() {
        let cache = AccountCache::new(Duration::from_secs(60));
        let before = cache.generation();
        cache.insert(before, row("acme"));
        assert_eq!(cache.get("acme"), Some(row("acme")));
        let racing = cache.generation();
        cache.invalidate_resource("accounts/acme/users/carol");
        assert_eq!(
            cache.get("acme"),
            Some(row("acme")),
            "a user is not its account"
        );
        cache.invalidate_resource("accounts/acme");
        assert_eq!(cache.get("acme"), None);
        cache.insert(racing, row("acme"));
        assert_eq!(
            cache.get("acme"),
            None,
            "stale: read before the invalidation"
        );
        cache.insert(cache.generation(), row("acme"));
        assert_eq!(cache.get("acme"), Some(row("acme")));
    }
}
