//! Reading what routing needs from an OpenAI request body, without building
//! a full JSON tree: the fields are borrowed from the body bytes, and the
//! prompt text is only assembled when `config-profile: auto` asks for it.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::errors::GatewayError;

/// The OpenAI endpoints the gateway proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
}

impl Endpoint {
    /// The endpoint for a request path (exact match, query ignored).
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/completions" => Some(Self::Completions),
            "/v1/embeddings" => Some(Self::Embeddings),
            "/v1/responses" => Some(Self::Responses),
            _ => None,
        }
    }
}

/// A request body, parsed once into what every phase needs: the fields the
/// gateway acts on, and where the prompt's text lies in the body (assembled
/// only when a phase asks for it).
#[derive(Debug)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    pub body: Bytes,
    pub model: String,
    pub stream: bool,
    /// `max_tokens`, else `max_completion_tokens`, else `max_output_tokens`.
    pub max_tokens: Option<i64>,
    /// What `stream_options` says about usage.
    pub stream_options: StreamOptions,
    /// The raw JSON values the prompt is made of, as byte ranges of `body`:
    /// message contents (chat), `prompt` (completions), `input`.
    prompt_parts: Vec<Range<usize>>,
    prompt: OnceLock<String>,
}

/// A request's `stream_options`, as far as usage goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamOptions {
    /// No `stream_options` (or `null`).
    #[default]
    Absent,
    /// `stream_options` without `include_usage: true`.
    WithoutUsage,
    /// `stream_options.include_usage: true`: the client reads usage itself.
    IncludeUsage,
}

#[derive(Deserialize)]
struct StreamOptionsProbe {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    messages: Option<Messages<'a>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    max_output_tokens: Option<i64>,
    /// Present even when `null`: a spliced-in field must never sit beside
    /// one the engine would read last.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

/// A visitor's answer to any JSON scalar (the value is skipped).
macro_rules! scalars_are {
    ($value:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// `messages`, read in the same pass: how many there are and each one's
/// `content`. Anything but an array counts as no messages; entries that
/// are not objects count, without content.
#[derive(Default)]
struct Messages<'a> {
    count: usize,
    contents: Vec<&'a RawValue>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Messages<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MessagesVisitor(std::marker::PhantomData))
    }
}

struct MessagesVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for MessagesVisitor<'a> {
    type Value = Messages<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut messages = Messages::default();
        while let Some(message) = seq.next_element::<Message<'a>>()? {
            messages.count += 1;
            messages.contents.extend(message.content);
        }
        Ok(messages)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Messages::default())
    }

    scalars_are!(Messages::default());
}

/// One entry of `messages`: its `content` if it is an object that has one.
struct Message<'a> {
    content: Option<&'a RawValue>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Message<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MessageVisitor(std::marker::PhantomData))
    }
}

struct MessageVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for MessageVisitor<'a> {
    type Value = Message<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a message")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut content = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "content" {
                content = map.next_value::<Option<&'de RawValue>>()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Message { content })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Message { content: None })
    }

    scalars_are!(Message { content: None });
}

/// `Some` for a field that is there, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

impl ParsedRequest {
    /// Validates the body and reads what the gateway acts on, in one pass.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<Self, GatewayError> {
        // A body that is not a JSON object, or whose known fields have the
        // wrong types, is one error for the client: the body could not be
        // processed.
        let probe: Probe<'_> = serde_json::from_slice(&body).map_err(|_| GatewayError::BodyNotJson)?;
        let model = match probe.model {
            Some(model) if !model.trim().is_empty() => model.into_owned(),
            _ => return Err(GatewayError::ModelMissing),
        };
        let messages = probe.messages.unwrap_or_default();
        if endpoint == Endpoint::ChatCompletions && messages.count == 0 {
            return Err(GatewayError::NoMessages);
        }
        let stream_options = match probe.stream_options.map(|raw| serde_json::from_str::<StreamOptionsProbe>(raw.get()))
        {
            None => StreamOptions::Absent,
            Some(Ok(StreamOptionsProbe { include_usage: Some(true) })) => StreamOptions::IncludeUsage,
            // Anything else is the engine's to judge; the gateway only knows no usage was asked for.
            Some(_) => StreamOptions::WithoutUsage,
        };
        let base = body.as_ptr() as usize;
        let span = |raw: &RawValue| {
            let start = raw.get().as_ptr() as usize - base;
            start..start + raw.get().len()
        };
        let prompt_parts = messages.contents.iter().copied().chain(probe.prompt).chain(probe.input).map(span).collect();
        Ok(Self {
            endpoint,
            model,
            stream: probe.stream.unwrap_or(false),
            max_tokens: probe.max_tokens.or(probe.max_completion_tokens).or(probe.max_output_tokens),
            stream_options,
            prompt_parts,
            prompt: OnceLock::new(),
            body,
        })
    }

    /// The prompt text used to count prompt tokens and match prefixes:
    /// message contents joined by spaces (chat), `prompt` (completions) or
    /// `input` (responses, embeddings). String values are unquoted; anything
    /// else is counted as its raw JSON. Assembled on first use.
    pub fn prompt(&self) -> &str {
        self.prompt.get_or_init(|| {
            let parts: Vec<Cow<'_, str>> = self
                .prompt_parts
                .iter()
                .filter_map(|range| std::str::from_utf8(self.body.get(range.clone())?).ok())
                .map(raw_text)
                .collect();
            parts.join(" ")
        })
    }
}

