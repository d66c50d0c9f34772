//! `docs/events.md`, the reference for event consumers, generated from the contract
//! (`proto/kiln/events/v1`): every subject, its payload message and fields, with what the bus
//! guarantees. The test fails when the committed file differs from what the contract renders
//! (`KILN_WRITE_DOCS=1 cargo test -p kiln-events --test reference` rewrites it), and when a
//! subject the reference lists is not the one the code publishes, or the other way round.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The areas of the body's field numbers (as events.proto assigns them).
const AREAS: [(&str, std::ops::Range<u32>); 5] = [
    ("identity", 10..40),
    ("registry", 40..70),
    ("scheduler", 70..110),
    ("billing", 110..140),
    ("inference", 140..170),
];

/// What an event says happened, the last words of its message's name.
const VERBS: [&str; 16] = [
    "StateChanged",
    "Undeleted",
    "Unsuspended",
    "Created",
    "Updated",
    "Deleted",
    "Scaled",
    "Started",
    "Stopped",
    "Connected",
    "Lost",
    "Progress",
    "Completed",
    "Prepared",
    "Suspended",
    "Recorded",
];

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `kiln.<area>.<resource>.<verb>` of a body field.
fn subject(field: &FieldDescriptor) -> String {
    let number = field.number();
    let area = AREAS
        .iter()
        .find(|(_, range)| range.contains(&number))
        .map(|(area, _)| *area)
        .unwrap_or_else(|| panic!("body field {number} is in no area's range"));
    let name = match field.kind() {
        Kind::Message(message) => message.name().to_owned(),
        other => panic!("body field {} is a {other:?}", field.name()),
    };
    let verb = VERBS
        .iter()
        .find(|verb| name.ends_with(*verb) && name.len() > verb.len())
        .unwrap_or_else(|| panic!("{name} ends in no known verb"));
    let resource = &name[..name.len() - verb.len()];
    format!("kiln.{area}.{}.{}", snake(resource), snake(verb))
}

fn type_name(field: &FieldDescriptor) -> String {
    let base = match field.kind() {
        Kind::Message(m) => format!("`{}`", m.full_name()),
        Kind::Enum(e) => format!("`{}`", e.full_name()),
        other => format!("{other:?}").to_lowercase(),
    };
    if field.is_list() {
        format!("repeated {base}")
    } else if field.is_map() {
        format!("map {base}")
    } else {
        base
    }
}

