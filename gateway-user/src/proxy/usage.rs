//! Reading token usage from responses on their way through.
//!
//! Streams are scanned line by line as frames pass; only a line split across
//! two frames is copied, and only lines mentioning `"usage"` are parsed.
//! Non-stream JSON answers are kept (as shared `Bytes`, no copy) up to a cap
//! and parsed once at the end.

use bytes::{Bytes, BytesMut};
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

/// Most bytes a gzip-encoded answer is decoded to for usage; past this (a
/// decompression bomb, or just a huge answer) usage is not read.
const MAX_DECODED_BYTES: usize = 4 * MAX_JSON_BYTES;

/// Compressed bytes given to the gzip decoder at once.
const GZIP_FEED_BYTES: usize = 4096;

/// Watches one response body for usage.
#[derive(Debug)]
pub enum UsageTap {
    /// `text/event-stream`: the last usage seen and an unfinished line.
    Sse { partial: Vec<u8>, usage: Option<Usage> },
    /// A JSON answer, kept until it ends.
    Json { frames: Vec<Bytes>, len: usize },
    /// A gzip-encoded answer: decoded as it passes (the client still gets
    /// the encoded bytes), the decoded text watched by `inner`.
    Gzip { decoder: Box<flate2::write::GzDecoder<Vec<u8>>>, inner: Box<UsageTap>, decoded: usize },
    /// Anything else, a JSON body over the cap, or an encoding not decoded.
    Off,
}

/// Whether a `content-encoding` value says the body is encoded (anything
/// but absent, empty or `identity`).
pub fn is_encoded(content_encoding: Option<&str>) -> bool {
    content_encoding.map(str::trim).is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
}

/// Usage an engine sent in trailer fields: `usage` or `x-usage`, holding the
/// usage object (or an answer envelope with one).
pub fn usage_from_trailers(trailers: &http::HeaderMap) -> Option<Usage> {
    ["usage", "x-usage"].iter().filter_map(|name| trailers.get(*name)).find_map(|value| {
        let json = value.as_bytes();
        parse_usage_json(json).or_else(|| serde_json::from_slice::<UsageFields>(json).ok().map(Usage::from))
    })
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

    /// Chooses how to watch a body from its `content-type` and
    /// `content-encoding`: gzip is decoded on the side, other encodings
    /// (br, zstd) are not read.
    pub fn for_response(content_type: Option<&str>, content_encoding: Option<&str>) -> Self {
        let tap = Self::for_content_type(content_type);
        match content_encoding.map(str::trim) {
            _ if !is_encoded(content_encoding) => tap,
            _ if matches!(tap, Self::Off) => tap,
            Some(encoding) if encoding.eq_ignore_ascii_case("gzip") || encoding.eq_ignore_ascii_case("x-gzip") => {
                Self::Gzip {
                    decoder: Box::new(flate2::write::GzDecoder::new(Vec::new())),
                    inner: Box::new(tap),
                    decoded: 0,
                }
            }
            _ => Self::Off,
        }
    }

    /// Looks at one body frame.
    pub fn observe(&mut self, frame: &Bytes) {
        match self {
            Self::Gzip { decoder, inner, decoded } => {
                use std::io::Write as _;
                // A few kilobytes at a time, so one frame of a gzip bomb
                // never inflates far past the cap.
                let mut ok = true;
                for piece in frame.chunks(GZIP_FEED_BYTES) {
                    ok = decoder.write_all(piece).is_ok();
                    let text = std::mem::take(decoder.get_mut());
                    *decoded += text.len();
                    if ok && *decoded <= MAX_DECODED_BYTES && !text.is_empty() {
                        inner.observe(&Bytes::from(text));
                    }
                    if !ok || *decoded > MAX_DECODED_BYTES || matches!(**inner, Self::Off) {
                        ok = false;
                        break;
                    }
                }
                // Past the caps, or once the inner tap gave up, stop decoding.
                if !ok {
                    *self = Self::Off;
                }
            }
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
            Self::Gzip { mut decoder, mut inner, decoded } => {
                decoder.try_finish().ok()?;
                let text = std::mem::take(decoder.get_mut());
                if decoded + text.len() > MAX_DECODED_BYTES {
                    return None;
                }
                if !text.is_empty() {
                    inner.observe(&Bytes::from(text));
                }
                inner.finish()
            }
            Self::Off => None,
        }
    }
}

