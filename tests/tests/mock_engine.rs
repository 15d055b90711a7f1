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
        let mut child = Command::new(env!("CARGO_BIN_EXE_mock-engine"))
            .args(["--listen", "127.0.0.1:0", "--name", "pod-a"])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning mock-engine")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        timeout(STEP, BufReader::new(stdout).read_line(&mut line))
            .await
            .context("mock-engine did not announce its address")??;
        let addr = line
            .trim()
            .strip_prefix("mock-engine listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        Ok(Self { client: Client { addr }, _child: child })
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
async fn serves_models_health_and_other_endpoints() -> Result<()> {
    let engine = Engine::start(&["--model", "a", "--model", "b", "--tokens", "3"]).await?;
    let (status, models) = engine.json(Method::GET, "/v1/models", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["data"][1], json!({"id": "b", "object": "model", "created": 0, "owned_by": "vllm"}));
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
