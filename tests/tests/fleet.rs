//! Several gateway replicas in front of the same pods, as a DaemonSet runs
//! them: what they share through Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use turnstile_tests::harness::{Discovery, Engine, Gateway, PodSpec, Redis, eventually, open_stream, post, send};

const MODEL: &str = "fleet-model";

fn chat(content: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

/// `GET /metrics` requests all `engines` answer during `period`.
async fn scrapes_during(engines: &[Engine], period: Duration) -> u64 {
    let mut before = 0;
    for engine in engines {
        before += engine.metrics_scrapes().await;
    }
    tokio::time::sleep(period).await;
    let mut after = 0;
    for engine in engines {
        after += engine.metrics_scrapes().await;
    }
    after - before
}

/// Routes `n` requests with least-kv-cache through `gw`; counts them per pod.
async fn least_kv_cache(gw: &Gateway, n: usize) -> BTreeMap<String, usize> {
    let mut per_pod = BTreeMap::new();
    for _ in 0..n {
        let reply = send(post(
            &gw.url("/v1/chat/completions"),
            &chat("quick question", 1, false),
            &[("routing-strategy", "least-kv-cache")],
        ))
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        *per_pod.entry(reply.header("target-pod").to_owned()).or_default() += 1;
    }
    per_pod
}

/// Four replicas with a Redis scrape each engine no more often than one
/// replica alone; each routes on readings another replica took, and when the
/// replica doing the scraping goes, the others take over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_redis_share_one_scrape_per_pod() {
    let redis = Redis::start();
    let url = redis.url();
    let args = ["--kv-capacity-tokens", "64", "--itl-ms", "100"];
    let engines: Vec<Engine> = ["full", "empty-a", "empty-b"].iter().map(|n| Engine::start(n, MODEL, &args)).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    let gateway_args = ["--redis-url", url.as_str()];
    let window = Duration::from_secs(2);

    let first = Gateway::start(&pods, &gateway_args).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alone = scrapes_during(&engines, window).await;
    // Three pods every 50 ms: about 120 in two seconds.
    assert!(alone >= 60, "one replica scrapes every pod every interval: {alone}");

    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(Gateway::start(&pods, &gateway_args).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let together = scrapes_during(&engines, window).await;
    // Without sharing this would be four times `alone`.
    assert!(together <= alone + alone / 5, "four replicas scrape more than one: {together} vs {alone}");

    // The engine `full` has its KV cache filled by streams the gateways never
    // see: only its `/metrics` says so, and only the first replica reads it.
    let prompt = "word ".repeat(28);
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(open_stream(post(&engines[0].url("/v1/chat/completions"), &chat(&prompt, 500, true), &[])).await);
    }
    eventually(Duration::from_secs(5), "streams running on the engine", || async {
        engines[0].stats().await["in_flight"].as_u64() == Some(2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    for gw in &others {
        let per_pod = least_kv_cache(gw, 6).await;
        assert!(!per_pod.contains_key("full"), "a replica routed to the full cache: {per_pod:?}");
        let metrics = gw.metrics().await;
        assert!(!metrics.contains("aibrix_gateway_routing_fallbacks_total{strategy=\"least-kv-cache\""), "{metrics}");
    }

    // The replica that scraped goes away: the others take the scrapes over.
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = scrapes_during(&engines, window).await;
    assert!(after >= alone / 2, "nobody took over the scrapes: {after} vs {alone}");
    assert!(after <= alone + alone / 5, "the survivors each scrape: {after} vs {alone}");
    let per_pod = least_kv_cache(&others[0], 6).await;
    assert!(!per_pod.contains_key("full"), "routed to the full cache after the takeover: {per_pod:?}");
    drop(held);
}

/// Without Redis (or with it down) nothing is shared: each replica scrapes
/// every pod itself and routes on its own readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_scrapes_on_its_own_while_redis_is_down() {
    let mut redis = Redis::start();
    let url = redis.url();
    let engines: Vec<Engine> = ["a", "b"].iter().map(|n| Engine::start(n, MODEL, &[])).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    let gateway_args = ["--redis-url", url.as_str()];
    let _first = Gateway::start(&pods, &gateway_args).await;
    let _second = Gateway::start(&pods, &gateway_args).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shared = scrapes_during(&engines, Duration::from_secs(1)).await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alone = scrapes_during(&engines, Duration::from_secs(1)).await;
    assert!(alone > shared + shared / 2, "replicas stopped scraping with Redis down: {alone} vs {shared}");
}

/// A thousand pods take a thousand kept-alive scrape connections: the
/// gateway raises its soft open-files limit to the hard one at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let engine = Engine::start("a", MODEL, &[]);
    let pods = [PodSpec::for_engine(&engine, MODEL)];
    let wrapper = ["prlimit", "--nofile=1024:8192"];
    let gw = Gateway::spawn_wrapped(&Discovery::PodsFile(&pods), &[], &[], &wrapper);
    gw.wait_ready().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.proc.pid())).expect("limits");
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["8192", "8192"], "{open_files}");
}
