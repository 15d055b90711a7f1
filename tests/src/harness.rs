//! Small builders for integration tests: start mock engines, start the real
//! `turnstile` binary pointing at them through a pods file, send requests.
//!
//! Every process is killed when its handle drops, every wait is bounded, and
//! all traffic goes to 127.0.0.1. Ports, processes and pods files come from
//! `testkit`, which xtask shares; they are re-exported here under their old names.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use testkit::EngineEndpoint;
pub use testkit::{PodSpec, Proc, pods_yaml};

/// How long a process may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The directory holding this build's binaries (`target/debug` or `target/release`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("exe dir");
    // Integration tests live in target/<profile>/deps.
    if dir.ends_with("deps") { dir.parent().expect("profile dir").to_owned() } else { dir.to_owned() }
}

/// Path of the `turnstile` binary, built on first use so a test run never
/// exercises a stale gateway (a no-op when it is up to date).
pub fn turnstile_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = bin_dir();
        let release = dir.ends_with("release");
        if std::env::var_os("TURNSTILE_TEST_NO_BUILD").is_none() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut cmd = Command::new(cargo);
            // The same selection `cargo xtask ci` builds before testing, so
            // features unify the same way and this is a no-op there (a narrower
            // `-p gateway-user` build compiled a second copy of the dependency tree).
            cmd.args(["build", "--quiet", "--workspace", "--bins"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build for turnstile");
            assert!(status.success(), "building turnstile failed");
        }
        let bin = dir.join("turnstile");
        assert!(bin.exists(), "{} does not exist", bin.display());
        bin
    })
}

