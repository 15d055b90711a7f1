//! Kernel assist against the real binary with the real eBPF programs loaded.
//!
//! Each test runs in its own network namespace (the test thread enters it, so
//! the engines, gateways, redis-server and clients it starts live there) with
//! a fresh bpffs directory, and checks: per-model counters against the bytes
//! of known requests; a penalised client refused in the kernel in under
//! 10 ms while another address is served; the penalty expiring on time; a
//! penalty crossing to a second gateway through Redis; XDP mode; the
//! userspace fallback without privileges; and `bpftool` showing field names.
//!
//! They skip, with the reason printed, only when not root or when the kernel
//! lacks what the programs need.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turnstile_tests::harness::{Discovery, Engine, Gateway, PodSpec, Redis, chat_body, eventually, turnstile_bin};
use turnstile_tests::load::{self, Outcome, Target, connect_from, sample};
use turnstile_tests::netns::{Entered, NetNs, kernel_tests_unsupported};

/// The penalised client's address (added to the namespace's loopback).
const BAD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Everyone else.
const GOOD: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// A model capped at 1 request per second, so a burst earns 429s.
const CAPPED_CONFIG: &str =
    r#"{"defaultProfile":"default","profiles":{"default":{"routingStrategy":"least-request","requestsPerSecond":1}}}"#;
const THRESHOLD: usize = 3;

/// The test's namespace, entered by the test thread; left and deleted on drop.
struct Sandbox {
    _entered: Entered,
    _ns: NetNs,
    pins: Vec<PathBuf>,
}

impl Sandbox {
    /// A fresh bpffs directory for one gateway (removed on drop).
    fn pin_dir(&mut self) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/turnstile-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        self.pins.push(dir.clone());
        dir
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for dir in &self.pins {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Enters a fresh namespace with 127.0.0.2 on its loopback, or prints why
/// kernel tests cannot run here.
fn sandbox(test: &str) -> Option<Sandbox> {
    if let Some(reason) = kernel_tests_unsupported() {
        eprintln!("SKIPPED {test}: {reason}");
        return None;
    }
    let ns = NetNs::create("k").expect("create the test's network namespace");
    ns.add_loopback_address("127.0.0.2/8").expect("add a second loopback address");
    let entered = ns.enter().expect("enter the test's network namespace");
    Some(Sandbox { _entered: entered, _ns: ns, pins: Vec::new() })
}

fn kernel_args<'a>(pin_dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--ebpf",
        "required",
        "--bpffs-dir",
        pin_dir.to_str().expect("utf-8 path"),
        "--penalty-threshold",
        "3",
        "--penalty-window-seconds",
        "30",
    ];
    args.extend_from_slice(extra);
    args
}

async fn start_gateway(pods: &[PodSpec], args: &[&str]) -> Gateway {
    let gw = Gateway::spawn(pods, args, &[]);
    gw.wait_ready().await;
    gw
}

/// One request/response on its own connection (`Connection: close`) from
/// source address `from`, with the exact payload sizes both ways.
#[derive(Debug)]
struct Exchange {
    status: u16,
    request_bytes: usize,
    response_bytes: usize,
}

async fn exchange(from: IpAddr, to: SocketAddr, model: &str) -> io::Result<Exchange> {
    let work = async {
        let mut stream = connect_from(from, to).await?;
        let body = chat_body(model, false);
        let request = testkit::http1::post_json_closing(to, "/v1/chat/completions", &body);
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let status = testkit::http1::response_status(&response)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no HTTP response"))?;
        Ok(Exchange { status, request_bytes: request.len(), response_bytes: response.len() })
    };
    tokio::time::timeout(Duration::from_secs(10), work).await.map_err(|_| io::Error::other("timed out"))?
}

/// Sends capped requests from `client` until it has had THRESHOLD 429s.
async fn penalise(gw: &Gateway, client: IpAddr, model: &str) {
    let mut rate_limited = 0;
    for _ in 0..50 {
        let reply = exchange(client, gw.proxy, model).await.expect("request before the penalty");
        if reply.status == 429 {
            rate_limited += 1;
            if rate_limited == THRESHOLD {
                return;
            }
        }
    }
    panic!("{client} never got {THRESHOLD} 429s");
}

