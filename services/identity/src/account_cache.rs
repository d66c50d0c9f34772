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
}
