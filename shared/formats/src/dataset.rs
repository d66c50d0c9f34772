//! JSONL fine-tuning datasets, checked line by line.
//!
//! Each non-blank line is one example, a JSON object of one of two formats:
//!
//! - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}, …]}` with at
//!   least two messages, at least one `user` message, and ending with an `assistant` message
//!   (the answer the model is trained to give). Other keys (e.g. a message's `name` or
//!   `weight`) are allowed and ignored.
//! - completion: `{"prompt": "…", "completion": "…"}` with a non-empty prompt.
//!
//! All examples of a dataset have the same format: the one the caller expects, or else the
//! first example's. Blank lines are skipped but still counted, so line numbers match an editor's.
//! A line longer than [`MAX_LINE_BYTES`] is an error (and is never held in memory whole).

use std::io::BufRead;

use serde_json::{Map, Value};

/// The longest line accepted: 1 MiB (without its line ending).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The fewest examples a dataset may have.
pub const MIN_EXAMPLES: u64 = 3;

const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// The format of a dataset's examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetFormat {
    Chat,
    Completion,
}

impl DatasetFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::Chat => "chat",
            DatasetFormat::Completion => "completion",
        }
    }

    /// The inverse of [`DatasetFormat::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "chat" => Some(DatasetFormat::Chat),
            "completion" => Some(DatasetFormat::Completion),
            _ => None,
        }
    }
}

impl std::fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a valid dataset holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSummary {
    pub format: DatasetFormat,
    pub example_count: u64,
    /// Every byte read, line endings and blank lines included.
    pub size_bytes: u64,
}

/// Why a dataset is not valid: `line` is 1-based, 0 for a problem of the whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetError {
    pub line: u64,
    pub reason: String,
}

