//! The request lifecycle, one phase after another:
//! parse → resolve profile → limit → pick → forward → account.

pub mod client;
pub mod defaults;
pub mod forward;
pub mod listener;
pub mod memory;
pub mod offload;
pub mod pd;
pub mod request;
pub mod upstream_conn;
pub mod usage;
pub mod write_watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use crate::discovery::{PodInfo, PodStore};
use crate::engine_metrics::EngineMetrics;
use crate::errors::{self, GatewayError};
use crate::kernel::KernelAssist;
use crate::kernel::penalties::ClientAddr;
use crate::kernel::tagging::{ClientConn, UpstreamConn};
use crate::limits::{LimitRequest, Limits};
use crate::metrics::{Metrics, UNKNOWN_MODEL};
use crate::profiles::{self, Profile, RequestFeatures};
use crate::routing::{
    self, LabelSelector, RouteDecision, RouteRequest, Router, RoutingConfig, Strategy, StrategyError,
};
use forward::{RequestFacts, RequestRecord, SendError, TrackedBody, Upstream};
use request::Endpoint;

/// Response body of the proxy listener: a gateway-made body, or an engine's
/// answer streaming through.
pub type ProxyBody = Either<Full<Bytes>, TrackedBody>;

/// Tunables of the request path.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Strategy when neither config nor header names one.
    pub default_strategy: String,
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
    /// Pods tried for one request when connecting fails (nothing was sent).
    pub max_connect_attempts: usize,
    /// Peers whose `X-Forwarded-For` / `Forwarded` name the client.
    pub trusted_proxies: client::TrustedProxies,
    /// Most requests in flight in the whole gateway (503 above).
    pub max_in_flight: usize,
}

/// The gateway's requests in flight, and the most there were since the
/// memory trimmer last looked.
#[derive(Debug, Default)]
pub struct InFlightCount {
    pub current: std::sync::atomic::AtomicUsize,
    pub peak: std::sync::atomic::AtomicUsize,
}

/// One of the gateway's `--max-in-flight` request slots, held from the
/// request's arrival until its answer ends.
#[derive(Debug)]
pub struct InFlightSlot(Arc<InFlightCount>);

impl InFlightSlot {
    /// A slot, unless `limit` are taken.
    fn take(count: &Arc<InFlightCount>, limit: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let taken = count
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| (taken < limit).then_some(taken + 1))
            .ok()?;
        count.peak.fetch_max(taken + 1, Ordering::Relaxed);
        Some(Self(Arc::clone(count)))
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The proxy: shared state for every request.
pub struct Proxy {
    store: Arc<PodStore>,
    router: Router,
    /// Engine metrics of every ready pod, read by metric-driven strategies.
    engine_metrics: Arc<EngineMetrics>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    upstream: Upstream,
    settings: ProxySettings,
    /// Kernel assist: socket tagging and penalties for clients that keep
    /// sending after 429 (none in embedded tests).
    kernel: Option<Arc<KernelAssist>>,
    /// Where large bodies are parsed, tokenized and hashed.
    offload: offload::Offload,
    /// Requests in flight, against `settings.max_in_flight`.
    in_flight: Arc<InFlightCount>,
}

/// Headers the gateway reads or sets.
mod names {
    use http::header::HeaderName;
    pub const CONFIG_PROFILE: HeaderName = HeaderName::from_static("config-profile");
    pub const ROUTING_STRATEGY: HeaderName = HeaderName::from_static("routing-strategy");
    pub const TARGET_POD: HeaderName = HeaderName::from_static("target-pod");
    pub const TARGET_POD_IP: HeaderName = HeaderName::from_static("target-pod-ip");
    pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
    pub const CHOSEN_PROFILE: HeaderName = HeaderName::from_static("x-aibrix-config-profile");
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub const USER: HeaderName = HeaderName::from_static("user");
}

/// A failed request and what was known about it when it failed.
struct Failure {
    error: GatewayError,
    model: Option<Arc<str>>,
}

impl From<GatewayError> for Failure {
    fn from(error: GatewayError) -> Self {
        Self { error, model: None }
    }
}

impl Proxy {
    pub fn new(store: Arc<PodStore>, metrics: Arc<Metrics>, upstream: Upstream, settings: ProxySettings) -> Self {
        let limits = Arc::new(Limits::in_process(Arc::clone(&metrics)));
        let router = Router::new(&RoutingConfig::default(), &metrics.routing);
        // No scraper: metric-driven strategies fall back until `with_routing`.
        let engine_metrics = Arc::new(EngineMetrics::new(Duration::from_secs(2)));
        Self {
            store,
            router,
            engine_metrics,
            metrics,
            limits,
            upstream,
            settings,
            kernel: None,
            offload: offload::Offload::default(),
            in_flight: Arc::default(),
        }
    }

