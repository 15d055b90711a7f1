//! Issue 22: no request can stall, swell or forge the gateway. Each test
//! is a reproduction that failed on the gateway before the fix, run against
//! the real binary.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use turnstile_tests::harness::{Engine, Gateway, PodSpec, chat_body, eventually, get, post, rss_kib, send, try_send};

const MODEL: &str = "hard-model";

/// Established TCP connections whose remote port is `port` (the gateway's
/// connections to an engine on loopback), from /proc/net/tcp.
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[2].ends_with(&remote) && fields[3] == "01"
        })
        .count()
}

/// An HTTP/2 (h2c) connection to the gateway; `window` is the stream flow
/// control window it offers (0: the gateway may send headers, no data).
async fn h2_connect(addr: SocketAddr, window: u32) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let mut builder = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.initial_stream_window_size(window).adaptive_window(false);
    let (sender, connection) = builder.handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("h2c handshake");
    tokio::spawn(connection);
    sender
}

fn h2_chat(gw: &Gateway, body: String) -> http::Request<Full<Bytes>> {
    http::Request::post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

/// Item 1: two 7 MB prompts without spaces under `config-profile: auto`
/// took 6 s of tokenizing each on the async workers and froze `/healthz`
/// for 9–16 s. Now they are counted in bounded pieces off the workers, and
/// the admin listener has its own thread: probes answer meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_huge_auto_prompts_leave_healthz_answering() {
    let engine = Engine::start("hard-0", MODEL, &["--tokens", "1"]);
    let config = r#"{"defaultProfile":"default","profiles":{
        "default":{"routingStrategy":"random"},
        "long":{"routingStrategy":"least-request","routingConfig":{"promptTokensGte":8192}}}}"#;
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL).config(config)], &[]).await;

    let prompt = "x".repeat(7_000_000);
    let body = serde_json::json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}).to_string();
    let huge = |body: String| {
        let request = post(&gw.url("/v1/completions"), &body, &[("config-profile", "auto")]);
        tokio::spawn(try_send(request))
    };
    let requests = [huge(body.clone()), huge(body)];
    let health = gw.admin_url("/healthz");
    let mut probes = Vec::new();
    while requests.iter().any(|r| !r.is_finished()) {
        let started = Instant::now();
        let reply = send(get(&health)).await;
        assert_eq!(reply.status, StatusCode::OK);
        probes.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for request in requests {
        let reply = request.await.expect("task").expect("answered");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("x-aibrix-config-profile"), "long", "7 MB of prompt is counted as long");
    }
    let slow = probes.iter().filter(|p| **p > Duration::from_millis(100)).count();
    let slowest = probes.iter().max().copied().unwrap_or_default();
    assert!(!probes.is_empty());
    // Every probe within 100 ms but for scheduling noise on a loaded runner.
    assert!(
        slow * 20 <= probes.len() && slowest < Duration::from_secs(1),
        "{slow} of {} probes over 100 ms, slowest {slowest:?}",
        probes.len()
    );
}

