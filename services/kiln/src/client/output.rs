//! Printing: resources as aligned tables by default, as proto3 JSON (snake_case field names)
//! with `-o json`; the progress line of long commands on stderr.

use std::io::Write;
use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// Prints a line of command output. A closed pipe (`kiln list users | head`) ends the
/// command quietly instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(err) = writeln!(out, $($arg)*) {
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}
pub(crate) use say;

/// How command output is printed (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A table column: its header, and the cell a message shows under it.
pub(crate) type Column<M> = (&'static str, fn(&M) -> String);

/// A message the CLI prints: its proto name (for JSON) and its table columns.
pub(crate) trait Printable: prost::Message + Sized + 'static {
    /// The full proto name, e.g. `kiln.identity.v1.User`.
    const PROTO_NAME: &'static str;
    /// The table's columns, left to right.
    const COLUMNS: &'static [Column<Self>];

    /// The table's column headers.
    fn headers() -> Vec<&'static str> {
        Self::COLUMNS.iter().map(|(header, _)| *header).collect()
    }

    /// The message's table row: one cell per column.
    fn row(&self) -> Vec<String> {
        Self::COLUMNS.iter().map(|(_, cell)| cell(self)).collect()
    }
}

/// Declares how a message prints: its proto name (for JSON), then its table's columns, each
/// a header and the cell a message shows under it:
///
/// ```ignore
/// printable!(idv1::User, "kiln.identity.v1.User" {
///     "NAME" => |u| u.name.clone(),
///     "CREATED" => |u| time(&u.create_time),
/// });
/// ```
macro_rules! printable {
    ($message:ty, $proto_name:literal { $($header:literal => $cell:expr),+ $(,)? }) => {
        impl $crate::client::Printable for $message {
            const PROTO_NAME: &'static str = $proto_name;
            const COLUMNS: &'static [$crate::client::Column<Self>] = &[$(($header, $cell)),+];
        }
    };
}
pub(crate) use printable;

/// Prints one resource: a table of one row, or a JSON object.
pub(crate) fn print_one<M: Printable>(format: Format, item: &M) {
    say!("{}", render(format, std::slice::from_ref(item), true));
}

/// Prints a listing: a table, or a JSON array.
pub(crate) fn print_list<M: Printable>(format: Format, items: &[M]) {
    say!("{}", render(format, items, false));
}

/// Prints any message as JSON (`full_name` its proto name).
pub(crate) fn print_json<M: prost::Message>(full_name: &str, message: &M) {
    say!("{}", json_text(&to_json(full_name, message)));
}

/// Prints what a delete removed (the delete RPCs answer with an empty message).
pub(crate) fn print_deleted(format: Format, name: &str) {
    say!("{}", deleted_text(format, name));
}

fn render<M: Printable>(format: Format, items: &[M], single: bool) -> String {
    match format {
        Format::Json => {
            let mut values: Vec<_> = items.iter().map(|m| to_json(M::PROTO_NAME, m)).collect();
            if single && values.len() == 1 {
                json_text(&values.remove(0))
            } else {
                json_text(&serde_json::Value::Array(values))
            }
        }
        Format::Table => {
            let rows: Vec<_> = items.iter().map(Printable::row).collect();
            table(&M::headers(), &rows).trim_end().to_owned()
        }
    }
}

fn deleted_text(format: Format, name: &str) -> String {
    match format {
        Format::Json => json_text(&serde_json::json!({ "name": name })),
        Format::Table => format!("deleted {name}"),
    }
}

fn json_text(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(kiln_proto::FILE_DESCRIPTOR_SET)
            .expect("the generated descriptor set decodes")
    })
}