/// How a connection attempt from `from` ended, and how long it took.
async fn try_connect(from: IpAddr, to: SocketAddr, limit: Duration) -> (io::Result<()>, Duration) {
    let started = Instant::now();
    let result = match tokio::time::timeout(limit, connect_from(from, to)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    (result, started.elapsed())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

fn bpftool_dump(pin_dir: &Path, map: &str) -> String {
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(pin_dir.join(map))
        .output()
        .expect("run bpftool (install it with `cargo xtask setup`)");
    assert!(out.status.success(), "bpftool map dump {map}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn inspect(pin_dir: &Path) -> String {
    let out = Command::new(turnstile_bin()).arg("inspect").arg("--bpffs-dir").arg(pin_dir).output().expect("inspect");
    assert!(out.status.success(), "turnstile inspect: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn readiness(gw: &Gateway) -> serde_json::Value {
    turnstile_tests::harness::get_json(&gw.admin_url("/readyz")).await
}

#[tokio::test]
async fn counters_match_the_bytes_and_packets_of_each_models_requests() {
    let Some(mut sandbox) = sandbox("counters") else { return };
    let pins = sandbox.pin_dir();
    let (e1, e2) = (Engine::start("pod-a", "alpha", &[]), Engine::start("pod-b", "beta", &[]));
    let pods = [PodSpec::for_engine(&e1, "alpha"), PodSpec::for_engine(&e2, "beta")];
    let gw = start_gateway(&pods, &kernel_args(&pins, &[])).await;
    assert_eq!(readiness(&gw).await["kernel_assist"]["active"], true, "log:\n{}", gw.log());

    let mut sent = std::collections::HashMap::new();
    for (model, count) in [("alpha", 3), ("beta", 2)] {
        let (mut request_bytes, mut response_bytes) = (0, 0);
        for _ in 0..count {
            let x = exchange(GOOD, gw.proxy, model).await.expect("request");
            assert_eq!(x.status, 200);
            request_bytes += x.request_bytes;
            response_bytes += x.response_bytes;
        }
        sent.insert(model, (count, request_bytes, response_bytes));
    }

    // The last ACKs and FINs of each connection land just after the reads.
    let value = |text: &str, name: &str, model: &str, side: &str, direction: Option<&str>| {
        let mut labels = vec![("model", model), ("side", side)];
        if let Some(direction) = direction {
            labels.push(("direction", direction));
        }
        sample(text, name, &labels).unwrap_or(0.0) as usize
    };
    let text = settled_counters(&gw).await;
    assert!(text.contains("aibrix_gateway_kernel_assist_active 1"), "{text}");
    for (model, (count, request_bytes, response_bytes)) in sent {
        let conns = value(&text, "aibrix_gateway_kernel_connections_total", model, "client", None);
        assert_eq!(conns, count, "{model}: client connections\n{text}");
        for (direction, payload) in [("in", request_bytes), ("out", response_bytes)] {
            let bytes = value(&text, "aibrix_gateway_kernel_bytes_total", model, "client", Some(direction));
            let packets = value(&text, "aibrix_gateway_kernel_packets_total", model, "client", Some(direction));
            // IP packet lengths: the payload plus the IP and TCP headers of
            // each packet (20 + 32 bytes with TCP timestamps, the default).
            assert!(
                bytes >= payload && (40 * packets..=60 * packets).contains(&(bytes - payload)),
                "{model} {direction}: {bytes} bytes in {packets} packets for {payload} payload bytes\n{text}"
            );
            assert!((count..=12 * count).contains(&packets), "{model} {direction}: {packets} packets\n{text}");
        }
        for direction in ["in", "out"] {
            let bytes = value(&text, "aibrix_gateway_kernel_bytes_total", model, "upstream", Some(direction));
            assert!(bytes > 0, "{model}: upstream {direction} counted\n{text}");
        }
        assert!(value(&text, "aibrix_gateway_kernel_connections_total", model, "upstream", None) >= 1);
    }
}

/// The kernel-assist and userspace series once they stop moving (the last
/// ACKs land just after the reads).
async fn settled_counters(gw: &Gateway) -> String {
    // Sorted: the series come in no fixed order.
    let counters = |text: String| -> String {
        let mut lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("aibrix_gateway_kernel_") || l.starts_with("aibrix_gateway_userspace_"))
            .collect();
        lines.sort_unstable();
        lines.join("\n")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = counters(gw.metrics().await);
    loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let next = counters(gw.metrics().await);
        let settled = next == text;
        text = next;
        if settled || Instant::now() > deadline {
            return text;
        }
    }
}

/// Each model's kernel bytes, on both sides and in both directions, are the
/// payload userspace counted for that model plus the IP and TCP headers of
/// each packet the kernel counted (20 + 32 bytes with TCP timestamps).
fn assert_kernel_equals_userspace(text: &str, models: &[&str]) {
    for model in models {
        for side in ["client", "upstream"] {
            for direction in ["in", "out"] {
                let labels = [("model", *model), ("side", side), ("direction", direction)];
                let value = |name: &str| sample(text, name, &labels).unwrap_or(0.0) as u64;
                let payload = value("aibrix_gateway_userspace_bytes_total");
                let bytes = value("aibrix_gateway_kernel_bytes_total");
                let packets = value("aibrix_gateway_kernel_packets_total");
                assert!(payload > 0, "{model} {side} {direction}: no traffic counted\n{text}");
                assert!(
                    bytes >= payload && (40 * packets..=60 * packets).contains(&(bytes - payload)),
                    "{model} {side} {direction}: kernel {bytes} bytes in {packets} packets for {payload} payload bytes\n{text}"
                );
            }
        }
    }
}

/// [`assert_kernel_equals_userspace`] for the upstream side only.
fn assert_kernel_equals_userspace_upstream(text: &str, models: &[&str]) {
    for model in models {
        for direction in ["in", "out"] {
            let labels = [("model", *model), ("side", "upstream"), ("direction", direction)];
            let value = |name: &str| sample(text, name, &labels).unwrap_or(0.0) as u64;
            let (payload, bytes) =
                (value("aibrix_gateway_userspace_bytes_total"), value("aibrix_gateway_kernel_bytes_total"));
            let packets = value("aibrix_gateway_kernel_packets_total");
            assert!(payload > 0 && bytes >= payload, "{model} upstream {direction}\n{text}");
            assert!((40 * packets..=60 * packets).contains(&(bytes - payload)), "{model} upstream {direction}\n{text}");
        }
    }
}

/// In a fresh namespace: one engine pod serving two models (so upstream connections could be
/// shared too), and a gateway with kernel assist counting in userspace as well.
async fn two_models_counted_both_ways(test: &str) -> Option<(Sandbox, Engine, Gateway)> {
    let mut sandbox = sandbox(test)?;
    let pins = sandbox.pin_dir();
    let engine = Engine::start("pod-a", "alpha", &["--model", "beta"]);
    let pods = [PodSpec::new("pod-alpha", "alpha", engine.port()), PodSpec::new("pod-beta", "beta", engine.port())];
    let gw = start_gateway(&pods, &kernel_args(&pins, &["--userspace-counters"])).await;
    Some((sandbox, engine, gw))
}

#[tokio::test]
async fn a_keep_alive_connection_switching_models_is_counted_request_by_request() {
    let Some((_sandbox, _engine, gw)) = two_models_counted_both_ways("keepalive").await else { return };

    let stream = connect_from(GOOD, gw.proxy).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    let padding = "x".repeat(1500);
    for i in 0..200 {
        let (model, content) = if i % 2 == 0 { ("alpha", "hi") } else { ("beta", padding.as_str()) };
        let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": content}]}).to_string();
        let request = http::Request::post("/v1/chat/completions")
            .header("host", gw.proxy.to_string())
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .expect("request");
        sender.ready().await.expect("connection kept alive");
        let response = sender.send_request(request).await.expect("answer");
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body()).await.expect("body");
    }
    drop(sender);

    let text = settled_counters(&gw).await;
    assert_kernel_equals_userspace(&text, &["alpha", "beta"]);
    let value = |model: &str| {
        sample(&text, "aibrix_gateway_kernel_bytes_total", &[("model", model), ("side", "client"), ("direction", "in")])
    };
    assert!(value("beta") > value("alpha"), "the larger bodies went to beta: {text}");
}

#[tokio::test]
async fn one_openai_client_calling_two_models_is_counted_per_model() {
    let Some((_sandbox, _engine, gw)) = two_models_counted_both_ways("sdk").await else { return };
    let python = turnstile_tests::harness::openai_python();
    // Run from this thread, which is inside the test's network namespace.
    let output = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_two_models.py"))
        .args([gw.url("/v1").as_str(), "alpha", "beta", "60"])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(stdout.trim()).expect("json"),
        serde_json::json!({"alpha": 30, "beta": 30})
    );

    let text = settled_counters(&gw).await;
    assert_kernel_equals_userspace(&text, &["alpha", "beta"]);
    // One pooled connection switched to each model 30 times.
    for model in ["alpha", "beta"] {
        let switches =
            sample(&text, "aibrix_gateway_kernel_connections_total", &[("model", model), ("side", "client")]);
        assert_eq!(switches, Some(30.0), "{model}: {text}");
    }
}

/// HTTP/2 multiplexes models on one connection, packet by packet: its bytes
/// are counted under `(multiplexed)`, never charged to a model, and traffic
/// that is not the gateway's (a client talking to an engine directly, from
/// the gateway's own cgroup) is not counted at all.
#[tokio::test]
async fn http2_is_counted_apart_and_other_traffic_not_at_all() {
    let Some((_sandbox, engine, gw)) = two_models_counted_both_ways("scope").await else { return };

    let stream = connect_from(GOOD, gw.proxy).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(connection);
    for model in ["alpha", "beta", "alpha", "beta"] {
        let request = http::Request::post(format!("http://{}/v1/chat/completions", gw.proxy))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(chat_body(model, false))))
            .expect("request");
        let response = sender.send_request(request).await.expect("answer");
        assert_eq!(response.status(), 200);
        http_body_util::BodyExt::collect(response.into_body()).await.expect("body");
    }
    drop(sender);
    let text = settled_counters(&gw).await;
    let client_in = |model: &str| {
        sample(&text, "aibrix_gateway_kernel_bytes_total", &[("model", model), ("side", "client"), ("direction", "in")])
    };
    assert!(client_in("(multiplexed)").is_some_and(|b| b > 0.0), "{text}");
    assert_eq!((client_in("alpha"), client_in("beta")), (Some(0.0), Some(0.0)), "{text}");
    assert_kernel_equals_userspace_upstream(&text, &["alpha", "beta"]);

    // Another process's traffic in the same cgroup: straight to the engine.
    let before = settled_counters(&gw).await;
    for _ in 0..20 {
        let reply = turnstile_tests::harness::send(turnstile_tests::harness::post(
            &engine.url("/v1/chat/completions"),
            &chat_body("alpha", false),
            &[],
        ))
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(settled_counters(&gw).await, before, "nothing counted for traffic that is not the gateway's");
}