/// The body to send instead when a streamed chat or completion does not ask
/// for usage: the same request with `stream_options.include_usage: true`, so
/// the engine reports the tokens and TPM, VTC and the access log count every
/// stream. The usage-only chunk this adds is taken out of what the client
/// receives ([`super::usage::UsageChunkFilter`]). `None` leaves the body as is.
pub fn ask_for_usage(request: &ParsedRequest) -> Option<Bytes> {
    let body = &request.body;
    let streams_tokens =
        matches!(request.endpoint, Endpoint::ChatCompletions | Endpoint::Completions) && request.stream;
    match request.stream_options {
        _ if !streams_tokens => None,
        StreamOptions::IncludeUsage => None,
        // The common case: one field spliced in after the opening brace, no
        // re-encoding of what may be megabytes of prompt. `parse` has
        // checked that the body is an object with at least `model` in it.
        StreamOptions::Absent => {
            let open = body.iter().position(|b| *b == b'{')?;
            const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
            let mut spliced = BytesMut::with_capacity(body.len() + FIELD.len());
            spliced.extend_from_slice(&body[..=open]);
            spliced.extend_from_slice(FIELD);
            spliced.extend_from_slice(&body[open + 1..]);
            Some(spliced.freeze())
        }
        // `stream_options` without usage: rewrite the object. Continuous usage
        // stats were off (they need `include_usage`) and must stay off, so
        // the client's chunks do not change.
        StreamOptions::WithoutUsage => {
            let mut object = match serde_json::from_slice::<serde_json::Value>(body).ok()? {
                serde_json::Value::Object(object) => object,
                _ => return None,
            };
            let mut options = match object.remove("stream_options") {
                Some(serde_json::Value::Object(options)) => options,
                _ => serde_json::Map::new(),
            };
            options.remove("continuous_usage_stats");
            options.insert("include_usage".into(), serde_json::Value::Bool(true));
            object.insert("stream_options".into(), serde_json::Value::Object(options));
            serde_json::to_vec(&object).ok().map(Bytes::from)
        }
    }
}

/// The prompt text of a body (see [`ParsedRequest::prompt`]); empty when
/// the body is not a request.
pub fn prompt_text(body: &[u8]) -> String {
    match ParsedRequest::parse(Endpoint::Completions, Bytes::copy_from_slice(body)) {
        Ok(parsed) => parsed.prompt().to_owned(),
        Err(_) => String::new(),
    }
}

