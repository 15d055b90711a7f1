//! The bodies of a pair's two requests, per engine, as AIBrix's engine
//! handlers write them. Every prefill gets a one-token budget, no streaming
//! (vLLM refuses `stream_options` without `stream`) and no `min_tokens`; then:
//!
//! - vLLM, `shfs`: the prefill asks for a remote decode in
//!   `kv_transfer_params`; its answer's parameters, with `remote_host` set to
//!   the prefill pod's IP, go into the decode body.
//! - vLLM, `nixl`: the prefill's whole answer goes into the decode body as
//!   `disagg_prefill_resp`.
//! - vLLM, `mooncake`, and engines without a handshake: nothing is passed.
//! - SGLang: both bodies name the prefill pod's bootstrap server
//!   (`bootstrap_host`, `bootstrap_port`) and one random `bootstrap_room`;
//!   the two requests run side by side.
//! - TensorRT-LLM: the prefill is `context_only` under a fresh
//!   `disagg_request_id` (and without `max_completion_tokens`, which it does
//!   not take); the answer's `disaggregated_params` go into the decode body
//!   as `generation_only`, with the prompt's token ids.
//!
//! Bodies are edited at the top level only ([`TopLevel`]): the rest keeps
//! the client's bytes, and 64-bit ids are never turned into floats.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde_json::Value;
use serde_json::value::RawValue;

use super::body::TopLevel;
use crate::errors::GatewayError;
use crate::proxy::request::Endpoint;
use crate::routing::pd::{Handshake, KvConnector};

/// The keys an SGLang pair's bodies set or remove: a client naming one
/// twice is refused, since which of its values the engine reads is not
/// the gateway's to guess (AIBrix's rule).
const SGLANG_CONTROLLED: [&str; 8] = [
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "min_tokens",
];

/// 2023-01-01T00:00:00Z, the epoch of TensorRT-LLM disaggregated ids.
const TRT_EPOCH_MS: i64 = 1_672_531_200_000;
/// Ids below this are local to one TensorRT-LLM worker.
const TRT_MIN_GLOBAL_ID: i64 = 1 << 42;

/// The prefill's body, and the decode's when it does not depend on the
/// prefill's answer.
pub struct Bodies {
    pub prefill: Bytes,
    pub decode: Option<Bytes>,
}

/// Why the bodies could not be written.
pub enum BodyError {
    /// The client's request cannot be split (400).
    Client(GatewayError),
    /// Anything else (503, as a failed prefill).
    Gateway(String),
}

/// The bodies for `handshake` from the client's body (parsed as `client`);
/// `prefill_ip` is the prefill pod's IP.
pub fn bodies(
    handshake: Handshake,
    client: &TopLevel,
    client_bytes: &Bytes,
    prefill_ip: &str,
    trt_machine_id: u16,
) -> Result<Bodies, BodyError> {
    let gateway = |e: String| BodyError::Gateway(e);
    let mut prefill = client.clone();
    let decode = match handshake {
        Handshake::Vllm(KvConnector::Shfs) => {
            let skeleton = serde_json::json!({
                "do_remote_decode": true,
                "do_remote_prefill": false,
                "remote_engine_id": null,
                "remote_block_ids": null,
                "remote_host": null,
                "remote_port": null,
            });
            prefill.set("kv_transfer_params", &skeleton).map_err(gateway)?;
            None
        }
        Handshake::Vllm(KvConnector::Nixl) => None,
        Handshake::Vllm(KvConnector::Mooncake) | Handshake::Plain => Some(client_bytes.clone()),
        Handshake::Sglang { bootstrap_port } => {
            if let Some(key) = client.repeated(&SGLANG_CONTROLLED) {
                return Err(BodyError::Client(GatewayError::InvalidField {
                    message: format!("duplicate top-level key {key:?} in SGLang request body"),
                    param: key,
                }));
            }
            let mut decode = client.clone();
            decode.set("bootstrap_host", &prefill_ip).map_err(gateway)?;
            decode.set("bootstrap_port", &bootstrap_port).map_err(gateway)?;
            decode.set("bootstrap_room", &rand::random_range(0..i64::MAX)).map_err(gateway)?;
            prefill = decode.clone();
            Some(decode.to_bytes())
        }
        Handshake::TrtLlm => {
            let params = serde_json::json!({
                "request_type": "context_only",
                "disagg_request_id": disagg_request_id(trt_machine_id, now_ms()),
            });
            prefill.set("disaggregated_params", &params).map_err(gateway)?;
            None
        }
    };
    prefill.set("max_tokens", &1).map_err(gateway)?;
    if handshake == Handshake::TrtLlm {
        prefill.remove("max_completion_tokens");
    } else {
        prefill.set("max_completion_tokens", &1).map_err(gateway)?;
    }
    prefill.set("stream", &false).map_err(gateway)?;
    prefill.remove("stream_options");
    prefill.remove("min_tokens");
    Ok(Bodies { prefill: prefill.to_bytes(), decode })
}