#[tokio::test]
async fn pinned_maps_dump_with_field_names() {
    let Some(mut sandbox) = sandbox("bpftool") else { return };
    let pins = sandbox.pin_dir();
    let engine = Engine::start("pod-a", "alpha", &[]);
    let gw = start_gateway(&[PodSpec::for_engine(&engine, "alpha")], &kernel_args(&pins, &[])).await;
    assert_eq!(exchange(GOOD, gw.proxy, "alpha").await.expect("request").status, 200);

    let stats = bpftool_dump(&pins, "MODEL_STATS");
    for field in ["client_in_packets", "client_in_bytes", "client_out_bytes", "upstream_in_bytes", "client_connections"]
    {
        assert!(stats.contains(&format!("\"{field}\"")), "MODEL_STATS dump lacks {field}:\n{stats}");
    }
    let config = bpftool_dump(&pins, "CONFIG");
    assert!(config.contains(&format!("\"proxy_port\": {}", gw.proxy.port())), "{config}");
    assert!(bpftool_dump(&pins, "MODEL_NAMES").contains("\"name\""));
    assert!(bpftool_dump(&pins, "REFUSED").contains("\"sk_lookup\""));

    let table = inspect(&pins);
    for needle in ["MODEL_STATS", "client_in_bytes", "alpha", "PENALTIES", "until_unix_ms", "proxy_port"] {
        assert!(table.contains(needle), "inspect lacks {needle}:\n{table}");
    }
}

