//! Tracing through the real `turnstile` binary, mock engines and an in-test
//! OTLP collector that decodes what it receives: every request is one trace
//! with its phases as child spans, the engine is handed a `traceparent`
//! whose parent is the gateway's span, both OTLP transports deliver, and a
//! collector that is down or silent costs no request and no unbounded memory.

use std::collections::BTreeSet;
use std::time::Duration;

use http::StatusCode;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, chat_body, post, rss_kib, send};
use turnstile_tests::load::{self, Outcome, Target};
use turnstile_tests::otlp::{OtlpReceiver, ReceivedSpan};

const MODEL: &str = "llama";
/// The phases every proxied request has, as child spans of its own.
const PHASES: [&str; 5] = ["read body", "resolve", "limit", "route", "upstream"];

/// A gateway over `engines` exporting to `receiver` over HTTP/protobuf,
/// with `env` added (exports every 100 ms so tests wait little).
async fn traced_gateway(engines: &[&Engine], receiver: &OtlpReceiver, args: &[&str], env: &[(&str, &str)]) -> Gateway {
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(*e, MODEL)).collect();
    let endpoint = receiver.endpoint();
    let args = [&["--otlp-endpoint", endpoint.as_str()], args].concat();
    let env = [&[("OTEL_BSP_SCHEDULE_DELAY", "100")], env].concat();
    let gw = Gateway::spawn(&pods, &args, &env);
    gw.wait_ready().await;
    gw
}

