//! Request tracing with OpenTelemetry: one server span per request, its
//! phases (body read, resolution, limit check, pod choice, prefill, the
//! engine exchange) as child spans, exported over OTLP (gRPC or
//! HTTP/protobuf) to the collector the standard `OTEL_EXPORTER_OTLP_*`
//! variables or `--otlp-endpoint` name. Off when none is set: the request
//! path then holds no trace at all.
//!
//! The engine gets a W3C `traceparent` whose parent is the gateway's span
//! for that exchange, so vLLM's own spans join the trace. A client's
//! `traceparent` is the parent of the gateway's span, and its sampling
//! decision is kept (parent-based sampling with a ratio for new traces).
//!
//! Spans never wait for the collector: a finished span goes into a bounded
//! queue or is dropped and counted (see [`export`]).

mod config;
mod export;
mod propagation;

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
#[cfg(test)]
use opentelemetry_sdk::trace::SpanData;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};

pub use config::{OtlpProtocol, QueueConfig, TraceConfig};

use crate::metrics::TraceMetrics;

/// Attribute names: OpenTelemetry's semantic conventions (HTTP, GenAI)
/// where they apply, `turnstile.*` for the gateway's own.
pub mod attr {
    pub const HTTP_METHOD: &str = "http.request.method";
    pub const HTTP_STATUS: &str = "http.response.status_code";
    pub const URL_PATH: &str = "url.path";
    pub const CLIENT_ADDRESS: &str = "client.address";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const ERROR_TYPE: &str = "error.type";
    pub const BODY_SIZE: &str = "http.request.body.size";
    pub const GEN_AI_OPERATION: &str = "gen_ai.operation.name";
    pub const GEN_AI_MODEL: &str = "gen_ai.request.model";
    pub const GEN_AI_MAX_TOKENS: &str = "gen_ai.request.max_tokens";
    pub const GEN_AI_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    pub const GEN_AI_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
    pub const POD: &str = "turnstile.pod";
    pub const STRATEGY: &str = "turnstile.strategy";
    pub const PROFILE: &str = "turnstile.profile";
    pub const LIMIT_STORE: &str = "turnstile.limit.store";
    pub const OUTCOME: &str = "turnstile.outcome";
}

/// The gateway's tracer, shared by every request. Cloning is cheap.
#[derive(Clone)]
pub struct Traces {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    /// `None` in tests, whose spans are kept in memory.
    exporter: Option<export::ExportHandle>,
}

impl Traces {
    /// Starts exporting as `config` says (inside the tokio runtime); `None`
    /// when tracing is off.
    pub fn start(config: &TraceConfig, metrics: TraceMetrics) -> anyhow::Result<Option<Self>> {
        let Some(endpoint) = config.endpoint.as_deref() else { return Ok(None) };
        let resource = resource(config.service_name.as_deref());
        let (processor, exporter) = export::start(config, endpoint, &resource, metrics)?;
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_resource(resource)
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("turnstile");
        Ok(Some(Self { tracer, provider, exporter: Some(exporter) }))
    }

    /// Traces whose finished spans are kept in `spans` (tests).
    #[cfg(test)]
    pub fn in_memory(sampling_ratio: f64) -> (Self, std::sync::Arc<std::sync::Mutex<Vec<SpanData>>>) {
        #[derive(Debug)]
        struct Keep(std::sync::Arc<std::sync::Mutex<Vec<SpanData>>>);
        impl opentelemetry_sdk::trace::SpanProcessor for Keep {
            fn on_start(&self, _: &mut Span, _: &Context) {}
            fn on_end(&self, span: SpanData) {
                self.0.lock().map(|mut spans| spans.push(span)).unwrap_or(());
            }
            fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
                Ok(())
            }
            fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
                Ok(())
            }
        }
        let spans = std::sync::Arc::default();
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(sampling_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_span_processor(Keep(std::sync::Arc::clone(&spans)))
            .build();
        let tracer = provider.tracer("turnstile");
        (Self { tracer, provider, exporter: None }, spans)
    }

    /// The trace of one request: its server span, a child of the client's
    /// `traceparent` when it sent a valid one.
    pub fn request(&self, headers: &http::HeaderMap, method: &http::Method, name: &'static str) -> RequestTrace {
        let parent = propagation::extract(headers);
        let method = method_name(method).unwrap_or("_OTHER");
        let builder = self.tracer.span_builder(name).with_kind(SpanKind::Server);
        let mut root = self.tracer.build_with_context(builder, &parent);
        // Set once sampled: an unsampled request builds no attribute.
        if root.is_recording() {
            root.set_attribute(KeyValue::new(attr::HTTP_METHOD, method));
        }
        RequestTrace { tracer: self.tracer.clone(), root, ended: false }
    }

    /// Sends what is queued, within `within`, and stops exporting.
    pub async fn shutdown(&self, within: Duration) {
        if let Some(exporter) = &self.exporter {
            exporter.flush(within).await;
        }
        let _ = self.provider.shutdown_with_timeout(within);
    }
}

