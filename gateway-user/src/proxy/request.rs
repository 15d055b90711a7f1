//! Reading what routing needs from an OpenAI request body, without building
//! a full JSON tree: the fields are borrowed from the body bytes, and the
//! prompt text is only assembled when `config-profile: auto` asks for it.

use std::borrow::Cow;

use serde::Deserialize;
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

/// The parts of a request body the gateway acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestShape {
    pub model: String,
    pub stream: bool,
    /// `max_tokens`, else `max_completion_tokens`, else `max_output_tokens`.
    pub max_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    max_output_tokens: Option<i64>,
}

/// Validates the body and extracts model, stream flag and token budget.
pub fn inspect(endpoint: Endpoint, body: &[u8]) -> Result<RequestShape, GatewayError> {
    // A body that is not a JSON object, or whose known fields have the wrong
    // types, is one error for the client: the body could not be processed.
    let probe: Probe<'_> = serde_json::from_slice(body).map_err(|_| GatewayError::BodyNotJson)?;
    let model = match probe.model {
        Some(model) if !model.trim().is_empty() => model.into_owned(),
        _ => return Err(GatewayError::ModelMissing),
    };
    if endpoint == Endpoint::ChatCompletions {
        let has_messages = probe
            .messages
            .and_then(|raw| serde_json::from_str::<Vec<&RawValue>>(raw.get()).ok())
            .is_some_and(|m| !m.is_empty());
        if !has_messages {
            return Err(GatewayError::NoMessages);
        }
    }
    Ok(RequestShape {
        model,
        stream: probe.stream.unwrap_or(false),
        max_tokens: probe.max_tokens.or(probe.max_completion_tokens).or(probe.max_output_tokens),
    })
}

#[derive(Deserialize)]
struct PromptProbe<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// The prompt text used to count prompt tokens: message contents joined by
/// spaces (chat), `prompt` (completions) or `input` (responses, embeddings).
/// String values are unquoted; anything else is counted as its raw JSON.
pub fn prompt_text(body: &[u8]) -> String {
    let Ok(probe) = serde_json::from_slice::<PromptProbe<'_>>(body) else {
        return String::new();
    };
    let mut parts: Vec<Cow<'_, str>> = Vec::new();
    if let Some(messages) = probe.messages {
        parts.extend(messages.iter().filter_map(|m| m.content).map(raw_text));
    }
    parts.extend(probe.prompt.map(raw_text));
    parts.extend(probe.input.map(raw_text));
    parts.join(" ")
}

fn raw_text(raw: &RawValue) -> Cow<'_, str> {
    match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
        Ok(text) => text,
        Err(_) => Cow::Borrowed(raw.get()),
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
        let shape = inspect(endpoint, body.as_bytes()).expect("valid body");
        assert_eq!(shape, RequestShape { model: model.into(), stream, max_tokens });
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
        let err = inspect(endpoint, body.as_bytes()).expect_err("invalid body");
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
