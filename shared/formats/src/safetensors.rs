//! The header of a safetensors file: an 8-byte little-endian header length, a JSON object
//! `{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__":
//! {..}}`, then the tensor data. Offsets are relative to the start of the data (just after the
//! header). Each tensor's offsets are checked to lie within the file, to match its dtype and
//! shape, and not to overlap another tensor's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::FormatError;

/// The longest JSON header accepted (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor as the header describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// `F32`, `F16`, `BF16`, `F64`, `I64`, `I32`, `I16`, `I8`, `U8`, `BOOL`, ….
    pub dtype: String,
    pub shape: Vec<u64>,
    /// `[begin, end)` in bytes, relative to the start of the data section.
    pub data_offsets: (u64, u64),
}

impl TensorEntry {
    /// The number of elements (1 for a scalar), `None` on overflow.
    pub fn element_count(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// The byte size of one element of a safetensors dtype, `None` for dtypes Kiln does not know.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// Reads and checks the header of a whole safetensors file held in `bytes`.
pub fn read_safetensors_header(
    file: &str,
    bytes: &[u8],
) -> Result<BTreeMap<String, TensorEntry>, FormatError> {
    read_header_prefix(file, bytes, bytes.len() as u64)
}

/// Like [`read_safetensors_header`], for a file of `file_len` bytes of which only a prefix is at hand
/// (`prefix` must hold at least the 8 length bytes and the JSON header); see [`header_len`].
pub fn read_header_prefix(
    file: &str,
    prefix: &[u8],
    file_len: u64,
) -> Result<BTreeMap<String, TensorEntry>, FormatError> {
    let err = |problem: String| FormatError::new(file, problem);
    let n = header_len(file, prefix)?;
    let data_start = 8 + n;
    if data_start > file_len {
        return Err(err(format!(
            "the header is said to be {n} bytes long but the file has only {file_len} bytes; \
             it is truncated or not a safetensors file"
        )));
    }
    let Some(json) = prefix.get(8..data_start as usize) else {
        return Err(err(format!(
            "only {} of the header's {n} bytes were given",
            prefix.len().saturating_sub(8)
        )));
    };
    let data_len = file_len - data_start;

    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| err(format!("the header is not a JSON object: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let entry: TensorEntry = serde_json::from_value(value)
            .map_err(|e| err(format!("tensor {name:?} has a malformed entry: {e}")))?;
        let (begin, end) = entry.data_offsets;
        if begin > end || end > data_len {
            return Err(err(format!(
                "tensor {name:?} has data offsets [{begin}, {end}] outside the {data_len} bytes \
                 of data"
            )));
        }
        let Some(size) = dtype_size(&entry.dtype) else {
            return Err(err(format!(
                "tensor {name:?} has unknown dtype {:?}",
                entry.dtype
            )));
        };
        let expected = entry.element_count().and_then(|c| c.checked_mul(size));
        if expected != Some(end - begin) {
            return Err(err(format!(
                "tensor {name:?} ({} {:?}) needs {} bytes but its data offsets span {}",
                entry.dtype,
                entry.shape,
                expected.map_or_else(|| "too many".to_string(), |e| e.to_string()),
                end - begin
            )));
        }
        tensors.insert(name, entry);
    }

    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .filter(|(_, t)| t.data_offsets.0 < t.data_offsets.1)
        .map(|(name, t)| (t.data_offsets.0, t.data_offsets.1, name.as_str()))
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, end_a, a), (begin_b, _, b)) = (pair[0], pair[1]);
        if begin_b < end_a {
            return Err(err(format!("tensors {a:?} and {b:?} overlap")));
        }
    }
    Ok(tensors)
}

/// The JSON header's length, read from the first 8 bytes (bounded by [`MAX_HEADER_LEN`]).
pub fn header_len(file: &str, prefix: &[u8]) -> Result<u64, FormatError> {
    let Some(len) = prefix.get(..8) else {
        return Err(FormatError::new(
            file,
            format!(
                "not a safetensors file: it has {} bytes, fewer than the 8 of the header length",
                prefix.len()
            ),
        ));
    };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(FormatError::new(
            file,
            format!("not a safetensors file: its header would be {n} bytes long"),
        ));
    }
    Ok(n)
}

