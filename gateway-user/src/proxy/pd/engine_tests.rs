use super::*;
use serde_json::json;

const IP: &str = "10.0.0.7";

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("json")
}

fn client() -> Bytes {
    Bytes::from(
        json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 200,
            "max_completion_tokens": 200,
            "min_tokens": 5,
            "temperature": 0.5,
        })
        .to_string(),
    )
}

fn split(handshake: Handshake, body: &Bytes) -> (Value, Option<Value>) {
    let top = TopLevel::parse(body).expect("object");
    let Ok(bodies) = bodies(handshake, &top, body, IP, 3) else { panic!("{handshake:?}: bodies") };
    (parse(&bodies.prefill), bodies.decode.map(|d| parse(&d)))
}

fn merge(handshake: Handshake, endpoint: Endpoint, body: &Bytes, answer: &Value) -> Result<Value, String> {
    let top = TopLevel::parse(body).expect("object");
    decode_body(handshake, endpoint, &top, body, answer.to_string().as_bytes(), IP).map(|b| parse(&b))
}

fn assert_one_token_prefill(prefill: &Value, max_completion_tokens: Option<i64>) {
    assert_eq!(prefill["max_tokens"], 1);
    assert_eq!(prefill.get("max_completion_tokens").and_then(Value::as_i64), max_completion_tokens);
    assert_eq!(prefill["stream"], false);
    assert!(prefill.get("stream_options").is_none() && prefill.get("min_tokens").is_none());
    assert_eq!(prefill["messages"], json!([{"role": "user", "content": "hi"}]), "the prompt is untouched");
    assert_eq!(prefill["temperature"], 0.5);
}

#[test]
fn vllm_shfs_asks_for_a_remote_decode_and_hands_the_parameters_over_with_the_pod_ip() {
    let body = client();
    let (prefill, decode) = split(Handshake::Vllm(KvConnector::Shfs), &body);
    assert_one_token_prefill(&prefill, Some(1));
    assert_eq!(prefill["kv_transfer_params"]["do_remote_decode"], true);
    assert_eq!(prefill["kv_transfer_params"]["do_remote_prefill"], false);
    assert!(prefill["kv_transfer_params"]["remote_host"].is_null());
    assert!(decode.is_none(), "written from the answer");
    let answer = json!({"id": "cmpl-1", "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "e1",
        "remote_block_ids": [3, 4], "remote_host": "localhost", "remote_port": 5600}});
    let decoded = merge(Handshake::Vllm(KvConnector::Shfs), Endpoint::ChatCompletions, &body, &answer).expect("merged");
    assert_eq!(decoded["kv_transfer_params"]["remote_host"], IP);
    assert_eq!(decoded["kv_transfer_params"]["remote_block_ids"], json!([3, 4]));
    assert_eq!(
        (decoded["stream"].clone(), decoded["max_tokens"].clone()),
        (json!(true), json!(200)),
        "the client's own"
    );
    // No parameters: the client's body as it was.
    let plain = merge(Handshake::Vllm(KvConnector::Shfs), Endpoint::ChatCompletions, &body, &json!({"id": "x"}));
    assert_eq!(plain, Ok(parse(&body)));
    let bad = json!({"kv_transfer_params": [1]});
    assert!(merge(Handshake::Vllm(KvConnector::Shfs), Endpoint::ChatCompletions, &body, &bad).is_err());
}

#[test]
fn vllm_nixl_passes_the_whole_prefill_answer_and_mooncake_nothing() {
    let body = client();
    let (prefill, decode) = split(Handshake::Vllm(KvConnector::Nixl), &body);
    assert_one_token_prefill(&prefill, Some(1));
    assert!(prefill.get("kv_transfer_params").is_none() && decode.is_none());
    let answer = json!({"id": "cmpl-7", "choices": [{"text": "a"}], "big": 9007199254740993_u64});
    let decoded = merge(Handshake::Vllm(KvConnector::Nixl), Endpoint::Completions, &body, &answer).expect("merged");
    assert_eq!(decoded["disagg_prefill_resp"], answer);
    assert!(merge(Handshake::Vllm(KvConnector::Nixl), Endpoint::Completions, &body, &json!("text")).is_err());

    let (prefill, decode) = split(Handshake::Vllm(KvConnector::Mooncake), &body);
    assert_one_token_prefill(&prefill, Some(1));
    assert!(prefill.get("kv_transfer_params").is_none());
    assert_eq!(decode, Some(parse(&body)), "the client's body, known before the prefill");
}

