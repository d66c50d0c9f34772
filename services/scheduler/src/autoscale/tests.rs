use super::*;

const SECOND: Duration = Duration::from_secs(1);
const NANO: Duration = Duration::from_nanos(1);

/// min 1, max 10, 8 concurrent requests per replica, windows 30 s up, 600 s down, 3600 s to
/// zero (the defaults a deployment gets).
fn policy() -> Policy {
    Policy {
        min: 1,
        max: 10,
        load_targets: HashMap::from([("concurrent_requests".to_owned(), 8.0)]),
        scale_up_window: 30 * SECOND,
        scale_down_window: 600 * SECOND,
        scale_to_zero_window: 3600 * SECOND,
    }
}

/// `n` ready replicas carrying `in_flight` requests each.
fn loads(n: usize, in_flight: i32) -> Vec<ReplicaLoad> {
    vec![
        ReplicaLoad {
            in_flight_requests: in_flight,
            ..Default::default()
        };
        n
    ]
}

/// One deployment under a policy, passes at chosen times after `t0`.
struct Scaler {
    policy: Policy,
    timers: Timers,
    t0: Instant,
}

impl Scaler {
    fn new(policy: Policy) -> Self {
        let t0 = Instant::now();
        Self {
            policy,
            timers: Timers::new(t0),
            t0,
        }
    }

    /// A pass `after` t0 with `desired` replicas wanted, every replica ready with `loads`.
    fn pass(
        &mut self,
        after: Duration,
        desired: i32,
        loads: &[ReplicaLoad],
    ) -> Option<(i32, Reason)> {
        let observed = Observed {
            desired,
            replicas: loads.len(),
            loads,
            demand: false,
        };
        self.observe(after, &observed)
    }

    fn observe(&mut self, after: Duration, observed: &Observed<'_>) -> Option<(i32, Reason)> {
        decide(&self.policy, observed, &mut self.timers, self.t0 + after)
    }

    fn at(&self, after: Duration) -> Option<Instant> {
        Some(self.t0 + after)
    }
}

/// `replicas` replicas, none ready yet, `desired` wanted; `demand`: a request waits.
fn unready(desired: i32, replicas: usize, demand: bool) -> Observed<'static> {
    Observed {
        desired,
        replicas,
        loads: &[],
        demand,
    }
}

fn up(desired: i32) -> Option<(i32, Reason)> {
    Some((desired, Reason::Autoscaler))
}

#[test]
fn load_above_target_scales_up_once_the_window_has_run() {
    let mut s = Scaler::new(policy());
    // Two replicas at 20 requests each need five at 8 per replica.
    let busy = loads(2, 20);
    assert_eq!(s.pass(Duration::ZERO, 2, &busy), None);
    assert_eq!(s.timers.above_since, s.at(Duration::ZERO));
    assert_eq!(s.pass(30 * SECOND - NANO, 2, &busy), None);
    assert_eq!(s.pass(30 * SECOND, 2, &busy), up(5));
    assert_eq!(
        s.timers.above_since, None,
        "a new window starts after a change"
    );
}

#[test]
fn a_zero_scale_up_window_scales_up_in_the_same_pass() {
    let mut s = Scaler::new(Policy {
        scale_up_window: Duration::ZERO,
        ..policy()
    });
    assert_eq!(s.pass(Duration::ZERO, 1, &loads(1, 9)), up(2));
}

#[test]
fn scaling_up_stops_at_max() {
    let mut s = Scaler::new(Policy { max: 3, ..policy() });
    let busy = loads(2, 100);
    s.pass(Duration::ZERO, 2, &busy);
    assert_eq!(s.pass(30 * SECOND, 2, &busy), up(3));
    // At max, more load changes nothing and runs no window.
    let at_max = loads(3, 100);
    assert_eq!(s.pass(31 * SECOND, 3, &at_max), None);
    assert_eq!(s.timers.above_since, None);
    assert_eq!(s.pass(3600 * SECOND, 3, &at_max), None);
}

