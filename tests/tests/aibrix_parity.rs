//! Issue 17: what an AIBrix user moving over must not lose, against the real
//! binary and mock engines: AIBrix's standalone endpoints file as a
//! discovery source, its pod rules (Ray workers, StormService pod groups),
//! its per-path body checks, and engine errors in the OpenAI shape.

use std::collections::BTreeSet;
use std::time::Duration;

use http::StatusCode;
use turnstile_tests::harness::{Discovery, Engine, Gateway, PodSpec, chat_body, eventually, get_json, post, send};

const MODEL: &str = "Qwen/Qwen2.5-1.5B-Instruct";

/// The pods that answered `count` chat requests, by the `target-pod` header.
async fn answering_pods(gw: &Gateway, count: usize) -> BTreeSet<String> {
    let mut pods = BTreeSet::new();
    for _ in 0..count {
        let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, false), &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        pods.insert(reply.header("target-pod").to_owned());
    }
    pods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aibrix_standalone_endpoints_file_is_a_discovery_source() {
    let (a, b) = (Engine::start("a", MODEL, &[]), Engine::start("b", MODEL, &[]));
    // One by host name, one by address, as AIBrix's own examples write them.
    let file = format!(
        "models:\n  - name: \"{MODEL}\"\n    workers:\n      - \"localhost:{}\"\n      - \"127.0.0.1:{}\"\n",
        a.port(),
        b.port()
    );
    let gw = Gateway::spawn_with_discovery(Discovery::Endpoints(&file), &["--routing-algorithm", "random"], &[]);
    gw.wait_ready().await;

    let models = get_json(&gw.url("/v1/models")).await;
    assert_eq!(models["data"][0]["id"], MODEL);
    let pods = answering_pods(&gw, 20).await;
    let expected: BTreeSet<String> =
        ["qwen-qwen2.5-1.5b-instruct-localhost-0", "qwen-qwen2.5-1.5b-instruct-127-0-0-1-1"].map(String::from).into();
    assert_eq!(pods, expected, "both workers serve, named as AIBrix names them");

    // The file is re-read when it changes: one worker left.
    let one = format!("models:\n  - name: \"{MODEL}\"\n    workers: [\"127.0.0.1:{}\"]\n", b.port());
    std::fs::write(&gw.pods_file, one).expect("rewrite endpoints file");
    // Its one worker is now index 0: a name the first file never had.
    let only = BTreeSet::from(["qwen-qwen2.5-1.5b-instruct-127-0-0-1-0".to_owned()]);
    let pods_file_changed = || async { answering_pods(&gw, 4).await == only };
    eventually(Duration::from_secs(10), "the rewritten file to apply", pods_file_changed).await;

    // A broken rewrite keeps the last good set.
    std::fs::write(&gw.pods_file, "models: [{name: x, workers: [a:1], endpoints: [b:1]}]").expect("rewrite");
    let log_file = gw.log_file.clone();
    eventually(Duration::from_secs(10), "the bad file to be logged", || {
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        async move { log.contains("endpoints file is invalid") }
    })
    .await;
    assert_eq!(answering_pods(&gw, 8).await, only, "the last good set still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ray_workers_and_later_pod_groups_get_no_traffic() {
    let head = Engine::start("head", MODEL, &[]);
    let worker = Engine::start("worker", MODEL, &[]);
    let group1 = Engine::start("group1", MODEL, &[]);
    let pods = [
        PodSpec::for_engine(&head, MODEL).label("ray.io/node-type", "head"),
        PodSpec::for_engine(&worker, MODEL).label("ray.io/node-type", "worker"),
        PodSpec::for_engine(&group1, MODEL).label("stormservice.orchestration.aibrix.ai/pod-group-index", "1"),
    ];
    let gw = Gateway::start(&pods, &["--routing-algorithm", "random"]).await;
    assert_eq!(answering_pods(&gw, 12).await, BTreeSet::from(["head".to_owned()]));
    let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
    assert_eq!(endpoints[MODEL]["pods"].as_array().map(Vec::len), Some(1), "{endpoints}");
}

/// Two engines on consecutive ports, as a data-parallel pod's ranks serve.
fn consecutive_engines() -> (Engine, Engine) {
    for _ in 0..20 {
        let rank0 = Engine::start("dp", MODEL, &[]);
        if let Some(port) = rank0.port().checked_add(1)
            && let Some(rank1) = Engine::try_start_on("dp-rank1", MODEL, port, &[])
        {
            return (rank0, rank1);
        }
    }
    panic!("no two consecutive free ports in 20 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_port_of_a_data_parallel_pod_is_routed_to() {
    let (rank0, rank1) = consecutive_engines();
    let pod = PodSpec::for_engine(&rank0, MODEL).env("data-parallel-size", "2");
    let gw = Gateway::start(&[pod], &["--routing-algorithm", "least-request"]).await;
    let mut addresses = BTreeSet::new();
    for _ in 0..16 {
        let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, false), &[])).await;
        assert_eq!((reply.status, reply.header("target-pod")), (StatusCode::OK, "dp"), "{}", reply.text());
        addresses.insert(reply.header("target-pod-ip").to_owned());
    }
    let expected = BTreeSet::from([rank0.addr.to_string(), rank1.addr.to_string()]);
    assert_eq!(addresses, expected, "both ranks serve, under the pod's name");
    assert!(rank0.requests_total().await > 0 && rank1.requests_total().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_checked_per_path_with_aibrixs_messages() {
    let engine = Engine::start("a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;
    let cases = [
        (
            "/v1/embeddings",
            serde_json::json!({"model": MODEL, "input": ["ok", ""]}),
            "input at index 1 cannot be an empty string",
            "input",
        ),
        (
            "/v1/embeddings",
            serde_json::json!({"model": MODEL, "input": "x", "stream": true}),
            "stream not supported for embeddings",
            "stream",
        ),
        ("/v1/responses", serde_json::json!({"model": MODEL}), "'input' is a required property", "input"),
        ("/v1/responses", serde_json::json!({"model": MODEL, "input": []}), "'input' array cannot be empty", "input"),
        ("/v1/completions", serde_json::json!({"model": MODEL}), "'prompt' is a required property", "prompt"),
    ];
    for (path, body, message, param) in cases {
        let reply = send(post(&gw.url(path), &body.to_string(), &[])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path} {body}");
        assert_eq!(reply.json()["error"]["message"], message);
        assert_eq!(reply.json()["error"]["param"], param);
        assert_eq!(reply.header("x-error-request-body-processing"), "true");
    }
    let before = engine.requests_total().await;
    assert_eq!(before, 0, "no refused body reached the engine");
    let good = serde_json::json!({"model": MODEL, "input": ["a", "b"]});
    assert_eq!(send(post(&gw.url("/v1/embeddings"), &good.to_string(), &[])).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_errors_arrive_in_the_openai_shape_with_the_engines_status() {
    let cases: [(&str, &str, serde_json::Value); 4] = [
        (
            "400",
            "flat",
            serde_json::json!({"message": "mock failure", "type": "InternalServerError", "param": null, "code": 400}),
        ),
        (
            "503",
            "text",
            serde_json::json!({"message": "mock failure", "type": "overloaded_error", "param": null, "code": "service_unavailable"}),
        ),
        (
            "502",
            "html",
            serde_json::json!({"message": "Internal server error", "type": "api_error", "param": null, "code": null}),
        ),
        (
            "422",
            "openai",
            serde_json::json!({"message": "mock failure", "type": "InternalServerError", "param": null, "code": 422}),
        ),
    ];
    for (status, style, error) in cases {
        let engine = Engine::start("a", MODEL, &["--fail-status", status, "--fail-body", style]);
        let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;
        let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, false), &[])).await;
        assert_eq!(reply.status.as_str(), status, "{style}: the engine's status is kept");
        assert_eq!(reply.header("content-type"), "application/json", "{style}");
        assert_eq!(reply.json(), serde_json::json!({ "error": error }), "{style}: {}", reply.text());
    }
}
