//! The request path: one request, one phase after another, over one
//! per-request context ([`RequestContext`]):
//!
//! admit → authenticate → read the body → parse it (once) → resolve model,
//! profile and strategy → limits → route and forward (one connect-retry loop
//! for one pod or a prefill/decode pair, `forward.rs`) → answer, whose body
//! accounts for the request as it streams (`body/`).
//!
//! The engines are behind the [`Upstream`] trait, so the whole path runs in
//! process in tests against a fake engine.

pub mod access_log;
pub mod body;
pub mod client;
pub mod defaults;
pub mod engine_conn;
pub mod form;
mod forward;
pub mod listener;
mod lora;
pub mod memory;
pub mod offload;
pub mod pd;
pub mod request;
#[cfg(test)]
mod tests;
pub mod upstream;
pub mod upstream_conn;
pub mod usage;
pub mod wake;
pub mod write_watch;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use crate::discovery::{ModelPods, PodInfo, PodStore};
use crate::engine_metrics::EngineMetrics;
use crate::errors::{self, GatewayError};
use crate::kernel::KernelAssist;
use crate::kernel::penalties::ClientAddr;
use crate::kernel::tagging::{ClientConn, UpstreamConn};
use crate::limits::{LimitRequest, Limits};
use crate::metrics::{AibrixStatus, Metrics, UNKNOWN_MODEL};
use crate::profiles::{self, RequestFeatures};
use crate::routing::{self, LabelSelector, Router, Strategy};
use crate::traces::{self, AnswerTrace, Phase, RequestTrace, Traces};
use access_log::{AccessRecord, Ending};
use body::{AnswerShape, EndRecord, ResponseBody};
use forward::Forwarded;
use offload::Prepared;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use request::{BodyKind, Endpoint, ParsedRequest};
pub use upstream::{BoxError, HttpUpstream, Upstream};

/// The request header naming the model on a custom path (as AIBrix's model
/// router matches it).
const MODEL_HEADER: HeaderName = HeaderName::from_static("model");

/// Response body of the proxy listener: a gateway-made body, or an engine's
/// answer streaming through its layers.
pub type ProxyBody<B = Incoming> = Either<Full<Bytes>, ResponseBody<B>>;

/// One of a pod's connection slots, held until the answer's body ends.
pub type ConnectionSlot = tokio::sync::OwnedSemaphorePermit;

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
    /// Most connections (requests in flight) to one pod; a request past it
    /// waits for a slot, within `upstream_timeout`.
    pub max_connections_per_pod: usize,
    /// How long an engine has to answer (and a request to get a pod's slot).
    pub upstream_timeout: Duration,
    /// How long a `pd` prefill may take (`AIBRIX_PREFILL_REQUEST_TIMEOUT`).
    pub prefill_timeout: Duration,
    /// Wake a model whose every pod sleeps (`--wake-sleeping-models`).
    pub wake_sleeping_models: bool,
    /// TensorRT-LLM `pd`: this replica's machine id in `disagg_request_id`s.
    pub trt_machine_id: u16,
    /// Prompt tokens counted before routing (off the async workers for
    /// large bodies): `pd`'s buckets need every one, its `conductor` policy
    /// an estimate.
    pub count_prompt_tokens: offload::TokenCount,
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

/// Everything the proxy is built from.
pub struct ProxyParts<U> {
    pub store: Arc<PodStore>,
    pub router: Router,
    /// Engine metrics of every ready pod, read by metric-driven strategies.
    pub engine_metrics: Arc<EngineMetrics>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<Limits>,
    pub upstream: U,
    /// Kernel assist: socket tagging, and penalties for clients that keep
    /// sending after 429 (userspace only when the eBPF programs do not load).
    pub kernel: Arc<KernelAssist>,
    /// Request tracing, when an OTLP collector is configured.
    pub traces: Option<Traces>,
    pub settings: ProxySettings,
}