#[tokio::test]
async fn penalised_client_is_refused_in_the_kernel_and_the_penalty_expires_on_time() {
    let Some(mut sandbox) = sandbox("reject") else { return };
    let pins = sandbox.pin_dir();
    let engine = Engine::start("pod-a", "capped", &[]);
    let pods = [PodSpec::for_engine(&engine, "capped").config(CAPPED_CONFIG)];
    let gw = start_gateway(&pods, &kernel_args(&pins, &["--penalty-seconds", "2"])).await;

    penalise(&gw, BAD, "capped").await;
    let penalised_at = unix_ms();
    // Fast reject: connection refused by the kernel, well under 10 ms, while
    // another address is served by the same listener. Every attempt must be
    // refused; the time is judged by the median, since one attempt of five can
    // lose the CPU for longer than that to the tests running beside it.
    let mut took_all = Vec::new();
    for _ in 0..5 {
        let (result, took) = try_connect(BAD, gw.proxy, Duration::from_secs(2)).await;
        let err = result.expect_err("a penalised client cannot connect");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        took_all.push(took);
    }
    took_all.sort_unstable();
    assert!(took_all[2] < Duration::from_millis(10), "refused after {took_all:?}");
    let served = exchange(GOOD, gw.proxy, "capped").await.expect("another client is served");
    assert!([200, 429].contains(&served.status));
    let metrics = gw.metrics().await;
    assert!(sample(&metrics, "aibrix_gateway_kernel_refused_connections_total", &[("hook", "sk_lookup")]) >= Some(5.0));
    assert_eq!(sample(&metrics, "aibrix_gateway_kernel_penalties_total", &[("origin", "local")]), Some(1.0));

    // The penalty in the kernel map ends at the end of the RPS window it was
    // decided in, plus 2 s.
    let dump = bpftool_dump(&pins, "PENALTIES");
    assert!(dump.contains("\"expires_ns\"") && dump.contains("\"until_unix_ms\""), "{dump}");
    let until: u64 = dump
        .split("\"until_unix_ms\": ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no expiry in {dump}"));
    assert_eq!(until % 1000, 0, "aligned to a window boundary: {until}");
    assert!((penalised_at + 1000..=penalised_at + 3100).contains(&until), "until {until}, penalised at {penalised_at}");
    assert!(inspect(&pins).contains("127.0.0.2"));

    // Still refused just before the expiry, served just after it.
    tokio::time::sleep(Duration::from_millis(until.saturating_sub(unix_ms() + 150))).await;
    let (result, _) = try_connect(BAD, gw.proxy, Duration::from_secs(2)).await;
    assert_eq!(result.expect_err("still penalised").kind(), io::ErrorKind::ConnectionRefused);
    tokio::time::sleep(Duration::from_millis((until + 100).saturating_sub(unix_ms()))).await;
    let after = exchange(BAD, gw.proxy, "capped").await.expect("served again after the expiry");
    assert!([200, 429].contains(&after.status));
    // And the expired entry is swept from the map.
    eventually(Duration::from_secs(2), "expired penalty removed from the kernel map", || async {
        !bpftool_dump(&pins, "PENALTIES").contains("until_unix_ms")
    })
    .await;
}