/// Item 2: one HTTP/2 client with many connections × streams got every
/// request in flight at once, thousands of engine connections and memory
/// that never came back. Now `--max-in-flight` answers the excess 503 with
/// Retry-After, the engine sees at most `--max-connections-per-pod`
/// connections, and memory returns to its idle level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_burst_is_held_under_the_limits_and_memory_returns() {
    let engine = Engine::start("hard-0", MODEL, &["--ttft-ms", "200", "--tokens", "4", "--threads", "2"]);
    let gw = Gateway::start(
        &[PodSpec::for_engine(&engine, MODEL)],
        &["--max-in-flight", "300", "--max-connections-per-pod", "48", "--upstream-idle-timeout-seconds", "1"],
    )
    .await;
    let pid = gw.proc.pid();
    for _ in 0..20 {
        assert_eq!(gw.chat(MODEL, &[]).await.status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(pid);

    let (connections, streams) = (12, 100);
    let mut senders = Vec::new();
    for _ in 0..connections {
        senders.push(h2_connect(gw.proxy, 65_535).await);
    }
    let mut tasks = Vec::new();
    for sender in &senders {
        for _ in 0..streams {
            let mut sender = sender.clone();
            let request = h2_chat(&gw, chat_body(MODEL, false));
            tasks.push(tokio::spawn(async move {
                let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                let retry_after = response.headers().get("retry-after").map(|v| v.as_bytes().to_vec());
                response.into_body().collect().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((status, retry_after))
            }));
        }
    }
    let (mut peak_engine_connections, mut peak_engine_requests) = (0, 0);
    while tasks.iter().any(|t| !t.is_finished()) {
        peak_engine_connections = peak_engine_connections.max(connections_to(engine.port()));
        let running = engine.stats().await["in_flight"].as_u64().unwrap_or(0);
        peak_engine_requests = peak_engine_requests.max(running);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut ok, mut refused) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            Ok((StatusCode::OK, _)) => ok += 1,
            Ok((StatusCode::SERVICE_UNAVAILABLE, retry_after)) => {
                assert_eq!(retry_after.as_deref(), Some(&b"1"[..]), "503 says when to retry");
                refused += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(ok + refused, connections * streams);
    assert!(refused > 0 && ok >= 300, "{ok} served, {refused} refused above the in-flight limit");
    // The engine sees at most 48 requests at a time, each on a connection of
    // its own. The pool may open spares while a busy connection frees up
    // (hyper races a new connect against the checkout) and keeps at most 48
    // idle ones: never more than twice the cap, where the burst opened one
    // connection per stream before.
    assert!(
        peak_engine_requests <= 48 + 1,
        "{peak_engine_requests} requests at once on the engine (+1: the stats call)"
    );
    assert!(peak_engine_connections <= 2 * 48, "{peak_engine_connections} engine connections");
    drop(senders);
    // Only the metrics scraper's connection stays.
    eventually(Duration::from_secs(5), "idle engine connections to close", || async {
        connections_to(engine.port()) <= 1
    })
    .await;

    // Memory comes back to within 20% of idle once the burst is over.
    let mut after = u64::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = rss_kib(pid);
        if after * 5 <= idle * 6 {
            break;
        }
    }
    assert!(after * 5 <= idle * 6, "RSS {after} KiB after the burst, {idle} KiB idle");
    assert_eq!(gw.chat(MODEL, &[]).await.status, StatusCode::OK, "still serving");
}

/// Item 2: a client that stops reading (HTTP/2 zero window) held its engine
/// stream for as long as it stayed connected. Now its connection is closed at
/// `--client-write-timeout-seconds`, the engine request is cancelled and the
/// request is logged `client_stalled`; a slow stream to a client that reads
/// is never cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_client_is_released_at_the_write_timeout() {
    let engine = Engine::start("hard-0", MODEL, &["--itl-ms", "50"]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--client-write-timeout-seconds", "2"]).await;
    let long_stream = |tokens: u32| {
        serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "max_tokens": tokens})
        .to_string()
    };

    // Reading, for longer than the timeout: served whole.
    let mut reader = h2_connect(gw.proxy, 65_535).await;
    let response = reader.send_request(h2_chat(&gw, long_stream(70))).await.expect("answer");
    let started = Instant::now();
    let text = response.into_body().collect().await.expect("whole stream").to_bytes();
    assert!(started.elapsed() > Duration::from_secs(2), "the stream outlasted the write timeout");
    assert!(String::from_utf8_lossy(&text).trim_end().ends_with("data: [DONE]"));

    // Not reading: released at the timeout.
    let mut stalled = h2_connect(gw.proxy, 0).await;
    let started = Instant::now();
    let response = stalled.send_request(h2_chat(&gw, long_stream(2000))).await.expect("headers arrive");
    assert_eq!(response.status(), StatusCode::OK);
    let request_id = response.headers()["request-id"].to_str().expect("id").to_owned();
    let in_flight = format!("aibrix_gateway_in_flight_requests{{model=\"{MODEL}\"}} 0");
    eventually(Duration::from_secs(10), "the stalled request to end", || async {
        gw.log().lines().any(|l| l.contains(&request_id) && l.contains("request end"))
    })
    .await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(8), "released after {waited:?}");
    let log = gw.log();
    let line = log.lines().find(|l| l.contains(&request_id) && l.contains("request end")).expect("end line");
    assert!(line.contains(r#"outcome="client_stalled""#), "{line}");
    eventually(Duration::from_secs(5), "the engine request to be cancelled", || async {
        gw.metrics().await.contains(&in_flight)
    })
    .await;
    let stats = engine.stats().await;
    assert!(stats.to_string().len() > 2, "engine still answers: {stats}");
}

/// Item 4: a newline in the model name wrote a forged access-log line, and
/// a 6 MB model name came back in a 6 MB header and log line. Now values are
/// escaped in both log formats and echoed at most a few hundred bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_log_lines_are_escaped_and_echoes_capped() {
    let engine = Engine::start("hard-0", MODEL, &[]);
    let forged = "2026-12-06T00:00:00.000000Z  INFO turnstile::access: request end forged=yes";
    let model = format!("nope\n{forged}\r\n");
    for format in ["text", "json"] {
        let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--log-format", format]).await;
        let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(&model, false), &[])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        // A tab is the one control character a header value may carry.
        let strategy =
            send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, false), &[("routing-strategy", "x\ty")]))
                .await;
        assert_eq!(strategy.status, StatusCode::BAD_REQUEST);
        let huge = "m".repeat(6 << 20);
        let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(&huge, false), &[])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        let echoed = reply.header("x-error-no-model-backends");
        assert!(echoed.len() <= 300 && echoed.starts_with("mmm"), "{} bytes echoed", echoed.len());
        assert!(reply.text().len() < 1024, "{} bytes of error body", reply.text().len());

        eventually(Duration::from_secs(5), "three request end lines", || async {
            gw.log().matches("request end").count() >= 3
        })
        .await;
        let log = gw.log();
        assert!(!log.lines().any(|l| l.starts_with("2026-12-06T00:00:00")), "{format}: forged line written:\n{log}");
        assert!(log.contains("forged=yes"), "the value is still logged, escaped");
        assert!(!log.contains('\t') && !log.contains('\r'), "{format}: control characters reached the log");
        assert!(log.lines().all(|l| l.len() < 16 << 10), "{format}: a log line carries the 6 MB name");
        if format == "json" {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            }
        }
    }
}

