//! Just enough of the protobuf wire format to copy a message field by field, changing the few
//! fields Kiln rewrites and keeping every other byte as it was (fields the ONNX subset of
//! [`crate::onnx_proto`] does not declare included).

/// One field of a message.
#[derive(Debug)]
pub(super) struct Field<'a> {
    pub(super) number: u64,
    /// The field as encoded, key included.
    pub(super) whole: &'a [u8],
    /// A length-delimited field's contents.
    pub(super) payload: Option<&'a [u8]>,
}

fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or("the message ends inside a varint")?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a varint is longer than 10 bytes".into())
}

/// The fields of `message`, in order.
pub(super) fn fields(message: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let start = at;
        let key = varint(message, &mut at)?;
        let payload = match key & 7 {
            0 => {
                varint(message, &mut at)?;
                None
            }
            1 => {
                at += 8;
                None
            }
            5 => {
                at += 4;
                None
            }
            2 => {
                let len = varint(message, &mut at)? as usize;
                let end = at
                    .checked_add(len)
                    .filter(|&end| end <= message.len())
                    .ok_or("a length-delimited field reaches past the end of its message")?;
                let payload = &message[at..end];
                at = end;
                Some(payload)
            }
            other => return Err(format!("wire type {other} is not supported")),
        };
        if at > message.len() {
            return Err("a field reaches past the end of its message".into());
        }
        out.push(Field {
            number: key >> 3,
            whole: &message[start..at],
            payload,
        });
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends length-delimited field `number` holding `payload`.
pub(super) fn put_bytes(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, (number << 3) | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// The int64 values of repeated field `number` of `message`, packed or not.
pub(super) fn int64s(message: &[u8], number: u64) -> Result<Vec<i64>, String> {
    let mut values = Vec::new();
    for field in fields(message)? {
        if field.number != number {
            continue;
        }
        match field.payload {
            Some(packed) => {
                let mut at = 0;
                while at < packed.len() {
                    values.push(varint(packed, &mut at)? as i64);
                }
            }
            None => {
                let mut at = 0;
                varint(field.whole, &mut at)?;
                values.push(varint(field.whole, &mut at)? as i64);
            }
        }
    }
    Ok(values)
}

/// The last string in field `number` of `message` (empty if none).
pub(super) fn string(message: &[u8], number: u64) -> Result<String, String> {
    let mut value = String::new();
    for field in fields(message)? {
        if field.number == number
            && let Some(payload) = field.payload
        {
            value = String::from_utf8(payload.to_vec())
                .map_err(|_| format!("field {number} is not UTF-8"))?;
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_packed_or_plain_ints_read_alike() {
        let mut message = Vec::new();
        put_bytes(&mut message, 8, b"name");
        // dims = 1, unpacked: 3, 300.
        message.extend([0x08, 3, 0x08, 0xac, 0x02]);
        // dims packed: 5.
        put_bytes(&mut message, 1, &[5]);
        let parsed = fields(&message).unwrap();
        assert_eq!(parsed.len(), 4);
        assert_eq!(
            parsed
                .iter()
                .flat_map(|f| f.whole)
                .copied()
                .collect::<Vec<_>>(),
            message
        );
        assert_eq!(int64s(&message, 1).unwrap(), [3, 300, 5]);
        assert_eq!(string(&message, 8).unwrap(), "name");
        assert!(fields(&[0x0a, 5, 1]).unwrap_err().contains("past the end"));
        assert!(fields(&[0x0b]).unwrap_err().contains("wire type 3"));
    }
}
