//! Prefill/decode disaggregation roles (`--role prefill|decode`), checking the handshake a
//! PD gateway must perform for the engine the mock plays (`--engine-kind`).
//!
//! Every prefill must ask for one token (`max_tokens` 1; `max_completion_tokens` 1 when
//! present, absent for TensorRT-LLM, which reads only `max_tokens`), without streaming,
//! `stream_options` or `min_tokens`. Then, per engine:
//!
//! - vLLM (`vllm`), by `--kv-connector`. With `shfs` (the default) a prefill carries
//!   `kv_transfer_params.do_remote_decode` and answers with where it left the KV blocks: its
//!   engine id, block ids, a transfer id naming this prompt, and the host and port it knows
//!   itself by. That host is `localhost`, as vLLM's default side channel reports it, so the
//!   gateway has to replace it with the prefill pod's IP. A decode accepts only requests
//!   carrying such parameters, with `remote_host` equal to the prefill pods' IP
//!   (`--prefill-host`) and a transfer id made for the same prompt. With `nixl` the prefill
//!   carries no `kv_transfer_params` and its answer's `id` names the transfer; the decode must
//!   carry that whole answer as `disagg_prefill_resp`. With `mooncake` neither half carries
//!   anything: the decode gets the client's body.
//! - SGLang (`sglang`, [`bootstrap`]). Both halves carry `bootstrap_host` (the prefill pods'
//!   IP), `bootstrap_port` (the prefill's bootstrap server) and the same `bootstrap_room`. A
//!   prefill registers the room in its bootstrap server; a decode polls that server until the
//!   room shows up for the same prompt (the gateway sends both halves at once, so the decode
//!   often comes first), and answers 504 when it never does.
//! - TensorRT-LLM (`trtllm`). A prefill carries `disaggregated_params` with `request_type`
//!   `context_only` and a global `disagg_request_id` (at least 2^42, an i64), and answers with
//!   the prompt's token ids and `choices[0].disaggregated_params`. A decode carries those
//!   parameters back as `generation_only`, with the id unchanged (not rounded through a
//!   float), and the prompt's token ids.
//!
//! Violations get a 400 with a message saying what is wrong. Both roles keep counts and the
//! last transfers they saw for `/mock/stats`.

mod bootstrap;
mod sglang;
mod trtllm;
mod vllm;

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::ValueEnum;
use http::StatusCode;
use serde_json::{Map, Value, json};

pub use bootstrap::{BootstrapRooms, serve_bootstrap};

use super::openai::PrefillAnswer;
use super::request::Endpoint;

/// Transfers kept for `/mock/stats`.
const MAX_TRANSFERS_KEPT: usize = 1024;
/// Longest JSON value quoted in a rejection message.
const MAX_QUOTED_CHARS: usize = 80;

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

/// The engine whose prefill/decode handshake the mock plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// vLLM, with the KV connector of `--kv-connector`.
    Vllm,
    /// SGLang: bootstrap host, port and room.
    Sglang,
    /// TensorRT-LLM: `disaggregated_params`.
    Trtllm,
}

/// vLLM's KV connector: what the gateway hands from the prefill to the decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvConnector {
    /// The prefill's `kv_transfer_params`, with the prefill pod's IP as `remote_host`.
    Shfs,
    /// The prefill's whole answer, as `disagg_prefill_resp`.
    Nixl,
    /// Nothing: the connector finds the KV cache by itself.
    Mooncake,
}

impl KvConnector {
    fn as_str(self) -> &'static str {
        match self {
            KvConnector::Shfs => "shfs",
            KvConnector::Nixl => "nixl",
            KvConnector::Mooncake => "mooncake",
        }
    }
}

/// The handshake an engine checks: its kind, with the connector for vLLM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// vLLM with a KV connector.
    Vllm(KvConnector),
    /// SGLang's bootstrap rooms.
    Sglang,
    /// TensorRT-LLM's `disaggregated_params`.
    Trtllm,
}

impl Handshake {
    /// The handshake of `--engine-kind` and `--kv-connector`; a connector other than the
    /// default only makes sense for vLLM.
    pub fn from_args(kind: EngineKind, connector: KvConnector) -> Result<Self, String> {
        match (kind, connector) {
            (EngineKind::Vllm, connector) => Ok(Handshake::Vllm(connector)),
            (EngineKind::Sglang, KvConnector::Shfs) => Ok(Handshake::Sglang),
            (EngineKind::Trtllm, KvConnector::Shfs) => Ok(Handshake::Trtllm),
            (_, connector) => Err(format!("--kv-connector {} applies to --engine-kind vllm only", connector.as_str())),
        }
    }

