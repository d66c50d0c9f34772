//! What the ledger holds: one row of usage, and the small readings of events every part of
//! the ledger makes (whose account, when).

use kiln_core::time::{now_micros, timestamp_to_micros};
use kiln_events::Event;

/// One ledger entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Entry {
    pub id: String,
    /// The account ID (not the full name).
    pub account: String,
    /// "tokens", "embedding_tokens", "requests", "accelerator_time", "training_tokens".
    pub kind: &'static str,
    /// When the usage ended; a piece of replica time: when it began, so that it counts in
    /// the day and month it lies in (pieces never cross midnight).
    pub time_micros: i64,
    /// The UTC day the usage is counted in.
    pub day: String,
    pub model: String,
    pub deployment: String,
    pub deployed_model: String,
    pub accelerator_type: i32,
    pub deployment_type: i32,
    pub request_count: i64,
    pub prompt_tokens: i64,
    pub cached_prompt_tokens: i64,
    pub completion_tokens: i64,
    pub embedding_tokens: i64,
    pub accelerator_micros: i64,
    pub training_tokens: i64,
    pub cost_nanos: i64,
}

/// `ts` in microseconds, `fallback` when the event left it out.
pub(crate) fn micros(ts: &Option<prost_types::Timestamp>, fallback: i64) -> i64 {
    ts.as_ref().map(timestamp_to_micros).unwrap_or(fallback)
}

/// When `event` happened (now, for an event without a time).
pub(crate) fn event_micros(event: &Event) -> i64 {
    micros(&event.time, now_micros())
}

#[cfg(test)]
mod tests {
    use kiln_core::time::micros_to_timestamp;

    use super::*;

    #[test]
    fn a_missing_time_falls_back() {
        assert_eq!(micros(&Some(micros_to_timestamp(1_500_000)), 7), 1_500_000);
        assert_eq!(micros(&None, 7), 7);
    }
}
