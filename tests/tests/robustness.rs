//! Robustness of the real `turnstile` binary against clients and engines that
//! misbehave: HTTP limits, slow clients, request smuggling, upstream faults,
//! graceful drain, and Redis or the API server going away under load.
//!
//! Malformed HTTP is written byte by byte on raw TCP connections, since a
//! well-behaved client library refuses to send it. Every wait is bounded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use turnstile_tests::fake_apiserver::FakeApiServer;
use turnstile_tests::harness::{
    Discovery, Engine, Gateway, PodSpec, Redis, Traffic, chat_body, eventually, get, get_json, next_data, open_stream,
    post, scratch_dir, send, try_send,
};

const MODEL: &str = "llama";

/// A small completion request body the mock engine answers quickly.
fn completion_body() -> String {
    serde_json::json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}).to_string()
}

/// One response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// What a raw client saw on one connection.
#[derive(Debug)]
struct Exchange {
    responses: Vec<RawResponse>,
    /// The gateway closed (or reset) the connection before the deadline.
    closed: bool,
}

/// Writes `request` on a fresh connection and reads until the gateway closes
/// it or `deadline` passes.
async fn exchange(addr: SocketAddr, request: &[u8], deadline: Duration) -> Exchange {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the gateway");
    // The gateway may answer and close before all of it is written.
    let _ = stream.write_all(request).await;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let until = tokio::time::Instant::now() + deadline;
    let closed = loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Exchange { responses: parse_responses(&received), closed }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Splits raw bytes into HTTP/1.1 responses (content-length or chunked).
fn parse_responses(mut buf: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(end) = find(buf, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let rest = &buf[end + 4..];
        let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let (body, used) = if chunked {
            decode_chunked(rest)
        } else {
            let len = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(0)
                .min(rest.len());
            (rest[..len].to_vec(), len)
        };
        out.push(RawResponse { status, headers, body });
        buf = &rest[used..];
    }
    out
}

fn decode_chunked(mut buf: &[u8]) -> (Vec<u8>, usize) {
    let total = buf.len();
    let mut body = Vec::new();
    while let Some(line_end) = find(buf, b"\r\n") {
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        let data = &buf[line_end + 2..];
        if size == 0 {
            let used = total - data.len() + 2.min(data.len());
            return (body, used);
        }
        let take = size.min(data.len());
        body.extend_from_slice(&data[..take]);
        buf = &data[(take + 2).min(data.len())..];
    }
    (body, total)
}

/// A whole request with a fixed `Content-Length` body.
fn raw_post(path: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Asserts an OpenAI-style error body with the given type.
fn assert_openai_error(response: &RawResponse, error_type: &str, what: &str) {
    assert_eq!(response.header("content-type"), Some("application/json"), "{what}");
    let body = response.json();
    assert_eq!(body["error"]["type"], error_type, "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_targets_and_bodies_get_431_414_413() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let args =
        ["--max-headers", "20", "--max-header-bytes", "8192", "--max-uri-bytes", "1024", "--max-body-bytes", "4096"];
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &args).await;
    let body = completion_body();
    let wait = Duration::from_secs(3);

    // Too many header fields: 431, and the connection is closed.
    let many: String = (0..30).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let seen = exchange(gw.proxy, &raw_post("/v1/completions", &many, &body), wait).await;
    assert_eq!(seen.responses.first().map(|r| r.status), Some(431), "{seen:?}");
    assert!(seen.closed, "connection closed after 431");

    // One header bigger than the whole head limit: 431.
    let big = format!("X-Big: {}\r\n", "b".repeat(10_000));
    let seen = exchange(gw.proxy, &raw_post("/v1/completions", &big, &body), wait).await;
    assert_eq!(seen.responses.first().map(|r| r.status), Some(431), "{seen:?}");

    // A request target over --max-uri-bytes: 414 with an OpenAI error body.
    let long_path = format!("/v1/completions?pad={}", "p".repeat(2000));
    let seen = exchange(gw.proxy, &raw_post(&long_path, "Connection: close\r\n", &body), wait).await;
    let response = seen.responses.first().unwrap_or_else(|| panic!("no answer to a long target: {seen:?}"));
    assert_eq!(response.status, 414);
    assert_openai_error(response, "invalid_request_error", "414");

    // A chunked body over --max-body-bytes (no length announced): 413.
    let chunk = "x".repeat(3000);
    let chunked = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let seen = exchange(gw.proxy, chunked.as_bytes(), wait).await;
    let response = seen.responses.first().unwrap_or_else(|| panic!("no answer to a big chunked body: {seen:?}"));
    assert_eq!(response.status, 413);
    assert_openai_error(response, "invalid_request_error", "413 chunked");

    // A client library sending a 1 MiB body in one go still reads the 413
    // (not a connection reset) although the gateway stops reading early.
    let huge = format!(r#"{{"model":"{MODEL}","prompt":"{}"}}"#, "y".repeat(1 << 20));
    let reply = try_send(post(&gw.url("/v1/completions"), &huge, &[])).await.expect("413 delivered, not a reset");
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", reply.text());
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");

    // None of them reached the engine, and the gateway still serves.
    assert_eq!(engine.requests_total().await, 0, "a rejected request reached the engine");
    let reply = send(post(&gw.url("/v1/completions"), &body, &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_large_body_is_read_to_its_end_before_the_connection_closes() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--max-body-bytes", "4096"]).await;

    // A client that sends the head, reads the 413, and only then sends the
    // 2 MiB body it announced: the gateway reads it to its end and closes
    // cleanly. Closing with it unread would reset the connection, and a
    // client still writing would lose the 413.
    let len = 2 << 20;
    let mut stream = TcpStream::connect(gw.proxy).await.expect("connect to the gateway");
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: {len}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("head written");
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        while parse_responses(&received).is_empty() {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    });
    answered.await.expect("413 within 5 s");
    let responses = parse_responses(&received);
    let response = responses.first().unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&received)));
    assert_eq!(response.status, 413);
    assert_eq!(response.header("connection"), Some("close"));
    assert_openai_error(response, "invalid_request_error", "413 before the body");

    let sent = tokio::time::timeout(Duration::from_secs(10), stream.write_all(&vec![b'y'; len])).await;
    assert!(matches!(sent, Ok(Ok(()))), "body refused mid-way: {sent:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0))), "clean close expected after the body, got {end:?}");
    assert_eq!(engine.requests_total().await, 0, "a refused request reached the engine");
}

/// Connects, writes `head`, then trickles `trickle` one byte every 200 ms;
/// returns when the gateway closed the connection (None: still open after
/// `bound`) and everything it answered.
async fn slow_client(
    addr: SocketAddr,
    head: Vec<u8>,
    trickle: Vec<u8>,
    bound: Duration,
) -> (Option<Duration>, Vec<u8>) {
    let started = Instant::now();
    let (mut read, mut write) = TcpStream::connect(addr).await.expect("connect").into_split();
    let writer = tokio::spawn(async move {
        if write.write_all(&head).await.is_err() {
            return;
        }
        for byte in trickle {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
        }
        // Keep the write side open: a half-close would end the request.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut received = Vec::new();
    let mut buf = vec![0u8; 4096];
    let until = tokio::time::Instant::now() + bound;
    let closed = loop {
        match tokio::time::timeout_at(until, read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => break None,
        }
    };
    writer.abort();
    (closed, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_and_slow_body_clients_are_cut_while_others_are_served() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let timeouts = ["--header-read-timeout-seconds", "1", "--body-read-timeout-seconds", "1"];
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &timeouts).await;
    let (addr, bound) = (gw.proxy, Duration::from_secs(6));
    let mut slow = tokio::task::JoinSet::new();
    // Slowloris: a request line, then one header byte every 200 ms.
    for _ in 0..20 {
        let head = b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n".to_vec();
        slow.spawn(async move { ("slow head", slow_client(addr, head, vec![b'X'; 25], bound).await) });
    }
    // Clients that connect and never send a byte, or one byte of the h2 preface.
    for first in [&b""[..], &b"P"[..]].repeat(5) {
        slow.spawn(async move { ("silent", slow_client(addr, first.to_vec(), Vec::new(), bound).await) });
    }
    // Slow bodies: the head at once, then the body one byte every 200 ms.
    for _ in 0..5 {
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"model\":\"{MODEL}\""
        );
        slow.spawn(async move { ("slow body", slow_client(addr, head.into_bytes(), vec![b' '; 25], bound).await) });
    }

    // Normal traffic meanwhile is served, and quickly.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let started = Instant::now();
        let reply = send(post(&gw.url("/v1/completions"), &completion_body(), &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert!(started.elapsed() < Duration::from_secs(1), "normal request slowed down: {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let window = Duration::from_millis(900)..Duration::from_millis(3000);
    while let Some(result) = slow.join_next().await {
        let (kind, (closed, received)) = result.expect("slow client task");
        let closed = closed.unwrap_or_else(|| panic!("{kind} client still connected after {bound:?}"));
        assert!(window.contains(&closed), "{kind} client closed after {closed:?}, expected about 1 s");
        let responses = parse_responses(&received);
        if kind == "slow body" {
            let response = responses.first().unwrap_or_else(|| panic!("slow body got no answer"));
            assert_eq!(response.status, 408, "slow body");
            assert_openai_error(response, "invalid_request_error", "408");
        } else {
            assert!(responses.iter().all(|r| r.status == 408 || r.status == 400), "{kind}: {responses:?}");
        }
    }
    assert_eq!(engine.requests_total().await, 20, "only the normal requests reached the engine");
}

/// One request-smuggling attempt and what the gateway must do with it.
struct SmugglingCase {
    name: &'static str,
    request: Vec<u8>,
    /// Status of the (only) answer.
    status: u16,
}

/// A complete second request, appended to a first one to see whether it is
/// ever parsed out of the first one's body.
fn smuggled() -> String {
    let body = completion_body();
    format!("POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

fn smuggling_cases() -> Vec<SmugglingCase> {
    let body = completion_body();
    let len = body.len();
    let chunked_body = format!("{len:x}\r\n{body}\r\n0\r\n\r\n");
    let head = "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n";
    let case = |name, headers: String, payload: String, status| SmugglingCase {
        name,
        request: format!("{head}{headers}\r\n{payload}").into_bytes(),
        status,
    };
    let tail = smuggled();
    vec![
        // CL.TE / TE.CL: chunked framing wins, Content-Length is dropped, the
        // connection closes after the answer, so the tail is never parsed.
        case(
            "content-length then chunked",
            format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", chunked_body.len() + tail.len()),
            format!("{chunked_body}{tail}"),
            200,
        ),
        case(
            "chunked then content-length",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n".to_owned(),
            format!("{chunked_body}{tail}"),
            200,
        ),
        case(
            "differing duplicate content-length",
            format!("Content-Length: {len}\r\nContent-Length: {}\r\n", len + tail.len()),
            format!("{body}{tail}"),
            400,
        ),
        case("content-length with a sign", format!("Content-Length: +{len}\r\n"), body.clone(), 400),
        case("content-length list", format!("Content-Length: {len}, {len}\r\n"), body.clone(), 400),
        case("content-length not a number", format!("Content-Length: {len}abc\r\n"), body.clone(), 400),
        case("negative content-length", "Content-Length: -1\r\n".to_owned(), body.clone(), 400),
        case("space before the colon", format!("Content-Length : {len}\r\n"), body.clone(), 400),
        case(
            "obs-fold continuation line",
            format!("X-Note: a\r\n  folded\r\nContent-Length: {len}\r\n"),
            body.clone(),
            400,
        ),
        case(
            "obs-fold transfer-encoding",
            format!("Transfer-Encoding:\r\n chunked\r\nContent-Length: {len}\r\n"),
            body.clone(),
            400,
        ),
        case("xchunked", format!("Transfer-Encoding: xchunked\r\nContent-Length: {len}\r\n"), body.clone(), 400),
        case("chunked not last", "Transfer-Encoding: chunked, identity\r\n".to_owned(), chunked_body.clone(), 400),
        case(
            "chunked twice with a bad last value",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n".to_owned(),
            chunked_body,
            400,
        ),
        case(
            "chunk size not hex",
            "Transfer-Encoding: chunked\r\n".to_owned(),
            format!("zz\r\n{body}\r\n0\r\n\r\n"),
            400,
        ),
        case(
            "chunk size overflow",
            "Transfer-Encoding: chunked\r\n".to_owned(),
            format!("1{}\r\n{body}\r\n0\r\n\r\n", "0".repeat(20)),
            400,
        ),
        case(
            "chunk longer than its size",
            "Transfer-Encoding: chunked\r\n".to_owned(),
            format!("2\r\n{body}\r\n0\r\n\r\n{tail}"),
            400,
        ),
        case("bare CR in a header value", format!("X-Note: a\rb\r\nContent-Length: {len}\r\n"), body, 400),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_rejected_or_normalised_and_never_reach_the_engine_twice() {
    let engine = Engine::start("pod-a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;
    let len = completion_body().len().to_string();

    // HTTP/1.0 has no chunked framing.
    let mut cases = smuggling_cases();
    cases.push(SmugglingCase {
        name: "transfer-encoding in HTTP/1.0",
        request: format!(
            "POST /v1/completions HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            completion_body().len(),
            completion_body()
        )
        .into_bytes(),
        status: 400,
    });
    for case in cases {
        let before = engine.requests_total().await;
        let seen = exchange(gw.proxy, &case.request, Duration::from_secs(3)).await;
        let reached = engine.requests_total().await - before;
        let statuses: Vec<u16> = seen.responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [case.status], "{}: one answer expected: {seen:?}", case.name);
        assert!(seen.closed, "{}: the connection must close after an ambiguous request", case.name);
        let expected = u64::from(case.status == 200);
        assert_eq!(reached, expected, "{}: the engine saw {reached} requests", case.name);
        if case.status == 200 {
            // The engine got one cleanly framed request: the gateway's own length, no chunking.
            let last = &engine.stats().await["last_request"];
            assert_eq!(last["headers"]["content-length"], len.as_str(), "{}: {last}", case.name);
            assert!(last["headers"].get("transfer-encoding").is_none(), "{}: {last}", case.name);
        }
    }
    let reply = send(post(&gw.url("/v1/completions"), &completion_body(), &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "still serving: {}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_before_headers_is_502_and_never_replayed_on_another_pod() {
    let resetting = Engine::start("resetting", MODEL, &["--reset-after-chunks", "0"]);
    let healthy = Engine::start("healthy", MODEL, &[]);
    let pods = [PodSpec::for_engine(&resetting, MODEL), PodSpec::for_engine(&healthy, MODEL)];
    let gw = Gateway::start(&pods, &["--routing-algorithm", "random"]).await;
    let mut bad_gateways = 0;
    for _ in 0..16 {
        let reply = send(post(&gw.url("/v1/completions"), &completion_body(), &[])).await;
        match reply.status {
            StatusCode::OK => assert_eq!(reply.header("target-pod"), "healthy"),
            StatusCode::BAD_GATEWAY => {
                bad_gateways += 1;
                assert_eq!(reply.header("x-error-upstream"), "true");
                assert_eq!(reply.json()["error"]["type"], "api_error");
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    // A request that reached a pod may have run there: it is not sent again.
    assert_eq!(resetting.requests_total().await, bad_gateways, "each reset is one 502");
    assert_eq!(healthy.requests_total().await + bad_gateways, 16, "no request was sent twice");
    assert!(bad_gateways > 0, "random routing never chose the resetting pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_stream_ends_the_client_stream_with_an_sse_error_event() {
    let engine = Engine::start("pod-a", MODEL, &["--reset-after-chunks", "3", "--itl-ms", "20", "--tokens", "50"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;
    for _ in 0..3 {
        let started = Instant::now();
        let response = open_stream(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut text = String::new();
        while let Some(chunk) = next_data(&mut body).await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("the gateway ends the stream cleanly")));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "stream took {:?}", started.elapsed());
        let last = text.trim_end().rsplit("\n\n").next().unwrap_or("");
        assert!(last.starts_with("data: {\"error\""), "last event is an error: {text}");
        assert!(last.contains("\"code\":\"upstream_error\""), "{last}");
        assert!(!text.contains("[DONE]"), "a broken stream must not look complete: {text}");
    }
    // The engine is healthy again: streams complete.
    engine.set_faults(serde_json::json!({"reset_after_chunks": null})).await;
    let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
    assert!(reply.text().trim_end().ends_with("data: [DONE]"), "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_engine_gets_504_at_the_upstream_timeout_and_is_not_leaked() {
    let engine = Engine::start("pod-a", MODEL, &["--hang"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--upstream-timeout-seconds", "1"]).await;
    let started = Instant::now();
    let replies = futures_join(
        (0..4).map(|_| send(post(&gw.url("/v1/completions"), &completion_body(), &[]))).collect::<Vec<_>>(),
    )
    .await;
    let took = started.elapsed();
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
        assert_eq!(reply.header("x-error-upstream"), "true");
        assert_eq!(reply.json()["error"]["type"], "api_error");
    }
    assert!((Duration::from_millis(900)..Duration::from_millis(2500)).contains(&took), "504 after {took:?}");
    // The gateway hung up on the engine: nothing is left running there.
    eventually(Duration::from_secs(3), "engine connections released", || async {
        engine.stats().await["in_flight"] == 0
    })
    .await;
    engine.set_faults(serde_json::json!({"hang": false})).await;
    let reply = send(post(&gw.url("/v1/completions"), &completion_body(), &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

/// Sends `count` concurrent chat requests and returns each status with its latency.
async fn concurrent_statuses(gw: &Gateway, count: usize) -> Vec<(StatusCode, Duration, String)> {
    let url = gw.url("/v1/chat/completions");
    futures_join(
        (0..count)
            .map(|_| {
                let url = url.clone();
                async move {
                    let started = Instant::now();
                    let reply = send(post(&url, &chat_body(MODEL, false), &[])).await;
                    let header =
                        format!("{}|{}", reply.header("x-error-upstream"), reply.header("x-error-no-model-backends"));
                    (reply.status, started.elapsed(), header)
                }
            })
            .collect(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_pods_down_answers_fast() {
    let engines: Vec<Engine> = (0..3).map(|i| Engine::start(&format!("pod-{i}"), MODEL, &[])).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    let gw = Gateway::start(&pods, &[]).await;
    assert_eq!(gw.chat(MODEL, &[]).await.status, StatusCode::OK);

    // Every engine dies while the pods still look ready: 502 after the
    // bounded connect attempts, quickly.
    drop(engines);
    for (status, took, headers) in concurrent_statuses(&gw, 20).await {
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{headers}");
        assert_eq!(headers, "true|");
        assert!(took < Duration::from_secs(1), "502 took {took:?}");
    }

    // Discovery marks them not ready: 503 at once.
    let not_ready: Vec<PodSpec> = pods.iter().cloned().map(|p| p.ready(false)).collect();
    gw.write_pods(&not_ready);
    eventually(Duration::from_secs(3), "pods not ready", || async {
        gw.chat(MODEL, &[]).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    for (status, took, headers) in concurrent_statuses(&gw, 20).await {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{headers}");
        assert_eq!(headers, "|true");
        assert!(took < Duration::from_secs(1), "503 took {took:?}");
    }
}

/// Reads a stream to its end; returns the text and whether it ended in a transport error.
async fn read_stream(mut body: hyper::body::Incoming, mut text: String) -> (String, bool) {
    while let Some(chunk) = next_data(&mut body).await {
        match chunk {
            Ok(data) => text.push_str(&String::from_utf8_lossy(&data)),
            Err(_) => return (text, true),
        }
    }
    (text, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_refuses_new_connections_and_drains_streams() {
    // Each answer takes about 1.5 s.
    let engine = Engine::start("pod-a", MODEL, &["--ttft-ms", "50", "--itl-ms", "100", "--tokens", "15"]);
    let mut gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--shutdown-grace-seconds", "20"]).await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let response = open_stream(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let first = next_data(&mut body).await.expect("first chunk").expect("ok");
        streams.push(tokio::spawn(read_stream(body, String::from_utf8_lossy(&first).into_owned())));
    }

    gw.proc.terminate();
    let signalled = Instant::now();
    eventually(Duration::from_millis(500), "/readyz fails once SIGTERM arrives", || async {
        try_send(get(&gw.admin_url("/readyz"))).await.is_ok_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    let readyz = get_json(&gw.admin_url("/readyz")).await;
    assert_eq!(readyz["draining"], true, "{readyz}");
    eventually(Duration::from_millis(500), "new connections refused", || async {
        TcpStream::connect(gw.proxy).await.is_err()
    })
    .await;

    for stream in streams {
        let (text, broken) = stream.await.expect("stream task");
        assert!(!broken, "an in-flight stream was cut: {text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "in-flight stream completed: {text}");
    }
    let status = gw.proc.wait_exit(Duration::from_secs(5)).expect("the gateway exits once drained");
    assert!(status.success(), "exit status {status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(5), "exited {:?} after SIGTERM", signalled.elapsed());
    assert_eq!(engine.requests_total().await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_grace_period_is_cut_and_the_gateway_still_exits_zero() {
    // About 6 s of answer against a 1 s grace period.
    let engine = Engine::start("pod-a", MODEL, &["--itl-ms", "200", "--tokens", "30"]);
    let mut gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--shutdown-grace-seconds", "1"]).await;
    let response = open_stream(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
    let mut body = response.into_body();
    let first = next_data(&mut body).await.expect("first chunk").expect("ok");
    let reader = tokio::spawn(read_stream(body, String::from_utf8_lossy(&first).into_owned()));
    gw.proc.terminate();
    let signalled = Instant::now();
    let status = gw.proc.wait_exit(Duration::from_secs(5)).expect("the gateway exits after the grace period");
    assert!(status.success(), "exit status {status:?}");
    let took = signalled.elapsed();
    assert!((Duration::from_millis(900)..Duration::from_secs(3)).contains(&took), "exited {took:?} after SIGTERM");
    let (text, _) =
        tokio::time::timeout(Duration::from_secs(3), reader).await.expect("client not left hanging").expect("task");
    assert!(!text.contains("[DONE]"), "the stream was cut at the grace period: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_dying_under_streams_with_token_limits_fails_open_and_recovers() {
    let mut redis = Redis::start();
    // Each stream takes about 1 s.
    let engine = Engine::start("pod-a", MODEL, &["--itl-ms", "50", "--tokens", "20"]);
    let args = ["--redis-url", &redis.url(), "--default-user-tpm", "100000000", "--redis-timeout-ms", "100"];
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &args).await;
    let stream = |user: &'static str| {
        let url = gw.url("/v1/chat/completions");
        tokio::spawn(async move {
            let started = Instant::now();
            let response = open_stream(post(&url, &chat_body(MODEL, true), &[("user", user)])).await;
            let status = response.status();
            let (text, broken) = read_stream(response.into_body(), String::new()).await;
            (status, text, broken, started.elapsed())
        })
    };
    // Warm: Redis counts this user's tokens.
    let (status, _, _, _) = stream("alice").await.expect("task");
    assert_eq!(status, StatusCode::OK);
    assert!(
        matches!(redis.cmd(&["KEYS", "aibrix:alice_TPM*"]), redis::Value::Array(keys) if !keys.is_empty()),
        "TPM charged in Redis"
    );

    // Streams are running when Redis dies; their token charges fail.
    let running: Vec<_> = (0..6).map(|_| stream("alice")).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    let during: Vec<_> = (0..6).map(|_| stream("alice")).collect();
    for task in running.into_iter().chain(during) {
        let (status, text, broken, took) = task.await.expect("task");
        assert_eq!(status, StatusCode::OK, "fail-open: {text}");
        assert!(!broken && text.trim_end().ends_with("data: [DONE]"), "stream completed: {text}");
        assert!(took < Duration::from_secs(4), "a dead Redis stalled a stream for {took:?}");
    }

    // Redis comes back empty: the gateway charges there again.
    redis.restart();
    let back = Instant::now();
    eventually(Duration::from_secs(5), "TPM charged in Redis again", || async {
        let (status, ..) = stream("alice").await.expect("task");
        assert_eq!(status, StatusCode::OK);
        matches!(redis.cmd(&["KEYS", "aibrix:alice_TPM*"]), redis::Value::Array(keys) if !keys.is_empty())
    })
    .await;
    eprintln!("back on Redis {:?} after its restart", back.elapsed());
}

/// Whether `/debug/endpoints` lists `default/<pod>` for the model.
async fn lists_pod(gw: &Gateway, pod: &str) -> bool {
    let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
    endpoints[MODEL]["pods"].as_array().is_some_and(|pods| pods.iter().any(|p| p["pod"] == format!("default/{pod}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_down_after_410_keeps_the_last_pods_and_the_relist_drops_deleted_ones() {
    let a = Engine::start("pod-a", MODEL, &[]);
    let b = Engine::start("pod-b", MODEL, &[]);
    let api = FakeApiServer::start().await;
    api.add_pod(&PodSpec::for_engine(&a, MODEL));
    api.add_pod(&PodSpec::for_engine(&b, MODEL));
    let kubeconfig = api.write_kubeconfig(&scratch_dir("kube"));
    let discovery = Discovery::Kubernetes { kubeconfig: &kubeconfig };
    let gw = Gateway::spawn_with_discovery(discovery, &["--routing-algorithm", "random"], &[]);
    gw.wait_ready().await;
    eventually(Duration::from_secs(5), "the gateway is watching", || async { api.open_watches() == 1 }).await;
    let traffic = Traffic::start(&gw, MODEL);

    // The watch is lost (410 Gone) and the API server fails every request,
    // re-lists included, while pod-b is deleted.
    api.set_unavailable(true);
    api.expire_resource_versions();
    api.delete_pod("pod-b");
    let b_before = b.requests_total().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(lists_pod(&gw, "pod-b").await, "the last snapshot is kept while the API server is down");
    let served_on_b = b.requests_total().await - b_before;

    // Back: the re-list replaces the snapshot, so the deletion it never saw
    // as an event still takes effect.
    api.set_unavailable(false);
    eventually(Duration::from_secs(8), "pod-b dropped by the re-list", || async { !lists_pod(&gw, "pod-b").await })
        .await;
    let on_b = b.requests_total().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.requests_total().await, on_b, "a deleted pod gets no new requests");
    let (ok, failures) = traffic.finish().await;
    assert!(failures.is_empty(), "requests failed while the API server was away: {failures:?}");
    assert!(ok >= 20, "too little traffic to prove anything: {ok}");
    assert!(served_on_b > 0, "pod-b served from the last snapshot during the outage");
}