    fn engine(self) -> &'static str {
        match self {
            Handshake::Vllm(_) => "vllm",
            Handshake::Sglang => "sglang",
            Handshake::Trtllm => "trtllm",
        }
    }

    fn connector(self) -> Option<&'static str> {
        match self {
            Handshake::Vllm(connector) => Some(connector.as_str()),
            Handshake::Sglang | Handshake::Trtllm => None,
        }
    }

    /// The body field a rejection names as its `param`.
    pub fn param(self) -> &'static str {
        match self {
            Handshake::Vllm(KvConnector::Nixl) => "disagg_prefill_resp",
            Handshake::Vllm(_) => "kv_transfer_params",
            Handshake::Sglang => "bootstrap_room",
            Handshake::Trtllm => "disaggregated_params",
        }
    }
}

/// The engine's PD role and what it saw.
#[derive(Debug)]
pub struct PdState {
    role: Option<PdRole>,
    handshake: Handshake,
    /// The pod name, which names transfers.
    name: String,
    port: u16,
    /// The prefill pods' IP, which the handover must name.
    prefill_host: String,
    next_transfer: AtomicU64,
    /// SGLang prefill: the port of its bootstrap server.
    bootstrap_port: Option<u16>,
    /// SGLang prefill: the rooms its bootstrap server reports.
    rooms: Arc<BootstrapRooms>,
    /// SGLang decode: how long to wait for a room.
    bootstrap_timeout: Duration,
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
    /// A prefill: answer one token with these additions.
    Prefilled(PrefillAnswer),
    /// A decode of a valid transfer: serve as usual.
    Decoded,
    /// An SGLang decode whose body is valid: serve it once [`PdState::await_room`] says its
    /// bootstrap room was prefilled.
    AwaitRoom(RoomWait),
}

/// An SGLang decode waiting for its bootstrap room.
#[derive(Debug)]
pub struct RoomWait {
    host: String,
    port: u16,
    room: u64,
    digest: u64,
    /// The transfer record, kept once the room shows up.
    record: Value,
}

/// What an engine's check of one request found.
enum Checked {
    /// Serve it (and record it).
    Accepted(PdOutcome, Value),
    /// An SGLang decode: wait for its room first.
    Pending(RoomWait),
}

/// One request as the handshake checks see it.
struct PdRequest<'a> {
    endpoint: Endpoint,
    body: &'a Map<String, Value>,
    request_id: Option<&'a str>,
    prompt_tokens: u64,
}

impl PdRequest<'_> {
    fn stream(&self) -> bool {
        self.body.get("stream").and_then(Value::as_bool).unwrap_or(false)
    }
}

/// What `max_completion_tokens` may be on a prefill.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CompletionCap {
    /// 1, or absent.
    OneIfPresent,
    /// Absent (TensorRT-LLM reads `max_tokens` only).
    Absent,
}

impl PdState {
    /// The state of engine `name` serving on `port` in `role`, checking vLLM's default
    /// (`shfs`) handshake; a decode engine expects prefill pods at `prefill_host`.
    pub fn new(role: Option<PdRole>, name: &str, port: u16, prefill_host: &str) -> Self {
        Self {
            role,
            handshake: Handshake::Vllm(KvConnector::Shfs),
            name: name.to_owned(),
            port,
            prefill_host: prefill_host.to_owned(),
            next_transfer: AtomicU64::new(0),
            bootstrap_port: None,
            rooms: Arc::default(),
            bootstrap_timeout: Duration::from_secs(3),
            log: Mutex::default(),
        }
    }

    /// The same, checking `handshake` instead.
    pub fn with_handshake(mut self, handshake: Handshake) -> Self {
        self.handshake = handshake;
        self
    }

    /// The same, with an SGLang prefill's bootstrap server on `port` and a decode waiting
    /// `timeout` for its room.
    pub fn with_bootstrap(mut self, port: Option<u16>, timeout: Duration) -> Self {
        self.bootstrap_port = port;
        self.bootstrap_timeout = timeout;
        self
    }

    /// The rooms an SGLang prefill registered, which its bootstrap server reports.
    pub fn rooms(&self) -> Arc<BootstrapRooms> {
        Arc::clone(&self.rooms)
    }

