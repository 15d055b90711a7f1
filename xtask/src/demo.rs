//! `cargo xtask demo [--once]`: the gateway in front of three mock engines, shown with real
//! requests, then left running for the operator's own curl until Ctrl-C.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use http_body_util::BodyExt;
use serde_json::json;

use testkit::PodSpec;

use crate::client::{Client, header_text, json_request};
use crate::procs;
use crate::setup::{self, Strictness};
use crate::stack::{self, Binaries, EngineSpec, GatewaySpec, Profile, Stack};
use crate::stop;
use crate::ui;

/// Options of `cargo xtask demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Run the requests, stop everything and exit: 0 only if the chat requests were spread over
    /// at least two pods and every shown request behaved as the contract says.
    #[arg(long)]
    pub once: bool,
}

const CHAT_MODEL: &str = "demo-llama";
const EMBED_MODEL: &str = "demo-embed";
/// Preferred ports (the contract's defaults), used when free.
const PREFERRED_PROXY_PORT: u16 = 8888;
const PREFERRED_ADMIN_PORT: u16 = 8080;
/// Bound on any single demo request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Chat requests in the spread table, and how many run at once (concurrency is what lets
/// least-request show a spread; one at a time every pod is idle and ties break at random).
const TABLE_REQUESTS: usize = 12;
const TABLE_CONCURRENCY: usize = 3;

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    setup::run(Strictness::Lenient)?;
    let binaries = Binaries::build(Profile::Dev, "demo")?;
    stack::two_worker_runtime()?.block_on(demo_async(args, &binaries))
}

/// The mock engines: two pods of the chat model, one of an embedding model. The delays are
/// small but real, so a streamed answer visibly arrives token by token.
fn engine_specs() -> Vec<EngineSpec> {
    let engine = |pod: &str, model: &str| EngineSpec {
        pod: pod.into(),
        model: model.into(),
        ttft_ms: 30,
        itl_ms: 5,
        tokens: 24,
        threads: Some(1),
        extra_args: Vec::new(),
    };
    vec![engine("llama-0", CHAT_MODEL), engine("llama-1", CHAT_MODEL), engine("embed-0", EMBED_MODEL)]
}

/// The `model.aibrix.ai/config` annotation of the chat model: least-request by default, a
/// `batch` profile routing at random under a model-level cap.
fn chat_model_config() -> serde_json::Value {
    json!({
        "defaultProfile": "default",
        "profiles": {
            "default": {"routingStrategy": "least-request"},
            "batch": {"routingStrategy": "random", "requestsPerSecond": 20}
        }
    })
}

async fn demo_async(args: &DemoArgs, binaries: &Binaries) -> Result<()> {
    let run_dir = RunDir::claim()?;
    let out_dir = run_dir.path.clone();
    let client = Client::new();
    let mut stack = Stack { engines: Vec::new(), gateway: None };
    // Starting and showing race the signals: on Ctrl-C the stack is stopped, never orphaned.
    let shown = tokio::select! {
        shown = start_and_show(&mut stack, binaries, &out_dir, &client) => shown,
        name = stop::requested_async() => Err(anyhow!("interrupted by {name}")),
    };
    let problems = match shown {
        Ok(problems) => problems,
        Err(err) => {
            // The first error is the one to report; a failure to stop is only worth a line
            // (the guards kill whatever is left when the stack drops).
            if let Err(stop_err) = stack.stop().await {
                ui::warn(format!("{stop_err:#}"));
            }
            return Err(err);
        }
    };

    if !problems.is_empty() {
        println!("==> demo: problems");
        for problem in &problems {
            ui::warn(problem);
        }
    }
    if args.once {
        stack.stop().await?;
        if !problems.is_empty() {
            bail!("demo --once failed: {}", problems.join("; "));
        }
        println!("==> demo --once passed");
        return Ok(());
    }

    println!("==> serving until Ctrl-C (logs in {})", out_dir.display());
    let outcome = loop {
        tokio::select! {
            name = stop::requested_async() => {
                println!();
                ui::info(format!("{name}: stopping"));
                break Ok(());
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Some(reason) = stack.exited_child() {
                    break Err(anyhow!("a child stopped on its own: {reason}"));
                }
            }
        }
    };
    stack.stop().await?;
    outcome
}