/// A comment as one line of Markdown.
fn one_line(comment: Option<&str>) -> String {
    comment
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// The leading comment of what sits at `path` in `file`, if the contract has one.
fn comment_at(file: &prost_reflect::FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    info.location
        .iter()
        .find(|l| l.path == path)
        .and_then(|l| l.leading_comments.clone())
}

fn comment_of(message: &MessageDescriptor) -> Option<String> {
    comment_at(&message.parent_file(), message.path())
}

fn render() -> (String, BTreeSet<String>) {
    let pool = DescriptorPool::decode(kiln_proto::FILE_DESCRIPTOR_SET).unwrap();
    let event = pool.get_message_by_name("kiln.events.v1.Event").unwrap();
    let body = event.oneofs().find(|o| o.name() == "body").unwrap();
    let mut out = String::from(
        "# Kiln events\n\n\
         <!-- Generated from proto/kiln/events/v1 by shared/events/tests/reference.rs \
         (KILN_WRITE_DOCS=1 cargo test -p kiln-events --test reference); do not edit. -->\n\n\
         Every fact a Kiln service records is published on NATS JetStream as one \
         `kiln.events.v1.Event` (protobuf), on subject `kiln.<area>.<resource>.<verb>`, in the \
         stream `KILN` (configurable: `nats_stream`) that holds `kiln.>`.\n\n\
         ## Delivery\n\n\
         - **When**: a service writes the event into its database's outbox in the same \
         transaction as the change it describes; a relay publishes it after the commit. An \
         event is therefore never published for a change that did not happen, and never lost \
         for one that did (a crash between commit and publish is caught up at the next start).\n\
         - **At least once**: the relay may publish an event again after a failure. The \
         event's `id` (a UUIDv7) is also the message's `Nats-Msg-Id` header, so JetStream \
         drops a duplicate within its duplicate window (10 minutes); beyond it, consumers \
         dedupe by `id` (Kiln's own consumers keep the ids they processed, e.g. billing books \
         each usage event once).\n\
         - **Order**: per subject, in publication order; across subjects, use `time`.\n\
         - **Replay**: the stream keeps events for 30 days. A durable JetStream consumer with \
         `deliver_policy = all` (or `by_start_time`) and a `filter_subject` such as \
         `kiln.scheduler.>` reads them from the start; acknowledge each message after handling \
         it.\n\
         - **Envelope**: `id`, `type` (the subject without `kiln.`), `source` (the service), \
         `time`, `account` (`accounts/{account}`), `resource` (the full name of the resource), \
         `trace_context` (W3C traceparent of the request that caused it, also in the \
         message's `traceparent` header), and exactly one body below.\n\n",
    );
    let mut subjects = BTreeSet::new();
    let mut area = String::new();
    for field in body.fields() {
        let subject = subject(&field);
        let this_area = subject.split('.').nth(1).unwrap();
        if this_area != area {
            let _ = writeln!(out, "## {this_area}\n");
            area = this_area.to_owned();
        }
        let Kind::Message(message) = field.kind() else {
            unreachable!("checked in subject()")
        };
        let _ = writeln!(out, "### `{subject}`\n");
        let _ = writeln!(
            out,
            "Body `{}` (field `{}` = {}).",
            message.full_name(),
            field.name(),
            field.number()
        );
        // Message comments may begin with their subject: it is the heading already.
        let comment = one_line(comment_of(&message).as_deref());
        let comment = comment
            .strip_prefix(&subject)
            .map(|rest| rest.trim_start_matches(':').trim())
            .unwrap_or(&comment);
        if !comment.is_empty() {
            let _ = writeln!(out, "{comment}");
        }
        out.push('\n');
        let fields: Vec<_> = message.fields().collect();
        if fields.is_empty() {
            out.push_str("No fields: the envelope's `resource` says which.\n\n");
        } else {
            out.push_str("| field | type | about |\n|---|---|---|\n");
            for f in fields {
                let about = one_line(comment_at(&f.parent_file(), f.path()).as_deref());
                let _ = writeln!(out, "| `{}` | {} | {about} |", f.name(), type_name(&f));
            }
            out.push('\n');
        }
        subjects.insert(subject);
    }
    (out, subjects)
}

/// The event types (`area.resource.verb`) the services' code publishes: the string literals
/// of that shape in their non-test sources.
fn published_types() -> BTreeSet<String> {
    let mut types = BTreeSet::new();
    let mut dirs = vec![std::path::PathBuf::from(format!("{ROOT}/services"))];
    dirs.push(format!("{ROOT}/shared").into());
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "tests" && name != "target" {
                    dirs.push(path);
                }
                continue;
            }
            if !name.ends_with(".rs") || name == "tests.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Test modules at the end of a file are not publishers.
            let text = text.split("#[cfg(test)]").next().unwrap();
            for literal in text.split('"').skip(1).step_by(2) {
                let parts: Vec<&str> = literal.split('.').collect();
                let shaped = parts.len() == 3
                    && AREAS.iter().any(|(area, _)| *area == parts[0])
                    && parts[1..].iter().all(|p| {
                        !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    });
                if shaped {
                    types.insert(literal.to_owned());
                }
            }
        }
    }
    types
}

#[test]
fn the_events_reference_is_the_contract_and_names_what_the_code_publishes() {
    let (rendered, subjects) = render();
    let path = format!("{ROOT}/docs/events.md");
    if std::env::var_os("KILN_WRITE_DOCS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == rendered,
        "docs/events.md is not what the contract renders: \
         KILN_WRITE_DOCS=1 cargo test -p kiln-events --test reference"
    );
    let listed: BTreeSet<String> = subjects
        .iter()
        .map(|s| s.trim_start_matches("kiln.").to_owned())
        .collect();
    let published = published_types();
    let unlisted: Vec<_> = published.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "published, not in the reference: {unlisted:?}"
    );
    let silent: Vec<_> = listed.difference(&published).collect();
    assert!(
        silent.is_empty(),
        "in the reference, published nowhere: {silent:?}"
    );
}