/// The proxy: shared state for every request.
pub struct Proxy<U = HttpUpstream> {
    store: Arc<PodStore>,
    router: Router,
    engine_metrics: Arc<EngineMetrics>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    upstream: U,
    kernel: Arc<KernelAssist>,
    traces: Option<Traces>,
    settings: ProxySettings,
    /// Where large bodies are parsed, tokenized and hashed.
    offload: offload::Offload,
    /// Wakes models whose every pod sleeps.
    waker: wake::Waker,
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
    /// The same id under the name OpenAI's SDKs read (`_request_id`).
    pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const CHOSEN_PROFILE: HeaderName = HeaderName::from_static("x-aibrix-config-profile");
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub const USER: HeaderName = HeaderName::from_static("user");
}

/// What the proxy knows about one request, filled in phase by phase.
pub struct RequestContext {
    /// The request's access-log record (id, client, model, profile, strategy, pod...).
    pub access: AccessRecord,
    http1: bool,
    /// The client connection's kernel tag.
    conn: Option<ClientConn>,
    /// Arrival to the first route, until the request is counted as routed.
    first_route: Option<Duration>,
    /// The request's spans (tracing on); taken by its answer's body.
    trace: Option<RequestTrace>,
}

impl RequestContext {
    /// A phase of the request as a child span (nothing when not traced).
    fn phase(&self, name: &'static str, kind: SpanKind) -> Phase {
        match &self.trace {
            Some(trace) => trace.phase(name, kind),
            None => Phase::none(),
        }
    }

    /// The request's span when it is recorded, to set attributes on (built
    /// only then).
    fn recording(&mut self) -> Option<&mut RequestTrace> {
        self.trace.as_mut().filter(|trace| trace.is_recording())
    }

    /// Ends the request's span (a gateway-made answer).
    fn end_trace(&mut self, status: StatusCode) {
        if let Some(trace) = &mut self.trace {
            let error = (status.is_client_error() || status.is_server_error()).then(|| status.as_str());
            trace.end(status.as_u16(), error, status.is_server_error());
        }
    }

    /// The request goes to the pod that answers it: its routing time is
    /// logged and counted, once.
    fn routed(&mut self, metrics: &Metrics, send: &forward::Outbound<'_>) {
        if self.access.routing_time.is_some() {
            return;
        }
        let routing_time = self.first_route.unwrap_or_else(|| self.access.started.elapsed());
        self.access.routing_time = Some(routing_time);
        metrics.routed(send.model, send.strategy, routing_time.as_secs_f64());
    }
}

/// What a request resolved to: its model's pods, profile and strategy.
struct Resolved {
    model: Arc<ModelPods>,
    model_name: Arc<str>,
    profile: String,
    /// Chosen by `config-profile: auto` (echoed in `x-aibrix-config-profile`).
    auto_profile: bool,
    rps_cap: Option<u64>,
    strategy: Arc<dyn Strategy>,
    /// The strategy as resolved: a weighted mix is echoed as written.
    strategy_header: HeaderValue,
    filter: Option<LabelSelector>,
}

impl Resolved {
    /// The ready pods the external filter leaves.
    fn candidates(&self) -> Cow<'_, [Arc<PodInfo>]> {
        match &self.filter {
            None => Cow::Borrowed(&self.model.ready),
            Some(selector) => {
                Cow::Owned(self.model.ready.iter().filter(|p| selector.matches(&p.labels)).cloned().collect())
            }
        }
    }
}

/// What a request asks the gateway for.
enum Target {
    Api(Endpoint),
    Models,
    /// `GET /v1/models/{id}`.
    Model(String),
}

impl<U: Upstream> Proxy<U> {
    pub fn new(parts: ProxyParts<U>) -> Self {
        let ProxyParts { store, router, engine_metrics, metrics, limits, upstream, kernel, traces, settings } = parts;
        let waker = wake::Waker::new(settings.wake_sleeping_models, Arc::clone(&metrics));
        Self {
            waker,
            store,
            router,
            engine_metrics,
            metrics,
            limits,
            upstream,
            kernel,
            traces,
            settings,
            offload: offload::Offload::default(),
            in_flight: Arc::default(),
        }
    }