/// Starts the engines and the gateway into `stack`, then runs the shown requests. Returns
/// what did not behave as expected (empty when all did).
async fn start_and_show(
    stack: &mut Stack,
    binaries: &Binaries,
    out_dir: &Path,
    client: &Client,
) -> Result<Vec<String>> {
    let step = ui::step("demo: start 3 mock engines");
    for spec in engine_specs() {
        let engine = stack::start_engine(&binaries.engine, &spec, out_dir, None).await?;
        ui::info(format!(
            "{:<8} model {:<11} on {}  (log {})",
            engine.pod,
            engine.model,
            engine.addr,
            engine.child.log().display()
        ));
        stack.engines.push(engine);
    }
    step.done();

    let step = ui::step("demo: write pods file");
    let chat_config = chat_model_config().to_string();
    let pods: Vec<PodSpec> = stack::engine_pods(&stack.engines)
        .into_iter()
        .map(|pod| if pod.model == CHAT_MODEL { pod.config(&chat_config) } else { pod })
        .collect();
    let pods_file = out_dir.join("pods.yaml");
    stack::write_pods(&pods_file, &pods)?;
    ui::info(pods_file.display().to_string());
    step.done();

    let step = ui::step("demo: start the gateway");
    let listen = choose_port(PREFERRED_PROXY_PORT, "proxy")?;
    let admin = choose_port(PREFERRED_ADMIN_PORT, "admin")?;
    let gateway = stack::start_gateway(
        GatewaySpec {
            binary: &binaries.gateway,
            listen,
            admin,
            pods_file: &pods_file,
            routing_algorithm: None,
            log_format: "text",
            log: out_dir.join("gateway.log"),
            env: Vec::new(),
            cpu: None,
            extra_args: Vec::new(),
        },
        client,
    )
    .await?;
    ui::info(format!("turnstile serve on {listen} (admin {admin}), log {}", gateway.child.log().display()));
    stack.gateway = Some(gateway);
    stack::wait_models_listed(client, listen, &[CHAT_MODEL, EMBED_MODEL], Duration::from_secs(10)).await?;
    step.done();

    let mut problems = Vec::new();
    let sections: [(&str, Section); 6] = [
        ("(a) chat requests, spread over the pods", Section::Spread),
        ("(b) a streamed answer", Section::Stream),
        ("(c) profiles, strategy header, second model", Section::Profiles),
        ("(d) an error: unknown model", Section::Error),
        ("(e) a burst over the batch profile's requestsPerSecond cap", Section::RateLimit),
        ("(f) gateway metrics", Section::Metrics),
    ];
    for (title, section) in sections {
        let step = ui::step(format!("demo: {title}"));
        let result = match section {
            Section::Spread => show_spread(client, listen).await,
            Section::Stream => show_stream(client, listen).await,
            Section::Profiles => show_profiles(client, listen).await,
            Section::Error => show_error(client, listen).await,
            Section::RateLimit => show_rate_limit(client, listen).await,
            Section::Metrics => show_metrics(client, admin).await,
        };
        match result {
            Ok(mut found) => problems.append(&mut found),
            Err(err) => {
                ui::warn(format!("{err:#}"));
                problems.push(format!("{title}: {err:#}"));
            }
        }
        step.done();
    }
    print_curl_commands(listen, admin);
    Ok(problems)
}

/// Where this run writes its pods file and logs: `target/demo`, unless another live demo
/// already uses it (the gateway reloads its pods file on change, so two demos must never share
/// one); then `target/demo/run-<pid>`.
struct RunDir {
    path: PathBuf,
    /// The pid file marking `target/demo` as ours, removed on drop.
    pid_file: Option<PathBuf>,
}

