//! LoRA adapters through the real `turnstile` binary and mock vLLM engines:
//! the gateway learns which pods serve an adapter from each engine's own
//! `/v1/models`, follows adapters loaded and unloaded at runtime, lists them
//! with their parent, and prefers the pods where an adapter already runs,
//! then those with a free adapter slot (`vllm:lora_requests_info`).
//! ModelAdapter resources are tested with the fake API server in
//! `kubernetes.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, chat_body, eventually, get, get_json, post, send};

const MODEL: &str = "llama";
/// How often the gateway reads each engine's `/v1/models` in these tests.
const REFRESH: &[&str] = &["--adapter-refresh-interval-ms", "100"];

async fn chat(gw: &Gateway, model: &str) -> turnstile_tests::harness::Reply {
    send(post(&gw.url("/v1/chat/completions"), &chat_body(model, false), &[])).await
}

/// The pods `n` requests for `model` went to; each must succeed.
async fn pods_serving(gw: &Gateway, model: &str, n: usize) -> BTreeSet<String> {
    let mut pods = BTreeSet::new();
    for _ in 0..n {
        let reply = chat(gw, model).await;
        assert_eq!(reply.status, StatusCode::OK, "{model}: {}", reply.text());
        assert_eq!(reply.json()["model"], model, "the engine answered for the adapter");
        pods.insert(reply.header("target-pod").to_owned());
    }
    pods
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

async fn lora_call(engine: &Engine, path: &str, body: serde_json::Value) {
    let reply = send(post(&engine.url(path), &body.to_string(), &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{path} on {}: {}", engine.name, reply.text());
}

/// Waits until the gateway has read `engine`'s metrics page a few more times.
async fn scraped_again(engine: &Engine) {
    let before = engine.metrics_scrapes().await;
    eventually(Duration::from_secs(5), "the engine's metrics are read again", || async {
        engine.metrics_scrapes().await >= before + 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_route_to_the_engines_that_list_them_across_load_and_unload() {
    let a = Engine::start("a", MODEL, &["--lora-modules", "sql"]);
    let b = Engine::start("b", MODEL, &[]);
    let c = Engine::start("c", MODEL, &[]);
    let pods = [PodSpec::for_engine(&a, MODEL), PodSpec::for_engine(&b, MODEL), PodSpec::for_engine(&c, MODEL)];
    let gw = Gateway::start(&pods, &[REFRESH, &["--routing-algorithm", "random"]].concat()).await;
    eventually(Duration::from_secs(5), "sql is known", || async { chat(&gw, "sql").await.status == StatusCode::OK })
        .await;
    assert_eq!(pods_serving(&gw, "sql", 12).await, set(&["a"]), "only the engine that lists it");
    assert_eq!(pods_serving(&gw, "llama", 40).await, set(&["a", "b", "c"]), "the base model is unchanged");

    let models = get_json(&gw.url("/v1/models")).await;
    let listed: Vec<(String, serde_json::Value)> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or("").to_owned(), m["parent"].clone()))
        .collect();
    assert_eq!(listed, [("llama".to_owned(), json!(null)), ("sql".to_owned(), json!("llama"))]);
    let one = get_json(&gw.url("/v1/models/sql")).await;
    assert_eq!((&one["id"], &one["parent"], &one["object"]), (&json!("sql"), &json!("llama"), &json!("model")));

    // Loaded on c at runtime: c takes its share within a refresh.
    lora_call(&c, "/v1/load_lora_adapter", json!({"lora_name": "sql", "lora_path": "/adapters/sql"})).await;
    eventually(Duration::from_secs(5), "sql routes to a and c", || async {
        pods_serving(&gw, "sql", 12).await == set(&["a", "c"])
    })
    .await;
    // Unloaded on a: only c, and no request fails meanwhile (a's 404 before
    // the next read sends the request on to c).
    lora_call(&a, "/v1/unload_lora_adapter", json!({"lora_name": "sql"})).await;
    for _ in 0..10 {
        assert_eq!(pods_serving(&gw, "sql", 4).await, set(&["c"]));
    }
    assert_eq!(pods_serving(&gw, "sql", 12).await, set(&["c"]));
    // Unloaded everywhere: an unknown model at once (the engine's 404 is
    // the gateway's 400), then listed nowhere.
    lora_call(&c, "/v1/unload_lora_adapter", json!({"lora_name": "sql"})).await;
    let reply = chat(&gw, "sql").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["error"]["message"], "model sql does not exist");
    eventually(Duration::from_secs(5), "sql is no longer listed", || async {
        send(get(&gw.url("/v1/models/sql"))).await.status == StatusCode::NOT_FOUND
    })
    .await;
    let missing = send(get(&gw.url("/v1/models/sql"))).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
    assert_eq!(missing.json()["error"]["code"], "model_not_found");
    assert_eq!(b.stats().await["lora"]["served"], json!({}), "b never got an adapter request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_requests_prefer_pods_running_it_then_pods_with_a_free_slot() {
    // One adapter slot each; every engine serves both adapters.
    let args = ["--lora-modules", "sql,chat", "--max-loras", "1"];
    let engines: Vec<Engine> = ["e0", "e1", "e2"].iter().map(|name| Engine::start(name, MODEL, &args)).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    let gw = Gateway::start(&pods, &[REFRESH, &["--routing-algorithm", "random"]].concat()).await;
    eventually(Duration::from_secs(5), "both adapters are known", || async {
        chat(&gw, "sql").await.status == StatusCode::OK && chat(&gw, "chat").await.status == StatusCode::OK
    })
    .await;

    // e1 runs sql: a slow stream sent to it directly holds its only slot.
    let busy = &engines[1];
    busy.set_faults(json!({"itl_ms": 200})).await;
    let held = tokio::spawn({
        let url = busy.url("/v1/completions");
        async move {
            let body = json!({"model": "sql", "prompt": "x", "max_tokens": 40}).to_string();
            send(post(&url, &body, &[])).await
        }
    });
    eventually(Duration::from_secs(5), "e1 reports sql running", || async {
        let page = send(get(&busy.url("/metrics"))).await.text();
        page.contains(r#"running_lora_adapters="sql""#)
    })
    .await;
    for engine in &engines {
        scraped_again(engine).await;
    }
    let before = gw.metrics().await;
    let count = |page: &str, model: &str, tier: &str| -> u64 {
        let series = format!(r#"turnstile_lora_affinity_routes_total{{model="{model}",tier="{tier}"}} "#);
        page.lines().find_map(|line| line.strip_prefix(&series)?.parse().ok()).unwrap_or(0)
    };

    // sql: the pod running it, every time, though the strategy is random.
    let mut sql = BTreeSet::new();
    for _ in 0..6 {
        let reply = send(post(&gw.url("/v1/completions"), r#"{"model":"sql","prompt":"x","max_tokens":1}"#, &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        sql.insert(reply.header("target-pod").to_owned());
    }
    assert_eq!(sql, set(&["e1"]));
    // chat: e1's only slot is taken; the pods with a free slot share it.
    assert_eq!(pods_serving(&gw, "chat", 24).await, set(&["e0", "e2"]));

    let after = gw.metrics().await;
    assert_eq!(count(&after, "sql", "running") - count(&before, "sql", "running"), 6, "{after}");
    let chat_other = count(&after, "chat", "other") - count(&before, "chat", "other");
    let chat_tiered = count(&after, "chat", "free_slot") + count(&after, "chat", "running")
        - count(&before, "chat", "free_slot")
        - count(&before, "chat", "running");
    assert_eq!((chat_tiered, chat_other), (24, 0), "{after}");
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_lists_and_retrieves_adapters_and_chats_with_one() {
    let engine = Engine::start("a", MODEL, &["--lora-modules", "org/sql-lora"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], REFRESH).await;
    eventually(Duration::from_secs(5), "the adapter is known", || async {
        chat(&gw, "org/sql-lora").await.status == StatusCode::OK
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_models.py");
    let (python, base_url) = (turnstile_tests::harness::openai_python(), gw.url("/v1"));
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([base_url.as_str(), "org/sql-lora", "nope"])
            .output()
            .expect("run python")
    })
    .await
    .expect("python task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let mut seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    // The SDK finds the gateway's request id (x-request-id) on answers and errors.
    let ids = seen["request_ids"].take();
    let ids: Vec<&str> = ids.as_array().expect("ids").iter().filter_map(|id| id.as_str()).collect();
    assert!(ids.len() == 2 && ids.iter().all(|id| id.len() == 36) && ids[0] != ids[1], "{ids:?}");
    seen.as_object_mut().expect("object").remove("request_ids");
    assert_eq!(
        seen,
        json!({
            "listed": {"llama": null, "org/sql-lora": "llama"},
            "retrieved": ["org/sql-lora", "llama"],
            "missing": "NotFoundError",
            "answered_as": "org/sql-lora",
        })
    );
}
