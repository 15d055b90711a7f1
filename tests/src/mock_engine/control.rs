//! Everything that is not inference: health, models, metrics, and the `/mock/*` control
//! endpoints tests use to steer and inspect the engine.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::MockBody;
use super::faults::FaultsPatch;
use super::inference::{ReadError, read_body};
use super::openai::{json_bytes, models_body};
use super::state::EngineState;

/// Largest `/mock/faults` body accepted.
const MAX_CONTROL_BODY_BYTES: usize = 64 * 1024;

/// Answers a request to any path other than the inference endpoints.
pub async fn handle(state: &EngineState, request: Request<Incoming>) -> Response<MockBody> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/health") => state.respond(StatusCode::OK, "", MockBody::empty()),
        (&Method::GET, "/v1/models") => state.json(StatusCode::OK, models_body(&state.models)),
        (&Method::GET, "/metrics") => {
            let text = state.metrics.render(state.first_model(), state.load.snapshot());
            state.respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", MockBody::full(text))
        }
        (&Method::GET, "/mock/stats") => {
            let mut stats = state.stats.to_json(&state.name);
            stats["pd"] = state.pd.to_json();
            state.json(StatusCode::OK, json_bytes(&stats))
        }
        (&Method::GET, "/mock/faults") => state.json(StatusCode::OK, json_bytes(&state.faults.current())),
        (&Method::POST, "/mock/faults") => update_faults(state, request).await,
        (_, "/health" | "/v1/models" | "/metrics" | "/mock/stats" | "/mock/faults") => method_not_allowed(state),
        _ => state.error(StatusCode::NOT_FOUND, "NotFoundError", "Not Found", None),
    }
}

/// The answer to a known path asked with the wrong method.
pub fn method_not_allowed(state: &EngineState) -> Response<MockBody> {
    state.error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "Method Not Allowed", None)
}

async fn update_faults(state: &EngineState, request: Request<Incoming>) -> Response<MockBody> {
    let body = match read_body(request.into_body(), MAX_CONTROL_BODY_BYTES).await {
        Ok(body) => body,
        Err(ReadError::TooLarge | ReadError::Broken) => {
            return state.error(StatusCode::BAD_REQUEST, "BadRequestError", "unreadable body", None);
        }
    };
    let patch = match serde_json::from_slice::<FaultsPatch>(&body) {
        Ok(patch) => patch,
        Err(err) => return state.error(StatusCode::BAD_REQUEST, "BadRequestError", &err.to_string(), None),
    };
    match state.faults.apply(patch) {
        Ok(faults) => state.json(StatusCode::OK, json_bytes(&faults)),
        Err(message) => state.error(StatusCode::BAD_REQUEST, "BadRequestError", &message, None),
    }
}
