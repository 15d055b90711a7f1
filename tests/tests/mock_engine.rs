//! The `mock-engine` binary as a harness sees it: started with port 0, driven over HTTP.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

/// Upper bound for any one test step.
const STEP: Duration = Duration::from_secs(10);

/// A running `mock-engine` process, killed on drop.
struct Engine {
    client: Client,
    _child: Child,
}

impl std::ops::Deref for Engine {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Talks HTTP/1.1 to an engine, one connection per request.
#[derive(Clone, Copy)]
struct Client {
    addr: SocketAddr,
}

impl Engine {
    async fn start(args: &[&str]) -> Result<Self> {
        Ok(Self::start_announcing(args, &[]).await?.0)
    }

    /// Starts an engine and reads its address, then one address per `more` banner prefix
    /// (e.g. an SGLang prefill's bootstrap server).
    async fn start_announcing(args: &[&str], more: &[&str]) -> Result<(Self, Vec<SocketAddr>)> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mock-engine"))
            .args(["--listen", "127.0.0.1:0", "--name", "pod-a"])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning mock-engine")?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut addrs = Vec::new();
        for prefix in std::iter::once("mock-engine listening on ").chain(more.iter().copied()) {
            let mut line = String::new();
            timeout(STEP, stdout.read_line(&mut line)).await.context("mock-engine did not announce its address")??;
            let addr = line
                .trim()
                .strip_prefix(prefix)
                .with_context(|| format!("unexpected line {line:?}, wanted {prefix:?}"))?
                .parse()?;
            addrs.push(addr);
        }
        let addr = addrs.remove(0);
        Ok((Self { client: Client { addr }, _child: child }, addrs))
    }
}

