//! Timestamps and durations as the scheduler reads and writes them. A leaf: it uses nothing
//! else in the crate.

use std::time::Duration;

use kiln_core::time::{micros_to_timestamp, now_micros, timestamp_to_micros};

/// The current time as a resource timestamp.
pub(crate) fn now() -> prost_types::Timestamp {
    micros_to_timestamp(now_micros())
}

/// A protobuf duration as a std one (negative parts count as zero, absent as zero).
pub(crate) fn duration_of(d: Option<&prost_types::Duration>) -> Duration {
    d.map(|d| {
        Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64)
    })
    .unwrap_or_default()
}

/// A whole number of seconds as a protobuf duration.
pub(crate) fn seconds(d: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d as i64,
        nanos: 0,
    }
}

/// A std duration as a protobuf one.
pub(crate) fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// Seconds between two timestamps (for replica accelerator-seconds); 0 without a start.
pub(crate) fn seconds_between(
    from: Option<&prost_types::Timestamp>,
    to: &prost_types::Timestamp,
) -> f64 {
    from.map(|f| (timestamp_to_micros(to) - timestamp_to_micros(f)).max(0) as f64 / 1e6)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_ignore_negative_parts() {
        let d = prost_types::Duration {
            seconds: 2,
            nanos: 500_000_000,
        };
        assert_eq!(duration_of(Some(&d)), Duration::from_millis(2500));
        let negative = prost_types::Duration {
            seconds: -3,
            nanos: -1,
        };
        assert_eq!(duration_of(Some(&negative)), Duration::ZERO);
        assert_eq!(duration_of(None), Duration::ZERO);
    }

    #[test]
    fn seconds_between_never_goes_negative() {
        let at = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        assert_eq!(seconds_between(Some(&at(10)), &at(14)), 4.0);
        assert_eq!(seconds_between(Some(&at(14)), &at(10)), 0.0);
        assert_eq!(seconds_between(None, &at(10)), 0.0);
    }
}