impl RunDir {
    fn claim() -> Result<Self> {
        let base = procs::target_dir().join("demo");
        let pid_file = base.join("demo.pid");
        let holder = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .filter(|pid| *pid != std::process::id() && is_running_xtask(*pid));
        let run_dir = match holder {
            Some(pid) => {
                let path = base.join(format!("run-{}", std::process::id()));
                ui::info(format!("another demo (pid {pid}) uses {}; this one uses {}", base.display(), path.display()));
                Self { path, pid_file: None }
            }
            None => Self { path: base, pid_file: Some(pid_file) },
        };
        std::fs::create_dir_all(&run_dir.path).with_context(|| format!("creating {}", run_dir.path.display()))?;
        if let Some(pid_file) = &run_dir.pid_file {
            std::fs::write(pid_file, std::process::id().to_string())
                .with_context(|| format!("writing {}", pid_file.display()))?;
        }
        Ok(run_dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Some(pid_file) = &self.pid_file {
            let _ = std::fs::remove_file(pid_file);
        }
    }
}

/// Whether `pid` is a live xtask process (a stale pid file may name a reused pid).
fn is_running_xtask(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "xtask")
}

#[derive(Clone, Copy)]
enum Section {
    Spread,
    Stream,
    Profiles,
    Error,
    RateLimit,
    Metrics,
}

/// `127.0.0.1:preferred` when free, else a free ephemeral port (and says so).
fn choose_port(preferred: u16, what: &str) -> Result<SocketAddr> {
    if testkit::port_is_free(preferred) {
        return Ok(SocketAddr::from(([127, 0, 0, 1], preferred)));
    }
    let addr = stack::free_addr()?;
    ui::info(format!("port {preferred} is taken; the {what} listener uses {} instead", addr.port()));
    Ok(addr)
}

fn chat_body(model: &str, content: &str, stream: bool) -> serde_json::Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 24,
        "stream": stream,
    })
}

