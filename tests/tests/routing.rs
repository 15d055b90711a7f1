//! Routing strategies through the real `turnstile` binary, in front of mock
//! engines whose state really differs: streams held open on one engine, a KV
//! cache filled by requests sent straight to it, slow token timing. The
//! gateway learns about it only by scraping `/metrics`, as in production.

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, Reply, eventually, get_json, open_stream, post, send};

const MODEL: &str = "llama";

/// A chat body with one user message and a completion cap.
fn chat(content: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

async fn route(gw: &Gateway, body: &str, headers: &[(&str, &str)]) -> Reply {
    let reply = send(post(&gw.url("/v1/chat/completions"), body, headers)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply
}

/// Sends `n` quick requests with `headers` and counts them per target pod.
async fn spread(gw: &Gateway, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
    let mut per_pod = BTreeMap::new();
    for _ in 0..n {
        let reply = route(gw, &chat("quick question", 1, false), headers).await;
        *per_pod.entry(reply.header("target-pod").to_owned()).or_default() += 1;
    }
    per_pod
}

/// Opens `n` streams straight to `engine`, bypassing the gateway (so only the
/// engine's `/metrics` tells the gateway about them), and waits until the
/// engine reports them running.
async fn hold_streams(engine: &Engine, n: usize, prompt: &str) -> Vec<http::Response<hyper::body::Incoming>> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(open_stream(post(&engine.url("/v1/chat/completions"), &chat(prompt, 500, true), &[])).await);
    }
    eventually(Duration::from_secs(5), "streams running on the engine", || async {
        engine.stats().await["in_flight"].as_u64() == Some(n as u64)
    })
    .await;
    held
}

