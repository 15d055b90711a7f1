//! The request path in process: the proxy over fake engines (scripted
//! bodies), a pod store, in-process limits and userspace kernel assist. One
//! test per kind of answer a client can get from the proxy phases; the
//! listener's own answers (431/414, `UriTooLong`) are tested with the
//! listener, and `ShuttingDown` only comes from a runtime going away.

use std::sync::Mutex;

use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::body::scripted::{Scripted, Step};
use super::upstream::{SendError, UpstreamBody};
use super::*;
use crate::discovery::pods_file;
use crate::kernel::penalties::PenaltySettings;
use crate::limits::{FailureMode, LimitsConfig, UserLimits};
use crate::routing::RoutingConfig;

const MODEL: &str = "m";
const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const ANSWER: &str = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#;

/// What a fake engine does with one request.
#[derive(Clone, Debug)]
enum Reply {
    /// 200 with a JSON answer.
    Json(&'static str),
    /// A status and body.
    Status(u16, &'static str),
    /// An SSE answer that never ends.
    Hang,
    /// The connection is refused.
    Refuse,
    /// No answer within the upstream timeout.
    Timeout,
    /// No answer yet: the engine is still thinking.
    Thinking,
}

/// A request a fake engine received.
#[derive(Clone, Debug)]
struct Seen {
    port: u16,
    body: Value,
    /// The body as sent, and its `Content-Length` (`None`: chunked).
    raw: Bytes,
    length: Option<String>,
    /// The W3C `traceparent` the engine got.
    traceparent: Option<String>,
}

/// Engines by port, each answering by its script.
#[derive(Default)]
struct Engines {
    replies: Mutex<Vec<(u16, Reply)>>,
    seen: Mutex<Vec<Seen>>,
}

#[derive(Clone, Default)]
struct FakeUpstream(Arc<Engines>);

impl Upstream for FakeUpstream {
    type Body = Scripted;

    async fn send(&self, request: Request<UpstreamBody>) -> Result<Response<Scripted>, SendError> {
        let port = request.uri().port_u16().unwrap_or(0);
        let reply = self.reply(port);
        if !matches!(reply, Reply::Refuse) {
            let length = request.headers().get(header::CONTENT_LENGTH).map(|v| v.to_str().unwrap_or("?").to_owned());
            let traceparent = request.headers().get("traceparent").map(|v| v.to_str().unwrap_or("?").to_owned());
            // A body that breaks while being sent fails the exchange, as for hyper's client.
            let raw = match request.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(err) => return Err(SendError::Other(format!("sending the body: {err}"))),
            };
            let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
            self.0.seen.lock().map(|mut seen| seen.push(Seen { port, body, raw, length, traceparent })).unwrap_or(());
        }
        let answer = |status: u16, content_type: &str, body: Scripted| {
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("x")),
            );
            response
        };
        match reply {
            Reply::Json(text) => Ok(answer(200, "application/json", Scripted::sized(vec![Step::data(text)]))),
            Reply::Status(status, text) => {
                Ok(answer(status, "application/json", Scripted::sized(vec![Step::data(text)])))
            }
            Reply::Hang => {
                Ok(answer(200, "text/event-stream", Scripted::new(vec![Step::data("data: {}\n\n"), Step::Hang])))
            }
            Reply::Refuse => Err(SendError::Connect("connection refused".to_owned())),
            Reply::Timeout => Err(SendError::Timeout(Duration::from_secs(300))),
            Reply::Thinking => std::future::pending().await,
        }
    }
}

impl FakeUpstream {
    fn reply(&self, port: u16) -> Reply {
        let replies = self.0.replies.lock().map(|r| r.clone()).unwrap_or_default();
        replies.iter().find(|(p, _)| *p == port).map_or(Reply::Json(ANSWER), |(_, reply)| reply.clone())
    }

    fn set(&self, port: u16, reply: Reply) {
        self.0.replies.lock().map(|mut r| r.insert(0, (port, reply))).unwrap_or(());
    }

