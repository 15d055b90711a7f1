//! vLLM's handshakes, one per KV connector: `shfs` (the prefill's `kv_transfer_params`
//! handed to the decode), `nixl` (the prefill's whole answer handed over as
//! `disagg_prefill_resp`) and `mooncake` (nothing handed over).

use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::super::openai::{KvTransferOut, PrefillAnswer};
use super::super::request::Endpoint;
use super::{Checked, CompletionCap, PdOutcome, PdRequest, PdRole, PdState, check_prefill_budget, quote};
use super::{digest_of_transfer_id, prompt_digest};

/// The host a prefill engine reports for itself (vLLM's default side-channel host).
const PREFILL_SELF_HOST: &str = "localhost";
/// Prompt tokens per reported KV block.
const BLOCK_TOKENS: u64 = 16;

impl PdState {
    /// A transfer id naming this engine, a sequence number and the prompt, and the sequence
    /// number.
    fn next_transfer_id(&self, request: &PdRequest<'_>) -> (String, u64) {
        let seq = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        (format!("{}-{seq}-{:016x}", self.name, prompt_digest(request.body)), seq)
    }

    pub(super) fn shfs_prefill(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        let body = request.body;
        let kv = body.get("kv_transfer_params").and_then(Value::as_object);
        if kv.and_then(|kv| kv.get("do_remote_decode")).and_then(Value::as_bool) != Some(true) {
            return Err("kv_transfer_params.do_remote_decode must be true: this pod only prefills".to_owned());
        }
        if kv.and_then(|kv| kv.get("do_remote_prefill")).and_then(Value::as_bool) == Some(true) {
            return Err("kv_transfer_params.do_remote_prefill must be false on a prefill".to_owned());
        }
        check_prefill_budget(body, CompletionCap::OneIfPresent)?;
        let (transfer_id, seq) = self.next_transfer_id(request);
        let blocks = request.prompt_tokens.div_ceil(BLOCK_TOKENS).max(1);
        let block_ids = (0..blocks).map(|i| seq * 1000 + i).collect();
        let out = KvTransferOut::transfer(&self.name, PREFILL_SELF_HOST, self.port, block_ids, transfer_id.clone());
        let record = self.record(PdRole::Prefill, request, json!({"transfer_id": transfer_id}));
        Ok(Checked::Accepted(PdOutcome::Prefilled(PrefillAnswer::kv(out)), record))
    }

