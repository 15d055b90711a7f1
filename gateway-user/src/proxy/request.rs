//! Reading what routing needs from an OpenAI request body, without building
//! a full JSON tree: the fields are borrowed from the body bytes, and the
//! prompt text is only assembled when `config-profile: auto` asks for it.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::errors::GatewayError;

/// The inference endpoints the gateway routes: every path AIBrix routes and
/// vLLM serves, plus the paths a model lists in its custom-paths annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    /// Anthropic-style `/v1/messages`: checked as chat is.
    Messages,
    Rerank,
    Classify,
    Score,
    ImagesGenerations,
    VideoGenerations,
    /// `multipart/form-data`: the model is a form field and the upload is
    /// streamed to the pod (`form.rs`).
    AudioTranscriptions,
    AudioTranslations,
    /// A path the model lists in `model.aibrix.ai/model-router-custom-paths`:
    /// any method, any body, the model from the `model` header or the body.
    Custom,
}

/// How an endpoint's request body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// A JSON object, read whole (within `--max-body-bytes`) and checked.
    Json,
    /// A multipart form, streamed (`form.rs`).
    Form,
    /// Anything, read whole and passed on as it is.
    Opaque,
}

impl Endpoint {
    /// The endpoint for a request path (exact match, query ignored), as
    /// AIBrix's gateway dispatches them. Custom paths depend on the pods, so
    /// the proxy finds those itself.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/completions" => Some(Self::Completions),
            "/v1/embeddings" => Some(Self::Embeddings),
            "/v1/responses" => Some(Self::Responses),
            "/v1/messages" => Some(Self::Messages),
            "/v1/rerank" => Some(Self::Rerank),
            "/v1/classify" => Some(Self::Classify),
            "/v1/score" => Some(Self::Score),
            "/v1/images/generations" => Some(Self::ImagesGenerations),
            "/v1/video/generations" => Some(Self::VideoGenerations),
            "/v1/audio/transcriptions" => Some(Self::AudioTranscriptions),
            "/v1/audio/translations" => Some(Self::AudioTranslations),
            _ => None,
        }
    }

    /// The name of a `POST` to the endpoint's path in a trace (`{method}
    /// {route}`, without allocating: every request names its span).
    pub fn span_name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "POST /v1/chat/completions",
            Self::Completions => "POST /v1/completions",
            Self::Embeddings => "POST /v1/embeddings",
            Self::Responses => "POST /v1/responses",
            Self::Messages => "POST /v1/messages",
            Self::Rerank => "POST /v1/rerank",
            Self::Classify => "POST /v1/classify",
            Self::Score => "POST /v1/score",
            Self::ImagesGenerations => "POST /v1/images/generations",
            Self::VideoGenerations => "POST /v1/video/generations",
            Self::AudioTranscriptions => "POST /v1/audio/transcriptions",
            Self::AudioTranslations => "POST /v1/audio/translations",
            Self::Custom => "POST",
        }
    }

    /// OpenTelemetry's `gen_ai.operation.name` for the endpoint, where the
    /// GenAI conventions name one.
    pub fn gen_ai_operation(self) -> Option<&'static str> {
        match self {
            Self::ChatCompletions | Self::Responses | Self::Messages => Some("chat"),
            Self::Completions => Some("text_completion"),
            Self::Embeddings => Some("embeddings"),
            _ => None,
        }
    }

    /// How the body is read.
    pub fn body_kind(self) -> BodyKind {
        match self {
            Self::AudioTranscriptions | Self::AudioTranslations => BodyKind::Form,
            Self::Custom => BodyKind::Opaque,
            _ => BodyKind::Json,
        }
    }

    /// Chat-shaped bodies: `messages` required, their contents the prompt.
    fn takes_messages(self) -> bool {
        matches!(self, Self::ChatCompletions | Self::Messages)
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
    /// Where in `body` each message lies, and the `prompt` and `input`
    /// values: what the prompt's text is made of.
    messages: Vec<Range<usize>>,
    prompt_field: Option<Range<usize>>,
    input_field: Option<Range<usize>>,
    query_field: Option<Range<usize>>,
    documents_field: Option<Range<usize>>,
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

/// The top-level fields the gateway reads, in one pass over the body.
#[derive(Default)]
struct Probe<'a> {
    model: Option<String>,
    stream: Option<bool>,
    messages: Option<&'a RawValue>,
    prompt: Option<&'a RawValue>,
    input: Option<&'a RawValue>,
    query: Option<&'a RawValue>,
    documents: Option<&'a RawValue>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    max_output_tokens: Option<i64>,
    /// Present even when `null`: a spliced-in field must never sit beside
    /// one the engine would read last.
    stream_options: Option<&'a RawValue>,
}