/// Item 6: `/v1/models` on the admin port answered without the bearer token
/// that protects the proxy port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_models_need_the_proxys_bearer_token() {
    let engine = Engine::start("hard-0", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--auth-bearer-token", "s3cret"]).await;
    for url in [gw.url("/v1/models"), gw.admin_url("/v1/models")] {
        let refused = send(get(&url)).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{url}");
        assert_eq!(refused.json()["error"]["code"], "invalid_api_key");
        let mut request = get(&url);
        request.headers_mut().insert("authorization", "Bearer s3cret".parse().expect("header"));
        let allowed = send(request).await;
        assert_eq!(allowed.status, StatusCode::OK, "{url}");
        assert_eq!(allowed.json()["data"][0]["id"], MODEL);
    }
    assert_eq!(send(get(&gw.admin_url("/healthz"))).await.status, StatusCode::OK, "probes need no token");
}

/// `/debug/endpoints` lists every pod's address: on an admin listener that
/// is not on loopback (a host network) it needs `--admin-token`; probes and
/// metrics stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_needs_the_admin_token_off_loopback() {
    let engine = Engine::start("hard-0", MODEL, &[]);
    let pods = [PodSpec::for_engine(&engine, MODEL)];
    let wildcard = format!("0.0.0.0:{}", turnstile_tests::harness::free_port());
    let closed = Gateway::start(&pods, &["--admin-listen", &wildcard]).await;
    let refused = send(get(&closed.admin_url("/debug/endpoints"))).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "no token set: /debug is off");
    assert_eq!(refused.json()["error"]["code"], "debug_disabled");
    assert!(refused.text().contains("--admin-token"), "{}", refused.text());
    for open in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(send(get(&closed.admin_url(open))).await.status, StatusCode::OK, "{open} stays open");
    }
    drop(closed);

    let wildcard = format!("0.0.0.0:{}", turnstile_tests::harness::free_port());
    let gw = Gateway::start(&pods, &["--admin-listen", &wildcard, "--admin-token", "adm1n"]).await;
    let url = gw.admin_url("/debug/endpoints");
    let missing = send(get(&url)).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.header("www-authenticate"), "Bearer");
    assert_eq!(missing.json()["error"]["code"], "admin_token_required");
    for token in ["Bearer wrong", "Bearer adm1n-and-more", "Basic adm1n"] {
        let mut request = get(&url);
        request.headers_mut().insert("authorization", token.parse().expect("header"));
        assert_eq!(send(request).await.status, StatusCode::UNAUTHORIZED, "{token}");
    }
    let mut request = get(&url);
    request.headers_mut().insert("authorization", "Bearer adm1n".parse().expect("header"));
    let allowed = send(request).await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(allowed.json()[MODEL]["pods"][0]["pod"], "default/hard-0", "{}", allowed.text());
    let log = std::fs::read_to_string(&gw.log_file).unwrap_or_default();
    assert!(log.contains("refused /debug requests"), "refusals are logged");
}