/// (a) A dozen chat requests, a few at a time, as a table; the pods they landed on.
async fn show_spread(client: &Client, proxy: SocketAddr) -> Result<Vec<String>> {
    let mut rows = Vec::new();
    for wave in (0..TABLE_REQUESTS).collect::<Vec<_>>().chunks(TABLE_CONCURRENCY) {
        let mut tasks = tokio::task::JoinSet::new();
        for &index in wave {
            let client = client.clone();
            tasks.spawn(async move {
                let question = format!("Question {}: what does a gateway do?", index + 1);
                let reply = client
                    .post_json(
                        proxy,
                        "/v1/chat/completions",
                        &[],
                        &chat_body(CHAT_MODEL, &question, false),
                        REQUEST_TIMEOUT,
                    )
                    .await;
                (index, reply)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            rows.push(joined.context("a demo request task panicked")?);
        }
    }
    rows.sort_by_key(|(index, _)| *index);

    ui::info(format!(
        "{:>3}  {:<6}  {:<10}  {:<16}  {:>9}",
        "#", "status", "target-pod", "routing-strategy", "latency"
    ));
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    for (index, reply) in rows {
        match reply {
            Ok(reply) => {
                let pod = reply.header("target-pod");
                ui::info(format!(
                    "{:>3}  {:<6}  {:<10}  {:<16}  {:>6} ms",
                    index + 1,
                    reply.status.as_u16(),
                    pod,
                    reply.header("routing-strategy"),
                    reply.elapsed.as_millis()
                ));
                if reply.status.is_success() {
                    *per_pod.entry(pod).or_default() += 1;
                } else {
                    problems.push(format!("chat request {} answered {}: {}", index + 1, reply.status, reply.text()));
                }
            }
            Err(err) => {
                ui::info(format!("{:>3}  error: {err:#}", index + 1));
                problems.push(format!("chat request {} failed: {err:#}", index + 1));
            }
        }
    }
    let spread: Vec<String> = per_pod.iter().map(|(pod, count)| format!("{pod} ×{count}")).collect();
    ui::info(format!("spread: {}", spread.join(", ")));
    if per_pod.len() < 2 {
        problems.push(format!(
            "the chat requests were not spread over two pods (spread: {})",
            if spread.is_empty() { "none succeeded".to_owned() } else { spread.join(", ") }
        ));
    }
    Ok(problems)
}

/// (b) One streamed answer, printed as the chunks arrive.
async fn show_stream(client: &Client, proxy: SocketAddr) -> Result<Vec<String>> {
    let started = Instant::now();
    let body = chat_body(CHAT_MODEL, "Tell me a short story.", true);
    let request = json_request(proxy, "/v1/chat/completions", &[], &body)?;
    let response = client.send_streaming(request, REQUEST_TIMEOUT).await?;
    let status = response.status();
    ui::info(format!(
        "status {}, target-pod {}, routing-strategy {}",
        status.as_u16(),
        header_text(response.headers(), "target-pod"),
        header_text(response.headers(), "routing-strategy"),
    ));
    let mut body = response.into_body();
    let mut pending = String::new();
    let mut first_chunk: Option<Duration> = None;
    let mut chunks = 0usize;
    let mut done = false;
    let deadline = started + Duration::from_secs(60);
    print!("    │ ");
    std::io::stdout().flush().ok();
    while !done {
        let frame = tokio::time::timeout_at(deadline.into(), body.frame())
            .await
            .map_err(|_| anyhow!("the stream did not end within 60 s"))?;
        let Some(frame) = frame else { break };
        let frame = frame.context("reading the stream")?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        first_chunk.get_or_insert_with(|| started.elapsed());
        pending.push_str(&String::from_utf8_lossy(&data));
        for payload in drain_sse_data(&mut pending) {
            if payload == "[DONE]" {
                done = true;
                break;
            }
            chunks += 1;
            if let Some(text) = delta_text(&payload) {
                print!("{text}");
                std::io::stdout().flush().ok();
            }
        }
    }
    println!();
    let total = started.elapsed();
    ui::info(format!(
        "first chunk after {} ms, {chunks} chunks, whole answer in {} ms{}",
        first_chunk.map_or(0, |d| d.as_millis()),
        total.as_millis(),
        if done { "" } else { " (no [DONE] seen)" }
    ));
    let mut problems = Vec::new();
    if !status.is_success() {
        problems.push(format!("the streamed request answered {status}"));
    } else if chunks == 0 || !done {
        problems.push(format!("the stream ended after {chunks} chunks without data: [DONE]"));
    }
    Ok(problems)
}

/// Takes the complete lines out of `pending` and returns the payloads of its `data:` lines.
fn drain_sse_data(pending: &mut String) -> Vec<String> {
    let Some(last_newline) = pending.rfind('\n') else {
        return Vec::new();
    };
    let complete: String = pending.drain(..=last_newline).collect();
    complete
        .lines()
        .filter_map(|line| line.trim_end_matches('\r').strip_prefix("data:"))
        .map(|payload| payload.trim().to_owned())
        .filter(|payload| !payload.is_empty())
        .collect()
}

/// The text of a streamed chunk: chat `delta.content`, or completions `text`.
fn delta_text(payload: &str) -> Option<String> {
    let chunk: serde_json::Value = serde_json::from_str(payload).ok()?;
    let choice = chunk["choices"].get(0)?;
    choice["delta"]["content"].as_str().or_else(|| choice["text"].as_str()).map(str::to_owned)
}

/// One request of section (c) and the strategy it must report.
struct ProfileCase {
    label: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: serde_json::Value,
    expected_strategy: Option<&'static str>,
}

/// (c) The `batch` profile, the `routing-strategy` header, and the embedding model.
async fn show_profiles(client: &Client, proxy: SocketAddr) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let cases = [
        ProfileCase {
            label: "config-profile: batch",
            path: "/v1/chat/completions",
            headers: &[("config-profile", "batch")],
            body: chat_body(CHAT_MODEL, "A batch job.", false),
            expected_strategy: Some("random"),
        },
        ProfileCase {
            label: "routing-strategy: random",
            path: "/v1/chat/completions",
            headers: &[("routing-strategy", "random")],
            body: chat_body(CHAT_MODEL, "Pick any pod.", false),
            expected_strategy: Some("random"),
        },
        ProfileCase {
            label: "embeddings, second model",
            path: "/v1/embeddings",
            headers: &[],
            body: json!({"model": EMBED_MODEL, "input": "an embedding, please"}),
            expected_strategy: None,
        },
    ];
    for case in cases {
        let ProfileCase { label, path, headers, body, expected_strategy } = case;
        let reply =
            client.post_json(proxy, path, headers, &body, REQUEST_TIMEOUT).await.with_context(|| label.to_owned())?;
        let strategy = reply.header("routing-strategy");
        ui::info(format!(
            "{label:<26} → {} target-pod {} routing-strategy {} ({} ms)",
            reply.status.as_u16(),
            reply.header("target-pod"),
            strategy,
            reply.elapsed.as_millis()
        ));
        if !reply.status.is_success() {
            problems.push(format!("{label}: answered {}: {}", reply.status, reply.text()));
        } else if let Some(expected) = expected_strategy
            && strategy != expected
        {
            problems.push(format!("{label}: routing-strategy was {strategy}, expected {expected}"));
        }
    }
    Ok(problems)
}

/// (d) An unknown model: 400 with an OpenAI-style error body.
async fn show_error(client: &Client, proxy: SocketAddr) -> Result<Vec<String>> {
    let reply = client
        .post_json(proxy, "/v1/chat/completions", &[], &chat_body("no-such-model", "Hello?", false), REQUEST_TIMEOUT)
        .await?;
    let pretty = serde_json::from_slice::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|body| serde_json::to_string_pretty(&body).ok())
        .unwrap_or_else(|| reply.text());
    ui::info(format!("model no-such-model → {}", reply.status));
    for line in pretty.lines() {
        ui::info(format!("  {line}"));
    }
    let mut problems = Vec::new();
    if reply.status.as_u16() != 400 {
        problems.push(format!("unknown model answered {}, expected 400", reply.status));
    }
    Ok(problems)
}