/// A message as proto3 JSON, through its descriptor (`full_name` e.g. `kiln.identity.v1.User`).
pub(crate) fn to_json<M: prost::Message>(full_name: &str, message: &M) -> serde_json::Value {
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
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
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
pub(crate) fn time(ts: &Option<prost_types::Timestamp>) -> String {
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

/// The proto name of an enum field's value (`?` for a value this CLI does not know), e.g.
/// `enum_name(m.state, State::as_str_name)`.
pub(crate) fn enum_name<E: TryFrom<i32>>(value: i32, name: fn(&E) -> &'static str) -> String {
    E::try_from(value)
        .map(|e| name(&e))
        .unwrap_or("?")
        .to_owned()
}

/// `yes` or `no`.
pub(crate) fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// A progress line: rewritten in place on a terminal, one line per change otherwise (a log
/// or a pipe gets no carriage returns).
pub(crate) struct ProgressLine {
    tty: bool,
    last: Option<String>,
    width: usize,
}

impl ProgressLine {
    pub(crate) fn new(tty: bool) -> Self {
        Self {
            tty,
            last: None,
            width: 0,
        }
    }

    /// Whether the line is rewritten in place.
    pub(crate) fn is_terminal(&self) -> bool {
        self.tty
    }

    /// Shows `text` when it differs from the last one shown.
    pub(crate) fn show(&mut self, out: &mut impl Write, text: &str) -> std::io::Result<()> {
        if self.last.as_deref() == Some(text) {
            return Ok(());
        }
        if self.tty {
            // Blank out what is left of a longer previous line.
            let width = text.chars().count();
            let pad = self.width.saturating_sub(width);
            write!(out, "\r{text}{:pad$}", "")?;
            self.width = width;
        } else {
            writeln!(out, "{text}")?;
        }
        out.flush()?;
        self.last = Some(text.to_owned());
        Ok(())
    }

    /// Ends the line on a terminal, so what follows starts on a line of its own.
    pub(crate) fn finish(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.tty && self.last.is_some() {
            writeln!(out)?;
            out.flush()?;
        }
        self.last = None;
        self.width = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::common::v1::Status;
    use kiln_proto::identity::v1 as idv1;

    use super::*;

    printable!(Status, "kiln.common.v1.Status" {
        "MESSAGE" => |s| s.message.clone(),
        "CODE" => |s| s.code.to_string(),
    });

    fn status(message: &str) -> Status {
        Status {
            code: 5,
            message: message.into(),
        }
    }

    #[test]
    fn json_uses_proto_names() {
        let user = idv1::User {
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

    #[test]
    fn one_resource_is_an_object_and_a_listing_an_array() {
        let one: serde_json::Value =
            serde_json::from_str(&render(Format::Json, &[status("m1")], true)).unwrap();
        assert_eq!(one, serde_json::json!({ "code": 5, "message": "m1" }));
        let listed: serde_json::Value =
            serde_json::from_str(&render(Format::Json, &[status("m1")], false)).unwrap();
        assert_eq!(listed, serde_json::json!([{ "code": 5, "message": "m1" }]));
        assert_eq!(render(Format::Json, &[] as &[Status], false), "[]");
        assert_eq!(
            render(Format::Table, &[status("m1"), status("m22")], false),
            "MESSAGE  CODE\nm1       5\nm22      5"
        );
    }

    #[test]
    fn deletes_print_in_the_asked_format() {
        assert_eq!(
            deleted_text(Format::Table, "accounts/a/models/m"),
            "deleted accounts/a/models/m"
        );
        let json: serde_json::Value =
            serde_json::from_str(&deleted_text(Format::Json, "accounts/a/models/m")).unwrap();
        assert_eq!(json, serde_json::json!({ "name": "accounts/a/models/m" }));
    }

    #[test]
    fn enum_names_read_known_values_only() {
        use idv1::user::State;
        assert_eq!(enum_name(State::Ready as i32, State::as_str_name), "READY");
        assert_eq!(enum_name(99, State::as_str_name), "?");
    }

    #[test]
    fn progress_line_rewrites_in_place_on_a_terminal() {
        let mut out = Vec::new();
        let mut line = ProgressLine::new(true);
        line.show(&mut out, "CREATING long").unwrap();
        line.show(&mut out, "CREATING long").unwrap();
        line.show(&mut out, "READY").unwrap();
        line.finish(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\rCREATING long\rREADY        \n"
        );
    }

    #[test]
    fn progress_line_prints_one_line_per_change_otherwise() {
        let mut out = Vec::new();
        let mut line = ProgressLine::new(false);
        for text in ["CREATING a", "CREATING a", "CREATING b", "READY"] {
            line.show(&mut out, text).unwrap();
        }
        line.finish(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "CREATING a\nCREATING b\nREADY\n"
        );
        // Nothing shown: finishing writes nothing either.
        let mut out = Vec::new();
        ProgressLine::new(true).finish(&mut out).unwrap();
        assert!(out.is_empty());
    }
}