/// The fields of [`Probe`], in the order of [`FIELD_NAMES`].
#[derive(Clone, Copy, Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Model,
    Stream,
    Messages,
    Prompt,
    Input,
    Query,
    Documents,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    StreamOptions,
    #[serde(other)]
    Other,
}

const FIELD_NAMES: [&str; 11] = [
    "model",
    "stream",
    "messages",
    "prompt",
    "input",
    "query",
    "documents",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stream_options",
];

impl<'de: 'a, 'a> Deserialize<'de> for Probe<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ProbeVisitor(std::marker::PhantomData))
    }
}

struct ProbeVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ProbeVisitor<'a> {
    type Value = Probe<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a request object")
    }

    /// A field the gateway acts on given twice makes the body one it cannot
    /// process; `prompt`, `input`, `query` and `documents`, read only for the prompt's text, may
    /// repeat (the last wins, as in the engine), and other fields are the
    /// engine's to judge.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut probe = Probe::default();
        let mut seen = [false; FIELD_NAMES.len()];
        while let Some(field) = map.next_key::<Field>()? {
            if let Some(seen) = seen
                .get_mut(field as usize)
                .filter(|_| !matches!(field, Field::Prompt | Field::Input | Field::Query | Field::Documents))
            {
                if *seen {
                    return Err(serde::de::Error::duplicate_field(FIELD_NAMES[field as usize]));
                }
                *seen = true;
            }
            match field {
                Field::Model => probe.model = map.next_value()?,
                Field::Stream => probe.stream = map.next_value()?,
                Field::Messages => probe.messages = map.next_value()?,
                Field::Prompt => probe.prompt = map.next_value()?,
                Field::Input => probe.input = map.next_value()?,
                Field::Query => probe.query = map.next_value()?,
                Field::Documents => probe.documents = map.next_value()?,
                Field::MaxTokens => probe.max_tokens = map.next_value()?,
                Field::MaxCompletionTokens => probe.max_completion_tokens = map.next_value()?,
                Field::MaxOutputTokens => probe.max_output_tokens = map.next_value()?,
                Field::StreamOptions => probe.stream_options = Some(map.next_value()?),
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(probe)
    }
}