/// Requests in the rate-limit burst: [`BATCH_RPS`] pass, the rest are refused.
const BURST: usize = 30;
/// The batch profile's `requestsPerSecond` (see [`chat_model_config`]).
const BATCH_RPS: u64 = 20;

/// (e) [`BURST`] requests at once on the batch profile, capped at [`BATCH_RPS`] per second:
/// the rest get the seed's 429 (`model: <model> has exceeded RPS: <cap>`) with `Retry-After`,
/// before any routing.
async fn show_rate_limit(client: &Client, proxy: SocketAddr) -> Result<Vec<String>> {
    // Start just after a second begins, so the burst falls in one counting window.
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let to_next_second = Duration::from_nanos(u64::from(1_000_000_000 - since.subsec_nanos()));
    tokio::time::sleep(to_next_second + Duration::from_millis(20)).await;
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..BURST {
        let client = client.clone();
        let body = chat_body(CHAT_MODEL, &format!("Batch item {i}."), false);
        burst.spawn(async move {
            client
                .post_json(proxy, "/v1/chat/completions", &[("config-profile", "batch")], &body, REQUEST_TIMEOUT)
                .await
        });
    }
    let mut replies = Vec::with_capacity(BURST);
    while let Some(reply) = burst.join_next().await {
        replies.push(reply.context("burst request task")??);
    }
    let passed = replies.iter().filter(|r| r.status.is_success()).count();
    let refused: Vec<_> = replies.iter().filter(|r| r.status.as_u16() == 429).collect();
    ui::info(format!(
        "{BURST} requests at once, config-profile: batch (requestsPerSecond {BATCH_RPS}) → {passed} × 200, {} × 429",
        refused.len()
    ));
    let mut problems = Vec::new();
    let Some(first) = refused.first() else {
        problems.push(format!("no request of the burst was refused ({passed} passed)"));
        return Ok(problems);
    };
    ui::info(format!(
        "a refused one: {}, retry-after: {}, x-error-model-rps-exceeded: {}",
        first.status,
        first.header("retry-after"),
        first.header("x-error-model-rps-exceeded")
    ));
    ui::info(format!("  {}", first.text().trim()));
    let expected = format!("model: {CHAT_MODEL} has exceeded RPS: {BATCH_RPS}");
    let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap_or_default();
    if body["error"]["message"] != expected.as_str() || body["error"]["code"] != "rate_limit_exceeded" {
        problems.push(format!("the 429's body is not the documented one: {}", first.text()));
    }
    if first.header("retry-after") == "-" {
        problems.push("the 429 has no Retry-After".to_owned());
    }
    if passed > usize::try_from(BATCH_RPS).unwrap_or(usize::MAX) {
        problems.push(format!("{passed} passed in one second, over the cap of {BATCH_RPS}"));
    }
    Ok(problems)
}

