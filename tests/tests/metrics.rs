//! The gateway's `/metrics` (AIBrix's series names): every required series
//! moves when its event happens, and label values stay within bounded sets.
//!
//! Scrapes are read with `prom_text_format_parser`, a parser of the whole
//! exposition grammar, so a malformed exposition fails here too.

use std::time::Duration;

use http::StatusCode;
use prom_text_format_parser::{Metric, ValueType};
use turnstile_tests::harness::{
    Engine, Gateway, PodSpec, chat_body, eventually, next_data, open_stream, post, scratch_dir, send,
};

const MODEL: &str = "metrics-model";

/// One parsed scrape.
struct Scrape {
    metrics: Vec<Metric>,
    text: String,
}

impl Scrape {
    async fn of(gw: &Gateway) -> Self {
        let text = gw.metrics().await;
        let (metrics, _families_without_samples) = prom_text_format_parser::parse_scrape(&text);
        assert!(!metrics.is_empty(), "no metric parsed from\n{text}");
        Self { metrics, text }
    }

    /// The family named `name`. prometheus-client names a counter family
    /// without `_total` and its samples with it; the parser keys either.
    fn family(&self, name: &str) -> Option<&Metric> {
        let base = name.strip_suffix("_total");
        self.metrics.iter().find(|m| m.name == name || Some(m.name.as_str()) == base)
    }

    /// Sum of the `kind` samples of `name` whose labels include `labels`
    /// (0 when there are none).
    fn sum(&self, name: &str, kind: ValueType, labels: &[(&str, &str)]) -> f64 {
        let Some(metric) = self.family(name) else { return 0.0 };
        metric
            .samples
            .iter()
            .filter(|s| s.value.value_type == kind)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.iter().any(|l| l.key == *k && l.value == *v)))
            .filter_map(|s| s.value.value.parse::<f64>().ok())
            .sum()
    }

    /// A counter's or gauge's value.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, ValueType::Sample, labels)
    }

    /// Observations of a histogram.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, ValueType::Count, labels)
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.family(name).is_some_and(|m| {
            m.samples.iter().any(|s| labels.iter().all(|(k, v)| s.labels.iter().any(|l| l.key == *k && l.value == *v)))
        })
    }
}

