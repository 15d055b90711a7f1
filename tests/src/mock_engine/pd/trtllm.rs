//! TensorRT-LLM's handshake: the prefill carries `disaggregated_params` asking for
//! `context_only` with a global `disagg_request_id`, and answers with the prompt's token
//! ids and the parameters the decode needs; the decode carries those parameters back as
//! `generation_only`, with the prompt's token ids.
//!
//! The mock has no tokenizer, so a prefill makes up the token ids: one per prompt token as
//! the mock counts them, derived from the prompt's digest and self-checking (the first id
//! carries 24 bits of the digest and a 7-bit check of them, the others follow from the
//! first). A chat decode still has the messages, so its ids are checked against them; a
//! completions decode has only the ids as its prompt, so they are checked for being ids a
//! prefill made.

use serde_json::{Map, Value, json};

use super::super::openai::PrefillAnswer;
use super::super::request::Endpoint;
use super::{Checked, CompletionCap, PdOutcome, PdRequest, PdRole, PdState, check_prefill_budget};
use super::{prompt_digest, quote};

/// The least global disagg request id: TensorRT-LLM takes smaller ones as local to a worker.
const MIN_GLOBAL_DISAGG_ID: u64 = 1 << 42;
/// The largest disagg request id (an i64).
const MAX_DISAGG_ID: u64 = u64::MAX >> 1;
/// Digest bits the first fake token id carries.
const DIGEST_BITS: u32 = 24;
/// Check bits of the first fake token id.
const CHECK_BITS: u32 = 7;
/// Fake token ids stay below 2^31.
const TOKEN_ID_MASK: u64 = (1 << 31) - 1;

impl PdState {
    pub(super) fn trtllm_prefill(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        let body = request.body;
        let params = disaggregated_params(
            body,
            "a TensorRT-LLM prefill needs request_type \"context_only\" and a disagg_request_id",
        )?;
        let request_type = params.get("request_type").unwrap_or(&Value::Null);
        if request_type.as_str() != Some("context_only") {
            return Err(format!(
                "disaggregated_params.request_type must be \"context_only\" on a prefill, got {}",
                quote(request_type)
            ));
        }
        let raw_id = params.get("disagg_request_id").unwrap_or(&Value::Null);
        let Some(id) = raw_id.as_u64().filter(|id| (MIN_GLOBAL_DISAGG_ID..=MAX_DISAGG_ID).contains(id)) else {
            return Err(format!(
                "disaggregated_params.disagg_request_id must be an integer from 2^42 to 2^63-1 (a global disagg id), got {}",
                quote(raw_id)
            ));
        };
        check_prefill_budget(body, CompletionCap::Absent)?;
        let digest = prompt_digest(body);
        let answer = PrefillAnswer {
            prompt_token_ids: Some(prompt_token_ids(digest, request.prompt_tokens)),
            disaggregated_params: Some(json!({
                "request_type": "context_only",
                "first_gen_tokens": [mix(digest) & TOKEN_ID_MASK],
                "ctx_request_id": id,
                "opaque_state": id.to_string(),
                "draft_tokens": null,
            })),
            ..PrefillAnswer::default()
        };
        let record = self.record(PdRole::Prefill, request, json!({"disagg_request_id": id.to_string()}));
        Ok(Checked::Accepted(PdOutcome::Prefilled(answer), record))
    }