impl DatasetError {
    pub fn new(line: u64, reason: impl Into<String>) -> Self {
        Self {
            line,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for DatasetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            f.write_str(&self.reason)
        } else {
            write!(f, "line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for DatasetError {}

/// Checks every line of a JSONL dataset. `file` names it in whole-file errors; `expected` fixes
/// the format (otherwise the first example does).
pub fn validate_jsonl(
    file: &str,
    mut reader: impl BufRead,
    expected: Option<DatasetFormat>,
) -> Result<DatasetSummary, DatasetError> {
    let mut format = expected.map(|f| (f, Origin::Expected));
    let mut example_count = 0u64;
    let mut size_bytes = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        line_no += 1;
        let err = |reason: String| DatasetError::new(line_no, reason);
        buf.clear();
        let (consumed, too_long) = read_line(&mut reader, &mut buf, MAX_LINE_BYTES)
            .map_err(|e| err(format!("read error: {e}")))?;
        if consumed == 0 {
            break;
        }
        size_bytes += consumed as u64;
        if too_long {
            return Err(err(format!("is longer than {} MiB", MAX_LINE_BYTES >> 20)));
        }
        let mut text = std::str::from_utf8(&buf).map_err(|_| err("is not valid UTF-8".into()))?;
        if line_no == 1 {
            text = text.strip_prefix('\u{feff}').unwrap_or(text);
        }
        if text.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(err(format!("is {}, not a JSON object", kind(&value))));
        };
        let this = match (obj.contains_key("messages"), obj.contains_key("prompt")) {
            (true, false) => DatasetFormat::Chat,
            (false, true) => DatasetFormat::Completion,
            (true, true) => {
                return Err(err(
                    "has both \"messages\" and \"prompt\"; an example is either chat or \
                     completion"
                        .into(),
                ));
            }
            (false, false) => {
                return Err(err(
                    "is neither a chat example (with \"messages\") nor a completion example \
                     (with \"prompt\" and \"completion\")"
                        .into(),
                ));
            }
        };
        match format {
            None => format = Some((this, Origin::Line(line_no))),
            Some((f, origin)) if f != this => {
                let why = match origin {
                    Origin::Expected => "as declared".to_string(),
                    Origin::Line(n) => format!("set by line {n}"),
                };
                return Err(err(format!(
                    "is a {this} example, but the dataset is {f} ({why})"
                )));
            }
            Some(_) => {}
        }
        match this {
            DatasetFormat::Chat => check_chat(&obj),
            DatasetFormat::Completion => check_completion(&obj),
        }
        .map_err(err)?;
        example_count += 1;
    }
    if example_count < MIN_EXAMPLES {
        let noun = if example_count == 1 {
            "example"
        } else {
            "examples"
        };
        return Err(DatasetError::new(
            0,
            format!("{file} has {example_count} {noun}; at least {MIN_EXAMPLES} are required"),
        ));
    }
    Ok(DatasetSummary {
        format: format.map(|(f, _)| f).expect("set by the first example"),
        example_count,
        size_bytes,
    })
}

/// Where a dataset's format came from.
#[derive(Clone, Copy)]
enum Origin {
    Expected,
    Line(u64),
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_chat(obj: &Map<String, Value>) -> Result<(), String> {
    let Some(Value::Array(messages)) = obj.get("messages") else {
        return Err(format!(
            "\"messages\" is {}, not an array of messages",
            kind(&obj["messages"])
        ));
    };
    if messages.len() < 2 {
        return Err(format!(
            "\"messages\" has {} message{}; at least 2 are required",
            messages.len(),
            if messages.len() == 1 { "" } else { "s" }
        ));
    }
    let mut last_role = "";
    let mut has_user = false;
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(format!("messages[{i}] is {}, not an object", kind(message)));
        };
        let role = match message.get("role") {
            None => return Err(format!("messages[{i}] has no \"role\"")),
            Some(Value::String(role)) => role.as_str(),
            Some(other) => {
                return Err(format!(
                    "messages[{i}].role is {}, not a string",
                    kind(other)
                ));
            }
        };
        if !ROLES.contains(&role) {
            return Err(format!(
                "messages[{i}] has unknown role {role:?} (expected system, user or assistant)"
            ));
        }
        match message.get("content") {
            Some(Value::String(_)) => {}
            None => return Err(format!("messages[{i}] has no \"content\"")),
            Some(other) => {
                return Err(format!(
                    "messages[{i}].content is {}, not a string",
                    kind(other)
                ));
            }
        }
        has_user |= role == "user";
        last_role = role;
    }
    if !has_user {
        return Err("\"messages\" has no user message".into());
    }
    if last_role != "assistant" {
        return Err(format!(
            "\"messages\" must end with an assistant message (the last is {last_role:?})"
        ));
    }
    Ok(())
}

fn check_completion(obj: &Map<String, Value>) -> Result<(), String> {
    match obj.get("prompt") {
        Some(Value::String(p)) if !p.is_empty() => {}
        Some(Value::String(_)) => return Err("\"prompt\" is empty".into()),
        Some(other) => return Err(format!("\"prompt\" is {}, not a string", kind(other))),
        None => unreachable!("a completion example has a prompt"),
    }
    match obj.get("completion") {
        Some(Value::String(_)) => Ok(()),
        None => Err("has no \"completion\"".into()),
        Some(other) => Err(format!("\"completion\" is {}, not a string", kind(other))),
    }
}

/// Reads one line into `buf` (without `\n` or `\r\n`), holding at most `limit` bytes of it.
/// Returns the bytes consumed (0 at the end of input) and whether the line was longer than
/// `limit` (then the rest of it is left unread).
fn read_line(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<(usize, bool)> {
    let mut consumed = 0;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            break;
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1),
            None => (available, available.len()),
        };
        let found_newline = done > chunk.len();
        if buf.len() + chunk.len() > limit + 1 {
            // +1 leaves room for a '\r' before the '\n'.
            let take = limit + 1 - buf.len();
            buf.extend_from_slice(&chunk[..take]);
            reader.consume(take);
            return Ok((consumed + take, true));
        }
        buf.extend_from_slice(chunk);
        reader.consume(done);
        consumed += done;
        if found_newline {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    let too_long = buf.len() > limit;
    Ok((consumed, too_long))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(user: &str) -> String {
        serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": "Sure."},
        ]})
        .to_string()
    }

    fn completion(prompt: &str) -> String {
        serde_json::json!({"prompt": prompt, "completion": " done"}).to_string()
    }

    fn validate(
        text: &str,
        expected: Option<DatasetFormat>,
    ) -> Result<DatasetSummary, DatasetError> {
        validate_jsonl("train.jsonl", text.as_bytes(), expected)
    }

    fn error(text: &str) -> DatasetError {
        validate(text, None).expect_err("should be rejected")
    }

    fn lines(v: &[String]) -> String {
        v.join("\n") + "\n"
    }

    #[test]
    fn accepts_chat_and_completion_datasets() {
        let text = lines(&[chat("a"), String::new(), chat("b"), "   ".into(), chat("c")]);
        let summary = validate(&text, None).unwrap();
        assert_eq!(
            summary,
            DatasetSummary {
                format: DatasetFormat::Chat,
                example_count: 3,
                size_bytes: text.len() as u64,
            }
        );
        let text = format!(
            "{}\r\n{}\r\n{}",
            completion("a"),
            completion("b"),
            completion("c")
        );
        let summary = validate(&text, Some(DatasetFormat::Completion)).unwrap();
        assert_eq!(summary.format, DatasetFormat::Completion);
        assert_eq!(summary.example_count, 3);
        assert_eq!(summary.size_bytes, text.len() as u64);
        // A byte-order mark on the first line is tolerated.
        let text = format!("\u{feff}{}", lines(&[chat("a"), chat("b"), chat("c")]));
        validate(&text, None).unwrap();
    }

    #[test]
    fn reports_the_bad_line_of_a_long_file() {
        let mut v: Vec<String> = (0..100).map(|i| chat(&format!("question {i}"))).collect();
        v[36] = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}"#.into();
        let err = error(&lines(&v));
        assert_eq!(err.line, 37);
        assert_eq!(
            err.to_string(),
            "line 37: messages[1] has unknown role \"bot\" (expected system, user or assistant)"
        );
        assert_eq!(
            validate(
                &lines(&{
                    v[36] = chat("x");
                    v
                }),
                None
            )
            .unwrap()
            .example_count,
            100
        );
    }

    #[test]
    fn invalid_json_includes_serdes_message() {
        let text = lines(&[chat("a"), "{\"messages\": [".into(), chat("c")]);
        let err = error(&text);
        assert_eq!(err.line, 2);
        assert!(
            err.reason.starts_with("invalid JSON: EOF while parsing"),
            "{err}"
        );
        let err = error(&lines(&[chat("a"), "[1, 2]".into()]));
        assert_eq!(err.to_string(), "line 2: is an array, not a JSON object");
    }

    #[test]
    fn the_first_example_fixes_the_format() {
        let text = lines(&[completion("a"), completion("b"), chat("c")]);
        assert_eq!(
            error(&text).to_string(),
            "line 3: is a chat example, but the dataset is completion (set by line 1)"
        );
        let text = lines(&[chat("a"), chat("b"), chat("c")]);
        let err = validate(&text, Some(DatasetFormat::Completion)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 1: is a chat example, but the dataset is completion (as declared)"
        );
    }

    #[test]
    fn checks_chat_examples() {
        let bad = |json: serde_json::Value| error(&lines(&[json.to_string()])).reason;
        assert_eq!(
            bad(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})),
            "\"messages\" has 1 message; at least 2 are required"
        );
        assert_eq!(
            bad(serde_json::json!({"messages": "hi"})),
            "\"messages\" is a string, not an array of messages"
        );
        assert_eq!(
            bad(serde_json::json!({"messages": [
                {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]})),
            "\"messages\" has no user message"
        );
        assert_eq!(
            bad(serde_json::json!({"messages": [
                {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                {"role": "user", "content": "z"}]})),
            "\"messages\" must end with an assistant message (the last is \"user\")"
        );
        assert_eq!(
            bad(serde_json::json!({"messages": [
                {"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]})),
            "messages[0].content is a number, not a string"
        );
        assert_eq!(
            bad(serde_json::json!({"messages": [
                {"content": "x"}, {"role": "assistant", "content": "y"}]})),
            "messages[0] has no \"role\""
        );
        assert_eq!(
            bad(serde_json::json!({"messages": [
                {"role": "user", "content": "x"}, "y"]})),
            "messages[1] is a string, not an object"
        );
        assert_eq!(
            bad(serde_json::json!({"messages": [
                {"role": "user"}, {"role": "assistant", "content": "y"}]})),
            "messages[0] has no \"content\""
        );
    }

    #[test]
    fn checks_completion_examples() {
        let bad = |json: serde_json::Value| error(&lines(&[json.to_string()])).reason;
        assert_eq!(
            bad(serde_json::json!({"prompt": "", "completion": "x"})),
            "\"prompt\" is empty"
        );
        assert_eq!(
            bad(serde_json::json!({"prompt": "p"})),
            "has no \"completion\""
        );
        assert_eq!(
            bad(serde_json::json!({"prompt": ["p"], "completion": "x"})),
            "\"prompt\" is an array, not a string"
        );
        assert_eq!(
            bad(serde_json::json!({"prompt": "p", "completion": null})),
            "\"completion\" is null, not a string"
        );
        assert!(bad(serde_json::json!({"text": "p"})).starts_with("is neither a chat example"));
        assert!(
            bad(serde_json::json!({"prompt": "p", "completion": "c", "messages": []}))
                .starts_with("has both")
        );
    }

    #[test]
    fn needs_three_examples() {
        let err = validate(&lines(&[chat("a"), String::new(), chat("b")]), None).unwrap_err();
        assert_eq!(err.line, 0);
        assert_eq!(
            err.to_string(),
            "train.jsonl has 2 examples; at least 3 are required"
        );
        assert_eq!(
            validate("", None).unwrap_err().to_string(),
            "train.jsonl has 0 examples; at least 3 are required"
        );
        assert_eq!(
            validate("\n\n", Some(DatasetFormat::Chat))
                .unwrap_err()
                .reason,
            "train.jsonl has 0 examples; at least 3 are required"
        );
    }

    #[test]
    fn rejects_long_lines_without_holding_them() {
        let long = chat(&"x".repeat(MAX_LINE_BYTES));
        let text = lines(&[chat("a"), long, chat("c")]);
        // A small buffer, so the long line arrives in many pieces.
        let reader = std::io::BufReader::with_capacity(1000, text.as_bytes());
        let err = validate_jsonl("train.jsonl", reader, None).unwrap_err();
        assert_eq!(err.to_string(), "line 2: is longer than 1 MiB");
        // Exactly 1 MiB (with \r\n) is fine.
        let pad = MAX_LINE_BYTES - chat("").len();
        let exact = chat(&"y".repeat(pad));
        assert_eq!(exact.len(), MAX_LINE_BYTES);
        let text = format!("{exact}\r\n{}\r\n{}", chat("b"), chat("c"));
        let reader = std::io::BufReader::with_capacity(1000, text.as_bytes());
        assert_eq!(validate_jsonl("t", reader, None).unwrap().example_count, 3);
    }

    #[test]
    fn rejects_invalid_utf8() {
        let mut bytes = lines(&[chat("a")]).into_bytes();
        bytes.extend(b"{\"prompt\": \"\xff\"}\n");
        let err = validate_jsonl("t", &bytes[..], None).unwrap_err();
        assert_eq!(err.to_string(), "line 2: is not valid UTF-8");
    }

    #[test]
    fn format_names_round_trip() {
        for f in [DatasetFormat::Chat, DatasetFormat::Completion] {
            assert_eq!(DatasetFormat::parse(f.as_str()), Some(f));
        }
        assert_eq!(DatasetFormat::parse("sft"), None);
    }
}