    /// The body field a rejection names as its `param`.
    pub fn param(&self) -> &'static str {
        self.handshake.param()
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
            .and_then(|object| {
                let request = PdRequest { endpoint, body: &object, request_id, prompt_tokens };
                self.check_request(role, &request)
            });
        match checked {
            Ok(Checked::Accepted(outcome, record)) => {
                self.accept(record);
                Ok(outcome)
            }
            Ok(Checked::Pending(wait)) => Ok(PdOutcome::AwaitRoom(wait)),
            Err(message) => Err(self.reject(role, &message)),
        }
    }

    fn check_request(&self, role: PdRole, request: &PdRequest<'_>) -> Result<Checked, String> {
        match (self.handshake, role) {
            (Handshake::Vllm(KvConnector::Shfs), PdRole::Prefill) => self.shfs_prefill(request),
            (Handshake::Vllm(KvConnector::Shfs), PdRole::Decode) => self.shfs_decode(request),
            (Handshake::Vllm(KvConnector::Nixl), PdRole::Prefill) => self.nixl_prefill(request),
            (Handshake::Vllm(KvConnector::Nixl), PdRole::Decode) => self.nixl_decode(request),
            (Handshake::Vllm(KvConnector::Mooncake), PdRole::Prefill) => self.mooncake_prefill(request),
            (Handshake::Vllm(KvConnector::Mooncake), PdRole::Decode) => self.mooncake_decode(request),
            (Handshake::Sglang, PdRole::Prefill) => self.sglang_prefill(request),
            (Handshake::Sglang, PdRole::Decode) => self.sglang_decode(request),
            (Handshake::Trtllm, PdRole::Prefill) => self.trtllm_prefill(request),
            (Handshake::Trtllm, PdRole::Decode) => self.trtllm_decode(request),
        }
    }

    /// Waits for an SGLang decode's bootstrap room. `Err` is the status and message to
    /// answer with: 504 when the room never showed up, 400 when it was prefilled for
    /// another prompt.
    pub async fn await_room(&self, wait: RoomWait) -> Result<(), (StatusCode, String)> {
        let RoomWait { host, port, room, digest, record } = wait;
        match bootstrap::wait_for_room(&host, port, room, digest, self.bootstrap_timeout).await {
            Ok(()) => {
                self.accept(record);
                Ok(())
            }
            Err(bootstrap::RoomError::OtherPrompt) => {
                let message = format!("bootstrap room {room} was prefilled for another prompt");
                Err((StatusCode::BAD_REQUEST, self.reject(PdRole::Decode, &message)))
            }
            Err(bootstrap::RoomError::NeverPrefilled) => {
                let message = format!(
                    "bootstrap room {room} was never prefilled within {} ms",
                    self.bootstrap_timeout.as_millis()
                );
                Err((StatusCode::GATEWAY_TIMEOUT, self.reject(PdRole::Decode, &message)))
            }
        }
    }

    fn accept(&self, record: Value) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.accepted += 1;
        if log.transfers.len() >= MAX_TRANSFERS_KEPT {
            log.transfers.pop_front();
        }
        log.transfers.push_back(record);
    }

    /// Counts a rejection and returns its message, which names the role.
    fn reject(&self, role: PdRole, message: &str) -> String {
        let message = format!("{} pod: {message}", role.as_str());
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.rejected += 1;
        log.last_rejection = Some(message.clone());
        message
    }

    /// The transfer record of an accepted `request`: who sent it, which engine and role
    /// took it, and `fields` naming the transfer.
    fn record(&self, role: PdRole, request: &PdRequest<'_>, fields: Value) -> Value {
        let mut record = Map::new();
        record.insert("x_request_id".into(), json!(request.request_id));
        record.insert("engine".into(), json!(self.handshake.engine()));
        record.insert("connector".into(), json!(self.handshake.connector()));
        record.insert("role".into(), json!(role.as_str()));
        record.insert("stream".into(), json!(request.stream()));
        if let Value::Object(fields) = fields {
            record.extend(fields);
        }
        Value::Object(record)
    }

    /// The `pd` part of `/mock/stats`.
    pub fn to_json(&self) -> Value {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        json!({
            "role": self.role.map(PdRole::as_str),
            "engine": self.handshake.engine(),
            "connector": self.handshake.connector(),
            "bootstrap_port": self.bootstrap_port,
            "accepted": log.accepted,
            "rejected": log.rejected,
            "last_rejection": log.last_rejection,
            "transfers": log.transfers,
        })
    }
}