    /// The count of requests in flight (for the memory trimmer).
    pub fn in_flight_counter(&self) -> Arc<InFlightCount> {
        Arc::clone(&self.in_flight)
    }

    /// Validates a strategy name at start-up, so a typo in a flag fails fast.
    pub fn check_strategy(&self, name: &str) -> Result<(), String> {
        self.router.strategy(name).map(drop).map_err(|_| format!("incorrect routing strategy {name}"))
    }

    /// Serves one client request.
    pub async fn handle<RB>(self: Arc<Self>, request: Request<RB>, peer: SocketAddr) -> Response<ProxyBody<U::Body>>
    where
        RB: Body<Data = Bytes> + Send + Unpin + 'static,
        RB::Error: Into<BoxError>,
    {
        let mut ctx = self.context(&request, peer);
        let served = match InFlightSlot::take(&self.in_flight, self.settings.max_in_flight) {
            Some(slot) => self.serve(request, &mut ctx, slot).await,
            None => {
                // The body is not read, only drained (bounded) so a client
                // still sending it reads the 503 rather than a reset.
                discard_rest(request.into_body(), self.settings.body_read_timeout);
                Err(GatewayError::Overloaded { limit: self.settings.max_in_flight })
            }
        };
        if let Some(ClientConn(conn)) = &ctx.conn {
            // Before the answer is written: the kernel charges the request it
            // holds to the model tagged when the answer starts.
            self.kernel.tag(conn, client_model(ctx.http1, ctx.access.model.as_deref()));
        }
        match served {
            Ok(response) => answered::<U>(response, &mut ctx),
            Err(error) => self.failed(&error, &mut ctx),
        }
    }

    fn context<RB>(&self, request: &Request<RB>, peer: SocketAddr) -> RequestContext {
        let client = self.settings.trusted_proxies.client(peer.ip(), request.headers());
        let path = request.uri().path();
        let mut trace = self
            .traces
            .as_ref()
            .map(|traces| traces.request(request.headers(), request.method(), span_name(request.method(), path)));
        // Traced, the request id is the trace id (the client's, or a new
        // one), so the access log joins the trace.
        let id = match &trace {
            Some(trace) => trace.trace_id(),
            None => request_id(request.headers()),
        };
        let access = AccessRecord::new(id, path, client, peer);
        if let Some(trace) = trace.as_mut().filter(|trace| trace.is_recording()) {
            trace.set(KeyValue::new(traces::attr::URL_PATH, errors::echo(path)));
            trace.set(KeyValue::new(traces::attr::CLIENT_ADDRESS, client.ip.to_string()));
        }
        let http1 = request.version() < http::Version::HTTP_2;
        let conn = request.extensions().get::<ClientConn>().cloned();
        RequestContext { access, http1, conn, first_route: None, trace }
    }

