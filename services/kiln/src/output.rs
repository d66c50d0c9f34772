//! Printing resources: aligned tables by default, proto3 JSON (snake_case field names) with
//! `-o json`.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(kiln_proto::FILE_DESCRIPTOR_SET)
            .expect("the generated descriptor set decodes")
    })
}

/// A message as proto3 JSON, through its descriptor (`full_name` e.g. `kiln.identity.v1.User`).
pub fn to_json<M: prost::Message>(full_name: &str, message: &M) -> serde_json::Value {
    let descriptor = pool()
        .get_message_by_name(full_name)
        .unwrap_or_else(|| panic!("{full_name} is in the descriptor set"));
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message decodes with its own descriptor");
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .expect("a message serializes to JSON")
}

/// Renders rows under headers, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// A timestamp as RFC 3339 (UTC, seconds).
pub fn time(ts: &Option<prost_types::Timestamp>) -> String {
    match ts {
        Some(ts) => {
            // prost-types formats Timestamp as RFC 3339.
            let text = ts.to_string();
            match text.split_once('.') {
                Some((secs, _)) => format!("{secs}Z"),
                None => text,
            }
        }
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_proto_names() {
        let user = kiln_proto::identity::v1::User {
            name: "accounts/a/users/u".into(),
            service_account: true,
            ..Default::default()
        };
        let json = to_json("kiln.identity.v1.User", &user);
        assert_eq!(json["name"], "accounts/a/users/u");
        assert_eq!(json["service_account"], true);
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