/// The spans of trace `id`, once its request's span has arrived.
async fn trace_of(receiver: &OtlpReceiver, id: &str) -> Vec<ReceivedSpan> {
    let server = |s: &ReceivedSpan| s.trace_id == id && s.kind == "server";
    receiver.wait_for_spans(|spans| spans.iter().any(server), Duration::from_secs(10)).await;
    receiver.spans_of_trace(id)
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_trace_with_its_phases_and_the_engine_continues_it() {
    let receiver = OtlpReceiver::start().await.expect("OTLP receiver");
    let a = Engine::start("a", MODEL, &[]);
    let b = Engine::start("b", MODEL, &[]);
    let gw = traced_gateway(
        &[&a, &b],
        &receiver,
        &["--otlp-protocol", "http/protobuf"],
        &[("OTEL_SERVICE_NAME", "edge-gateway")],
    )
    .await;

    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_parent = "00f067aa0ba902b7";
    let traceparent = format!("00-{client_trace}-{client_parent}-01");
    let plain = gw.chat(MODEL, &[]).await;
    let streamed = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
    let joined = gw.chat(MODEL, &[("traceparent", traceparent.as_str()), ("tracestate", "vendor=7")]).await;
    for reply in [&plain, &streamed, &joined] {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("x-request-id"), reply.header("request-id"));
    }
    assert_eq!(joined.header("request-id"), client_trace, "the client's trace id is the request id");

    let mut seen_by_engines: Vec<String> = a.traceparents().await;
    seen_by_engines.extend(b.traceparents().await);
    let mut connects = 0;
    for reply in [&plain, &streamed, &joined] {
        let id = reply.header("request-id");
        assert_eq!(id.len(), 32, "the request id is a trace id: {id}");
        let spans = trace_of(&receiver, id).await;
        let root = one(&spans, "POST /v1/chat/completions");
        assert_eq!(root.kind, "server");
        assert_eq!(spans.iter().filter(|s| s.kind == "server").count(), 1, "one request span: {spans:#?}");
        assert!(spans.iter().all(|s| s.service_name == "edge-gateway"), "OTEL_SERVICE_NAME");
        for phase in PHASES {
            assert_eq!(one(&spans, phase).parent_span_id, root.span_id, "{phase} is a child of the request");
        }
        assert_eq!(root.attr("gen_ai.request.model"), Some(MODEL));
        assert_eq!(root.attr("gen_ai.operation.name"), Some("chat"));
        assert_eq!(root.attr("http.request.method"), Some("POST"));
        assert_eq!(root.attr("http.response.status_code"), Some("200"));
        assert_eq!(root.attr("turnstile.pod"), Some(reply.header("target-pod")));
        assert_eq!(root.attr("turnstile.strategy"), Some(reply.header("routing-strategy")));
        assert_eq!(root.attr("turnstile.profile"), Some("default"));
        assert_eq!(root.attr("turnstile.outcome"), Some("completed"));
        let tokens = |key| root.attr(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        assert!(tokens("gen_ai.usage.input_tokens") > 0 && tokens("gen_ai.usage.output_tokens") > 0, "{root:#?}");
        let upstream = one(&spans, "upstream");
        assert_eq!(upstream.kind, "client");
        assert_eq!(upstream.attr("turnstile.pod"), Some(reply.header("target-pod")));
        let events: Vec<&str> = upstream.events.iter().map(|(name, _)| name.as_str()).collect();
        // A connection made for the request shows as its connect phase; a pooled one is said to be.
        if upstream.attr("turnstile.connection.reused") == Some("true") {
            assert_eq!(events, ["response headers", "first byte"]);
        } else {
            assert_eq!(events, ["connected", "response headers", "first byte"], "{upstream:#?}");
            connects += 1;
        }
        assert!(upstream.end_unix_nano <= root.end_unix_nano && root.start_unix_nano <= upstream.start_unix_nano);
        // The engine was handed the trace with the gateway's exchange span as its parent.
        let expected = format!("00-{id}-{}-01", upstream.span_id);
        assert!(seen_by_engines.contains(&expected), "{expected} not in {seen_by_engines:?}");
    }
    assert!(connects >= 1, "the first request to an engine connects to it");
    // The client's tracestate went on to the engine with the gateway's span.
    let mut stats = a.stats().await["traceparents"].as_array().cloned().unwrap_or_default();
    stats.extend(b.stats().await["traceparents"].as_array().cloned().unwrap_or_default());
    let carried = stats.iter().find(|t| t["traceparent"].as_str().is_some_and(|p| p.contains(client_trace)));
    assert_eq!(carried.map(|t| t["tracestate"].clone()), Some(serde_json::json!("vendor=7")), "{stats:?}");
    let joined_root = one(&trace_of(&receiver, client_trace).await, "POST /v1/chat/completions").clone();
    assert_eq!(joined_root.parent_span_id, client_parent, "the client's span is the gateway's parent");

    // A request the gateway refuses is a trace too, without an engine.
    let refused = gw.chat("no-such-model", &[]).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let spans = trace_of(&receiver, refused.header("request-id")).await;
    let root = one(&spans, "POST /v1/chat/completions");
    assert_eq!((root.attr("http.response.status_code"), root.attr("error.type")), (Some("400"), Some("400")));
    assert!(!spans.iter().any(|s| s.name == "upstream"), "{spans:#?}");
    let traces: BTreeSet<String> = receiver.spans().into_iter().map(|s| s.trace_id).collect();
    assert_eq!(traces.len(), 4, "one trace per request: {traces:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_is_the_default_transport_and_sampling_keeps_the_clients_decision() {
    let receiver = OtlpReceiver::start_grpc().await.expect("OTLP/gRPC receiver");
    let engine = Engine::start("a", MODEL, &[]);
    let gw = traced_gateway(&[&engine], &receiver, &["--trace-sampling-ratio", "0"], &[]).await;
    let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let unsampled = "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    for headers in [vec![("traceparent", sampled)], vec![("traceparent", unsampled)], vec![]] {
        assert_eq!(gw.chat(MODEL, &headers).await.status, StatusCode::OK);
    }
    let spans = trace_of(&receiver, "0af7651916cd43dd8448eb211c80319c").await;
    let root = one(&spans, "POST /v1/chat/completions");
    assert_eq!(root.service_name, "turnstile", "the default service.name");
    for phase in PHASES {
        one(&spans, phase);
    }
    // Ratio 0: only the client's sampled trace was recorded; the others
    // still reached the engine, unsampled, under a span id of the gateway's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recorded: BTreeSet<String> = receiver.spans().into_iter().map(|s| s.trace_id).collect();
    assert_eq!(recorded, BTreeSet::from(["0af7651916cd43dd8448eb211c80319c".to_owned()]));
    let parents = engine.traceparents().await;
    assert_eq!(parents.len(), 3, "{parents:?}");
    assert!(parents[1].starts_with("00-1af7651916cd43dd8448eb211c80319c-") && parents[1].ends_with("-00"));
    assert!(!parents[1].contains("b7ad6b7169203331"), "the gateway's own span: {}", parents[1]);
    assert!(parents[2].len() == 55 && parents[2].ends_with("-00"), "a new trace, unsampled: {}", parents[2]);
}

/// Sends `requests` chat requests over 8 connections (bounded in time too);
/// returns how many did not get a 200.
async fn load(gw: &Gateway, requests: usize) -> usize {
    let target = Target {
        from: [127, 0, 0, 1].into(),
        to: gw.proxy,
        path: "/v1/chat/completions".into(),
        body: chat_body(MODEL, false),
        headers: Vec::new(),
    };
    let events = load::flood(target, 8, Duration::from_secs(60), requests).await;
    assert!(events.len() >= requests, "the load finished: {} of {requests}", events.len());
    events.iter().filter(|e| !matches!(e.outcome, Outcome::Answer { status: 200, .. })).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_or_silent_costs_no_requests_and_bounded_memory() {
    let receiver = OtlpReceiver::start().await.expect("OTLP receiver");
    receiver.set_failing(true);
    let engine = Engine::start("a", MODEL, &[]);
    let env = [("OTEL_BSP_MAX_QUEUE_SIZE", "512"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "300")];
    let gw = traced_gateway(&[&engine], &receiver, &["--otlp-protocol", "http/protobuf"], &env).await;
    let pid = gw.proc.pid();

    assert_eq!(load(&gw, 500).await, 0, "warm-up");
    let before = rss_kib(pid);
    assert_eq!(load(&gw, 4000).await, 0, "a refusing collector costs no request");
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 16 * 1024, "RSS grew {grown} KiB over 4000 traced requests with the collector down");
    let metrics = gw.metrics().await;
    let dropped = |reason| load::sample(&metrics, "turnstile_trace_spans_dropped_total", &[("reason", reason)]);
    let failed = dropped("export_failed").unwrap_or(0.0);
    let full = dropped("queue_full").unwrap_or(0.0);
    assert!(failed > 0.0, "failed exports are counted:\n{metrics}");
    // 4,500 requests of 6 spans each; what is still queued is not counted yet.
    assert!(failed + full >= 20_000.0, "every lost span is counted ({failed} + {full})");
    assert_eq!(receiver.spans().len(), 0);
    let warnings = gw.log().matches("trace export failed").count();
    assert_eq!(warnings, 1, "one warning for the whole outage:\n{}", gw.log());

    // Back up: the next requests' traces arrive, and the log says so.
    // What was queued during the outage goes first, then new requests' spans.
    receiver.set_failing(false);
    receiver.wait_for_spans(|spans| !spans.is_empty(), Duration::from_secs(10)).await;
    let mut arrived = false;
    for _ in 0..20 {
        let id = gw.chat(MODEL, &[]).await.header("request-id").to_owned();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if receiver.spans_of_trace(&id).iter().any(|s| s.kind == "server") {
            arrived = true;
            break;
        }
    }
    assert!(arrived, "new traces arrive once the collector is back");
    assert!(gw.log().contains("trace export works again"));

    // A collector that accepts connections and never answers: each export
    // is given up after OTEL_EXPORTER_OTLP_TIMEOUT, requests never wait.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!("http://{}", silent.local_addr().expect("addr"));
    let pods = [PodSpec::for_engine(&engine, MODEL)];
    let env = [
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "512"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "300"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ];
    let hung = Gateway::spawn(&pods, &["--otlp-endpoint", &silent_url], &env);
    hung.wait_ready().await;
    assert_eq!(load(&hung, 2000).await, 0, "a silent collector costs no request");
    let metrics = hung.metrics().await;
    let lost = ["export_failed", "queue_full"]
        .iter()
        .map(|reason| {
            load::sample(&metrics, "turnstile_trace_spans_dropped_total", &[("reason", reason)]).unwrap_or(0.0)
        })
        .sum::<f64>();
    assert!(lost > 1000.0, "the spans the silent collector held up are counted: {lost}");
    drop(silent);
}
