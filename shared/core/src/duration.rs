//! Durations written as text, one grammar for configuration and the CLI: a number with a
//! unit `ms`, `s`, `m`, `h` or `d`, or a sum of them (`1h30m`).

use std::time::Duration;

const HINT: &str = "use a number with a unit ms, s, m, h or d, e.g. 500ms, 30s, 10m, 1h";

/// Parses `500ms`, `30s`, `10m`, `1h`, `2d` or a sum such as `1h30m`. The error says what is
/// wrong with the text (the caller names the key or flag).
pub fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("empty duration; {HINT}"));
    }
    let mut total = Duration::ZERO;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{text:?} is not a duration; {HINT}"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (unit, tail) = rest.split_at(unit_len);
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("{text:?}: missing unit; {HINT}")),
            other => return Err(format!("{text:?}: unknown unit {other:?}; {HINT}")),
        };
        let too_long = || format!("{text:?}: the duration is too long");
        let millis = number.checked_mul(millis_per_unit).ok_or_else(too_long)?;
        total = total
            .checked_add(Duration::from_millis(millis))
            .ok_or_else(too_long)?;
        rest = tail;
    }
    Ok(total)
}

/// Writes a duration in the grammar [`parse`] reads, in the largest units that are exact
/// (`90s` is `1m30s`, `1500ms` is `1s500ms`).
pub fn format(duration: Duration) -> String {
    let mut millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if millis >= size {
            out.push_str(&format!("{}{unit}", millis / size));
            millis %= size;
        }
    }
    out
}

/// Serde support for `Duration` fields written as text (`#[serde(with =
/// "kiln_core::duration::serde")]`).
/// A duration as the configuration's schema shows it (docs/config.md): text with a unit.
pub struct Text;

impl schemars::JsonSchema for Text {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "duration" })
    }
}

pub mod serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde support for `Option<Duration>` fields written as text (`#[serde(default, with =
/// "kiln_core::duration::optional")]`).
pub mod optional {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => serializer.serialize_str(&super::format(*d)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| super::parse(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_sums_parse() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse(" 1h30m ").unwrap(), Duration::from_secs(5_400));
    }

    #[test]
    fn bad_text_says_why() {
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("30").unwrap_err().contains("missing unit"));
        assert!(parse("5y").unwrap_err().contains("unknown unit"));
        assert!(parse("h").unwrap_err().contains("not a duration"));
        assert!(
            parse("99999999999999999999s")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse("999999999999999d").unwrap_err().contains("too long"));
    }

    #[test]
    fn format_round_trips() {
        for text in ["0s", "1m30s", "1s500ms", "2d", "1h", "250ms"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}
