//! Prefill/decode disaggregation roles (`--role prefill|decode`), checking the vLLM
//! `kv_transfer_params` handshake a PD gateway must perform.
//!
//! A prefill engine accepts only prefill requests (`kv_transfer_params.do_remote_decode`,
//! no streaming, a one-token budget) and answers with where it left the KV blocks: its
//! engine id, block ids, a transfer id naming this prompt, and the host and port it knows
//! itself by. That host is `localhost`, as vLLM's default side channel reports it, so the
//! gateway has to replace it with the prefill pod's IP. A decode engine accepts only
//! requests carrying such parameters, with `remote_host` equal to the prefill pods' IP
//! (`--prefill-host`) and a transfer id made for the same prompt. Violations get a 400 with
//! a message saying what is wrong. Both roles keep counts and the transfers they saw for
//! `/mock/stats`.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use clap::ValueEnum;
use serde_json::{Map, Value, json};

use super::openai::KvTransferOut;
use super::request::Endpoint;

/// The host a prefill engine reports for itself (vLLM's default side-channel host).
const PREFILL_SELF_HOST: &str = "localhost";
/// Transfers kept for `/mock/stats`.
const MAX_TRANSFERS_KEPT: usize = 1024;
/// Prompt tokens per reported KV block.
const BLOCK_TOKENS: u64 = 16;

/// What part of a disaggregated request an engine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PdRole {
    /// Only prefills: one token, KV blocks kept for a remote decode.
    Prefill,
    /// Only decodes requests prefilled elsewhere.
    Decode,
}

impl PdRole {
    fn as_str(self) -> &'static str {
        match self {
            PdRole::Prefill => "prefill",
            PdRole::Decode => "decode",
        }
    }
}

/// The engine's PD role and what it saw.
#[derive(Debug)]
pub struct PdState {
    role: Option<PdRole>,
    engine: String,
    port: u16,
    expected_remote_host: String,
    next_transfer: AtomicU64,
    log: Mutex<PdLog>,
}

#[derive(Debug, Default)]
struct PdLog {
    accepted: u64,
    rejected: u64,
    last_rejection: Option<String>,
    transfers: VecDeque<Value>,
}

/// What a request checked by its role gets.
#[derive(Debug)]
pub enum PdOutcome {
    /// Not a PD engine, or not a generation endpoint: serve as usual.
    Plain,
    /// A prefill: answer with these parameters.
    Prefilled(KvTransferOut),
    /// A decode of a valid transfer: serve as usual.
    Decoded,
}

impl PdState {
    /// The state of engine `engine` serving on `port` in `role`; a decode engine expects
    /// prefill pods at `expected_remote_host`.
    pub fn new(role: Option<PdRole>, engine: &str, port: u16, expected_remote_host: &str) -> Self {
        Self {
            role,
            engine: engine.to_owned(),
            port,
            expected_remote_host: expected_remote_host.to_owned(),
            next_transfer: AtomicU64::new(0),
            log: Mutex::default(),
        }
    }

