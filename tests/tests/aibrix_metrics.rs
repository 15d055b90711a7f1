//! AIBrix's metric names on the admin `/metrics` (`--aibrix-metric-names`):
//! an AIBrix dashboard's series appear with AIBrix's labels when traffic
//! flows, and are gone when the flag is off.

use std::time::Duration;

use http::StatusCode;
use prom_text_format_parser::Metric;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, eventually};

const OK_MODEL: &str = "aibrix-ok";
const FAILING_MODEL: &str = "aibrix-failing";
const PD_MODEL: &str = "aibrix-pd";
const GATEWAY_POD: &str = "turnstile-gw-0";

/// Samples of the family `name` (counters are keyed with or without `_total`).
fn samples<'a>(metrics: &'a [Metric], name: &str) -> Vec<&'a prom_text_format_parser::Sample> {
    let base = name.strip_suffix("_total");
    metrics.iter().filter(|m| m.name == name || Some(m.name.as_str()) == base).flat_map(|m| m.samples.iter()).collect()
}

/// The value of the sample of `name` whose labels are exactly `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (metrics, _) = prom_text_format_parser::parse_scrape(text);
    samples(&metrics, name)
        .into_iter()
        .find(|s| {
            s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.iter().any(|l| l.key == *k && l.value == *v))
        })
        .and_then(|s| s.value.value.parse().ok())
}