/// A safetensors file of float32 tensors `(name, shape, values)`, laid out in the order given.
pub fn write_safetensors_f32(tensors: &[(&str, &[usize], &[f32])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        let end = offset + 4 * values.len();
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::Value::Object(header).to_string();
    // The data starts 8-byte aligned, as the reference writer keeps it.
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json.as_bytes());
    for (_, _, values) in tensors {
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A safetensors file with these `(name, dtype, shape)` tensors laid out back to back (data
    /// zeroed), plus a `__metadata__` entry.
    pub(crate) fn build(tensors: &[(&str, &str, &[u64])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0u64;
        for (name, dtype, shape) in tensors {
            let size = dtype_size(dtype).unwrap() * shape.iter().product::<u64>();
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}),
            );
            offset += size;
        }
        with_header(&serde_json::Value::Object(header).to_string(), offset)
    }

    fn with_header(json: &str, data_len: u64) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json.as_bytes());
        out.resize(out.len() + data_len as usize, 0);
        out
    }

    fn problem(bytes: &[u8]) -> String {
        read_safetensors_header("a.safetensors", bytes)
            .expect_err("should be rejected")
            .problem
    }

    #[test]
    fn reads_tensors_and_skips_metadata() {
        let bytes = build(&[
            ("w", "F32", &[2, 3]),
            ("b", "BF16", &[3]),
            ("ids", "I64", &[4]),
            ("mask", "BOOL", &[5]),
            ("q", "I8", &[7]),
            ("u", "U8", &[1, 1]),
            ("h", "F16", &[2]),
            ("d", "F64", &[]),
            ("i", "I32", &[2]),
        ]);
        let tensors = read_safetensors_header("a.safetensors", &bytes).unwrap();
        assert_eq!(tensors.len(), 9);
        assert!(!tensors.contains_key("__metadata__"));
        assert_eq!(
            tensors["w"],
            TensorEntry {
                dtype: "F32".into(),
                shape: vec![2, 3],
                data_offsets: (0, 24)
            }
        );
        assert_eq!(tensors["b"].data_offsets, (24, 30));
        assert_eq!(tensors["d"].shape, Vec::<u64>::new());
        assert_eq!(tensors["d"].element_count(), Some(1));
    }

    #[test]
    fn reads_from_a_prefix() {
        let bytes = build(&[("w", "F32", &[1000])]);
        let n = header_len("a", &bytes).unwrap() as usize;
        let tensors = read_header_prefix("a", &bytes[..8 + n], bytes.len() as u64).unwrap();
        assert_eq!(tensors["w"].data_offsets, (0, 4000));
        let err = read_header_prefix("a", &bytes[..8 + n - 1], bytes.len() as u64).unwrap_err();
        assert!(err.problem.contains("were given"), "{err}");
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(
            problem(b"abc"),
            "not a safetensors file: it has 3 bytes, fewer than the 8 of the header length"
        );
        let mut bytes = build(&[("w", "F32", &[2])]);
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(problem(&bytes).contains("its header would be"));
        let mut bytes = build(&[("w", "F32", &[2])]);
        bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(problem(&bytes).contains("is truncated"));
    }

    /// A rejection's problem: all of it, or how it starts (serde's own wording follows).
    enum Problem {
        Is(&'static str),
        StartsWith(&'static str),
    }

    #[test]
    fn rejects_bad_headers() {
        use Problem::{Is, StartsWith};
        // The header's JSON, the length of the data after it, and the problem.
        let cases = [
            ("[1, 2]", 0, StartsWith("the header is not a JSON object")),
            (
                r#"{"w": {"dtype": "F32", "shape": [2]}}"#,
                8,
                StartsWith("tensor \"w\" has a malformed entry: missing field `data_offsets`"),
            ),
            (
                r#"{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}"#,
                8,
                StartsWith("tensor \"w\" has a malformed entry"),
            ),
            // Offsets outside the data.
            (
                r#"{"w": {"dtype": "F32", "shape": [0], "data_offsets": [5, 4]}}"#,
                8,
                Is("tensor \"w\" has data offsets [5, 4] outside the 8 bytes of data"),
            ),
            // Sizes that do not match the dtype and shape.
            (
                r#"{"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 24]}}"#,
                24,
                Is("tensor \"w\" (F16 [2, 3]) needs 12 bytes but its data offsets span 24"),
            ),
            (
                r#"{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}"#,
                1,
                Is("tensor \"w\" has unknown dtype \"Q4\""),
            ),
            (
                r#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 1]}}"#,
                1,
                Is(
                    "tensor \"w\" (F32 [4294967296, 4294967296]) needs too many bytes but its \
                     data offsets span 1",
                ),
            ),
            // Overlapping tensors.
            (
                r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
                12,
                Is("tensors \"a\" and \"b\" overlap"),
            ),
        ];
        for (json, data_len, expected) in cases {
            let p = problem(&with_header(json, data_len));
            match expected {
                Is(expected) => assert_eq!(p, expected, "{json}"),
                StartsWith(start) => assert!(p.starts_with(start), "{json}: {p}"),
            }
        }
    }

    #[test]
    fn rejects_offsets_outside_the_file() {
        let bytes = build(&[("w", "F32", &[2])]);
        let truncated = &bytes[..bytes.len() - 1];
        assert_eq!(
            problem(truncated),
            "tensor \"w\" has data offsets [0, 8] outside the 7 bytes of data"
        );
    }
}