impl Client {
    /// Sends one request on a fresh connection and returns the response head and body.
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<http::Response<Incoming>> {
        let stream = TcpStream::connect(self.addr).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let body = body.map_or_else(Bytes::new, |json| Bytes::from(json.to_string()));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .header("x-request-id", "test-1")
            .body(Full::new(body))?;
        Ok(timeout(STEP, sender.send_request(request)).await??)
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(StatusCode, HeaderMap, Bytes)> {
        let response = self.send(method, path, body).await?;
        let (parts, body) = response.into_parts();
        let body = timeout(STEP, body.collect()).await??.to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> Result<(StatusCode, Value)> {
        let (status, _, body) = self.call(method, path, body).await?;
        Ok((status, serde_json::from_slice(&body)?))
    }

    async fn metrics(&self) -> Result<String> {
        let (status, _, body) = self.call(Method::GET, "/metrics", None).await?;
        assert_eq!(status, StatusCode::OK);
        Ok(String::from_utf8(body.to_vec())?)
    }

    /// Polls `/metrics` until `done` holds for it.
    async fn wait_for_metrics(&self, what: &str, done: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + STEP;
        loop {
            let text = self.metrics().await?;
            if done(&text) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}; last /metrics:\n{text}");
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls `/mock/stats` until `in_flight` equals `expected`.
    async fn wait_for_in_flight(&self, expected: u64) -> Result<Value> {
        let deadline = Instant::now() + STEP;
        loop {
            let (_, stats) = self.json(Method::GET, "/mock/stats", None).await?;
            if stats["in_flight"] == expected {
                return Ok(stats);
            }
            if Instant::now() > deadline {
                bail!("in_flight never became {expected}: {stats}");
            }
            sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The value of the first sample of `family` (any labels).
fn sample(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(family)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.parse().ok()
        })
        .unwrap_or_else(|| panic!("no sample of {family} in\n{text}"))
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": "say something short"}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// Reads a streamed body, returning each complete SSE event with its arrival time, and
/// whether the body ended with an error.
async fn read_events(mut body: Incoming) -> (Vec<(Instant, String)>, bool) {
    let mut events = Vec::new();
    let mut buffer = String::new();
    loop {
        match timeout(STEP, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                buffer.push_str(std::str::from_utf8(&data).unwrap());
                while let Some((event, rest)) = buffer.split_once("\n\n") {
                    events.push((Instant::now(), event.to_owned()));
                    buffer = rest.to_owned();
                }
            }
            Ok(None) => return (events, false),
            Ok(Some(Err(_))) => return (events, true),
            Err(_) => panic!("stream stalled after {} events", events.len()),
        }
    }
}

fn event_json(event: &str) -> Value {
    serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap()
}

#[tokio::test]
async fn streamed_chat_arrives_event_by_event() -> Result<()> {
    let itl = Duration::from_millis(40);
    let engine = Engine::start(&["--ttft-ms", "20", "--itl-ms", "40"]).await?;
    let response = engine.send(Method::POST, "/v1/chat/completions", Some(chat(5, true))).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-mock-engine"], "pod-a");

    let (events, failed) = read_events(response.into_body()).await;
    assert!(!failed);
    assert_eq!(events.len(), 7, "5 tokens, usage, [DONE]: {events:?}");
    let content: String = events[..5]
        .iter()
        .map(|(_, event)| event_json(event)["choices"][0]["delta"]["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(content, "tok0 tok1 tok2 tok3 tok4");
    assert_eq!(event_json(&events[0].1)["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(event_json(&events[4].1)["choices"][0]["finish_reason"], "length");
    let usage = event_json(&events[5].1);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}));
    assert_eq!(events[6].1, "data: [DONE]");

    // Each token left the engine when it was produced, not with the rest.
    let spread = events[4].0 - events[0].0;
    assert!(spread >= itl * 2, "tokens arrived together: {spread:?}");
    Ok(())
}

#[tokio::test]
async fn metrics_follow_running_requests() -> Result<()> {
    let engine = Engine::start(&["--itl-ms", "25", "--tokens", "20", "--max-running", "1"]).await?;
    let body = json!({"model": "mock-model", "prompt": "one two three"});
    let client = engine.client;
    let first = tokio::spawn({
        let body = body.clone();
        async move { client.call(Method::POST, "/v1/completions", Some(body)).await }
    });
    let text =
        engine.wait_for_metrics("one running request", |text| sample(text, "vllm:num_requests_running") == 1.0).await?;
    let generated_before = sample(&text, "vllm:generation_tokens_total");
    assert!(sample(&text, "vllm:kv_cache_usage_perc") > 0.0);

    let second = tokio::spawn(async move { client.call(Method::POST, "/v1/completions", Some(body)).await });
    let text =
        engine.wait_for_metrics("one waiting request", |text| sample(text, "vllm:num_requests_waiting") == 1.0).await?;
    assert_eq!(sample(&text, "vllm:num_requests_running"), 1.0);
    let generated = |text: &str| sample(text, "vllm:generation_tokens_total");
    let text =
        engine.wait_for_metrics("the generation counter to grow", |text| generated(text) > generated_before).await?;
    assert_eq!(sample(&text, "vllm:num_requests_running"), 1.0);

    for request in [first, second] {
        let (status, _, body) = timeout(STEP, request).await???;
        assert_eq!(status, StatusCode::OK);
        let body: Value = serde_json::from_slice(&body)?;
        assert_eq!(body["usage"]["completion_tokens"], 20);
    }
    let text = engine.metrics().await?;
    assert_eq!(sample(&text, "vllm:num_requests_running"), 0.0);
    assert_eq!(sample(&text, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(sample(&text, "vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(sample(&text, "vllm:generation_tokens_total"), 40.0);
    assert_eq!(sample(&text, "vllm:prompt_tokens_total"), 6.0);
    assert_eq!(sample(&text, "vllm:request_success_total"), 2.0);
    assert_eq!(sample(&text, "vllm:time_to_first_token_seconds_count"), 2.0);
    assert_eq!(sample(&text, "vllm:time_per_output_token_seconds_count"), 38.0);
    // Each request spent its 19 inter-token delays of 25 ms.
    assert!(sample(&text, "vllm:e2e_request_latency_seconds_sum") >= 0.95);
    Ok(())
}

#[tokio::test]
async fn faults_switch_at_run_time() -> Result<()> {
    let engine = Engine::start(&[]).await?;
    let (status, _) = engine.json(Method::POST, "/v1/chat/completions", Some(chat(2, false))).await?;
    assert_eq!(status, StatusCode::OK);

    let (status, faults) = engine.json(Method::POST, "/mock/faults", Some(json!({"fail_status": 500}))).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(faults["fail_status"], 500);
    let (status, headers, body) = engine.call(Method::POST, "/v1/chat/completions", Some(chat(2, false))).await?;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers["x-mock-engine"], "pod-a");
    assert_eq!(
        serde_json::from_slice::<Value>(&body)?,
        json!({"error": {"message": "mock failure", "type": "InternalServerError", "param": null, "code": 500}})
    );

    // Streams break after the given number of events; plain answers never start.
    let patch = json!({"fail_status": null, "reset_after_chunks": 2});
    let (status, _) = engine.json(Method::POST, "/mock/faults", Some(patch)).await?;
    assert_eq!(status, StatusCode::OK);
    let response = engine.send(Method::POST, "/v1/chat/completions", Some(chat(10, true))).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let (events, failed) = read_events(response.into_body()).await;
    assert!(failed, "the stream must end abruptly");
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(engine.send(Method::POST, "/v1/completions", Some(json!({"prompt": "x"}))).await.is_err());

    // A hung request holds its place until the client leaves.
    let patch = json!({"reset_after_chunks": null, "hang": true});
    engine.json(Method::POST, "/mock/faults", Some(patch)).await?;
    let mut client = TcpStream::connect(engine.addr).await?;
    let body = chat(1, false).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await?;
    let stats = engine.wait_for_in_flight(1).await?;
    let mut byte = [0_u8; 1];
    assert!(timeout(Duration::from_millis(200), client.read(&mut byte)).await.is_err(), "no answer");
    drop(client);
    engine.wait_for_in_flight(0).await?;

    assert_eq!(stats["name"], "pod-a");
    assert_eq!(stats["requests_total"], 5);
    assert_eq!(stats["by_path"]["/v1/chat/completions"], 4);
    assert_eq!(stats["by_path"]["/v1/completions"], 1);
    assert_eq!(stats["last_request"]["path"], "/v1/chat/completions");
    assert_eq!(stats["last_request"]["body"]["max_tokens"], 1);
    Ok(())
}

#[tokio::test]
async fn records_the_trace_context_of_each_request() -> Result<()> {
    use turnstile_tests::harness;

    // Through the harness's engine handle, whose `traceparents` tracing tests read.
    let engine = harness::Engine::start("pod-t", "m", &[]);
    let url = engine.url("/v1/chat/completions");
    let body = harness::chat_body("m", false);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced =
        harness::send(harness::post(&url, &body, &[("traceparent", traceparent), ("tracestate", "gw=1")])).await;
    assert_eq!(traced.status, StatusCode::OK, "{}", traced.text());
    let untraced = harness::send(harness::post(&url, &body, &[])).await;
    assert_eq!(untraced.status, StatusCode::OK, "{}", untraced.text());

    assert_eq!(engine.traceparents().await, [traceparent]);
    let stats = engine.stats().await;
    assert_eq!(
        stats["traceparents"],
        json!([
            {"path": "/v1/chat/completions", "traceparent": traceparent, "tracestate": "gw=1"},
            {"path": "/v1/chat/completions", "traceparent": null, "tracestate": null},
        ])
    );
    Ok(())
}

#[tokio::test]
async fn serves_models_health_and_other_endpoints() -> Result<()> {
    let engine = Engine::start(&["--model", "a", "--model", "b", "--tokens", "3"]).await?;
    let (status, models) = engine.json(Method::GET, "/v1/models", None).await?;
    assert_eq!(status, StatusCode::OK);
    let b = &models["data"][1];
    assert_eq!(
        (&b["id"], &b["object"], &b["created"], &b["owned_by"], &b["root"], &b["parent"], &b["max_model_len"]),
        (&json!("b"), &json!("model"), &json!(0), &json!("vllm"), &json!("b"), &Value::Null, &json!(65536))
    );
    assert_eq!(b["permission"][0]["object"], "model_permission");
    let (status, _, body) = engine.call(Method::GET, "/health", None).await?;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));

    let (status, error) =
        engine.json(Method::POST, "/v1/completions", Some(json!({"model": "c", "prompt": "x"}))).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        error,
        json!({"error": {"message": "The model `c` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    );
    let (status, _, _) = engine.call(Method::POST, "/v1/completions", Some(json!("not an object"))).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, completion) =
        engine.json(Method::POST, "/v1/completions", Some(json!({"model": "b", "prompt": "x y"}))).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(completion["choices"][0]["text"], "tok0 tok1 tok2");
    assert_eq!(completion["usage"]["prompt_tokens"], 2);

    let (status, embeddings) =
        engine.json(Method::POST, "/v1/embeddings", Some(json!({"model": "a", "input": ["p", "q r"]}))).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(embeddings["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(embeddings["usage"]["prompt_tokens"], 3);

    let (status, response) =
        engine.json(Method::POST, "/v1/responses", Some(json!({"model": "a", "input": "hi"}))).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response["usage"]["output_tokens"], 3);

    let (status, _, _) = engine.call(Method::GET, "/nowhere", None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

/// The `vllm:engine_sleep_state` samples of a `/metrics` page: (awake, weights_offloaded,
/// discard_all).
fn sleep_state(text: &str) -> (f64, f64, f64) {
    let state = |label: &str| {
        sample(text, &format!(r#"vllm:engine_sleep_state{{engine="0",model_name="mock-model",sleep_state="{label}"}}"#))
    };
    (state("awake"), state("weights_offloaded"), state("discard_all"))
}

#[tokio::test]
async fn a_sleeping_engine_refuses_inference_until_it_has_woken() -> Result<()> {
    let delay = Duration::from_millis(300);
    let engine = Engine::start(&["--sleeping", "--wake-delay-ms", "300"]).await?;
    let (status, answer) = engine.json(Method::GET, "/is_sleeping", None).await?;
    assert_eq!((status, answer), (StatusCode::OK, json!({"is_sleeping": true})));
    assert_eq!(sleep_state(&engine.metrics().await?), (0.0, 1.0, 0.0));

    let (status, headers, body) = engine.call(Method::POST, "/v1/chat/completions", Some(chat(2, false))).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-mock-engine"], "pod-a");
    assert_eq!(
        serde_json::from_slice::<Value>(&body)?,
        json!({"error": {"message": "model is sleeping", "type": "ServiceUnavailableError", "param": null, "code": 503}})
    );
    // Models and health still answer.
    let (status, _, _) = engine.call(Method::GET, "/v1/models", None).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = engine.call(Method::GET, "/health", None).await?;
    assert_eq!(status, StatusCode::OK);

    let asked = Instant::now();
    let (status, _, body) = engine.call(Method::POST, "/wake_up", None).await?;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
    let (_, answer) = engine.json(Method::GET, "/is_sleeping", None).await?;
    assert!(answer["is_sleeping"] == true || asked.elapsed() >= delay, "awake before the delay: {answer}");
    let deadline = asked + STEP;
    loop {
        let (_, answer) = engine.json(Method::GET, "/is_sleeping", None).await?;
        if answer["is_sleeping"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "never woke");
        sleep(Duration::from_millis(20)).await;
    }
    assert!(asked.elapsed() >= delay, "woke after {:?}", asked.elapsed());
    let (status, answer) = engine.json(Method::POST, "/v1/chat/completions", Some(chat(2, false))).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(sleep_state(&engine.metrics().await?), (1.0, 0.0, 0.0));

    // Level 2, asked for by name on a filtered page.
    let (status, _, body) = engine.call(Method::POST, "/sleep?level=2", None).await?;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
    let (_, _, page) = engine.call(Method::GET, "/metrics?name[]=vllm:engine_sleep_state", None).await?;
    let page = String::from_utf8(page.to_vec())?;
    assert_eq!(sleep_state(&page), (0.0, 0.0, 1.0));
    assert_eq!(page.lines().count(), 5, "{page}");
    let (status, error) = engine.json(Method::POST, "/sleep?level=3", None).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["param"], "level");

    let (_, stats) = engine.json(Method::GET, "/mock/stats", None).await?;
    assert_eq!(
        stats["sleep"],
        json!({"state": "discard_all", "waking": false, "sleep_calls": 2, "wake_up_calls": 1,
            "refused_while_asleep": 1})
    );
    assert_eq!(stats["by_path"]["/v1/chat/completions"], 2);
    Ok(())
}

/// The labels and value of the `vllm:lora_requests_info` sample of a `/metrics` page.
fn lora_info(text: &str) -> (String, f64) {
    text.lines()
        .find_map(|line| {
            let (labels, value) = line.strip_prefix("vllm:lora_requests_info{")?.split_once("} ")?;
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .unwrap_or_else(|| panic!("no vllm:lora_requests_info sample in\n{text}"))
}

/// The ids `/v1/models` lists.
async fn model_ids(client: &Client) -> Result<Vec<String>> {
    let (status, models) = client.json(Method::GET, "/v1/models", None).await?;
    assert_eq!(status, StatusCode::OK);
    let data = models["data"].as_array().context("data")?;
    Ok(data.iter().filter_map(|model| model["id"].as_str().map(str::to_owned)).collect())
}

#[tokio::test]
async fn lora_adapters_load_serve_and_unload() -> Result<()> {
    let engine = Engine::start(&["--lora-modules", "sql=/models/sql", "--max-loras", "2"]).await?;
    let (status, models) = engine.json(Method::GET, "/v1/models", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["data"][0]["parent"], Value::Null);
    let sql = &models["data"][1];
    assert_eq!(
        (&sql["id"], &sql["root"], &sql["parent"]),
        (&json!("sql"), &json!("/models/sql"), &json!("mock-model"))
    );
    let (labels, _) = lora_info(&engine.metrics().await?);
    assert_eq!(labels, r#"max_lora="2",running_lora_adapters="",waiting_lora_adapters="""#);

    // Loading: a short text; a name already loaded or a missing field is refused.
    let load = |name: &str, path: &str| json!({"lora_name": name, "lora_path": path});
    let (status, headers, body) =
        engine.call(Method::POST, "/v1/load_lora_adapter", Some(load("chat", "/adapters/chat"))).await?;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"Success: LoRA adapter 'chat' added successfully."[..]));
    assert_eq!(headers["x-mock-engine"], "pod-a");
    let (status, error) = engine.json(Method::POST, "/v1/load_lora_adapter", Some(load("chat", "/elsewhere"))).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error,
        json!({"error": {"message": "The lora adapter 'chat' has already been loaded.", "type": "BadRequestError",
            "param": null, "code": 400}})
    );
    let (status, error) = engine.json(Method::POST, "/v1/load_lora_adapter", Some(json!({"lora_name": "x"}))).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["message"], "Both 'lora_name' and 'lora_path' must be provided.");
    let (status, _, _) = engine.call(Method::GET, "/v1/load_lora_adapter", None).await?;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    assert_eq!(model_ids(&engine).await?, ["mock-model", "sql", "chat"]);
    let (_, models) = engine.json(Method::GET, "/v1/models", None).await?;
    let chat_card = &models["data"][2];
    assert_eq!((&chat_card["root"], &chat_card["parent"]), (&json!("/adapters/chat"), &json!("mock-model")));

    // Served like the base model, under the adapter's name.
    let completion = json!({"model": "chat", "prompt": "x y", "max_tokens": 2});
    let (status, answer) = engine.json(Method::POST, "/v1/completions", Some(completion.clone())).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!((&answer["model"], &answer["choices"][0]["text"]), (&json!("chat"), &json!("tok0 tok1")));
    let (status, answer) =
        engine.json(Method::POST, "/v1/embeddings", Some(json!({"model": "sql", "input": "a"}))).await?;
    assert_eq!((status, &answer["model"]), (StatusCode::OK, &json!("sql")));

    // Running while in flight: a stream on one adapter, a slow answer on the other.
    engine.json(Method::POST, "/mock/faults", Some(json!({"itl_ms": 150}))).await?;
    let mut streamed = chat(8, true);
    streamed["model"] = json!("chat");
    let stream = engine.send(Method::POST, "/v1/chat/completions", Some(streamed)).await?;
    assert_eq!(stream.status(), StatusCode::OK);
    let client = engine.client;
    let slow = tokio::spawn(async move {
        let body = json!({"model": "sql", "prompt": "x", "max_tokens": 4});
        client.json(Method::POST, "/v1/completions", Some(body)).await
    });
    let page = engine
        .wait_for_metrics("both adapters running", |text| {
            lora_info(text).0.contains(r#"running_lora_adapters="chat,sql""#)
        })
        .await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    assert!((lora_info(&page).1 - now).abs() < 60.0, "the gauge is the time: {page}");
    let (_, _, filtered) = engine.call(Method::GET, "/metrics?name[]=vllm:lora_requests_info", None).await?;
    let filtered = String::from_utf8(filtered.to_vec())?;
    assert_eq!(filtered.lines().count(), 3, "{filtered}");
    assert!(lora_info(&filtered).0.contains(r#"running_lora_adapters="chat,sql""#), "{filtered}");

    let (events, failed) = read_events(stream.into_body()).await;
    assert!(!failed);
    assert_eq!(events.len(), 10, "8 tokens, usage, [DONE]: {events:?}");
    assert_eq!(event_json(&events[0].1)["model"], "chat");
    let (status, answer) = timeout(STEP, slow).await???;
    assert_eq!((status, &answer["model"]), (StatusCode::OK, &json!("sql")));
    let idle = r#"max_lora="2",running_lora_adapters="",waiting_lora_adapters="""#;
    engine.wait_for_metrics("no adapter running", |text| lora_info(text).0 == idle).await?;

    let (_, stats) = engine.json(Method::GET, "/mock/stats", None).await?;
    assert_eq!(
        stats["lora"],
        json!({"loaded": ["chat", "sql"], "max_loras": 2, "served": {"chat": 2, "sql": 2}, "loads": 1, "unloads": 0})
    );

    // Unloaded: no longer listed nor served; a second unload finds nothing.
    let unload = json!({"lora_name": "chat"});
    let (status, _, body) = engine.call(Method::POST, "/v1/unload_lora_adapter", Some(unload.clone())).await?;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"Success: LoRA adapter 'chat' removed successfully."[..]));
    let (status, error) = engine.json(Method::POST, "/v1/completions", Some(completion)).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        error,
        json!({"error": {"message": "The model `chat` does not exist.", "type": "NotFoundError", "param": "model",
            "code": 404}})
    );
    assert_eq!(model_ids(&engine).await?, ["mock-model", "sql"]);
    let (status, error) = engine.json(Method::POST, "/v1/unload_lora_adapter", Some(unload)).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        error,
        json!({"error": {"message": "The lora adapter 'chat' cannot be found.", "type": "NotFoundError",
            "param": null, "code": 404}})
    );
    let (_, stats) = engine.json(Method::GET, "/mock/stats", None).await?;
    assert_eq!(
        stats["lora"],
        json!({"loaded": ["sql"], "max_loras": 2, "served": {"chat": 2, "sql": 2}, "loads": 1, "unloads": 1})
    );
    Ok(())
}

#[tokio::test]
async fn sglang_decode_waits_for_its_prefill_on_the_bootstrap_server() -> Result<()> {
    let (prefill, bootstrap) = Engine::start_announcing(
        &["--role", "prefill", "--engine-kind", "sglang", "--bootstrap-port", "0"],
        &["mock-engine bootstrap listening on "],
    )
    .await?;
    let bootstrap = bootstrap[0];
    assert_eq!(bootstrap.ip(), prefill.addr.ip());
    assert_ne!(bootstrap.port(), prefill.addr.port());
    let decode =
        Engine::start(&["--role", "decode", "--engine-kind", "sglang", "--bootstrap-timeout-ms", "400"]).await?;
    let (_, stats) = prefill.json(Method::GET, "/mock/stats", None).await?;
    assert_eq!(stats["pd"]["bootstrap_port"], bootstrap.port());

    let room = 9_007_199_254_740_993_u64;
    let fields = json!({"bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap.port(), "bootstrap_room": room});
    let mut decode_body = chat(3, true);
    decode_body.as_object_mut().context("object")?.extend(fields.as_object().cloned().context("object")?);
    let mut prefill_body = decode_body.clone();
    prefill_body["max_tokens"] = json!(1);
    prefill_body["stream"] = json!(false);
    prefill_body.as_object_mut().context("object")?.remove("stream_options");

    // The gateway sends both halves at once; here the decode even comes first.
    let (prefill_client, decode_client) = (prefill.client, decode.client);
    let decoded = tokio::spawn({
        let body = decode_body.clone();
        async move { decode_client.call(Method::POST, "/v1/chat/completions", Some(body)).await }
    });
    sleep(Duration::from_millis(50)).await;
    let (status, answer) = prefill_client.json(Method::POST, "/v1/chat/completions", Some(prefill_body)).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 1);
    let (status, headers, body) = timeout(STEP, decoded).await???;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "text/event-stream");
    let (_, stats) = decode.json(Method::GET, "/mock/stats", None).await?;
    assert_eq!(stats["pd"]["engine"], "sglang");
    assert_eq!(stats["pd"]["transfers"][0]["bootstrap_room"], room.to_string());
    assert_eq!(stats["pd"]["transfers"][0]["stream"], true);

    // A room no prefill filled: 504 once the wait is over.
    decode_body["bootstrap_room"] = json!(room + 1);
    let (status, error) = decode.json(Method::POST, "/v1/chat/completions", Some(decode_body)).await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        error["error"]["message"],
        format!("decode pod: bootstrap room {} was never prefilled within 400 ms", room + 1)
    );
    let (_, stats) = decode.json(Method::GET, "/mock/stats", None).await?;
    assert_eq!((stats["pd"]["accepted"].as_u64(), stats["pd"]["rejected"].as_u64()), (Some(1), Some(1)));
    Ok(())
}

#[tokio::test]
async fn trtllm_and_nixl_prefill_answers_carry_what_the_decode_needs() -> Result<()> {
    // TensorRT-LLM: the prefill answers with the prompt's token ids and the parameters the
    // decode needs; the decode takes them back, the ids as a completion's prompt.
    let prefill = Engine::start(&["--role", "prefill", "--engine-kind", "trtllm"]).await?;
    let decode = Engine::start(&["--role", "decode", "--engine-kind", "trtllm"]).await?;
    let disagg_id = (1_u64 << 60) + 1;
    let client = json!({"model": "mock-model", "prompt": "one two three", "max_tokens": 4});
    let mut prefill_body = client.clone();
    prefill_body["max_tokens"] = json!(1);
    prefill_body["disaggregated_params"] = json!({"request_type": "context_only", "disagg_request_id": disagg_id});
    let (status, answer) = prefill.json(Method::POST, "/v1/completions", Some(prefill_body)).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["prompt_token_ids"].as_array().map(Vec::len), Some(3));
    let mut params = answer["choices"][0]["disaggregated_params"].clone();
    assert_eq!(params["ctx_request_id"].as_u64(), Some(disagg_id));
    assert_eq!(params["opaque_state"], disagg_id.to_string());
    params["request_type"] = json!("generation_only");
    let mut decode_body = client.clone();
    decode_body["prompt"] = answer["prompt_token_ids"].clone();
    decode_body["disaggregated_params"] = params;
    let (status, answer) = decode.json(Method::POST, "/v1/completions", Some(decode_body.clone())).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["usage"], json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}));
    decode_body["disaggregated_params"]["ctx_request_id"] = json!(disagg_id as f64);
    let (status, error) = decode.json(Method::POST, "/v1/completions", Some(decode_body)).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["param"], "disaggregated_params");
    let message = error["error"]["message"].as_str().unwrap_or("");
    assert!(message.starts_with("decode pod: disaggregated_params.ctx_request_id must be an integer"), "{message}");

    // vLLM with NIXL: the decode gets the prefill's whole answer, whose id names the transfer.
    let prefill = Engine::start(&["--role", "prefill", "--kv-connector", "nixl"]).await?;
    let decode = Engine::start(&["--role", "decode", "--kv-connector", "nixl"]).await?;
    let (status, answer) = prefill.json(Method::POST, "/v1/chat/completions", Some(chat(1, false))).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "stream_options without stream: {answer}");
    let mut prefill_body = chat(1, false);
    prefill_body.as_object_mut().context("object")?.remove("stream_options");
    let (status, answer) = prefill.json(Method::POST, "/v1/chat/completions", Some(prefill_body)).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-pod-a-0-")), "{answer}");
    let mut decode_body = chat(2, true);
    decode_body["disagg_prefill_resp"] = answer;
    let (status, _, body) = decode.call(Method::POST, "/v1/chat/completions", Some(decode_body)).await?;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, error) = decode.json(Method::POST, "/v1/chat/completions", Some(chat(2, true))).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = error["error"]["message"].as_str().unwrap_or("");
    assert!(message.starts_with("decode pod: disagg_prefill_resp missing"), "{message}");
    Ok(())
}

#[tokio::test]
async fn a_kv_connector_is_for_vllm_only() -> Result<()> {
    let status = Command::new(env!("CARGO_BIN_EXE_mock-engine"))
        .args(["--listen", "127.0.0.1:0", "--engine-kind", "sglang", "--kv-connector", "nixl"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    assert!(!timeout(STEP, status).await??.success());
    Ok(())
}