/// The decode body of a synchronous handshake, from the prefill's `answer`.
/// An answer without the engine's parameters leaves the client's body as
/// it is (the engine decodes from scratch).
pub fn decode_body(
    handshake: Handshake,
    endpoint: Endpoint,
    client: &TopLevel,
    client_bytes: &Bytes,
    answer: &[u8],
    prefill_ip: &str,
) -> Result<Bytes, String> {
    let answer = trim(answer);
    let not_object = |e: String| format!("the prefill answer is not a JSON object ({e})");
    match handshake {
        Handshake::Vllm(KvConnector::Shfs) => {
            let parsed = TopLevel::parse(answer).map_err(not_object)?;
            let params = match parsed.get("kv_transfer_params").map(RawValue::get) {
                None | Some("null") => return Ok(client_bytes.clone()),
                Some(raw) => serde_json::from_str::<Value>(raw).map_err(|e| e.to_string())?,
            };
            let mut params = match params {
                Value::Object(params) => params,
                other => return Err(format!("kv_transfer_params is not an object: {other}")),
            };
            params.insert("remote_host".into(), Value::String(prefill_ip.to_owned()));
            let mut decode = client.clone();
            decode.set("kv_transfer_params", &params)?;
            Ok(decode.to_bytes())
        }
        Handshake::Vllm(KvConnector::Nixl) => {
            TopLevel::parse(answer).map_err(not_object)?;
            let text = std::str::from_utf8(answer).map_err(|e| e.to_string())?;
            let raw = RawValue::from_string(text.to_owned()).map_err(|e| e.to_string())?;
            let mut decode = client.clone();
            decode.set_raw("disagg_prefill_resp", raw);
            Ok(decode.to_bytes())
        }
        Handshake::TrtLlm => {
            let Value::Object(mut answer) =
                serde_json::from_slice::<Value>(answer).map_err(|e| not_object(e.to_string()))?
            else {
                return Err(not_object("not an object".to_owned()));
            };
            let params = match answer.remove("disaggregated_params") {
                Some(params) => Some(params),
                None => answer
                    .get_mut("choices")
                    .and_then(Value::as_array_mut)
                    .and_then(|choices| choices.first_mut())
                    .and_then(Value::as_object_mut)
                    .and_then(|choice| choice.remove("disaggregated_params")),
            };
            let Some(params) = params else { return Ok(client_bytes.clone()) };
            let mut params = match params {
                Value::Object(params) => params,
                other => return Err(format!("disaggregated_params is not an object: {other}")),
            };
            params.insert("request_type".into(), Value::from("generation_only"));
            let mut decode = client.clone();
            decode.set("disaggregated_params", &Value::Object(params))?;
            if let Some(ids @ Value::Array(_)) = answer.get("prompt_token_ids") {
                match endpoint {
                    Endpoint::Completions => decode.set("prompt", ids)?,
                    Endpoint::ChatCompletions => decode.set("prompt_token_ids", ids)?,
                    _ => {}
                }
            }
            Ok(decode.to_bytes())
        }
        Handshake::Vllm(KvConnector::Mooncake) | Handshake::Sglang { .. } | Handshake::Plain => {
            Ok(client_bytes.clone())
        }
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// A TensorRT-LLM `disagg_request_id`: milliseconds since 2023 (41 bits),
/// the machine id (10 bits) and a per-process counter (12 bits), moved
/// into the global range [2^42, 2^63) as AIBrix does.
pub fn disagg_request_id(machine_id: u16, now_ms: i64) -> i64 {
    // From a random start: replicas that share a machine id still rarely
    // make the same id in the same millisecond.
    static COUNTER: OnceLock<AtomicU64> = OnceLock::new();
    let counter = COUNTER.get_or_init(|| AtomicU64::new(rand::random()));
    let timestamp = (now_ms - TRT_EPOCH_MS).clamp(0, (1 << 41) - 1);
    let counter = (counter.fetch_add(1, Ordering::Relaxed) & 0xfff) as i64;
    let global = (timestamp << 22) | (i64::from(machine_id & 0x3ff) << 12) | counter;
    global % (i64::MAX - TRT_MIN_GLOBAL_ID) + TRT_MIN_GLOBAL_ID
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
