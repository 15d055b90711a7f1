//! Reading token usage from responses on their way through.
//!
//! Streams are scanned line by line as frames pass; only a line split across
//! two frames is copied, and only lines mentioning `"usage"` are parsed.
//! Non-stream JSON answers are kept (as shared `Bytes`, no copy) up to a cap
//! and parsed once at the end.

use bytes::Bytes;
use serde::Deserialize;

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// Largest non-stream body kept for usage parsing; larger answers pass
/// through untouched and report no usage.
const MAX_JSON_BYTES: usize = 4 << 20;

#[derive(Deserialize)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    usage: Option<UsageFields>,
    /// Responses API stream events carry usage under `response`.
    #[serde(default)]
    response: Option<Box<Envelope>>,
}

impl From<UsageFields> for Usage {
    fn from(f: UsageFields) -> Self {
        let prompt_tokens = f.prompt_tokens.or(f.input_tokens).unwrap_or(0);
        let completion_tokens = f.completion_tokens.or(f.output_tokens).unwrap_or(0);
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: f.total_tokens.unwrap_or(prompt_tokens + completion_tokens),
        }
    }
}

/// Usage in one JSON document (a whole answer or one SSE `data:` payload).
pub fn parse_usage_json(json: &[u8]) -> Option<Usage> {
    let envelope: Envelope = serde_json::from_slice(json).ok()?;
    let fields = match envelope.usage {
        Some(usage) => usage,
        None => envelope.response?.usage?,
    };
    Some(fields.into())
}

/// Watches one response body for usage.
#[derive(Debug)]
pub enum UsageTap {
    /// `text/event-stream`: the last usage seen and an unfinished line.
    Sse { partial: Vec<u8>, usage: Option<Usage> },
    /// A JSON answer, kept until it ends.
    Json { frames: Vec<Bytes>, len: usize },
    /// Anything else, or a JSON body over the cap.
    Off,
}

impl UsageTap {
    /// Chooses how to watch a body from its `content-type`.
    pub fn for_content_type(content_type: Option<&str>) -> Self {
        let ct = content_type.unwrap_or("");
        if ct.starts_with("text/event-stream") {
            Self::Sse { partial: Vec::new(), usage: None }
        } else if ct.starts_with("application/json") {
            Self::Json { frames: Vec::new(), len: 0 }
        } else {
            Self::Off
        }
    }

    /// Looks at one body frame.
    pub fn observe(&mut self, frame: &Bytes) {
        match self {
            Self::Sse { partial, usage } => scan_sse(partial, usage, frame),
            Self::Json { frames, len } => {
                *len += frame.len();
                if *len > MAX_JSON_BYTES {
                    *self = Self::Off;
                } else {
                    frames.push(frame.clone());
                }
            }
            Self::Off => {}
        }
    }

    /// The usage found once the body has ended.
    pub fn finish(&mut self) -> Option<Usage> {
        match std::mem::replace(self, Self::Off) {
            Self::Sse { partial, usage } => check_sse_line(&partial).or(usage),
            Self::Json { frames, .. } => match frames.as_slice() {
                [one] => parse_usage_json(one),
                many => parse_usage_json(&many.concat()),
            },
            Self::Off => None,
        }
    }
}

fn scan_sse(partial: &mut Vec<u8>, usage: &mut Option<Usage>, frame: &[u8]) {
    let mut rest = frame;
    while let Some(newline) = memchr::memchr(b'\n', rest) {
        let (line, tail) = rest.split_at(newline);
        rest = &tail[1..];
        let found = if partial.is_empty() {
            check_sse_line(line)
        } else {
            partial.extend_from_slice(line);
            let found = check_sse_line(partial);
            partial.clear();
            found
        };
        if found.is_some() {
            *usage = found;
        }
    }
    partial.extend_from_slice(rest);
}

fn check_sse_line(line: &[u8]) -> Option<Usage> {
    let payload = line.strip_prefix(b"data:")?;
    memchr::memmem::find(payload, b"\"usage\"")?;
    parse_usage_json(payload.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: Usage = Usage { prompt_tokens: 3, completion_tokens: 5, total_tokens: 8 };

    fn sse_body() -> String {
        [
            r#"data: {"choices":[{"delta":{"content":"hi"}}]}"#,
            r#"data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#,
            "data: [DONE]",
        ]
        .iter()
        .map(|l| format!("{l}\n\n"))
        .collect()
    }

    fn tap_in_pieces(body: &str, piece: usize) -> Option<Usage> {
        let mut tap = UsageTap::for_content_type(Some("text/event-stream; charset=utf-8"));
        for chunk in body.as_bytes().chunks(piece) {
            tap.observe(&Bytes::copy_from_slice(chunk));
        }
        tap.finish()
    }

    #[test]
    fn sse_usage_found_whatever_the_frame_boundaries() {
        let body = sse_body();
        for piece in [1, 2, 7, 13, 64, body.len()] {
            assert_eq!(tap_in_pieces(&body, piece), Some(USAGE), "piece size {piece}");
        }
    }

    #[test]
    fn sse_without_usage_reports_none() {
        let body = "data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert_eq!(tap_in_pieces(body, 5), None);
    }

    #[test]
    fn sse_last_line_without_newline_still_counts() {
        let body = r#"data: {"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        assert_eq!(tap_in_pieces(body, 10), Some(USAGE));
    }

    #[test]
    fn json_body_usage_across_frames() {
        let body = br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        let mut tap = UsageTap::for_content_type(Some("application/json"));
        for chunk in body.chunks(9) {
            tap.observe(&Bytes::copy_from_slice(chunk));
        }
        assert_eq!(tap.finish(), Some(USAGE));
    }

    #[test]
    fn responses_api_fields_and_missing_total() {
        assert_eq!(parse_usage_json(br#"{"usage":{"input_tokens":3,"output_tokens":5}}"#), Some(USAGE));
        assert_eq!(
            parse_usage_json(br#"{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":5,"total_tokens":8}}}"#),
            Some(USAGE)
        );
        assert_eq!(parse_usage_json(b"{\"usage\":null}"), None);
        assert_eq!(parse_usage_json(b"garbage"), None);
    }

    #[test]
    fn oversized_json_is_dropped_not_buffered() {
        let mut tap = UsageTap::for_content_type(Some("application/json"));
        let big = Bytes::from(vec![b' '; MAX_JSON_BYTES + 1]);
        tap.observe(&big);
        assert!(matches!(tap, UsageTap::Off));
        assert_eq!(tap.finish(), None);
    }
}