    /// Tags sockets with their model and reports 429s to kernel assist.
    pub fn with_kernel(mut self, kernel: Arc<KernelAssist>) -> Self {
        self.kernel = Some(kernel);
        self
    }

    /// Replaces the default strategy settings and the (empty) engine metrics
    /// the strategies read.
    pub fn with_routing(mut self, config: &RoutingConfig, engine_metrics: Arc<EngineMetrics>) -> Self {
        self.router = Router::new(config, &self.metrics.routing);
        self.engine_metrics = engine_metrics;
        self
    }

    /// Replaces the default limiter (in-process model RPS caps, no users,
    /// no auth).
    pub fn with_limits(mut self, limits: Arc<Limits>) -> Self {
        self.limits = limits;
        self
    }

    /// The count of requests in flight (for the memory trimmer).
    pub fn in_flight_counter(&self) -> Arc<InFlightCount> {
        Arc::clone(&self.in_flight)
    }

    /// Validates a strategy name at start-up, so a typo in a flag fails fast.
    pub fn check_strategy(&self, name: &str) -> Result<(), String> {
        match self.router.strategy(name) {
            Ok(_) => Ok(()),
            Err(StrategyError::Unknown) => Err(format!("incorrect routing strategy {name}")),
        }
    }

    /// Serves one client request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = request_id(request.headers());
        let path = request.uri().path().to_owned();
        let http1 = request.version() < http::Version::HTTP_2;
        let client = self.settings.trusted_proxies.client(peer.ip(), request.headers());
        let conn = self.kernel.as_ref().and(request.extensions().get::<ClientConn>().cloned());
        let mut facts = RequestFacts { client: Some((client, peer)), ..RequestFacts::default() };
        let served = match InFlightSlot::take(&self.in_flight, self.settings.max_in_flight) {
            Some(slot) => self.serve(request, started, &request_id, &mut facts, client, slot).await,
            None => {
                // The body is not read, only drained (bounded) so a client
                // still sending it reads the 503 rather than a reset; an
                // HTTP/1 connection closes after the answer.
                discard_rest(request.into_body(), self.settings.body_read_timeout);
                let limit = self.settings.max_in_flight;
                Err(Failure::from(GatewayError::Overloaded { limit }))
            }
        };
        if let (Some(kernel), Some(ClientConn(conn))) = (&self.kernel, &conn) {
            // Before the answer is written: the kernel charges the request it
            // holds to the model tagged when the answer starts.
            kernel.tag(conn, client_model(http1, facts.model.as_deref()));
        }
        match served {
            Ok(mut response) => {
                // A proxied answer logs its own end when its body ends.
                if let Either::Left(_) = response.body() {
                    let status = response.status().as_u16();
                    forward::log_gateway_answer(&request_id, &facts, status, None, &path, started);
                    response.headers_mut().insert(names::REQUEST_ID, request_id);
                }
                response
            }
            Err(Failure { error, model }) => {
                let status = error.status();
                let model = model.or_else(|| facts.model.clone()).unwrap_or_else(|| Arc::from(UNKNOWN_MODEL));
                self.metrics.request_done(&model, status.as_u16());
                facts.model = Some(model);
                forward::log_gateway_answer(&request_id, &facts, status.as_u16(), Some(&error), &path, started);
                let mut response = errors::respond(&error).map(Either::Left);
                response.headers_mut().insert(names::REQUEST_ID, request_id);
                if status == StatusCode::TOO_MANY_REQUESTS
                    && let Some(kernel) = &self.kernel
                {
                    kernel.rate_limited(client);
                    // A penalised HTTP/1 client must reconnect, and so meets
                    // the refusal. Never a trusted proxy's shared connection.
                    if http1 && !client.behind_proxy && kernel.penalty_remaining(client).is_some() {
                        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                }
                response
            }
        }
    }