/// An HTTP method's name when it is one of HTTP's own: a client's made-up
/// method never names a span or fills an attribute.
pub fn method_name(method: &http::Method) -> Option<&'static str> {
    use http::Method;
    Some(match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return None,
    })
}

/// The trace of one request: the gateway's server span, from the request's
/// arrival to the end of its answer.
pub struct RequestTrace {
    tracer: SdkTracer,
    root: Span,
    ended: bool,
}

impl RequestTrace {
    /// The trace id as the request id (32 lowercase hex digits): what the
    /// access log and the answer's `request-id` carry, so logs join traces.
    pub fn trace_id(&self) -> HeaderValue {
        let id = self.root.span_context().trace_id().to_string();
        HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// Whether this request's spans are sampled (recorded and exported).
    pub fn is_recording(&self) -> bool {
        self.root.is_recording()
    }

    /// Sets an attribute of the request's span.
    pub fn set(&mut self, attribute: KeyValue) {
        if self.root.is_recording() {
            self.root.set_attribute(attribute);
        }
    }

    /// A phase of the request, as a child span ended when the phase is
    /// (dropped or [`Phase::end`]). Nothing when the request is not sampled.
    pub fn phase(&self, name: &'static str, kind: SpanKind) -> Phase {
        if !self.root.is_recording() {
            return Phase { span: None, parent: self.root.span_context().clone() };
        }
        let parent = Context::new().with_remote_span_context(self.root.span_context().clone());
        let builder = self.tracer.span_builder(name).with_kind(kind);
        let span = self.tracer.build_with_context(builder, &parent);
        Phase { parent: span.span_context().clone(), span: Some(span) }
    }

    /// Ends the request's span with the answer's status. `error_type` is
    /// recorded as `error.type`; `failed` (a 5xx, an engine that broke off)
    /// makes the span an error, as HTTP server spans count them (a client
    /// that left, or a 4xx, is not the server's failure).
    pub fn end(&mut self, status: u16, error_type: Option<&str>, failed: bool) {
        if std::mem::replace(&mut self.ended, true) || !self.root.is_recording() {
            return;
        }
        self.root.set_attribute(KeyValue::new(attr::HTTP_STATUS, i64::from(status)));
        if let Some(error) = error_type {
            self.root.set_attribute(KeyValue::new(attr::ERROR_TYPE, error.to_owned()));
        }
        if failed {
            self.root.set_status(Status::error(error_type.unwrap_or("server error").to_owned()));
        }
        self.root.end();
    }
}

impl Drop for RequestTrace {
    /// A request whose span was not ended went away before its answer
    /// (the client left, or the gateway stopped): its span says so.
    fn drop(&mut self) {
        if !self.ended && self.root.is_recording() {
            self.root.set_attribute(KeyValue::new(attr::OUTCOME, "client_gone"));
            self.root.set_attribute(KeyValue::new(attr::ERROR_TYPE, "client_gone"));
            self.ended = true;
            self.root.end();
        }
    }
}

/// One phase of a request, as a child span of the request's.
pub struct Phase {
    span: Option<Span>,
    /// The span engines see as their parent: this phase's, or the
    /// request's when the phase is not recorded.
    parent: SpanContext,
}

impl Phase {
    /// A phase of no request (tracing is off).
    pub fn none() -> Self {
        Self { span: None, parent: SpanContext::empty_context() }
    }

    /// Whether the phase is recorded: attributes are worth building.
    pub fn is_recording(&self) -> bool {
        self.span.is_some()
    }

    pub fn set(&mut self, attribute: KeyValue) {
        if let Some(span) = &mut self.span {
            span.set_attribute(attribute);
        }
    }

