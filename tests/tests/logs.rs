//! Structured logs: with `--log-format json` every
//! request, proxied or answered by the gateway itself, ends in exactly one
//! JSON "request end" line with its fields; and no secret reaches the log.

use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, Reply, chat_body, eventually, get, post, send};

const MODEL: &str = "logs-model";

/// The gateway log's JSON lines; a line that does not parse fails the test.
fn json_lines(gw: &Gateway) -> Vec<Value> {
    gw.log()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}")))
        .collect()
}

/// The "request end" lines of one request.
fn request_ends(gw: &Gateway, request_id: &str) -> Vec<Value> {
    json_lines(gw)
        .into_iter()
        .filter(|line| line["message"] == "request end" && line["request_id"] == request_id)
        .collect()
}

/// Waits (bounded) for the request's end line and checks there is exactly one.
async fn one_request_end(gw: &Gateway, reply: &Reply) -> Value {
    let id = reply.header("request-id").to_owned();
    assert!(!id.is_empty(), "no request-id header");
    eventually(Duration::from_secs(5), "the request end line", || async { !request_ends(gw, &id).is_empty() }).await;
    // A second line would come right after the first, if at all.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut lines = request_ends(gw, &id);
    assert_eq!(lines.len(), 1, "request {id} ended in {} lines: {lines:?}", lines.len());
    lines.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_ends_in_one_json_line_with_its_fields() {
    let engine = Engine::start("logs-0", MODEL, &["--ttft-ms", "5", "--tokens", "3"]);
    let config = r#"{"defaultProfile":"default","profiles":{"default":{"routingStrategy":"least-request","requestsPerSecond":1}}}"#;
    let pods =
        [PodSpec::for_engine(&engine, MODEL).config(config), PodSpec::new("cold-0", "cold-model", 9).ready(false)];
    let gw = Gateway::start(&pods, &["--log-format", "json"]).await;

    // Proxied, streamed: every field of the contract.
    let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let line = one_request_end(&gw, &reply).await;
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["model"], MODEL);
    assert_eq!(line["profile"], "default");
    assert_eq!(line["strategy"], "least-request");
    assert_eq!(line["pod"], "logs-0");
    assert_eq!(line["status"], 200);
    assert_eq!(line["outcome"], "completed");
    assert!(line["prompt_tokens"].as_u64().is_some_and(|n| n > 0), "{line}");
    assert_eq!(line["completion_tokens"], 3, "{line}");
    for timing in ["routing_ms", "ttft_ms", "total_ms"] {
        assert!(line[timing].as_f64().is_some_and(|ms| ms >= 0.0), "{timing} in {line}");
    }
    assert!(line["ttft_ms"].as_f64() <= line["total_ms"].as_f64());

    // Over the model's RPS: rejected before routing, still one line, with the
    // profile and strategy already resolved and the error.
    let limited = gw.chat(MODEL, &[]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{}", limited.text());
    let line = one_request_end(&gw, &limited).await;
    assert_eq!((line["status"].as_u64(), line["outcome"].as_str()), (Some(429), Some("error")));
    assert_eq!((line["model"].as_str(), line["profile"].as_str()), (Some(MODEL), Some("default")));
    assert_eq!(line["strategy"], "least-request");
    assert!(line["error"].as_str().is_some_and(|e| e.contains("exceeded RPS")), "{line}");
    assert_eq!((line["prompt_tokens"].as_u64(), line["completion_tokens"].as_u64()), (Some(0), Some(0)));
    assert!(line["pod"].is_null(), "no pod was chosen: {line}");

    // Failures at every earlier phase end in one line too.
    let cases: [(Reply, u16, &str); 4] = [
        (gw.chat("no-such-model", &[]).await, 400, "unknown"),
        (gw.chat("cold-model", &[]).await, 503, "cold-model"),
        (send(post(&gw.url("/v1/chat/completions"), "{not json", &[])).await, 400, "unknown"),
        (send(get(&gw.url("/v1/nowhere"))).await, 404, "unknown"),
    ];
    for (reply, status, model) in &cases {
        assert_eq!(reply.status.as_u16(), *status, "{}", reply.text());
        let line = one_request_end(&gw, reply).await;
        assert_eq!(line["status"], *status, "{line}");
        assert_eq!(line["model"], *model, "{line}");
        assert_eq!(line["outcome"], "error");
        assert!(line["error"].is_string() && line["total_ms"].is_number(), "{line}");
    }

    // The gateway's own successful answer on the proxy port is a request too.
    let models = send(get(&gw.url("/v1/models"))).await;
    assert_eq!(models.status, StatusCode::OK);
    let line = one_request_end(&gw, &models).await;
    assert_eq!((line["status"].as_u64(), line["outcome"].as_str()), (Some(200), Some("completed")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_log() {
    const REDIS_PASSWORD: &str = "redis-pw-Zq81xK";
    const TOKEN: &str = "bearer-token-Lm47Tv";
    const WRONG_KEY: &str = "wrong-key-Pw93Qc";
    let engine = Engine::start("secrets-0", MODEL, &[]);
    // A Redis that is not there: connection errors get logged, with the URL
    // they were for, at debug level and above.
    let dead_port = turnstile_tests::harness::free_port();
    let redis_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{dead_port}/0");
    let gw = Gateway::spawn(
        &[PodSpec::for_engine(&engine, MODEL)],
        &["--redis-url", &redis_url, "--redis-timeout-ms", "20"],
        &[("AIBRIX_AUTH_BEARER_TOKEN", TOKEN), ("TURNSTILE_LOG", "debug"), ("TURNSTILE_PENALTY_THRESHOLD", "3")],
    );
    gw.wait_ready().await;

    let auth = format!("Bearer {TOKEN}");
    for _ in 0..3 {
        let reply = gw.chat(MODEL, &[("authorization", &auth)]).await;
        assert_eq!(reply.status, StatusCode::OK, "fail-open without Redis: {}", reply.text());
    }
    let wrong = format!("Bearer {WRONG_KEY}");
    let reply = gw.chat(MODEL, &[("authorization", &wrong)]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, false), &[("api-key", WRONG_KEY)])).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    // Each request was logged, and Redis trouble too; none with a secret.
    eventually(Duration::from_secs(5), "five request end lines", || async {
        gw.log().matches("request end").count() >= 5
    })
    .await;
    let log = gw.log();
    assert!(log.to_lowercase().contains("redis"), "Redis trouble is logged:\n{log}");
    for secret in [REDIS_PASSWORD, TOKEN, WRONG_KEY] {
        assert!(!log.contains(secret), "{secret} leaked into the log:\n{log}");
    }
}