    async fn serve(
        &self,
        request: Request<Incoming>,
        started: Instant,
        request_id: &HeaderValue,
        facts: &mut RequestFacts,
        client: ClientAddr,
        slot: InFlightSlot,
    ) -> Result<Response<ProxyBody>, Failure> {
        // Phase 1: authenticate, then parse.
        self.limits.authorize(request.headers()).map_err(GatewayError::from)?;
        let path = request.uri().path();
        let Some(endpoint) = Endpoint::from_path(path) else {
            if path == "/v1/models" && request.method() == Method::GET {
                if !self.store.is_synced() {
                    return Err(GatewayError::PodsNotLoaded.into());
                }
                return Ok(models_response(&self.store).map(Either::Left));
            }
            return Err(GatewayError::UnknownPath { path: errors::echo(path) }.into());
        };
        if request.method() != Method::POST {
            return Err(GatewayError::MethodNotAllowed {
                method: errors::echo(request.method().as_str()),
                path: errors::echo(path),
            }
            .into());
        }
        let (mut parts, body) = request.into_parts();
        let write_watch = parts.extensions.remove::<Arc<write_watch::WriteWatch>>();
        let body = self.read_body(&parts.headers, body).await?;
        // A flooding client still reaching the proxy (on a connection opened
        // before its penalty, or through a trusted proxy) is answered 429 here;
        // its body was read, so a proxy's shared connection stays usable.
        if let Some(wait) = self.kernel.as_ref().and_then(|kernel| kernel.penalty_remaining(client)) {
            return Err(GatewayError::ClientPenalised { client: client.ip, wait }.into());
        }
        let auto_profile = header_str(&parts.headers, &names::CONFIG_PROFILE)
            .is_some_and(|p| p.trim().eq_ignore_ascii_case(profiles::AUTO_PROFILE));
        let prepared = self.offload.prepare(endpoint, body.clone(), auto_profile, self.router.prefix_hasher()).await?;
        let shape = prepared.shape;

        // Until discovery has delivered its first list, no model is unknown:
        // the answer is a retryable 503, not a final 400.
        if !self.store.is_synced() {
            return Err(GatewayError::PodsNotLoaded.into());
        }
        let snapshot = self.store.snapshot();
        let Some(model) = snapshot.model(&shape.model) else {
            return Err(GatewayError::UnknownModel { model: errors::echo(&shape.model) }.into());
        };
        let model_label: Arc<str> = Arc::clone(&model.name);
        facts.model = Some(Arc::clone(&model_label));
        let fail = |error: GatewayError| Failure { error, model: Some(Arc::clone(&model_label)) };

        // Phase 2: resolve profile and strategy.
        let config = model.config.as_deref();
        let profile =
            profiles::resolve_profile(config, header_str(&parts.headers, &names::CONFIG_PROFILE), || RequestFeatures {
                prompt_tokens: Some(
                    prepared.prompt_tokens.unwrap_or_else(|| crate::tokens::count_tokens(&request::prompt_text(&body))),
                ),
                max_tokens: shape.max_tokens,
            });
        let strategy_name = profiles::resolve_strategy(
            config,
            profile.profile,
            header_str(&parts.headers, &names::ROUTING_STRATEGY),
            &self.settings.default_strategy,
        );
        facts.profile = Some(profile.name.to_owned());
        facts.strategy = Some(errors::echo(strategy_name));
        let strategy = self.router.strategy(strategy_name).map_err(|err| {
            fail(match err {
                StrategyError::Unknown => GatewayError::UnknownStrategy { name: errors::echo(strategy_name) },
            })
        })?;
        let filter = external_filter(&parts.headers).map_err(fail)?;

        // Phase 3: limits: the user's RPM/TPM, then the model's RPS cap.
        let limit_request = LimitRequest {
            model: &model_label,
            profile: profile.name,
            rps_cap: profile.profile.and_then(Profile::rps_cap),
            user: header_str(&parts.headers, &names::USER),
        };
        let admission = self.limits.admit(&limit_request).await.map_err(|err| fail(err.into()))?;

        // Phase 4: pick a pod among the ready ones the external filter
        // leaves. A request that cannot be routed gives its quota back
        // before answering.
        let filtered: Vec<Arc<PodInfo>>;
        let candidates: &[Arc<PodInfo>] = match &filter {
            None => &model.ready,
            Some(selector) => {
                filtered = model.ready.iter().filter(|p| selector.matches(&p.labels)).cloned().collect();
                &filtered
            }
        };
        let mut route_request = RouteRequest::new(&model_label, &body)
            .with_headers(&parts.headers)
            .with_metrics(self.engine_metrics.view())
            .with_prompt_extractor(request::prompt_text);
        if let Some((prompt, hashes)) = prepared.prompt {
            route_request = route_request.with_prepared(prompt, hashes);
        }
        // A stream that does not ask for usage is sent asking for it, so its
        // tokens are counted; the client never sees the extra chunk.
        let usage_asked = request::ask_for_usage(endpoint, &shape, &body);
        let hide_usage_chunk = usage_asked.is_some();
        let forward_body = usage_asked.unwrap_or_else(|| body.clone());
        // `pd` chooses a prefill/decode pair and runs the prefill now; the
        // decode pod is then the only candidate, with its own body.
        let pd_route = match candidates {
            [_, ..] if strategy.name() == routing::pd::NAME => {
                let pd_request = pd::PdRequest {
                    endpoint,
                    parts: &parts,
                    body: &forward_body,
                    model: &model_label,
                    request_id,
                    started,
                };
                match self.route_pd(pd_request, &route_request, candidates).await {
                    Ok(route) => Some(route),
                    Err(error) => {
                        admission.release().await;
                        return Err(fail(error));
                    }
                }
            }
            _ => None,
        };
        let (candidates, body) = match &pd_route {
            Some(route) => (std::slice::from_ref(&route.pod), route.body.clone()),
            None => (candidates, forward_body),
        };
        let mut decision = match (&pd_route, candidates) {
            (Some(route), _) => route.decision(),
            (None, []) => RouteDecision::default(),
            (None, _) => self.router.route(strategy.as_ref(), &route_request, candidates),
        };
        let Some(mut pod) = candidates.get(decision.index).cloned() else {
            admission.release().await;
            return Err(fail(GatewayError::NoReadyPods { model: shape.model }));
        };
        // Counted in flight at once, so the next request's strategy sees it
        // (no window between choosing a pod and counting it, AIBrix #2422).
        let mut reserved = Some(pod.load.start());
        let user_quotas = admission.user_quotas();
        let token_charge = admission.commit();
        let routing_time = pd_route.as_ref().map_or_else(|| started.elapsed(), |route| route.routing_time);
        self.metrics.routed(&model_label, strategy.name(), routing_time.as_secs_f64());
        facts.routing_time = Some(routing_time);

        // Phase 5: forward; a pod that refuses the connection got nothing,
        // so the request moves to another ready pod.
        let mut tried: Vec<Arc<PodInfo>> = Vec::new();
        let (upstream_response, guards, connection) = loop {
            let guards = (reserved.take().unwrap_or_else(|| pod.load.start()), self.metrics.in_flight(&model_label));
            facts.pod = Some(Arc::clone(&pod));
            let connection =
                self.upstream.connection_slot(&pod).await.map_err(|err| fail(err.into_gateway_error(&pod)))?;
            match self.upstream.send(&parts, body.clone(), &pod, request_id, self.upstream_pool(&model_label)).await {
                Ok(response) => break (response, guards, connection),
                Err(SendError::Connect(reason)) if tried.len() + 1 < self.settings.max_connect_attempts => {
                    tracing::warn!(pod = %pod.key, reason, "connect to pod failed; trying another pod");
                    tried.push(Arc::clone(&pod));
                    let Some((next, next_decision)) =
                        self.next_candidate(candidates, &tried, strategy.as_ref(), &route_request)
                    else {
                        return Err(fail(SendError::Connect(reason).into_gateway_error(&pod)));
                    };
                    pod = next;
                    decision = next_decision;
                }
                Err(err) => return Err(fail(err.into_gateway_error(&pod))),
            }
        };

        // Phase 6: account while the answer streams back.
        let (mut response_parts, upstream_body) = upstream_response.into_parts();
        if let (Some(kernel), Some(UpstreamConn(conn))) =
            (&self.kernel, response_parts.extensions.remove::<UpstreamConn>())
        {
            kernel.tag(&conn, &model_label);
        }
        forward::clean_response_headers(&mut response_parts.headers);
        let status = response_parts.status.as_u16();
        self.metrics.request_done(&model_label, status);
        let headers = &mut response_parts.headers;
        headers.insert(names::TARGET_POD, header_value(&pod.name));
        headers.insert(names::TARGET_POD_IP, header_value(&pod.addr_text));
        // The name as resolved: a weighted mix is echoed as written.
        headers.insert(names::ROUTING_STRATEGY, header_value(strategy_name));
        for (name, value) in decision.headers {
            headers.insert(name, value);
        }
        headers.insert(names::REQUEST_ID, request_id.clone());
        user_quotas.insert_headers(headers);
        if profile.auto_selected {
            headers.insert(names::CHOSEN_PROFILE, header_value(profile.name));
        }
        let content_type = header_str(headers, &header::CONTENT_TYPE).map(str::to_owned);
        let content_encoding = header_str(headers, &header::CONTENT_ENCODING).map(str::to_owned);
        let record = RequestRecord {
            metrics: Arc::clone(&self.metrics),
            request_id: request_id.clone(),
            model: model_label,
            profile: profile.name.to_owned(),
            strategy: strategy.name(),
            pod,
            status,
            started,
            routing_time,
            guards,
            slots: (Some(connection), Some(slot)),
            token_charge,
            on_usage: decision.on_usage,
        };
        let body = TrackedBody::new(
            upstream_body,
            content_type.as_deref(),
            content_encoding.as_deref(),
            record,
            hide_usage_chunk,
        )
        .with_clock(write_watch.map(|watch| watch.register()));
        Ok(Response::from_parts(response_parts, Either::Right(body)))
    }

