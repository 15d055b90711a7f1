//! Rate limits clients can act on, and penalties only for floods, against the
//! real binary with its default penalty flags (userspace-only: the kernel
//! variant of the flood is in kernel.rs):
//! - a client sending 100 requests/s into a full cap for 10 s gets only 200s
//!   and 429s, every 429 with `Retry-After` and `x-ratelimit-*`;
//! - the official `openai` SDK (8 workers, default retries) against a 1-RPS
//!   model sees only `RateLimitError`, waits as `Retry-After` says, and
//!   another model from the same address is unaffected;
//! - a flood of well over 1,000 requests/s is refused within 1 s of crossing
//!   the threshold, with one log line and a metric naming the reason;
//! - `--penalty-exempt-cidrs` are never refused;
//! - clients behind `--trusted-proxy-cidrs` are answered 429, the proxy's
//!   connection stays open and its other clients are served;
//! - the quota headers of users on success and on RPM/TPM refusals (Redis);
//! - a stream without `include_usage` reaches the client exactly as the
//!   engine would send it, while the user's TPM counter grows by its tokens;
//! - a gateway that has not loaded its pods answers a retryable 503.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use turnstile_tests::harness::{
    Discovery, Engine, Gateway, PodSpec, Redis, Reply, eventually, get, next_data, open_stream, openai_python, post,
    send, try_send,
};
use turnstile_tests::load::{self, Event, Outcome, Target, sample};

const CAPPED: &str = "capped";
const FREE: &str = "free";

/// `requestsPerSecond` on the capped model's default profile.
fn capped_config(rps: u64) -> String {
    format!(
        r#"{{"defaultProfile":"default","profiles":{{"default":{{"routingStrategy":"least-request","requestsPerSecond":{rps}}}}}}}"#
    )
}

/// One engine serving both models.
fn engine() -> Engine {
    Engine::start("pod-a", CAPPED, &["--model", FREE])
}

/// The engine's pods for both models; the capped one at `rps`.
fn pods(engine: &Engine, rps: u64) -> Vec<PodSpec> {
    vec![PodSpec::for_engine(engine, CAPPED).config(&capped_config(rps)), PodSpec::for_engine(engine, FREE)]
}

fn chat(model: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).to_string()
}