    fn seen(&self) -> Vec<Seen> {
        self.0.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A pod of the pods file, as JSON.
fn pod(name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
            "labels": {"model.aibrix.ai/name": MODEL, "model.aibrix.ai/port": port.to_string()}},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn with_label(mut pod: Value, key: &str, value: &str) -> Value {
    pod["metadata"]["labels"][key] = json!(value);
    pod
}

fn with_config(mut pod: Value, config: &Value) -> Value {
    pod["metadata"]["annotations"] = json!({"model.aibrix.ai/config": config.to_string()});
    pod
}

fn not_ready(mut pod: Value) -> Value {
    pod["status"]["conditions"][0]["status"] = json!("False");
    pod
}

/// The proxy under test and its surroundings.
struct Rig {
    proxy: Arc<Proxy<FakeUpstream>>,
    engines: FakeUpstream,
    store: Arc<PodStore>,
    kernel: Arc<KernelAssist>,
}

/// How a rig differs from the defaults.
struct RigOptions {
    limits: LimitsConfig,
    penalties: PenaltySettings,
    max_in_flight: usize,
    max_body_bytes: usize,
    default_strategy: &'static str,
    traces: Option<Traces>,
}

impl Default for RigOptions {
    fn default() -> Self {
        Self {
            limits: LimitsConfig::default(),
            penalties: PenaltySettings::default(),
            max_in_flight: 64,
            max_body_bytes: 1 << 20,
            default_strategy: "least-request",
            traces: None,
        }
    }
}

impl Rig {
    fn new(pods: &[Value]) -> Self {
        Self::with(pods, RigOptions::default())
    }

    fn with(pods: &[Value], options: RigOptions) -> Self {
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(PodStore::new(Arc::clone(&metrics)));
        let rig_store = Arc::clone(&store);
        let kernel = KernelAssist::userspace_only(options.penalties, Vec::new());
        let engines = FakeUpstream::default();
        let settings = ProxySettings {
            default_strategy: options.default_strategy.to_owned(),
            max_body_bytes: options.max_body_bytes,
            body_read_timeout: Duration::from_secs(30),
            max_connect_attempts: 3,
            trusted_proxies: client::TrustedProxies::new(Vec::new()),
            max_in_flight: options.max_in_flight,
            max_connections_per_pod: 8,
            upstream_timeout: Duration::from_secs(300),
            prefill_timeout: Duration::from_secs(30),
            wake_sleeping_models: false,
            trt_machine_id: 0,
            count_prompt_tokens: super::offload::TokenCount::Skip,
        };
        let limits = crate::limits::Limits::new(options.limits, Arc::clone(&metrics))
            .unwrap_or_else(|_| Limits::in_process(Arc::clone(&metrics)));
        let proxy = Proxy::new(ProxyParts {
            store,
            router: Router::new(&RoutingConfig::default(), &metrics.routing),
            engine_metrics: Arc::new(EngineMetrics::new(Duration::from_secs(2))),
            metrics,
            limits: Arc::new(limits),
            upstream: engines.clone(),
            kernel: Arc::clone(&kernel),
            traces: options.traces,
            settings,
        });
        let rig = Self { proxy: Arc::new(proxy), engines, store: rig_store, kernel };
        if !pods.is_empty() {
            rig.load(pods);
        }
        rig
    }

    fn load(&self, pods: &[Value]) {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": pods}).to_string();
        let parsed = pods_file::parse_pods(&list).unwrap_or_default();
        self.store.replace_all(parsed);
    }

    /// Sends a request and reads its whole answer.
    async fn call<RB>(&self, request: Request<RB>) -> Answer
    where
        RB: Body<Data = Bytes> + Send + Unpin + 'static,
        RB::Error: Into<BoxError>,
    {
        let response = Arc::clone(&self.proxy).handle(request, ([10, 0, 0, 9], 40000).into()).await;
        Answer::read(response).await
    }

    async fn chat(&self, headers: &[(&str, &str)]) -> Answer {
        self.call(post("/v1/chat/completions", CHAT, headers)).await
    }
}

fn post(path: &str, body: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut request = Request::post(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Full::new(Bytes::from(body.to_owned()))).unwrap_or_default()
}

/// A whole answer.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    async fn read(response: Response<ProxyBody<Scripted>>) -> Self {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned());
        Self { status: parts.status, headers: parts.headers, body: body.unwrap_or_else(|e| format!("<{e}>")) }
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The OpenAI-style error message.
    fn message(&self) -> String {
        let value: Value = serde_json::from_str(&self.body).unwrap_or(Value::Null);
        value["error"]["message"].as_str().unwrap_or("").to_owned()
    }

    fn assert_error(&self, status: u16, message: &str) {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert!(self.message().contains(message), "{message:?} not in {self:?}");
        assert!(!self.header("request-id").is_empty(), "every answer names its request");
        assert_eq!(self.header("x-request-id"), self.header("request-id"), "under OpenAI's name too");
    }
}

#[tokio::test]
async fn bad_requests_are_answered_before_any_engine_is_asked() {
    let rig = Rig::new(&[pod("p0", 9000), with_label(not_ready(pod("cold", 9001)), "model.aibrix.ai/name", "cold")]);
    let cases: Vec<(Request<Full<Bytes>>, u16, &str)> = vec![
        (post("/v1/chat/completions", "{not json", &[]), 400, "error processing request body"),
        (post("/v1/completions", r#"{"prompt":"x"}"#, &[]), 400, "'model' is a required property"),
        (post("/v1/chat/completions", r#"{"model":"m"}"#, &[]), 400, "no messages"),
        (post("/v1/chat/completions", r#"{"model":"nope","messages":[{}]}"#, &[]), 400, "model nope does not exist"),
        (post("/v1/nowhere", CHAT, &[]), 404, "unknown request path /v1/nowhere"),
        (Request::get("/v1/chat/completions").body(Full::default()).unwrap_or_default(), 405, "method GET"),
        (post("/v1/chat/completions", CHAT, &[("routing-strategy", "bogus")]), 400, "incorrect routing strategy bogus"),
        (post("/v1/chat/completions", CHAT, &[("external-filter", "a in (")]), 400, "invalid external-filter"),
        (post("/v1/chat/completions", CHAT, &[("external-filter", "zone=none")]), 503, "no ready pods"),
        (post("/v1/chat/completions", r#"{"model":"cold","messages":[{}]}"#, &[]), 503, "no ready pods for model cold"),
        (post("/v1/chat/completions", CHAT, &[("content-length", "99999999")]), 413, "exceeds"),
    ];
    for (request, status, message) in cases {
        rig.call(request).await.assert_error(status, message);
    }
    assert!(rig.engines.seen().is_empty(), "no engine was asked: {:?}", rig.engines.seen());
}

#[tokio::test]
async fn a_body_too_large_without_a_declared_length_is_cut_at_the_limit() {
    let rig = Rig::with(&[pod("p0", 9000)], RigOptions { max_body_bytes: 64, ..RigOptions::default() });
    let long = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(200));
    rig.call(post("/v1/completions", &long, &[])).await.assert_error(413, "exceeds 64 bytes");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_breaks_or_never_ends_is_answered() {
    let rig = Rig::new(&[pod("p0", 9000)]);
    let respond = |body: Scripted| {
        let proxy = Arc::clone(&rig.proxy);
        let mut request = Request::new(body);
        *request.method_mut() = Method::POST;
        *request.uri_mut() = http::Uri::from_static("/v1/completions");
        async move { Answer::read(proxy.handle(request, ([10, 0, 0, 9], 1).into()).await).await }
    };
    respond(Scripted::new(vec![Step::data("{\"model\""), Step::Fail])).await.assert_error(400, "failed to read");
    respond(Scripted::new(vec![Step::data("{"), Step::Hang])).await.assert_error(408, "not received within 30 s");
}

#[tokio::test]
async fn until_pods_are_loaded_every_model_is_a_retryable_503() {
    let rig = Rig::new(&[]);
    rig.chat(&[]).await.assert_error(503, "has not loaded its pods");
    let models = rig.call(Request::get("/v1/models").body(Full::default()).unwrap_or_default()).await;
    models.assert_error(503, "has not loaded its pods");
    rig.load(&[pod("p0", 9000)]);
    let models = rig.call(Request::get("/v1/models").body(Full::default()).unwrap_or_default()).await;
    assert_eq!(models.status, StatusCode::OK);
    assert!(models.body.contains(r#""id":"m""#), "{models:?}");
}

#[tokio::test]
async fn a_proxied_answer_carries_the_gateways_headers() {
    let rig = Rig::new(&[pod("p0", 9000)]);
    let answer = rig.chat(&[("user", "alice")]).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body, ANSWER);
    assert_eq!((answer.header("target-pod"), answer.header("target-pod-ip")), ("p0", "127.0.0.1:9000"));
    assert_eq!(answer.header("routing-strategy"), "least-request");
    assert_eq!(rig.engines.seen().len(), 1);
    assert!(!answer.header("request-id").is_empty());
    assert_eq!(answer.header("x-request-id"), answer.header("request-id"), "the id OpenAI's SDKs read");
}

#[tokio::test]
async fn limits_answer_401_and_429_with_what_was_exceeded() {
    let limits = LimitsConfig { bearer_token: Some("sekrit".to_owned()), ..LimitsConfig::default() };
    let rig = Rig::with(&[pod("p0", 9000)], RigOptions { limits, ..RigOptions::default() });
    rig.chat(&[]).await.assert_error(401, "Incorrect API key");
    assert_eq!(rig.chat(&[("authorization", "Bearer sekrit")]).await.status, StatusCode::OK);

    let config = json!({"defaultProfile": "d", "profiles": {"d": {"requestsPerSecond": 1}}});
    let rig = Rig::new(&[with_config(pod("p0", 9000), &config)]);
    assert_eq!(rig.chat(&[]).await.status, StatusCode::OK);
    rig.chat(&[]).await.assert_error(429, "model: m has exceeded RPS: 1");

    let limits = LimitsConfig { default_user: UserLimits { rpm: Some(1), tpm: None }, ..LimitsConfig::default() };
    let rig = Rig::with(&[pod("p0", 9000)], RigOptions { limits, ..RigOptions::default() });
    assert_eq!(rig.chat(&[("user", "u1")]).await.status, StatusCode::OK);
    rig.chat(&[("user", "u1")]).await.assert_error(429, "user: u1 has exceeded RPM: 1");

    let limits = LimitsConfig { default_user: UserLimits { rpm: None, tpm: Some(5) }, ..LimitsConfig::default() };
    let rig = Rig::with(&[pod("p0", 9000)], RigOptions { limits, ..RigOptions::default() });
    let first = rig.chat(&[("user", "u2")]).await;
    assert_eq!(first.status, StatusCode::OK, "the answer's 10 tokens are charged as it ends");
    rig.chat(&[("user", "u2")]).await.assert_error(429, "user: u2 has exceeded TPM: 5");
}

#[tokio::test]
async fn a_closed_limit_store_that_fails_answers_503() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().map(|a| a.port()));
    let port = dead.ok().and_then(Result::ok).unwrap_or(1);
    let limits = LimitsConfig {
        redis_url: Some(format!("redis://127.0.0.1:{port}/")),
        failure_mode: FailureMode::Closed,
        redis_call_timeout: Duration::from_millis(50),
        ..LimitsConfig::default()
    };
    let config = json!({"defaultProfile": "d", "profiles": {"d": {"requestsPerSecond": 100}}});
    let rig = Rig::with(&[with_config(pod("p0", 9000), &config)], RigOptions { limits, ..RigOptions::default() });
    rig.chat(&[]).await.assert_error(503, "rate limit store unavailable");
    assert!(rig.engines.seen().is_empty());
}

#[tokio::test]
async fn a_client_that_keeps_sending_past_429s_is_penalised() {
    let penalties =
        PenaltySettings { threshold: 3, window: Duration::from_secs(10), duration: Duration::from_secs(60) };
    let config = json!({"defaultProfile": "d", "profiles": {"d": {"requestsPerSecond": 1}}});
    let rig = Rig::with(&[with_config(pod("p0", 9000), &config)], RigOptions { penalties, ..RigOptions::default() });
    assert_eq!(rig.chat(&[]).await.status, StatusCode::OK);
    for _ in 0..3 {
        rig.chat(&[]).await.assert_error(429, "exceeded RPS");
    }
    let penalised = rig.chat(&[]).await;
    penalised.assert_error(429, "client 10.0.0.9 is refused for");
    assert_eq!(penalised.header("connection"), "close", "an HTTP/1 client must reconnect");
    assert!(rig.kernel.penalty_remaining(crate::kernel::penalties::ClientAddr::direct([10, 0, 0, 9].into())).is_some());
}

#[tokio::test]
async fn past_max_in_flight_requests_get_503_until_a_slot_frees() {
    let rig = Rig::with(&[pod("p0", 9000)], RigOptions { max_in_flight: 1, ..RigOptions::default() });
    rig.engines.set(9000, Reply::Hang);
    let held = Arc::clone(&rig.proxy).handle(post("/v1/chat/completions", CHAT, &[]), ([10, 0, 0, 9], 1).into()).await;
    assert_eq!(held.status(), StatusCode::OK);
    let refused = rig.chat(&[]).await;
    refused.assert_error(503, "limit of 1 requests in flight");
    assert_eq!(refused.header("retry-after"), "1");
    drop(held);
    rig.engines.set(9000, Reply::Json(ANSWER));
    assert_eq!(rig.chat(&[]).await.status, StatusCode::OK, "the slot came back with the answer's end");
}

#[tokio::test]
async fn a_refused_connection_moves_to_another_pod_and_nothing_is_sent_twice() {
    let rig = Rig::new(&[pod("p0", 9000), pod("p1", 9001)]);
    rig.engines.set(9000, Reply::Refuse);
    for _ in 0..6 {
        let answer = rig.chat(&[]).await;
        assert_eq!((answer.status, answer.header("target-pod")), (StatusCode::OK, "p1"), "{answer:?}");
    }
    assert_eq!(rig.engines.seen().len(), 6, "each request reached one engine once");

    rig.engines.set(9001, Reply::Refuse);
    rig.chat(&[]).await.assert_error(502, "connection refused");
}

#[tokio::test]
async fn engine_failures_after_sending_are_final() {
    let rig = Rig::new(&[pod("p0", 9000), pod("p1", 9001)]);
    rig.engines.set(9000, Reply::Timeout);
    rig.engines.set(9001, Reply::Timeout);
    rig.chat(&[]).await.assert_error(504, "did not answer within 300 s");
    let error_body = r#"{"error":{"message":"engine says no"}}"#;
    rig.engines.set(9000, Reply::Status(500, error_body));
    rig.engines.set(9001, Reply::Status(500, error_body));
    let answer = rig.chat(&[]).await;
    assert_eq!(answer.status.as_u16(), 500, "the engine's status is kept, and not retried elsewhere");
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    assert_eq!(
        body,
        serde_json::json!({"error":{"message":"engine says no","type":"api_error","code":null,"param":null}}),
        "the engine's error in the OpenAI shape"
    );
}

#[tokio::test]
async fn engine_errors_reach_the_client_in_the_openai_shape() {
    let rig = Rig::new(&[pod("p0", 9000)]);
    let flat =
        r#"{"object":"error","message":"max_tokens is too large","type":"BadRequestError","param":null,"code":400}"#;
    rig.engines.set(9000, Reply::Status(400, flat));
    let answer = rig.chat(&[]).await;
    assert_eq!(answer.status.as_u16(), 400);
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    assert_eq!(body["error"]["message"], "max_tokens is too large", "{}", answer.body);
    assert_eq!(body["error"]["code"], 400);

    let openai = r#"{"error":{"message":"no","type":"invalid_request_error","param":"model","code":"x"}}"#;
    rig.engines.set(9000, Reply::Status(404, openai));
    let answer = rig.chat(&[]).await;
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (404, openai), "already OpenAI-shaped: untouched");

    rig.engines.set(9000, Reply::Status(502, "<html><body>Bad Gateway</body></html>"));
    let answer = rig.chat(&[]).await;
    assert_eq!(answer.status.as_u16(), 502);
    assert!(answer.body.contains(r#""message":"Internal server error""#), "{}", answer.body);
}

/// A `pd` roleset: prefill pod on `prefill`, decode pod on `decode`.
fn roleset(name: &str, prefill: u16, decode: u16) -> Vec<Value> {
    let member = |role: &str, port| {
        let pod = with_label(pod(&format!("{name}-{role}"), port), "roleset-name", name);
        with_label(pod, "role-name", role)
    };
    vec![member("prefill", prefill), member("decode", decode)]
}

#[tokio::test]
async fn pd_prefills_then_decodes_with_the_kv_parameters() {
    let rig = Rig::new(&roleset("rs", 9100, 9101));
    rig.engines.set(9100, Reply::Json(r#"{"kv_transfer_params":{"remote_engine_id":"e1"}}"#));
    let answer = rig.chat(&[("routing-strategy", "pd")]).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!((answer.header("prefill-target-pod"), answer.header("target-pod")), ("rs-prefill", "rs-decode"));
    let seen = rig.engines.seen();
    assert_eq!(seen.iter().map(|s| s.port).collect::<Vec<_>>(), [9100, 9101]);
    assert_eq!(seen[0].body["max_tokens"], 1);
    assert_eq!(seen[1].body["kv_transfer_params"], json!({"remote_engine_id": "e1", "remote_host": "127.0.0.1"}));
}

#[tokio::test]
async fn pd_failures_say_what_failed_and_send_no_decode() {
    let rig = Rig::new(&[pod("plain", 9000)]);
    rig.chat(&[("routing-strategy", "pd")]).await.assert_error(503, "no roleset of model m");

    let rig = Rig::new(&roleset("rs", 9100, 9101));
    rig.engines.set(9100, Reply::Status(500, "prefill broke"));
    rig.chat(&[("routing-strategy", "pd")]).await.assert_error(503, "prefill request to pod rs-prefill failed");
    assert!(rig.engines.seen().iter().all(|s| s.port == 9100), "no decode was sent");

    // A decode pod that refuses after the prefill ran is final: another
    // pair would prefill the prompt again.
    let rig = Rig::new(&[roleset("a", 9200, 9201), roleset("b", 9300, 9301)].concat());
    rig.engines.set(9201, Reply::Refuse);
    rig.engines.set(9301, Reply::Refuse);
    rig.chat(&[("routing-strategy", "pd")]).await.assert_error(502, "connection refused");
    assert_eq!(rig.engines.seen().len(), 1, "one prefill, no second pair: {:?}", rig.engines.seen());

    // A refused prefill pod is passed over for another roleset's.
    let rig = Rig::new(&[roleset("a", 9200, 9201), roleset("b", 9300, 9301)].concat());
    rig.engines.set(9200, Reply::Refuse);
    rig.engines.set(9300, Reply::Refuse);
    rig.chat(&[("routing-strategy", "pd")]).await.assert_error(503, "connection refused");
    rig.engines.set(9300, Reply::Json("{}"));
    for _ in 0..4 {
        let answer = rig.chat(&[("routing-strategy", "pd")]).await;
        assert_eq!((answer.status, answer.header("prefill-target-pod")), (StatusCode::OK, "b-prefill"));
    }
}

/// A roleset whose pods say they run `engine`.
fn engine_roleset(name: &str, engine: &str, prefill: u16, decode: u16) -> Vec<Value> {
    roleset(name, prefill, decode).into_iter().map(|pod| with_label(pod, "model.aibrix.ai/engine", engine)).collect()
}

#[tokio::test]
async fn sglang_pairs_go_out_together_with_one_bootstrap_room() {
    let rig = Rig::new(&engine_roleset("rs", "sglang", 9100, 9101));
    let answer = rig.chat(&[("routing-strategy", "pd")]).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.header("prefill-target-pod"), "rs-prefill");
    let seen = rig.engines.seen();
    let body = |port| seen.iter().find(|s| s.port == port).map(|s| s.body.clone()).unwrap_or(Value::Null);
    let (prefill, decode) = (body(9100), body(9101));
    for side in [&prefill, &decode] {
        assert_eq!((side["bootstrap_host"].clone(), side["bootstrap_port"].clone()), (json!("127.0.0.1"), json!(8998)));
    }
    assert_eq!(prefill["bootstrap_room"], decode["bootstrap_room"]);
    assert_eq!((prefill["max_tokens"].clone(), decode.get("max_tokens").cloned()), (json!(1), None), "{decode}");
}

#[tokio::test(start_paused = true)]
async fn an_sglang_prefill_that_never_answers_ends_the_decode_waiting_for_it() {
    let rig = Rig::new(&engine_roleset("rs", "sglang", 9100, 9101));
    // Both wait: the prefill never answers, the decode waits for its KV blocks.
    rig.engines.set(9100, Reply::Hang);
    rig.engines.set(9101, Reply::Hang);
    let answer = rig.chat(&[("routing-strategy", "pd")]).await;
    answer.assert_error(503, "prefill request to pod rs-prefill failed: no answer within 30 s");
    let mut ports: Vec<u16> = rig.engines.seen().iter().map(|s| s.port).collect();
    ports.sort_unstable();
    assert_eq!(ports, [9100, 9101], "both went out together");
    // A prefill error: the same, at once.
    rig.engines.set(9100, Reply::Status(500, "no room"));
    rig.chat(&[("routing-strategy", "pd")]).await.assert_error(503, "failed: status 500: no room");
    // A decode pod that answers with an error does not wait for the prefill.
    rig.engines.set(9100, Reply::Hang);
    rig.engines.set(9101, Reply::Status(429, r#"{"error":{"message":"busy","type":"rate_limit","code":429}}"#));
    let started = tokio::time::Instant::now();
    let answer = rig.chat(&[("routing-strategy", "pd")]).await;
    assert_eq!(answer.status.as_u16(), 429, "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "not held until the prefill timeout");
}

#[tokio::test]
async fn trtllm_decodes_with_the_context_phase_parameters() {
    let rig = Rig::new(&engine_roleset("rs", "trtllm", 9100, 9101));
    let prefill_answer = r#"{"id":"c","prompt_token_ids":[5,6],"choices":[{"disaggregated_params":{"request_type":"context_only","ctx_request_id":1152921504606846979}}]}"#;
    rig.engines.set(9100, Reply::Json(prefill_answer));
    let answer = rig.chat(&[("routing-strategy", "pd")]).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let seen = rig.engines.seen();
    assert_eq!(seen.iter().map(|s| s.port).collect::<Vec<_>>(), [9100, 9101], "prefill first");
    assert!(seen[0].body.get("max_completion_tokens").is_none());
    assert_eq!(seen[0].body["disaggregated_params"]["request_type"], "context_only");
    let decode = String::from_utf8_lossy(&seen[1].raw).into_owned();
    assert!(decode.contains(r#""ctx_request_id":1152921504606846979"#), "exact id: {decode}");
    assert_eq!(seen[1].body["disaggregated_params"]["request_type"], "generation_only");
    assert_eq!(seen[1].body["prompt_token_ids"], json!([5, 6]));
}

#[test]
fn request_id_from_traceparent_or_fresh_uuid() {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        names::TRACEPARENT,
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    assert_eq!(request_id(&headers), "4bf92f3577b34da6a3ce929d0e0e4736");
    headers.insert(
        names::TRACEPARENT,
        HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
    );
    let fresh = request_id(&headers);
    assert_eq!(fresh.len(), 36, "invalid all-zero trace id replaced by a UUID");
    assert_ne!(request_id(&http::HeaderMap::new()), fresh);
}

/// A multipart form: `fields` (name, value) then a file part named `file`.
fn form(boundary: &str, fields: &[(&str, &str)], file: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

/// A client body sent in chunks of `chunk` bytes, with no declared length.
fn chunked(body: &[u8], chunk: usize) -> Scripted {
    Scripted::new(body.chunks(chunk).map(|c| Step::data(String::from_utf8_lossy(c).into_owned())).collect())
}

fn upload<B>(path: &str, boundary: &str, body: B) -> Request<B> {
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = http::Uri::try_from(path).unwrap_or_default();
    let content_type = format!("multipart/form-data; boundary={boundary}");
    request
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("x")));
    request
}

#[tokio::test]
async fn an_upload_is_routed_by_its_model_field_and_reaches_the_pod_byte_for_byte() {
    let rig =
        Rig::with(&[pod("p0", 9000), pod("p1", 9001)], RigOptions { max_body_bytes: 256, ..RigOptions::default() });
    // A file ten times the body limit: only the fields before it are held.
    let file: Vec<u8> = (0..2560u32).map(|i| b'a' + (i % 26) as u8).collect();
    let body = form("XyZ", &[("model", " m "), ("stream", "true")], &file);
    let answer = rig.call(upload("/v1/audio/transcriptions", "XyZ", chunked(&body, 100))).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let seen = rig.engines.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].raw, Bytes::from(body.clone()), "the pod gets exactly the client's bytes");
    assert_eq!(seen[0].length, None, "no declared length: sent chunked");

    // A pod that refuses the connection got nothing: the next gets it all,
    // with the client's length.
    rig.engines.set(9000, Reply::Refuse);
    rig.engines.set(9001, Reply::Refuse);
    rig.engines.set(9001, Reply::Json(ANSWER));
    for _ in 0..4 {
        // A body of known length (as hyper reads a Content-Length one).
        let steps = body.chunks(77).map(|c| Step::data(String::from_utf8_lossy(c).into_owned())).collect();
        let mut sized = upload("/v1/audio/translations", "XyZ", Scripted::sized(steps));
        sized.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        assert_eq!(rig.call(sized).await.status, StatusCode::OK);
    }
    let seen = rig.engines.seen();
    assert!(seen[1..].iter().all(|s| s.port == 9001 && s.raw == body), "all to the pod that answers, whole");
    assert_eq!(seen[1].length.as_deref(), Some(body.len().to_string().as_str()));
}

#[tokio::test]
async fn uploads_that_cannot_be_routed_get_aibrixs_answers() {
    let rig = Rig::with(&[pod("p0", 9000)], RigOptions { max_body_bytes: 256, ..RigOptions::default() });
    let path = "/v1/audio/transcriptions";
    let json = rig.call(post(path, r#"{"model":"m"}"#, &[("content-type", "application/json")])).await;
    json.assert_error(400, "audio requests must use multipart/form-data content-type");
    assert_eq!(json.header("x-error-request-body-processing"), "true");

    let no_boundary = rig.call(post(path, "x", &[("content-type", "multipart/form-data")])).await;
    no_boundary.assert_error(400, "missing boundary in content-type");
    assert_eq!(no_boundary.header("x-error-multipart-parsing"), "true");

    let no_model = rig.call(upload(path, "b", chunked(&form("b", &[("language", "en")], b"RIFF"), 10))).await;
    no_model.assert_error(400, "'model' is a required property");
    assert_eq!(no_model.header("x-error-multipart-parsing"), "true");

    let broken = rig.call(upload(path, "b", chunked(b"--b\r\nnot a header line", 10))).await;
    broken.assert_error(400, "failed to parse multipart form");

    // The model after a file larger than the limit: refused, not held.
    let mut late = form("b", &[], &[b'x'; 1000]);
    late.extend_from_slice(b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--b--\r\n");
    let late = rig.call(upload(path, "b", chunked(&late, 64))).await;
    late.assert_error(413, "'model' field must come within the first 256 bytes");

    // A client that breaks off or goes quiet mid-upload: its failure, not the pod's.
    let mut broken = form("b", &[("model", "m")], b"");
    broken.extend_from_slice(&[b'x'; 300]);
    let mut steps: Vec<Step> =
        broken.chunks(100).map(|c| Step::data(String::from_utf8_lossy(c).into_owned())).collect();
    steps.push(Step::Fail);
    let answer = rig.call(upload(path, "b", Scripted::new(steps))).await;
    answer.assert_error(400, "failed to read the request body");
    assert_eq!(answer.header("x-error-upstream"), "", "not blamed on the pod");

    let unknown = rig.call(upload(path, "b", chunked(&form("b", &[("model", "nope")], b"RIFF"), 10))).await;
    unknown.assert_error(400, "model nope does not exist");
    assert!(rig.engines.seen().is_empty(), "no whole upload reached an engine: {:?}", rig.engines.seen());
}

#[tokio::test]
async fn a_model_serves_the_paths_its_annotation_lists() {
    let annotated = |name: &str, port: u16, model: &str, paths: &str| {
        let mut pod = with_label(pod(name, port), "model.aibrix.ai/name", model);
        pod["metadata"]["annotations"] = json!({"model.aibrix.ai/model-router-custom-paths": paths});
        pod
    };
    let rig = Rig::new(&[
        annotated("p0", 9000, "m", "/score/custom, /version ,"),
        annotated("q0", 9100, "other", "/tokenize"),
    ]);
    let get = |path: &str, model: &str| {
        Request::get(path).header("model", model).body(Full::<Bytes>::default()).unwrap_or_default()
    };
    // Any method; the model from the `model` header, or from a JSON body.
    assert_eq!(rig.call(get("/version", "m")).await.status, StatusCode::OK);
    assert_eq!(rig.call(post("/score/custom/x", r#"{"model":"m","text":"a"}"#, &[])).await.status, StatusCode::OK);
    assert_eq!(rig.engines.seen().iter().map(|s| s.port).collect::<Vec<_>>(), [9000, 9000]);
    // Path elements, not characters; another model's path is not this one's.
    rig.call(get("/versions", "m")).await.assert_error(404, "unknown request path /versions");
    rig.call(get("/tokenize", "m")).await.assert_error(404, "unknown request path /tokenize");
    rig.call(get("/version", "")).await.assert_error(400, "'model' is a required property");
    let starting = Rig::new(&[]);
    starting.call(get("/version", "m")).await.assert_error(503, "has not loaded its pods");
    assert_eq!(rig.call(get("/tokenize", "other")).await.status, StatusCode::OK);
    assert_eq!(rig.engines.seen().last().map(|s| s.port), Some(9100));
}

#[tokio::test]
async fn every_aibrix_path_is_routed_by_its_body() {
    let rig = Rig::new(&[pod("p0", 9000)]);
    let bodies = [
        ("/v1/messages", r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#),
        ("/v1/rerank", r#"{"model":"m","query":"q","documents":["a","b"]}"#),
        ("/v1/classify", r#"{"model":"m","input":["a","b"]}"#),
        ("/v1/score", r#"{"model":"m","text_1":"a","text_2":"b"}"#),
        ("/v1/images/generations", r#"{"model":"m","prompt":"a cat"}"#),
        ("/v1/video/generations", r#"{"model":"m","prompt":"a cat"}"#),
    ];
    for (path, body) in bodies {
        let answer = rig.call(post(path, body, &[])).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {answer:?}");
        assert_eq!(answer.header("target-pod"), "p0", "{path}");
    }
    assert_eq!(rig.engines.seen().len(), bodies.len());
    rig.call(post("/v1/messages", r#"{"model":"m","messages":[]}"#, &[])).await.assert_error(400, "no messages");
    rig.call(post("/v1/rerank", r#"{"model":"m","query":"q"}"#, &[]))
        .await
        .assert_error(400, "'documents' is a required");
    let get = Request::get("/v1/rerank").body(Full::<Bytes>::default()).unwrap_or_default();
    rig.call(get).await.assert_error(405, "method GET");
}

#[tokio::test]
async fn a_lora_adapter_routes_to_its_pods_and_is_listed_with_its_parent() {
    use crate::discovery::{AdapterBinding, AdapterSource};
    let rig = Rig::new(&[pod("p0", 9000), pod("p1", 9001), pod("p2", 9002)]);
    let bind = |pod: &str| AdapterBinding {
        adapter: "org/sql-lora".to_owned(),
        parent: Some(MODEL.to_owned()),
        namespace: "default".to_owned(),
        pod: pod.to_owned(),
        key: None,
        config_annotation: None,
    };
    rig.store.set_adapters(AdapterSource::ModelAdapter, vec![bind("p0"), bind("p2")]);
    let body = r#"{"model":"org/sql-lora","messages":[{"role":"user","content":"hi"}]}"#;
    let mut pods = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let answer = rig.call(post("/v1/chat/completions", body, &[])).await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        pods.insert(answer.header("target-pod").to_owned());
    }
    assert_eq!(pods.into_iter().collect::<Vec<_>>(), ["p0", "p2"], "only the pods serving the adapter");
    let sent = rig.engines.seen();
    assert!(sent.iter().all(|seen| seen.body["model"] == "org/sql-lora"), "the engine is asked for the adapter");
    let metrics = rig.proxy.metrics.render();
    assert!(
        metrics.contains(r#"turnstile_lora_affinity_routes_total{model="org/sql-lora",tier="free_slot"} 12"#),
        "no engine was scraped yet: each taken to have a free slot: {metrics}"
    );

    let get = |path: &str| Request::get(path.to_owned()).body(Full::default()).unwrap_or_default();
    let list = rig.call(get("/v1/models")).await;
    let list: Value = serde_json::from_str(&list.body).expect("json");
    let parents: Vec<(&str, Option<&str>)> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or(""), m["parent"].as_str()))
        .collect();
    assert_eq!(parents, [("m", None), ("org/sql-lora", Some("m"))]);
    let one = rig.call(get("/v1/models/org/sql-lora")).await;
    assert_eq!(one.status, StatusCode::OK, "{one:?}");
    let one: Value = serde_json::from_str(&one.body).expect("json");
    assert_eq!((one["id"].as_str(), one["parent"].as_str()), (Some("org/sql-lora"), Some("m")));
    assert_eq!(rig.call(get("/v1/models/org%2Fsql-lora")).await.status, StatusCode::OK, "an encoded slash");
    let missing = rig.call(get("/v1/models/nope")).await;
    missing.assert_error(404, "The model `nope` does not exist.");
    let error: Value = serde_json::from_str(&missing.body).expect("json");
    assert_eq!(error["error"]["code"], "model_not_found");

    // An engine that unloaded the adapter answers 404: the request goes on to
    // the other pod; when every pod says so, the adapter is an unknown model.
    rig.engines.set(9000, Reply::Status(404, r#"{"error":{"message":"The model `org/sql-lora` does not exist."}}"#));
    for _ in 0..6 {
        let answer = rig.call(post("/v1/chat/completions", body, &[])).await;
        assert_eq!((answer.status, answer.header("target-pod")), (StatusCode::OK, "p2"), "{answer:?}");
    }
    rig.engines.set(9002, Reply::Status(404, "{}"));
    rig.call(post("/v1/chat/completions", body, &[])).await.assert_error(400, "model org/sql-lora does not exist");
    // For the base model a 404 is the engine's answer, passed on.
    let mut statuses = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let answer = rig.chat(&[]).await;
        statuses.insert((answer.header("target-pod").to_owned(), answer.status.as_u16()));
    }
    assert!(statuses.contains(&("p0".to_owned(), 404)), "{statuses:?}");

    // Unbound: the adapter is gone; a request for it is an unknown model.
    rig.store.set_adapters(AdapterSource::ModelAdapter, Vec::new());
    rig.call(post("/v1/chat/completions", body, &[])).await.assert_error(400, "model org/sql-lora does not exist");
}

#[tokio::test]
async fn an_adapter_unloaded_on_many_pods_still_reaches_one_that_serves_it() {
    use crate::discovery::{AdapterBinding, AdapterSource};
    let pods: Vec<Value> = (0..5).map(|i| pod(&format!("p{i}"), 9100 + i)).collect();
    let rig = Rig::new(&pods);
    let bindings = (0..5)
        .map(|i| AdapterBinding {
            adapter: "sql".to_owned(),
            parent: Some(MODEL.to_owned()),
            namespace: "default".to_owned(),
            pod: format!("p{i}"),
            key: None,
            config_annotation: None,
        })
        .collect();
    rig.store.set_adapters(AdapterSource::Engines, bindings);
    // Four engines have unloaded it (more than --max-connect-attempts): the fifth still serves it.
    for port in 9100..9104 {
        rig.engines.set(port, Reply::Status(404, r#"{"error":{"message":"The model `sql` does not exist."}}"#));
    }
    let body = r#"{"model":"sql","prompt":"x"}"#;
    for _ in 0..4 {
        let answer = rig.call(post("/v1/completions", body, &[])).await;
        assert_eq!((answer.status, answer.header("target-pod")), (StatusCode::OK, "p4"), "{answer:?}");
    }
}

/// A rig whose spans are kept in memory, sampling `ratio` of new traces.
fn traced_rig(pods: &[Value], ratio: f64) -> (Rig, Arc<Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>) {
    let (traces, spans) = Traces::in_memory(ratio);
    (Rig::with(pods, RigOptions { traces: Some(traces), ..RigOptions::default() }), spans)
}

fn span_attr(span: &opentelemetry_sdk::trace::SpanData, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
}

#[tokio::test]
async fn a_traced_request_is_one_span_tree_and_the_engine_continues_it() {
    let (rig, spans) = traced_rig(&[pod("p0", 9000)], 1.0);
    let answer = rig.chat(&[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let spans = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let names: Vec<&str> = spans.iter().map(|s| &*s.name).collect();
    let root = spans.iter().find(|s| s.name == "POST /v1/chat/completions").expect("the request's span");
    let trace_id = root.span_context.trace_id();
    assert_eq!(answer.header("request-id"), trace_id.to_string(), "the request id is the trace id");
    for phase in ["read body", "resolve", "limit", "route", "upstream"] {
        let span = spans.iter().find(|s| s.name == phase).unwrap_or_else(|| panic!("no {phase} span in {names:?}"));
        assert_eq!(span.span_context.trace_id(), trace_id);
        assert_eq!(span.parent_span_id, root.span_context.span_id(), "{phase} is a child of the request");
    }
    assert_eq!(root.span_kind, opentelemetry::trace::SpanKind::Server);
    assert_eq!(span_attr(root, "gen_ai.request.model").as_deref(), Some("m"));
    assert_eq!(span_attr(root, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(span_attr(root, "gen_ai.usage.input_tokens").as_deref(), Some("4"));
    assert_eq!(span_attr(root, "gen_ai.usage.output_tokens").as_deref(), Some("6"));
    assert_eq!(span_attr(root, "turnstile.pod").as_deref(), Some("p0"));
    assert_eq!(span_attr(root, "turnstile.strategy").as_deref(), Some("least-request"));
    assert_eq!(span_attr(root, "http.response.status_code").as_deref(), Some("200"));
    let limit = spans.iter().find(|s| s.name == "limit").expect("limit span");
    assert_eq!(span_attr(limit, "turnstile.limit.store").as_deref(), Some("none"));
    let upstream = spans.iter().find(|s| s.name == "upstream").expect("upstream span");
    assert_eq!(upstream.span_kind, opentelemetry::trace::SpanKind::Client);
    let events: Vec<&str> = upstream.events.iter().map(|e| &*e.name).collect();
    assert_eq!(events, ["response headers", "first byte"]);
    assert!(upstream.end_time <= root.end_time, "the exchange ends with the answer, within the request");
    let seen = rig.engines.seen();
    let sent = format!("00-{trace_id}-{}-01", upstream.span_context.span_id());
    assert_eq!(seen[0].traceparent.as_deref(), Some(sent.as_str()), "the engine's parent is the exchange's span");
}

#[tokio::test]
async fn a_clients_trace_is_continued_and_its_sampling_decision_kept() {
    let (rig, spans) = traced_rig(&[pod("p0", 9000)], 0.0);
    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    rig.chat(&[("traceparent", client), ("tracestate", "vendor=1")]).await;
    let kept = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let root =
        kept.iter().find(|s| s.span_kind == opentelemetry::trace::SpanKind::Server).expect("sampled by the client");
    assert_eq!(root.span_context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(root.parent_span_id.to_string(), "00f067aa0ba902b7", "the client's span is the parent");

    // Not sampled by the client, none sampled by the ratio: nothing is
    // recorded, and the engine still gets the trace, unsampled, under a span
    // id of the gateway's.
    let before = kept.len();
    rig.chat(&[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")]).await;
    rig.chat(&[]).await;
    assert_eq!(spans.lock().map(|s| s.len()).unwrap_or(0), before, "unsampled requests record nothing");
    let seen = rig.engines.seen();
    let sent = seen[1].traceparent.clone().unwrap_or_default();
    assert!(sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && sent.ends_with("-00"), "{sent}");
    assert!(!sent.contains("b7ad6b7169203331"), "the gateway's own span id: {sent}");
    let fresh = seen[2].traceparent.clone().unwrap_or_default();
    assert!(fresh.len() == 55 && fresh.ends_with("-00"), "a trace is started when the client sent none: {fresh}");
}

#[tokio::test]
async fn failed_requests_and_refused_pods_show_in_the_trace() {
    let (rig, spans) = traced_rig(&[pod("p0", 9000), pod("p1", 9001)], 1.0);
    rig.call(post("/v1/chat/completions", r#"{"model":"nope","messages":[{}]}"#, &[])).await.assert_error(400, "nope");
    let kept = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let root = kept.iter().find(|s| s.span_kind == opentelemetry::trace::SpanKind::Server).expect("request span");
    assert_eq!(span_attr(root, "http.response.status_code").as_deref(), Some("400"));
    assert_eq!(span_attr(root, "error.type").as_deref(), Some("400"));
    let resolve = kept.iter().find(|s| s.name == "resolve").expect("resolve span");
    assert_eq!(span_attr(resolve, "error.type").as_deref(), Some("400"), "the phase that refused says so");
    assert_eq!(resolve.status, opentelemetry::trace::Status::Unset, "a refusal is not a failure of the phase");
    assert_eq!(root.status, opentelemetry::trace::Status::Unset, "a 4xx is not the server's failure");
    assert!(!kept.iter().any(|s| s.name == "upstream"), "no engine was asked");

    spans.lock().map(|mut s| s.clear()).unwrap_or(());
    rig.engines.set(9000, Reply::Refuse);
    rig.engines.set(9001, Reply::Refuse);
    rig.chat(&[]).await.assert_error(502, "connection refused");
    let kept = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let attempts: Vec<_> = kept.iter().filter(|s| s.name == "upstream").collect();
    assert_eq!(attempts.len(), 2, "one span per pod tried");
    assert!(attempts.iter().all(|s| span_attr(s, "error.type").as_deref() == Some("connect")));
    let root = kept.iter().find(|s| s.span_kind == opentelemetry::trace::SpanKind::Server).expect("request span");
    assert!(matches!(root.status, opentelemetry::trace::Status::Error { .. }), "a 502 is a server error");
}

#[tokio::test]
async fn a_traced_pd_request_has_a_prefill_span_the_prefill_engine_continues() {
    let (rig, spans) = traced_rig(&roleset("rs", 9100, 9101), 1.0);
    rig.engines.set(9100, Reply::Json(r#"{"kv_transfer_params":{"remote_engine_id":"e1"}}"#));
    let answer = rig.chat(&[("routing-strategy", "pd")]).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let kept = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let span = |name: &str| kept.iter().find(|s| s.name == name).cloned().unwrap_or_else(|| panic!("no {name} span"));
    let (root, prefill, upstream) = (span("POST /v1/chat/completions"), span("prefill"), span("upstream"));
    assert_eq!(prefill.parent_span_id, root.span_context.span_id());
    assert_eq!(span_attr(&prefill, "turnstile.pod").as_deref(), Some("rs-prefill"));
    assert_eq!(span_attr(&upstream, "turnstile.pod").as_deref(), Some("rs-decode"));
    assert!(prefill.end_time <= upstream.start_time, "the decode goes out after its prefill");
    let seen = rig.engines.seen();
    let parent_of = |port: u16| {
        let sent = seen.iter().find(|s| s.port == port).and_then(|s| s.traceparent.clone()).unwrap_or_default();
        sent.split('-').nth(2).unwrap_or_default().to_owned()
    };
    assert_eq!(parent_of(9100), prefill.span_context.span_id().to_string(), "the prefill engine's parent");
    assert_eq!(parent_of(9101), upstream.span_context.span_id().to_string(), "the decode engine's parent");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_before_the_answer_ends_its_spans_saying_so() {
    let (rig, spans) = traced_rig(&[pod("p0", 9000)], 1.0);
    rig.engines.set(9000, Reply::Thinking);
    let proxy = Arc::clone(&rig.proxy);
    let call = tokio::spawn(async move {
        let _ = proxy.handle(post("/v1/chat/completions", CHAT, &[]), ([10, 0, 0, 9], 1).into()).await;
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The client goes away while the engine thinks: hyper drops the request's future.
    call.abort();
    let _ = call.await;
    let kept = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let root = kept.iter().find(|s| s.name == "POST /v1/chat/completions").expect("the request's span ended");
    assert_eq!(span_attr(root, "turnstile.outcome").as_deref(), Some("client_gone"));
    let upstream = kept.iter().find(|s| s.name == "upstream").expect("the exchange's span ended");
    assert_eq!(span_attr(upstream, "error.type").as_deref(), Some("cancelled"));
}

#[rstest::rstest]
#[case::an_endpoint(Method::POST, "/v1/chat/completions", "POST /v1/chat/completions")]
#[case::the_model_list(Method::GET, "/v1/models", "GET /v1/models")]
#[case::a_path_the_gateway_does_not_own(Method::POST, "/v1/the/clients/own/text", "POST")]
#[case::another_method_on_an_endpoint(Method::GET, "/v1/chat/completions", "GET")]
#[case::a_made_up_method(Method::from_bytes(b"BREW").unwrap_or_default(), "/v1/chat/completions", "HTTP")]
fn span_names_never_carry_the_clients_text(#[case] method: Method, #[case] path: &str, #[case] name: &str) {
    assert_eq!(super::span_name(&method, path), name);
}
