//! The life of an inference request, in order: count → read → faults → refuse while asleep
//! → parse → check the model (a base model or a loaded LoRA adapter) → generate → answer.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{MockBody, TokenStream};
use super::connection::{ConnectionAborted, ResetSwitch};
use super::generation::{Generation, TokenTiming};
use super::openai::{Completion, KvTransferOut, PrefillAnswer, Usage};
use super::pd::PdOutcome;
use super::request::{Endpoint, InferenceRequest};
use super::state::EngineState;
use super::stats::RecordedRequest;

/// Largest request body accepted (vLLM has no such limit; this only bounds memory).
const MAX_BODY_BYTES: usize = 64 << 20;

/// Answers an inference request to `endpoint`. `Err` drops the connection unanswered.
pub async fn handle(
    state: Arc<EngineState>,
    endpoint: Endpoint,
    request: Request<Incoming>,
    reset: ResetSwitch,
) -> Result<Response<MockBody>, ConnectionAborted> {
    let arrival = Instant::now();
    let in_flight = state.stats.enter(endpoint);

    let (parts, body) = request.into_parts();
    let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = match read_body(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(ReadError::TooLarge) => {
            let message = format!("request body exceeds {MAX_BODY_BYTES} bytes");
            return Ok(state.error(StatusCode::PAYLOAD_TOO_LARGE, "BadRequestError", &message, None));
        }
        // The client went away or sent a broken body: nobody to answer.
        Err(ReadError::Broken) => return Err(ConnectionAborted),
    };
    state.stats.record(RecordedRequest {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body: body.clone(),
    });

    let faults = state.faults.current();
    if faults.hang {
        // hyper drops this future, and with it `in_flight`, once the client closes.
        let never: Infallible = std::future::pending().await;
        match never {}
    }
    if let Some(status) = faults.fail_status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(state.failure(status));
    }
    // After the faults, which stand for a broken server or network in front of the engine.
    if let Some(refusal) = state.refusal_while_asleep() {
        return Ok(refusal);
    }

    let mut request = match serde_json::from_slice::<InferenceRequest>(&body) {
        Ok(request) => request,
        Err(_) if faults.reset_after_chunks.is_some() => return Err(reset.trigger()),
        Err(err) => {
            let message = format!("Invalid JSON in request body: {err}");
            return Ok(state.error(StatusCode::BAD_REQUEST, "BadRequestError", &message, None));
        }
    };
    let streams = request.is_stream() && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions);
    if faults.reset_after_chunks.is_some() && !streams {
        return Err(reset.trigger());
    }
    if matches!(endpoint, Endpoint::Responses | Endpoint::Messages) && request.is_stream() {
        let message = format!("the mock engine does not stream {}", endpoint.path());
        let message = message.as_str();
        return Ok(state.error(StatusCode::BAD_REQUEST, "BadRequestError", message, Some("stream")));
    }
    // A request on a LoRA adapter counts as running on it until `adapter` is dropped: with
    // the answer, or with the stream that carries it.
    let (model, adapter) = match state.serve_model(request.model.take()) {
        Ok(served) => (served.name, served.adapter),
        Err(unknown) => return Ok(state.model_not_found(&unknown)),
    };

    let prompt_tokens = request.prompt_tokens();
    let prefilled = match state.pd.check(endpoint, &body, request_id.as_deref(), prompt_tokens) {
        Ok(PdOutcome::Prefilled(answer)) => Some(answer),
        Ok(PdOutcome::Plain | PdOutcome::Decoded) => None,
        // An SGLang decode starts once its prefill has filled the bootstrap room.
        Ok(PdOutcome::AwaitRoom(wait)) => match state.pd.await_room(wait).await {
            Ok(()) => None,
            Err((status, message)) => {
                let kind = if status == StatusCode::GATEWAY_TIMEOUT { "TimeoutError" } else { "BadRequestError" };
                return Ok(state.error(status, kind, &message, Some(state.pd.param())));
            }
        },
        Err(message) => {
            return Ok(state.error(StatusCode::BAD_REQUEST, "BadRequestError", &message, Some(state.pd.param())));
        }
    };
    let completion_tokens = match endpoint {
        Endpoint::Embeddings | Endpoint::Rerank | Endpoint::Classify | Endpoint::Score => 0,
        _ => request.completion_tokens(state.default_completion_tokens),
    };
    // Prompt tokens the prefix cache holds cost no prefill time.
    let cached_tokens = state.prefix_cache.lookup_and_insert(&body).min(prompt_tokens);
    state.metrics.prefix_cache_lookup(prompt_tokens, cached_tokens);
    let uncached = u32::try_from(prompt_tokens - cached_tokens).unwrap_or(u32::MAX);
    let timing = TokenTiming {
        ttft: faults.ttft().saturating_add(state.ttft_per_uncached_token.saturating_mul(uncached)),
        itl: faults.itl(),
        per_running: state.ttft_per_running,
    };
    let mut generation =
        Generation::start(&state.load, Arc::clone(&state.metrics), timing, arrival, prompt_tokens, completion_tokens);
    let completion = Completion::new(&state.ids, endpoint, model, completion_tokens);

    if streams {
        let reset = faults.reset_after_chunks.map(|events| (events, reset));
        let stream = TokenStream::new(generation, completion, request.include_usage(), reset, (in_flight, adapter));
        return Ok(state.respond(StatusCode::OK, "text/event-stream", MockBody::Stream(Box::new(stream))));
    }

    generation.run_to_end().await;
    let usage = Usage::new(prompt_tokens, u64::from(completion_tokens));
    let body = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => {
            let prefilled = prefilled.or_else(|| {
                request
                    .is_remote_decode_prefill()
                    .then(|| PrefillAnswer::kv(KvTransferOut::new(&state.name, state.local_addr)))
            });
            completion.full_body(usage, prefilled.as_ref())
        }
        Endpoint::Embeddings => completion.embeddings_body(request.embedding_count(), prompt_tokens),
        Endpoint::Responses => completion.response_body(usage),
        _ => completion.other_body(usage, request.pooled_items()),
    };
    drop((in_flight, adapter));
    Ok(state.json(StatusCode::OK, body))
}

/// Why a request body could not be read.
pub enum ReadError {
    /// Longer than the limit.
    TooLarge,
    /// The connection failed or the body's framing was broken.
    Broken,
}

/// Reads a whole request body of at most `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ReadError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => Err(ReadError::TooLarge),
        Err(_) => Err(ReadError::Broken),
    }
}