/// Checks what every prefill shares: no streaming, a one-token budget, no minimum.
fn check_prefill_budget(body: &Map<String, Value>, cap: CompletionCap) -> Result<(), String> {
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err("stream must be false on a prefill".to_owned());
    }
    if body.get("stream_options").is_some_and(|v| !v.is_null()) {
        return Err("stream_options is only allowed with stream=true".to_owned());
    }
    let max_tokens = body.get("max_tokens").unwrap_or(&Value::Null);
    if max_tokens.as_u64() != Some(1) {
        return Err(format!("max_tokens must be 1 on a prefill, got {max_tokens}"));
    }
    match (cap, body.get("max_completion_tokens")) {
        (CompletionCap::OneIfPresent, Some(value)) if !value.is_null() && value.as_u64() != Some(1) => {
            return Err(format!("max_completion_tokens must be 1 on a prefill, got {value}"));
        }
        (CompletionCap::Absent, Some(value)) => {
            return Err(format!(
                "max_completion_tokens must be absent on a TensorRT-LLM prefill (it reads max_tokens only), got {}",
                quote(value)
            ));
        }
        _ => {}
    }
    if let Some(value) = body.get("min_tokens") {
        return Err(format!("min_tokens must be absent on a prefill, got {}", quote(value)));
    }
    Ok(())
}

/// A digest of the prompt fields, equal for a prefill and its decode.
fn prompt_digest(body: &Map<String, Value>) -> u64 {
    let mut hasher = DefaultHasher::new();
    for field in ["messages", "prompt", "input"] {
        body.get(field).map(Value::to_string).hash(&mut hasher);
    }
    hasher.finish()
}

/// The digest a transfer id (or a response id naming one) ends with: `...-{digest:016x}`.
fn digest_of_transfer_id(id: &str) -> Option<u64> {
    id.rsplit('-').next().and_then(|hex| u64::from_str_radix(hex, 16).ok())
}

/// `value` as JSON for a message, cut short when long.
fn quote(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= MAX_QUOTED_CHARS {
        return text;
    }
    let cut: String = text.chars().take(MAX_QUOTED_CHARS).collect();
    format!("{cut}...")
}

#[cfg(test)]
mod test_support {
    use super::*;

    /// Checks `body` as `endpoint` with 20 prompt tokens and request id `r1`.
    pub fn check_at(state: &PdState, endpoint: Endpoint, body: &Value) -> Result<PdOutcome, String> {
        state.check(endpoint, body.to_string().as_bytes(), Some("r1"), 20)
    }

    /// Checks a chat `body`.
    pub fn check(state: &PdState, body: &Value) -> Result<PdOutcome, String> {
        check_at(state, Endpoint::ChatCompletions, body)
    }

    /// `body` with the top-level fields of `change` replaced (`null` removes one).
    pub fn changed(body: &Value, change: &Value) -> Value {
        let mut body = body.clone();
        if let (Some(object), Some(change)) = (body.as_object_mut(), change.as_object()) {
            for (key, value) in change {
                if value.is_null() {
                    object.remove(key);
                } else {
                    object.insert(key.clone(), value.clone());
                }
            }
        }
        body
    }

    /// Asserts that each change of `body` is rejected by `state` with a message that
    /// starts with `prefix` and contains the given text.
    pub fn assert_rejected(state: &PdState, endpoint: Endpoint, body: &Value, prefix: &str, cases: &[(Value, &str)]) {
        for (change, message) in cases {
            let err = check_at(state, endpoint, &changed(body, change)).expect_err(message);
            assert!(err.starts_with(prefix) && err.contains(message), "{change}: {err}");
        }
    }