    /// Reads the whole request body, within the size limit and the time limit.
    async fn read_body(&self, headers: &http::HeaderMap, mut body: Incoming) -> Result<Bytes, GatewayError> {
        let limit = self.settings.max_body_bytes;
        let too_large = GatewayError::BodyTooLarge { limit_bytes: limit };
        let declared = header_str(headers, &header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            discard_rest(body, self.settings.body_read_timeout);
            return Err(too_large);
        }
        let collect = Limited::new(&mut body, limit).collect();
        match tokio::time::timeout(self.settings.body_read_timeout, collect).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
                discard_rest(body, self.settings.body_read_timeout);
                Err(too_large)
            }
            Ok(Err(err)) => Err(GatewayError::BodyRead { reason: err.to_string() }),
            Err(_) => Err(GatewayError::BodyTimeout { timeout_seconds: self.settings.body_read_timeout.as_secs() }),
        }
    }
}

/// Most bytes of a refused body read and dropped (see [`discard_rest`]).
const DISCARD_MAX_BYTES: usize = 64 << 20;

/// Reads and drops the rest of a body refused as too large, for at most
/// `within` and `DISCARD_MAX_BYTES`, while the 413 goes out (with
/// `Connection: close`). Closing with the body unread would reset the
/// connection, and a client still sending would see the reset instead of
/// the 413 (nginx's lingering close does the same).
fn discard_rest(mut body: Incoming, within: Duration) {
    tokio::spawn(async move {
        let drain = async {
            let mut left = DISCARD_MAX_BYTES;
            while let Some(Ok(frame)) = body.frame().await {
                let len = frame.data_ref().map_or(0, Bytes::len);
                let Some(rest) = left.checked_sub(len) else { break };
                left = rest;
            }
        };
        let _ = tokio::time::timeout(within, drain).await;
    });
}

