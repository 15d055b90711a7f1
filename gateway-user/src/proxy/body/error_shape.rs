//! An engine's error answer in the OpenAI shape, as AIBrix answers it
//! (AIBrix #2594): clients parse `{"error":{message,type,code,param}}`
//! whatever the engine wrote.
//!
//! - A body already of that shape passes untouched.
//! - vLLM's flat `{"object":"error","message":…,"type":…,"code":…}` (and any
//!   object with a `message`) is wrapped; missing fields are `null`, the type
//!   follows the status, the code is kept as the engine wrote it.
//! - Plain text becomes the message (401 gets `invalid_api_key`, 503
//!   `service_unavailable`).
//! - A 5xx whose body says nothing useful (empty, HTML, not UTF-8) says
//!   `Internal server error` (`api_error`).
//!
//! The engine's status is kept. Only answers that are not 2xx and not SSE
//! are shaped; the body is held (at most [`MAX_ERROR_BODY`]) until it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use serde_json::{Map, Value};

use super::Polled;

/// Most of an error body held for shaping; the rest is read and dropped, so
/// the engine's answer still ends (and is logged) as it should.
pub const MAX_ERROR_BODY: usize = 64 * 1024;
/// Longest message taken from a plain-text error body, bytes.
const MAX_TEXT_MESSAGE: usize = 1024;

/// Whether an answer with `status` and `content_type` is shaped: client
/// and server errors, not redirects.
pub fn shapes(status: StatusCode, content_type: Option<&str>, encoded: bool) -> bool {
    let error = status.is_client_error() || status.is_server_error();
    error && !encoded && !content_type.is_some_and(|ct| ct.starts_with("text/event-stream"))
}

/// The OpenAI-shaped body for an engine's error `body` at `status`, or
/// `None` when it already has that shape.
pub fn shape(status: StatusCode, body: &[u8]) -> Option<Bytes> {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let error = match parsed {
        Some(Value::Object(object)) => match object.get("error") {
            Some(Value::Object(inner)) if is_openai_error(inner) => return None,
            Some(Value::Object(inner)) => from_object(status, inner),
            Some(Value::String(message)) => fields(status, message, None, None, None),
            _ if object.contains_key("message") => from_object(status, &object),
            _ => from_text(status, body),
        },
        _ => from_text(status, body),
    };
    serde_json::to_vec(&serde_json::json!({ "error": error })).ok().map(Bytes::from)
}

/// `{"message": string, "type": string, ...}`: what OpenAI clients read.
fn is_openai_error(error: &Map<String, Value>) -> bool {
    matches!(error.get("message"), Some(Value::String(_))) && matches!(error.get("type"), Some(Value::String(_)))
}

fn from_object(status: StatusCode, object: &Map<String, Value>) -> Value {
    let message = match object.get("message") {
        Some(Value::String(message)) if !message.is_empty() => message.clone(),
        Some(other @ (Value::Number(_) | Value::Bool(_) | Value::Array(_) | Value::Object(_))) => other.to_string(),
        _ => "unknown response".to_owned(),
    };
    let kind = object.get("type").and_then(Value::as_str).map(str::to_owned);
    fields(status, &message, kind, object.get("code").cloned(), object.get("param").cloned())
}

fn from_text(status: StatusCode, body: &[u8]) -> Value {
    let text = std::str::from_utf8(body).map(str::trim).unwrap_or_default();
    let useless = text.is_empty() || text.starts_with('<');
    // A 500's text is a stack trace as often as not: AIBrix says no more.
    if status == StatusCode::INTERNAL_SERVER_ERROR || (useless && status.is_server_error()) {
        return fields(status, "Internal server error", None, None, None);
    }
    let message = if useless { status.canonical_reason().unwrap_or("error").to_owned() } else { cut(text) };
    let code = match status {
        StatusCode::UNAUTHORIZED => Some(Value::from("invalid_api_key")),
        StatusCode::SERVICE_UNAVAILABLE => Some(Value::from("service_unavailable")),
        _ => None,
    };
    fields(status, &message, None, code, None)
}

fn fields(status: StatusCode, message: &str, kind: Option<String>, code: Option<Value>, param: Option<Value>) -> Value {
    serde_json::json!({
        "message": message,
        "type": kind.unwrap_or_else(|| crate::errors::error_type(status).to_owned()),
        "code": code.unwrap_or(Value::Null),
        "param": param.unwrap_or(Value::Null),
    })
}

