//! Reading flag values (durations, proto enums, times); every error names the flag.

use std::time::Duration;

use anyhow::{anyhow, bail};

/// Parses a duration flag in the grammar of `kiln_core::duration` (`500ms`, `30s`, `10m`,
/// `1h`, `2d`, or a sum like `1h30m`); `flag` without its dashes.
pub(crate) fn parse_duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    kiln_core::duration::parse(text).map_err(|e| anyhow!("--{flag}: {e}"))
}

/// A duration as a proto Duration.
pub(crate) fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// Parses a time flag: `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time.
pub(crate) fn parse_time(flag: &str, text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    full.parse::<prost_types::Timestamp>()
        .map_err(|e| anyhow!("--{flag} {text:?}: not YYYY-MM-DD or an RFC 3339 time ({e})"))
}

/// Parses an enum flag by its proto name, case-insensitively (`-` read as `_`), e.g.
/// `parse_enum("precision", text, Precision::from_str_name, Precision::as_str_name)`. The
/// UNSPECIFIED value (0) is refused; errors name the flag and list the valid values.
pub(crate) fn parse_enum<E: TryFrom<i32>>(
    flag: &str,
    text: &str,
    from_name: fn(&str) -> Option<E>,
    name: fn(&E) -> &'static str,
) -> anyhow::Result<E> {
    let wanted = text.trim().to_ascii_uppercase().replace('-', "_");
    // The valid names: from 1 (past UNSPECIFIED) to the last value.
    let valid: Vec<&str> = (1..)
        .map_while(|v| E::try_from(v).ok())
        .map(|e| name(&e))
        .collect();
    match from_name(&wanted) {
        Some(value) if valid.contains(&name(&value)) => Ok(value),
        _ => bail!(
            "--{flag} {text:?}: unknown value; valid values: {}",
            valid.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::common::v1 as commonv1;

    use super::*;

    fn error(result: anyhow::Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn durations_use_the_one_grammar() {
        let ok = |t| parse_duration("scale-up-window", t).unwrap();
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("2d"), Duration::from_secs(2 * 86_400));
        assert_eq!(ok("1m500ms"), Duration::from_millis(60_500));
        assert_eq!(
            proto_duration(ok("1m500ms")),
            prost_types::Duration {
                seconds: 60,
                nanos: 500_000_000
            }
        );
    }

    #[test]
    fn bad_durations_name_the_flag() {
        let e = error(parse_duration("scale-down-window", "10"));
        assert!(
            e.starts_with("--scale-down-window: \"10\": missing unit"),
            "{e}"
        );
        let e = error(parse_duration("expires-in", "10x"));
        assert!(
            e.starts_with("--expires-in: \"10x\": unknown unit \"x\""),
            "{e}"
        );
        assert!(e.contains("500ms, 30s, 10m, 1h"), "{e}");
        let e = error(parse_duration("timeout", "soon"));
        assert!(
            e.starts_with("--timeout: \"soon\" is not a duration"),
            "{e}"
        );
        let e = error(parse_duration("timeout", ""));
        assert!(e.starts_with("--timeout: empty duration"), "{e}");
    }

    #[test]
    fn times_are_dates_or_rfc3339() {
        assert_eq!(
            parse_time("from", "2026-01-02").unwrap(),
            "2026-01-02T00:00:00Z".parse().unwrap()
        );
        assert_eq!(
            parse_time("expire-time", "2027-01-01T10:00:00Z")
                .unwrap()
                .seconds,
            1_798_797_600
        );
        let e = error(parse_time("to", "tomorrow"));
        assert!(
            e.starts_with("--to \"tomorrow\": not YYYY-MM-DD or an RFC 3339 time"),
            "{e}"
        );
    }

    fn accelerator(text: &str) -> anyhow::Result<commonv1::AcceleratorType> {
        parse_enum(
            "accelerator-type",
            text,
            commonv1::AcceleratorType::from_str_name,
            commonv1::AcceleratorType::as_str_name,
        )
    }

    #[test]
    fn enums_parse_case_insensitively() {
        use commonv1::AcceleratorType as T;
        assert_eq!(accelerator("NVIDIA_H100_80GB").unwrap(), T::NvidiaH10080gb);
        assert_eq!(accelerator("nvidia_a100_80gb").unwrap(), T::NvidiaA10080gb);
        assert_eq!(
            accelerator("nvidia-h200-141gb").unwrap(),
            T::NvidiaH200141gb
        );
        assert_eq!(accelerator("amd_mi300x_192gb").unwrap(), T::AmdMi300x192gb);
        assert_eq!(accelerator("cpu").unwrap(), T::Cpu);
    }

    #[test]
    fn unknown_enum_values_list_the_valid_ones() {
        let expected = "valid values: NVIDIA_A100_80GB, NVIDIA_H100_80GB, NVIDIA_H200_141GB, \
                        AMD_MI300X_192GB, CPU";
        let e = error(accelerator("tpu"));
        assert_eq!(
            e,
            format!("--accelerator-type \"tpu\": unknown value; {expected}")
        );
        // The unspecified value is not a choice.
        let e = error(accelerator("accelerator_type_unspecified"));
        assert!(e.ends_with(expected), "{e}");
    }
}