const REQUESTS: &str = "aibrix_gateway_requests_total";
const ROUTING: &str = "aibrix_gateway_routing_latency_seconds";
const TTFT: &str = "aibrix_gateway_upstream_ttft_seconds";
const E2E: &str = "aibrix_gateway_request_duration_seconds";
const IN_FLIGHT: &str = "aibrix_gateway_in_flight_requests";
const POD_IN_FLIGHT: &str = "aibrix_gateway_pod_in_flight_requests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_series_move_with_traffic_and_labels_stay_bounded() {
    let engine = Engine::start("metrics-0", MODEL, &["--ttft-ms", "20", "--itl-ms", "100", "--tokens", "4"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--routing-algorithm", "least-request"]).await;
    let model = ("model", MODEL);
    let before = Scrape::of(&gw).await;

    // A proxied answer: counted by model and status, routed, timed.
    let reply = gw.chat(MODEL, &[("user", "user-4711"), ("x-request-id", "rid-0815")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A stream, held open: in flight for the model and for its pod.
    let response = open_stream(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    next_data(&mut body).await.expect("first chunk").expect("no error");
    let during = Scrape::of(&gw).await;
    assert_eq!(during.value(IN_FLIGHT, &[model]), 1.0, "{}", during.text);
    assert_eq!(during.value(POD_IN_FLIGHT, &[model, ("pod", "default/metrics-0")]), 1.0, "{}", during.text);
    while next_data(&mut body).await.is_some() {}
    // Unknown models are one bounded label, whatever the client asked for.
    for i in 0..3 {
        let reply = gw.chat(&format!("no-such-model-{i}"), &[]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    }

    let after = Scrape::of(&gw).await;
    let moved = |name: &str, labels: &[(&str, &str)], by: f64, read: fn(&Scrape, &str, &[(&str, &str)]) -> f64| {
        let delta = read(&after, name, labels) - read(&before, name, labels);
        assert_eq!(delta, by, "{name}{labels:?} moved by {delta}, not {by}:\n{}", after.text);
    };
    moved(REQUESTS, &[model, ("status_code", "200")], 2.0, Scrape::value);
    moved(REQUESTS, &[("model", "unknown"), ("status_code", "400")], 3.0, Scrape::value);
    moved(ROUTING, &[model, ("strategy", "least-request")], 2.0, Scrape::count);
    moved(TTFT, &[model], 2.0, Scrape::count);
    eventually(Duration::from_secs(5), "the end-to-end histogram counts both answers", || async {
        Scrape::of(&gw).await.count(E2E, &[model]) - before.count(E2E, &[model]) == 2.0
    })
    .await;
    assert_eq!(after.value(IN_FLIGHT, &[model]), 0.0, "the stream ended");
    assert_eq!(after.value(POD_IN_FLIGHT, &[model, ("pod", "default/metrics-0")]), 0.0);

    // The engine's /metrics is scraped every 50 ms: its age is small.
    let age = after.value("aibrix_gateway_pod_metrics_age_seconds", &[model, ("pod", "default/metrics-0")]);
    assert!(after.has("aibrix_gateway_pod_metrics_age_seconds", &[model]), "{}", after.text);
    assert!((0.0..2.0).contains(&age), "scrape age {age}");
    // Kernel assist is off in tests: the gauge says so, and userspace counts the bytes.
    assert_eq!(after.value("aibrix_gateway_kernel_assist_active", &[]), 0.0, "{}", after.text);
    let client_in = [model, ("side", "client"), ("direction", "in")];
    assert!(after.value("aibrix_gateway_kernel_bytes_total", &client_in) > 0.0, "{}", after.text);

    // No user id, request id or unknown model name became a label value.
    for leaked in ["user-4711", "rid-0815", "no-such-model"] {
        assert!(!after.text.contains(leaked), "{leaked} is a label value:\n{}", after.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_rejections_and_readiness_transitions_are_counted() {
    let engine = Engine::start("limits-0", MODEL, &[]);
    let config = r#"{"defaultProfile":"default","profiles":{"default":{"requestsPerSecond":1}}}"#;
    let pod = PodSpec::for_engine(&engine, MODEL).config(config);
    let users_file = scratch_dir("metrics-users").join("users.yaml");
    std::fs::write(&users_file, "- name: carol\n  rpm: 1\n").expect("users file");
    let users = users_file.display().to_string();
    let gw = Gateway::start(std::slice::from_ref(&pod), &["--users-file", &users]).await;
    let before = Scrape::of(&gw).await;

    // Model RPS: 1 per second; a burst of three gets at least one 429.
    let mut limited = 0;
    for _ in 0..3 {
        if gw.chat(MODEL, &[]).await.status == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    assert!(limited >= 1, "the RPS cap answered no 429");
    let rps = [("model", MODEL), ("profile", "default"), ("limit", "rps")];
    let after_rps = Scrape::of(&gw).await;
    let rejected = after_rps.value("aibrix_gateway_ratelimit_rejections_total", &rps)
        - before.value("aibrix_gateway_ratelimit_rejections_total", &rps);
    assert_eq!(rejected, f64::from(limited), "{}", after_rps.text);
    let too_many = [("model", MODEL), ("status_code", "429")];
    assert_eq!(after_rps.value(REQUESTS, &too_many) - before.value(REQUESTS, &too_many), f64::from(limited));

    // A user's RPM: the second request in the minute is over (the next RPS window first).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(gw.chat(MODEL, &[("user", "carol")]).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = gw.chat(MODEL, &[("user", "carol")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert_eq!(reply.header("x-error-rpm-exceeded"), "true");
    let after_rpm = Scrape::of(&gw).await;
    let rpm = [("model", MODEL), ("profile", "default"), ("limit", "rpm")];
    assert_eq!(after_rpm.value("aibrix_gateway_ratelimit_rejections_total", &rpm), 1.0, "{}", after_rpm.text);
    assert!(!after_rpm.text.contains("carol"), "a user name is a label value");

    // Readiness churn: Ready → NotReady → Ready, one transition each way.
    let transitions = "aibrix_gateway_pod_readiness_transitions_total";
    let labels = |ready: &'static str| [("model", MODEL), ("pod", "default/limits-0"), ("ready", ready)];
    gw.write_pods(&[pod.clone().ready(false)]);
    eventually(Duration::from_secs(5), "a ready=false transition", || async {
        let now = Scrape::of(&gw).await;
        now.value(transitions, &labels("false")) - before.value(transitions, &labels("false")) == 1.0
    })
    .await;
    gw.write_pods(&[pod]);
    eventually(Duration::from_secs(5), "a ready=true transition", || async {
        let now = Scrape::of(&gw).await;
        now.value(transitions, &labels("true")) - before.value(transitions, &labels("true")) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_prefill_errors_are_counted() {
    let prefill = Engine::start("rs-m-prefill", MODEL, &["--role", "prefill", "--fail-status", "500"]);
    let decode = Engine::start("rs-m-decode", MODEL, &["--role", "decode"]);
    let role = |engine: &Engine, role: &str| {
        PodSpec::for_engine(engine, MODEL).label("roleset-name", "rs-m").label("role-name", role)
    };
    let gw =
        Gateway::start(&[role(&prefill, "prefill"), role(&decode, "decode")], &["--routing-algorithm", "pd"]).await;
    let errors = "aibrix_gateway_pd_prefill_errors_total";
    let before = Scrape::of(&gw).await.value(errors, &[("model", MODEL)]);

    let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, false), &[])).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());

    let after = Scrape::of(&gw).await;
    assert_eq!(after.value(errors, &[("model", MODEL), ("reason", "status")]) - before, 1.0, "{}", after.text);
    assert_eq!(decode.requests_total().await, 0, "no decode after a failed prefill");
}