/// (f) The request counter from the admin port.
async fn show_metrics(client: &Client, admin: SocketAddr) -> Result<Vec<String>> {
    let reply = client.get(admin, "/metrics", REQUEST_TIMEOUT).await?;
    let text = reply.text();
    let lines: Vec<&str> = text.lines().filter(|line| line.starts_with("aibrix_gateway_requests_total")).collect();
    for line in lines.iter().take(8) {
        ui::info(*line);
    }
    if lines.len() > 8 {
        ui::info(format!("… and {} more", lines.len() - 8));
    }
    let mut problems = Vec::new();
    if !reply.status.is_success() || lines.is_empty() {
        problems.push(format!("/metrics ({}) has no aibrix_gateway_requests_total series", reply.status));
    }
    // Kernel assist loads when it can (root, BPF, bpffs); say which mode the demo runs in.
    let ready = client.get(admin, "/readyz", REQUEST_TIMEOUT).await?;
    let kernel = serde_json::from_slice::<serde_json::Value>(&ready.body)
        .ok()
        .map(|body| body["kernel_assist"].clone())
        .unwrap_or(serde_json::Value::Null);
    ui::info(format!("kernel assist (from /readyz): {kernel}"));
    // Every model's client bytes in and out, sorted (the series come in no fixed order).
    let mut kernel_lines: Vec<&str> = text
        .lines()
        .filter(|line| {
            line.starts_with("aibrix_gateway_kernel_assist_active")
                || (line.starts_with("aibrix_gateway_kernel_bytes_total") && line.contains(r#"side="client""#))
        })
        .collect();
    kernel_lines.sort_unstable();
    for line in kernel_lines {
        ui::info(line);
    }
    Ok(problems)
}

fn print_curl_commands(proxy: SocketAddr, admin: SocketAddr) {
    let chat = format!(r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"Hello!"}}]}}"#);
    let stream =
        format!(r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"Hello!"}}],"stream":true}}"#);
    let url = format!("http://{proxy}/v1/chat/completions");
    println!("==> try it yourself");
    for command in [
        format!("curl -s http://{proxy}/v1/models"),
        format!("curl -si {url} -H 'content-type: application/json' -d '{chat}'"),
        format!("curl -sN {url} -H 'content-type: application/json' -d '{stream}'"),
        format!("curl -si {url} -H 'content-type: application/json' -H 'config-profile: batch' -d '{chat}'"),
        format!("curl -si {url} -H 'content-type: application/json' -H 'routing-strategy: random' -d '{chat}'"),
        format!(
            "curl -s http://{proxy}/v1/embeddings -H 'content-type: application/json' -d '{{\"model\":\"{EMBED_MODEL}\",\"input\":\"hi\"}}'"
        ),
        format!("curl -s http://{admin}/metrics | grep aibrix_gateway"),
    ] {
        println!("    {command}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_are_taken_when_complete() {
        let mut pending = String::from("data: {\"a\":1}\n\ndata: [DO");
        assert_eq!(drain_sse_data(&mut pending), vec!["{\"a\":1}"]);
        assert_eq!(pending, "data: [DO");
        pending.push_str("NE]\r\n\r\n");
        assert_eq!(drain_sse_data(&mut pending), vec!["[DONE]"]);
        assert!(pending.is_empty());
        assert!(drain_sse_data(&mut pending).is_empty());
    }

    #[test]
    fn delta_text_of_chat_and_completion_chunks() {
        let chat = r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#;
        assert_eq!(delta_text(chat).as_deref(), Some("Hel"));
        let completion = r#"{"choices":[{"index":0,"text":"lo"}]}"#;
        assert_eq!(delta_text(completion).as_deref(), Some("lo"));
        assert_eq!(delta_text(r#"{"choices":[]}"#), None);
        assert_eq!(delta_text("not json"), None);
    }

    #[test]
    fn chat_model_config_has_the_profiles() {
        let config = chat_model_config();
        assert_eq!(config["defaultProfile"], "default");
        assert_eq!(config["profiles"]["default"]["routingStrategy"], "least-request");
        assert_eq!(config["profiles"]["batch"]["routingStrategy"], "random");
    }
}
