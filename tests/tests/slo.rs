//! Issue 17: the slo strategies against the real binary, mock engines and a
//! real Redis holding a GPU profile as AIBrix's GPU optimizer writes it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::StatusCode;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, Redis, chat_body, eventually, post, send};

/// Served by two pods of deployment `fast` (profiled) and one of `other` (not).
const PROFILED: &str = "profiled-model";
/// Served by two pods, no profile at all.
const PLAIN: &str = "plain-model";
/// Its profile says it sustains no request at all.
const HOPELESS: &str = "hopeless-model";
/// Every engine takes this long to answer.
const TTFT_MS: u64 = 2000;

fn pod(engine: &Engine, model: &str, deployment: &str) -> PodSpec {
    PodSpec::for_engine(engine, model).label("app.kubernetes.io/name", deployment)
}

/// A profile where any request takes `1 / (tput × e2e)` of a pod, within
/// an E2E SLO of 10 s.
fn profile(deployment: &str, tput: f64, e2e: f64) -> String {
    format!(
        r#"{{"gpu":"{deployment}","cost":1.0,"created":1,"indexes":[[1],[1]],"tputs":[[{tput}]],"e2e":[[{e2e}]],"slos":{{"percentile":99,"e2e":10}}}}"#
    )
}

/// Status, answering pod (or error body), `x-error-routing` and time taken.
type Answer = (StatusCode, String, String, Duration);

async fn chat(gw: &Gateway, model: &str, strategy: &str) -> Answer {
    chat_at(gw.url("/v1/chat/completions"), model, strategy).await
}

async fn chat_at(url: String, model: &str, strategy: &str) -> Answer {
    let started = Instant::now();
    let reply = send(post(&url, &chat_body(model, false), &[("routing-strategy", strategy)])).await;
    let error = if reply.status == StatusCode::OK { String::new() } else { reply.text() };
    let pod = if reply.status == StatusCode::OK { reply.header("target-pod").to_owned() } else { error };
    let routing_error = reply.header("x-error-routing").to_owned();
    (reply.status, pod, routing_error, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slo_strategies_route_by_the_gpu_profile_in_redis() {
    let ttft = TTFT_MS.to_string();
    let slow = ["--ttft-ms", ttft.as_str()];
    let engines = [
        Engine::start("fast-0", PROFILED, &slow),
        Engine::start("fast-1", PROFILED, &slow),
        Engine::start("other-0", PROFILED, &slow),
        Engine::start("plain-0", PLAIN, &[]),
        Engine::start("plain-1", PLAIN, &[]),
        Engine::start("hopeless-0", HOPELESS, &[]),
    ];
    let pods = [
        pod(&engines[0], PROFILED, "fast"),
        pod(&engines[1], PROFILED, "fast"),
        pod(&engines[2], PROFILED, "other"),
        pod(&engines[3], PLAIN, "plain"),
        pod(&engines[4], PLAIN, "plain"),
        pod(&engines[5], HOPELESS, "hopeless"),
    ];
    let redis = Redis::start();
    // Each request takes half a `fast` pod: the two hold four at once.
    redis.cmd(&["SET", &format!("aibrix:profile_{PROFILED}_fast"), &profile("fast", 2.0, 1.0)]);
    redis.cmd(&["SET", &format!("aibrix:profile_{HOPELESS}_hopeless"), &profile("hopeless", 0.0, 1.0)]);
    let url = redis.url();
    let gw = Gateway::start(&pods, &["--redis-url", &url, "--routing-algorithm", "random"]).await;

    // A request the profile says cannot be served is refused as AIBrix does.
    eventually(Duration::from_secs(15), "the profiles to be read", || async {
        chat(&gw, HOPELESS, "slo").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let (status, message, routing_error, _) = chat(&gw, HOPELESS, "slo-pack-load").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("error on selecting target pod"), "{message}");
    assert_eq!(routing_error, "true");

    // Five at once with `slo`: only the profiled deployment serves, two per
    // pod; the fifth waits until one of the first four ends.
    let requests: Vec<_> =
        (0..5).map(|_| tokio::spawn(chat_at(gw.url("/v1/chat/completions"), PROFILED, "slo"))).collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.expect("request task"));
    }
    answers.sort_by_key(|answer| answer.3);
    let mut per_pod = BTreeMap::new();
    for (status, pod, _, _) in &answers {
        assert_eq!(*status, StatusCode::OK, "{pod}");
        *per_pod.entry(pod.clone()).or_insert(0) += 1;
    }
    assert!(!per_pod.contains_key("other-0"), "the unprofiled deployment is not used: {per_pod:?}");
    assert_eq!(per_pod.values().sum::<usize>(), 5);
    let wait_line = Duration::from_millis(TTFT_MS * 3 / 2);
    assert!(answers[3].3 < wait_line, "four are served at once: {answers:?}");
    assert!(answers[4].3 >= wait_line, "the fifth waited for room: {answers:?}");

    // In a weighted mix only the slo entry counts: least-request alone
    // would send some to other-0.
    for _ in 0..6 {
        let (status, pod, _, _) = chat(&gw, PROFILED, "least-request:1,slo-least-load").await;
        assert_eq!(status, StatusCode::OK);
        assert!(pod.starts_with("fast-"), "{pod}");
    }

    // Without a profile: least-request over every pod, and the fallback counted.
    let mut plain = BTreeMap::new();
    for _ in 0..10 {
        let (status, pod, _, _) = chat(&gw, PLAIN, "slo-least-load-pulling").await;
        assert_eq!(status, StatusCode::OK);
        *plain.entry(pod).or_insert(0) += 1;
    }
    assert!(plain.keys().all(|pod| pod.starts_with("plain-")), "{plain:?}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"aibrix_gateway_routing_fallbacks_total{strategy="slo-least-load-pulling",reason="no_slo_profile"} 10"#
        ),
        "{metrics}"
    );
}
