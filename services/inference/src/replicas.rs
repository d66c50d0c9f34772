//! The replicas this node holds: the node agent loads, reports and unloads them; the router
//! serves requests on the ready ones and counts those in flight.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use kiln_core::in_flight::{InFlight, InFlightGuard};
use kiln_proto::scheduler::v1::{Replica, replica};

use crate::engine::Variant;

/// The replicas this node holds, by name.
#[derive(Default)]
pub(crate) struct Replicas(Mutex<HashMap<String, Held>>);

impl Replicas {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.0.lock().expect("replicas")
    }
}

/// A replica this node holds.
pub(crate) struct Held {
    pub(crate) replica: Replica,
    /// How it serves its model (backend, LoRA slots).
    pub(crate) variant: Variant,
    /// The folders of its loaded addons (`replica.loaded_addons` names them).
    pub(crate) addon_dirs: HashMap<String, PathBuf>,
    in_flight: InFlight,
    served: AtomicU64,
    /// `served` at the previous heartbeat, and when that was.
    last_served: (u64, Instant),
}

impl Held {
    pub(crate) fn new(replica: Replica, variant: Variant) -> Self {
        Self {
            replica,
            variant,
            addon_dirs: HashMap::new(),
            in_flight: Default::default(),
            served: Default::default(),
            last_served: (0, Instant::now()),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Its requests in flight when it is ready to serve; None while it is not.
    pub(crate) fn ready_load(&self) -> Option<usize> {
        (self.replica.state == replica::State::Ready as i32).then(|| self.in_flight())
    }

    /// Counts a request on it: served, and in flight while the guard lives.
    pub(crate) fn claim(&self) -> InFlightGuard {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.in_flight.enter()
    }

    /// Requests served per second since the previous call (the previous heartbeat).
    pub(crate) fn take_rate(&mut self, now: Instant) -> f32 {
        let served = self.served.load(Ordering::Relaxed);
        let (before, at) = self.last_served;
        let seconds = now.duration_since(at).as_secs_f32().max(1e-3);
        self.last_served = (served, now);
        (served - before) as f32 / seconds
    }
}
