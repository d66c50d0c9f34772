//! Timestamps: stored as microseconds since the Unix epoch, served as protobuf Timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

pub fn micros_to_timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

pub fn timestamp_to_micros(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos) / 1000)
}

pub const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The UTC calendar date (year, month 1–12, day 1–31) of `micros`.
/// A resource's optional timestamp in microseconds; 0 when it has none.
pub fn micros_of(ts: &Option<prost_types::Timestamp>) -> i64 {
    ts.as_ref().map(timestamp_to_micros).unwrap_or(0)
}

pub fn utc_date(micros: i64) -> (i64, u32, u32) {
    // Howard Hinnant's civil_from_days.
    let z = micros.div_euclid(MICROS_PER_DAY) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Microseconds at 00:00 UTC of the given date.
pub fn utc_midnight(year: i64, month: u32, day: u32) -> i64 {
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * MICROS_PER_DAY
}

/// "YYYY-MM-DD" (UTC) of `micros`.
pub fn utc_day(micros: i64) -> String {
    let (y, m, d) = utc_date(micros);
    format!("{y:04}-{m:02}-{d:02}")
}

/// "YYYY-MM" (UTC) of `micros`.
pub fn utc_month(micros: i64) -> String {
    let (y, m, _) = utc_date(micros);
    format!("{y:04}-{m:02}")
}

/// Microseconds at the start of the UTC month holding `micros`.
pub fn utc_month_start(micros: i64) -> i64 {
    let (y, m, _) = utc_date(micros);
    utc_midnight(y, m, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_day(0), "1970-01-01");
        // 2026-11-25T06:21:27Z
        let t = 1_795_587_687_000_000;
        assert_eq!(utc_day(t), "2026-11-25");
        assert_eq!(utc_month(t), "2026-11");
        assert_eq!(
            utc_midnight(2026, 11, 25),
            t - (6 * 3600 + 21 * 60 + 27) * 1_000_000
        );
        assert_eq!(utc_day(utc_month_start(t)), "2026-11-01");
        assert_eq!(utc_day(utc_midnight(2024, 2, 29)), "2024-02-29");
        assert_eq!(utc_day(utc_midnight(2024, 3, 1) - 1), "2024-02-29");
        assert_eq!(utc_day(-1), "1969-12-31");
    }

    #[test]
    fn round_trips() {
        for m in [0, 1, 1_700_000_000_123_456, -5] {
            assert_eq!(timestamp_to_micros(&micros_to_timestamp(m)), m);
        }
    }
}
