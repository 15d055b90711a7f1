//! Sleeping engines (vLLM's sleep mode) through the real `turnstile` binary:
//! a pod whose engine says it sleeps (`vllm:engine_sleep_state`) gets no
//! requests; when every pod of a model sleeps the client gets 503, and with
//! `--wake-sleeping-models` one pod is asked to wake up, once however many
//! requests arrive, after which the model serves again.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, chat_body, eventually, post, send};
use turnstile_tests::pd::{MODEL as PD_MODEL, Roleset, start_gateway};

const MODEL: &str = "llama";

async fn chat(gw: &Gateway) -> turnstile_tests::harness::Reply {
    send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, false), &[])).await
}

/// Waits until the gateway has read `engine`'s metrics page a few times.
async fn scraped(engine: &Engine) {
    eventually(Duration::from_secs(5), "the engine's metrics are read", || async {
        engine.metrics_scrapes().await >= 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_pod_gets_no_requests() {
    let awake = Engine::start("awake", MODEL, &[]);
    let asleep = Engine::start("asleep", MODEL, &["--sleeping"]);
    let pods = [PodSpec::for_engine(&awake, MODEL), PodSpec::for_engine(&asleep, MODEL)];
    let gw = Gateway::start(&pods, &["--routing-algorithm", "random"]).await;
    scraped(&asleep).await;
    for _ in 0..20 {
        let reply = chat(&gw).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("target-pod"), "awake");
    }
    assert_eq!(asleep.stats().await["sleep"]["refused_while_asleep"], 0, "nothing reached the sleeping engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_pods_all_sleep_answers_503_and_is_not_woken_unless_asked() {
    let asleep = Engine::start("asleep", MODEL, &["--sleeping"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&asleep, MODEL)], &[]).await;
    scraped(&asleep).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(reply.json()["error"]["message"], "model llama is sleeping");
    assert_eq!(reply.header("x-error-no-model-backends"), "true");
    assert_eq!(reply.header("retry-after"), "", "nothing will wake it");
    let stats = asleep.stats().await;
    assert_eq!(
        (stats["sleep"]["wake_up_calls"].as_u64(), stats["sleep"]["refused_while_asleep"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_wake_a_sleeping_model_once() {
    let asleep = Engine::start("asleep", MODEL, &["--sleeping", "--wake-delay-ms", "500"]);
    let also_asleep = Engine::start("also-asleep", MODEL, &["--sleeping", "--wake-delay-ms", "500"]);
    let pods = [PodSpec::for_engine(&asleep, MODEL), PodSpec::for_engine(&also_asleep, MODEL)];
    let gw = Arc::new(Gateway::start(&pods, &["--wake-sleeping-models"]).await);
    scraped(&asleep).await;
    scraped(&also_asleep).await;
    let mut replies = Vec::new();
    for _ in 0..50 {
        let gw = Arc::clone(&gw);
        replies.push(tokio::spawn(async move { chat(&gw).await }));
    }
    for reply in replies {
        let reply = reply.await.expect("request finished");
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        assert_eq!(reply.json()["error"]["message"], "model llama is sleeping; retry shortly");
        assert_eq!(reply.header("retry-after"), "10");
    }
    let calls = |stats: serde_json::Value| stats["sleep"]["wake_up_calls"].as_u64().unwrap_or(0);
    let total = calls(asleep.stats().await) + calls(also_asleep.stats().await);
    assert_eq!(total, 1, "one wake-up call for 50 requests");
    // Awake after its delay and the next scrape: served, by the woken pod.
    eventually(Duration::from_secs(5), "the woken model serves", || async { chat(&gw).await.status == StatusCode::OK })
        .await;
    let metrics = gw.metrics().await;
    assert!(metrics.contains(r#"aibrix_gateway_model_wakeups_total{model="llama",outcome="woken"} 1"#), "{metrics}");
    let refused = |stats: serde_json::Value| stats["sleep"]["refused_while_asleep"].as_u64().unwrap_or(0);
    assert_eq!(
        refused(asleep.stats().await) + refused(also_asleep.stats().await),
        0,
        "no request reached a sleeping engine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pd_model_whose_decode_pods_sleep_has_a_decode_pod_woken() {
    let set = Roleset::vllm("rs", &["--wake-delay-ms", "300"]);
    let slept = send(post(&set.decode.url("/sleep"), "", &[])).await;
    assert_eq!(slept.status, StatusCode::OK);
    let gw = start_gateway(&set.pods(true, true), &["--wake-sleeping-models"]).await;
    scraped(&set.decode).await;
    let body = chat_body(PD_MODEL, false);
    let reply = send(post(&gw.url("/v1/chat/completions"), &body, &[])).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(reply.json()["error"]["message"], "model llama is sleeping; retry shortly");
    eventually(Duration::from_secs(5), "the woken decode pod serves", || async {
        send(post(&gw.url("/v1/chat/completions"), &body, &[])).await.status == StatusCode::OK
    })
    .await;
    let calls = |stats: serde_json::Value| stats["sleep"]["wake_up_calls"].as_u64();
    assert_eq!(calls(set.decode.stats().await), Some(1), "the decode pod was woken");
    assert_eq!(calls(set.prefill.stats().await), Some(0), "the awake prefill pod was left alone");
}