/// A scripted engine: answers each request on `listener` with the bytes
/// `answer` makes from the request body (keep-alive, several per connection).
fn scripted_engine(listener: TcpListener, answer: fn(&str) -> Vec<u8>) {
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let head_end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
                    buf.drain(..head_end + length);
                    if stream.write_all(&answer(&body)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn gzip(text: &str) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(text.as_bytes()).expect("gzip");
    encoder.finish().expect("gzip")
}

/// A gzip-encoded JSON answer carrying engine headers, or an SSE stream
/// whose usage comes in a trailer.
fn engine_answer(request: &str) -> Vec<u8> {
    if request.contains("\"stream\":true") {
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\
            trailer: usage\r\nserver: uvicorn\r\n\r\n"
            .to_vec();
        for event in [r#"data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}"#, "data: [DONE]"] {
            let chunk = format!("{event}\n\n");
            out.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
        }
        out.extend_from_slice(b"0\r\nusage: {\"prompt_tokens\":4,\"completion_tokens\":5,\"total_tokens\":9}\r\n\r\n");
        return out;
    }
    let body = gzip(
        r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":11,"completion_tokens":22,"total_tokens":33}}"#,
    );
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\nserver: uvicorn\r\n\
         x-powered-by: vllm\r\nx-ratelimit-remaining-requests: 7\r\nopenai-processing-ms: 12\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Item 6: engine headers that name its software reached clients; usage in
/// a gzip-encoded answer or in trailers was not counted, and a stream that
/// ended with trailers was logged `client_gone`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_hygiene_gzip_and_trailer_usage() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    scripted_engine(listener, engine_answer);
    let gw = Gateway::start(&[PodSpec::new("scripted-0", MODEL, port)], &[]).await;

    let reply = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, false), &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.headers.get("server").is_none_or(|s| s != "uvicorn"), "engine software hidden");
    assert!(reply.headers.get("x-powered-by").is_none());
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), "7", "rate-limit headers kept");
    assert_eq!(reply.header("openai-processing-ms"), "12", "OpenAI headers kept");
    assert_eq!(reply.header("content-encoding"), "gzip", "the answer passes as it came");
    let id = reply.header("request-id").to_owned();

    let stream = send(post(&gw.url("/v1/chat/completions"), &chat_body(MODEL, true), &[])).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert!(stream.text().contains("data: [DONE]"));
    let stream_id = stream.header("request-id").to_owned();

    let end_line = |id: String| {
        let log = gw.log();
        log.lines().find(|l| l.contains(&id) && l.contains("request end")).map(str::to_owned)
    };
    eventually(Duration::from_secs(5), "both request end lines", || async {
        end_line(id.clone()).is_some() && end_line(stream_id.clone()).is_some()
    })
    .await;
    let gzipped = end_line(id).expect("line");
    assert!(gzipped.contains("total_tokens=33"), "{gzipped}");
    let trailed = end_line(stream_id).expect("line");
    assert!(trailed.contains(r#"outcome="completed""#), "{trailed}");
    assert!(trailed.contains("total_tokens=9"), "{trailed}");
}