    pub(super) fn trtllm_decode(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        let body = request.body;
        let params = disaggregated_params(body, "this pod only decodes requests prefilled elsewhere")?;
        let request_type = params.get("request_type").unwrap_or(&Value::Null);
        if request_type.as_str() != Some("generation_only") {
            return Err(format!(
                "disaggregated_params.request_type must be \"generation_only\" on a decode, got {}",
                quote(request_type)
            ));
        }
        let opaque = params.get("opaque_state").unwrap_or(&Value::Null);
        let Some(opaque_id) = opaque.as_str().and_then(|text| text.parse::<u64>().ok()) else {
            return Err(format!(
                "disaggregated_params.opaque_state must be the prefill's (its id as a decimal string), got {}",
                quote(opaque)
            ));
        };
        let ctx = params.get("ctx_request_id").unwrap_or(&Value::Null);
        let Some(ctx_id) = ctx.as_u64() else {
            let hint = if ctx.is_f64() { ": was it rounded through a float?" } else { "" };
            return Err(format!(
                "disaggregated_params.ctx_request_id must be an integer (the prefill's disagg_request_id), got {}{hint}",
                quote(ctx)
            ));
        };
        if ctx_id != opaque_id {
            return Err(format!(
                "disaggregated_params.ctx_request_id {ctx_id} is not the prefill's id {opaque_id}: was it rounded through a float?"
            ));
        }
        if !(MIN_GLOBAL_DISAGG_ID..=MAX_DISAGG_ID).contains(&ctx_id) {
            return Err(format!(
                "disaggregated_params.ctx_request_id {ctx_id} is not a global disagg id (2^42 to 2^63-1)"
            ));
        }
        let first_gen = params.get("first_gen_tokens").unwrap_or(&Value::Null);
        if first_gen.as_array().is_none_or(|ids| ids.is_empty() || !ids.iter().all(Value::is_u64)) {
            return Err(format!(
                "disaggregated_params.first_gen_tokens must be the prefill's first tokens (a non-empty integer array), got {}",
                quote(first_gen)
            ));
        }
        match request.endpoint {
            Endpoint::ChatCompletions => {
                let Some(ids) = body.get("prompt_token_ids") else {
                    return Err(
                        "prompt_token_ids missing: a TensorRT-LLM chat decode needs the prefill's prompt token ids"
                            .to_owned(),
                    );
                };
                let first = first_token_id(prompt_digest(body));
                let expected = request.prompt_tokens.max(1);
                let matches = ids.as_array().is_some_and(|ids| {
                    ids.len() as u64 == expected
                        && ids.iter().zip(0..).all(|(id, index)| id.as_u64() == Some(token_id(first, index)))
                });
                if !matches {
                    return Err(format!(
                        "prompt_token_ids are not the {expected} ids the prefill returned for this prompt, got {}",
                        quote(ids)
                    ));
                }
            }
            _ => {
                let prompt = body.get("prompt").unwrap_or(&Value::Null);
                let Some(ids) = prompt.as_array().filter(|ids| !ids.is_empty() && ids.iter().all(Value::is_u64)) else {
                    return Err(format!(
                        "prompt must be the prefill's prompt_token_ids (a non-empty integer array), got {}",
                        quote(prompt)
                    ));
                };
                if !made_by_a_prefill(ids) {
                    return Err(format!(
                        "prompt holds token ids no prefill returned (the mock's ids carry a check), got {}",
                        quote(prompt)
                    ));
                }
            }
        }
        let record = self.record(PdRole::Decode, request, json!({"disagg_request_id": ctx_id.to_string()}));
        Ok(Checked::Accepted(PdOutcome::Decoded, record))
    }
}

/// The `disaggregated_params` object, or why its absence is wrong.
fn disaggregated_params<'a>(body: &'a Map<String, Value>, why: &str) -> Result<&'a Map<String, Value>, String> {
    match body.get("disaggregated_params") {
        Some(Value::Object(params)) => Ok(params),
        None | Some(Value::Null) => Err(format!("disaggregated_params missing: {why}")),
        Some(other) => Err(format!("disaggregated_params must be an object, got {}", quote(other))),
    }
}

/// The fake token ids of a prompt with `digest` and `count` tokens (at least one).
fn prompt_token_ids(digest: u64, count: u64) -> Vec<u64> {
    let first = first_token_id(digest);
    (0..count.max(1)).map(|index| token_id(first, index)).collect()
}

/// The first fake token id: 24 bits of the digest, then 7 check bits.
fn first_token_id(digest: u64) -> u64 {
    let seed = digest & ((1 << DIGEST_BITS) - 1);
    (seed << CHECK_BITS) | check_bits(seed)
}

fn check_bits(seed: u64) -> u64 {
    mix(seed) & ((1 << CHECK_BITS) - 1)
}

/// Fake token id `index`, following from the first.
fn token_id(first: u64, index: u64) -> u64 {
    if index == 0 { first } else { mix(first ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)) & TOKEN_ID_MASK }
}

/// Whether `ids` are fake token ids some prefill made.
fn made_by_a_prefill(ids: &[Value]) -> bool {
    let Some(first) = ids.first().and_then(Value::as_u64) else { return false };
    let seed = first >> CHECK_BITS;
    seed < (1 << DIGEST_BITS)
        && first & ((1 << CHECK_BITS) - 1) == check_bits(seed)
        && ids.iter().zip(0..).all(|(id, index)| id.as_u64() == Some(token_id(first, index)))
}

