//! Prefill/decode disaggregation (`pd`) through the real `turnstile` binary, in
//! front of mock engines started with `--role prefill` and `--role decode`.
//! The mocks refuse anything but a proper handover (a one-token, non-streaming
//! prefill asking for a remote decode; a decode carrying that prefill's
//! `kv_transfer_params` with `remote_host` set to the prefill pod's IP), and
//! record what they saw in `/mock/stats`, which is what these tests check.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{Value, json};
use turnstile_tests::harness::{Gateway, PodSpec, Reply, eventually, next_data, open_stream, post, send};
use turnstile_tests::pd::{MODEL, Roleset, RolloutLoad, start_gateway};

fn chat(content: &str, stream: bool) -> String {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "stream": stream,
        "stream_options": {"include_usage": stream},
    })
    .to_string()
}

async fn ask(gw: &Gateway, content: &str) -> Reply {
    send(post(&gw.url("/v1/chat/completions"), &chat(content, false), &[])).await
}

/// The roleset name of a pod named `<roleset>-prefill` / `<roleset>-decode`.
fn roleset_of(pod: &str) -> &str {
    pod.rsplit_once('-').map_or(pod, |(roleset, _)| roleset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_prefilled_then_decoded_in_one_roleset() {
    let a = Roleset::vllm("rs-a", &[]);
    let b = Roleset::vllm("rs-b", &[]);
    let pods: Vec<PodSpec> = [a.pods(true, true), b.pods(true, true)].concat();
    let gw = start_gateway(&pods, &[]).await;

    let mut used = BTreeSet::new();
    for i in 0..16 {
        let reply = ask(&gw, &format!("question {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let (prefill, decode) = (reply.header("prefill-target-pod"), reply.header("target-pod"));
        assert!(prefill.ends_with("-prefill") && decode.ends_with("-decode"), "{prefill} / {decode}");
        assert_eq!(roleset_of(prefill), roleset_of(decode), "both halves in one roleset");
        assert_eq!(reply.header("routing-strategy"), "pd");
        let set = if roleset_of(prefill) == "rs-a" { &a } else { &b };
        assert_eq!(reply.header("prefill-target-pod-ip"), set.prefill.addr.to_string());
        assert_eq!(reply.header("target-pod-ip"), set.decode.addr.to_string());
        assert_eq!(reply.json()["usage"]["completion_tokens"], 4, "the decode pod's answer");

        // The decode engine accepted exactly this request's transfer, made by
        // the prefill engine the gateway named.
        let request_id = reply.header("request-id");
        let decoded = Roleset::pd_stats(&set.decode).await;
        let transfer = decoded["transfers"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["x_request_id"] == request_id))
            .unwrap_or_else(|| panic!("no transfer for {request_id} in {decoded}"));
        assert_eq!(transfer["remote_engine_id"], prefill);
        assert_eq!(transfer["remote_host"], "127.0.0.1", "the prefill pod's IP, not the engine's own name");
        let prefilled = Roleset::pd_stats(&set.prefill).await;
        assert!(
            prefilled["transfers"].as_array().is_some_and(|all| all
                .iter()
                .any(|t| t["x_request_id"] == request_id && t["transfer_id"] == transfer["transfer_id"])),
            "{prefilled}"
        );
        used.insert(roleset_of(prefill).to_owned());
    }
    assert_eq!(used.len(), 2, "idle rolesets share the load: {used:?}");

    // The prefill engine saw the rewritten body; the prompt itself is untouched.
    let last = a.prefill.stats().await["last_request"]["body"].clone();
    assert_eq!((last["max_tokens"].as_u64(), last["max_completion_tokens"].as_u64()), (Some(1), Some(1)));
    assert_eq!(last["stream"], false);
    assert!(last.get("stream_options").is_none(), "{last}");
    assert_eq!(last["kv_transfer_params"]["do_remote_decode"], true);
    assert_eq!(last["kv_transfer_params"]["do_remote_prefill"], false);
    assert!(last["messages"][0]["content"].as_str().is_some_and(|c| c.starts_with("question")));
    a.assert_no_rejections().await;
    b.assert_no_rejections().await;

    let metrics = gw.metrics().await;
    for series in [
        r#"aibrix_gateway_pd_selections_total{model="llama",pod="rs-a-prefill",role="prefill"}"#,
        r#"aibrix_gateway_pd_selections_total{model="llama",pod="rs-b-decode",role="decode"}"#,
        r#"aibrix_gateway_pd_prefill_duration_seconds_count{model="llama"} 16"#,
        r#"aibrix_gateway_requests_total{model="llama",status_code="200"} 16"#,
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_rolesets_are_skipped() {
    let complete = Roleset::vllm("rs-ok", &[]);
    let no_decode = Roleset::vllm("rs-half", &[]);
    let decode_starting = Roleset::vllm("rs-starting", &[]);
    // rs-half has only its prefill pod; rs-starting's decode pod is not Ready.
    let pods: Vec<PodSpec> =
        [complete.pods(true, true), no_decode.pods(true, true)[..1].to_vec(), decode_starting.pods(true, false)]
            .concat();
    let gw = start_gateway(&pods, &[]).await;
    for i in 0..10 {
        let reply = ask(&gw, &format!("question {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("prefill-target-pod"), "rs-ok-prefill");
        assert_eq!(reply.header("target-pod"), "rs-ok-decode");
    }
    for engine in [&no_decode.prefill, &decode_starting.prefill, &decode_starting.decode] {
        assert_eq!(engine.requests_total().await, 0, "{} got traffic", engine.name);
    }

    // Take the only complete roleset's decode pod out: nothing is eligible.
    gw.write_pods(&[complete.pods(true, false), no_decode.pods(true, true)[..1].to_vec()].concat());
    let deadline = Instant::now() + Duration::from_secs(5);
    let reply = loop {
        let reply = ask(&gw, "anyone?").await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply;
        }
        assert!(Instant::now() < deadline, "the gateway never saw the decode pod not ready: {}", reply.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reply.header("x-error-no-model-backends"), "true");
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "overloaded_error");
    assert_eq!(
        error["message"],
        "no roleset of model llama has a ready prefill and a ready decode pod (ready prefill pods: 2, ready decode pods: 0)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_prefill_answers_503_and_sends_no_decode() {
    let set = Roleset::vllm("rs-a", &[]);
    let gw = start_gateway(&set.pods(true, true), &["--prefill-request-timeout-seconds", "1"]).await;

    set.prefill.set_faults(json!({"hang": true})).await;
    let started = Instant::now();
    let reply = ask(&gw, "will this prefill ever end").await;
    let waited = started.elapsed();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert!(waited >= Duration::from_secs(1) && waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(reply.header("content-type"), "application/json");
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "overloaded_error");
    assert_eq!(error["code"], "prefill_failed");
    assert_eq!(error["message"], "prefill request to pod rs-a-prefill failed: no answer within 1 s");
    assert_eq!(set.prefill.requests_total().await, 1);
    assert_eq!(set.decode.requests_total().await, 0, "no decode after a failed prefill");

    let request_id = reply.header("request-id").to_owned();
    eventually(Duration::from_secs(5), "the pd-prefill-request-error log line", || async {
        gw.log().lines().any(|line| {
            line.contains("pd-prefill-request-error")
                && line.contains(&request_id)
                && line.contains("llama")
                && line.contains("rs-a-prefill")
                && line.contains("timeout")
        })
    })
    .await;

    // An engine error is a prefill failure too.
    set.prefill.set_faults(json!({"hang": false, "fail_status": 500})).await;
    let reply = ask(&gw, "and now").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let message = reply.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.starts_with("prefill request to pod rs-a-prefill failed: status 500: "), "{message}");
    assert_eq!(set.decode.requests_total().await, 0);

    // Healthy again: served.
    set.prefill.set_faults(json!({"fail_status": null})).await;
    assert_eq!(ask(&gw, "better?").await.status, StatusCode::OK);
    assert_eq!(set.decode.requests_total().await, 1);

    // The prefill engine is gone (connection refused): 503 as well.
    let Roleset { prefill, decode, .. } = set;
    drop(prefill);
    let reply = ask(&gw, "hello?").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let message = reply.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.starts_with("prefill request to pod rs-a-prefill failed: "), "{message}");
    assert_eq!(decode.requests_total().await, 1);

    let metrics = gw.metrics().await;
    for series in [
        r#"aibrix_gateway_pd_prefill_errors_total{model="llama",reason="timeout"} 1"#,
        r#"aibrix_gateway_pd_prefill_errors_total{model="llama",reason="status"} 1"#,
        r#"aibrix_gateway_pd_prefill_errors_total{model="llama",reason="connect"} 1"#,
        r#"aibrix_gateway_requests_total{model="llama",status_code="503"} 3"#,
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_pod_that_refuses_connections_is_passed_over() {
    let crashed = Roleset::vllm("rs-a", &[]);
    let healthy = Roleset::vllm("rs-b", &[]);
    let gw = start_gateway(&[crashed.pods(true, true), healthy.pods(true, true)].concat(), &[]).await;
    // rs-a's prefill engine dies; the pods file still says Ready (the kubelet has not noticed).
    let Roleset { prefill, decode: crashed_decode, .. } = crashed;
    drop(prefill);
    for i in 0..20 {
        let reply = ask(&gw, &format!("question {i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("prefill-target-pod"), "rs-b-prefill");
        assert_eq!(reply.header("target-pod"), "rs-b-decode");
    }
    assert_eq!(crashed_decode.requests_total().await, 0);
    assert!(gw.log().contains("connect to prefill pod failed; choosing another pair"), "{}", gw.log());
    assert!(!gw.log().contains("pd-prefill-request-error"), "no request failed");
    healthy.assert_no_rejections().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_answers_pass_through_from_the_decode_pod() {
    let set = Roleset::vllm("rs-a", &["--tokens", "6", "--itl-ms", "5"]);
    let gw = start_gateway(&set.pods(true, true), &[]).await;
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "stream me something"}],
        "max_tokens": 6,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let response = open_stream(post(&gw.url("/v1/chat/completions"), &body, &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert_eq!(header("prefill-target-pod"), "rs-a-prefill");
    assert_eq!(header("target-pod"), "rs-a-decode");
    assert!(header("content-type").starts_with("text/event-stream"));

    let mut body = response.into_body();
    let (mut frames, mut text) = (0, String::new());
    while let Some(frame) = next_data(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&frame.expect("stream intact")));
        frames += 1;
        assert!(frames < 1000, "bounded");
    }
    let events: Vec<&str> = text.split("\n\n").filter(|e| e.starts_with("data: ")).collect();
    assert_eq!(events.last().copied(), Some("data: [DONE]"));
    let chunks: Vec<Value> =
        events.iter().filter_map(|e| serde_json::from_str(e.trim_start_matches("data: ")).ok()).collect();
    let tokens = chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].is_string()).count();
    assert_eq!(tokens, 6, "every token arrives: {text}");
    assert_eq!(chunks.last().map(|c| c["usage"]["completion_tokens"].clone()), Some(json!(6)));
    assert!(frames > 1, "chunk by chunk, not buffered");

    // The prefill did not stream; the decode did.
    let prefill = set.prefill.stats().await["last_request"]["body"].clone();
    assert_eq!(prefill["stream"], false);
    let decoded = Roleset::pd_stats(&set.decode).await;
    assert_eq!(decoded["transfers"][0]["stream"], true);
    set.assert_no_rejections().await;
    eventually(Duration::from_secs(5), "the stream is accounted", || async {
        gw.metrics().await.contains(r#"aibrix_gateway_in_flight_requests{model="llama"} 0"#)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roleset_rollout_under_load_fails_no_request() {
    let timing = ["--ttft-ms", "5", "--itl-ms", "3"];
    let old = Roleset::vllm("rs-old", &timing);
    let new = Roleset::vllm("rs-new", &timing);
    let gw = Arc::new(start_gateway(&old.pods(true, true), &[]).await);

    let load = RolloutLoad::start(&gw, "/v1/chat/completions", 4, |worker, sent| {
        let stream = sent % 3 == 0;
        (chat(&format!("worker {worker} request {sent}"), stream), stream)
    });

    let step = Duration::from_millis(400);
    tokio::time::sleep(step).await;
    // The new roleset's pods appear, starting.
    gw.write_pods(&[old.pods(true, true), new.pods(false, false)].concat());
    tokio::time::sleep(step).await;
    // Its prefill pod is Ready first: the roleset is still incomplete.
    gw.write_pods(&[old.pods(true, true), new.pods(true, false)].concat());
    tokio::time::sleep(step).await;
    assert_eq!(new.prefill.requests_total().await, 0, "a half-ready roleset gets nothing");
    // Both Ready: it takes traffic.
    gw.write_pods(&[old.pods(true, true), new.pods(true, true)].concat());
    eventually(Duration::from_secs(5), "the new roleset serves", || async { new.decode.requests_total().await > 0 })
        .await;
    // The old roleset drains (not Ready): requests in flight there finish,
    // new ones go to the new roleset only.
    gw.write_pods(&[old.pods(false, false), new.pods(true, true)].concat());
    tokio::time::sleep(step).await;
    let old_totals = (old.prefill.requests_total().await, old.decode.requests_total().await);
    tokio::time::sleep(step).await;
    assert_eq!(
        (old.prefill.requests_total().await, old.decode.requests_total().await),
        old_totals,
        "a not-Ready roleset gets no new requests"
    );
    old.assert_no_rejections().await;
    // Then it goes, and its engines stop: a request still sent there would fail.
    gw.write_pods(&new.pods(true, true));
    tokio::time::sleep(step).await;
    drop(old);
    tokio::time::sleep(step).await;

    let total = load.finish().await;
    assert!(total > 40, "steady load: {total} requests");
    new.assert_no_rejections().await;
}