/// Path of the `mock-engine` binary.
pub fn mock_engine_bin() -> PathBuf {
    bin_dir().join("mock-engine")
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "turnstile-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A free loopback port for a listener the test starts later (see [`testkit::free_port`]
/// for how it stays clear of the ports clients take).
pub fn free_port() -> u16 {
    testkit::free_port().expect("a free loopback port")
}

/// A running mock vLLM engine.
pub struct Engine {
    pub name: String,
    pub addr: SocketAddr,
    _proc: Proc,
}

impl Engine {
    /// Starts `mock-engine --name NAME --model MODEL ARGS...` on a free port.
    pub fn start(name: &str, model: &str, args: &[&str]) -> Self {
        Self::try_start_on(name, model, 0, args).expect("mock-engine announced its address")
    }

    /// Starts `mock-engine` on 127.0.0.1:`port`; `None` when it cannot bind it.
    pub fn try_start_on(name: &str, model: &str, port: u16, args: &[&str]) -> Option<Self> {
        let listen = format!("127.0.0.1:{port}");
        let mut proc = Proc::spawn(
            Command::new(mock_engine_bin())
                .args(["--listen", &listen, "--name", name, "--model", model])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )
        .expect("spawn mock-engine");
        let stdout = proc.child_mut().stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(START_TIMEOUT).ok()?;
        let addr = testkit::listening_addr(&line)?;
        Some(Self { name: name.to_owned(), addr, _proc: proc })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET /mock/stats` as JSON.
    pub async fn stats(&self) -> serde_json::Value {
        get_json(&self.url("/mock/stats")).await
    }

    /// Inference requests this engine has received.
    pub async fn requests_total(&self) -> u64 {
        self.stats().await["requests_total"].as_u64().unwrap_or(0)
    }

    /// The `traceparent` headers of the inference requests this engine received (its latest
    /// 1024), in arrival order; requests that carried none are skipped.
    pub async fn traceparents(&self) -> Vec<String> {
        traceparents_of(&self.stats().await)
    }

    /// `GET /metrics` requests this engine has answered.
    pub async fn metrics_scrapes(&self) -> u64 {
        self.stats().await["metrics_scrapes"].as_u64().unwrap_or(0)
    }

    /// Changes fault switches at runtime (`POST /mock/faults`).
    pub async fn set_faults(&self, faults: serde_json::Value) {
        let r = send(post(&self.url("/mock/faults"), &faults.to_string(), &[])).await;
        assert_eq!(r.status, StatusCode::OK, "set faults: {}", r.text());
    }
}

/// The non-null `traceparent` values of a `/mock/stats` document, in order.
fn traceparents_of(stats: &serde_json::Value) -> Vec<String> {
    let contexts = stats["traceparents"].as_array().map(Vec::as_slice).unwrap_or_default();
    contexts.iter().filter_map(|context| context["traceparent"].as_str().map(str::to_owned)).collect()
}

impl EngineEndpoint for Engine {
    fn pod_name(&self) -> &str {
        &self.name
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Where a gateway started by [`Gateway::spawn_with_discovery`] learns its pods.
#[derive(Clone, Copy, Debug)]
pub enum Discovery<'a> {
    /// `--discovery file:` with these pods, polled every 50 ms.
    PodsFile(&'a [PodSpec]),
    /// `--discovery file:` with no file yet: the test writes it later with
    /// [`Gateway::write_pods`].
    PodsFileLater,
    /// `--discovery kubernetes` with `KUBECONFIG` set to this file (see
    /// [`crate::fake_apiserver::FakeApiServer::write_kubeconfig`]).
    Kubernetes { kubeconfig: &'a Path },
    /// `--discovery endpoints:` with an AIBrix standalone endpoints file of this text, written
    /// where [`Gateway::pods_file`] says (rewrite it there to change it), polled every 50 ms.
    Endpoints(&'a str),
}

/// A running `turnstile serve` with its pods file.
pub struct Gateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The pods file (not read by a gateway using Kubernetes discovery).
    pub pods_file: PathBuf,
    pub log_file: PathBuf,
    pub proc: Proc,
}

impl Gateway {
    /// Starts the gateway on free ports with `pods` and extra `args`, and
    /// waits until `/readyz` answers 200.
    pub async fn start(pods: &[PodSpec], args: &[&str]) -> Self {
        let gw = Self::spawn(pods, args, &[]);
        gw.wait_ready().await;
        gw
    }

    /// Starts the gateway without waiting for readiness; `env` is added to
    /// its environment.
    pub fn spawn(pods: &[PodSpec], args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_with_discovery(Discovery::PodsFile(pods), args, env)
    }

    /// Like [`Gateway::spawn`], with the discovery source chosen by the caller.
    pub fn spawn_with_discovery(discovery: Discovery<'_>, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_wrapped(&discovery, args, env, &[])
    }

    /// Like [`Gateway::spawn_with_discovery`], run through `wrapper` (a
    /// program and its arguments, e.g. `setpriv ... --`), when not empty.
    pub fn spawn_wrapped(discovery: &Discovery<'_>, args: &[&str], env: &[(&str, &str)], wrapper: &[&str]) -> Self {
        let dir = scratch_dir("gw");
        let pods_file = dir.join("pods.yaml");
        let log_file = dir.join("turnstile.log");
        let log = std::fs::File::create(&log_file).expect("log file");
        let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        // A test may bind the admin listener itself (`--admin-listen 0.0.0.0:P`);
        // it is still reached on loopback.
        let given_admin = args.iter().position(|a| *a == "--admin-listen").and_then(|i| args.get(i + 1));
        let admin: SocketAddr = match given_admin.map(|a| a.parse::<SocketAddr>().expect("--admin-listen address")) {
            Some(given) => ([127, 0, 0, 1], given.port()).into(),
            None => ([127, 0, 0, 1], free_port()).into(),
        };
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(turnstile_bin());
                command
            }
            None => Command::new(turnstile_bin()),
        };
        command.arg("serve").args(["--listen", &proxy.to_string()]);
        if given_admin.is_none() {
            command.args(["--admin-listen", &admin.to_string()]);
        }
        match discovery {
            Discovery::PodsFile(pods) => {
                testkit::write_pods(&pods_file, pods).expect("write pods file");
                command.arg("--discovery").arg(format!("file:{}", pods_file.display()));
                command.args(["--pods-file-poll-ms", "50"]);
            }
            Discovery::PodsFileLater => {
                command.arg("--discovery").arg(format!("file:{}", pods_file.display()));
                command.args(["--pods-file-poll-ms", "50"]);
            }
            Discovery::Endpoints(text) => {
                std::fs::write(&pods_file, text).expect("write endpoints file");
                command.arg("--discovery").arg(format!("endpoints:{}", pods_file.display()));
                command.args(["--pods-file-poll-ms", "50"]);
            }
            Discovery::Kubernetes { kubeconfig } => {
                command.args(["--discovery", "kubernetes"]).env("KUBECONFIG", kubeconfig);
                // Only the test's kubeconfig may decide where the API server is.
                for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "TURNSTILE_NAMESPACE"] {
                    command.env_remove(var);
                }
            }
        }
        // Kernel assist stays out of tests that do not ask for it (flags and
        // `env` below win): no kernel state on the host. Client penalties keep
        // their defaults, which never punish a test's over-limit requests
        // (only floods past them), so every test also checks that.
        command.env("TURNSTILE_EBPF", "off");
        // A developer's shell must not point test gateways at its own Redis
        // or require its token (`env` below still sets them for a test).
        for var in ["TURNSTILE_REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "AIBRIX_AUTH_BEARER_TOKEN"] {
            command.env_remove(var);
        }
        // Nor at its trace collector, nor change how it traces.
        for (var, _) in std::env::vars_os() {
            if var.to_str().is_some_and(|name| name.starts_with("OTEL_")) {
                command.env_remove(var);
            }
        }
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .env_remove("ROUTING_ALGORITHM")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn turnstile");
        Self { proxy, admin, pods_file, log_file, proc: Proc::from(child) }
    }

    /// Waits (bounded) for `/readyz` to answer 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(r) = try_send(get(&self.admin_url("/readyz"))).await
                && r.status == StatusCode::OK
            {
                return;
            }
            assert!(Instant::now() < deadline, "gateway not ready in time; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Rewrites the pods file (the gateway polls it every 50 ms in tests).
    pub fn write_pods(&self, pods: &[PodSpec]) {
        testkit::write_pods(&self.pods_file, pods).expect("replace pods file");
    }

    /// Writes raw text into the pods file.
    pub fn write_pods_text(&self, text: &str) {
        testkit::write_atomically(&self.pods_file, text).expect("replace pods file");
    }

    /// The gateway's log so far: every line it has logged until now.
    pub fn log(&self) -> String {
        self.wait_log_written();
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Waits (bounded) until the gateway has written every log line it took:
    /// its log thread writes lines a few milliseconds after they are logged
    /// (`turnstile_log_pending_bytes` on the admin port). A gateway that does
    /// not answer is not waited for.
    fn wait_log_written(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(pending) = pending_log_bytes(self.admin)
            && pending > 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        send(get(&self.admin_url("/metrics"))).await.text()
    }

    /// Posts a chat completion for `model` with extra headers.
    pub async fn chat(&self, model: &str, headers: &[(&str, &str)]) -> Reply {
        send(post(&self.url("/v1/chat/completions"), &chat_body(model, false), headers)).await
    }
}

/// `turnstile_log_pending_bytes` from the admin `/metrics` at `admin`, read
/// with a blocking request (logs are read from sync code too).
fn pending_log_bytes(admin: SocketAddr) -> Option<u64> {
    use std::io::{Read as _, Write as _};
    let timeout = Duration::from_secs(1);
    let mut stream = std::net::TcpStream::connect_timeout(&admin, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: turnstile\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines().find_map(|line| line.strip_prefix("turnstile_log_pending_bytes ")).and_then(|v| v.trim().parse().ok())
}

/// `VmRSS` of process `pid`, KiB (what memory bounds in tests are judged by).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A minimal chat completion body.
pub fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the gateway"}],
        "stream": stream,
        "stream_options": {"include_usage": stream},
    })
    .to_string()
}

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Full<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http())
}

/// A GET request.
pub fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::new(Bytes::new())).expect("request")
}

/// A POST with a JSON body and extra headers.
pub fn post(url: &str, body: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(Bytes::from(body.to_owned()))).expect("request")
}

/// Sends a request and reads the whole answer (bounded to 30 s).
pub async fn send(request: Request<Full<Bytes>>) -> Reply {
    try_send(request).await.expect("request failed")
}

/// Like [`send`], but returns transport errors instead of panicking.
pub async fn try_send(request: Request<Full<Bytes>>) -> Result<Reply, String> {
    let work = async {
        let response = client().request(request).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    };
    tokio::time::timeout(Duration::from_secs(30), work).await.map_err(|_| "timed out".to_owned())?
}

/// Starts a request and returns its response head with the body unread, for
/// watching a stream frame by frame.
pub async fn open_stream(request: Request<Full<Bytes>>) -> http::Response<Incoming> {
    tokio::time::timeout(Duration::from_secs(30), client().request(request))
        .await
        .expect("response head in time")
        .expect("request sent")
}

/// The next data frame of a body, `None` at the end (bounded to 30 s).
pub async fn next_data(body: &mut Incoming) -> Option<Result<Bytes, String>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), body.frame()).await.expect("frame in time")?;
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e.to_string())),
        }
    }
}

/// Streams opened until one lands on a given pod, the others kept open.
pub struct StreamOnPod {
    /// The body of the stream on the pod, its first chunk read.
    pub body: Incoming,
    /// That first chunk.
    pub first: Bytes,
    /// The streams that landed elsewhere, still open.
    pub others: Vec<http::Response<Incoming>>,
    /// The status of every stream opened, in order.
    pub statuses: Vec<StatusCode>,
}

/// Opens streaming chat requests for `model` until one is routed to `pod` (at most
/// `attempts`, for random routing) and reads its first chunk.
pub async fn open_stream_on(gw: &Gateway, model: &str, pod: &str, attempts: usize) -> StreamOnPod {
    let (mut on_pod, mut others, mut statuses) = (None, Vec::new(), Vec::new());
    for _ in 0..attempts {
        let response = open_stream(post(&gw.url("/v1/chat/completions"), &chat_body(model, true), &[])).await;
        statuses.push(response.status());
        if response.headers().get("target-pod").is_some_and(|target| target == pod) {
            on_pod = Some(response);
            break;
        }
        others.push(response);
    }
    let mut body = on_pod.unwrap_or_else(|| panic!("a stream routed to {pod}")).into_body();
    let first = next_data(&mut body).await.expect("first chunk").expect("ok");
    StreamOnPod { body, first, others, statuses }
}

/// The rest of a stream whose first data chunk was `first`, as text; every chunk must arrive.
pub async fn finish_stream(first: &[u8], stream: &mut Incoming) -> String {
    let mut text = String::from_utf8_lossy(first).into_owned();
    while let Some(chunk) = next_data(stream).await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("stream not cut")));
    }
    text
}

/// Sends ten chat requests for `model` one after the other and checks that each is a 200
/// from `serving` and that `not_ready` got none of them.
pub async fn assert_new_requests_skip(gw: &Gateway, model: &str, not_ready: &Engine, serving: &str) {
    let before = not_ready.requests_total().await;
    for _ in 0..10 {
        let reply = gw.chat(model, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("target-pod"), serving, "a not-ready pod got a new request");
    }
    assert_eq!(not_ready.requests_total().await, before);
}

/// GET a URL and parse the JSON answer.
pub async fn get_json(url: &str) -> serde_json::Value {
    send(get(url)).await.json()
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Chat requests for `model` sent back to back (10 ms apart) in the background, for the
/// length of a test, until [`Traffic::finish`]; bounded at 2000 requests.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Traffic {
    /// Starts sending to `gw`.
    pub fn start(gw: &Gateway, model: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, body, flag) = (gw.url("/v1/chat/completions"), chat_body(model, false), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let (mut ok, mut failures) = (0, Vec::new());
            for _ in 0..2000 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                match try_send(post(&url, &body, &[])).await {
                    Ok(reply) if reply.status == StatusCode::OK => ok += 1,
                    Ok(reply) => failures.push(format!("{}: {}", reply.status, reply.text())),
                    Err(err) => failures.push(err),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failures)
        });
        Self { stop, task }
    }

    /// Stops sending; how many replies were 200, and what every other reply or error was.
    pub async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("traffic task")
    }
}

/// A throwaway `redis-server` on a free loopback port, without persistence,
/// killed when dropped. `cargo xtask setup` installs redis-server.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
    tls: Option<RedisTls>,
}

/// A Redis's TLS side: its port, the CA that signed its certificate (made
/// with `openssl` for the test), and the ACL user every connection needs.
pub struct RedisTls {
    pub port: u16,
    pub ca_file: PathBuf,
    pub username: String,
    pub password: String,
}

/// Makes a CA and a server certificate for 127.0.0.1 / localhost signed by
/// it in `dir` with `openssl`; returns the CA's path (the server's are
/// `server.pem` and `server.key` beside it).
fn make_certificates(dir: &Path) -> PathBuf {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(path("server.ext"), "subjectAltName = IP:127.0.0.1, DNS:localhost\n").expect("write extensions");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (ca_key, ca, key, csr, cert, ext) = (
        path("ca.key"),
        path("ca.pem"),
        path("server.key"),
        path("server.csr"),
        path("server.pem"),
        path("server.ext"),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=turnstile test CA",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
    ]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", &key, "-out", &csr]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    PathBuf::from(ca)
}

impl Redis {
    /// Starts a server and waits (bounded) until it answers PING.
    pub fn start() -> Self {
        let mut redis = Self { port: free_port(), dir: scratch_dir("redis"), proc: None, tls: None };
        redis.restart();
        redis
    }

    /// Starts a server that also listens with TLS (on a certificate of a CA
    /// made for the test) and admits only the ACL user `gateway` with a
    /// password, on both ports.
    pub fn start_tls() -> Self {
        let dir = scratch_dir("redis-tls");
        let ca_file = make_certificates(&dir);
        let tls = RedisTls {
            port: free_port(),
            ca_file,
            username: "gateway".into(),
            password: format!("pw-{}", std::process::id()),
        };
        let mut redis = Self { port: free_port(), dir, proc: None, tls: Some(tls) };
        redis.restart();
        redis
    }

    /// The TLS side, when started with [`Redis::start_tls`].
    pub fn tls(&self) -> Option<&RedisTls> {
        self.tls.as_ref()
    }

    /// `rediss://` to the TLS port, without credentials (they come from
    /// REDIS_USERNAME / REDIS_PASSWORD).
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls.as_ref().expect("started with start_tls").port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.proc = None;
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("redis-server");
        let mut command = Command::new(bin);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir);
        if let Some(tls) = &self.tls {
            let path = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
            command
                .args(["--tls-port", &tls.port.to_string(), "--tls-auth-clients", "no"])
                .args(["--tls-cert-file", &path("server.pem"), "--tls-key-file", &path("server.key")])
                .args(["--tls-ca-cert-file", &path("ca.pem")])
                .args(["--user", "default", "off"])
                .args(["--user", &tls.username, "on", &format!(">{}", tls.password), "~*", "&*", "+@all"]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin} (install it with `cargo xtask setup`): {e}"));
        self.proc = Some(Proc::from(child));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(redis::Value::SimpleString(pong)) = self.try_cmd(&["PING"])
                && pong == "PONG"
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not come up", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn try_cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let url = match &self.tls {
            None => self.url(),
            Some(tls) => format!("redis://{}:{}@127.0.0.1:{}/", tls.username, tls.password, self.port),
        };
        let client = redis::Client::open(url)?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
        connection.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut connection)
    }

    /// Runs one command (a fresh connection each time: simple, and it works
    /// across kills and restarts).
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        self.try_cmd(args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// An integer key's value (`None` when absent).
    pub fn get_int(&self, key: &str) -> Option<i64> {
        match self.cmd(&["GET", key]) {
            redis::Value::Nil => None,
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).parse().ok(),
            other => panic!("GET {key}: {other:?}"),
        }
    }

    /// Server time (`TIME`) as (unix seconds, microseconds).
    pub fn time(&self) -> (u64, u64) {
        let redis::Value::Array(parts) = self.cmd(&["TIME"]) else { panic!("TIME is an array") };
        let number = |v: &redis::Value| match v {
            redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).parse::<u64>().expect("number"),
            other => panic!("TIME part {other:?}"),
        };
        (number(&parts[0]), number(&parts[1]))
    }

    /// Sleeps until `offset` past the start of the next second of Redis
    /// time, and returns that second: the window a burst sent now lands in.
    pub async fn next_window(&self, offset: Duration) -> u64 {
        let (second, micros) = self.time();
        tokio::time::sleep(Duration::from_micros(1_000_000 - micros) + offset).await;
        second + 1
    }
}

/// The pinned `openai` SDK's Python, installed by `cargo xtask setup`.
pub fn openai_python() -> PathBuf {
    let pins = include_str!("../python/requirements-openai.txt");
    let version = pins.lines().find_map(|l| l.trim().strip_prefix("openai==")).expect("openai pinned");
    let home = std::env::var_os("HOME").expect("HOME");
    let python = PathBuf::from(home).join(format!(".local/share/turnstile/openai-{version}/bin/python"));
    assert!(python.exists(), "{} is missing: run `cargo xtask setup`", python.display());
    python
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_skip_requests_without_one() {
        let stats = serde_json::json!({"traceparents": [
            {"path": "/v1/chat/completions", "traceparent": "00-a-b-01", "tracestate": null},
            {"path": "/v1/completions", "traceparent": null, "tracestate": null},
            {"path": "/v1/chat/completions", "traceparent": "00-c-d-01", "tracestate": "k=v"},
        ]});
        assert_eq!(traceparents_of(&stats), ["00-a-b-01", "00-c-d-01"]);
        assert!(traceparents_of(&serde_json::json!({})).is_empty());
    }
}