/// Finds `"usage"`, built once (a searcher per call costs more than the
/// search in a frame of a few events).
fn usage_key() -> &'static memchr::memmem::Finder<'static> {
    static FINDER: std::sync::OnceLock<memchr::memmem::Finder<'static>> = std::sync::OnceLock::new();
    FINDER.get_or_init(|| memchr::memmem::Finder::new(b"\"usage\""))
}

/// Whether `text` mentions `"usage"`.
fn mentions_usage(text: &[u8]) -> bool {
    usage_key().find(text).is_some()
}

/// Reads the usage of the lines `frame` ends, the last one found winning;
/// only lines mentioning `"usage"` are looked at, found with one search over
/// the frame. An unfinished last line waits in `partial`.
fn scan_sse(partial: &mut Vec<u8>, usage: &mut Option<Usage>, frame: &[u8]) {
    let mut rest = frame;
    if !partial.is_empty() {
        // A line split across frames: complete it first.
        let Some(newline) = memchr::memchr(b'\n', rest) else {
            partial.extend_from_slice(rest);
            return;
        };
        partial.extend_from_slice(&rest[..newline]);
        if let found @ Some(_) = check_sse_line(partial) {
            *usage = found;
        }
        partial.clear();
        rest = &rest[newline + 1..];
    }
    let whole = memchr::memrchr(b'\n', rest).map_or(0, |newline| newline + 1);
    let (lines, tail) = rest.split_at(whole);
    let mut checked_to = 0;
    for at in usage_key().find_iter(lines) {
        if at < checked_to {
            continue;
        }
        let start = memchr::memrchr(b'\n', &lines[..at]).map_or(0, |newline| newline + 1);
        let end = memchr::memchr(b'\n', &lines[at..]).map_or(lines.len(), |newline| at + newline);
        checked_to = end;
        if let found @ Some(_) = check_sse_line(&lines[start..end]) {
            *usage = found;
        }
    }
    partial.extend_from_slice(tail);
}

fn check_sse_line(line: &[u8]) -> Option<Usage> {
    let payload = line.strip_prefix(b"data:")?;
    if !mentions_usage(payload) {
        return None;
    }
    parse_usage_json(payload.trim_ascii())
}

/// Takes the usage-only chunk (`"choices":[]` with `usage`, and the blank
/// line that ends its event) out of an SSE stream whose usage the gateway
/// asked for on the client's behalf ([`super::request::ask_for_usage`]), so
/// the client receives the stream it asked for, byte for byte.
///
/// Frames pass through untouched unless one holds a line mentioning
/// `"usage"`; only a line split across frames is held (and copied) until its
/// end shows whether it goes.
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// The last line dropped was an event's data: its blank line goes too.
    drop_blank: bool,
}

#[derive(Deserialize)]
struct ChunkProbe {
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    usage: Option<serde::de::IgnoredAny>,
}

impl UsageChunkFilter {
    /// What of `frame` the client receives.
    pub fn filter(&mut self, frame: &Bytes) -> Bytes {
        if self.partial.is_empty() && !self.drop_blank && !mentions_usage(frame) {
            // Nothing here can go; only an unfinished last line is held.
            let kept = memchr::memrchr(b'\n', frame).map_or(0, |newline| newline + 1);
            self.partial.extend_from_slice(&frame[kept..]);
            return frame.slice(..kept);
        }
        let mut out = BytesMut::with_capacity(self.partial.len() + frame.len());
        let mut rest = &frame[..];
        while let Some(newline) = memchr::memchr(b'\n', rest) {
            let (line, tail) = rest.split_at(newline + 1);
            rest = tail;
            if self.partial.is_empty() {
                if !self.drops(line) {
                    out.extend_from_slice(line);
                }
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                if !self.drops(&whole) {
                    out.extend_from_slice(&whole);
                }
            }
        }
        self.partial.extend_from_slice(rest);
        out.freeze()
    }

    /// Whether the start of a line is held, waiting for its end.
    pub fn holds(&self) -> bool {
        !self.partial.is_empty()
    }