/// With the default penalty flags, a flood of well over 1,000 requests/s is
/// refused by the kernel within 1 s of crossing the threshold.
#[tokio::test]
async fn with_default_flags_a_flood_is_refused_by_the_kernel_within_a_second() {
    let Some(mut sandbox) = sandbox("flood") else { return };
    let pins = sandbox.pin_dir();
    let engine = Engine::start("pod-a", "capped", &[]);
    let pods = [PodSpec::for_engine(&engine, "capped").config(CAPPED_CONFIG)];
    let args = ["--ebpf", "required", "--bpffs-dir", pins.to_str().expect("utf-8 path")];
    let gw = start_gateway(&pods, &args).await;

    let body = chat_body("capped", false);
    let target = Target { from: BAD, to: gw.proxy, path: "/v1/chat/completions".into(), body, headers: Vec::new() };
    let events = load::flood(target, 16, Duration::from_secs(3), 30_000).await;
    let crossed = load::threshold_crossed(&events, 300).expect("the default threshold was crossed");
    let refused = events
        .iter()
        .find(|e| matches!(&e.outcome, Outcome::Refused(reason) if reason.contains("refused")))
        .unwrap_or_else(|| panic!("the kernel never refused the flood: {:?}", events.last()));
    let after = refused.at.duration_since(crossed).unwrap_or_default();
    assert!(after <= Duration::from_secs(1), "refused {after:?} after crossing the threshold");
    let first_failure = load::first_failure(&events).expect("a refusal");
    let told = load::rate_limited_before(&events, first_failure.at);
    assert!(told + 16 >= 300, "refused after only {told} 429s within a second");

    let metrics = gw.metrics().await;
    assert!(sample(&metrics, "aibrix_gateway_kernel_refused_connections_total", &[("hook", "sk_lookup")]) >= Some(1.0));
    assert_eq!(sample(&metrics, "aibrix_gateway_penalty_decisions_total", &[("reason", "flood")]), Some(1.0));
    let served = exchange(GOOD, gw.proxy, "capped").await.expect("another client is served");
    assert!([200, 429].contains(&served.status));
}