    pub(super) fn shfs_decode(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        let body = request.body;
        let Some(kv) = body.get("kv_transfer_params").and_then(Value::as_object) else {
            return Err("kv_transfer_params missing: this pod only decodes requests prefilled elsewhere".to_owned());
        };
        if kv.get("do_remote_prefill").and_then(Value::as_bool) != Some(true) {
            return Err("kv_transfer_params.do_remote_prefill must be true on a decode".to_owned());
        }
        let host = kv.get("remote_host").unwrap_or(&Value::Null);
        if host.as_str() != Some(self.prefill_host.as_str()) {
            return Err(format!(
                "kv_transfer_params.remote_host is {host}, not the prefill pod's IP {}",
                self.prefill_host
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
        if digest_of_transfer_id(transfer_id) != Some(prompt_digest(body)) {
            return Err(format!("kv_transfer_params.remote_request_id {transfer_id:?} was not issued for this prompt"));
        }
        let fields = json!({"transfer_id": transfer_id, "remote_engine_id": engine, "remote_host": host});
        Ok(Checked::Accepted(PdOutcome::Decoded, self.record(PdRole::Decode, request, fields)))
    }

    /// A NIXL prefill: the client's body with a one-token budget and nothing more. Its
    /// answer's `id` names the transfer, so that the decode can tell it got this prompt's
    /// prefill answer.
    pub(super) fn nixl_prefill(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        reject_kv_transfer_params(request, "nixl")?;
        check_prefill_budget(request.body, CompletionCap::OneIfPresent)?;
        let (transfer_id, _) = self.next_transfer_id(request);
        let prefix = match request.endpoint {
            Endpoint::ChatCompletions => "chatcmpl",
            _ => "cmpl",
        };
        let answer = PrefillAnswer { id: Some(format!("{prefix}-{transfer_id}")), ..PrefillAnswer::default() };
        let record = self.record(PdRole::Prefill, request, json!({"transfer_id": transfer_id}));
        Ok(Checked::Accepted(PdOutcome::Prefilled(answer), record))
    }

    /// A NIXL decode: the client's body with the prefill's whole answer as
    /// `disagg_prefill_resp`.
    pub(super) fn nixl_decode(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        let body = request.body;
        let Some(answer) = body.get("disagg_prefill_resp") else {
            return Err(
                "disagg_prefill_resp missing: this pod only decodes requests prefilled elsewhere, and needs the prefill's answer"
                    .to_owned(),
            );
        };
        let Some(answer) = answer.as_object() else {
            return Err(format!(
                "disagg_prefill_resp must be the prefill's whole answer (a JSON object), got {}",
                quote(answer)
            ));
        };
        if answer.get("choices").and_then(Value::as_array).is_none_or(Vec::is_empty) {
            return Err("disagg_prefill_resp has no choices: it is not the prefill's whole answer".to_owned());
        }
        let id = answer.get("id").and_then(Value::as_str).unwrap_or("");
        if digest_of_transfer_id(id) != Some(prompt_digest(body)) {
            return Err(format!("disagg_prefill_resp.id {id:?} was not issued for this prompt"));
        }
        reject_kv_transfer_params(request, "nixl")?;
        let transfer_id = id.split_once('-').map_or(id, |(_, transfer)| transfer);
        let fields = json!({"transfer_id": transfer_id});
        Ok(Checked::Accepted(PdOutcome::Decoded, self.record(PdRole::Decode, request, fields)))
    }

    /// A Mooncake prefill: the client's body with a one-token budget and nothing more.
    pub(super) fn mooncake_prefill(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        reject_kv_transfer_params(request, "mooncake")?;
        check_prefill_budget(request.body, CompletionCap::OneIfPresent)?;
        let record = self.record(PdRole::Prefill, request, json!({"transfer_id": null}));
        Ok(Checked::Accepted(PdOutcome::Prefilled(PrefillAnswer::default()), record))
    }

    /// A Mooncake decode: the client's body as sent.
    pub(super) fn mooncake_decode(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        reject_kv_transfer_params(request, "mooncake")?;
        if let Some(answer) = request.body.get("disagg_prefill_resp") {
            return Err(format!(
                "disagg_prefill_resp must be absent with the mooncake connector (the decode gets the client's body), got {}",
                quote(answer)
            ));
        }
        let record = self.record(PdRole::Decode, request, json!({"transfer_id": null}));
        Ok(Checked::Accepted(PdOutcome::Decoded, record))
    }
}

/// Rejects a body carrying `kv_transfer_params`, which `connector` does not use.
fn reject_kv_transfer_params(request: &PdRequest<'_>, connector: &str) -> Result<(), String> {
    match request.body.get("kv_transfer_params") {
        Some(value) => {
            Err(format!("kv_transfer_params must be absent with the {connector} connector, got {}", quote(value)))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{Handshake, KvConnector};
    use super::*;

    fn prefill_engine() -> PdState {
        PdState::new(Some(PdRole::Prefill), "p0", 7000, "127.0.0.1")
    }

    fn decode_engine() -> PdState {
        PdState::new(Some(PdRole::Decode), "d0", 7001, "127.0.0.1")
    }

    fn prefill_request() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "max_completion_tokens": 1, "stream": false, "kv_transfer_params": {"do_remote_decode": true}})
    }

    /// The prefill's parameters as a gateway would pass them on.
    fn handed_over(answer: &PrefillAnswer, host: &str) -> Value {
        let mut kv = serde_json::to_value(answer.kv_transfer.as_ref().expect("kv_transfer_params")).expect("json");
        kv["remote_host"] = json!(host);
        kv
    }

    fn prefilled(engine: &PdState, endpoint: Endpoint, body: &Value) -> PrefillAnswer {
        match check_at(engine, endpoint, body) {
            Ok(PdOutcome::Prefilled(answer)) => answer,
            other => panic!("a valid prefill: {other:?}"),
        }
    }

    #[test]
    fn prefill_engine_checks_the_prefill_request() {
        let engine = prefill_engine();
        let answer = prefilled(&engine, Endpoint::ChatCompletions, &prefill_request());
        let kv = serde_json::to_value(answer.kv_transfer.as_ref().expect("kv")).expect("serializable");
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
        let stats = engine.to_json();
        assert_eq!(stats["rejected"], 5);
        assert_eq!(stats["accepted"], 1);
        assert_eq!(stats["transfers"][0]["engine"], "vllm");
        assert_eq!(stats["transfers"][0]["connector"], "shfs");
        assert_eq!(stats["transfers"][0]["role"], "prefill");
        assert_eq!(stats["transfers"][0]["transfer_id"], kv["remote_request_id"]);
    }

    #[test]
    fn decode_engine_checks_the_handover() {
        let answer = prefilled(&prefill_engine(), Endpoint::ChatCompletions, &prefill_request());
        let engine = decode_engine();
        let decode = |kv: Value| {
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                "kv_transfer_params": kv})
        };
        assert!(matches!(check(&engine, &decode(handed_over(&answer, "127.0.0.1"))), Ok(PdOutcome::Decoded)));
        let err = check(&engine, &decode(handed_over(&answer, "localhost"))).expect_err("host not rewritten");
        assert!(err.contains("not the prefill pod's IP"), "{err}");
        let err = check(&engine, &decode(Value::Null)).expect_err("no parameters");
        assert!(err.contains("kv_transfer_params missing"), "{err}");
        let mut other_prompt = decode(handed_over(&answer, "127.0.0.1"));
        other_prompt["messages"] = json!([{"role": "user", "content": "something else"}]);
        let err = check(&engine, &other_prompt).expect_err("another prompt's transfer");
        assert!(err.contains("not issued for this prompt"), "{err}");
        let stats = engine.to_json();
        assert_eq!((stats["accepted"].as_u64(), stats["rejected"].as_u64()), (Some(1), Some(3)));
        assert_eq!(stats["transfers"][0]["remote_engine_id"], "p0");
        assert_eq!(stats["transfers"][0]["x_request_id"], "r1");
        assert_eq!(stats["transfers"][0]["stream"], true);
        assert_eq!(stats["transfers"][0]["role"], "decode");
    }