    /// The phases of a request that gets past the in-flight limit.
    async fn serve<RB>(
        &self,
        request: Request<RB>,
        ctx: &mut RequestContext,
        slot: InFlightSlot,
    ) -> Result<Response<ProxyBody<U::Body>>, GatewayError>
    where
        RB: Body<Data = Bytes> + Send + Unpin + 'static,
        RB::Error: Into<BoxError>,
    {
        self.limits.authorize(request.headers())?;
        let endpoint = match self.target(&request)? {
            Target::Api(endpoint) => endpoint,
            Target::Models => return Ok(models_response(&self.store).map(Either::Left)),
            Target::Model(id) => return model_response(&self.store, &id).map(|r| r.map(Either::Left)),
        };
        let (mut parts, body) = request.into_parts();
        let write_watch = parts.extensions.remove::<Arc<write_watch::WriteWatch>>();
        let phase = ctx.phase("read body", SpanKind::Internal);
        let prepared = self.read_request(endpoint, &parts.headers, body, ctx).await;
        let prepared = close(phase, prepared, |phase, prepared| {
            // An upload streams on to the pod: its size is not known here.
            if prepared.upload.is_none() {
                let size = i64::try_from(prepared.request.body.len()).unwrap_or(i64::MAX);
                phase.set(KeyValue::new(traces::attr::BODY_SIZE, size));
            }
        })?;
        let phase = ctx.phase("resolve", SpanKind::Internal);
        let resolved = self.resolve(&parts.headers, &prepared, ctx);
        let resolved = close(phase, resolved, |_, _| {})?;
        if let Some(trace) = ctx.recording() {
            trace_resolved(trace, &prepared, &resolved);
        }
        if endpoint == Endpoint::Custom && !resolved.model.serves_custom_path(parts.uri.path()) {
            // Another model's custom path: this model has no such route.
            return Err(GatewayError::UnknownPath { path: errors::echo(parts.uri.path()) });
        }
        let limit_request = LimitRequest {
            model: &resolved.model_name,
            profile: &resolved.profile,
            rps_cap: resolved.rps_cap,
            user: header_str(&parts.headers, &names::USER),
            stream_usage: usage::stream_usage(&prepared.request),
        };
        let phase = ctx.phase("limit", SpanKind::Internal);
        let admission = self.limits.admit(&limit_request).await.map_err(GatewayError::from);
        let admission = close(phase, admission, |phase, admission| {
            phase.set(KeyValue::new(traces::attr::LIMIT_STORE, admission.store()));
        })?;
        let forwarded = self.forward(&parts, &prepared, &resolved, admission, ctx).await?;
        let clock = write_watch.map(|watch| watch.register());
        let mut response = self.respond(forwarded, &resolved, ctx, slot, clock);
        if let Either::Right(body) = response.body_mut() {
            // A stream the engine has already sent leaves with the head, in one write.
            body::gather(body).await;
        }
        Ok(response)
    }

    /// What the request asks for: an inference endpoint (POST only), a path
    /// a model lists as its own (any method), or the model list.
    fn target<RB>(&self, request: &Request<RB>) -> Result<Target, GatewayError> {
        let path = request.uri().path();
        let Some(endpoint) = Endpoint::from_path(path) else {
            if path == "/v1/models" && request.method() == Method::GET {
                return if self.store.is_synced() { Ok(Target::Models) } else { Err(GatewayError::PodsNotLoaded) };
            }
            // A model's own path is unknown until discovery has loaded the
            // pods: retryable, as for every path then.
            if !self.store.is_synced() {
                return Err(GatewayError::PodsNotLoaded);
            }
            if self.store.snapshot().is_custom_path(path) {
                return Ok(Target::Api(Endpoint::Custom));
            }
            if let Some(id) = model_id(path)
                && request.method() == Method::GET
            {
                return Ok(Target::Model(id));
            }
            return Err(GatewayError::UnknownPath { path: errors::echo(path) });
        };
        if request.method() != Method::POST {
            let method = errors::echo(request.method().as_str());
            return Err(GatewayError::MethodNotAllowed { method, path: errors::echo(path) });
        }
        Ok(Target::Api(endpoint))
    }

    /// A flooding client still reaching the proxy (on a connection opened
    /// before its penalty, or through a trusted proxy) is answered 429 here;
    /// its body was read, so a proxy's shared connection stays usable.
    fn refuse_penalised(&self, client: ClientAddr) -> Result<(), GatewayError> {
        match self.kernel.penalty_remaining(client) {
            Some(wait) => Err(GatewayError::ClientPenalised { client: client.ip, wait }),
            None => Ok(()),
        }
    }