impl Proxy {
    /// The upstream pool a model's requests go over: with kernel assist, one
    /// per pod and model, so each upstream socket carries one model.
    fn upstream_pool(&self, model: &str) -> Option<u32> {
        self.kernel.as_ref().map(|kernel| kernel.model_id(model))
    }

    /// The next pod to try after connection failures: the strategy's choice
    /// among the candidates not tried yet.
    fn next_candidate(
        &self,
        candidates: &[Arc<PodInfo>],
        tried: &[Arc<PodInfo>],
        strategy: &dyn Strategy,
        request: &RouteRequest<'_>,
    ) -> Option<(Arc<PodInfo>, RouteDecision)> {
        let rest: Vec<Arc<PodInfo>> =
            candidates.iter().filter(|p| !tried.iter().any(|t| t.key == p.key)).cloned().collect();
        if rest.is_empty() {
            return None;
        }
        let decision = self.router.route(strategy, request, &rest);
        Some((rest.get(decision.index).cloned()?, decision))
    }
}

/// Kernel counters of HTTP/2 client connections: one connection multiplexes
/// requests for several models, packet by packet, so its bytes are counted
/// under this name and never charged to a model they may not belong to.
pub const MULTIPLEXED_MODEL: &str = "(multiplexed)";

/// The model a client connection's traffic for one request is counted
/// under: the request's, `unknown` when the gateway answered before knowing
/// it, or [`MULTIPLEXED_MODEL`] on HTTP/2.
fn client_model(http1: bool, model: Option<&str>) -> &str {
    match model {
        _ if !http1 => MULTIPLEXED_MODEL,
        Some(model) => model,
        None => UNKNOWN_MODEL,
    }
}

