//! JSON as the public API writes it, to and from the contract's messages (proto3 JSON through
//! the descriptors: camelCase, int64 as strings, `"3600s"`, RFC 3339), plus the few names
//! where the public API and Kiln differ.

use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::{Map, Value};

use crate::errors::{ApiError, Style};

/// Kiln's model kinds and the public API's names for them.
const MODEL_KINDS: [(&str, &str); 2] = [
    ("BASE_MODEL", "HF_BASE_MODEL"),
    ("LORA_ADDON", "HF_PEFT_ADDON"),
];

/// A request message from JSON; an unknown field or a wrong type is INVALID_ARGUMENT naming it.
pub fn message(
    descriptor: MessageDescriptor,
    mut value: Value,
    style: Style,
) -> Result<DynamicMessage, ApiError> {
    rename_kinds(&mut value, false);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(descriptor, value, &options)
        .map_err(|e| ApiError::invalid("body", e, style))
}

/// How an answer is written.
#[derive(Debug, Clone, Copy)]
pub enum Names {
    /// camelCase, fields at their default left out (the REST API).
    Public,
    /// snake_case with every field present (the OpenAI-style inference answers).
    OpenAi,
}

/// An answer message as JSON.
pub fn value(message: &DynamicMessage, names: Names) -> Value {
    let options = match names {
        Names::Public => SerializeOptions::new(),
        Names::OpenAi => SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(false),
    };
    let mut value = message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .unwrap_or_else(|e| panic!("a decoded message serializes: {e}"));
    if matches!(names, Names::Public) {
        rename_kinds(&mut value, true);
        name_status_codes(&mut value);
    }
    value
}

/// The public API's name of one of Kiln's enum values (most are the same).
pub fn public_enum_name(kiln: &str) -> &str {
    MODEL_KINDS
        .iter()
        .find(|(k, _)| *k == kiln)
        .map_or(kiln, |(_, public)| public)
}

/// Model kinds between Kiln's names and the public API's (`outbound`: to the caller).
fn rename_kinds(value: &mut Value, outbound: bool) {
    walk(value, &mut |object| {
        if let Some(Value::String(kind)) = object.get_mut("kind") {
            let found = MODEL_KINDS.iter().find(|(kiln, public)| match outbound {
                true => kind == kiln,
                false => kind == public,
            });
            if let Some((kiln, public)) = found {
                *kind = (if outbound { public } else { kiln }).to_string();
            }
        }
    });
}

/// `status.code` as the public API writes it: the code's name, not its number.
fn name_status_codes(value: &mut Value) {
    walk(value, &mut |object| {
        if let Some(Value::Object(status)) = object.get_mut("status")
            && let Some(code) = status.get("code").and_then(Value::as_i64)
        {
            let name = kiln_core::metrics::code_name(tonic::Code::from(code as i32));
            status.insert("code".into(), Value::String(name.into()));
        }
    });
}

fn walk(value: &mut Value, visit: &mut impl FnMut(&mut Map<String, Value>)) {
    match value {
        Value::Object(object) => {
            visit(object);
            for child in object.values_mut() {
                walk(child, visit);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| walk(v, visit)),
        _ => {}
    }
}

/// The field of `descriptor` a JSON key names (its camelCase or its proto name).
pub fn field_name(descriptor: &MessageDescriptor, key: &str) -> Option<String> {
    descriptor
        .get_field_by_json_name(key)
        .or_else(|| descriptor.get_field_by_name(key))
        .map(|f| f.name().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::pool;

    fn model() -> MessageDescriptor {
        pool()
            .get_message_by_name("kiln.registry.v1.Model")
            .unwrap()
    }

    #[test]
    fn the_public_names_go_in_and_come_out() {
        let body = serde_json::json!({
            "displayName": "mine",
            "kind": "HF_PEFT_ADDON",
            "peftDetails": {"baseModel": "accounts/kiln/models/b", "r": 8},
        });
        let message = message(model(), body, Style::Control).unwrap();
        let kind = message.get_field_by_name("kind").unwrap();
        assert_eq!(kind.as_enum_number(), Some(2), "LORA_ADDON");
        let back = value(&message, Names::Public);
        assert_eq!(back["kind"], "HF_PEFT_ADDON");
        assert_eq!(back["displayName"], "mine");
        assert_eq!(back["peftDetails"]["r"], 8);
    }

    #[test]
    fn an_unknown_field_is_named() {
        let err = message(model(), serde_json::json!({"colour": 1}), Style::Control).unwrap_err();
        assert_eq!(err.status.code(), tonic::Code::InvalidArgument);
        assert!(
            err.status.message().contains("colour"),
            "{}",
            err.status.message()
        );
    }

    #[test]
    fn a_status_code_is_written_by_name() {
        let status = serde_json::json!({"state": {"status": {"code": 5, "message": "gone"}}});
        let mut value = status;
        name_status_codes(&mut value);
        assert_eq!(value["state"]["status"]["code"], "NOT_FOUND");
    }
}