    fn nixl(role: PdRole) -> PdState {
        PdState::new(Some(role), "p0", 7000, "127.0.0.1").with_handshake(Handshake::Vllm(KvConnector::Nixl))
    }

    /// The prefill answer a NIXL prefill engine sends for `body` at `endpoint`.
    fn nixl_answer(engine: &PdState, endpoint: Endpoint, body: &Value) -> Value {
        let answer = prefilled(engine, endpoint, body);
        assert!(answer.kv_transfer.is_none() && answer.prompt_token_ids.is_none());
        let id = answer.id.expect("the id names the transfer");
        json!({"id": id, "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "tok0"}}]})
    }

    #[test]
    fn nixl_prefill_answers_with_an_id_naming_the_transfer() {
        let engine = nixl(PdRole::Prefill);
        let client = client_chat();
        let answer = nixl_answer(&engine, Endpoint::ChatCompletions, &prefill_of(&client, true));
        let id = answer["id"].as_str().expect("id");
        assert!(id.starts_with("chatcmpl-p0-0-"), "{id}");
        let completion = json!({"model": "m", "prompt": "a b", "max_tokens": 1});
        let answer = prefilled(&engine, Endpoint::Completions, &completion);
        assert!(answer.id.is_some_and(|id| id.starts_with("cmpl-p0-1-")));
        let err = check(&engine, &with_kv(&prefill_of(&client, true))).expect_err("kv_transfer_params");
        assert!(err.starts_with("prefill pod: kv_transfer_params must be absent with the nixl connector"), "{err}");
        let stats = engine.to_json();
        assert_eq!(stats["transfers"][0]["connector"], "nixl");
        assert_eq!(stats["transfers"][0]["transfer_id"].as_str(), id.strip_prefix("chatcmpl-"));
    }

    #[test]
    fn nixl_decode_needs_the_prefills_whole_answer() {
        let client = client_chat();
        let answer = nixl_answer(&nixl(PdRole::Prefill), Endpoint::ChatCompletions, &prefill_of(&client, true));
        let engine = nixl(PdRole::Decode);
        let decode = changed(&client, &json!({"disagg_prefill_resp": answer}));
        assert!(matches!(check(&engine, &decode), Ok(PdOutcome::Decoded)));
        let stats = engine.to_json();
        assert_eq!(stats["transfers"][0]["stream"], true);
        assert_eq!(
            stats["transfers"][0]["transfer_id"].as_str(),
            answer["id"].as_str().and_then(|id| id.strip_prefix("chatcmpl-"))
        );

        let mut no_choices = answer.clone();
        no_choices["choices"] = json!([]);
        let mut other_id = answer;
        other_id["id"] = json!("chatcmpl-p0-0-0000000000000001");
        assert_rejected(
            &engine,
            Endpoint::ChatCompletions,
            &decode,
            "decode pod: ",
            &[
                (json!({"disagg_prefill_resp": null}), "disagg_prefill_resp missing"),
                (json!({"disagg_prefill_resp": "x"}), "disagg_prefill_resp must be the prefill's whole answer"),
                (json!({"disagg_prefill_resp": no_choices}), "disagg_prefill_resp has no choices"),
                (json!({"disagg_prefill_resp": other_id}), "was not issued for this prompt"),
                (json!({"messages": [{"role": "user", "content": "other"}]}), "was not issued for this prompt"),
                (json!({"kv_transfer_params": {"do_remote_prefill": true}}), "kv_transfer_params must be absent"),
            ],
        );
        assert_eq!(engine.to_json()["rejected"], 6);
    }

    fn mooncake(role: PdRole) -> PdState {
        PdState::new(Some(role), "p0", 7000, "127.0.0.1").with_handshake(Handshake::Vllm(KvConnector::Mooncake))
    }

    #[test]
    fn mooncake_hands_nothing_over() {
        let client = client_chat();
        let prefill = mooncake(PdRole::Prefill);
        let answer = prefilled(&prefill, Endpoint::ChatCompletions, &prefill_of(&client, true));
        assert!(answer.id.is_none() && answer.kv_transfer.is_none());
        let err = check(&prefill, &with_kv(&prefill_of(&client, true))).expect_err("kv_transfer_params");
        assert!(err.starts_with("prefill pod: kv_transfer_params must be absent with the mooncake connector"), "{err}");

        let decode = mooncake(PdRole::Decode);
        assert!(matches!(check(&decode, &client), Ok(PdOutcome::Decoded)));
        assert_rejected(
            &decode,
            Endpoint::ChatCompletions,
            &client,
            "decode pod: ",
            &[
                (json!({"kv_transfer_params": {"do_remote_prefill": true}}), "kv_transfer_params must be absent"),
                (json!({"disagg_prefill_resp": {"id": "x"}}), "disagg_prefill_resp must be absent"),
            ],
        );
        let stats = decode.to_json();
        assert_eq!((stats["accepted"].as_u64(), stats["rejected"].as_u64()), (Some(1), Some(2)));
        assert_eq!(stats["transfers"][0]["connector"], "mooncake");
    }

    /// `body` with shfs-style `kv_transfer_params`.
    fn with_kv(body: &Value) -> Value {
        changed(body, &json!({"kv_transfer_params": {"do_remote_decode": true}}))
    }
}