#[test]
fn load_below_target_scales_down_once_the_window_has_run() {
    let mut s = Scaler::new(policy());
    // Four replicas carrying 9 requests in all need two.
    let mut quiet = loads(4, 2);
    quiet[0].in_flight_requests = 3;
    assert_eq!(s.pass(Duration::ZERO, 4, &quiet), None);
    assert_eq!(s.timers.below_since, s.at(Duration::ZERO));
    assert_eq!(s.pass(600 * SECOND - NANO, 4, &quiet), None);
    assert_eq!(s.pass(600 * SECOND, 4, &quiet), up(2));
    assert_eq!(s.timers.below_since, None);
}

#[test]
fn scaling_down_stops_at_min_and_never_reaches_zero() {
    let mut s = Scaler::new(Policy { min: 3, ..policy() });
    s.pass(Duration::ZERO, 5, &loads(5, 0));
    assert_eq!(s.pass(600 * SECOND, 5, &loads(5, 0)), up(3));
    // At min, no window runs.
    assert_eq!(s.pass(601 * SECOND, 3, &loads(3, 0)), None);
    assert_eq!(s.timers.below_since, None);
    // With min 0 the load alone scales down to one; only idleness goes to zero.
    let mut s = Scaler::new(Policy {
        min: 0,
        scale_to_zero_window: 100_000 * SECOND,
        ..policy()
    });
    s.pass(Duration::ZERO, 2, &loads(2, 0));
    assert_eq!(s.pass(600 * SECOND, 2, &loads(2, 0)), up(1));
}

#[test]
fn load_at_target_changes_nothing_and_resets_the_windows() {
    let mut s = Scaler::new(policy());
    let busy = loads(2, 20);
    s.pass(Duration::ZERO, 2, &busy);
    assert_eq!(s.timers.above_since, s.at(Duration::ZERO));
    // 16 requests on two replicas is exactly the target.
    assert_eq!(s.pass(10 * SECOND, 2, &loads(2, 8)), None);
    assert_eq!(s.timers, Timers::new(s.t0 + 10 * SECOND));
    // Above again: the window starts over.
    s.pass(20 * SECOND, 2, &busy);
    assert_eq!(s.timers.above_since, s.at(20 * SECOND));
    assert_eq!(s.pass(40 * SECOND, 2, &busy), None);
    assert_eq!(s.pass(50 * SECOND, 2, &busy), up(5));
}

#[test]
fn crossing_from_above_to_below_starts_the_other_window() {
    let mut s = Scaler::new(policy());
    s.pass(Duration::ZERO, 3, &loads(3, 20));
    s.pass(5 * SECOND, 3, &loads(3, 0));
    assert_eq!(s.timers.above_since, None);
    assert_eq!(s.timers.below_since, s.at(5 * SECOND));
}

#[test]
fn load_is_judged_only_while_every_replica_serves() {
    let mut s = Scaler::new(policy());
    let busy = loads(1, 100);
    // Two replicas, one still starting: its missing load is no reason to scale up.
    let starting = Observed {
        desired: 2,
        replicas: 2,
        loads: &busy,
        demand: false,
    };
    for after in [0, 30, 3600] {
        assert_eq!(s.observe(after * SECOND, &starting), None);
    }
    assert_eq!(s.timers.above_since, None);
    // No ready replica at all: no load to judge either.
    assert_eq!(s.observe(4000 * SECOND, &unready(2, 2, false)), None);
}

#[test]
fn idle_for_the_window_scales_to_zero_when_min_is_zero() {
    let zero = Some((0, Reason::ScaleToZero));
    let mut s = Scaler::new(Policy { min: 0, ..policy() });
    assert_eq!(s.pass(3600 * SECOND - NANO, 1, &loads(1, 0)), None);
    assert_eq!(s.pass(3600 * SECOND, 1, &loads(1, 0)), zero);
    // With replicas still starting (no load to judge) idleness counts all the same.
    let mut s = Scaler::new(Policy { min: 0, ..policy() });
    assert_eq!(s.observe(3600 * SECOND, &unready(1, 1, false)), zero);
}

#[test]
fn idle_never_scales_to_zero_when_min_is_one_or_already_zero() {
    let much_later = 100_000 * SECOND;
    assert_eq!(
        Scaler::new(policy()).pass(much_later, 1, &loads(1, 0)),
        None
    );
    let mut s = Scaler::new(Policy { min: 0, ..policy() });
    assert_eq!(s.pass(much_later, 0, &[]), None);
}