/// AIBrix's per-path checks, with its messages: completions need a
/// `prompt`; responses an `input` that is a string or a non-empty array;
/// embeddings a non-empty `input` with no empty string in it, and no
/// streaming; rerank a `query` and some `documents`; classify an `input`
/// that is a non-empty string or a non-empty array of strings. (AIBrix also refuses an array `prompt`, which vLLM serves:
/// Turnstile passes it on.)
fn check_fields(endpoint: Endpoint, probe: &Probe<'_>) -> Result<(), GatewayError> {
    let invalid = |message: String, param| Err(GatewayError::InvalidField { message, param });
    let (prompt, input, stream) = (probe.prompt, probe.input, probe.stream.unwrap_or(false));
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages => Ok(()),
        Endpoint::Completions if present(prompt).is_none() => {
            invalid("'prompt' is a required property".into(), "prompt")
        }
        Endpoint::Completions => Ok(()),
        Endpoint::Responses => match present(input).map(RawValue::get) {
            None => invalid("'input' is a required property".into(), "input"),
            Some(raw) if raw.starts_with('"') => Ok(()),
            Some(raw) if raw.starts_with('[') => match serde_json::from_str::<Vec<&RawValue>>(raw) {
                Ok(items) if items.is_empty() => invalid("'input' array cannot be empty".into(), "input"),
                _ => Ok(()),
            },
            Some(_) => invalid("'input' must be a string or an array of input items".into(), "input"),
        },
        Endpoint::Embeddings if stream => invalid("stream not supported for embeddings".into(), "stream"),
        Endpoint::Embeddings => match present(input).map(RawValue::get) {
            None => invalid("'input' is a required property".into(), "input"),
            Some("\"\"") => invalid("input cannot be an empty string".into(), "input"),
            Some(raw) if raw.starts_with('[') => {
                let items = serde_json::from_str::<Vec<&RawValue>>(raw).unwrap_or_default();
                if items.is_empty() {
                    return invalid("input array cannot be empty".into(), "input");
                }
                match items.iter().position(|item| item.get() == "\"\"") {
                    Some(index) => invalid(format!("input at index {index} cannot be an empty string"), "input"),
                    None => Ok(()),
                }
            }
            Some(_) => Ok(()),
        },
        Endpoint::Rerank => {
            match (present(probe.query).map(RawValue::get), present(probe.documents).map(RawValue::get)) {
                (None | Some("\"\""), _) => invalid("'query' is a required property".into(), "query"),
                (_, None | Some("[]")) => {
                    invalid("'documents' is a required property and cannot be empty".into(), "documents")
                }
                _ => Ok(()),
            }
        }
        Endpoint::Classify => match present(input).map(RawValue::get) {
            None => invalid("'input' is a required property".into(), "input"),
            Some("\"\"") => invalid("'input' cannot be an empty string".into(), "input"),
            Some(raw) if raw.starts_with('"') => Ok(()),
            Some(raw) if raw.starts_with('[') => match serde_json::from_str::<Vec<&RawValue>>(raw) {
                Ok(items) if items.is_empty() => invalid("'input' array cannot be empty".into(), "input"),
                Ok(items) if items.iter().all(|item| item.get().starts_with('"')) => Ok(()),
                _ => invalid("'input' must be a string or array of strings".into(), "input"),
            },
            Some(_) => invalid("'input' must be a string or array of strings".into(), "input"),
        },
        // The engine's to judge beyond the model.
        Endpoint::Score
        | Endpoint::ImagesGenerations
        | Endpoint::VideoGenerations
        | Endpoint::AudioTranscriptions
        | Endpoint::AudioTranslations
        | Endpoint::Custom => Ok(()),
    }
}

/// A field that is there and not `null`.
fn present(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|raw| raw.get() != "null")
}

/// One entry of `messages`, for its `content`.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

