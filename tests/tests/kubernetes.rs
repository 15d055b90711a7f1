//! `--discovery kubernetes`: the real `turnstile` binary watching pods on an
//! in-process fake API server (list, watch, bookmarks, 410 Gone), routing to
//! mock vLLM engines on 127.0.0.1, and AIBrix ModelAdapter resources (LoRA
//! adapters) routed to their instances.

use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;
use turnstile_tests::fake_apiserver::FakeApiServer;
use turnstile_tests::harness::{
    Discovery, Engine, Gateway, PodSpec, Reply, StreamOnPod, Traffic, assert_new_requests_skip, chat_body, eventually,
    finish_stream, get, get_json, open_stream_on, post, scratch_dir, send, try_send,
};

const MODEL: &str = "llama";

/// How fast a pod change must reach routing (the issue's acceptance bound).
const PROPAGATION: Duration = Duration::from_secs(1);

/// Bound for recoveries that wait out the watcher's backoff (0.8 s, doubling, jittered).
const RECOVERY: Duration = Duration::from_secs(15);

/// Starts the gateway with a kubeconfig pointing at `api`, without waiting for readiness.
fn spawn_gateway(api: &FakeApiServer, args: &[&str]) -> Gateway {
    let kubeconfig = api.write_kubeconfig(&scratch_dir("kube"));
    Gateway::spawn_with_discovery(Discovery::Kubernetes { kubeconfig: &kubeconfig }, args, &[])
}

/// Starts the gateway against `api` and waits until it is ready (first list loaded).
async fn start_gateway(api: &FakeApiServer, args: &[&str]) -> Gateway {
    let gw = spawn_gateway(api, args);
    gw.wait_ready().await;
    gw
}

