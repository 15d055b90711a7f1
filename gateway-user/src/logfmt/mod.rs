//! The text log's field formatter: every value is written on one line.
//!
//! tracing-subscriber's default text fields write `%`-recorded values (and
//! every error) raw, so a newline inside a client-sent value would start a
//! forged log line. Here every field value has its control characters
//! escaped and is cut at [`FIELD_MAX_BYTES`]; string fields stay quoted as
//! before. (The JSON format escapes through JSON itself; echoed client
//! values are capped where they enter, see [`crate::errors::echo`].)

use std::fmt::{self, Write as _};

pub mod sink;

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
        let mut visitor = Visitor { writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes fields straight into the line: no value is formatted into a
/// buffer of its own first.
struct Visitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

/// A field's value as the visitor gets it.
#[derive(Clone, Copy)]
enum Value<'a> {
    /// Text, escaped (and quoted when asked).
    Text(&'a str, bool),
    /// Formatted, then escaped.
    Formatted(fmt::Arguments<'a>),
    /// A number or a boolean: written as it formats, nothing to escape.
    Plain(fmt::Arguments<'a>),
}

impl Visitor<'_> {
    fn write(&mut self, field: &Field, value: Value<'_>) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        let name = field.name();
        // `r#type` style names print without the raw prefix, as tracing does.
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = write_field(&mut self.writer, separator, name, value);
    }
}

/// ` name=value`, the value escaped (and quoted when it is quoted text).
fn write_field(out: &mut impl fmt::Write, separator: &str, name: &str, value: Value<'_>) -> fmt::Result {
    out.write_str(separator)?;
    if name != "message" {
        out.write_str(name)?;
        out.write_char('=')?;
    }
    let (quoted, written) = match value {
        Value::Plain(value) => return out.write_fmt(value),
        Value::Text(text, quoted) => {
            if quoted {
                out.write_char('"')?;
            }
            let mut escaped = Escaped { out: &mut *out, quoted, written: 0, cut: false };
            (quoted, escaped.write_str(text).map_err(|err| if escaped.cut { None } else { Some(err) }))
        }
        Value::Formatted(value) => {
            let mut escaped = Escaped { out: &mut *out, quoted: false, written: 0, cut: false };
            (false, escaped.write_fmt(value).map_err(|err| if escaped.cut { None } else { Some(err) }))
        }
    };
    // Once the value is cut the escaper refuses the rest, which stops the
    // value's formatting early: not a failure of the line.
    if let Err(Some(err)) = written {
        return Err(err);
    }
    if quoted {
        out.write_char('"')?;
    }
    Ok(())
}

/// A [`fmt::Write`] that passes text on with control characters (and, in
/// quoted values, quotes and backslashes) escaped, and cuts it at
/// [`FIELD_MAX_BYTES`] with `...`.
struct Escaped<'a, W: fmt::Write> {
    out: &'a mut W,
    quoted: bool,
    /// Bytes passed on so far.
    written: usize,
    /// The value was cut; the rest is refused.
    cut: bool,
}

impl<W: fmt::Write> Escaped<'_, W> {
    /// Whether `c` is written other than as itself.
    fn needs_escape(&self, c: char) -> bool {
        (self.quoted && matches!(c, '"' | '\\')) || c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
    }

    /// Passes `text` on if it fits; else writes the cut mark.
    fn pass(&mut self, text: &str) -> fmt::Result {
        if self.written + text.len() > FIELD_MAX_BYTES {
            self.cut = true;
            self.out.write_str("...")?;
            return Err(fmt::Error);
        }
        self.written += text.len();
        self.out.write_str(text)
    }
}

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while !rest.is_empty() {
            if self.cut {
                return Err(fmt::Error);
            }
            // The longest run written as it is, in whole characters (ASCII
            // text is looked at byte by byte).
            let run = match rest
                .bytes()
                .position(|b| !(0x20..0x7f).contains(&b) || (self.quoted && (b == b'"' || b == b'\\')))
            {
                Some(0) => rest.char_indices().find(|&(_, c)| self.needs_escape(c)).map_or(rest.len(), |(at, _)| at),
                Some(at) => at,
                None => rest.len(),
            };
            if run > 0 {
                let room = FIELD_MAX_BYTES.saturating_sub(self.written);
                if run > room {
                    // Whole characters up to the cap, then the mark.
                    let mut end = room;
                    while !rest.is_char_boundary(end) {
                        end -= 1;
                    }
                    self.pass(&rest[..end])?;
                    self.cut = true;
                    self.out.write_str("...")?;
                    return Err(fmt::Error);
                }
                self.pass(&rest[..run])?;
                rest = &rest[run..];
                continue;
            }
            let mut chars = rest.chars();
            let Some(c) = chars.next() else { break };
            let mut escape = [0u8; 16];
            let len = if matches!(c, '"' | '\\') {
                escape[0] = b'\\';
                escape[1] = c as u8;
                2
            } else {
                let mut len = 0;
                for e in c.escape_default() {
                    len += e.encode_utf8(&mut escape[len..]).len();
                }
                len
            };
            self.pass(std::str::from_utf8(&escape[..len]).map_err(|_| fmt::Error)?)?;
            rest = chars.as_str();
        }
        Ok(())
    }
}

/// An error with its causes, on one line (`outer: cause: root cause`), as
/// log lines and error messages quote it.
pub fn chain(err: &dyn std::error::Error) -> String {
    Chain(err).to_string()
}

/// Displays an error with its causes (see [`chain`]).
struct Chain<'a>(&'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let quoted = field.name() != "message";
        self.write(field, Value::Text(value, quoted));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write(field, Value::Plain(format_args!("{value}")));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write(field, Value::Plain(format_args!("{value}")));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write(field, Value::Plain(format_args!("{value}")));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.write(field, Value::Plain(format_args!("{value:?}")));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // With its causes, as tracing's own formatter writes them.
        self.write(field, Value::Formatted(format_args!("{}", Chain(value))));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, Value::Formatted(format_args!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(value: &str, quoted: bool) -> String {
        let mut out = String::new();
        let mut escaped = Escaped { out: &mut out, quoted, written: 0, cut: false };
        let _ = escaped.write_str(value);
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

    /// Lines as the text log writes them (no time), into a buffer.
    fn text_line(emit: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().map(|mut b| b.extend_from_slice(buf)).unwrap_or(());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn every_kind_of_value_is_written_as_before() {
        let err = std::io::Error::other("disk \"full\"\n");
        let line = text_line(|| {
            tracing::info!(
                target: "turnstile::access",
                request_id = "r-1",
                quote = "say \"hi\"",
                status = 200u16,
                delta = -3i64,
                ok = true,
                routing_ms = 0.25f64,
                whole = 2.0f64,
                missing = None::<&str>,
                path = %"/v1/chat\ncompletions",
                origin = ?"engine",
                error = &err as &(dyn std::error::Error + 'static),
                "request end"
            );
        });
        assert_eq!(
            line,
            " INFO turnstile::access: request end request_id=\"r-1\" quote=\"say \\\"hi\\\"\" status=200 delta=-3 \
             ok=true routing_ms=0.25 whole=2.0 path=/v1/chat\\ncompletions origin=\"engine\" error=disk \"full\"\\n\n"
        );
    }

    #[test]
    fn long_values_are_cut() {
        let line = escaped(&"x".repeat(6 << 20), false);
        assert_eq!(line.len(), FIELD_MAX_BYTES + 3);
        assert!(line.ends_with("..."));
    }
}