#[test]
fn traffic_keeps_a_deployment_from_scaling_to_zero() {
    let mut s = Scaler::new(Policy { min: 0, ..policy() });
    // One request per second, nothing in flight at the moment of the report: still busy.
    let trickle = [ReplicaLoad {
        requests_per_second: 1.0,
        ..Default::default()
    }];
    assert_eq!(s.pass(3000 * SECOND, 1, &trickle), None);
    assert_eq!(Some(s.timers.last_activity), s.at(3000 * SECOND));
    let idle = loads(1, 0);
    assert_eq!(
        s.pass(3600 * SECOND, 1, &idle),
        None,
        "idle counts from the last traffic"
    );
    assert_eq!(
        s.pass(6600 * SECOND, 1, &idle),
        Some((0, Reason::ScaleToZero))
    );
}

#[test]
fn demand_wakes_a_deployment_at_zero() {
    let mut s = Scaler::new(Policy { min: 0, ..policy() });
    assert_eq!(
        s.observe(7200 * SECOND, &unready(0, 0, true)),
        Some((1, Reason::ScaleFromZero))
    );
    assert_eq!(
        Some(s.timers.last_activity),
        s.at(7200 * SECOND),
        "idle counts from the wake"
    );
    // Demand while replicas are wanted only counts as activity.
    assert_eq!(s.observe(11_200 * SECOND, &unready(1, 1, true)), None);
    assert_eq!(Some(s.timers.last_activity), s.at(11_200 * SECOND));
}

#[test]
fn the_largest_need_over_the_targets_wins() {
    let targets = HashMap::from([
        ("concurrent_requests".to_owned(), 8.0),
        ("requests_per_second".to_owned(), 10.0),
        ("tokens_generated_per_second".to_owned(), 1000.0),
        ("kv_cache_utilization".to_owned(), 0.5),
    ]);
    let load = |in_flight, queue_depth, rps, tps, kv| ReplicaLoad {
        in_flight_requests: in_flight,
        queue_depth,
        requests_per_second: rps,
        tokens_generated_per_second: tps,
        kv_cache_utilization: kv,
        ..Default::default()
    };
    let cases = [
        // Requests in flight and queued count together: 12 + 5 at 8 per replica need 3.
        (vec![load(12, 5, 0.0, 0.0, 0.0)], 3),
        (vec![load(0, 0, 41.0, 0.0, 0.0)], 5),
        (vec![load(0, 0, 0.0, 2500.0, 0.0)], 3),
        (
            vec![load(0, 0, 0.0, 0.0, 0.9), load(0, 0, 0.0, 0.0, 0.8)],
            4,
        ),
        (vec![], 0),
    ];
    for (loads, needed) in cases {
        assert_eq!(replicas_needed(&targets, &loads), needed, "{loads:?}");
    }
    assert_eq!(
        replicas_needed(&HashMap::new(), &[load(100, 0, 0.0, 0.0, 0.0)]),
        0
    );
}

#[test]
fn reasons_are_the_event_words() {
    assert_eq!(Reason::ScaleFromZero.as_str(), "scale_from_zero");
    assert_eq!(Reason::Autoscaler.as_str(), "autoscaler");
    assert_eq!(Reason::ScaleToZero.as_str(), "scale_to_zero");
}

#[test]
fn the_policy_comes_from_the_deployment() {
    let d = Deployment {
        min_replica_count: 2,
        max_replica_count: 7,
        autoscaling_policy: Some(kiln_proto::scheduler::v1::AutoscalingPolicy {
            scale_up_window: Some(crate::time::seconds(5)),
            scale_down_window: Some(crate::time::seconds(60)),
            scale_to_zero_window: None,
            load_targets: HashMap::from([("requests_per_second".to_owned(), 4.0)]),
        }),
        ..Default::default()
    };
    let policy = Policy::of(&d);
    assert_eq!((policy.min, policy.max), (2, 7));
    assert_eq!(policy.scale_up_window, 5 * SECOND);
    assert_eq!(policy.scale_down_window, 60 * SECOND);
    assert_eq!(policy.scale_to_zero_window, Duration::ZERO);
    assert_eq!(policy.load_targets["requests_per_second"], 4.0);
}
