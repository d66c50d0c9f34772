//! The flags several commands share, and reading flag values (durations, proto enums,
//! times); every error names the flag.

use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::Args;
use kiln_proto::billing::v1 as billv1;
use kiln_proto::common::v1 as commonv1;
use kiln_proto::identity::v1 as idv1;

/// The text that describes a model or a deployment, which create and update set alike.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    #[arg(long)]
    pub display_name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
}

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

/// The type of an enum flag: a proto enum, by the names prost gives its values.
pub(crate) trait EnumFlag: TryFrom<i32> + Into<i32> {
    fn from_str_name(name: &str) -> Option<Self>;
    fn as_str_name(&self) -> &'static str;
}

/// Makes proto enums flag types, through the methods of the same names prost generates.
macro_rules! enum_flags {
    ($($enum:ty),+ $(,)?) => {$(
        impl EnumFlag for $enum {
            fn from_str_name(name: &str) -> Option<Self> {
                <$enum>::from_str_name(name)
            }
            fn as_str_name(&self) -> &'static str {
                <$enum>::as_str_name(self)
            }
        }
    )+};
}

enum_flags!(
    commonv1::AcceleratorType,
    commonv1::Precision,
    idv1::account::AccountType,
    idv1::account::SuspendState,
    billv1::get_usage_request::GroupBy,
);

/// Parses an enum flag by its proto name, case-insensitively (`-` read as `_`), e.g.
/// `parse_enum::<Precision>("precision", text)`. The UNSPECIFIED value (0) is refused;
/// errors name the flag and list the valid values.
pub(crate) fn parse_enum<E: EnumFlag>(flag: &str, text: &str) -> anyhow::Result<E> {
    let wanted = text.trim().to_ascii_uppercase().replace('-', "_");
    // The valid names: from 1 (past UNSPECIFIED) to the last value.
    let valid: Vec<&str> = (1..)
        .map_while(|v| E::try_from(v).ok())
        .map(|e| e.as_str_name())
        .collect();
    match E::from_str_name(&wanted) {
        Some(value) if valid.contains(&value.as_str_name()) => Ok(value),
        _ => bail!(
            "--{flag} {text:?}: unknown value; valid values: {}",
            valid.join(", ")
        ),
    }
}

/// Parses an optional enum flag (as [`parse_enum`]) into its proto value: 0, UNSPECIFIED,
/// when the flag is not given.
pub(crate) fn parse_optional_enum<E: EnumFlag>(
    flag: &str,
    text: Option<&str>,
) -> anyhow::Result<i32> {
    text.map_or(Ok(0), |text| parse_enum::<E>(flag, text).map(Into::into))
}

/// Parses a command line of just the flags of `A` (for tests of a command's flags).
#[cfg(test)]
pub(crate) fn parse_flags<A: Args>(args: &[&str]) -> Result<A, clap::Error> {
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Line<A: Args> {
        #[command(flatten)]
        args: A,
    }

    Line::<A>::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))
        .map(|line| line.args)
}

#[cfg(test)]
mod tests {
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
        parse_enum("accelerator-type", text)
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
    fn an_enum_flag_not_given_is_unspecified() {
        let precision = |text| parse_optional_enum::<commonv1::Precision>("precision", text);
        assert_eq!(precision(None).unwrap(), 0);
        assert_eq!(
            precision(Some("bf16")).unwrap(),
            commonv1::Precision::Bf16 as i32
        );
        let e = error(precision(Some("fp64")));
        assert!(e.starts_with("--precision \"fp64\": unknown value"), "{e}");
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