#[tokio::test]
async fn a_penalty_reaches_a_second_gateway_through_redis() {
    let Some(mut sandbox) = sandbox("redis") else { return };
    let (pins_a, pins_b) = (sandbox.pin_dir(), sandbox.pin_dir());
    let redis = Redis::start();
    let url = redis.url();
    let engine = Engine::start("pod-a", "capped", &[]);
    let pods = [PodSpec::for_engine(&engine, "capped").config(CAPPED_CONFIG)];
    let shared = ["--redis-url", url.as_str(), "--penalty-seconds", "30"];
    let a = start_gateway(&pods, &kernel_args(&pins_a, &shared)).await;
    let b = start_gateway(&pods, &kernel_args(&pins_b, &shared)).await;
    // B's subscription is up once it logged it.
    eventually(Duration::from_secs(5), "gateway B subscribed to penalties", || async {
        b.log().contains("penalty sync with Redis established")
    })
    .await;

    penalise(&a, BAD, "capped").await;
    eventually(Duration::from_secs(3), "B refuses the client penalised by A", || async {
        let (result, _) = try_connect(BAD, b.proxy, Duration::from_secs(1)).await;
        result.is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
    })
    .await;
    let dump = bpftool_dump(&pins_b, "PENALTIES");
    assert!(dump.contains("\"addr\"") && dump.contains("\"expires_ns\""), "B's kernel map:\n{dump}");
    let metrics = b.metrics().await;
    assert_eq!(sample(&metrics, "aibrix_gateway_kernel_penalties_total", &[("origin", "redis")]), Some(1.0));
    assert_eq!(exchange(GOOD, b.proxy, "capped").await.map(|x| x.status >= 200).ok(), Some(true));
    let members = redis.cmd(&["ZRANGE", "turnstile:penalties", "0", "-1"]);
    assert!(format!("{members:?}").contains("127.0.0.2"), "{members:?}");
}

#[tokio::test]
async fn xdp_mode_drops_the_syns_of_a_penalised_client() {
    let Some(mut sandbox) = sandbox("xdp") else { return };
    let pins = sandbox.pin_dir();
    let engine = Engine::start("pod-a", "capped", &[]);
    let pods = [PodSpec::for_engine(&engine, "capped").config(CAPPED_CONFIG)];
    let args = kernel_args(&pins, &["--penalty-mode", "xdp", "--xdp-interfaces", "lo", "--penalty-seconds", "30"]);
    let gw = start_gateway(&pods, &args).await;
    let detail = readiness(&gw).await;
    assert!(detail["kernel_assist"]["attached"].as_str().unwrap_or("").contains("xdp on lo"), "{detail}");

    penalise(&gw, BAD, "capped").await;
    // Dropped SYNs: the client hears nothing and gives up on its own timeout.
    let (result, took) = try_connect(BAD, gw.proxy, Duration::from_millis(300)).await;
    assert_eq!(result.expect_err("SYN dropped").kind(), io::ErrorKind::TimedOut);
    assert!(took >= Duration::from_millis(290));
    assert_eq!(exchange(GOOD, gw.proxy, "capped").await.map(|x| x.status >= 200).ok(), Some(true));
    let metrics = gw.metrics().await;
    assert!(sample(&metrics, "aibrix_gateway_kernel_refused_connections_total", &[("hook", "xdp")]) >= Some(1.0));
}