    /// At the end of the stream: an unfinished last line, as it came.
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.partial))
    }

    /// Whether one whole line (with its line ending) is left out.
    fn drops(&mut self, line: &[u8]) -> bool {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if std::mem::take(&mut self.drop_blank) && content.is_empty() {
            return true;
        }
        let usage_only = content
            .strip_prefix(b"data:")
            .filter(|payload| mentions_usage(payload))
            .and_then(|payload| serde_json::from_slice::<ChunkProbe>(payload.trim_ascii()).ok())
            .is_some_and(|chunk| chunk.usage.is_some() && chunk.choices.is_some_and(|c| c.is_empty()));
        self.drop_blank = usage_only;
        usage_only
    }
}

/// Whether a request's answer reports its usage to the client, as the
/// per-user limits under AIBrix's rules need to know: AIBrix bills TPM from
/// the usage it sees pass, and requires it on TPM users' streamed chats.
/// (The gateway asks the engine for usage on every stream, see
/// [`super::request::ask_for_usage`]; this is about what the client asked.)
pub fn stream_usage(request: &super::request::ParsedRequest) -> crate::limits::StreamUsage {
    use super::request::{Endpoint, StreamOptions};
    use crate::limits::StreamUsage;
    if !request.stream || request.stream_options == StreamOptions::IncludeUsage {
        return StreamUsage::Reported;
    }
    match request.endpoint {
        Endpoint::ChatCompletions => StreamUsage::ChatWithout,
        Endpoint::Completions => StreamUsage::OtherWithout,
        // Responses and Anthropic-style streams end with their usage; the
        // others are billed from whatever usage passes, as AIBrix does.
        _ => StreamUsage::Reported,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE: Usage = Usage { prompt_tokens: 3, completion_tokens: 5, total_tokens: 8 };

    #[test]
    fn what_the_client_asked_of_usage() {
        use super::super::request::{Endpoint, ParsedRequest};
        use crate::limits::StreamUsage;
        let of = |endpoint, body: &str| {
            stream_usage(&ParsedRequest::parse(endpoint, Bytes::copy_from_slice(body.as_bytes())).expect("parses"))
        };
        let chat = |extra: &str| {
            of(Endpoint::ChatCompletions, &format!(r#"{{"model":"m","messages":[{{"content":"x"}}]{extra}}}"#))
        };
        assert_eq!(chat(""), StreamUsage::Reported, "not streamed");
        assert_eq!(chat(r#","stream":true"#), StreamUsage::ChatWithout);
        assert_eq!(chat(r#","stream":true,"stream_options":{"include_usage":false}"#), StreamUsage::ChatWithout);
        assert_eq!(chat(r#","stream":true,"stream_options":{"include_usage":true}"#), StreamUsage::Reported);
        assert_eq!(of(Endpoint::Completions, r#"{"model":"m","prompt":"x","stream":true}"#), StreamUsage::OtherWithout);
        assert_eq!(of(Endpoint::Responses, r#"{"model":"m","input":"x","stream":true}"#), StreamUsage::Reported);
    }

    fn gzip(text: &str) -> Vec<u8> {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_answers_are_read_decoded_in_any_split() {
        let json = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        for (content_type, body) in [("application/json", json.to_owned()), ("text/event-stream", sse_body())] {
            let encoded = gzip(&body);
            for piece in [1, 7, encoded.len()] {
                let mut tap = UsageTap::for_response(Some(content_type), Some("gzip"));
                for chunk in encoded.chunks(piece) {
                    tap.observe(&Bytes::copy_from_slice(chunk));
                }
                assert_eq!(tap.finish(), Some(USAGE), "{content_type} in pieces of {piece}");
            }
        }
        let mut brotli = UsageTap::for_response(Some("application/json"), Some("br"));
        brotli.observe(&Bytes::from_static(b"\x0b\x02"));
        assert_eq!(brotli.finish(), None, "encodings not decoded report nothing");
        let mut broken = UsageTap::for_response(Some("application/json"), Some("gzip"));
        broken.observe(&Bytes::from_static(b"not gzip at all"));
        assert_eq!(broken.finish(), None);
    }

    #[test]
    fn a_gzip_bomb_stops_being_decoded() {
        let bomb = gzip(&" ".repeat(MAX_DECODED_BYTES + 1024));
        let mut tap = UsageTap::for_response(Some("application/json"), Some("gzip"));
        for chunk in bomb.chunks(4096) {
            tap.observe(&Bytes::copy_from_slice(chunk));
        }
        assert!(matches!(tap, UsageTap::Off));
    }

    #[test]
    fn usage_in_trailers() {
        let mut trailers = http::HeaderMap::new();
        assert_eq!(usage_from_trailers(&trailers), None);
        trailers.insert("usage", http::HeaderValue::from_static(r#"{"prompt_tokens":3,"completion_tokens":5}"#));
        assert_eq!(usage_from_trailers(&trailers), Some(USAGE));
        trailers.clear();
        trailers.insert(
            "x-usage",
            http::HeaderValue::from_static(r#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#),
        );
        assert_eq!(usage_from_trailers(&trailers), Some(USAGE));
    }

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

    const CHUNK_A: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    const CHUNK_B: &str = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"length\"}]}\n\n";
    const USAGE_CHUNK: &str = "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    /// Runs `pieces` through a filter, as frames, and returns what the client gets.
    fn filtered(pieces: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut filter = UsageChunkFilter::default();
        let mut out = Vec::new();
        let mut frames = 0;
        for piece in pieces {
            let kept = filter.filter(&Bytes::copy_from_slice(piece));
            frames += usize::from(!kept.is_empty());
            out.extend_from_slice(&kept);
        }
        out.extend_from_slice(&filter.finish());
        (out, frames)
    }

    #[test]
    fn usage_chunk_is_removed_and_the_rest_kept_byte_for_byte() {
        let engine = [CHUNK_A, CHUNK_B, USAGE_CHUNK, DONE].concat();
        let client = [CHUNK_A, CHUNK_B, DONE].concat();
        // Whole events per frame, one frame for everything, and every split point.
        let per_event: Vec<&[u8]> = [CHUNK_A, CHUNK_B, USAGE_CHUNK, DONE].iter().map(|e| e.as_bytes()).collect();
        assert_eq!(filtered(&per_event).0, client.as_bytes());
        assert_eq!(filtered(&[engine.as_bytes()]).0, client.as_bytes());
        for cut in 1..engine.len() {
            let (head, tail) = engine.as_bytes().split_at(cut);
            assert_eq!(filtered(&[head, tail]).0, client.as_bytes(), "split at {cut}");
        }
        // Byte by byte, too.
        let bytes: Vec<&[u8]> = engine.as_bytes().chunks(1).collect();
        assert_eq!(filtered(&bytes).0, client.as_bytes());
    }

    #[test]
    fn frames_without_usage_pass_through_without_copies() {
        let mut filter = UsageChunkFilter::default();
        let frame = Bytes::from_static(CHUNK_A.as_bytes());
        let kept = filter.filter(&frame);
        assert_eq!(kept.as_ptr(), frame.as_ptr(), "the same buffer, not a copy");
        assert_eq!(kept.len(), frame.len());
    }

    #[test]
    fn usage_the_client_can_see_is_never_removed() {
        // Usage riding on a chunk with choices (continuous usage stats) is content.
        let with_choices = "data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"total_tokens\":4}}\n\n";
        assert_eq!(filtered(&[with_choices.as_bytes()]).0, with_choices.as_bytes());
        let null_usage = "data: {\"choices\":[],\"usage\":null}\n\n";
        assert_eq!(filtered(&[null_usage.as_bytes()]).0, null_usage.as_bytes());
        let text = "data: the word \"usage\" in plain text\n\n";
        assert_eq!(filtered(&[text.as_bytes()]).0, text.as_bytes());
    }

    #[test]
    fn crlf_events_and_an_unterminated_tail_come_through() {
        let engine =
            "data: {\"choices\":[{}]}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":1}}\r\n\r\ndata: [DONE]";
        let (out, _) = filtered(&[engine.as_bytes()]);
        assert_eq!(out, b"data: {\"choices\":[{}]}\r\n\r\ndata: [DONE]");
    }
}