/// AIBrix's labels of a per-pod series for pod `name` of `model` (pods-file pods: namespace `default`).
fn pod_labels<'a>(name: &'a str, model: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("namespace", "default"),
        ("pod", name),
        ("model", model),
        ("engine_type", "vllm"),
        ("roleset", ""),
        ("role", ""),
        ("role_replica_index", ""),
        ("gateway_pod", GATEWAY_POD),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aibrix_named_series_follow_traffic_and_the_flag_removes_them() {
    let ok = Engine::start("ok-0", OK_MODEL, &[]);
    let failing = Engine::start("failing-0", FAILING_MODEL, &["--fail-status", "500"]);
    let prefill = Engine::start("pd-prefill-0", PD_MODEL, &["--role", "prefill"]);
    let decode = Engine::start("pd-decode-0", PD_MODEL, &["--role", "decode"]);
    let role = |engine: &Engine, role: &str| {
        PodSpec::for_engine(engine, PD_MODEL).label("roleset-name", "rs-a").label("role-name", role)
    };
    let pods = [
        PodSpec::for_engine(&ok, OK_MODEL),
        PodSpec::for_engine(&failing, FAILING_MODEL),
        role(&prefill, "prefill"),
        role(&decode, "decode"),
    ];
    let gw = Gateway::spawn(&pods, &["--routing-algorithm", "least-request"], &[("POD_NAME", GATEWAY_POD)]);
    gw.wait_ready().await;

    let reply = gw.chat(OK_MODEL, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let usage = reply.json()["usage"].clone();
    let reply = gw.chat(FAILING_MODEL, &[]).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", reply.text());
    let reply = gw.chat(OK_MODEL, &[("routing-strategy", "prefix-cache")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = gw.chat(PD_MODEL, &[("routing-strategy", "pd")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // The access log line is written when the answer's body ends: wait for both OK answers.
    let ok_requests = [("gateway_pod", GATEWAY_POD), ("model", OK_MODEL), ("pod_name", "ok-0")];
    eventually(Duration::from_secs(5), "both OK answers counted as successes", || async {
        let text = gw.metrics().await;
        let success = [
            ("gateway_pod", GATEWAY_POD),
            ("model", OK_MODEL),
            ("pod_name", "ok-0"),
            ("status", "gateway_rsp_body_success"),
            ("status_code", "200"),
        ];
        value(&text, "gateway_request_model_success_total", &success) == Some(2.0)
    })
    .await;
    let text = gw.metrics().await;
    let expect = |name: &str, labels: &[(&str, &str)], want: f64| {
        assert_eq!(value(&text, name, labels), Some(want), "{name}{labels:?} in\n{text}");
    };
    expect("gateway_request_total", &ok_requests, 2.0);
    expect(
        "gateway_request_total",
        &[("gateway_pod", GATEWAY_POD), ("model", FAILING_MODEL), ("pod_name", "failing-0")],
        1.0,
    );
    let failure = [
        ("gateway_pod", GATEWAY_POD),
        ("model", FAILING_MODEL),
        ("pod_name", "failing-0"),
        ("status", "gateway_rsp_headers_fail"),
        ("status_code", "500"),
    ];
    expect("gateway_request_model_fail_total", &failure, 1.0);
    expect("gateway_in_flight_requests", &[("gateway_pod", GATEWAY_POD)], 0.0);
    expect("gateway_model_in_flight_requests", &[("gateway_pod", GATEWAY_POD), ("model", OK_MODEL)], 0.0);

    // Tokens as the engine reported them, twice, and the prompt's bucket.
    let prompt = usage["prompt_tokens"].as_u64().expect("usage.prompt_tokens");
    let completion = usage["completion_tokens"].as_u64().expect("usage.completion_tokens");
    assert!(prompt < 256 && completion < 256, "the mock's usage fits AIBrix's first bucket: {usage}");
    let ok_pod = pod_labels("ok-0", OK_MODEL);
    expect("gateway_input_tokens_total", &ok_pod, 2.0 * prompt as f64);
    expect("gateway_output_tokens_total", &ok_pod, 2.0 * completion as f64);
    let mut bucketed = ok_pod.clone();
    bucketed.push(("bucket", "0-256"));
    expect("gateway_prompt_token_bucket_total", &bucketed, 2.0);
    expect("gateway_completion_token_bucket_total", &bucketed, 2.0);

    // The prefix-cache request: a first prompt, so no pod held any of it.
    let decision = [("model", OK_MODEL), ("match_percent_bucket", "0"), ("using_kv_sync", "false")];
    expect("aibrix_prefix_cache_routing_decisions_total", &decision, 1.0);
    let selection = [("model", OK_MODEL), ("selection", "least_request_fallback"), ("using_kv_sync", "false")];
    expect("aibrix_prefix_cache_routing_selection_total", &selection, 1.0);
    // The pd pair, with AIBrix's pod labels (roleset and role from the pods' labels).
    let pd_pod = |name: &'static str, role: &'static str| {
        let mut labels = pod_labels(name, PD_MODEL);
        labels.retain(|(k, _)| !matches!(*k, "roleset" | "role"));
        labels.extend([("roleset", "rs-a"), ("role", role)]);
        labels
    };
    expect("pd_selected_prefill_pod_total", &pd_pod("pd-prefill-0", "prefill"), 1.0);
    expect("pd_selected_decode_pod_total", &pd_pod("pd-decode-0", "decode"), 1.0);
    // Request ids never become labels.
    assert!(!text.contains("request_id"), "{text}");
    drop(gw);

    // The same traffic with the flag off: Turnstile's names only.
    let gw = Gateway::spawn(&pods, &["--aibrix-metric-names=false"], &[("POD_NAME", GATEWAY_POD)]);
    gw.wait_ready().await;
    assert_eq!(gw.chat(OK_MODEL, &[]).await.status, StatusCode::OK);
    assert_eq!(gw.chat(FAILING_MODEL, &[]).await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(gw.chat(OK_MODEL, &[("routing-strategy", "prefix-cache")]).await.status, StatusCode::OK);
    let text = gw.metrics().await;
    assert!(text.contains("aibrix_gateway_requests_total"), "Turnstile's own series stay:\n{text}");
    for gone in ["gateway_", "aibrix_prefix_cache_", "pd_selected_", GATEWAY_POD] {
        let found: Vec<&str> = text.lines().filter(|l| l.starts_with(gone) || l.contains(GATEWAY_POD)).collect();
        assert!(found.is_empty(), "{gone} with --aibrix-metric-names=false:\n{}", found.join("\n"));
    }
}