impl ParsedRequest {
    /// Validates the body and reads what the gateway acts on, in one pass.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<Self, GatewayError> {
        Self::read(endpoint, body, true)
    }

    /// A request whose body the gateway does not read as JSON: a form's
    /// fields (the upload itself streams past), or a custom path's body with
    /// the model named in a header. No prompt.
    pub fn opaque(endpoint: Endpoint, body: Bytes, model: String, stream: bool) -> Self {
        Self {
            endpoint,
            body,
            model,
            stream,
            max_tokens: None,
            stream_options: StreamOptions::Absent,
            messages: Vec::new(),
            prompt_field: None,
            input_field: None,
            query_field: None,
            documents_field: None,
            prompt: OnceLock::new(),
        }
    }

    /// A custom path's request: the model from the `model` header (as
    /// AIBrix's model router matches it), else from a JSON body's `model`.
    pub fn custom(body: Bytes, model_header: Option<&str>) -> Result<Self, GatewayError> {
        match model_header.map(str::trim).filter(|model| !model.is_empty()) {
            Some(model) => Ok(Self::opaque(Endpoint::Custom, body, model.to_owned(), false)),
            None => Self::read(Endpoint::Custom, body, false).map_err(|err| match err {
                GatewayError::BodyNotJson => GatewayError::ModelMissing,
                err => err,
            }),
        }
    }

    /// [`ParsedRequest::parse`], with the per-path field checks when `checked`.
    fn read(endpoint: Endpoint, body: Bytes, checked: bool) -> Result<Self, GatewayError> {
        // A body that is not a JSON object, or whose known fields have the
        // wrong types, is one error for the client: the body could not be
        // processed.
        let mut probe: Probe<'_> = serde_json::from_slice(&body).map_err(|_| GatewayError::BodyNotJson)?;
        let model = match probe.model.take() {
            Some(model) if !model.trim().is_empty() => model,
            _ => return Err(GatewayError::ModelMissing),
        };
        // Anything but an array counts as no messages; what the entries are
        // is the engine's to judge.
        let messages: Vec<&RawValue> =
            probe.messages.and_then(|raw| serde_json::from_str(raw.get()).ok()).unwrap_or_default();
        if checked && endpoint.takes_messages() && messages.is_empty() {
            return Err(GatewayError::NoMessages);
        }
        if checked {
            check_fields(endpoint, &probe)?;
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
        Ok(Self {
            endpoint,
            model,
            stream: probe.stream.unwrap_or(false),
            max_tokens: probe.max_tokens.or(probe.max_completion_tokens).or(probe.max_output_tokens),
            stream_options,
            messages: messages.into_iter().map(span).collect(),
            prompt_field: probe.prompt.map(span),
            input_field: probe.input.map(span),
            query_field: probe.query.map(span),
            documents_field: probe.documents.map(span),
            prompt: OnceLock::new(),
            body,
        })
    }

    /// The prompt text used to count prompt tokens and match prefixes:
    /// message contents joined by spaces (chat, messages), `prompt`
    /// (completions), `input` (responses, embeddings, classify) or `query`
    /// and then each document (rerank). String values are unquoted; anything
    /// else is counted as its raw JSON. Assembled on first use.
    pub fn prompt(&self) -> &str {
        self.prompt.get_or_init(|| {
            let text = |range: &Range<usize>| std::str::from_utf8(self.body.get(range.clone())?).ok();
            let contents = self
                .messages
                .iter()
                .filter_map(text)
                .filter_map(|message| serde_json::from_str::<Message<'_>>(message).ok()?.content);
            // Rerank's documents count one by one, after the query (AIBrix's key).
            let documents: Vec<&str> = match self.documents_field.as_ref().and_then(text) {
                Some(raw) if raw.starts_with('[') => serde_json::from_str::<Vec<&RawValue>>(raw)
                    .unwrap_or_default()
                    .into_iter()
                    .map(RawValue::get)
                    .collect(),
                Some(raw) => vec![raw],
                None => Vec::new(),
            };
            let parts: Vec<Cow<'_, str>> = contents
                .map(RawValue::get)
                .chain(self.prompt_field.iter().filter_map(text))
                .chain(self.input_field.iter().filter_map(text))
                .chain(self.query_field.iter().filter_map(text))
                .chain(documents)
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
    match ParsedRequest::read(Endpoint::Completions, Bytes::copy_from_slice(body), false) {
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
    #[case::embeddings(Endpoint::Embeddings, r#"{"model":"m","input":"x"}"#)]
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
    #[case::completions_no_prompt(Endpoint::Completions, r#"{"model":"m"}"#, "'prompt' is a required property")]
    #[case::completions_null_prompt(
        Endpoint::Completions,
        r#"{"model":"m","prompt":null}"#,
        "'prompt' is a required property"
    )]
    #[case::responses_no_input(Endpoint::Responses, r#"{"model":"m"}"#, "'input' is a required property")]
    #[case::responses_number(
        Endpoint::Responses,
        r#"{"model":"m","input":5}"#,
        "'input' must be a string or an array of input items"
    )]
    #[case::responses_empty(Endpoint::Responses, r#"{"model":"m","input":[]}"#, "'input' array cannot be empty")]
    #[case::embeddings_no_input(Endpoint::Embeddings, r#"{"model":"m"}"#, "'input' is a required property")]
    #[case::embeddings_empty(Endpoint::Embeddings, r#"{"model":"m","input":""}"#, "input cannot be an empty string")]
    #[case::embeddings_empty_array(Endpoint::Embeddings, r#"{"model":"m","input":[]}"#, "input array cannot be empty")]
    #[case::embeddings_empty_item(
        Endpoint::Embeddings,
        r#"{"model":"m","input":["a", ""]}"#,
        "input at index 1 cannot be an empty string"
    )]
    #[case::embeddings_stream(
        Endpoint::Embeddings,
        r#"{"model":"m","input":"x","stream":true}"#,
        "stream not supported for embeddings"
    )]
    #[case::messages_without_messages(Endpoint::Messages, r#"{"model":"m"}"#, "no messages in the request body")]
    #[case::rerank_no_query(Endpoint::Rerank, r#"{"model":"m","documents":["a"]}"#, "'query' is a required property")]
    #[case::rerank_empty_query(
        Endpoint::Rerank,
        r#"{"model":"m","query":"","documents":["a"]}"#,
        "'query' is a required property"
    )]
    #[case::rerank_no_documents(
        Endpoint::Rerank,
        r#"{"model":"m","query":"q","documents":[]}"#,
        "'documents' is a required property and cannot be empty"
    )]
    #[case::classify_no_input(Endpoint::Classify, r#"{"model":"m"}"#, "'input' is a required property")]
    #[case::classify_empty(Endpoint::Classify, r#"{"model":"m","input":""}"#, "'input' cannot be an empty string")]
    #[case::classify_empty_array(Endpoint::Classify, r#"{"model":"m","input":[]}"#, "'input' array cannot be empty")]
    #[case::classify_numbers(
        Endpoint::Classify,
        r#"{"model":"m","input":[1,2]}"#,
        "'input' must be a string or array of strings"
    )]
    #[case::classify_object(
        Endpoint::Classify,
        r#"{"model":"m","input":{"a":1}}"#,
        "'input' must be a string or array of strings"
    )]
    #[case::images_not_json(Endpoint::ImagesGenerations, "prompt=cat", "error processing request body")]
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
    fn odd_but_valid_bodies_are_the_engines_to_judge() {
        let parse = |body: &str| ParsedRequest::parse(Endpoint::ChatCompletions, Bytes::from(body.to_owned()));
        let repeated =
            parse(r#"{"model":"m","messages":[{"content":"a"}],"prompt":"x","prompt":"y","input":1,"input":2}"#)
                .expect("prompt and input may repeat; the last wins");
        assert_eq!(repeated.prompt(), "a y 2");
        let entries = parse(r#"{"model":"m","messages":[1e400,"hi",null,{"content":null},{"content":"x"}]}"#)
            .expect("any non-empty list of messages");
        assert_eq!(entries.prompt(), "x");
        assert!(matches!(
            parse(r#"{"model":"m","messages":[{}],"stream":true,"stream":false}"#),
            Err(GatewayError::BodyNotJson)
        ));
        assert!(matches!(parse(r#"{"model":"m","messages":1e400}"#), Err(GatewayError::NoMessages)));
    }

    #[test]
    fn rerank_and_classify_prompts_are_aibrixs_routing_keys() {
        let parse = |endpoint, body: &str| ParsedRequest::parse(endpoint, Bytes::from(body.to_owned())).expect("valid");
        let rerank = parse(Endpoint::Rerank, r#"{"model":"m","query":"which","documents":["a b","c"]}"#);
        assert_eq!(rerank.prompt(), "which a b c");
        let classify = parse(Endpoint::Classify, r#"{"model":"m","input":["x","y"]}"#);
        assert_eq!(classify.prompt(), r#"["x","y"]"#, "an array counts as its JSON, as for embeddings");
        let custom = ParsedRequest::custom(Bytes::from_static(b"not json"), Some(" m ")).expect("header model");
        assert_eq!((custom.model.as_str(), custom.prompt()), ("m", ""));
        assert!(matches!(ParsedRequest::custom(Bytes::from_static(b"x"), None), Err(GatewayError::ModelMissing)));
        let from_body = ParsedRequest::custom(Bytes::from_static(br#"{"model":"n","prompt":"p"}"#), Some(""));
        assert_eq!(from_body.map(|r| r.model).ok().as_deref(), Some("n"));
    }

    #[test]
    fn endpoints_by_exact_path() {
        assert_eq!(Endpoint::from_path("/v1/chat/completions"), Some(Endpoint::ChatCompletions));
        assert_eq!(Endpoint::from_path("/v1/chat/completions/"), None);
        assert_eq!(Endpoint::from_path("/v1/models"), None);
        assert_eq!(Endpoint::from_path("/v1/audio/transcriptions").map(Endpoint::body_kind), Some(BodyKind::Form));
        assert_eq!(Endpoint::from_path("/v1/rerank").map(Endpoint::body_kind), Some(BodyKind::Json));
    }
}