    /// Something that happened at `at` during the phase.
    pub fn event(&mut self, name: &'static str, at: Instant, attributes: Vec<KeyValue>) {
        if let Some(span) = &mut self.span {
            span.add_event_with_timestamp(Cow::Borrowed(name), system_time(at), attributes);
        }
    }

    /// The phase failed: its span's status says why.
    pub fn fail(&mut self, error_type: impl Into<opentelemetry::Value>, message: impl Into<Cow<'static, str>>) {
        if let Some(span) = &mut self.span {
            span.set_attribute(KeyValue::new(attr::ERROR_TYPE, error_type));
            span.set_status(Status::error(message));
        }
    }

    /// The headers that carry the trace to an engine, this phase's span as
    /// the parent, or the request's when the phase is not recorded (`None`
    /// when tracing is off).
    pub fn propagation(&self) -> Option<TraceHeaders> {
        self.parent.is_valid().then(|| TraceHeaders::of(&self.parent))
    }

    pub fn end(mut self) {
        if let Some(mut span) = self.span.take() {
            span.end();
        }
    }
}

impl Drop for Phase {
    /// A phase whose span was not ended was cut short: its request went
    /// away, or a `pd` pair's other half decided the answer.
    fn drop(&mut self) {
        if let Some(mut span) = self.span.take() {
            span.set_attribute(KeyValue::new(attr::ERROR_TYPE, "cancelled"));
            span.end();
        }
    }
}

/// W3C trace context headers for a request to an engine.
#[derive(Clone, Debug)]
pub struct TraceHeaders {
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
}

impl TraceHeaders {
    fn of(context: &SpanContext) -> Self {
        propagation::headers(context)
    }
}

/// The gateway's resource: the SDK's (with `OTEL_RESOURCE_ATTRIBUTES`),
/// `service.name` from `OTEL_SERVICE_NAME`, else from the attributes, else
/// `turnstile` (not the SDK's `unknown_service`).
fn resource(service_name: Option<&str>) -> opentelemetry_sdk::Resource {
    let detected = opentelemetry_sdk::Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::new("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    match service_name {
        Some(name) => opentelemetry_sdk::Resource::builder().with_service_name(name.to_owned()).build(),
        None if named => detected,
        None => opentelemetry_sdk::Resource::builder().with_service_name(config::DEFAULT_SERVICE_NAME).build(),
    }
}

/// `at` on the wall clock (spans carry wall-clock times).
fn system_time(at: Instant) -> SystemTime {
    let ago = Instant::now().saturating_duration_since(at);
    SystemTime::now().checked_sub(ago).unwrap_or_else(SystemTime::now)
}

/// The spans still open while an engine's answer streams to the client:
/// the request's and the engine exchange's. Both end with the answer.
pub struct AnswerTrace {
    pub request: RequestTrace,
    pub upstream: Phase,
}

/// How an answer ended, for its spans.
pub struct AnswerEnd {
    /// The engine's status, as the client got it.
    pub status: u16,
    /// The access log's outcome (`completed`, `upstream_broken`,
    /// `client_gone`, `client_stalled`).
    pub outcome: &'static str,
    /// The engine broke off mid-answer.
    pub upstream_broken: bool,
    pub usage: Option<(u64, u64)>,
}

impl AnswerTrace {
    /// The engine's first body byte, sent at `at`.
    pub fn first_byte(&mut self, at: Instant) {
        self.upstream.event("first byte", at, Vec::new());
    }

    /// The answer ended as `end` says: both spans close.
    pub fn finish(mut self, end: &AnswerEnd) {
        if !self.request.is_recording() {
            return;
        }
        let outcome = KeyValue::new(attr::OUTCOME, end.outcome);
        self.upstream.set(outcome.clone());
        self.request.set(outcome);
        if let Some((input, output)) = end.usage {
            let (input, output) = (saturating_i64(input), saturating_i64(output));
            self.request.set(KeyValue::new(attr::GEN_AI_INPUT_TOKENS, input));
            self.request.set(KeyValue::new(attr::GEN_AI_OUTPUT_TOKENS, output));
        }
        if end.upstream_broken {
            self.upstream.fail("stream_broken", "the engine broke off mid-answer");
        }
        self.upstream.end();
        let status_error = (end.status >= 400).then(|| end.status.to_string());
        let error_type = match end.outcome {
            "completed" => status_error.as_deref(),
            other => Some(other),
        };
        self.request.end(end.status, error_type, end.status >= 500 || end.upstream_broken);
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