/// The value of one series in Prometheus text, e.g. `name{labels}`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn discovery_events(text: &str, kind: &str) -> f64 {
    metric(text, &format!(r#"aibrix_gateway_discovery_events_total{{source="kubernetes",kind="{kind}"}}"#))
        .unwrap_or(0.0)
}

/// Whether `/debug/endpoints` lists `pod` (`default/NAME`) for `model`, and with which readiness.
async fn endpoint_ready(gw: &Gateway, model: &str, pod: &str) -> Option<bool> {
    let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
    endpoints[model]["pods"].as_array()?.iter().find(|p| p["pod"] == pod).and_then(|p| p["ready"].as_bool())
}

async fn routes_to(gw: &Gateway, model: &str, pod: &str) -> bool {
    let reply = gw.chat(model, &[]).await;
    reply.status == StatusCode::OK && reply.header("target-pod") == pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_gates_readiness_and_a_pod_added_over_watch_gets_traffic_within_1s() {
    let a = Engine::start("pod-a", MODEL, &[]);
    let fresh = Engine::start("fresh-0", "fresh", &[]);
    let api = FakeApiServer::start().await;
    api.add_pod(&PodSpec::for_engine(&a, MODEL));

    // The API server fails every list: the gateway runs, counts the errors and is not ready.
    api.set_unavailable(true);
    let gw = spawn_gateway(&api, &[]);
    eventually(RECOVERY, "a failed list is counted", || async {
        try_send(get(&gw.admin_url("/metrics"))).await.is_ok_and(|r| discovery_events(&r.text(), "error") >= 1.0)
    })
    .await;
    let readyz = send(get(&gw.admin_url("/readyz"))).await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE, "{}", readyz.text());
    assert_eq!(readyz.json()["discovery"], "waiting for the first pod list");
    let age = metric(&gw.metrics().await, "aibrix_gateway_discovery_last_sync_age_seconds").expect("sync age gauge");
    assert!(age > 0.0, "never synced: the age grows from start ({age})");
    assert!(gw.log().contains("kubernetes pod watch failed"), "failure logged:\n{}", gw.log());

    api.set_unavailable(false);
    gw.wait_ready().await;
    assert!(routes_to(&gw, MODEL, "pod-a").await);
    let metrics = gw.metrics().await;
    assert_eq!(discovery_events(&metrics, "relist"), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "aibrix_gateway_discovery_last_sync_age_seconds"), Some(0.0), "{metrics}");

    eventually(RECOVERY, "the gateway is watching", || async { api.open_watches() == 1 }).await;
    api.add_pod(&PodSpec::for_engine(&fresh, "fresh"));
    eventually(PROPAGATION, "the pod added over watch takes traffic", || routes_to(&gw, "fresh", "fresh-0")).await;
    assert!(discovery_events(&gw.metrics().await, "applied") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flip_stops_new_requests_within_1s_while_an_in_flight_stream_completes() {
    let slow = ["--ttft-ms", "20", "--itl-ms", "100", "--tokens", "25"];
    let a = Engine::start("pod-a", MODEL, &slow);
    let b = Engine::start("pod-b", MODEL, &slow);
    let api = FakeApiServer::start().await;
    api.add_pod(&PodSpec::for_engine(&a, MODEL));
    api.add_pod(&PodSpec::for_engine(&b, MODEL));
    let gw = start_gateway(&api, &["--routing-algorithm", "random"]).await;

    // Open streams until one lands on pod-a (random: bounded attempts).
    let StreamOnPod { body: mut stream, first, others, statuses } = open_stream_on(&gw, MODEL, "pod-a", 30).await;
    assert!(statuses.iter().all(|status| *status == StatusCode::OK), "{statuses:?}");

    api.set_ready("pod-a", false);
    eventually(PROPAGATION, "pod-a not ready", || async {
        endpoint_ready(&gw, MODEL, "default/pod-a").await == Some(false)
    })
    .await;
    assert_new_requests_skip(&gw, MODEL, &a, "pod-b").await;

    // The stream that was already running on pod-a completes normally.
    let text = finish_stream(&first, &mut stream).await;
    assert!(text.trim_end().ends_with("data: [DONE]"), "in-flight stream completed: {text}");
    drop(others);

    // Back to ready: traffic returns, and both flips are counted for the pod (churn).
    api.set_ready("pod-a", true);
    eventually(PROPAGATION, "pod-a ready again", || async {
        endpoint_ready(&gw, MODEL, "default/pod-a").await == Some(true)
    })
    .await;
    let metrics = gw.metrics().await;
    for ready in ["false", "true"] {
        let series = format!(
            r#"aibrix_gateway_pod_readiness_transitions_total{{model="{MODEL}",pod="default/pod-a",ready="{ready}"}}"#
        );
        assert_eq!(metric(&metrics, &series), Some(1.0), "{series}:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_and_deleted_pods_leave_the_routable_set() {
    let a = Engine::start("pod-a", MODEL, &[]);
    let b = Engine::start("pod-b", MODEL, &[]);
    let api = FakeApiServer::start().await;
    api.add_pod(&PodSpec::for_engine(&a, MODEL));
    api.add_pod(&PodSpec::for_engine(&b, MODEL));
    let gw = start_gateway(&api, &["--routing-algorithm", "random"]).await;

    // A graceful delete first sets deletionTimestamp: no new requests from then on.
    api.mark_terminating("pod-a");
    eventually(PROPAGATION, "terminating pod-a not ready", || async {
        endpoint_ready(&gw, MODEL, "default/pod-a").await == Some(false)
    })
    .await;
    for _ in 0..10 {
        assert!(routes_to(&gw, MODEL, "pod-b").await, "a terminating pod got a new request");
    }

    api.delete_pod("pod-a");
    eventually(PROPAGATION, "pod-a gone", || async { endpoint_ready(&gw, MODEL, "default/pod-a").await.is_none() })
        .await;
    assert!(discovery_events(&gw.metrics().await, "deleted") >= 1.0);

    api.delete_pod("pod-b");
    eventually(PROPAGATION, "the model is gone with its last pod", || async {
        gw.chat(MODEL, &[]).await.status == StatusCode::BAD_REQUEST
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_and_410_gone_are_recovered_without_failed_requests() {
    let a = Engine::start("pod-a", MODEL, &[]);
    let later: Vec<Engine> = ["after-drop", "after-reset", "after-gone", "after-bookmark"]
        .iter()
        .map(|model| Engine::start(&format!("{model}-0"), model, &[]))
        .collect();
    let pod_for = |model: &str| {
        let engine = later.iter().find(|e| e.name == format!("{model}-0")).expect("engine");
        PodSpec::for_engine(engine, model)
    };
    let api = FakeApiServer::start().await;
    api.add_pod(&PodSpec::for_engine(&a, MODEL));
    let gw = start_gateway(&api, &[]).await;
    eventually(RECOVERY, "the gateway is watching", || async { api.open_watches() == 1 }).await;
    let traffic = Traffic::start(&gw, MODEL);

    // A watch closed cleanly is resumed from the last resourceVersion: the
    // pod added in between is replayed, without a new list.
    let lists = api.list_requests();
    api.drop_watches();
    api.add_pod(&pod_for("after-drop"));
    eventually(RECOVERY, "pod added across a dropped watch", || routes_to(&gw, "after-drop", "after-drop-0")).await;
    assert_eq!(api.list_requests(), lists, "a resumable watch needs no re-list");

    // A watch cut mid-stream (no last chunk) is resumed the same way.
    api.reset_watches();
    api.add_pod(&pod_for("after-reset"));
    eventually(RECOVERY, "pod added across a cut watch", || routes_to(&gw, "after-reset", "after-reset-0")).await;

    // The API server fails while the watch restarts: the failure is counted
    // and the pod view ages; once a watch is accepted again the view is
    // current, although no pod changed.
    api.set_unavailable(true);
    api.drop_watches();
    eventually(RECOVERY, "the failed watch restart is counted", || async {
        let metrics = gw.metrics().await;
        discovery_events(&metrics, "error") >= 1.0
            && metric(&metrics, "aibrix_gateway_discovery_last_sync_age_seconds").is_some_and(|age| age > 0.0)
    })
    .await;
    api.set_unavailable(false);
    eventually(RECOVERY, "the watch is current again", || async {
        metric(&gw.metrics().await, "aibrix_gateway_discovery_last_sync_age_seconds") == Some(0.0)
    })
    .await;

    // 410 Gone: the history is forgotten, so the pod added now is only
    // learnt by listing again.
    api.expire_resource_versions();
    api.add_pod(&pod_for("after-gone"));
    eventually(RECOVERY, "pod added while the watch was gone", || routes_to(&gw, "after-gone", "after-gone-0")).await;
    assert!(api.list_requests() > lists, "410 Gone forces a re-list");

    // A bookmark moves the watch's resourceVersion; resuming from it works.
    eventually(RECOVERY, "the gateway is watching again", || async { api.open_watches() == 1 }).await;
    api.send_bookmark();
    api.drop_watches();
    api.add_pod(&pod_for("after-bookmark"));
    eventually(RECOVERY, "pod added after a bookmark", || routes_to(&gw, "after-bookmark", "after-bookmark-0")).await;

    let (ok, failures) = traffic.finish().await;
    assert!(failures.is_empty(), "client requests failed during watch recovery: {failures:?}");
    assert!(ok >= 20, "too little traffic to prove anything: {ok} requests");

    let metrics = gw.metrics().await;
    assert!(discovery_events(&metrics, "relist") >= 2.0, "initial list and the re-list after 410:\n{metrics}");
    assert!(discovery_events(&metrics, "error") >= 2.0, "the failed restart and the 410 are errors:\n{metrics}");
    assert_eq!(
        metric(&metrics, "aibrix_gateway_discovery_last_sync_age_seconds"),
        Some(0.0),
        "the watch is established again:\n{metrics}"
    );
}

/// A model served by one pod whose `model.aibrix.ai/config` annotation comes
/// from the API server.
struct AnnotatedModel {
    api: FakeApiServer,
    engine: Engine,
    gw: Gateway,
}

/// Starts one engine for [`MODEL`], a fake API server holding its pod with
/// `config` as the `model.aibrix.ai/config` annotation, and a ready gateway
/// watching it. Shared by the annotation tests: the routing-strategy one
/// below and the RPS-cap one (`requestsPerSecond` in a profile) to come.
async fn gateway_with_config_annotation(config: &str) -> AnnotatedModel {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let api = FakeApiServer::start().await;
    api.add_pod(&PodSpec::for_engine(&engine, MODEL).config(config));
    let gw = start_gateway(&api, &[]).await;
    AnnotatedModel { api, engine, gw }
}

fn strategy_of(reply: &Reply) -> String {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.header("routing-strategy").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_annotation_from_the_api_server_sets_the_routing_strategy() {
    let config = r#"{"defaultProfile":"default","profiles":{
        "default":{"routingStrategy":"random"},
        "batch":{"routingStrategy":"least-request"}}}"#;
    let AnnotatedModel { api, engine, gw } = gateway_with_config_annotation(config).await;

    assert_eq!(strategy_of(&gw.chat(MODEL, &[]).await), "random", "profile strategy beats the gateway default");
    assert_eq!(strategy_of(&gw.chat(MODEL, &[("config-profile", "batch")]).await), "least-request");
    assert_eq!(strategy_of(&gw.chat(MODEL, &[("routing-strategy", "least-request")]).await), "least-request");

    // The annotation changes over the watch: a locked strategy now wins over the header.
    let locked = r#"{"lockedRoutingStrategy":"random","profiles":{"default":{"routingStrategy":"least-request"}}}"#;
    api.update_pod(&PodSpec::for_engine(&engine, MODEL).config(locked));
    eventually(PROPAGATION, "the locked strategy applies", || async {
        strategy_of(&gw.chat(MODEL, &[("routing-strategy", "least-request")]).await) == "random"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_annotation_from_the_api_server_sets_the_rps_cap() {
    let config = r#"{"profiles":{"default":{"routingStrategy":"least-request","requestsPerSecond":3}}}"#;
    let AnnotatedModel { api: _api, engine: _engine, gw } = gateway_with_config_annotation(config).await;
    assert_eq!(gw.chat(MODEL, &[]).await.status, StatusCode::OK, "warm-up");

    // Twelve concurrent requests just after a second boundary: the in-process
    // limiter (no Redis here) admits exactly the annotation's cap.
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    let to_next_second = Duration::from_nanos(1_000_000_000 - u64::from(since.subsec_nanos()));
    tokio::time::sleep(to_next_second + Duration::from_millis(20)).await;
    let url = gw.url("/v1/chat/completions");
    let handles: Vec<_> = (0..12).map(|_| tokio::spawn(send(post(&url, &chat_body(MODEL, false), &[])))).collect();
    let mut statuses = Vec::new();
    for handle in handles {
        statuses.push(handle.await.expect("task"));
    }
    let admitted = statuses.iter().filter(|r| r.status == StatusCode::OK).count();
    let limited: Vec<&Reply> = statuses.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!(admitted, 3, "cap from the annotation delivered by the API server");
    assert_eq!(limited.len(), 9);
    assert_eq!(limited[0].header("x-error-model-rps-exceeded"), "true");
    assert_eq!(limited[0].json()["error"]["message"], format!("model: {MODEL} has exceeded RPS: 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_flag_limits_discovery_to_one_namespace() {
    let a = Engine::start("pod-a", "model-a", &[]);
    let b = Engine::start("pod-b", "model-b", &[]);
    let api = FakeApiServer::start().await;
    api.add_pod_in("team-a", &PodSpec::for_engine(&a, "model-a"));
    api.add_pod_in("team-b", &PodSpec::for_engine(&b, "model-b"));
    let gw = start_gateway(&api, &["--namespace", "team-a"]).await;

    assert!(routes_to(&gw, "model-a", "pod-a").await);
    assert_eq!(gw.chat("model-b", &[]).await.status, StatusCode::BAD_REQUEST, "team-b is not watched");
    let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
    assert_eq!(endpoints["model-a"]["pods"][0]["pod"], "team-a/pod-a");

    // Changes in other namespaces never reach the gateway.
    let c = Engine::start("pod-c", "model-c", &[]);
    api.add_pod_in("team-b", &PodSpec::for_engine(&c, "model-c"));
    api.set_ready("team-a/pod-a", false);
    eventually(PROPAGATION, "team-a change applied", || async {
        gw.chat("model-a", &[]).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_eq!(gw.chat("model-c", &[]).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cluster_config_the_gateway_exits_with_a_readable_error() {
    let missing: PathBuf = scratch_dir("kube").join("no-such-kubeconfig");
    let mut gw = Gateway::spawn_with_discovery(Discovery::Kubernetes { kubeconfig: &missing }, &[], &[]);
    let status = gw.proc.wait_exit(Duration::from_secs(10)).expect("the gateway exits");
    assert!(!status.success());
    let log = gw.log();
    assert!(log.contains("--discovery kubernetes: no Kubernetes API config: set KUBECONFIG"), "{log}");
}

const ADAPTER: &str = "sql-lora";

/// The pods `count` requests for `model` went to, in order; each must succeed.
async fn target_pods(gw: &Gateway, model: &str, count: usize) -> Vec<String> {
    let mut pods = Vec::new();
    for _ in 0..count {
        let reply = gw.chat(model, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{model}: {}", reply.text());
        pods.push(reply.header("target-pod").to_owned());
    }
    pods
}

async fn listed_models(gw: &Gateway) -> Vec<String> {
    let models = get_json(&gw.url("/v1/models")).await;
    models["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_adapter_routes_its_name_to_its_instances_and_follows_them() {
    // Every engine answers for the adapter too (the mock checks model names): only the
    // gateway decides which pods get it.
    let engines: Vec<Engine> =
        (0..3).map(|i| Engine::start(&format!("pod{i}"), MODEL, &["--model", ADAPTER])).collect();
    let api = FakeApiServer::start().await;
    for engine in &engines {
        api.add_pod(&PodSpec::for_engine(engine, MODEL));
    }
    api.add_model_adapter("default", ADAPTER, Some(MODEL), &["pod0", "pod2"]);
    let gw = start_gateway(&api, &["--routing-algorithm", "random"]).await;

    // Readiness does not wait for the ModelAdapter list: the adapter comes when it comes.
    eventually(RECOVERY, "the adapter is routable", || async { gw.chat(ADAPTER, &[]).await.status == StatusCode::OK })
        .await;
    let pods = target_pods(&gw, ADAPTER, 20).await;
    assert!(pods.iter().all(|pod| pod == "pod0" || pod == "pod2"), "only the adapter's instances: {pods:?}");
    assert!(pods.iter().any(|pod| pod == "pod0") && pods.iter().any(|pod| pod == "pod2"), "both: {pods:?}");
    assert_eq!(listed_models(&gw).await, [MODEL, ADAPTER]);
    let base = target_pods(&gw, MODEL, 20).await;
    assert!(base.iter().any(|pod| pod == "pod1"), "the base model keeps every pod: {base:?}");

    // AIBrix's controller moves the adapter to pod1.
    eventually(RECOVERY, "the gateway watches ModelAdapters", || async { api.open_model_adapter_watches() == 1 }).await;
    api.set_adapter_instances("default", ADAPTER, &["pod1"]);
    eventually(PROPAGATION, "the adapter moved to pod1", || routes_to(&gw, ADAPTER, "pod1")).await;
    let pods = target_pods(&gw, ADAPTER, 10).await;
    assert!(pods.iter().all(|pod| pod == "pod1"), "{pods:?}");

    // Deleted: the name is unknown again, the base model unaffected.
    api.delete_model_adapter("default", ADAPTER);
    eventually(PROPAGATION, "the adapter is gone", || async {
        gw.chat(ADAPTER, &[]).await.status == StatusCode::BAD_REQUEST
    })
    .await;
    let reply = gw.chat(ADAPTER, &[]).await;
    assert_eq!(reply.json()["error"]["message"], format!("model {ADAPTER} does not exist"), "{}", reply.text());
    assert_eq!(listed_models(&gw).await, [MODEL]);
    assert_eq!(gw.chat(MODEL, &[]).await.status, StatusCode::OK);
    assert!(!gw.log().contains("adapters from ModelAdapter resources are off"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_model_adapter_crd_pods_are_discovered_and_one_warning_says_why() {
    let engine = Engine::start("pod-a", MODEL, &["--model", ADAPTER]);
    let api = FakeApiServer::start().await;
    api.add_pod(&PodSpec::for_engine(&engine, MODEL));
    api.serve_model_adapters(false);
    let gw = start_gateway(&api, &[]).await;
    assert!(routes_to(&gw, MODEL, "pod-a").await);

    // kube's backoff retries (0.8 s, doubling): wait for a few 404s, then count the warnings.
    eventually(RECOVERY, "the ModelAdapter list is retried", || async { api.model_adapter_requests() >= 3 }).await;
    let log = gw.log();
    let warning = "adapters from ModelAdapter resources are off: the API server does not serve \
                   modeladapters.model.aibrix.ai/v1alpha1";
    assert_eq!(log.matches(warning).count(), 1, "one warning, however many retries:\n{log}");
    assert!(!log.contains("ModelAdapter watch failed"), "a 404 is not a watch failure:\n{log}");
    assert_eq!(send(get(&gw.admin_url("/readyz"))).await.status, StatusCode::OK);
    assert!(routes_to(&gw, MODEL, "pod-a").await);
    assert_eq!(listed_models(&gw).await, [MODEL]);

    // The CRD gets installed: adapters come without a restart.
    api.add_model_adapter("default", ADAPTER, None, &["pod-a"]);
    api.serve_model_adapters(true);
    eventually(Duration::from_secs(45), "the adapter is routable once served", || routes_to(&gw, ADAPTER, "pod-a"))
        .await;
    assert!(gw.log().contains("ModelAdapter resources are served now"), "{}", gw.log());
}
