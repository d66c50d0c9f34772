//! Counting the requests a service (or one of its replicas) is answering: the load that
//! routing, draining and waits that grow with load look at.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests in flight, counted by whoever answers them ([`InFlight::enter`]); clones share
/// the count.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a request until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.0.clone())
    }

    /// Requests in flight now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One request in flight ([`InFlight::enter`]).
#[derive(Debug)]
pub struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_counts_while_its_guard_lives_in_every_clone() {
        let in_flight = InFlight::default();
        let seen_elsewhere = in_flight.clone();
        let first = in_flight.enter();
        let second = seen_elsewhere.enter();
        assert_eq!(in_flight.get(), 2);
        drop(first);
        assert_eq!(seen_elsewhere.get(), 1);
        drop(second);
        assert_eq!(in_flight.get(), 0);
    }
}