    /// Checks a request against the engine's role. `Err` is the message of a 400.
    pub fn check(
        &self,
        endpoint: Endpoint,
        body: &[u8],
        request_id: Option<&str>,
        prompt_tokens: u64,
    ) -> Result<PdOutcome, String> {
        let Some(role) = self.role else { return Ok(PdOutcome::Plain) };
        if !matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions) {
            return Ok(PdOutcome::Plain);
        }
        let checked = serde_json::from_slice::<Value>(body)
            .map_err(|err| format!("Invalid JSON in request body: {err}"))
            .and_then(|value| match value {
                Value::Object(object) => Ok(object),
                _ => Err("the request body is not a JSON object".to_owned()),
            })
            .and_then(|object| match role {
                PdRole::Prefill => self.prefill(&object, request_id, prompt_tokens),
                PdRole::Decode => self.decode(&object, request_id),
            });
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        match checked {
            Ok((outcome, record)) => {
                log.accepted += 1;
                if log.transfers.len() >= MAX_TRANSFERS_KEPT {
                    log.transfers.pop_front();
                }
                log.transfers.push_back(record);
                Ok(outcome)
            }
            Err(message) => {
                let message = format!("{} pod: {message}", role.as_str());
                log.rejected += 1;
                log.last_rejection = Some(message.clone());
                Err(message)
            }
        }
    }

    fn prefill(
        &self,
        body: &Map<String, Value>,
        request_id: Option<&str>,
        prompt_tokens: u64,
    ) -> Result<(PdOutcome, Value), String> {
        let kv = body.get("kv_transfer_params").and_then(Value::as_object);
        if kv.and_then(|kv| kv.get("do_remote_decode")).and_then(Value::as_bool) != Some(true) {
            return Err("kv_transfer_params.do_remote_decode must be true: this pod only prefills".to_owned());
        }
        if kv.and_then(|kv| kv.get("do_remote_prefill")).and_then(Value::as_bool) == Some(true) {
            return Err("kv_transfer_params.do_remote_prefill must be false on a prefill".to_owned());
        }
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            return Err("stream must be false on a prefill".to_owned());
        }
        if body.get("stream_options").is_some_and(|v| !v.is_null()) {
            return Err("stream_options is only allowed with stream=true".to_owned());
        }
        for field in ["max_tokens", "max_completion_tokens"] {
            let value = body.get(field).unwrap_or(&Value::Null);
            let required = field == "max_tokens";
            if (required || !value.is_null()) && value.as_u64() != Some(1) {
                return Err(format!("{field} must be 1 on a prefill, got {value}"));
            }
        }
        let seq = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        let transfer_id = format!("{}-{seq}-{:016x}", self.engine, prompt_digest(body));
        let blocks = prompt_tokens.div_ceil(BLOCK_TOKENS).max(1);
        let block_ids = (0..blocks).map(|i| seq * 1000 + i).collect();
        let out = KvTransferOut::transfer(&self.engine, PREFILL_SELF_HOST, self.port, block_ids, transfer_id.clone());
        let record = json!({"x_request_id": request_id, "transfer_id": transfer_id});
        Ok((PdOutcome::Prefilled(out), record))
    }

    fn decode(&self, body: &Map<String, Value>, request_id: Option<&str>) -> Result<(PdOutcome, Value), String> {
        let Some(kv) = body.get("kv_transfer_params").and_then(Value::as_object) else {
            return Err("kv_transfer_params missing: this pod only decodes requests prefilled elsewhere".to_owned());
        };
        if kv.get("do_remote_prefill").and_then(Value::as_bool) != Some(true) {
            return Err("kv_transfer_params.do_remote_prefill must be true on a decode".to_owned());
        }
        let host = kv.get("remote_host").unwrap_or(&Value::Null);
        if host.as_str() != Some(self.expected_remote_host.as_str()) {
            return Err(format!(
                "kv_transfer_params.remote_host is {host}, not the prefill pod's IP {}",
                self.expected_remote_host
            ));
        }
        let engine = kv.get("remote_engine_id").and_then(Value::as_str).filter(|e| !e.is_empty());
        let Some(engine) = engine else {
            return Err("kv_transfer_params.remote_engine_id missing".to_owned());
        };
        if kv.get("remote_port").and_then(Value::as_u64).is_none() {
            return Err("kv_transfer_params.remote_port missing".to_owned());
        }
        if kv.get("remote_block_ids").and_then(Value::as_array).is_none_or(|ids| ids.is_empty()) {
            return Err("kv_transfer_params.remote_block_ids missing".to_owned());
        }
        let transfer_id = kv.get("remote_request_id").and_then(Value::as_str).unwrap_or("");
        let digest = transfer_id.rsplit('-').next().and_then(|hex| u64::from_str_radix(hex, 16).ok());
        if digest != Some(prompt_digest(body)) {
            return Err(format!("kv_transfer_params.remote_request_id {transfer_id:?} was not issued for this prompt"));
        }
        let record = json!({
            "x_request_id": request_id,
            "transfer_id": transfer_id,
            "remote_engine_id": engine,
            "remote_host": host,
            "stream": body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        });
        Ok((PdOutcome::Decoded, record))
    }

    /// The `pd` part of `/mock/stats`.
    pub fn to_json(&self) -> Value {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        json!({
            "role": self.role.map(PdRole::as_str),
            "accepted": log.accepted,
            "rejected": log.rejected,
            "last_rejection": log.last_rejection,
            "transfers": log.transfers,
        })
    }
}