    /// Reads the body as the endpoint takes it: a JSON body whole and parsed
    /// once, an upload's form fields (the rest streams to the pod later), a
    /// custom path's body whole, as it is.
    async fn read_request<RB>(
        &self,
        endpoint: Endpoint,
        headers: &http::HeaderMap,
        body: RB,
        ctx: &RequestContext,
    ) -> Result<Prepared, GatewayError>
    where
        RB: Body<Data = Bytes> + Send + Unpin + 'static,
        RB::Error: Into<BoxError>,
    {
        match endpoint.body_kind() {
            BodyKind::Json => {
                let body = self.read_body(headers, body).await?;
                self.refuse_penalised(ctx.access.client)?;
                self.parse(endpoint, headers, body).await
            }
            BodyKind::Form => {
                let body = body.map_err(Into::into).boxed_unsync();
                let limit = self.settings.max_body_bytes;
                let head = form::read_head(headers, body, limit, self.settings.body_read_timeout).await?;
                self.refuse_penalised(ctx.access.client)?;
                let request = ParsedRequest::opaque(endpoint, Bytes::new(), head.model, head.stream);
                Ok(Prepared { upload: Some(head.upload), ..Prepared::plain(request) })
            }
            BodyKind::Opaque => {
                let body = self.read_body(headers, body).await?;
                self.refuse_penalised(ctx.access.client)?;
                ParsedRequest::custom(body, header_str(headers, &MODEL_HEADER)).map(Prepared::plain)
            }
        }
    }

    /// Parses the body once (large bodies off the async workers).
    async fn parse(
        &self,
        endpoint: Endpoint,
        headers: &http::HeaderMap,
        body: Bytes,
    ) -> Result<Prepared, GatewayError> {
        let auto_profile = header_str(headers, &names::CONFIG_PROFILE)
            .is_some_and(|p| p.trim().eq_ignore_ascii_case(profiles::AUTO_PROFILE));
        let for_profile = if auto_profile { offload::TokenCount::Estimate } else { offload::TokenCount::Skip };
        let count_tokens = self.settings.count_prompt_tokens.max(for_profile);
        self.offload.prepare(endpoint, body, count_tokens, self.router.prefix_hasher()).await
    }

    /// The model's pods, the profile and the strategy.
    fn resolve(
        &self,
        headers: &http::HeaderMap,
        prepared: &Prepared,
        ctx: &mut RequestContext,
    ) -> Result<Resolved, GatewayError> {
        // Until discovery has delivered its first list, no model is unknown:
        // the answer is a retryable 503, not a final 400.
        if !self.store.is_synced() {
            return Err(GatewayError::PodsNotLoaded);
        }
        let request = &prepared.request;
        let snapshot = self.store.snapshot();
        let Some(model) = snapshot.model(&request.model).cloned() else {
            return Err(GatewayError::UnknownModel { model: errors::echo(&request.model) });
        };
        ctx.access.model = Some(Arc::clone(&model.name));
        let config = model.config.as_deref();
        let profile = profiles::resolve_profile(config, header_str(headers, &names::CONFIG_PROFILE), || {
            RequestFeatures { prompt_tokens: Some(prepared.prompt_tokens()), max_tokens: request.max_tokens }
        });
        let strategy_name = profiles::resolve_strategy(
            config,
            profile.profile,
            header_str(headers, &names::ROUTING_STRATEGY),
            &self.settings.default_strategy,
        );
        ctx.access.profile = Some(profile.name.to_owned());
        ctx.access.strategy = Some(Cow::Owned(errors::echo(strategy_name)));
        let strategy = self
            .router
            .strategy(strategy_name)
            .map_err(|_| GatewayError::UnknownStrategy { name: errors::echo(strategy_name) })?;
        ctx.access.strategy = Some(Cow::Borrowed(strategy.name()));
        Ok(Resolved {
            model_name: Arc::clone(&model.name),
            profile: profile.name.to_owned(),
            auto_profile: profile.auto_selected,
            rps_cap: profile.profile.and_then(profiles::Profile::rps_cap),
            strategy,
            strategy_header: header_value(strategy_name),
            filter: external_filter(headers)?,
            model,
        })
    }

