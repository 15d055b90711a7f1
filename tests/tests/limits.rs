//! Model RPS caps and per-user RPM/TPM limits against the real `turnstile`
//! binary, with a real `redis-server` started per test: exact admission per
//! window across replicas, rollback when routing fails, profiles counted
//! apart, the in-process limiter, Redis dying and coming back (fail-open and
//! fail-closed), TPM after a streamed answer, users file defaults, bearer
//! auth, and AIBrix's per-user rules (`--user-limits aibrix`) beside the
//! default ones.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use turnstile_tests::harness::{
    Engine, Gateway, PodSpec, Redis, Reply, chat_body, eventually, next_data, open_stream, post, scratch_dir, send,
    try_send, turnstile_bin,
};

const MODEL: &str = "llama";
/// Default profile capped at 5 RPS, batch at 2.
const CAPPED: &str = r#"{"defaultProfile":"default","profiles":{
    "default":{"routingStrategy":"least-request","requestsPerSecond":5},
    "batch":{"routingStrategy":"least-request","requestsPerSecond":2}}}"#;

/// A Redis call timeout roomy enough for a loaded CI machine: these tests
/// check exact counts, which a timeout (falling back per replica) would blur.
const ROOMY_TIMEOUT: [&str; 2] = ["--redis-timeout-ms", "500"];

fn rps_body(limit: u64) -> serde_json::Value {
    serde_json::json!({"error": {"message": format!("model: {MODEL} has exceeded RPS: {limit}"),
        "type": "rate_limit_error", "code": "rate_limit_exceeded", "param": null}})
}

/// Checks one reply is the contract's model-RPS 429, exactly.
fn assert_rps_429(reply: &Reply, limit: u64) {
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert_eq!(reply.header("x-error-model-rps-exceeded"), "true");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.json(), rps_body(limit));
}

/// Sends `count` chat requests at once to each gateway URL in `urls` (round
/// robin) with `headers`, and returns every reply.
async fn burst(urls: &[String], count: usize, headers: &[(&str, &str)]) -> Vec<Reply> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let url = urls[i % urls.len()].clone();
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        tasks.spawn(async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            send(post(&url, &chat_body(MODEL, false), &headers)).await
        });
    }
    let mut replies = Vec::with_capacity(count);
    while let Some(reply) = tasks.join_next().await {
        replies.push(reply.expect("request task"));
    }
    replies
}

fn count_status(replies: &[Reply], status: StatusCode) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

fn chat_url(gw: &Gateway) -> String {
    gw.url("/v1/chat/completions")
}

/// Starts a gateway with extra args and waits until it is ready.
async fn gateway(pods: &[PodSpec], args: &[&str]) -> Gateway {
    Gateway::start(pods, args).await
}

/// The flags that make a gateway count in the Redis at `url`, with [`ROOMY_TIMEOUT`].
fn redis_args(url: &str) -> Vec<&str> {
    let mut args = vec!["--redis-url", url];
    args.extend(ROOMY_TIMEOUT);
    args
}

/// A fresh Redis and one engine of [`MODEL`] named `pod-a`.
fn redis_and_engine() -> (Redis, Engine) {
    (Redis::start(), Engine::start("pod-a", MODEL, &[]))
}

/// A Redis, one engine, and a warmed-up gateway counting in that Redis with the model
/// capped by [`CAPPED`].
async fn capped_on_redis() -> (Redis, Engine, Gateway) {
    let (redis, engine) = redis_and_engine();
    let gw = gateway(&[PodSpec::for_engine(&engine, MODEL).config(CAPPED)], &redis_args(&redis.url())).await;
    warm_up(&gw).await;
    (redis, engine, gw)
}

/// One request before a timed burst: the gateway's Redis connection and
/// scripts are then warm, so the burst measures admission only.
async fn warm_up(gw: &Gateway) {
    let _ = gw.chat(MODEL, &[]).await;
}

/// Sleeps until `offset` into the next wall-clock second.
async fn next_wall_second(offset: Duration) {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    tokio::time::sleep(Duration::from_nanos(1_000_000_000 - u64::from(since.subsec_nanos())) + offset).await;
}