/// SplitMix64's finalizer: a cheap, well-spread hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::super::Handshake;
    use super::super::test_support::*;
    use super::*;

    /// 2^53 + 1: an id a gateway rounding through f64 would change.
    const DISAGG_ID: u64 = (1 << 53) + 1;

    fn engine(role: PdRole) -> PdState {
        PdState::new(Some(role), "p0", 7000, "127.0.0.1").with_handshake(Handshake::Trtllm)
    }

    fn prefill_body(client: &Value) -> Value {
        let mut body = prefill_of(client, false);
        body["disaggregated_params"] = json!({"request_type": "context_only", "disagg_request_id": DISAGG_ID});
        body
    }

    /// The prefill's answer as JSON, as the gateway reads it.
    fn prefill_answer(endpoint: Endpoint, client: &Value) -> Value {
        let Ok(PdOutcome::Prefilled(answer)) = check_at(&engine(PdRole::Prefill), endpoint, &prefill_body(client))
        else {
            panic!("a valid prefill")
        };
        json!({"prompt_token_ids": answer.prompt_token_ids, "choices": [{"disaggregated_params": answer.disaggregated_params}]})
    }

    /// The decode body a correct gateway makes of `client` and the prefill's `answer`.
    fn decode_of(endpoint: Endpoint, client: &Value, answer: &Value) -> Value {
        let mut params = answer["choices"][0]["disaggregated_params"].clone();
        params["request_type"] = json!("generation_only");
        let mut body = changed(client, &json!({"disaggregated_params": params}));
        match endpoint {
            Endpoint::ChatCompletions => body["prompt_token_ids"] = answer["prompt_token_ids"].clone(),
            _ => body["prompt"] = answer["prompt_token_ids"].clone(),
        }
        body
    }

    #[test]
    fn prefill_checks_its_parameters_and_answers_what_the_decode_needs() {
        let prefill = engine(PdRole::Prefill);
        let body = prefill_body(&client_chat());
        let Ok(PdOutcome::Prefilled(answer)) = check(&prefill, &body) else { panic!("a valid prefill") };
        let ids = answer.prompt_token_ids.expect("prompt_token_ids");
        assert_eq!(ids.len(), 20, "one per prompt token");
        let params = answer.disaggregated_params.expect("disaggregated_params");
        assert_eq!(params["request_type"], "context_only");
        assert_eq!(params["ctx_request_id"].as_u64(), Some(DISAGG_ID));
        assert_eq!(params["opaque_state"], DISAGG_ID.to_string());
        assert_eq!(params["draft_tokens"], Value::Null);
        assert_eq!(params["first_gen_tokens"].as_array().map(Vec::len), Some(1));
        assert_eq!(prefill.to_json()["transfers"][0]["disagg_request_id"], DISAGG_ID.to_string());
        assert_eq!(prefill.to_json()["transfers"][0]["engine"], "trtllm");

        let params = |value: Value| json!({"disaggregated_params": value});
        assert_rejected(
            &prefill,
            Endpoint::ChatCompletions,
            &body,
            "prefill pod: ",
            &[
                (json!({"disaggregated_params": null}), "disaggregated_params missing"),
                (json!({"disaggregated_params": [1]}), "disaggregated_params must be an object"),
                (
                    params(json!({"request_type": "generation_only", "disagg_request_id": DISAGG_ID})),
                    "request_type must be \"context_only\" on a prefill, got \"generation_only\"",
                ),
                (params(json!({"request_type": "context_only"})), "disagg_request_id must be an integer"),
                (params(json!({"request_type": "context_only", "disagg_request_id": 12})), "from 2^42 to 2^63-1"),
                (
                    params(json!({"request_type": "context_only", "disagg_request_id": 9.007e15})),
                    "got 9007000000000000.0",
                ),
                (params(json!({"request_type": "context_only", "disagg_request_id": u64::MAX})), "2^63-1"),
                (params(json!({"request_type": "context_only", "disagg_request_id": "8796093022208"})), "an integer"),
                (json!({"max_completion_tokens": 1}), "max_completion_tokens must be absent on a TensorRT-LLM prefill"),
            ],
        );
        assert_eq!(prefill.to_json()["rejected"], 9);
    }

    #[test]
    fn chat_decode_needs_the_parameters_and_this_prompts_token_ids() {
        let client = client_chat();
        let answer = prefill_answer(Endpoint::ChatCompletions, &client);
        let decode = engine(PdRole::Decode);
        let body = decode_of(Endpoint::ChatCompletions, &client, &answer);
        assert!(matches!(check(&decode, &body), Ok(PdOutcome::Decoded)));
        let transfer = &decode.to_json()["transfers"][0];
        assert_eq!(
            (transfer["disagg_request_id"].clone(), transfer["stream"].clone()),
            (json!(DISAGG_ID.to_string()), json!(true))
        );

        let params = &body["disaggregated_params"];
        let with = |key: &str, value: Value| {
            let mut params = params.clone();
            params[key] = value;
            json!({"disaggregated_params": params})
        };
        let rounded = json!(DISAGG_ID as f64 as u64);
        let mut short_ids = answer["prompt_token_ids"].clone();
        short_ids.as_array_mut().expect("ids").pop();
        assert_rejected(
            &decode,
            Endpoint::ChatCompletions,
            &body,
            "decode pod: ",
            &[
                (json!({"disaggregated_params": null}), "disaggregated_params missing"),
                (with("request_type", json!("context_only")), "request_type must be \"generation_only\" on a decode"),
                (
                    with("ctx_request_id", rounded),
                    "is not the prefill's id 9007199254740993: was it rounded through a float?",
                ),
                (with("ctx_request_id", json!(DISAGG_ID as f64)), "must be an integer"),
                (with("ctx_request_id", Value::Null), "ctx_request_id must be an integer"),
                (with("opaque_state", Value::Null), "opaque_state must be the prefill's"),
                (with("first_gen_tokens", Value::Null), "first_gen_tokens must be"),
                (with("first_gen_tokens", json!([])), "first_gen_tokens must be"),
                (json!({"prompt_token_ids": null}), "prompt_token_ids missing"),
                (json!({"prompt_token_ids": short_ids}), "prompt_token_ids are not the 20 ids"),
                (json!({"messages": [{"role": "user", "content": "another prompt"}]}), "prompt_token_ids are not"),
            ],
        );
        assert_eq!(decode.to_json()["rejected"], 11);
    }

    #[test]
    fn completions_decode_takes_the_token_ids_as_its_prompt() {
        let client = json!({"model": "m", "prompt": "one two three", "max_tokens": 5});
        let answer = prefill_answer(Endpoint::Completions, &client);
        let decode = engine(PdRole::Decode);
        let body = decode_of(Endpoint::Completions, &client, &answer);
        assert_eq!(body["prompt"].as_array().map(Vec::len), Some(20), "as many as the prefill counted");
        assert!(matches!(check_at(&decode, Endpoint::Completions, &body), Ok(PdOutcome::Decoded)));
        let mut forged = body["prompt"].clone();
        forged[1] = json!(forged[1].as_u64().expect("id") ^ 1);
        let mut bad_check = body["prompt"].clone();
        bad_check[0] = json!(bad_check[0].as_u64().expect("id") ^ 1);
        assert_rejected(
            &decode,
            Endpoint::Completions,
            &body,
            "decode pod: ",
            &[
                (json!({"prompt": "one two three"}), "prompt must be the prefill's prompt_token_ids"),
                (json!({"prompt": []}), "prompt must be the prefill's prompt_token_ids"),
                (json!({"prompt": forged}), "prompt holds token ids no prefill returned"),
                (json!({"prompt": bad_check}), "prompt holds token ids no prefill returned"),
            ],
        );
        let single = json!([first_token_id(0xdead_beef)]);
        let one_token = changed(&body, &json!({"prompt": single}));
        assert!(matches!(check_at(&decode, Endpoint::Completions, &one_token), Ok(PdOutcome::Decoded)));
    }

    #[test]
    fn fake_token_ids_check_themselves() {
        let ids: Vec<Value> = prompt_token_ids(0x1234_5678_9abc, 5).into_iter().map(Value::from).collect();
        assert_eq!(ids.len(), 5);
        assert!(ids.iter().all(|id| id.as_u64().is_some_and(|id| id <= TOKEN_ID_MASK)));
        assert!(made_by_a_prefill(&ids));
        assert!(!made_by_a_prefill(&ids[1..]), "the first id carries the check");
        assert_eq!(prompt_token_ids(7, 0).len(), 1, "at least one");
        assert!(!made_by_a_prefill(&[]));
    }
}