    /// The engine's answer, with the gateway's headers, its body layered to
    /// account for the request as it streams.
    fn respond(
        &self,
        forwarded: Forwarded<U::Body>,
        resolved: &Resolved,
        ctx: &mut RequestContext,
        slot: InFlightSlot,
        clock: Option<Arc<write_watch::BodyClock>>,
    ) -> Response<ProxyBody<U::Body>> {
        let Forwarded {
            response,
            pod,
            headers: route_headers,
            on_usage,
            mut held,
            charge,
            quotas,
            hide_usage_chunk,
            trace: upstream_phase,
        } = forwarded;
        let (mut parts, upstream_body) = response.into_parts();
        if let Some(UpstreamConn(conn)) = parts.extensions.remove::<UpstreamConn>() {
            self.kernel.tag(&conn, &resolved.model_name);
        }
        upstream::clean_response_headers(&mut parts.headers);
        let status = parts.status.as_u16();
        self.metrics.request_done(&resolved.model_name, Some(&pod), status);
        let headers = &mut parts.headers;
        headers.insert(names::TARGET_POD, header_value(&pod.name));
        headers.insert(names::TARGET_POD_IP, header_value(&pod.addr_text));
        headers.insert(names::ROUTING_STRATEGY, resolved.strategy_header.clone());
        for (name, value) in route_headers {
            headers.insert(name, value);
        }
        stamp_request_id(headers, ctx);
        quotas.insert_headers(headers);
        if resolved.auto_profile {
            headers.insert(names::CHOSEN_PROFILE, header_value(&resolved.profile));
        }
        let encoded = usage::is_encoded(header_str(headers, &header::CONTENT_ENCODING));
        let shaped_error = body::error_shape::shapes(parts.status, header_str(headers, &header::CONTENT_TYPE), encoded)
            .then_some(parts.status);
        if shaped_error.is_some() {
            // Shaped by the body layer: its length changes, its type is JSON.
            headers.remove(header::CONTENT_LENGTH);
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let shape = AnswerShape {
            shaped_error,
            content_type: header_str(headers, &header::CONTENT_TYPE),
            content_encoding: header_str(headers, &header::CONTENT_ENCODING),
            hide_usage_chunk,
        };
        held.gateway = Some(slot);
        if let Some(trace) = ctx.recording() {
            trace.set(KeyValue::new(traces::attr::POD, pod.name.to_string()));
        }
        // An unsampled request has nothing to record when its answer ends.
        let trace = ctx
            .trace
            .take()
            .filter(RequestTrace::is_recording)
            .map(|request| Box::new(AnswerTrace { request, upstream: upstream_phase }));
        let mut access = ctx.access.clone();
        access.pod = Some(pod);
        let record = EndRecord { metrics: Arc::clone(&self.metrics), access, status, held, on_usage, trace };
        let charge = charge.map(|charge| Box::new(charge) as Box<dyn body::Charge>);
        let mut body = body::response_body(upstream_body, &shape, charge, record, clock);
        if U::BODY_DRIVES_CONNECTION {
            body::read_inline(&mut body);
        }
        Response::from_parts(parts, Either::Right(body))
    }

    /// The answer to a request that failed: counted, logged, and (for 429s)
    /// reported to kernel assist.
    fn failed(&self, error: &GatewayError, ctx: &mut RequestContext) -> Response<ProxyBody<U::Body>> {
        let status = error.status();
        if let Some(trace) = ctx.trace.as_mut().filter(|trace| trace.is_recording()) {
            if let Some(pod) = &ctx.access.pod {
                trace.set(KeyValue::new(traces::attr::POD, pod.name.to_string()));
            }
            if status.is_server_error() {
                // The span's status says why, as the client's message does.
                trace.set(KeyValue::new("exception.message", error.to_string()));
            }
        }
        ctx.end_trace(status);
        let model = ctx.access.model_label();
        self.metrics.request_done(&model, ctx.access.pod.as_ref(), status.as_u16());
        if let Some(aibrix) = self.metrics.aibrix() {
            aibrix.outcome(&model, ctx.access.pod.as_ref(), aibrix_status(error), status.as_u16());
        }
        ctx.access.write(&Ending { status: status.as_u16(), error: Some(error), ..Ending::default() });
        let mut response = errors::respond(error).map(Either::Left);
        stamp_request_id(response.headers_mut(), ctx);
        if status == StatusCode::TOO_MANY_REQUESTS {
            let client = ctx.access.client;
            self.kernel.rate_limited(client);
            // A penalised HTTP/1 client must reconnect, and so meets the
            // refusal. Never a trusted proxy's shared connection.
            if ctx.http1 && !client.behind_proxy && self.kernel.penalty_remaining(client).is_some() {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        response
    }

    /// Reads the whole request body, within the size limit and the time limit.
    async fn read_body<RB>(&self, headers: &http::HeaderMap, mut body: RB) -> Result<Bytes, GatewayError>
    where
        RB: Body<Data = Bytes> + Send + Unpin + 'static,
        RB::Error: Into<BoxError>,
    {
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

/// A request the gateway answered itself with success (`GET /v1/models`)
/// logs its end here; a proxied answer logs its own when its body ends.
fn answered<B: Upstream>(
    mut response: Response<ProxyBody<B::Body>>,
    ctx: &mut RequestContext,
) -> Response<ProxyBody<B::Body>> {
    if let Either::Left(_) = response.body() {
        ctx.end_trace(response.status());
        ctx.access.write(&Ending { status: response.status().as_u16(), ..Ending::default() });
        stamp_request_id(response.headers_mut(), ctx);
    }
    response
}

/// The request's id on its answer, as `request-id` (AIBrix's name) and
/// `x-request-id` (OpenAI's, which its SDKs show), replacing an engine's own.
fn stamp_request_id(headers: &mut http::HeaderMap, ctx: &RequestContext) {
    headers.insert(names::REQUEST_ID, ctx.access.request_id.clone());
    headers.insert(names::X_REQUEST_ID, ctx.access.request_id.clone());
}

/// Ends a phase's span with its outcome: `traced` records what a success
/// says about it, a failure marks it failed.
fn close<T>(
    mut phase: Phase,
    result: Result<T, GatewayError>,
    traced: impl FnOnce(&mut Phase, &T),
) -> Result<T, GatewayError> {
    if phase.is_recording() {
        match &result {
            Ok(value) => traced(&mut phase, value),
            Err(error) if error.status().is_server_error() => {
                phase.fail(error.status().as_str().to_owned(), error.to_string());
            }
            // A refusal (a 429 from `limit`, a 400 from `resolve`) is the
            // phase doing its job: noted, not a failure.
            Err(error) => phase.set(KeyValue::new(traces::attr::ERROR_TYPE, error.status().as_str().to_owned())),
        }
    }
    phase.end();
    result
}

/// The request span's name: `{method} {route}` for the gateway's own
/// routes, the method alone for any other path (the client's text), `HTTP`
/// for a method outside HTTP's own (OpenTelemetry's HTTP conventions). Never
/// allocated, whether the request is sampled or not.
fn span_name(method: &Method, path: &str) -> &'static str {
    match (Endpoint::from_path(path), path) {
        (Some(endpoint), _) if method == Method::POST => endpoint.span_name(),
        (None, "/v1/models") if method == Method::GET => "GET /v1/models",
        _ => traces::method_name(method).unwrap_or("HTTP"),
    }
}

/// What resolution decided, on the request's span.
fn trace_resolved(trace: &mut RequestTrace, prepared: &Prepared, resolved: &Resolved) {
    use traces::attr;
    let request = &prepared.request;
    trace.set(KeyValue::new(attr::GEN_AI_MODEL, resolved.model_name.to_string()));
    if let Some(operation) = request.endpoint.gen_ai_operation() {
        trace.set(KeyValue::new(attr::GEN_AI_OPERATION, operation));
    }
    if let Some(max_tokens) = request.max_tokens {
        trace.set(KeyValue::new(attr::GEN_AI_MAX_TOKENS, max_tokens));
    }
    trace.set(KeyValue::new(attr::PROFILE, resolved.profile.clone()));
    trace.set(KeyValue::new(attr::STRATEGY, resolved.strategy.name()));
}

/// Most bytes of a refused body read and dropped (see [`discard_rest`]).
const DISCARD_MAX_BYTES: usize = 64 << 20;

/// Reads and drops the rest of a refused body, for at most `within` and
/// `DISCARD_MAX_BYTES`, while the error goes out (with `Connection:
/// close`). Closing with the body unread would reset the connection, and a
/// client still sending would see the reset instead of the answer (nginx's
/// lingering close does the same).
fn discard_rest<RB>(mut body: RB, within: Duration)
where
    RB: Body<Data = Bytes> + Send + Unpin + 'static,
{
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

/// `GET /v1/models`: discovered models in the OpenAI list format, LoRA
/// adapters with their base model as `parent` (as vLLM lists them).
pub fn models_response(store: &PodStore) -> Response<Full<Bytes>> {
    let snapshot = store.snapshot();
    let data: Vec<serde_json::Value> =
        snapshot.model_names().into_iter().filter_map(|id| Some(model_object(snapshot.model(id)?))).collect();
    json_response(StatusCode::OK, &serde_json::json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: one model as `/v1/models` lists it, or OpenAI's 404.
pub fn model_response(store: &PodStore, id: &str) -> Result<Response<Full<Bytes>>, GatewayError> {
    match store.snapshot().model(id) {
        Some(model) => Ok(json_response(StatusCode::OK, &model_object(model))),
        None => Err(GatewayError::ModelNotFound { model: errors::echo(id) }),
    }
}

fn model_object(model: &crate::discovery::ModelPods) -> serde_json::Value {
    serde_json::json!({
        "id": &*model.name,
        "object": "model",
        "created": 0,
        "owned_by": "aibrix",
        "root": &*model.name,
        "parent": model.parent.as_deref(),
    })
}

/// The model id of a `/v1/models/{id}` path, percent-decoded (an id may
/// hold slashes, as in `org/model`).
pub fn model_id(path: &str) -> Option<String> {
    let raw = path.strip_prefix("/v1/models/").filter(|id| !id.is_empty())?;
    Some(percent_encoding::percent_decode_str(raw).decode_utf8_lossy().into_owned())
}

/// A JSON response with the right content type.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// AIBrix's `status` for an answer the gateway made itself: which phase of
/// AIBrix's request handling would have refused it.
fn aibrix_status(error: &GatewayError) -> AibrixStatus {
    use GatewayError as E;
    match error {
        E::UriTooLong { .. }
        | E::UnknownPath { .. }
        | E::MethodNotAllowed { .. }
        | E::Unauthorized
        | E::Overloaded { .. }
        | E::ClientPenalised { .. }
        | E::UserRpmExceeded { .. }
        | E::UserTpmExceeded { .. }
        | E::LimitStoreUnavailable
        | E::UserRecordFailed { .. }
        | E::UserCounterFailed { .. }
        | E::InvalidExternalFilter { .. } => AibrixStatus::RequestHeadersFail,
        E::BodyNotJson
        | E::ModelMissing
        | E::NoMessages
        | E::InvalidField { .. }
        | E::NotMultipart
        | E::Multipart { .. }
        | E::FormModelTooLate { .. }
        | E::BodyTooLarge { .. }
        | E::BodyRead { .. }
        | E::BodyTimeout { .. }
        | E::UnknownModel { .. }
        | E::ModelNotFound { .. }
        | E::PodsNotLoaded
        | E::NoReadyPods { .. }
        | E::UnknownStrategy { .. }
        | E::ModelRpsExceeded { .. }
        | E::StreamUsageRequired
        | E::NoPdRoleset { .. }
        | E::ModelSleeping { .. }
        | E::RoutingFailed { .. } => AibrixStatus::RequestBodyFail,
        E::UpstreamFailed { .. } | E::UpstreamTimeout { .. } | E::PrefillFailed { .. } => {
            AibrixStatus::ResponseHeadersFail
        }
        E::ShuttingDown => AibrixStatus::ServerShutdown,
    }
}