/// Moves past a minute boundary when one is close, so RPM/TPM checks that
/// take a moment stay within one minute window.
async fn away_from_minute_boundary() {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    if since.as_secs() % 60 >= 55 {
        tokio::time::sleep(Duration::from_secs(60 - since.as_secs() % 60) + Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cap_admits_exactly_five_of_twenty_concurrent() {
    let (redis, engine, gw) = capped_on_redis().await;

    let window = redis.next_window(Duration::from_millis(30)).await;
    let replies = burst(&[chat_url(&gw)], 20, &[]).await;
    assert_eq!(count_status(&replies, StatusCode::OK), 5, "statuses: {:?}", replies.iter().map(|r| r.status));
    for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_rps_429(reply, 5);
    }
    let key = format!("aibrix_model:{MODEL}:default:rps:{window}");
    assert_eq!(redis.get_int(&key), Some(5), "refused requests are not counted");
    let redis::Value::Int(ttl_ms) = redis.cmd(&["PTTL", &key]) else { panic!("PTTL") };
    assert!((0..=2000).contains(&ttl_ms), "window key TTL {ttl_ms} ms");
    assert_eq!(engine.requests_total().await, 5 + 1, "429s never reached the engine (plus the warm-up)");

    let metrics = gw.metrics().await;
    let series = |decision: &str| {
        format!(
            r#"aibrix_gateway_ratelimit_decisions_total{{model="{MODEL}",profile="default",limit="rps",decision="{decision}"}}"#
        )
    };
    assert!(metrics.contains(&format!("{} 15", series("limited"))), "{metrics}");
    assert!(metrics.contains("aibrix_gateway_ratelimit_store_latency_seconds_bucket"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_sharing_redis_admit_five_in_total() {
    let (redis, engine) = redis_and_engine();
    let url = redis.url();
    let args = redis_args(&url);
    let pods = [PodSpec::for_engine(&engine, MODEL).config(CAPPED)];
    let (a, b) = tokio::join!(gateway(&pods, &args), gateway(&pods, &args));
    warm_up(&a).await;
    warm_up(&b).await;

    redis.next_window(Duration::from_millis(30)).await;
    let replies = burst(&[chat_url(&a), chat_url(&b)], 20, &[]).await;
    assert_eq!(count_status(&replies, StatusCode::OK), 5, "5 in total across both replicas, not 10");
    assert_eq!(count_status(&replies, StatusCode::TOO_MANY_REQUESTS), 15);
}

/// Production Redis: TLS on a private CA and an ACL user whose password comes
/// from the environment (a Secret in the manifests), not the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_over_tls_with_a_password_admit_five_in_total() {
    let redis = Redis::start_tls();
    let tls = redis.tls().expect("TLS side");
    let engine = Engine::start("pod-a", MODEL, &[]);
    let url = redis.tls_url();
    let ca = tls.ca_file.to_string_lossy().into_owned();
    let mut args = redis_args(&url);
    args.extend(["--redis-ca-file", &ca]);
    let env = [("REDIS_USERNAME", tls.username.as_str()), ("REDIS_PASSWORD", tls.password.as_str())];
    let pods = [PodSpec::for_engine(&engine, MODEL).config(CAPPED)];
    let (a, b) = (Gateway::spawn(&pods, &args, &env), Gateway::spawn(&pods, &args, &env));
    tokio::join!(a.wait_ready(), b.wait_ready());
    warm_up(&a).await;
    warm_up(&b).await;

    let window = redis.next_window(Duration::from_millis(30)).await;
    let replies = burst(&[chat_url(&a), chat_url(&b)], 20, &[]).await;
    assert_eq!(count_status(&replies, StatusCode::OK), 5, "5 in total across both replicas, counted in Redis");
    assert_eq!(count_status(&replies, StatusCode::TOO_MANY_REQUESTS), 15);
    let key = format!("aibrix_model:{MODEL}:default:rps:{window}");
    assert_eq!(redis.get_int(&key), Some(5), "the counter lives in the TLS Redis");

    // Without the CA the server's certificate is not trusted: the gateway
    // says so and, failing open (the default), admits what it cannot count.
    let untrusted = Gateway::start(&pods, &redis_args(&url)).await;
    let _ = untrusted.chat(MODEL, &[]).await;
    let log_file = untrusted.log_file.clone();
    eventually(Duration::from_secs(5), "a log line about the untrusted certificate", || {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        async move { log.to_lowercase().contains("certificate") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admitted_request_without_ready_pod_gives_its_quota_back() {
    let (redis, engine) = redis_and_engine();
    let url = redis.url();
    let args = redis_args(&url);
    let not_ready = PodSpec::for_engine(&engine, MODEL).config(CAPPED).ready(false);
    let gw = gateway(std::slice::from_ref(&not_ready), &args).await;
    warm_up(&gw).await;

    // Ten in one window against a cap of 5: without rollback five would get 429.
    let window = redis.next_window(Duration::from_millis(30)).await;
    for i in 0..10 {
        let reply = gw.chat(MODEL, &[]).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "request {i}: {}", reply.text());
        assert_eq!(reply.json()["error"]["message"], format!("no ready pods for model {MODEL}"));
    }
    let key = format!("aibrix_model:{MODEL}:default:rps:{window}");
    assert_eq!(redis.get_int(&key).unwrap_or(0), 0, "every increment rolled back");

    gw.write_pods(&[not_ready.ready(true)]);
    eventually(Duration::from_secs(5), "pod routable", || async { gw.chat(MODEL, &[]).await.status == StatusCode::OK })
        .await;
    redis.next_window(Duration::from_millis(30)).await;
    let statuses: Vec<StatusCode> = sequential(&gw, 8).await.into_iter().map(|r| r.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 5, "{statuses:?}");
}

/// `count` requests one after the other.
async fn sequential(gw: &Gateway, count: usize) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        replies.push(gw.chat(MODEL, &[]).await);
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_and_default_profiles_keep_separate_counters() {
    let (redis, _engine, gw) = capped_on_redis().await;

    let window = redis.next_window(Duration::from_millis(30)).await;
    let urls = [chat_url(&gw)];
    let (default, batch) = tokio::join!(burst(&urls, 10, &[]), burst(&urls, 10, &[("config-profile", "batch")]));
    assert_eq!(count_status(&default, StatusCode::OK), 5);
    assert_eq!(count_status(&batch, StatusCode::OK), 2);
    for reply in batch.iter().filter(|r| r.status != StatusCode::OK) {
        assert_rps_429(reply, 2);
    }
    assert_eq!(redis.get_int(&format!("aibrix_model:{MODEL}:default:rps:{window}")), Some(5));
    assert_eq!(redis.get_int(&format!("aibrix_model:{MODEL}:batch:rps:{window}")), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_the_in_process_limiter_enforces_the_cap() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let gw = gateway(&[PodSpec::for_engine(&engine, MODEL).config(CAPPED)], &[]).await;
    warm_up(&gw).await;

    next_wall_second(Duration::from_millis(30)).await;
    let replies = burst(&[chat_url(&gw)], 20, &[]).await;
    assert_eq!(count_status(&replies, StatusCode::OK), 5);
    for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_rps_429(reply, 5);
    }
}

/// What one client request under load saw: status, latency, and the
/// `x-error-ratelimit-unavailable` header (or the transport error).
type Seen = (StatusCode, Duration, String);

/// Steady load from a few clients until [`Load::finish`].
struct Load {
    tasks: tokio::task::JoinSet<Vec<Seen>>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(url: &str, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (url, stop) = (url.to_owned(), Arc::clone(&stop));
            tasks.spawn(async move {
                let mut seen = Vec::new();
                // Bounded: at most 3000 requests per worker.
                for _ in 0..3000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let started = Instant::now();
                    let reply = try_send(post(&url, &chat_body(MODEL, false), &[])).await;
                    let (status, text) = match reply {
                        Ok(r) => (r.status, r.header("x-error-ratelimit-unavailable").to_owned()),
                        // Transport failures show up as 418 so the 5xx checks see them.
                        Err(e) => (StatusCode::IM_A_TEAPOT, e),
                    };
                    seen.push((status, started.elapsed(), text));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            });
        }
        Self { tasks, stop }
    }

    async fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        while let Some(seen) = self.tasks.join_next().await {
            all.extend(seen.expect("load task"));
        }
        all
    }
}

/// What [`redis_outage`] observed; the gateway and its engine stay up.
struct Outage {
    /// Requests sent while Redis was dead.
    during: Vec<Seen>,
    /// From Redis restart to the gateway counting in it again.
    recovered: Duration,
    gw: Gateway,
    _engine: Engine,
    _redis: Redis,
}

/// Kills Redis under load, brings it back, and reports what the clients saw
/// during the outage and how long the gateway took to use Redis again.
async fn redis_outage(failure_mode: &str) -> Outage {
    let mut redis = Redis::start();
    let engine = Engine::start("pod-a", MODEL, &[]);
    let url = redis.url();
    // A cap high enough never to limit: every request checks Redis.
    let config = r#"{"profiles":{"default":{"routingStrategy":"least-request","requestsPerSecond":100000}}}"#;
    let gw = gateway(
        &[PodSpec::for_engine(&engine, MODEL).config(config)],
        &["--redis-url", &url, "--ratelimit-failure-mode", failure_mode, "--redis-timeout-ms", "250"],
    )
    .await;
    let before = Load::start(&chat_url(&gw), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let healthy = before.finish().await;
    assert!(healthy.iter().all(|(s, _, _)| *s == StatusCode::OK), "healthy Redis: all 200");

    let load = Load::start(&chat_url(&gw), 4);
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = load.finish().await;

    redis.restart();
    let back = Instant::now();
    let load = Load::start(&chat_url(&gw), 2);
    // The restarted Redis is empty: a window key shows the gateway counts there again.
    let recovered = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let redis::Value::Array(keys) = redis.cmd(&["KEYS", "aibrix_model:*"]) else { panic!("KEYS") };
            if !keys.is_empty() {
                return back.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("gateway went back to Redis within 5 s");
    eprintln!("{failure_mode}: {} requests during the outage; back on Redis {recovered:?} after restart", during.len());
    let _ = load.finish().await;
    Outage { during, recovered, gw, _engine: engine, _redis: redis }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_redis_fails_open_without_5xx_and_recovers_within_2s() {
    let Outage { during, recovered, gw, .. } = redis_outage("open").await;
    assert!(during.len() > 20, "load kept running during the outage: {}", during.len());
    let server_errors: Vec<_> = during.iter().filter(|(s, _, _)| s.is_server_error() || s.as_u16() == 418).collect();
    assert!(server_errors.is_empty(), "fail-open: no 5xx, got {server_errors:?}");
    let slowest = during.iter().map(|(_, d, _)| *d).max().unwrap_or_default();
    assert!(slowest < Duration::from_millis(750), "a dead Redis must not stall requests: {slowest:?}");
    assert!(recovered < Duration::from_secs(2), "back on Redis after {recovered:?}");
    let metrics = gw.metrics().await;
    assert!(metrics.contains(r#"limit="rps",decision="store_error_allowed"}"#), "{metrics}");
    assert!(metrics.contains(r#"kind="circuit_open"}"#), "breaker spared Redis calls:\n{metrics}");
    assert!(metrics.contains("aibrix_gateway_ratelimit_breaker_state 0"), "closed again:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_redis_fails_closed_with_503_and_recovers_within_2s() {
    let outage = redis_outage("closed").await;
    let Outage { during, recovered, gw, .. } = &outage;
    let (recovered, gw) = (*recovered, gw);
    let unavailable: Vec<_> = during.iter().filter(|(s, _, _)| *s == StatusCode::SERVICE_UNAVAILABLE).collect();
    assert!(unavailable.len() > 10, "closed mode answers 503 while Redis is down: {during:?}");
    assert!(unavailable.iter().all(|(_, _, header)| header == "true"), "x-error-ratelimit-unavailable set");
    assert!(
        during.iter().all(|(s, _, _)| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE),
        "only 200 (before the kill was seen) or 503: {during:?}"
    );
    assert!(recovered < Duration::from_secs(2), "back on Redis after {recovered:?}");
    let reply = gw.chat(MODEL, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "serving again: {}", reply.text());
    assert!(gw.metrics().await.contains(r#"limit="rps",decision="store_error_denied"}"#));
}

/// Runs `turnstile users ARGS...` and returns its stdout.
fn users_cli(args: &[&str]) -> String {
    let output = Command::new(turnstile_bin()).arg("users").args(args).output().expect("run turnstile users");
    assert!(output.status.success(), "turnstile users {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_over_tpm_after_a_streamed_answer_is_refused() {
    let redis = Redis::start();
    let url = redis.url();
    let set = users_cli(&["set", "alice", "--tpm", "10", "--redis-url", &url]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&set).expect("json"),
        serde_json::json!({"name":"alice","tpm":10})
    );
    users_cli(&["--redis-url", &url, "set", "alice", "--rpm", "100"]);
    let shown = users_cli(&["--redis-url", &url, "show", "alice"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&shown).expect("json"),
        serde_json::json!({"name":"alice","rpm":100,"tpm":10}),
        "set keeps the fields it was not given"
    );
    users_cli(&["--redis-url", &url, "set", "bob", "--rpm", "1"]);
    let listed = users_cli(&["--redis-url", &url, "list"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");

    let engine = Engine::start("pod-a", MODEL, &["--tokens", "20"]);
    let args = redis_args(&url);
    let gw = gateway(&[PodSpec::for_engine(&engine, MODEL)], &args).await;
    away_from_minute_boundary().await;

    let response = open_stream(post(&chat_url(&gw), &chat_body(MODEL, true), &[("user", "alice")])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    while let Some(chunk) = next_data(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("stream intact")));
    }
    assert!(text.contains("\"usage\""), "final usage chunk: {text}");

    // The very next request: the tokens were charged before the stream ended.
    let reply = gw.chat(MODEL, &[("user", "alice")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert_eq!(reply.header("x-error-tpm-exceeded"), "true");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(
        reply.json(),
        serde_json::json!({"error": {"message": "user: alice has exceeded TPM: 10", "type": "rate_limit_error",
            "code": "rate_limit_exceeded", "param": null}})
    );
    let bin = redis.time().0 / 60 % 64;
    let charged = redis.get_int(&format!("aibrix:alice_TPM_CURRENT:{bin}")).expect("TPM counter");
    assert!(charged > 20, "prompt + 20 completion tokens charged: {charged}");

    // bob: RPM 1 from his Redis record.
    assert_eq!(gw.chat(MODEL, &[("user", "bob")]).await.status, StatusCode::OK);
    let reply = gw.chat(MODEL, &[("user", "bob")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-error-rpm-exceeded"), "true");
    assert_eq!(reply.json()["error"]["message"], "user: bob has exceeded RPM: 1");
    assert_eq!(gw.chat(MODEL, &[("user", "carol")]).await.status, StatusCode::OK, "unknown user: no default limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_file_and_default_limits_without_redis() {
    let dir = scratch_dir("users");
    let users_file = dir.join("users.yaml");
    std::fs::write(&users_file, "- name: bob\n  rpm: 2\n").expect("write users file");
    let engine = Engine::start("pod-a", MODEL, &[]);
    let users_path = users_file.display().to_string();
    let gw = gateway(&[PodSpec::for_engine(&engine, MODEL)], &["--users-file", &users_path, "--default-user-rpm", "1"])
        .await;
    away_from_minute_boundary().await;

    for _ in 0..2 {
        assert_eq!(gw.chat(MODEL, &[("user", "bob")]).await.status, StatusCode::OK);
    }
    let reply = gw.chat(MODEL, &[("user", "bob")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"]["message"], "user: bob has exceeded RPM: 2");

    assert_eq!(gw.chat(MODEL, &[("user", "carol")]).await.status, StatusCode::OK);
    let reply = gw.chat(MODEL, &[("user", "carol")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "unknown user gets the default");
    assert_eq!(reply.json()["error"]["message"], "user: carol has exceeded RPM: 1");
    assert_eq!(gw.chat(MODEL, &[]).await.status, StatusCode::OK, "no user header: no user limit");
    let metrics = gw.metrics().await;
    assert!(metrics.contains(r#"limit="rpm",decision="limited"} 2"#), "{metrics}");
    assert!(!metrics.contains("carol") && !metrics.contains("bob"), "user ids never become labels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_guards_the_proxy() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let gw = Gateway::spawn(&[PodSpec::for_engine(&engine, MODEL)], &[], &[("AIBRIX_AUTH_BEARER_TOKEN", "s3cret")]);
    gw.wait_ready().await;

    let expected = serde_json::json!({"error": {"message": "Incorrect API key provided",
        "type": "authentication_error", "code": "invalid_api_key", "param": "api_key"}});
    for headers in [vec![], vec![("authorization", "Bearer wrong")], vec![("authorization", "Basic s3cret")]] {
        let reply = gw.chat(MODEL, &headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(reply.header("content-type"), "application/json");
        assert_eq!(reply.json(), expected);
    }
    let reply = send(post(&chat_url(&gw), "not json", &[])).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "auth before body parsing");
    let reply = gw.chat(MODEL, &[("authorization", "Bearer s3cret")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(engine.requests_total().await, 1, "refused requests never reached the engine");
}

// `--user-limits aibrix`: AIBrix's per-user rules, exactly (README, "Per-user
// rules"). Records are written straight into Redis, as AIBrix's metadata
// service writes them.

/// A gateway applying AIBrix's user rules, counting in `redis`.
async fn aibrix_rules_gateway(redis: &Redis, engine: &Engine) -> Gateway {
    let url = redis.url();
    let mut args = redis_args(&url);
    args.extend(["--user-limits", "aibrix"]);
    gateway(&[PodSpec::for_engine(engine, MODEL)], &args).await
}

/// Stores `record` as the user's AIBrix record.
fn set_record(redis: &Redis, user: &str, record: &str) {
    redis.cmd(&["SET", &format!("aibrix-users/{user}"), record]);
}

/// The user's counter (`RPM` or `TPM`) in the current minute bin.
fn counter(redis: &Redis, user: &str, which: &str) -> Option<i64> {
    let bin = redis.time().0 / 60 % 64;
    redis.get_int(&format!("aibrix:{user}_{which}_CURRENT:{bin}"))
}

/// Sets the user's counter in the current minute bin.
fn set_counter(redis: &Redis, user: &str, which: &str, value: u64) {
    let bin = redis.time().0 / 60 % 64;
    redis.cmd(&["SET", &format!("aibrix:{user}_{which}_CURRENT:{bin}"), &value.to_string(), "EX", "60"]);
}

/// A streamed chat, with `stream_options` as given (`None`: absent).
fn stream_chat_body(stream_options: Option<serde_json::Value>) -> String {
    let mut body = serde_json::json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    if let Some(options) = stream_options {
        body["stream_options"] = options;
    }
    body.to_string()
}

/// Reads a streamed answer to its end.
async fn read_stream(gw: &Gateway, path: &str, body: &str, user: &str) -> (StatusCode, String) {
    let response = open_stream(post(&gw.url(path), body, &[("user", user)])).await;
    let status = response.status();
    let mut body = response.into_body();
    let mut text = String::new();
    while let Some(chunk) = next_data(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("stream intact")));
    }
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aibrix_rules_refuse_a_user_without_a_record_with_500() {
    let (redis, engine) = redis_and_engine();
    let gw = aibrix_rules_gateway(&redis, &engine).await;

    let reply = gw.chat(MODEL, &[("user", "mallory")]).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", reply.text());
    assert_eq!(reply.header("x-error-user"), "true");
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(
        reply.json(),
        serde_json::json!({"error": {"message": "redis: nil", "type": "api_error", "code": null, "param": null}})
    );
    set_record(&redis, "broken", "not json");
    let reply = gw.chat(MODEL, &[("user", "broken")]).await;
    assert_eq!((reply.status, reply.header("x-error-user")), (StatusCode::INTERNAL_SERVER_ERROR, "true"));
    assert_eq!(engine.requests_total().await, 0, "refused users never reach the engine");

    set_record(&redis, "mallory", r#"{"name":"mallory","rpm":5,"tpm":0}"#);
    assert_eq!(gw.chat(MODEL, &[("user", "mallory")]).await.status, StatusCode::OK, "a record lets the user in");
    assert_eq!(gw.chat(MODEL, &[]).await.status, StatusCode::OK, "no user header: no user check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aibrix_rules_default_rpm_100_and_tpm_rpm_times_1000() {
    let (redis, engine) = redis_and_engine();
    let gw = aibrix_rules_gateway(&redis, &engine).await;
    set_record(&redis, "zero", r#"{"name":"zero","rpm":0,"tpm":0}"#);
    set_record(&redis, "two", r#"{"name":"two","rpm":2}"#);
    away_from_minute_boundary().await;

    // rpm 0 is 100: the 100th request of the minute passes, the 101st is refused.
    set_counter(&redis, "zero", "RPM", 99);
    let reply = gw.chat(MODEL, &[("user", "zero")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-ratelimit-limit-requests"), "100");
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), "100000", "tpm 0 is rpm x 1000");
    let reply = gw.chat(MODEL, &[("user", "zero")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-error-rpm-exceeded"), "true");
    assert_eq!(
        reply.json(),
        serde_json::json!({"error": {"message": "user: zero has exceeded RPM: 100", "type": "rate_limit_error",
            "code": "rate_limit_exceeded", "param": null}})
    );

    // tpm absent is rpm x 1000 = 2000; a TPM refusal still counts against RPM.
    set_counter(&redis, "two", "TPM", 2000);
    let reply = gw.chat(MODEL, &[("user", "two")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("x-error-tpm-exceeded"), "true");
    assert_eq!(reply.json()["error"]["message"], "user: two has exceeded TPM: 2000");
    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(counter(&redis, "two", "RPM"), Some(1), "counted before the TPM check, as AIBrix does");
    assert_eq!(engine.requests_total().await, 1, "only the admitted request reached the engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aibrix_rules_require_include_usage_on_chat_streams_of_users_whose_record_sets_a_tpm() {
    let (redis, engine) = redis_and_engine();
    let gw = aibrix_rules_gateway(&redis, &engine).await;
    set_record(&redis, "metered", r#"{"name":"metered","rpm":10,"tpm":5000}"#);
    set_record(&redis, "plain", r#"{"name":"plain","rpm":10}"#);
    away_from_minute_boundary().await;

    for options in [None, Some(serde_json::json!({})), Some(serde_json::json!({"include_usage": false}))] {
        let body = stream_chat_body(options.clone());
        let reply = send(post(&chat_url(&gw), &body, &[("user", "metered")])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{options:?}: {}", reply.text());
        assert_eq!(reply.header("x-error-no-stream-options-include-usage"), "include usage for stream options not set");
        assert_eq!(
            reply.json(),
            serde_json::json!({"error": {"message": "include usage for stream options not set",
                "type": "invalid_request_error", "code": null, "param": "stream_options"}})
        );
    }
    assert_eq!(engine.requests_total().await, 0);
    assert_eq!(counter(&redis, "metered", "RPM"), Some(3), "each 400 counted against RPM, as in AIBrix");

    let asked = stream_chat_body(Some(serde_json::json!({"include_usage": true})));
    let (status, text) = read_stream(&gw, "/v1/chat/completions", &asked, "metered").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("\"usage\""), "{text}");
    let completion = serde_json::json!({"model": MODEL, "prompt": "hi", "stream": true}).to_string();
    let (status, _) = read_stream(&gw, "/v1/completions", &completion, "metered").await;
    assert_eq!(status, StatusCode::OK, "the rule is AIBrix's, for chat completions only");

    // A TPM from the default (rpm x 1000) does not require usage, and a
    // stream that did not ask for usage bills none: AIBrix sees none pass.
    let (status, text) = read_stream(&gw, "/v1/chat/completions", &stream_chat_body(None), "plain").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!text.contains("\"usage\""), "the client did not ask for usage: {text}");
    assert_eq!(counter(&redis, "plain", "TPM"), None, "nothing billed");
    assert_eq!(gw.chat(MODEL, &[("user", "plain")]).await.status, StatusCode::OK);
    eventually(Duration::from_secs(2), "a non-stream answer billed to TPM", || {
        let billed = counter(&redis, "plain", "TPM");
        async move { billed.is_some_and(|tokens| tokens > 0) }
    })
    .await;
}

/// Without Redis the same rules apply to the users file, per replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aibrix_rules_without_redis_apply_to_the_users_file() {
    let dir = scratch_dir("aibrix-users");
    let users_file = dir.join("users.json");
    std::fs::write(&users_file, r#"[{"name":"bob","rpm":1},{"name":"tess","rpm":5,"tpm":100}]"#).expect("write");
    let engine = Engine::start("pod-a", MODEL, &[]);
    let users_path = users_file.display().to_string();
    let pods = [PodSpec::for_engine(&engine, MODEL)];
    let gw = gateway(&pods, &["--users-file", &users_path, "--user-limits", "aibrix"]).await;
    away_from_minute_boundary().await;

    let reply = gw.chat(MODEL, &[("user", "carol")]).await;
    assert_eq!((reply.status, reply.header("x-error-user")), (StatusCode::INTERNAL_SERVER_ERROR, "true"));
    assert_eq!(reply.json()["error"]["message"], "redis: nil", "the same wire as with Redis");
    assert_eq!(gw.chat(MODEL, &[("user", "bob")]).await.status, StatusCode::OK);
    let reply = gw.chat(MODEL, &[("user", "bob")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"]["message"], "user: bob has exceeded RPM: 1");
    let reply = send(post(&chat_url(&gw), &stream_chat_body(None), &[("user", "tess")])).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "the file's record sets a tpm: {}", reply.text());
    assert_eq!(reply.header("x-error-no-stream-options-include-usage"), "include usage for stream options not set");
}

/// The default rules serve what AIBrix's refuse, as before the switch existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_rules_serve_what_aibrix_rules_refuse() {
    let help = Command::new(turnstile_bin()).args(["serve", "--help"]).output().expect("turnstile serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--user-limits <USER_LIMITS>"), "{help}");
    assert!(help.contains("[default: turnstile]"), "{help}");

    let (redis, engine) = redis_and_engine();
    let url = redis.url();
    let gw = gateway(&[PodSpec::for_engine(&engine, MODEL)], &redis_args(&url)).await;
    set_record(&redis, "metered", r#"{"name":"metered","rpm":10,"tpm":5000}"#);
    set_record(&redis, "zero", r#"{"name":"zero","rpm":0,"tpm":0}"#);
    away_from_minute_boundary().await;

    let reply = gw.chat(MODEL, &[("user", "mallory")]).await;
    assert_eq!(reply.status, StatusCode::OK, "no record: no limit");
    let reply = gw.chat(MODEL, &[("user", "zero")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-ratelimit-limit-requests"), "", "0 is no limit, not 100");
    let (status, text) = read_stream(&gw, "/v1/chat/completions", &stream_chat_body(None), "metered").await;
    assert_eq!(status, StatusCode::OK, "served without include_usage");
    assert!(!text.contains("\"usage\""), "{text}");
    eventually(Duration::from_secs(2), "the stream's tokens billed to TPM", || {
        let billed = counter(&redis, "metered", "TPM");
        async move { billed.is_some_and(|tokens| tokens > 0) }
    })
    .await;
}