/// At most [`MAX_TEXT_MESSAGE`] bytes of `text`, cut on a character boundary.
fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_TEXT_MESSAGE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Holds an error answer until it ends, then gives the shaped one (or the
/// original bytes, already shaped). Passes every other answer through.
pub struct ErrorShaped<B> {
    inner: B,
    /// `Some` while shaping: the status and what came so far.
    held: Option<(StatusCode, BytesMut)>,
    done: bool,
}

impl<B> ErrorShaped<B> {
    /// The layer below.
    pub(super) fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Shapes `inner` when `status` is an error (see [`shapes`]).
    pub fn new(inner: B, shaped: Option<StatusCode>) -> Self {
        Self { inner, held: shaped.map(|status| (status, BytesMut::new())), done: false }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ErrorShaped<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let Some((status, held)) = &mut this.held else { return Pin::new(&mut this.inner).poll_frame(cx) };
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        let room = MAX_ERROR_BODY.saturating_sub(held.len());
                        held.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                // A break before the end: what came is shaped all the same.
                Poll::Ready(Some(Err(_)) | None) => {
                    this.done = true;
                    let body = held.split().freeze();
                    let shaped = shape(*status, &body).unwrap_or(body);
                    return Poll::Ready(Some(Ok(Frame::data(shaped))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.held.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.held.is_some() { SizeHint::default() } else { self.inner.size_hint() }
    }
}

#[cfg(test)]
mod tests {
    use super::super::scripted::{Scripted, Step, drain};
    use super::*;

    fn shaped(status: u16, body: &str) -> Value {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = shape(status, body.as_bytes()).unwrap_or_else(|| Bytes::copy_from_slice(body.as_bytes()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    #[test]
    fn an_openai_error_passes_untouched() {
        let body = r#"{"error":{"message":"bad","type":"invalid_request_error","param":"x","code":"c","extra":1}}"#;
        assert_eq!(shape(StatusCode::BAD_REQUEST, body.as_bytes()), None);
    }

    #[test]
    fn vllms_flat_error_is_wrapped_with_its_fields() {
        let body = r#"{"object":"error","message":"max_tokens is too large","type":"BadRequestError","param":null,"code":400}"#;
        assert_eq!(
            shaped(400, body),
            serde_json::json!({"error":{"message":"max_tokens is too large","type":"BadRequestError","param":null,"code":400}})
        );
    }

    #[test]
    fn a_nested_error_missing_fields_gets_them() {
        assert_eq!(
            shaped(404, r#"{"error":{"message":"no such model"}}"#),
            serde_json::json!({"error":{"message":"no such model","type":"invalid_request_error","param":null,"code":null}})
        );
        assert_eq!(shaped(400, r#"{"error":"plain"}"#)["error"]["message"], "plain");
        assert_eq!(shaped(400, r#"{"detail":"x"}"#)["error"]["message"], r#"{"detail":"x"}"#);
    }

    #[test]
    fn text_becomes_the_message_and_useless_5xx_bodies_say_internal_error() {
        assert_eq!(
            shaped(401, "bad key\n"),
            serde_json::json!({"error":{"message":"bad key","type":"authentication_error","param":null,"code":"invalid_api_key"}})
        );
        assert_eq!(shaped(503, "busy")["error"]["code"], "service_unavailable");
        assert_eq!(shaped(503, "busy")["error"]["type"], "overloaded_error");
        for (status, body) in
            [(500, "Traceback (most recent call last): ..."), (502, "<html>bad gateway</html>"), (500, "")]
        {
            assert_eq!(
                shaped(status, body),
                serde_json::json!({"error":{"message":"Internal server error","type":"api_error","param":null,"code":null}}),
                "{status} {body}"
            );
        }
        assert_eq!(shaped(422, "<html>no</html>")["error"]["message"], "Unprocessable Entity");
        assert_eq!(shaped(404, "")["error"]["message"], "Not Found");
        let long = "é".repeat(2000);
        let message = shaped(400, &long)["error"]["message"].as_str().map(str::len);
        assert!(message.is_some_and(|len| len <= MAX_TEXT_MESSAGE), "{message:?}");
    }

    #[test]
    fn only_non_stream_errors_are_shaped() {
        assert!(shapes(StatusCode::BAD_REQUEST, Some("application/json"), false));
        assert!(shapes(StatusCode::INTERNAL_SERVER_ERROR, None, false));
        assert!(!shapes(StatusCode::OK, Some("application/json"), false));
        assert!(!shapes(StatusCode::TEMPORARY_REDIRECT, Some("application/json"), false), "a redirect passes");
        assert!(!shapes(StatusCode::BAD_REQUEST, Some("text/event-stream; charset=utf-8"), false));
        assert!(!shapes(StatusCode::BAD_REQUEST, Some("application/json"), true), "gzip passes as it came");
    }

    #[tokio::test]
    async fn the_layer_holds_the_error_until_its_end() {
        let engine = Scripted::new(vec![
            Step::data(r#"{"object":"error","#),
            Step::Wait,
            Step::data(r#""message":"too long","type":"BadRequestError","code":400}"#),
        ]);
        let (chunks, end) = drain(ErrorShaped::new(engine, Some(StatusCode::BAD_REQUEST))).await;
        assert_eq!(end, Ok(()));
        assert_eq!(chunks.len(), 1, "one shaped body: {chunks:?}");
        let body: Value = serde_json::from_str(&chunks[0]).unwrap_or_default();
        assert_eq!(body["error"]["message"], "too long");

        let passing = Scripted::new(vec![Step::data("a"), Step::data("b")]);
        let (chunks, _) = drain(ErrorShaped::new(passing, None)).await;
        assert_eq!(chunks, ["a", "b"], "a success passes frame by frame");

        let huge = Scripted::sized(vec![Step::data("x".repeat(MAX_ERROR_BODY)), Step::data("y".repeat(1000))]);
        let mut huge = ErrorShaped::new(huge, Some(StatusCode::BAD_REQUEST));
        let (chunks, end) = drain(&mut huge).await;
        assert_eq!(end, Ok(()));
        assert!(huge.inner.is_end_stream(), "the engine's body is read to its end");
        assert!(chunks[0].len() <= MAX_TEXT_MESSAGE + 200, "held, then cut: {}", chunks[0].len());

        let broken = Scripted::new(vec![Step::data("partial"), Step::Fail]);
        let (chunks, end) = drain(ErrorShaped::new(broken, Some(StatusCode::BAD_GATEWAY))).await;
        assert_eq!(end, Ok(()));
        assert!(chunks[0].contains("Internal server error") || chunks[0].contains("partial"), "{chunks:?}");
    }
}