/// Long enough for the gateway to scrape every engine a few times (50 ms interval).
async fn let_the_gateway_scrape() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Standard base64, as the gateway encodes `x-session-id`.
fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((bits >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_the_pod_holding_a_stream() {
    let args = ["--itl-ms", "50"];
    let a = Engine::start("pod-a", MODEL, &args);
    let b = Engine::start("pod-b", MODEL, &args);
    let gw = Gateway::start(&[PodSpec::for_engine(&a, MODEL), PodSpec::for_engine(&b, MODEL)], &[]).await;

    let stream = open_stream(post(&gw.url("/v1/chat/completions"), &chat("a long story", 200, true), &[])).await;
    let busy = stream.headers()["target-pod"].to_str().expect("ascii").to_owned();
    assert_eq!(stream.headers()["routing-strategy"], "least-request");
    let per_pod = spread(&gw, 8, &[]).await;
    assert_eq!(per_pod.get(&busy), None, "the pod with a stream in flight got requests: {per_pod:?}");
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_kv_cache_routes_away_from_a_full_cache() {
    let args = ["--kv-capacity-tokens", "64", "--itl-ms", "100"];
    let full = Engine::start("full", MODEL, &args);
    let empty = Engine::start("empty", MODEL, &args);
    let gw = Gateway::start(&[PodSpec::for_engine(&full, MODEL), PodSpec::for_engine(&empty, MODEL)], &[]).await;

    let prompt = "word ".repeat(28);
    let _held = hold_streams(&full, 2, &prompt).await;
    let_the_gateway_scrape().await;

    let per_pod = spread(&gw, 10, &[("routing-strategy", "least-kv-cache")]).await;
    assert_eq!(per_pod, BTreeMap::from([("empty".to_owned(), 10)]));
    let metrics = gw.metrics().await;
    assert!(!metrics.contains("aibrix_gateway_routing_fallbacks_total{strategy=\"least-kv-cache\""), "{metrics}");
    let age = metric_value(&metrics, r#"aibrix_gateway_pod_metrics_age_seconds{model="llama",pod="default/full"}"#)
        .expect("scrape age reported");
    assert!(age < 1.0, "scraped {age} s ago");
    // least-gpu-cache reads the same engine state under vLLM v0's name.
    let per_pod = spread(&gw, 5, &[("routing-strategy", "least-gpu-cache")]).await;
    assert_eq!(per_pod, BTreeMap::from([("empty".to_owned(), 5)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_latency_routes_away_from_a_slow_engine() {
    let slow = Engine::start("slow", MODEL, &["--ttft-ms", "150", "--itl-ms", "30"]);
    let fast = Engine::start("fast", MODEL, &["--ttft-ms", "5", "--itl-ms", "1"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&slow, MODEL), PodSpec::for_engine(&fast, MODEL)], &[]).await;

    // Both engines answer a few requests of their own, so their latency
    // histograms have recent observations; then the slow one keeps busy.
    for engine in [&slow, &fast] {
        for _ in 0..3 {
            let reply = send(post(&engine.url("/v1/chat/completions"), &chat("warm up", 4, false), &[])).await;
            assert_eq!(reply.status, StatusCode::OK);
        }
    }
    let _held = hold_streams(&slow, 2, "keep going").await;
    let_the_gateway_scrape().await;

    let per_pod = spread(&gw, 10, &[("routing-strategy", "least-latency")]).await;
    assert_eq!(per_pod, BTreeMap::from([("fast".to_owned(), 10)]));
    let metrics = gw.metrics().await;
    assert!(!metrics.contains("aibrix_gateway_routing_fallbacks_total{strategy=\"least-latency\""), "{metrics}");
    assert!(
        metrics.contains(r#"aibrix_gateway_routing_latency_seconds_count{model="llama",strategy="least-latency"} 10"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_metric_strategies_read_the_engines() {
    let busy = Engine::start("busy", MODEL, &["--itl-ms", "100"]);
    let idle = Engine::start("idle", MODEL, &["--itl-ms", "100"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&busy, MODEL), PodSpec::for_engine(&idle, MODEL)], &[]).await;
    let _held = hold_streams(&busy, 3, "keep going").await;
    // The busy share and the token rate need a few scrapes of history.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for strategy in ["least-utilization", "least-busy-time", "throughput"] {
        let per_pod = spread(&gw, 5, &[("routing-strategy", strategy)]).await;
        assert_eq!(per_pod, BTreeMap::from([("idle".to_owned(), 5)]), "{strategy}");
    }
    let metrics = gw.metrics().await;
    assert!(!metrics.contains("aibrix_gateway_routing_fallbacks_total"), "{metrics}");

    // vtc-basic puts a light user on the first pod in order (fairness
    // outweighs three running requests out of a hundred); without a user
    // header it cannot score and says so.
    let per_pod = spread(&gw, 5, &[("routing-strategy", "vtc-basic"), ("user", "alice")]).await;
    assert_eq!(per_pod, BTreeMap::from([("busy".to_owned(), 5)]));
    spread(&gw, 2, &[("routing-strategy", "vtc-basic")]).await;
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"aibrix_gateway_routing_fallbacks_total{strategy="vtc-basic",reason="no_user"}"#),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_keeps_each_conversation_on_its_pod() {
    let engines: Vec<Engine> =
        (0..3).map(|i| Engine::start(&format!("pod-{i}"), MODEL, &["--prefix-cache-blocks", "1000"])).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    let gw = Gateway::start(&pods, &["--routing-algorithm", "prefix-cache"]).await;

    let mut homes = Vec::new();
    for conversation in 0..3 {
        let mut messages = vec![serde_json::json!({"role": "system",
            "content": format!("Conversation {conversation}. You are a careful assistant. {}", "Be precise. ".repeat(40))})];
        let mut home: Option<String> = None;
        for turn in 0..5 {
            messages.push(serde_json::json!({"role": "user", "content": format!("question {turn} about the topic")}));
            let body = serde_json::json!({"model": MODEL, "messages": messages, "max_tokens": 2}).to_string();
            let reply = route(&gw, &body, &[]).await;
            let pod = reply.header("target-pod").to_owned();
            match &home {
                None => home = Some(pod),
                Some(home) => assert_eq!(&pod, home, "conversation {conversation} turn {turn} moved"),
            }
            messages.push(serde_json::json!({"role": "assistant", "content": format!("answer {turn}")}));
        }
        homes.extend(home);
    }
    let metrics = gw.metrics().await;
    let hits = metric_value(
        &metrics,
        r#"aibrix_gateway_prefix_cache_lookups_total{model="llama",strategy="prefix-cache",result="hit"}"#,
    );
    assert_eq!(hits, Some(12.0), "every follow-up turn is a hit:\n{metrics}");
    // The engines' own prefix caches saw the reuse.
    let mut engine_hits = 0.0;
    for engine in &engines {
        let text = send(turnstile_tests::harness::get(&engine.url("/metrics"))).await.text();
        engine_hits += metric_value(&text, r#"vllm:prefix_cache_hits_total{model_name="llama"}"#).unwrap_or(0.0);
    }
    assert!(engine_hits > 0.0, "no prefix reuse at the engines");
    assert_eq!(homes.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_affinity_pins_sessions_and_names_the_pod() {
    let engines: Vec<Engine> = (0..3).map(|i| Engine::start(&format!("pod-{i}"), MODEL, &[])).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    let gw = Gateway::start(&pods, &["--routing-algorithm", "session-affinity"]).await;

    // A first request without a session: routed anyway, and told its session id.
    let first = route(&gw, &chat("hello", 1, false), &[]).await;
    let session = first.header("x-session-id").to_owned();
    assert_eq!(session, base64(first.header("target-pod-ip")));
    let home = first.header("target-pod").to_owned();
    let per_pod = spread(&gw, 8, &[("x-session-id", &session)]).await;
    assert_eq!(per_pod, BTreeMap::from([(home, 8)]));

    // Session keys: each stays on one pod, and keys spread over the pods.
    let mut homes = std::collections::BTreeSet::new();
    for key in 0..12 {
        let key = format!("user-{key}");
        let per_pod = spread(&gw, 3, &[("x-aibrix-session-key", &key)]).await;
        assert_eq!(per_pod.len(), 1, "key {key} moved: {per_pod:?}");
        homes.extend(per_pod.into_keys());
    }
    assert!(homes.len() >= 2, "12 keys all on {homes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_mix_combines_strategies_and_bad_names_are_refused() {
    let args = ["--kv-capacity-tokens", "64", "--itl-ms", "100"];
    let full = Engine::start("full", MODEL, &args);
    let empty = Engine::start("empty", MODEL, &args);
    let gw = Gateway::start(&[PodSpec::for_engine(&full, MODEL), PodSpec::for_engine(&empty, MODEL)], &[]).await;
    let _held = hold_streams(&full, 2, &"word ".repeat(28)).await;
    let_the_gateway_scrape().await;

    let mix = "least-request:1,least-kv-cache:3";
    for _ in 0..6 {
        let reply = route(&gw, &chat("quick", 1, false), &[("routing-strategy", mix)]).await;
        assert_eq!(reply.header("target-pod"), "empty");
        assert_eq!(reply.header("routing-strategy"), mix, "the mix is echoed as written");
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"aibrix_gateway_routing_latency_seconds_count{model="llama",strategy="weighted-mix"} 6"#),
        "{metrics}"
    );

    for bad in ["least-request:1,bogus:1", "least-request:x", "random:1,least-request:1", "least-request:1,", "nope"] {
        let reply =
            send(post(&gw.url("/v1/chat/completions"), &chat("x", 1, false), &[("routing-strategy", bad)])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(reply.json()["error"]["message"], format!("incorrect routing strategy {bad}"));
        assert_eq!(reply.header("x-error-routing"), "true");
    }
    // `pd` needs prefill and decode pods (tests/tests/pd.rs); these pods have no PD role.
    let pd = send(post(&gw.url("/v1/chat/completions"), &chat("x", 1, false), &[("routing-strategy", "pd")])).await;
    assert_eq!(pd.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        pd.json()["error"]["message"],
        "no roleset of model llama has a ready prefill and a ready decode pod (ready prefill pods: 0, ready decode pods: 0)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_filter_restricts_the_candidates() {
    let a = Engine::start("pod-a", MODEL, &[]);
    let b = Engine::start("pod-b", MODEL, &[]);
    let pods = [
        PodSpec::for_engine(&a, MODEL).label("zone", "east").label("gpu", "h100"),
        PodSpec::for_engine(&b, MODEL).label("zone", "west"),
    ];
    let gw = Gateway::start(&pods, &[]).await;
    for (selector, pod) in
        [("zone=west", "pod-b"), ("zone in (east, north)", "pod-a"), ("gpu", "pod-a"), ("!gpu", "pod-b")]
    {
        let per_pod = spread(&gw, 4, &[("external-filter", selector), ("routing-strategy", "random")]).await;
        assert_eq!(per_pod, BTreeMap::from([(pod.to_owned(), 4)]), "{selector}");
    }

    let none =
        send(post(&gw.url("/v1/chat/completions"), &chat("x", 1, false), &[("external-filter", "zone=south")])).await;
    assert_eq!(none.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(none.json()["error"]["message"], format!("no ready pods for model {MODEL}"));

    let bad =
        send(post(&gw.url("/v1/chat/completions"), &chat("x", 1, false), &[("external-filter", "zone in (east")]))
            .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.header("x-error-routing"), "true");
    assert!(bad.json()["error"]["message"].as_str().is_some_and(|m| m.starts_with("invalid external-filter")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_engine_metrics_fall_back_to_least_request_visibly() {
    let a = Engine::start("pod-a", MODEL, &["--itl-ms", "50"]);
    let b = Engine::start("pod-b", MODEL, &[]);
    let dead = turnstile_tests::harness::free_port().to_string();
    // pod-b's metrics port points nowhere: its engine metrics are missing.
    let pods =
        [PodSpec::for_engine(&a, MODEL), PodSpec::for_engine(&b, MODEL).label("model.aibrix.ai/metric-port", &dead)];
    let gw = Gateway::start(&pods, &[]).await;
    let_the_gateway_scrape().await;

    // A stream held on pod-a through the gateway: least-request sends the rest to pod-b.
    let only_a = [("external-filter", "!model.aibrix.ai/metric-port")];
    let stream = open_stream(post(&gw.url("/v1/chat/completions"), &chat("long", 200, true), &only_a)).await;
    assert_eq!(stream.headers()["target-pod"], "pod-a");
    let per_pod = spread(&gw, 4, &[("routing-strategy", "least-kv-cache")]).await;
    assert_eq!(per_pod, BTreeMap::from([("pod-b".to_owned(), 4)]));
    drop(stream);

    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"aibrix_gateway_routing_fallbacks_total{strategy="least-kv-cache",reason="metrics_missing"}"#
        ),
        Some(4.0),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"aibrix_gateway_engine_metrics_scrape_errors_total{model="llama",kind="connect"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"aibrix_gateway_pod_metrics_age_seconds{model="llama",pod="default/pod-a"}"#));
    assert!(!metrics.contains(r#"aibrix_gateway_pod_metrics_age_seconds{model="llama",pod="default/pod-b"}"#));
    assert!(gw.log().contains("routing strategy cannot score this request"), "fallback logged:\n{}", gw.log());
    let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
    assert_eq!(endpoints[MODEL]["pods"].as_array().map(Vec::len), Some(2));
}