    /// The chat body a client sends.
    pub fn client_chat() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "stream": true,
            "stream_options": {"include_usage": true}})
    }

    /// The prefill body a gateway makes of `client` (`max_completion_tokens` only when `with_cap`).
    pub fn prefill_of(client: &Value, with_cap: bool) -> Value {
        let cap = if with_cap { json!(1) } else { Value::Null };
        changed(
            client,
            &json!({"max_tokens": 1, "max_completion_tokens": cap, "stream": false, "stream_options": null,
                "min_tokens": null}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn common_prefill_constraints_hold_for_every_engine() {
        let client = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for handshake in [Handshake::Vllm(KvConnector::Nixl), Handshake::Vllm(KvConnector::Mooncake), Handshake::Trtllm]
        {
            let engine = PdState::new(Some(PdRole::Prefill), "p0", 7000, "127.0.0.1").with_handshake(handshake);
            let mut prefill = prefill_of(&client, handshake != Handshake::Trtllm);
            if handshake == Handshake::Trtllm {
                prefill["disaggregated_params"] =
                    json!({"request_type": "context_only", "disagg_request_id": 1_u64 << 50});
            }
            assert!(matches!(check(&engine, &prefill), Ok(PdOutcome::Prefilled(_))), "{handshake:?}");
            assert_rejected(
                &engine,
                Endpoint::ChatCompletions,
                &prefill,
                "prefill pod: ",
                &[
                    (json!({"stream": true}), "stream must be false on a prefill"),
                    (json!({"stream_options": {"include_usage": false}}), "stream_options"),
                    (json!({"max_tokens": null}), "max_tokens must be 1 on a prefill, got null"),
                    (json!({"max_tokens": 2}), "max_tokens must be 1 on a prefill, got 2"),
                    (json!({"min_tokens": 1}), "min_tokens must be absent on a prefill, got 1"),
                ],
            );
            let cap_message = match handshake {
                Handshake::Trtllm => "max_completion_tokens must be absent on a TensorRT-LLM prefill",
                _ => "max_completion_tokens must be 1 on a prefill, got 3",
            };
            let with_cap = changed(&prefill, &json!({"max_completion_tokens": 3}));
            let err = check(&engine, &with_cap).expect_err("a cap");
            assert!(err.starts_with("prefill pod: ") && err.contains(cap_message), "{err}");
            let stats = engine.to_json();
            assert_eq!((stats["accepted"].as_u64(), stats["rejected"].as_u64()), (Some(1), Some(6)));
        }
    }

    #[test]
    fn kv_connectors_are_for_vllm_only() {
        assert_eq!(Handshake::from_args(EngineKind::Vllm, KvConnector::Nixl), Ok(Handshake::Vllm(KvConnector::Nixl)));
        assert_eq!(Handshake::from_args(EngineKind::Sglang, KvConnector::Shfs), Ok(Handshake::Sglang));
        assert_eq!(Handshake::from_args(EngineKind::Trtllm, KvConnector::Shfs), Ok(Handshake::Trtllm));
        let err = Handshake::from_args(EngineKind::Trtllm, KvConnector::Mooncake).expect_err("no connector");
        assert!(err.contains("--engine-kind vllm only"), "{err}");
    }

    #[test]
    fn stats_name_the_engine_and_connector() {
        let state = PdState::new(Some(PdRole::Decode), "d0", 1, "127.0.0.1");
        let stats = state.to_json();
        assert_eq!((stats["engine"].as_str(), stats["connector"].as_str()), (Some("vllm"), Some("shfs")));
        assert_eq!(stats["bootstrap_port"], Value::Null);
        let state = PdState::new(Some(PdRole::Prefill), "p0", 1, "127.0.0.1")
            .with_handshake(Handshake::Sglang)
            .with_bootstrap(Some(8998), Duration::from_millis(5));
        let stats = state.to_json();
        assert_eq!((stats["engine"].as_str(), stats["connector"].as_str()), (Some("sglang"), None));
        assert_eq!(stats["bootstrap_port"], 8998);
    }

    #[test]
    fn long_values_are_quoted_short() {
        let long = json!("x".repeat(500));
        let quoted = quote(&long);
        assert!(quoted.ends_with("...") && quoted.chars().count() == MAX_QUOTED_CHARS + 3, "{quoted}");
        assert_eq!(quote(&json!({"a": 1})), r#"{"a":1}"#);
    }

    #[test]
    fn engines_without_a_role_and_other_endpoints_are_plain() {
        let plain = PdState::new(None, "e", 1, "127.0.0.1");
        assert!(matches!(check(&plain, &json!({"stream": true})), Ok(PdOutcome::Plain)));
        let decode = PdState::new(Some(PdRole::Decode), "d0", 7001, "127.0.0.1");
        assert!(matches!(decode.check(Endpoint::Embeddings, b"{}", None, 1), Ok(PdOutcome::Plain)));
    }
}