/// A digest of the prompt fields, equal for a prefill and its decode.
fn prompt_digest(body: &Map<String, Value>) -> u64 {
    let mut hasher = DefaultHasher::new();
    for field in ["messages", "prompt", "input"] {
        body.get(field).map(Value::to_string).hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefill_engine() -> PdState {
        PdState::new(Some(PdRole::Prefill), "p0", 7000, "127.0.0.1")
    }

    fn decode_engine() -> PdState {
        PdState::new(Some(PdRole::Decode), "d0", 7001, "127.0.0.1")
    }

    fn check(state: &PdState, body: &Value) -> Result<PdOutcome, String> {
        state.check(Endpoint::ChatCompletions, body.to_string().as_bytes(), Some("r1"), 20)
    }

    fn prefill_request() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "max_completion_tokens": 1, "stream": false, "kv_transfer_params": {"do_remote_decode": true}})
    }

    /// The prefill's parameters as a gateway would pass them on.
    fn handed_over(out: &KvTransferOut, host: &str) -> Value {
        let mut kv = serde_json::to_value(out).expect("serializable");
        kv["remote_host"] = json!(host);
        kv
    }

    #[test]
    fn prefill_engine_checks_the_prefill_request() {
        let engine = prefill_engine();
        let Ok(PdOutcome::Prefilled(out)) = check(&engine, &prefill_request()) else { panic!("a valid prefill") };
        let kv = serde_json::to_value(&out).expect("serializable");
        assert_eq!(kv["remote_host"], "localhost");
        assert_eq!(kv["remote_engine_id"], "p0");
        assert_eq!(kv["remote_block_ids"].as_array().map(Vec::len), Some(2), "20 tokens, 16 per block");
        for (change, message) in [
            (json!({"kv_transfer_params": null}), "do_remote_decode must be true"),
            (json!({"stream": true}), "stream must be false"),
            (json!({"stream_options": {"include_usage": true}}), "stream_options"),
            (json!({"max_tokens": 5}), "max_tokens must be 1"),
            (json!({"max_completion_tokens": 2}), "max_completion_tokens must be 1"),
        ] {
            let mut body = prefill_request();
            for (k, v) in change.as_object().expect("object") {
                body[k] = v.clone();
            }
            let err = check(&engine, &body).expect_err("rejected");
            assert!(err.starts_with("prefill pod: ") && err.contains(message), "{err}");
        }
        assert_eq!(engine.to_json()["rejected"], 5);
        assert_eq!(engine.to_json()["accepted"], 1);
    }

    #[test]
    fn decode_engine_checks_the_handover() {
        let Ok(PdOutcome::Prefilled(out)) = check(&prefill_engine(), &prefill_request()) else { panic!("prefill") };
        let engine = decode_engine();
        let decode = |kv: Value| {
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                "kv_transfer_params": kv})
        };
        assert!(matches!(check(&engine, &decode(handed_over(&out, "127.0.0.1"))), Ok(PdOutcome::Decoded)));
        let err = check(&engine, &decode(handed_over(&out, "localhost"))).expect_err("host not rewritten");
        assert!(err.contains("not the prefill pod's IP"), "{err}");
        let err = check(&engine, &decode(Value::Null)).expect_err("no parameters");
        assert!(err.contains("kv_transfer_params missing"), "{err}");
        let mut other_prompt = decode(handed_over(&out, "127.0.0.1"));
        other_prompt["messages"] = json!([{"role": "user", "content": "something else"}]);
        let err = check(&engine, &other_prompt).expect_err("another prompt's transfer");
        assert!(err.contains("not issued for this prompt"), "{err}");
        let stats = engine.to_json();
        assert_eq!((stats["accepted"].as_u64(), stats["rejected"].as_u64()), (Some(1), Some(3)));
        assert_eq!(stats["transfers"][0]["remote_engine_id"], "p0");
        assert_eq!(stats["transfers"][0]["x_request_id"], "r1");
    }

    #[test]
    fn engines_without_a_role_and_other_endpoints_are_plain() {
        let plain = PdState::new(None, "e", 1, "127.0.0.1");
        assert!(matches!(check(&plain, &json!({"stream": true})), Ok(PdOutcome::Plain)));
        let decode = decode_engine();
        assert!(matches!(decode.check(Endpoint::Embeddings, b"{}", None, 1), Ok(PdOutcome::Plain)));
    }
}