#[tokio::test]
async fn without_privileges_auto_mode_serves_in_userspace_and_enforces_the_penalty() {
    let Some(mut sandbox) = sandbox("fallback") else { return };
    let pins = sandbox.pin_dir();
    let engine = Engine::start("pod-a", "capped", &[]);
    let pods = [PodSpec::for_engine(&engine, "capped").config(CAPPED_CONFIG)];
    let mut args = kernel_args(&pins, &["--penalty-seconds", "30"]);
    args[1] = "auto";
    // Root without any capability: no CAP_BPF, CAP_NET_ADMIN or CAP_SYS_ADMIN.
    let no_caps = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"];
    let gw = Gateway::spawn_wrapped(&Discovery::PodsFile(&pods), &args, &[], &no_caps);
    gw.wait_ready().await;

    let detail = readiness(&gw).await;
    assert_eq!(detail["kernel_assist"]["active"], false, "{detail}");
    assert_eq!(detail["kernel_assist"]["mode"], "userspace");
    assert!(!detail["kernel_assist"]["reason"].as_str().unwrap_or("").is_empty(), "{detail}");
    let log = gw.log();
    assert_eq!(log.matches("kernel assist unavailable").count(), 1, "the reason is logged once:\n{log}");

    let served = exchange(GOOD, gw.proxy, "capped").await.expect("served in userspace-only mode");
    assert_eq!(served.status, 200);
    penalise(&gw, BAD, "capped").await;
    // The connection is accepted by the kernel, then closed by the gateway
    // before anything is read: no response.
    let refused = exchange(BAD, gw.proxy, "capped").await;
    assert!(refused.is_err(), "a penalised client gets no response: {refused:?}");
    assert_eq!(exchange(GOOD, gw.proxy, "capped").await.map(|x| x.status >= 200).ok(), Some(true));

    let metrics = gw.metrics().await;
    assert!(metrics.contains("aibrix_gateway_kernel_assist_active 0"), "{metrics}");
    assert!(
        sample(&metrics, "aibrix_gateway_kernel_refused_connections_total", &[("hook", "userspace")]) >= Some(1.0),
        "{metrics}"
    );
    let bytes = sample(
        &metrics,
        "aibrix_gateway_kernel_bytes_total",
        &[("model", "capped"), ("side", "client"), ("direction", "out")],
    );
    assert!(bytes.is_some_and(|b| b >= served.response_bytes as f64), "userspace counters: {metrics}");
    assert!(!pins.join("PENALTIES").exists(), "nothing pinned without privileges");
}

/// The id of a pinned program.
fn pinned_prog_id(path: &Path) -> u64 {
    let out = Command::new("bpftool").args(["-j", "prog", "show", "pinned"]).arg(path).output().expect("bpftool");
    assert!(out.status.success(), "bpftool prog show {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    let prog: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    prog["id"].as_u64().expect("program id")
}

/// How many BPF links attach the program `prog_id`.
fn links_of(prog_id: u64) -> usize {
    let out = Command::new("bpftool").args(["-j", "link", "show"]).output().expect("bpftool");
    assert!(out.status.success(), "bpftool link show: {}", String::from_utf8_lossy(&out.stderr));
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    links.as_array().map_or(0, |links| links.iter().filter(|l| l["prog_id"].as_u64() == Some(prog_id)).count())
}

#[tokio::test]
async fn programs_detach_when_the_gateway_dies_unless_links_are_pinned() {
    let Some(mut sandbox) = sandbox("links") else { return };
    for pin_links in [false, true] {
        let pins = sandbox.pin_dir();
        let mut args = kernel_args(&pins, &[]);
        if pin_links {
            args.push("--pin-links");
        }
        // No engine needed: the pod only has to be discovered.
        let gw = start_gateway(&[PodSpec::new("pod-a", "alpha", 9)], &args).await;
        let programs: Vec<u64> =
            ["tn_lookup", "tn_skb_in", "tn_skb_out"].iter().map(|name| pinned_prog_id(&pins.join(name))).collect();
        for id in &programs {
            assert_eq!(links_of(*id), 1, "program {id} attached while the gateway runs");
        }
        // SIGKILL: no cleanup code runs, as in a crash.
        drop(gw);
        let expected = usize::from(pin_links);
        for id in &programs {
            assert_eq!(links_of(*id), expected, "program {id}'s links after the gateway died (pin_links {pin_links})");
        }
        if pin_links {
            // Unpinning the links detaches them.
            for name in ["link_tn_lookup", "link_tn_skb_in", "link_tn_skb_out"] {
                std::fs::remove_file(pins.join(name)).expect("remove a pinned link");
            }
            for id in &programs {
                assert_eq!(links_of(*id), 0);
            }
        }
    }
}
