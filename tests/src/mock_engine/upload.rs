//! Audio uploads (`/v1/audio/transcriptions`, `/v1/audio/translations`): a
//! `multipart/form-data` body read as it streams in, never held whole. The
//! answer reports what arrived — the form's fields, and the file's length and
//! SHA-256 — so a test can check the upload byte for byte; with `stream=true`
//! it comes as server-sent transcription chunks.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::body::MockBody;
use super::connection::ConnectionAborted;
use super::request::Endpoint;
use super::state::EngineState;
use super::stats::RecordedRequest;

/// Largest form field other than a file the mock keeps.
const MAX_FIELD_BYTES: usize = 64 * 1024;

/// What arrived in an upload.
#[derive(Debug, Default)]
struct Received {
    fields: Map<String, Value>,
    file_name: Option<String>,
    file_bytes: u64,
    file_sha256: String,
}

/// Answers an upload to `endpoint`. `Err` drops the connection unanswered.
pub async fn handle(
    state: Arc<EngineState>,
    endpoint: Endpoint,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, ConnectionAborted> {
    let _in_flight = state.stats.enter(endpoint);
    let (parts, body) = request.into_parts();
    let content_type = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let boundary = match multer::parse_boundary(content_type) {
        Ok(boundary) => boundary,
        Err(err) => {
            let message = format!("expected a multipart/form-data upload: {err}");
            return Ok(state.error(StatusCode::BAD_REQUEST, "BadRequestError", &message, None));
        }
    };
    // Recorded without its body: an upload may be hundreds of megabytes.
    state.stats.record(RecordedRequest {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body: Bytes::new(),
    });
    let received = match read_form(body, boundary).await {
        Ok(received) => received,
        Err(FormError::Broken) => return Err(ConnectionAborted),
        Err(FormError::Invalid(message)) => {
            return Ok(state.error(StatusCode::BAD_REQUEST, "BadRequestError", &message, None));
        }
    };
    if let Some(status) = state.faults.current().fail_status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(state.failure(status));
    }
    if let Some(refusal) = state.refusal_while_asleep() {
        return Ok(refusal);
    }
    let model = received.fields.get("model").and_then(Value::as_str).unwrap_or("").to_owned();
    // An adapter's request runs until the answer is built (the stream is built whole).
    let (model, _adapter) = match state.serve_model(Some(model)) {
        Ok(served) => (served.name, served.adapter),
        Err(unknown) => return Ok(state.model_not_found(&unknown)),
    };
    let upload = json!({
        "fields": received.fields,
        "file_name": received.file_name,
        "file_bytes": received.file_bytes,
        "file_sha256": received.file_sha256,
    });
    let words = ["mock", "transcription", "of", "the", "upload"];
    let streamed = received.fields.get("stream").and_then(Value::as_str).is_some_and(|s| s == "true" || s == "1");
    if streamed {
        let mut events = String::new();
        for word in words {
            let chunk = json!({"object": "transcription.chunk", "model": model,
                "choices": [{"delta": {"content": format!("{word} ")}}]});
            events.push_str(&format!("data: {chunk}\n\n"));
        }
        let last = json!({"object": "transcription.chunk", "model": model, "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": words.len(), "total_tokens": words.len() + 1},
            "mock_upload": upload});
        events.push_str(&format!("data: {last}\n\ndata: [DONE]\n\n"));
        return Ok(state.respond(StatusCode::OK, "text/event-stream", MockBody::full(events)));
    }
    let body = json!({"text": words.join(" "), "usage": {"type": "duration", "seconds": 1}, "mock_upload": upload});
    Ok(state.json(StatusCode::OK, Bytes::from(body.to_string())))
}

enum FormError {
    /// The connection failed mid-upload.
    Broken,
    /// Not a form the engine can read.
    Invalid(String),
}

/// Reads the form, hashing file parts chunk by chunk.
async fn read_form(body: Incoming, boundary: String) -> Result<Received, FormError> {
    let stream = body.into_data_stream();
    let mut form = multer::Multipart::new(stream, boundary);
    let mut received = Received::default();
    let failed = |err: multer::Error| match err {
        multer::Error::StreamReadFailed(_) => FormError::Broken,
        err => FormError::Invalid(format!("invalid multipart form: {err}")),
    };
    let mut hasher = Sha256::new();
    while let Some(mut field) = form.next_field().await.map_err(failed)? {
        let name = field.name().unwrap_or("").to_owned();
        if let Some(file_name) = field.file_name() {
            received.file_name = Some(file_name.to_owned());
            while let Some(chunk) = field.chunk().await.map_err(failed)? {
                received.file_bytes += chunk.len() as u64;
                hasher.update(&chunk);
            }
            continue;
        }
        let mut value = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(failed)? {
            if value.len() + chunk.len() > MAX_FIELD_BYTES {
                return Err(FormError::Invalid(format!("field {name} exceeds {MAX_FIELD_BYTES} bytes")));
            }
            value.extend_from_slice(&chunk);
        }
        received.fields.insert(name, Value::String(String::from_utf8_lossy(&value).trim().to_owned()));
    }
    received.file_sha256 = format!("{:x}", hasher.finalize());
    Ok(received)
}
