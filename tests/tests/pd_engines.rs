//! Prefill/decode for every engine AIBrix drives, and prompt-length buckets,
//! through the real `turnstile` binary in front of mock engines that play each
//! engine's role (`--engine-kind`, `--kv-connector`) and refuse anything but
//! that engine's handover: vLLM's NIXL (the whole prefill answer as
//! `disagg_prefill_resp`) and Mooncake (nothing passed) connectors, SGLang
//! (bootstrap host, port and room in both bodies; the decode waits for the
//! prefill through the prefill pod's bootstrap server) and TensorRT-LLM
//! (`disaggregated_params`, context only then generation only, with the
//! prompt's token ids). vLLM's default connector is tests/pd.rs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, Reply, post, send};
use turnstile_tests::pd::{CONFIG_ANNOTATION, ENGINE_LABEL, Kind, MODEL, Roleset, RolloutLoad, start_gateway};

fn chat(content: &str, stream: bool) -> String {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 5, "stream": stream})
        .to_string()
}

fn completion(prompt: &str) -> String {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 3}).to_string()
}

async fn call(gw: &Gateway, path: &str, body: &str) -> Reply {
    send(post(&gw.url(path), body, &[])).await
}

/// Chat (whole and streamed) and a completion go through a roleset of `kind`:
/// every answer comes from the decode pod, and both mocks accepted their half
/// of each request's handover.
async fn hands_over(kind: Kind) {
    let set = Roleset::start("rs", Some(kind), None, &["--tokens", "5"]);
    let gw = start_gateway(&set.pods(true, true), &[]).await;
    for (path, body, streamed) in [
        ("/v1/chat/completions", chat(&format!("tell me about {kind:?}"), false), false),
        ("/v1/chat/completions", chat(&format!("stream me {kind:?}"), true), true),
        ("/v1/completions", completion(&format!("once upon a {kind:?}")), false),
    ] {
        let reply = call(&gw, path, &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{kind:?} {path}: {}", reply.text());
        assert_eq!(reply.header("prefill-target-pod"), "rs-prefill");
        assert_eq!(reply.header("target-pod"), "rs-decode");
        if streamed {
            let text = reply.text();
            assert!(text.contains("data: [DONE]"), "{kind:?}: {text}");
            let tokens = text.matches("\"content\":\"").count();
            assert!(tokens >= 5, "{kind:?}: every token streams through: {text}");
        } else {
            let usage = &reply.json()["usage"];
            assert!(usage["completion_tokens"].as_u64().is_some_and(|n| n >= 3), "{kind:?}: {}", reply.text());
        }
        let request_id = reply.header("request-id");
        let prefilled = Roleset::transfer(&set.prefill, request_id).await;
        let decoded = Roleset::transfer(&set.decode, request_id).await;
        assert_eq!(prefilled["engine"], kind.engine(), "{prefilled}");
        assert_eq!(decoded["engine"], kind.engine(), "{decoded}");
        assert_eq!(decoded["stream"], streamed, "{decoded}");
    }
    set.assert_no_rejections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_nixl_hands_the_prefill_answer_to_the_decode_pod() {
    hands_over(Kind::Nixl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_mooncake_prefills_then_decodes_the_clients_body() {
    hands_over(Kind::Mooncake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_pairs_meet_through_the_prefill_pods_bootstrap_server() {
    hands_over(Kind::Sglang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trtllm_decodes_what_the_context_only_prefill_left() {
    hands_over(Kind::TrtLlm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sglang_prefill_that_fails_ends_its_waiting_decode_with_503() {
    // The decode pod would wait 10 s for the room; the gateway gives the prefill 1 s.
    let set = Roleset::start("rs", Some(Kind::Sglang), None, &["--bootstrap-timeout-ms", "10000"]);
    let gw = start_gateway(&set.pods(true, true), &["--prefill-request-timeout-seconds", "1"]).await;
    set.prefill.set_faults(json!({"hang": true})).await;
    let started = Instant::now();
    let reply = call(&gw, "/v1/chat/completions", &chat("will the decode hang", true)).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert!(waited < Duration::from_secs(5), "answered at the prefill timeout, not the decode's wait: {waited:?}");
    assert_eq!(reply.json()["error"]["message"], "prefill request to pod rs-prefill failed: no answer within 1 s");
    assert!(gw.log().contains("pd-prefill-request-error"), "{}", gw.log());

    // A client repeating a key the gateway sets is refused before any engine sees it.
    set.prefill.set_faults(json!({"hang": false})).await;
    let before = set.prefill.requests_total().await;
    let repeated = r#"{"model":"llama","prompt":"x","min_tokens":1,"min_tokens":2}"#;
    let reply = call(&gw, "/v1/completions", repeated).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["error"]["message"], "duplicate top-level key \"min_tokens\" in SGLang request body");
    assert_eq!(set.prefill.requests_total().await, before);
    // And the pair serves again.
    assert_eq!(call(&gw, "/v1/chat/completions", &chat("fine now", false)).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roleset_whose_pods_name_different_engines_is_not_used() {
    let mixed = Roleset::start("mixed", None, None, &[]);
    let mut pods = mixed.pods(true, true);
    pods[1] = pods[1].clone().label(ENGINE_LABEL, "sglang");
    let gw = start_gateway(&pods, &[]).await;
    let reply = call(&gw, "/v1/chat/completions", &chat("x", false)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert!(
        gw.log().contains("inconsistent LLM engines detected: pod mixed-prefill has vllm, pod mixed-decode has sglang"),
        "{}",
        gw.log()
    );
    assert_eq!(mixed.prefill.requests_total().await + mixed.decode.requests_total().await, 0);
}

// --- Prompt-length buckets ---

/// A profile taking prompts of `min..=max` cl100k tokens.
fn bucket(min: u64, max: u64) -> String {
    format!(
        r#"{{"profiles":{{"default":{{"routingConfig":{{"promptLenBucketMinLength":{min},"promptLenBucketMaxLength":{max}}}}}}}}}"#
    )
}

/// A prompt of exactly `tokens` cl100k tokens ("hello", then " hello"s).
fn prompt_of(tokens: usize) -> String {
    let prompt = format!("hello{}", " hello".repeat(tokens.saturating_sub(1)));
    let bpe = tiktoken_rs::cl100k_base().expect("cl100k");
    assert_eq!(bpe.encode_ordinary(&prompt).len(), tokens, "the prompt's token count");
    prompt
}

/// A whole-request engine standing in for every bucket (`combined: true`).
fn combined_pod(engine: &Engine) -> PodSpec {
    PodSpec::for_engine(engine, MODEL)
        .label("roleset-name", "whole")
        .label("role-name", "worker")
        .annotation(CONFIG_ANNOTATION, r#"{"profiles":{"default":{"routingConfig":{"combined":true}}}}"#)
}

/// Who answered a completion of `tokens` prompt tokens.
async fn answered_by(gw: &Gateway, tokens: usize) -> (StatusCode, String) {
    let reply = call(gw, "/v1/completions", &completion(&prompt_of(tokens))).await;
    let who = if reply.status == StatusCode::OK {
        format!("{}+{}", reply.header("prefill-target-pod"), reply.header("target-pod"))
    } else {
        reply.text()
    };
    (reply.status, who)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_take_exactly_their_prompt_lengths_and_the_rest_goes_to_the_combined_pod() {
    let short = Roleset::start("short", None, Some(bucket(0, 16)), &[]);
    let long = Roleset::start("long", None, Some(bucket(17, 64)), &[]);
    let whole = Engine::start("whole", MODEL, &[]);
    let pods = [short.pods(true, true), long.pods(true, true), vec![combined_pod(&whole)]].concat();
    let gw = start_gateway(&pods, &["--prompt-length-bucketing"]).await;
    for (tokens, expected) in [
        (1, "short-prefill+short-decode"),
        (16, "short-prefill+short-decode"),
        (17, "long-prefill+long-decode"),
        (64, "long-prefill+long-decode"),
        (65, "+whole"),
    ] {
        assert_eq!(answered_by(&gw, tokens).await, (StatusCode::OK, expected.to_owned()), "{tokens} tokens");
    }

    // The long bucket's decode pod goes down: its prompts go to the combined pod.
    gw.write_pods(&[short.pods(true, true), long.pods(true, false), vec![combined_pod(&whole)]].concat());
    let deadline = Instant::now() + Duration::from_secs(5);
    while answered_by(&gw, 30).await.1 != "+whole" {
        assert!(Instant::now() < deadline, "the gateway never saw the long decode pod go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered_by(&gw, 16).await.1, "short-prefill+short-decode", "the other bucket is unaffected");

    // Without the combined pod either: AIBrix's error, and no cross-bucket routing.
    gw.write_pods(&[short.pods(true, true), long.pods(true, false)].concat());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = answered_by(&gw, 30).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(Instant::now() < deadline, "the combined pod never left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.log().contains("no prompt-length bucket matches prompt length 30 and no combined pods available"),
        "{}",
        gw.log()
    );
    assert_eq!(short.prefill.requests_total().await, 3, "short got its own prompts only");
    short.assert_no_rejections().await;
    long.assert_no_rejections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_of_one_bucket_under_load_fails_no_request() {
    let timing = ["--ttft-ms", "5", "--itl-ms", "3"];
    let old = Roleset::start("short-old", None, Some(bucket(0, 16)), &timing);
    let new = Roleset::start("short-new", None, Some(bucket(0, 16)), &timing);
    let long = Roleset::start("long", None, Some(bucket(17, 64)), &timing);
    let whole = Engine::start("whole", MODEL, &timing);
    let fleet = |old_ready: Option<(bool, bool)>, new_ready: Option<(bool, bool)>| {
        let mut pods = [long.pods(true, true), vec![combined_pod(&whole)]].concat();
        if let Some((p, d)) = old_ready {
            pods.extend(old.pods(p, d));
        }
        if let Some((p, d)) = new_ready {
            pods.extend(new.pods(p, d));
        }
        pods
    };
    let gw = Arc::new(start_gateway(&fleet(Some((true, true)), None), &["--prompt-length-bucketing"]).await);
    let short_prompt = Arc::new(prompt_of(10));
    let long_prompt = Arc::new(prompt_of(40));

    let load = RolloutLoad::start(&gw, "/v1/completions", 4, move |_, sent| {
        let prompt = if sent % 4 == 3 { &long_prompt } else { &short_prompt };
        let stream = sent % 3 == 0;
        (json!({"model": MODEL, "prompt": format!("{prompt}"), "max_tokens": 3, "stream": stream}).to_string(), stream)
    });

    let step = Duration::from_millis(400);
    tokio::time::sleep(step).await;
    // maxUnavailable: the old roleset goes first; the bucket has no complete
    // roleset, so its prompts go to the combined pod meanwhile.
    gw.write_pods(&fleet(Some((false, false)), Some((false, false))));
    tokio::time::sleep(step).await;
    let whole_before = whole.requests_total().await;
    tokio::time::sleep(step).await;
    assert!(whole.requests_total().await > whole_before, "the combined pod stands in for the bucket");
    // The new roleset comes up, prefill first.
    gw.write_pods(&fleet(Some((false, false)), Some((true, false))));
    tokio::time::sleep(step).await;
    assert_eq!(new.prefill.requests_total().await, 0, "a half-ready roleset gets nothing");
    gw.write_pods(&fleet(None, Some((true, true))));
    tokio::time::sleep(step).await;
    drop(old);
    let new_before = new.decode.requests_total().await;
    tokio::time::sleep(step).await;
    assert!(new.decode.requests_total().await > new_before, "the new roleset serves the bucket");

    let total = load.finish().await;
    assert!(total > 40, "steady load: {total} requests");
    new.assert_no_rejections().await;
    long.assert_no_rejections().await;
}
