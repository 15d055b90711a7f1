//! The text log's field formatter: every value is written on one line.
//!
//! tracing-subscriber's default text fields write `%`-recorded values (and
//! every error) raw, so a newline inside a client-sent value would start a
//! forged log line. Here every field value has its control characters
//! escaped and is cut at [`FIELD_MAX_BYTES`]; string fields stay quoted as
//! before. (The JSON format escapes through JSON itself; echoed client
//! values are capped where they enter, see [`crate::errors::echo`].)

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Longest field value written, in bytes (a 6 MB value is cut with `...`).
pub const FIELD_MAX_BYTES: usize = 1024;

/// [`FormatFields`] for the text log: `name=value` pairs, the message first
/// and bare, values escaped.
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Visitor { writer, first: true, scratch: String::new(), result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    scratch: String,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>, quoted: bool) {
        if self.result.is_err() {
            return;
        }
        self.scratch.clear();
        let _ = self.scratch.write_fmt(value);
        let separator = if self.first { "" } else { " " };
        self.first = false;
        let name = field.name();
        // `r#type` style names print without the raw prefix, as tracing does.
        let name = name.strip_prefix("r#").unwrap_or(name);
        let mut out = String::with_capacity(self.scratch.len().min(FIELD_MAX_BYTES) + name.len() + 4);
        out.push_str(separator);
        if name != "message" {
            out.push_str(name);
            out.push('=');
        }
        if quoted {
            out.push('"');
        }
        escape_into(&mut out, &self.scratch, quoted);
        if quoted {
            out.push('"');
        }
        self.result = self.writer.write_str(&out);
    }
}

/// Appends `value` with control characters (and, in quoted values, quotes
/// and backslashes) escaped, cut at [`FIELD_MAX_BYTES`].
fn escape_into(out: &mut String, value: &str, quoted: bool) {
    let start = out.len();
    for c in value.chars() {
        let before = out.len();
        match c {
            '"' | '\\' if quoted => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => out.extend(c.escape_default()),
            c => out.push(c),
        }
        if out.len() - start > FIELD_MAX_BYTES {
            out.truncate(before);
            out.push_str("...");
            break;
        }
    }
}

/// An error with its causes, on one line (`outer: cause: root cause`), as
/// log lines and error messages quote it.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let quoted = field.name() != "message";
        self.write(field, format_args!("{value}"), quoted);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // With its causes, as tracing's own formatter writes them.
        self.write(field, format_args!("{}", chain(value)), false);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, format_args!("{value:?}"), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(value: &str, quoted: bool) -> String {
        let mut out = String::new();
        escape_into(&mut out, value, quoted);
        out
    }

    #[test]
    fn control_characters_never_break_the_line() {
        let forged = "m\n2026-12-06T00:00:00.000000Z  INFO turnstile::access: request end status=200";
        let line = escaped(forged, false);
        assert!(!line.contains('\n'));
        assert!(line.starts_with("m\\n2026"));
        assert_eq!(escaped("a\r\u{1b}[2J\u{2028}", false), "a\\r\\u{1b}[2J\\u{2028}");
        assert_eq!(escaped("say \"hi\"\\", true), "say \\\"hi\\\"\\\\");
    }

    #[test]
    fn long_values_are_cut() {
        let line = escaped(&"x".repeat(6 << 20), false);
        assert_eq!(line.len(), FIELD_MAX_BYTES + 3);
        assert!(line.ends_with("..."));
    }
}