fn target(from: IpAddr, gw: &Gateway, model: &str, headers: &[(&str, &str)]) -> Target {
    Target {
        from,
        to: gw.proxy,
        path: "/v1/chat/completions".into(),
        body: chat(model),
        headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    }
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Statuses and failures of a load, counted.
fn tally(events: &[Event]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for event in events {
        let key = match &event.outcome {
            Outcome::Answer { status, .. } => status.to_string(),
            Outcome::Refused(_) => "refused".to_owned(),
            Outcome::Broken(_) => "broken".to_owned(),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// The default threshold of `--penalty-threshold` (429s per second).
const DEFAULT_THRESHOLD: usize = 300;

/// A penalty that outlasts every check a test makes after its flood.
const LONG_PENALTY: [&str; 2] = ["--penalty-seconds", "120"];

fn decisions(metrics: &str, reason: &str) -> f64 {
    sample(metrics, "aibrix_gateway_penalty_decisions_total", &[("reason", reason)]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_100_a_second_into_a_full_cap_only_ever_sees_200_and_429() {
    let engine = engine();
    let gw = Gateway::start(&pods(&engine, 5), &[]).await;

    let events = load::steady(target(loopback(1), &gw, CAPPED, &[]), 100, Duration::from_secs(10)).await;
    let counts = tally(&events);
    assert!(events.len() >= 800, "about 1,000 requests in 10 s: {counts:?}");
    assert_eq!(counts.keys().map(String::as_str).collect::<Vec<_>>(), ["200", "429"], "{counts:?}");
    assert!((40..=60).contains(&counts["200"]), "5 a second admitted: {counts:?}");

    // The same address is still served for another model, at once.
    let reply = gw.chat(FREE, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let metrics = gw.metrics().await;
    assert_eq!(decisions(&metrics, "flood"), 0.0, "{metrics}");
    assert!(!gw.log().contains("client penalised"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_429_says_when_to_come_back_in_headers_sdks_read() {
    let engine = engine();
    let gw = Gateway::start(&pods(&engine, 2), &[]).await;
    let mut refused = None;
    for _ in 0..10 {
        let reply = gw.chat(CAPPED, &[]).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(reply);
            break;
        }
    }
    let reply = refused.expect("a 429 within 10 requests at 2 RPS");
    assert_eq!(reply.header("retry-after"), "1", "the 1 s window resets within a second");
    assert_eq!(reply.header("x-ratelimit-limit-requests"), "2");
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), "0");
    let reset = reply.header("x-ratelimit-reset-requests");
    let ms: u64 = reset.strip_suffix("ms").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("reset {reset:?}"));
    assert!((1..=1000).contains(&ms), "{reset}");
    assert_eq!(reply.header("x-error-model-rps-exceeded"), "true");
    assert_eq!(
        reply.json(),
        serde_json::json!({"error": {"message": "model: capped has exceeded RPS: 2", "type": "rate_limit_error",
            "code": "rate_limit_exceeded", "param": null}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_workers_see_only_rate_limit_errors_and_wait_as_told() {
    let engine = engine();
    let gw = Gateway::start(&pods(&engine, 1), &[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_rate_limits.py");
    let base_url = gw.url("/v1");
    let python = openai_python();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python).arg(script).args([base_url.as_str(), CAPPED, FREE, "8"]).output().expect("run python")
    })
    .await
    .expect("python task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));

    let outcomes = summary["outcomes"].as_object().expect("outcomes");
    let kinds: Vec<&str> = outcomes.keys().map(String::as_str).collect();
    assert!(kinds.iter().all(|k| ["ok", "RateLimitError"].contains(k)), "only successes and 429s: {summary}");
    assert!(outcomes["ok"].as_u64().unwrap_or(0) >= 4, "about one a second got through: {summary}");
    assert!(outcomes.get("RateLimitError").is_some(), "eight workers at 1 RPS must be refused: {summary}");
    assert_eq!(summary["free"].as_object().expect("free").keys().collect::<Vec<_>>(), ["ok"], "{summary}");

    // The SDK retried after the Retry-After it was given (1 s), not its own
    // default backoff (0.375-0.5 s for the first retry).
    let gaps: Vec<f64> = summary["retry_gaps"].as_array().expect("gaps").iter().filter_map(|g| g.as_f64()).collect();
    assert!(!gaps.is_empty(), "{summary}");
    assert!(gaps.iter().all(|gap| *gap >= 0.9), "every retry waited Retry-After: {gaps:?}");
    let retry_after = summary["retry_after"].as_array().expect("retry_after");
    assert!(retry_after.iter().all(|v| v == "1"), "{summary}");
    assert_eq!(decisions(&gw.metrics().await, "flood"), 0.0);
}

/// One flood at a time: two at once on a 2-core runner would each fall
/// short of a flood's rate.
static ONE_FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Floods from `from` for up to 3 s and returns what came back.
async fn flood(gw: &Gateway, from: IpAddr, headers: &[(&str, &str)]) -> Vec<Event> {
    let _alone = ONE_FLOOD.lock().await;
    load::flood(target(from, gw, CAPPED, headers), 16, Duration::from_secs(3), 30_000).await
}

/// Requests per second the flood achieved before anything was refused.
fn rate_before_refusal(events: &[Event]) -> f64 {
    let end = load::first_failure(events).map_or_else(|| events.last().map(|e| e.at), |e| Some(e.at));
    let (Some(start), Some(end)) = (events.first().map(|e| e.at), end) else { return 0.0 };
    let span = end.duration_since(start).unwrap_or_default().as_secs_f64().max(0.001);
    events.iter().filter(|e| e.at <= end).count() as f64 / span
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_refused_within_a_second_of_crossing_the_threshold() {
    let engine = engine();
    // The default rule (threshold, window); a longer penalty so that the checks after the
    // flood never race its end on a slow runner.
    let gw = Gateway::start(&pods(&engine, 5), &LONG_PENALTY).await;
    let flooder = loopback(2);

    let events = flood(&gw, flooder, &[]).await;
    let counts = tally(&events);
    let rate = rate_before_refusal(&events);
    assert!(rate >= 1000.0, "the flood reached {rate:.0} requests/s: {counts:?}");
    let crossed = load::threshold_crossed(&events, DEFAULT_THRESHOLD).expect("threshold crossed");
    let refused = load::first_failure(&events).unwrap_or_else(|| panic!("never refused: {counts:?}"));
    let after = refused.at.duration_since(crossed).unwrap_or_default();
    assert!(after <= Duration::from_secs(1), "refused {after:?} after crossing: {counts:?}");
    // The rule's promise: no refusal before the client had been told 429 that many times in a
    // second (less the answers still on their way over the flood's 16 connections).
    let told = load::rate_limited_before(&events, refused.at);
    assert!(told + 16 >= DEFAULT_THRESHOLD, "refused after only {told} 429s within a second: {counts:?}");

    // Another address is served meanwhile; the flooder stays refused.
    let bystander = load::steady(target(loopback(3), &gw, FREE, &[]), 10, Duration::from_millis(500)).await;
    assert_eq!(tally(&bystander).keys().collect::<Vec<_>>(), ["200"], "{:?}", tally(&bystander));
    let again = load::steady(target(flooder, &gw, FREE, &[]), 10, Duration::from_millis(300)).await;
    assert!(again.iter().all(|e| matches!(e.outcome, Outcome::Refused(_) | Outcome::Broken(_))), "{again:?}");

    let metrics = gw.metrics().await;
    assert!(decisions(&metrics, "flood") >= 1.0, "{metrics}");
    let log = gw.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("client penalised")).collect();
    assert_eq!(lines.len(), 1, "one line for the decision: {lines:?}");
    assert!(lines[0].contains("reason") && lines[0].contains("flood") && lines[0].contains("127.0.0.2"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exempt_network_is_never_penalised() {
    let engine = engine();
    let gw = Gateway::start(&pods(&engine, 5), &["--penalty-exempt-cidrs", "127.0.0.4/32,10.0.0.0/8"]).await;
    let events = flood(&gw, loopback(4), &[]).await;
    let counts = tally(&events);
    assert_eq!(counts.keys().map(String::as_str).collect::<Vec<_>>(), ["200", "429"], "{counts:?}");
    assert!(load::threshold_crossed(&events, DEFAULT_THRESHOLD).is_some(), "it did flood: {counts:?}");
    let metrics = gw.metrics().await;
    assert!(decisions(&metrics, "exempt") >= 1.0, "{metrics}");
    assert_eq!(decisions(&metrics, "flood"), 0.0, "{metrics}");
    assert!(gw.log().lines().any(|l| l.contains("exempt") && l.contains("not penalised")), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_a_trusted_proxy_get_429s_and_the_proxy_keeps_its_connections() {
    let engine = engine();
    let proxy = loopback(5);
    let gw =
        Gateway::start(&pods(&engine, 5), &["--trusted-proxy-cidrs", "127.0.0.5", LONG_PENALTY[0], LONG_PENALTY[1]])
            .await;
    // The ingress adds the client to what the client sent (a forged hop).
    let flooder = [("x-forwarded-for", "198.51.100.1, 203.0.113.9")];
    let events = flood(&gw, proxy, &flooder).await;
    let counts = tally(&events);
    assert_eq!(counts.keys().map(String::as_str).collect::<Vec<_>>(), ["200", "429"], "never a reset: {counts:?}");
    let crossed = load::threshold_crossed(&events, DEFAULT_THRESHOLD).expect("threshold crossed");
    let penalised = |e: &&Event| match &e.outcome {
        Outcome::Answer { status: 429, body, close } => {
            assert!(!close, "the proxy's connection is never closed");
            body.contains("client 203.0.113.9 is refused")
        }
        _ => false,
    };
    let first = events.iter().find(penalised).expect("the forwarded client was penalised");
    assert!(first.at.duration_since(crossed).unwrap_or_default() <= Duration::from_secs(1));

    // Through the same proxy address, another client is served, and the
    // flooder is refused for every model.
    let other =
        load::steady(target(proxy, &gw, FREE, &[("x-forwarded-for", "203.0.113.10")]), 10, Duration::from_millis(300))
            .await;
    assert_eq!(tally(&other).keys().collect::<Vec<_>>(), ["200"], "{:?}", tally(&other));
    let reply = send(post(&gw.url("/v1/chat/completions"), &chat(FREE), &[("x-forwarded-for", "203.0.113.9")])).await;
    // This request comes from 127.0.0.1, which is no trusted proxy: its header is ignored.
    assert_eq!(reply.status, StatusCode::OK, "an untrusted peer's X-Forwarded-For names nobody");
    let blocked = load::steady(target(proxy, &gw, FREE, &flooder), 10, Duration::from_millis(300)).await;
    assert!(blocked.iter().all(|e| e.status() == Some(429)), "{:?}", tally(&blocked));

    let metrics = gw.metrics().await;
    assert!(decisions(&metrics, "flood_behind_proxy") >= 1.0, "{metrics}");
    assert_eq!(decisions(&metrics, "flood"), 0.0, "the proxy itself is never penalised");
    let log = gw.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("client penalised")).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("flood_behind_proxy") && lines[0].contains("203.0.113.9"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_behind_proxy_penalty_reaches_another_replica_and_never_closes_its_connections() {
    let redis = Redis::start();
    let engine = engine();
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--trusted-proxy-cidrs", "127.0.0.6", LONG_PENALTY[0], LONG_PENALTY[1]];
    let (a, b) = (Gateway::start(&pods(&engine, 5), &args).await, Gateway::start(&pods(&engine, 5), &args).await);
    eventually(Duration::from_secs(5), "B subscribed to penalties", || async {
        b.log().contains("penalty sync with Redis established")
    })
    .await;
    let proxy = loopback(6);
    let flooder = [("x-forwarded-for", "203.0.113.7")];
    flood(&a, proxy, &flooder).await;
    assert!(decisions(&a.metrics().await, "flood_behind_proxy") >= 1.0);

    // B never decided anything, yet answers the forwarded client 429 on a
    // connection it keeps open, and serves the proxy's other clients.
    let at_b = load::steady(target(proxy, &b, FREE, &flooder), 10, Duration::from_millis(300)).await;
    for event in &at_b {
        let Outcome::Answer { status: 429, close: false, body } = &event.outcome else { panic!("{event:?}") };
        assert!(body.contains("client 203.0.113.7 is refused"), "{body}");
    }
    let other =
        load::steady(target(proxy, &b, FREE, &[("x-forwarded-for", "203.0.113.8")]), 10, Duration::from_millis(300))
            .await;
    assert_eq!(tally(&other).keys().collect::<Vec<_>>(), ["200"]);
    let metrics = b.metrics().await;
    assert_eq!(decisions(&metrics, "flood_behind_proxy"), 0.0);
    assert_eq!(sample(&metrics, "aibrix_gateway_kernel_penalised_clients", &[]), Some(0.0), "no connection refused");
    let members = redis.cmd(&["ZRANGE", "turnstile:penalties", "0", "-1"]);
    assert!(format!("{members:?}").contains("behind-proxy/203.0.113.7"), "{members:?}");
}

/// Sets a user's limits in Redis as `turnstile users set` would.
fn set_user(redis: &Redis, name: &str, rpm: u64, tpm: u64) {
    let record = serde_json::json!({"name": name, "rpm": rpm, "tpm": tpm}).to_string();
    redis.cmd(&["SET", &format!("aibrix-users/{name}"), &record]);
}

/// Seconds into the current minute of Redis time, away from its end.
async fn away_from_minute_end(redis: &Redis) {
    let (seconds, _) = redis.time();
    if seconds % 60 >= 50 {
        tokio::time::sleep(Duration::from_secs(61 - seconds % 60)).await;
    }
}

fn header_u64(reply: &Reply, name: &str) -> u64 {
    reply.header(name).parse().unwrap_or_else(|_| panic!("{name}: {:?}", reply.header(name)))
}

/// Redis, an engine for the free model answering `tokens` tokens, and a gateway sharing its
/// limits through that Redis.
async fn with_redis(tokens: &str) -> (Redis, Engine, Gateway) {
    let redis = Redis::start();
    let engine = Engine::start("pod-a", FREE, &["--tokens", tokens]);
    let url = redis.url();
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, FREE)], &["--redis-url", &url, "--redis-timeout-ms", "500"])
        .await;
    (redis, engine, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_learn_their_remaining_quota_and_when_it_resets() {
    let (redis, _engine, gw) = with_redis("30").await;
    set_user(&redis, "ana", 3, 1_000_000);
    set_user(&redis, "tim", 100, 20);
    away_from_minute_end(&redis).await;

    let first = gw.chat(FREE, &[("user", "ana")]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(header_u64(&first, "x-ratelimit-limit-requests"), 3);
    assert_eq!(header_u64(&first, "x-ratelimit-remaining-requests"), 2);
    assert_eq!(header_u64(&first, "x-ratelimit-limit-tokens"), 1_000_000);
    assert_eq!(header_u64(&first, "x-ratelimit-remaining-tokens"), 1_000_000, "nothing charged before this answer");
    assert!(first.header("x-ratelimit-reset-requests").ends_with('s'), "{:?}", first.headers);
    let second = gw.chat(FREE, &[("user", "ana")]).await;
    assert_eq!(header_u64(&second, "x-ratelimit-remaining-requests"), 1);
    assert!(header_u64(&second, "x-ratelimit-remaining-tokens") < 1_000_000, "the first answer's tokens count");
    assert_eq!(gw.chat(FREE, &[("user", "ana")]).await.status, StatusCode::OK);

    let refused = gw.chat(FREE, &[("user", "ana")]).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("x-error-rpm-exceeded"), "true");
    assert_eq!(header_u64(&refused, "x-ratelimit-limit-requests"), 3);
    assert_eq!(header_u64(&refused, "x-ratelimit-remaining-requests"), 0);
    let (seconds, micros) = redis.time();
    let left_in_minute = 60.0 - (seconds % 60) as f64 - micros as f64 / 1e6;
    let retry_after = header_u64(&refused, "retry-after") as f64;
    assert!((retry_after - left_in_minute).abs() <= 1.5, "Retry-After {retry_after} vs {left_in_minute:.1} s left");

    // tim: 20 tokens a minute; one answer of more than that uses them up.
    assert_eq!(gw.chat(FREE, &[("user", "tim")]).await.status, StatusCode::OK);
    let refused = gw.chat(FREE, &[("user", "tim")]).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("x-error-tpm-exceeded"), "true");
    assert_eq!(header_u64(&refused, "x-ratelimit-limit-tokens"), 20);
    assert_eq!(header_u64(&refused, "x-ratelimit-remaining-tokens"), 0);
    assert!(header_u64(&refused, "retry-after") >= 1);
    assert!(refused.header("x-ratelimit-reset-tokens").ends_with('s'));

    // No limits, no quota headers.
    let anonymous = gw.chat(FREE, &[]).await;
    assert!(anonymous.headers.get("x-ratelimit-limit-requests").is_none());
}

/// Reads a whole SSE answer.
async fn stream_text(url: &str, body: &str, headers: &[(&str, &str)]) -> String {
    let response = open_stream(post(url, body, headers)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    while let Some(chunk) = next_data(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("stream intact")));
    }
    text
}

/// The stream with each event's id and creation time blanked: they differ
/// between any two answers.
fn comparable(stream: &str) -> String {
    stream
        .split("\n\n")
        .map(|event| {
            match event.strip_prefix("data: ").and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok()) {
                Some(mut chunk) => {
                    chunk["id"] = "id".into();
                    chunk["created"] = 0.into();
                    format!("data: {chunk}")
                }
                None => event.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_include_usage_is_counted_and_reaches_the_client_unchanged() {
    let (redis, engine, gw) = with_redis("12").await;
    set_user(&redis, "sam", 1000, 1_000_000);
    away_from_minute_end(&redis).await;

    let body = serde_json::json!({"model": FREE, "messages": [{"role": "user", "content": "count to twelve"}],
        "stream": true})
    .to_string();
    let direct = stream_text(&engine.url("/v1/chat/completions"), &body, &[]).await;
    let through = stream_text(&gw.url("/v1/chat/completions"), &body, &[("user", "sam")]).await;
    assert!(!direct.contains("\"usage\""), "the engine sends no usage unasked: {direct}");
    assert_eq!(through.len(), direct.len(), "same bytes:\n{through}\n---\n{direct}");
    assert_eq!(comparable(&through), comparable(&direct));
    assert!(through.ends_with("data: [DONE]\n\n"));

    // The engine's usage for the same request, asked for directly.
    let asked = serde_json::json!({"model": FREE, "messages": [{"role": "user", "content": "count to twelve"}],
        "stream": true, "stream_options": {"include_usage": true}})
    .to_string();
    let with_usage = stream_text(&engine.url("/v1/chat/completions"), &asked, &[]).await;
    let total = with_usage
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok()))
        .find_map(|chunk| chunk["usage"]["total_tokens"].as_i64())
        .expect("usage chunk");
    let bin = redis.time().0 / 60 % 64;
    let key = format!("aibrix:sam_TPM_CURRENT:{bin}");
    eventually(Duration::from_secs(2), "TPM charged", || async { redis.get_int(&key) == Some(total) }).await;
    let log = gw.log();
    assert!(log.contains(&format!("total_tokens={total}")), "the access log counts the stream's tokens: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_its_pods_are_loaded_the_gateway_answers_a_retryable_503() {
    let engine = Engine::start("pod-a", FREE, &[]);
    let gw = Gateway::spawn_with_discovery(Discovery::PodsFileLater, &[], &[]);
    eventually(Duration::from_secs(20), "proxy listening", || async {
        try_send(get(&gw.admin_url("/healthz"))).await.is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
    for reply in [gw.chat(FREE, &[]).await, send(get(&gw.url("/v1/models"))).await] {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        assert_eq!(reply.header("retry-after"), "1");
        assert_eq!(reply.json()["error"]["type"], "overloaded_error");
        assert_eq!(reply.json()["error"]["message"], "the gateway has not loaded its pods yet");
    }
    gw.write_pods(&[PodSpec::for_engine(&engine, FREE).ready(false)]);
    gw.wait_ready().await;
    let reply = gw.chat(FREE, &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "known model, no ready pod");
    assert_eq!(reply.header("retry-after"), "1");
    assert_eq!(gw.chat("nope", &[]).await.status, StatusCode::BAD_REQUEST, "unknown models are final once loaded");
    gw.write_pods(&[PodSpec::for_engine(&engine, FREE)]);
    eventually(Duration::from_secs(5), "pod ready", || async { gw.chat(FREE, &[]).await.status == StatusCode::OK })
        .await;
}