fn raw_text(raw: &str) -> Cow<'_, str> {
    match serde_json::from_str::<Cow<'_, str>>(raw) {
        Ok(text) => text,
        Err(_) => Cow::Borrowed(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::chat(
        Endpoint::ChatCompletions,
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":5}"#,
        "m",
        true,
        Some(5)
    )]
    #[case::completion(
        Endpoint::Completions,
        r#"{"model":"m","prompt":"hi","max_completion_tokens":7}"#,
        "m",
        false,
        Some(7)
    )]
    #[case::escaped_model(Endpoint::Embeddings, r#"{"model":"org\/m\u0031","input":"x"}"#, "org/m1", false, None)]
    #[case::null_stream(
        Endpoint::Responses,
        r#"{"model":"m","input":"x","stream":null,"max_output_tokens":3}"#,
        "m",
        false,
        Some(3)
    )]
    fn extracts_shape(
        #[case] endpoint: Endpoint,
        #[case] body: &str,
        #[case] model: &str,
        #[case] stream: bool,
        #[case] max_tokens: Option<i64>,
    ) {
        let parsed = ParsedRequest::parse(endpoint, Bytes::from(body.to_owned())).expect("valid body");
        assert_eq!(
            (parsed.model.as_str(), parsed.stream, parsed.max_tokens, parsed.stream_options),
            (model, stream, max_tokens, StreamOptions::Absent)
        );
    }

    fn asked(endpoint: Endpoint, body: &str) -> Option<serde_json::Value> {
        let body = Bytes::from(body.to_owned());
        let parsed = ParsedRequest::parse(endpoint, body).expect("valid body");
        ask_for_usage(&parsed).map(|b| serde_json::from_slice(&b).expect("still JSON"))
    }

    #[rstest]
    #[case::no_options(r#" {"model":"m","messages":[{"content":"x"}],"stream":true}"#)]
    #[case::options_without_usage(r#"{"model":"m","messages":[{"content":"x"}],"stream":true,"stream_options":{}}"#)]
    #[case::usage_false(r#"{"model":"m","messages":[{"content":"x"}],"stream":true,"stream_options":{"include_usage":false,"continuous_usage_stats":true}}"#)]
    #[case::null_options(r#"{"model":"m","messages":[{"content":"x"}],"stream":true,"stream_options":null}"#)]
    fn streams_without_usage_ask_the_engine_for_it(#[case] body: &str) {
        let rewritten = asked(Endpoint::ChatCompletions, body).expect("rewritten");
        assert_eq!(rewritten["stream_options"], serde_json::json!({"include_usage": true}));
        assert_eq!(rewritten["messages"], serde_json::json!([{"content": "x"}]), "the rest is untouched");
        assert_eq!(rewritten["stream"], true);
    }

    #[rstest]
    #[case::not_streamed(Endpoint::ChatCompletions, r#"{"model":"m","messages":[{"content":"x"}]}"#)]
    #[case::already_asks(
        Endpoint::Completions,
        r#"{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#
    )]
    #[case::responses_report_usage_anyway(Endpoint::Responses, r#"{"model":"m","input":"x","stream":true}"#)]
    #[case::embeddings(Endpoint::Embeddings, r#"{"model":"m","input":"x","stream":true}"#)]
    fn other_bodies_are_left_alone(#[case] endpoint: Endpoint, #[case] body: &str) {
        assert_eq!(asked(endpoint, body), None);
    }

    #[rstest]
    #[case::not_json(Endpoint::Completions, "model=m", "error processing request body")]
    #[case::array(Endpoint::Completions, "[1,2]", "error processing request body")]
    #[case::truncated(Endpoint::Completions, r#"{"model":"m""#, "error processing request body")]
    #[case::model_not_string(Endpoint::Completions, r#"{"model":5}"#, "error processing request body")]
    #[case::stream_not_bool(Endpoint::Completions, r#"{"model":"m","stream":"yes"}"#, "error processing request body")]
    #[case::duplicate_model(Endpoint::Completions, r#"{"model":"a","model":"b"}"#, "error processing request body")]
    #[case::no_model(Endpoint::Completions, r#"{"prompt":"x"}"#, "'model' is a required property")]
    #[case::blank_model(Endpoint::Completions, r#"{"model":"  "}"#, "'model' is a required property")]
    #[case::null_model(Endpoint::Completions, r#"{"model":null}"#, "'model' is a required property")]
    #[case::chat_no_messages(Endpoint::ChatCompletions, r#"{"model":"m"}"#, "no messages in the request body")]
    #[case::chat_empty_messages(
        Endpoint::ChatCompletions,
        r#"{"model":"m","messages":[]}"#,
        "no messages in the request body"
    )]
    #[case::chat_messages_not_array(
        Endpoint::ChatCompletions,
        r#"{"model":"m","messages":"hi"}"#,
        "no messages in the request body"
    )]
    fn rejects_bad_bodies(#[case] endpoint: Endpoint, #[case] body: &str, #[case] message: &str) {
        let err = ParsedRequest::parse(endpoint, Bytes::from(body.to_owned())).expect_err("invalid body");
        assert_eq!(err.to_string(), message);
    }

    #[test]
    fn prompt_text_joins_message_contents() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
        assert_eq!(prompt_text(body), r#"be brief [{"type":"text","text":"hi"}]"#);
        assert_eq!(prompt_text(br#"{"model":"m","prompt":"once upon"}"#), "once upon");
        assert_eq!(prompt_text(br#"{"model":"m","input":"a\nb"}"#), "a\nb");
        assert_eq!(prompt_text(b"not json"), "");
    }

    #[test]
    fn endpoints_by_exact_path() {
        assert_eq!(Endpoint::from_path("/v1/chat/completions"), Some(Endpoint::ChatCompletions));
        assert_eq!(Endpoint::from_path("/v1/chat/completions/"), None);
        assert_eq!(Endpoint::from_path("/v1/models"), None);
    }
}