/// The `external-filter` label selector, if the request has one.
fn external_filter(headers: &http::HeaderMap) -> Result<Option<LabelSelector>, GatewayError> {
    let Some(value) = headers.get(&routing::headers::EXTERNAL_FILTER) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| GatewayError::InvalidExternalFilter {
        filter: errors::echo(&String::from_utf8_lossy(value.as_bytes())),
        reason: "not visible ASCII".to_owned(),
    })?;
    LabelSelector::parse(text).map(Some).map_err(|reason| GatewayError::InvalidExternalFilter {
        filter: errors::echo(text),
        reason: errors::echo(&reason),
    })
}

fn header_str<'a>(headers: &'a http::HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The request id: the trace id of a W3C `traceparent` when the client sent
/// one (so gateway logs join the client's trace), else a fresh UUIDv4.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    let trace_id = header_str(headers, &names::TRACEPARENT).and_then(|tp| {
        let mut fields = tp.split('-');
        let (_version, trace, _span) = (fields.next()?, fields.next()?, fields.next()?);
        (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()) && trace.bytes().any(|b| b != b'0'))
            .then_some(trace)
    });
    match trace_id {
        Some(id) => header_value(id),
        None => {
            let mut buf = uuid::Uuid::encode_buffer();
            header_value(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf))
        }
    }
}

/// `GET /v1/models`: discovered models in the OpenAI list format.
pub fn models_response(store: &PodStore) -> Response<Full<Bytes>> {
    let snapshot = store.snapshot();
    let data: Vec<serde_json::Value> = snapshot
        .model_names()
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "aibrix"}))
        .collect();
    json_response(StatusCode::OK, &serde_json::json!({"object": "list", "data": data}))
}

/// A JSON response with the right content type.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