#[test]
fn sglang_names_one_bootstrap_room_in_both_bodies_and_refuses_repeated_keys() {
    let body = client();
    let (prefill, decode) = split(Handshake::Sglang { bootstrap_port: 8998 }, &body);
    let decode = decode.expect("known up front");
    assert_one_token_prefill(&prefill, Some(1));
    for side in [&prefill, &decode] {
        assert_eq!((side["bootstrap_host"].clone(), side["bootstrap_port"].clone()), (json!(IP), json!(8998)));
        assert!(side["bootstrap_room"].as_i64().is_some_and(|room| room >= 0));
    }
    assert_eq!(prefill["bootstrap_room"], decode["bootstrap_room"]);
    assert_eq!((decode["stream"].clone(), decode["max_tokens"].clone()), (json!(true), json!(200)));
    let (other, _) = split(Handshake::Sglang { bootstrap_port: 8998 }, &body);
    assert_ne!(other["bootstrap_room"], prefill["bootstrap_room"], "a room per request");

    let repeated = Bytes::from_static(br#"{"model":"m","prompt":"x","min_tokens":1,"min_tokens":2}"#);
    let top = TopLevel::parse(&repeated).expect("object");
    match bodies(Handshake::Sglang { bootstrap_port: 1 }, &top, &repeated, IP, 0) {
        Err(BodyError::Client(error)) => {
            assert_eq!(error.to_string(), "duplicate top-level key \"min_tokens\" in SGLang request body");
        }
        _ => panic!("a repeated controlled key is the client's error"),
    }
}

#[test]
fn sglang_bodies_keep_the_clients_bytes_outside_the_keys_set() {
    let body = Bytes::from_static(br#"{"tools":[{"z":1,"a":1.50}],"model":"m","prompt":"x","stream":true}"#);
    let top = TopLevel::parse(&body).expect("object");
    let Ok(split) = bodies(Handshake::Sglang { bootstrap_port: 1 }, &top, &body, IP, 0) else { panic!("bodies") };
    let decode = String::from_utf8(split.decode.expect("decode").to_vec()).expect("utf-8");
    assert!(
        decode.starts_with(r#"{"tools":[{"z":1,"a":1.50}],"model":"m","prompt":"x","stream":true,"bootstrap_host""#),
        "{decode}"
    );
}

#[test]
fn trtllm_runs_context_only_then_generation_only_with_exact_64_bit_ids() {
    let body = client();
    let (prefill, decode) = split(Handshake::TrtLlm, &body);
    assert_one_token_prefill(&prefill, None);
    assert!(decode.is_none());
    let params = &prefill["disaggregated_params"];
    assert_eq!(params["request_type"], "context_only");
    let id = params["disagg_request_id"].as_i64().expect("an integer id");
    assert!(id >= 1 << 42, "{id}");

    // The id comes back past 2^53, where a float would round it.
    let big: i64 = (1 << 60) + 3;
    let answer = json!({"id": "cmpl-1", "prompt_token_ids": [1, 2, 3], "choices": [{"text": "a",
        "disaggregated_params": {"request_type": "context_only", "ctx_request_id": big, "first_gen_tokens": [9]}}]});
    let decoded = merge(Handshake::TrtLlm, Endpoint::ChatCompletions, &body, &answer).expect("merged");
    assert_eq!(decoded["disaggregated_params"]["request_type"], "generation_only");
    assert_eq!(decoded["disaggregated_params"]["ctx_request_id"].as_i64(), Some(big));
    assert_eq!(decoded["prompt_token_ids"], json!([1, 2, 3]));
    assert_eq!(decoded["messages"], json!([{"role": "user", "content": "hi"}]));
    let completion = Bytes::from_static(br#"{"model":"m","prompt":"once upon","max_tokens":5}"#);
    let top_level = json!({"prompt_token_ids": [7, 8], "disaggregated_params": {"ctx_request_id": 5}});
    let decoded = merge(Handshake::TrtLlm, Endpoint::Completions, &completion, &top_level).expect("merged");
    assert_eq!(
        (decoded["prompt"].clone(), decoded["disaggregated_params"]["request_type"].clone()),
        (json!([7, 8]), json!("generation_only"))
    );
    // Without parameters: the client's body.
    assert_eq!(
        merge(Handshake::TrtLlm, Endpoint::Completions, &completion, &json!({"id": "x"})),
        Ok(parse(&completion))
    );
}

#[test]
fn disagg_request_ids_are_global_distinct_and_carry_the_machine() {
    let now = 1_767_225_600_000; // 2026-01-01
    let a = disagg_request_id(5, now);
    let b = disagg_request_id(5, now);
    assert_ne!(a, b, "the counter moves");
    assert!(a >= TRT_MIN_GLOBAL_ID && b >= TRT_MIN_GLOBAL_ID);
    let early = disagg_request_id(0, 0);
    assert!(early >= TRT_MIN_GLOBAL_ID, "clamped before the epoch, still global");
    // Machine ids land in their own bits before the shift into the global range.
    let one = disagg_request_id(1, now) - TRT_MIN_GLOBAL_ID;
    assert_eq!((one >> 12) & 0x3ff, 1);
}
