//! The real `turnstile` binary in front of mock vLLM engines: streaming,
//! success headers, the contract's error table, profiles and strategy
//! precedence, and pods-file discovery.

use std::time::{Duration, Instant};

use http::StatusCode;
use turnstile_tests::harness::{
    Engine, Gateway, PodSpec, StreamOnPod, assert_new_requests_skip, chat_body, eventually, finish_stream, get,
    get_json, next_data, open_stream, open_stream_on, post, send,
};

const MODEL: &str = "llama";

/// A model config with profiles used by several tests.
const CONFIG: &str = r#"{"defaultProfile":"default","profiles":{
    "default":{"routingStrategy":"random"},
    "batch":{"routingStrategy":"least-request"},
    "long-generation":{"routingStrategy":"least-request","routingConfig":{"maxTokensGte":2048}}}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reaches_client_before_engine_finishes() {
    // 20 tokens, 100 ms apart: the engine needs about 2 s for the answer.
    let engine = Engine::start("slow-0", MODEL, &["--ttft-ms", "50", "--itl-ms", "100", "--tokens", "20"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;

    let started = Instant::now();
    let response = open_stream(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["target-pod"], "slow-0");
    let mut body = response.into_body();
    let first = next_data(&mut body).await.expect("a first chunk").expect("no error");
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "), "SSE event expected: {first:?}");
    // The engine is still generating when the first chunk is already here.
    assert_eq!(engine.stats().await["in_flight"], 1, "engine finished before the client saw a byte");

    let mut text = String::from_utf8_lossy(&first).into_owned();
    let mut frames = 1;
    while let Some(chunk) = next_data(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("stream intact")));
        frames += 1;
    }
    let total = started.elapsed();
    assert!(frames >= 10, "chunks were coalesced: {frames} frames");
    assert!(text.contains("\"usage\""), "final usage chunk passed through");
    assert!(text.trim_end().ends_with("data: [DONE]"), "stream ends with [DONE]: {text}");
    assert!(first_at + Duration::from_millis(1000) < total, "first chunk at {first_at:?}, end at {total:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_events_reaches_client_in_few_writes() {
    // No delay between tokens: the engine sends its 64 events at once, and
    // the gateway passes them on in a few writes, not one write per event
    // (which costs the gateway CPU and the client wake-ups).
    let engine = Engine::start("fast-0", MODEL, &["--tokens", "64"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;

    let response = open_stream(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let (mut text, mut frames) = (String::new(), 0);
    while let Some(chunk) = next_data(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("stream intact")));
        frames += 1;
    }
    let events = text.matches("data: ").count();
    assert!(events >= 65, "64 tokens and [DONE]: {events} events");
    assert!(text.trim_end().ends_with("data: [DONE]"), "stream ends with [DONE]: {text}");
    // One write per event would be 66; a loaded 2-core runner splits the
    // burst a few more times than a quiet one (17 seen), so the bound leaves room.
    assert!(frames <= 24, "{events} events arrived in {frames} writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_headers_and_request_id_reach_both_sides() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;

    let reply = gw.chat(MODEL, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("target-pod"), "pod-a");
    assert_eq!(reply.header("target-pod-ip"), engine.addr.to_string());
    assert_eq!(reply.header("routing-strategy"), "least-request", "gateway default");
    let request_id = reply.header("request-id").to_owned();
    assert_eq!(request_id.len(), 36, "a UUID: {request_id}");
    assert_eq!(reply.json()["usage"]["total_tokens"].as_u64().map(|t| t > 0), Some(true));

    // One access-log line per request, with the answer's usage.
    let total_tokens = reply.json()["usage"]["total_tokens"].as_u64().expect("usage");
    let log = gw.log();
    let line =
        log.lines().find(|l| l.contains(&request_id)).unwrap_or_else(|| panic!("no log line for {request_id}:\n{log}"));
    assert!(line.contains(r#"outcome="completed""#), "{line}");
    assert!(line.contains(&format!("total_tokens={total_tokens}")), "{line}");

    let upstream = engine.stats().await["last_request"].clone();
    assert_eq!(upstream["headers"]["x-request-id"], request_id.as_str());
    assert_eq!(upstream["body"]["model"], MODEL, "body forwarded unchanged");
    assert_eq!(upstream["path"], "/v1/chat/completions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxied_endpoint_is_forwarded() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;
    let cases = [
        ("/v1/completions", serde_json::json!({"model": MODEL, "prompt": "hello"})),
        ("/v1/embeddings", serde_json::json!({"model": MODEL, "input": "hello"})),
        ("/v1/responses", serde_json::json!({"model": MODEL, "input": "hello"})),
    ];
    for (path, body) in cases {
        let reply = send(post(&gw.url(path), &body.to_string(), &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        assert_eq!(reply.header("target-pod"), "pod-a", "{path}");
        assert_eq!(engine.stats().await["last_request"]["path"], path);
    }
}

/// One row of the contract's error table.
struct ErrorCase {
    name: &'static str,
    path: &'static str,
    body: String,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    message: &'static str,
    error_type: &'static str,
    header: Option<(&'static str, &'static str)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_error_cases() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let dead_port = turnstile_tests::harness::free_port();
    let pods = [
        PodSpec::for_engine(&engine, MODEL),
        PodSpec::new("asleep-0", "asleep", engine.port()).ready(false),
        PodSpec::new("dead-0", "dead", dead_port),
    ];
    let gw = Gateway::start(&pods, &["--max-body-bytes", "2048"]).await;
    let chat = |model: &str| chat_body(model, false);
    let cases = vec![
        ErrorCase {
            name: "body not JSON",
            path: "/v1/chat/completions",
            body: "this is not json".into(),
            headers: vec![],
            status: 400,
            message: "error processing request body",
            error_type: "invalid_request_error",
            header: Some(("x-error-request-body-processing", "true")),
        },
        ErrorCase {
            name: "model missing",
            path: "/v1/completions",
            body: r#"{"prompt":"hi"}"#.into(),
            headers: vec![],
            status: 400,
            message: "'model' is a required property",
            error_type: "invalid_request_error",
            header: Some(("x-error-request-body-processing", "true")),
        },
        ErrorCase {
            name: "chat without messages",
            path: "/v1/chat/completions",
            body: format!(r#"{{"model":"{MODEL}"}}"#),
            headers: vec![],
            status: 400,
            message: "no messages in the request body",
            error_type: "invalid_request_error",
            header: Some(("x-error-request-body-processing", "true")),
        },
        ErrorCase {
            name: "unknown model",
            path: "/v1/chat/completions",
            body: chat("gpt-nope"),
            headers: vec![],
            status: 400,
            message: "model gpt-nope does not exist",
            error_type: "invalid_request_error",
            header: Some(("x-error-no-model-backends", "gpt-nope")),
        },
        ErrorCase {
            name: "no ready pod",
            path: "/v1/chat/completions",
            body: chat("asleep"),
            headers: vec![],
            status: 503,
            message: "no ready pods for model asleep",
            error_type: "overloaded_error",
            header: Some(("x-error-no-model-backends", "true")),
        },
        ErrorCase {
            name: "unknown routing strategy",
            path: "/v1/chat/completions",
            body: chat(MODEL),
            headers: vec![("routing-strategy", "fastest-please")],
            status: 400,
            message: "incorrect routing strategy fastest-please",
            error_type: "invalid_request_error",
            header: Some(("x-error-routing", "true")),
        },
        ErrorCase {
            name: "upstream connect failure",
            path: "/v1/chat/completions",
            body: chat("dead"),
            headers: vec![],
            status: 502,
            message: "",
            error_type: "api_error",
            header: Some(("x-error-upstream", "true")),
        },
        ErrorCase {
            name: "body over the size limit",
            path: "/v1/chat/completions",
            body: format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(4096)),
            headers: vec![],
            status: 413,
            message: "",
            error_type: "invalid_request_error",
            header: None,
        },
        ErrorCase {
            name: "unknown path",
            path: "/v1/images/teleport",
            body: chat(MODEL),
            headers: vec![],
            status: 404,
            message: "",
            error_type: "invalid_request_error",
            header: None,
        },
    ];
    for case in cases {
        let headers: Vec<(&str, &str)> = case.headers.clone();
        let reply = send(post(&gw.url(case.path), &case.body, &headers)).await;
        assert_eq!(reply.status.as_u16(), case.status, "{}: {}", case.name, reply.text());
        assert_eq!(reply.header("content-type"), "application/json", "{}", case.name);
        let body = reply.json();
        let error = &body["error"];
        assert!(error.is_object(), "{}: OpenAI error body expected: {body}", case.name);
        if !case.message.is_empty() {
            assert_eq!(error["message"], case.message, "{}", case.name);
        }
        assert_eq!(error["type"], case.error_type, "{}", case.name);
        assert!(error.get("code").is_some() && error.get("param").is_some(), "{}: code and param present", case.name);
        if let Some((name, value)) = case.header {
            assert_eq!(reply.header(name), value, "{}: header {name}", case.name);
        }
        assert!(!reply.header("request-id").is_empty(), "{}: request-id on errors too", case.name);
    }
    assert_eq!(engine.requests_total().await, 0, "no failing request reached an engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_bodies_pass_through_unchanged() {
    let engine = Engine::start("pod-a", MODEL, &["--fail-status", "500"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;
    let reply = gw.chat(MODEL, &[]).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.json()["error"]["message"], "mock failure");
    assert_eq!(reply.header("target-pod"), "pod-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_moves_to_another_pod() {
    let engine = Engine::start("alive", MODEL, &[]);
    let dead = turnstile_tests::harness::free_port();
    let pods = [PodSpec::new("dead", MODEL, dead), PodSpec::for_engine(&engine, MODEL)];
    let gw = Gateway::start(&pods, &["--routing-algorithm", "random"]).await;
    for _ in 0..10 {
        let reply = gw.chat(MODEL, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("target-pod"), "alive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_and_strategy_precedence() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let locked_config =
        r#"{"lockedRoutingStrategy":"random","profiles":{"default":{"routingStrategy":"least-request"}}}"#;
    let pods = [
        PodSpec::for_engine(&engine, MODEL).config(CONFIG),
        PodSpec::new("locked-0", "locked", engine.port()).config(locked_config),
    ];
    let gw = Gateway::start(&pods, &[]).await;
    let strategy_of = |reply: &turnstile_tests::harness::Reply| reply.header("routing-strategy").to_owned();

    // Profile strategy beats the gateway default.
    assert_eq!(strategy_of(&gw.chat(MODEL, &[]).await), "random");
    // The config-profile header picks another profile.
    assert_eq!(strategy_of(&gw.chat(MODEL, &[("config-profile", "batch")]).await), "least-request");
    // An unknown profile falls back to defaultProfile.
    assert_eq!(strategy_of(&gw.chat(MODEL, &[("config-profile", "nope")]).await), "random");
    // The routing-strategy header beats the profile.
    assert_eq!(strategy_of(&gw.chat(MODEL, &[("routing-strategy", "least-request")]).await), "least-request");
    // lockedRoutingStrategy beats the header.
    assert_eq!(strategy_of(&gw.chat("locked", &[("routing-strategy", "least-request")]).await), "random");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_profile_is_chosen_from_the_request_and_echoed() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL).config(CONFIG)], &[]).await;
    let body = serde_json::json!({"model": MODEL, "max_tokens": 4096, "messages": [{"role": "user", "content": "write a saga"}]});
    let reply = send(post(&gw.url("/v1/chat/completions"), &body.to_string(), &[("config-profile", "auto")])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-aibrix-config-profile"), "long-generation");
    assert_eq!(reply.header("routing-strategy"), "least-request");

    let plain = gw.chat(MODEL, &[("config-profile", "auto")]).await;
    assert_eq!(plain.header("x-aibrix-config-profile"), "default");
    let named = gw.chat(MODEL, &[("config-profile", "batch")]).await;
    assert_eq!(named.header("x-aibrix-config-profile"), "", "only echoed for auto");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flip_stops_new_requests_while_running_stream_completes() {
    let slow = ["--ttft-ms", "20", "--itl-ms", "100", "--tokens", "25"];
    let a = Engine::start("pod-a", MODEL, &slow);
    let b = Engine::start("pod-b", MODEL, &slow);
    let both = |a_ready: bool| [PodSpec::for_engine(&a, MODEL).ready(a_ready), PodSpec::for_engine(&b, MODEL)];
    let gw = Gateway::start(&both(true), &["--routing-algorithm", "random"]).await;

    // Open streams until one lands on pod-a (random: bounded attempts).
    let StreamOnPod { body: mut stream, first, others, .. } = open_stream_on(&gw, MODEL, "pod-a", 20).await;
    assert!(!first.is_empty());

    gw.write_pods(&both(false));
    eventually(Duration::from_secs(3), "pod-a reported not ready", || async {
        let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
        endpoints[MODEL]["pods"]
            .as_array()
            .is_some_and(|pods| pods.iter().any(|p| p["pod"] == "default/pod-a" && p["ready"] == false))
    })
    .await;
    assert_new_requests_skip(&gw, MODEL, &a, "pod-b").await;

    // The stream that was already running on pod-a completes normally.
    let text = finish_stream(&first, &mut stream).await;
    assert!(text.trim_end().ends_with("data: [DONE]"), "in-flight stream completed: {text}");
    drop(others);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_file_reload_adds_a_pod_and_bad_file_keeps_state() {
    let a = Engine::start("pod-a", MODEL, &[]);
    let b = Engine::start("pod-b", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&a, MODEL)], &[]).await;
    assert_eq!(gw.chat(MODEL, &[]).await.header("target-pod"), "pod-a");

    // An invalid file keeps the last good state and says why in the log.
    gw.write_pods_text("items: [this is: not, valid");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gw.chat(MODEL, &[]).await.header("target-pod"), "pod-a");
    assert!(gw.log().contains("pods file is invalid"), "reason logged:\n{}", gw.log());

    gw.write_pods(&[PodSpec::for_engine(&a, MODEL), PodSpec::for_engine(&b, MODEL)]);
    eventually(Duration::from_secs(5), "pod-b receives traffic", || async {
        gw.chat(MODEL, &[]).await.header("target-pod") == "pod-b"
    })
    .await;
    let models = get_json(&gw.url("/v1/models")).await;
    assert_eq!(models["data"][0]["id"], MODEL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_spreads_concurrent_requests() {
    let slow = ["--ttft-ms", "300", "--tokens", "1"];
    let engines: Vec<Engine> = (0..3).map(|i| Engine::start(&format!("pod-{i}"), MODEL, &slow)).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    let gw = Gateway::start(&pods, &["--routing-algorithm", "least-request"]).await;
    let url = gw.url("/v1/chat/completions");
    let replies = join_all((0..9).map(|_| send(post(&url, &chat_body(MODEL, false), &[])))).await;
    let mut per_pod = std::collections::BTreeMap::<String, usize>::new();
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
        *per_pod.entry(reply.header("target-pod").to_owned()).or_default() += 1;
    }
    assert_eq!(per_pod.values().copied().collect::<Vec<_>>(), [3, 3, 3], "{per_pod:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_request_metrics() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;
    for _ in 0..3 {
        assert_eq!(gw.chat(MODEL, &[]).await.status, StatusCode::OK);
    }
    assert_eq!(gw.chat("nope", &[]).await.status, StatusCode::BAD_REQUEST);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(&format!(r#"aibrix_gateway_requests_total{{model="{MODEL}",status_code="200"}} 3"#)),
        "{metrics}"
    );
    assert!(metrics.contains(r#"aibrix_gateway_requests_total{model="unknown",status_code="400"} 1"#), "{metrics}");
    assert_eq!(send(get(&gw.admin_url("/healthz"))).await.status, StatusCode::OK);
    let ready = get_json(&gw.admin_url("/readyz")).await;
    assert_eq!(ready["ready"], true);
    let models = get_json(&gw.admin_url("/v1/models")).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
}

/// Runs futures concurrently and collects their outputs in order.
async fn join_all<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

/// `kubectl get pods -o yaml > pods.yaml` rewrites the file in place: empty
/// for a moment, then a prefix (kubectl writes `items` first and `kind`
/// last), then whole. The gateway keeps the last good pods meanwhile, so no
/// request sent during five such rewrites fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_file_rewritten_in_place_never_drops_the_pods() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let pods = [PodSpec::for_engine(&engine, MODEL)];
    let gw = Gateway::start(&pods, &[]).await;
    let harness_text = turnstile_tests::harness::pods_yaml(&pods);
    let items = harness_text.split_once("items:\n").expect("items").1;
    let kubectl = format!("apiVersion: v1\nitems:\n{items}kind: List\nmetadata:\n  resourceVersion: \"\"\n");

    let url = gw.url("/v1/chat/completions");
    let sender = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..300 {
            statuses.push(send(post(&url, &chat_body(MODEL, false), &[])).await.status);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        statuses
    });
    for _ in 0..5 {
        // The gateway polls every 50 ms in tests: each state is seen.
        std::fs::write(&gw.pods_file, "").expect("truncate");
        tokio::time::sleep(Duration::from_millis(120)).await;
        std::fs::write(&gw.pods_file, &kubectl[..kubectl.len() / 2]).expect("half written");
        tokio::time::sleep(Duration::from_millis(120)).await;
        std::fs::write(&gw.pods_file, &kubectl).expect("whole file");
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let statuses = sender.await.expect("sender");
    let failed: Vec<&StatusCode> = statuses.iter().filter(|s| **s != StatusCode::OK).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), statuses.len());
    let log = gw.log();
    assert!(log.contains("looks incomplete") && log.contains("keeping the last good pod set"), "{log}");
}
