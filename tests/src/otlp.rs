//! An OTLP trace receiver inside the test process: the collector a test points the gateway's
//! trace export at, so it can assert on the spans the gateway sends.
//!
//! [`OtlpReceiver::start`] serves OTLP/HTTP with protobuf bodies (`POST /v1/traces`, plain or
//! gzip-encoded); [`OtlpReceiver::start_grpc`] serves OTLP/gRPC (`TraceService/Export`) on a
//! port of its own. Either keeps what arrives as [`ReceivedSpan`]s: plain strings and maps
//! rather than protobuf messages, so a test compares them with `assert_eq!` and prints them
//! readably when it fails.
//!
//! Everything stays on 127.0.0.1, memory is bounded ([`MAX_SPANS`]), and the listener with
//! every connection it accepted closes when the receiver is stopped or dropped.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tonic::codec::CompressionEncoding;
use tonic::codegen::Service as _;

/// Spans a receiver keeps; past this the oldest are dropped (and counted), so a long test
/// cannot grow without bound while the newest spans, the ones a test waits for, stay.
pub const MAX_SPANS: usize = 100_000;

/// Largest export body accepted, before and after gzip: far above what an SDK batch sends
/// (the gRPC default is 4 MiB), low enough that a broken test cannot exhaust memory.
const MAX_BODY_BYTES: usize = 64 << 20;

/// The path OTLP/HTTP exporters post traces to, below the endpoint's base URL.
pub const TRACES_PATH: &str = "/v1/traces";

/// How many binds on a fresh port are tried before giving up: another process may take a
/// port between `free_port` checking it and this receiver binding it.
const BIND_ATTEMPTS: usize = 20;

/// The wire protocol a receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies: `POST /v1/traces`, `application/x-protobuf`.
    HttpProtobuf,
    /// OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export` over h2c.
    Grpc,
}

/// One span as received, with every id as lowercase hex and every attribute as text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceivedSpan {
    /// The resource's `service.name` attribute ("" when the resource has none).
    pub service_name: String,
    /// The name of the instrumentation scope that made the span ("" when none).
    pub scope: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// 16 lowercase hex digits, empty for a root span.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// "internal", "server", "client", "producer", "consumer", "unspecified", or the number
    /// of a kind this version does not know.
    pub kind: String,
    /// The span's attributes, each value as text (see [`any_value_text`]).
    pub attributes: BTreeMap<String, String>,
    /// The span's events in order: name and attributes.
    pub events: Vec<(String, BTreeMap<String, String>)>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    /// The status description (set with an error status).
    pub status_message: String,
    /// Start time, nanoseconds since the Unix epoch.
    pub start_unix_nano: u64,
    /// End time, nanoseconds since the Unix epoch.
    pub end_unix_nano: u64,
}

impl ReceivedSpan {
    /// An attribute's text, if the span has it.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// Whether the span has no parent.
    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }

    /// The span's duration (zero when the clock or the exporter reported it ending first).
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_unix_nano.saturating_sub(self.start_unix_nano))
    }

    /// One line for failure messages: service, name, kind, ids and attributes.
    fn summary(&self) -> String {
        let parent = if self.is_root() { "root" } else { self.parent_span_id.as_str() };
        format!(
            "{}/{} [{}] trace={} span={} parent={} status={} attrs={:?}",
            self.service_name,
            self.name,
            self.kind,
            self.trace_id,
            self.span_id,
            parent,
            self.status_code,
            self.attributes
        )
    }
}

/// What the listener's connections share with the test.
#[derive(Debug, Default)]
struct Shared {
    store: Mutex<Store>,
    /// Answer every export with a failure and keep nothing.
    failing: AtomicBool,
    /// Woken whenever an export has been handled, for [`OtlpReceiver::wait_for_spans`].
    arrived: Notify,
}

/// The spans kept and the counts a test asks about, under one lock so a test that sees an
/// export counted also sees its spans.
#[derive(Debug, Default)]
struct Store {
    spans: VecDeque<ReceivedSpan>,
    export_requests: usize,
    refused_requests: usize,
    dropped_spans: usize,
    last_headers: Option<HeaderMap>,
}

impl Shared {
    /// Handles one decoded export; `false` when it was refused because the receiver is failing.
    fn accept(&self, request: ExportTraceServiceRequest, headers: HeaderMap) -> bool {
        let failing = self.failing.load(Ordering::Relaxed);
        // Converted before taking the lock: a big batch must not hold up the test's reads.
        let spans = if failing { Vec::new() } else { received_spans(request) };
        {
            let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
            store.export_requests += 1;
            store.last_headers = Some(headers);
            if failing {
                store.refused_requests += 1;
            }
            for span in spans {
                if store.spans.len() == MAX_SPANS {
                    store.spans.pop_front();
                    store.dropped_spans += 1;
                }
                store.spans.push_back(span);
            }
        }
        self.arrived.notify_waiters();
        !failing
    }

    /// Counts an export refused before it was decoded (failing mode skips the decoding).
    fn refuse(&self, headers: HeaderMap) {
        {
            let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
            store.export_requests += 1;
            store.refused_requests += 1;
            store.last_headers = Some(headers);
        }
        self.arrived.notify_waiters();
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running OTLP receiver; stops when [`OtlpReceiver::stop`]ped or dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    addr: SocketAddr,
    protocol: OtlpProtocol,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Starts an OTLP/HTTP (protobuf) receiver on a free loopback port.
    pub async fn start() -> Result<Self> {
        Self::start_protocol(OtlpProtocol::HttpProtobuf).await
    }

    /// Starts an OTLP/gRPC receiver on a free loopback port (a port of its own: an exporter
    /// speaks one protocol, and a test of the gRPC exporter should fail if it posts HTTP).
    pub async fn start_grpc() -> Result<Self> {
        Self::start_protocol(OtlpProtocol::Grpc).await
    }

    /// Starts a receiver for `protocol` on a free loopback port, chosen as the harness
    /// chooses ports (below the ephemeral range, see `testkit::free_port`) so that the port
    /// can be bound again by [`OtlpReceiver::start_on`] after a stop.
    pub async fn start_protocol(protocol: OtlpProtocol) -> Result<Self> {
        let mut last_error = None;
        for _ in 0..BIND_ATTEMPTS {
            let port = testkit::free_port().context("a free loopback port for the OTLP receiver")?;
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(listener) => return Self::serve(listener, protocol),
                // Taken by someone else since it was checked: try another.
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.map_or_else(|| anyhow::anyhow!("no port"), anyhow::Error::from))
            .context("binding the OTLP receiver")
    }

    /// Starts a receiver for `protocol` on 127.0.0.1:`port`: how a test brings a collector
    /// back where the gateway already sends (after [`OtlpReceiver::stop`]).
    pub async fn start_on(protocol: OtlpProtocol, port: u16) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("binding the OTLP receiver on 127.0.0.1:{port}"))?;
        Self::serve(listener, protocol)
    }

    fn serve(listener: TcpListener, protocol: OtlpProtocol) -> Result<Self> {
        let addr = listener.local_addr().context("the OTLP receiver's address")?;
        let shared = Arc::new(Shared::default());
        let server = tokio::spawn(accept_loop(listener, protocol, Arc::clone(&shared)));
        Ok(Self { addr, protocol, shared, server })
    }

    /// The base URL exporters are given, `http://127.0.0.1:PORT` (an OTLP/HTTP exporter posts
    /// to it plus [`TRACES_PATH`]; a gRPC exporter connects to it).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The full OTLP/HTTP traces URL, `endpoint()` + `/v1/traces`.
    pub fn traces_url(&self) -> String {
        format!("{}{TRACES_PATH}", self.endpoint())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The protocol this receiver speaks.
    pub fn protocol(&self) -> OtlpProtocol {
        self.protocol
    }

    /// Every span kept so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.store().spans.iter().cloned().collect()
    }

    /// The spans of one trace (`trace_id` in hex, any case), in arrival order.
    pub fn spans_of_trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        let trace_id = trace_id.to_ascii_lowercase();
        self.shared.store().spans.iter().filter(|span| span.trace_id == trace_id).cloned().collect()
    }

    /// The spans called `name`, in arrival order.
    pub fn spans_named(&self, name: &str) -> Vec<ReceivedSpan> {
        self.shared.store().spans.iter().filter(|span| span.name == name).cloned().collect()
    }

    /// Export requests handled so far, refused ones (failing mode, undecodable bodies)
    /// included: a test can see the exporter tried even while nothing is kept.
    pub fn export_requests(&self) -> usize {
        self.shared.store().export_requests
    }

    /// Export requests answered with a failure so far.
    pub fn refused_requests(&self) -> usize {
        self.shared.store().refused_requests
    }

    /// Spans dropped because more than [`MAX_SPANS`] were kept.
    pub fn dropped_spans(&self) -> usize {
        self.shared.store().dropped_spans
    }

    /// The headers (gRPC: metadata) of the last export request, e.g. to check an exporter's
    /// configured headers or its `content-encoding`.
    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.shared.store().last_headers.clone()
    }

    /// Forgets the spans kept and resets the counts, between phases of a test.
    pub fn clear(&self) {
        *self.shared.store() = Store::default();
    }

    /// While `failing`, every export is answered 503 (gRPC: `UNAVAILABLE`) and nothing is
    /// kept, as from a collector that is overloaded or restarting.
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::Relaxed);
    }

    /// Waits until `pred` holds for the spans kept and returns them; panics after `timeout`
    /// with what was received, since a test waiting for spans cannot go on without them.
    pub async fn wait_for_spans(&self, pred: impl Fn(&[ReceivedSpan]) -> bool, timeout: Duration) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so an export landing in between still wakes us.
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let spans: Vec<ReceivedSpan> = self.spans();
            if pred(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!("{}", self.timeout_report(&spans, timeout));
            }
        }
    }

    /// The panic message of a [`OtlpReceiver::wait_for_spans`] that timed out.
    fn timeout_report(&self, spans: &[ReceivedSpan], timeout: Duration) -> String {
        /// Enough spans to recognise what arrived without burying the failure.
        const SHOWN: usize = 50;
        let (requests, refused, dropped) = {
            let store = self.shared.store();
            (store.export_requests, store.refused_requests, store.dropped_spans)
        };
        let mut report = format!(
            "OTLP receiver at {} ({:?}): the expected spans did not arrive within {timeout:?}; \
             {requests} export requests ({refused} refused), {} spans kept ({dropped} dropped)",
            self.endpoint(),
            self.protocol,
            spans.len()
        );
        let skipped = spans.len().saturating_sub(SHOWN);
        if skipped > 0 {
            let _ = write!(report, "; the last {SHOWN}:");
        } else if !spans.is_empty() {
            report.push(':');
        }
        for span in &spans[skipped..] {
            let _ = write!(report, "\n  {}", span.summary());
        }
        report
    }

    /// Stops listening and closes every connection; the port is free again on return.
    pub async fn stop(mut self) {
        self.server.abort();
        // Awaited so the listener is closed when this returns (an abort only asks); the drop
        // that follows aborts again, harmlessly.
        let _ = (&mut self.server).await;
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        // Dropping the accept task drops the listener and its set of connection tasks.
        self.server.abort();
    }
}

/// Accepts connections until the task is aborted; each connection's task lives in a set the
/// loop owns, so aborting the loop ends them too.
async fn accept_loop(listener: TcpListener, protocol: OtlpProtocol, shared: Arc<Shared>) {
    let builder = match protocol {
        // Exporters post over HTTP/1.1, some over h2c; both are served.
        OtlpProtocol::HttpProtobuf => auto::Builder::new(TokioExecutor::new()),
        // gRPC is HTTP/2 only.
        OtlpProtocol::Grpc => auto::Builder::new(TokioExecutor::new()).http2_only(),
    };
    let grpc = TraceServiceServer::new(GrpcExport(Arc::clone(&shared)))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_BODY_BYTES);
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reaps finished connections so the set does not grow.
            Some(_) = connections.join_next() => continue,
        };
        let (shared, grpc) = (Arc::clone(&shared), grpc.clone());
        let service = service_fn(move |request: Request<Incoming>| {
            let (shared, mut grpc) = (Arc::clone(&shared), grpc.clone());
            async move {
                let response = match protocol {
                    OtlpProtocol::HttpProtobuf => {
                        handle_http(&shared, request).await.map(|response| response.map(Either::Left))
                    }
                    OtlpProtocol::Grpc => {
                        let ready = std::future::poll_fn(|cx| {
                            tonic::codegen::Service::<Request<Incoming>>::poll_ready(&mut grpc, cx)
                        });
                        let response = match ready.await {
                            Ok(()) => grpc.call(request).await,
                            Err(never) => Err(never),
                        };
                        response.map(|response| response.map(Either::Right))
                    }
                };
                Ok::<_, Infallible>(response.unwrap_or_else(|never: Infallible| match never {}))
            }
        });
        let builder = builder.clone();
        connections.spawn(async move {
            // Errors are exporters going away mid-request; nothing to tell the test.
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// An OTLP/HTTP request: only `POST /v1/traces` with a protobuf body is an export.
async fn handle_http(shared: &Shared, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != TRACES_PATH {
        return Ok(text_response(StatusCode::NOT_FOUND, "only POST /v1/traces is served"));
    }
    if request.method() != Method::POST {
        return Ok(text_response(StatusCode::METHOD_NOT_ALLOWED, "POST /v1/traces only"));
    }
    let (parts, body) = request.into_parts();
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    // Parameters after `;` do not change the encoding. OTLP/JSON is refused on purpose: the
    // gateway is meant to export protobuf, and a test should notice if it does not.
    if content_type.split(';').next().unwrap_or("").trim() != "application/x-protobuf" {
        let message = format!("expected content-type application/x-protobuf, got {content_type:?}");
        return Ok(text_response(StatusCode::UNSUPPORTED_MEDIA_TYPE, &message));
    }
    if shared.failing.load(Ordering::Relaxed) {
        shared.refuse(parts.headers);
        return Ok(text_response(StatusCode::SERVICE_UNAVAILABLE, "the receiver is failing on purpose"));
    }
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => return Ok(text_response(StatusCode::BAD_REQUEST, &format!("reading the body: {err}"))),
    };
    let encoding = parts.headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    let body = match encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => body,
        "gzip" => match gunzip(&body) {
            Ok(body) => body,
            Err(message) => return Ok(bad_export(shared, parts.headers, &message)),
        },
        other => {
            return Ok(text_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &format!("content-encoding {other} unsupported"),
            ));
        }
    };
    let export = match ExportTraceServiceRequest::decode(body) {
        Ok(export) => export,
        Err(err) => return Ok(bad_export(shared, parts.headers, &format!("not an ExportTraceServiceRequest: {err}"))),
    };
    if !shared.accept(export, parts.headers) {
        // Failing mode was switched on while the body was read.
        return Ok(text_response(StatusCode::SERVICE_UNAVAILABLE, "the receiver is failing on purpose"));
    }
    let mut response = Response::new(Full::new(Bytes::from(ExportTraceServiceResponse::default().encode_to_vec())));
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-protobuf"));
    Ok(response)
}

/// A 400 for a body that could not be read as an export, counted as a refused request.
fn bad_export(shared: &Shared, headers: HeaderMap, message: &str) -> Response<Full<Bytes>> {
    shared.refuse(headers);
    text_response(StatusCode::BAD_REQUEST, message)
}

/// Inflates a gzip body of at most [`MAX_BODY_BYTES`] once inflated.
fn gunzip(body: &[u8]) -> Result<Bytes, String> {
    let mut inflated = Vec::new();
    let limit = u64::try_from(MAX_BODY_BYTES).unwrap_or(u64::MAX) + 1;
    flate2::read::GzDecoder::new(body)
        .take(limit)
        .read_to_end(&mut inflated)
        .map_err(|err| format!("not a gzip body: {err}"))?;
    if inflated.len() > MAX_BODY_BYTES {
        return Err(format!("inflated body exceeds {MAX_BODY_BYTES} bytes"));
    }
    Ok(Bytes::from(inflated))
}

fn text_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    response
}

/// The gRPC side: tonic decodes (and inflates) the request, this keeps it.
#[derive(Debug)]
struct GrpcExport(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for GrpcExport {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let (metadata, _, export) = request.into_parts();
        if self.0.failing.load(Ordering::Relaxed) {
            self.0.refuse(metadata.into_headers());
            // UNAVAILABLE is the gRPC counterpart of 503, and retryable for OTLP exporters.
            return Err(tonic::Status::unavailable("the receiver is failing on purpose"));
        }
        if !self.0.accept(export, metadata.into_headers()) {
            return Err(tonic::Status::unavailable("the receiver is failing on purpose"));
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Flattens an export into spans, each carrying its resource's service name and its scope.
pub fn received_spans(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut received = Vec::new();
    for resource_spans in request.resource_spans {
        let service_name = resource_spans
            .resource
            .as_ref()
            .and_then(|resource| resource.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(|kv| kv.value.as_ref().map(any_value_text).unwrap_or_default())
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            let scope = scope_spans.scope.map(|scope| scope.name).unwrap_or_default();
            for span in scope_spans.spans {
                let status = span.status.unwrap_or_default();
                received.push(ReceivedSpan {
                    service_name: service_name.clone(),
                    scope: scope.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: kind_name(span.kind),
                    attributes: attribute_map(&span.attributes),
                    events: span
                        .events
                        .iter()
                        .map(|event| (event.name.clone(), attribute_map(&event.attributes)))
                        .collect(),
                    status_code: status.code,
                    status_message: status.message,
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                });
            }
        }
    }
    received
}

/// Lowercase hex of an id ("" for an empty one, as a root's parent id is).
fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

fn kind_name(kind: i32) -> String {
    match SpanKind::try_from(kind) {
        Ok(SpanKind::Unspecified) => "unspecified".to_owned(),
        Ok(SpanKind::Internal) => "internal".to_owned(),
        Ok(SpanKind::Server) => "server".to_owned(),
        Ok(SpanKind::Client) => "client".to_owned(),
        Ok(SpanKind::Producer) => "producer".to_owned(),
        Ok(SpanKind::Consumer) => "consumer".to_owned(),
        Err(_) => kind.to_string(),
    }
}

fn attribute_map(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map(any_value_text).unwrap_or_default())).collect()
}

/// An attribute value as text: strings as they are, integers in decimal, booleans as
/// `true`/`false`, doubles as Rust prints them, bytes as lowercase hex, arrays as
/// `[a, b]` and maps as `{k: v, ...}`; an empty value is "".
pub fn any_value_text(value: &AnyValue) -> String {
    match &value.value {
        // A profiling string-table index means nothing in a trace: OTLP says to read it as
        // absent.
        None | Some(any_value::Value::StringValueStrindex(_)) => String::new(),
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::BoolValue(flag)) => flag.to_string(),
        Some(any_value::Value::IntValue(number)) => number.to_string(),
        Some(any_value::Value::DoubleValue(number)) => number.to_string(),
        Some(any_value::Value::BytesValue(bytes)) => hex(bytes),
        Some(any_value::Value::ArrayValue(array)) => {
            let items: Vec<String> = array.values.iter().map(any_value_text).collect();
            format!("[{}]", items.join(", "))
        }
        Some(any_value::Value::KvlistValue(list)) => {
            let items: Vec<String> = list
                .values
                .iter()
                .map(|kv| format!("{}: {}", kv.key, kv.value.as_ref().map(any_value_text).unwrap_or_default()))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, InstrumentationScope};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};

    use super::*;
    use crate::harness::try_send;

    const TRACE: [u8; 16] =
        [0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36];
    const ROOT: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
    const CHILD: [u8; 8] = [0x53, 0x99, 0x5c, 0x3f, 0x42, 0xcd, 0x8a, 0xd8];
    const WAIT: Duration = Duration::from_secs(5);

    fn string(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
            ..Default::default()
        }
    }

    fn value(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
    }

    /// A server span and a client span under it, as a gateway would export one request.
    fn export() -> ExportTraceServiceRequest {
        let server = Span {
            trace_id: TRACE.to_vec(),
            span_id: ROOT.to_vec(),
            name: "POST /v1/chat/completions".to_owned(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_250_000_000,
            attributes: vec![
                string("http.request.method", "POST"),
                value("http.response.status_code", any_value::Value::IntValue(200)),
                value("turnstile.streamed", any_value::Value::BoolValue(false)),
                value("turnstile.weight", any_value::Value::DoubleValue(0.5)),
                value(
                    "turnstile.pods",
                    any_value::Value::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue { value: Some(any_value::Value::StringValue("a".to_owned())) },
                            AnyValue { value: Some(any_value::Value::IntValue(2)) },
                        ],
                    }),
                ),
            ],
            events: vec![span::Event {
                name: "routed".to_owned(),
                attributes: vec![string("turnstile.pod", "pod-a")],
                ..Default::default()
            }],
            status: Some(Status { code: 2, message: "upstream failed".to_owned() }),
            ..Default::default()
        };
        let client = Span {
            trace_id: TRACE.to_vec(),
            span_id: CHILD.to_vec(),
            parent_span_id: ROOT.to_vec(),
            name: "upstream".to_owned(),
            kind: SpanKind::Client as i32,
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![string("service.name", "turnstile"), string("host.name", "test")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope { name: "turnstile".to_owned(), ..Default::default() }),
                    spans: vec![server, client],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn post(receiver: &OtlpReceiver, body: Vec<u8>, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut builder = Request::post(receiver.traces_url()).header("content-type", "application/x-protobuf");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Full::new(Bytes::from(body))).expect("request")
    }

    fn assert_exported_spans(spans: &[ReceivedSpan]) {
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let (server, client) = (&spans[0], &spans[1]);
        assert_eq!(server.service_name, "turnstile");
        assert_eq!(server.scope, "turnstile");
        assert_eq!(server.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(server.span_id, "00f067aa0ba902b7");
        assert_eq!(server.parent_span_id, "");
        assert!(server.is_root());
        assert_eq!(server.name, "POST /v1/chat/completions");
        assert_eq!(server.kind, "server");
        assert_eq!(server.attr("http.request.method"), Some("POST"));
        assert_eq!(server.attr("http.response.status_code"), Some("200"));
        assert_eq!(server.attr("turnstile.streamed"), Some("false"));
        assert_eq!(server.attr("turnstile.weight"), Some("0.5"));
        assert_eq!(server.attr("turnstile.pods"), Some("[a, 2]"));
        let routed = BTreeMap::from([("turnstile.pod".to_owned(), "pod-a".to_owned())]);
        assert_eq!(server.events, vec![("routed".to_owned(), routed)]);
        assert_eq!(server.status_code, 2);
        assert_eq!(server.status_message, "upstream failed");
        assert_eq!(server.start_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(server.end_unix_nano, 1_700_000_000_250_000_000);
        assert_eq!(server.duration(), Duration::from_millis(250));
        assert_eq!(client.parent_span_id, server.span_id);
        assert_eq!(client.kind, "client");
        assert_eq!(client.service_name, "turnstile");
        assert!(client.attributes.is_empty());
    }

    #[tokio::test]
    async fn http_exports_decode_into_spans() {
        let receiver = OtlpReceiver::start().await.expect("receiver");
        assert!(receiver.endpoint().starts_with("http://127.0.0.1:"), "{}", receiver.endpoint());

        let reply = try_send(post(&receiver, export().encode_to_vec(), &[])).await.expect("export sent");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.header("content-type"), "application/x-protobuf");
        assert_eq!(ExportTraceServiceResponse::decode(reply.body).expect("a response message"), Default::default());

        let spans = receiver.wait_for_spans(|spans| spans.len() >= 2, WAIT).await;
        assert_exported_spans(&spans);
        assert_eq!(receiver.export_requests(), 1);
        assert_eq!(receiver.spans_of_trace("4BF92F3577B34DA6A3CE929D0E0E4736").len(), 2);
        assert!(receiver.spans_of_trace("00000000000000000000000000000001").is_empty());
        assert_eq!(receiver.spans_named("upstream").len(), 1);

        // Gzip-encoded bodies are inflated, and the headers are there to check.
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&export().encode_to_vec()).expect("gzip");
        let body = gzip.finish().expect("gzip");
        let reply = try_send(post(&receiver, body, &[("content-encoding", "gzip"), ("authorization", "Bearer t")]))
            .await
            .expect("export sent");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let spans = receiver.wait_for_spans(|spans| spans.len() >= 4, WAIT).await;
        assert_exported_spans(&spans[2..]);
        let headers = receiver.last_headers().expect("headers");
        assert_eq!(headers["content-encoding"], "gzip");
        assert_eq!(headers["authorization"], "Bearer t");
        assert_eq!(receiver.export_requests(), 2);

        receiver.clear();
        assert!(receiver.spans().is_empty());
        assert_eq!(receiver.export_requests(), 0);
        receiver.stop().await;
    }

    #[tokio::test]
    async fn http_refuses_what_is_not_a_protobuf_export() {
        let receiver = OtlpReceiver::start().await.expect("receiver");
        let json = Request::post(receiver.traces_url())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        assert_eq!(try_send(json).await.expect("sent").status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let elsewhere = Request::post(format!("{}/v1/metrics", receiver.endpoint()))
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::new()))
            .expect("request");
        assert_eq!(try_send(elsewhere).await.expect("sent").status, StatusCode::NOT_FOUND);
        let garbage = post(&receiver, vec![0xff, 0xff, 0xff], &[]);
        assert_eq!(try_send(garbage).await.expect("sent").status, StatusCode::BAD_REQUEST);
        let broken_gzip = post(&receiver, b"not gzip".to_vec(), &[("content-encoding", "gzip")]);
        assert_eq!(try_send(broken_gzip).await.expect("sent").status, StatusCode::BAD_REQUEST);
        assert!(receiver.spans().is_empty());
        assert_eq!(receiver.refused_requests(), 2);
    }

    #[tokio::test]
    async fn failing_mode_answers_503_and_keeps_nothing() {
        let receiver = OtlpReceiver::start().await.expect("receiver");
        receiver.set_failing(true);
        let reply = try_send(post(&receiver, export().encode_to_vec(), &[])).await.expect("export sent");
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(receiver.spans().is_empty());
        assert_eq!((receiver.export_requests(), receiver.refused_requests()), (1, 1));

        // Back up, the next export is kept as usual.
        receiver.set_failing(false);
        let reply = try_send(post(&receiver, export().encode_to_vec(), &[])).await.expect("export sent");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(receiver.spans().len(), 2);
    }

    #[tokio::test]
    async fn a_timed_out_wait_tells_what_arrived() {
        let receiver = OtlpReceiver::start().await.expect("receiver");
        try_send(post(&receiver, export().encode_to_vec(), &[])).await.expect("export sent");
        // In a task of its own, so its panic is caught and read.
        let wait =
            tokio::spawn(
                async move { receiver.wait_for_spans(|spans| spans.len() > 2, Duration::from_millis(100)).await },
            );
        let message = wait.await.expect_err("the wait times out").into_panic();
        let message = message.downcast_ref::<String>().expect("a formatted message");
        assert!(message.contains("1 export requests (0 refused), 2 spans kept"), "{message}");
        assert!(message.contains("turnstile/POST /v1/chat/completions [server]"), "{message}");
    }

    #[tokio::test]
    async fn a_stopped_receiver_frees_its_port_for_a_restart() {
        let receiver = OtlpReceiver::start().await.expect("receiver");
        let port = receiver.port();
        receiver.stop().await;
        assert!(try_send(post_to(port)).await.is_err(), "nothing listens after stop");
        let again = OtlpReceiver::start_on(OtlpProtocol::HttpProtobuf, port).await.expect("same port again");
        assert_eq!(try_send(post_to(port)).await.expect("sent").status, StatusCode::OK);
        assert_eq!(again.spans().len(), 2);
    }

    fn post_to(port: u16) -> Request<Full<Bytes>> {
        Request::post(format!("http://127.0.0.1:{port}{TRACES_PATH}"))
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(export().encode_to_vec())))
            .expect("request")
    }

    #[tokio::test]
    async fn grpc_exports_decode_into_spans() {
        let receiver = OtlpReceiver::start_grpc().await.expect("receiver");
        assert_eq!(receiver.protocol(), OtlpProtocol::Grpc);
        let mut client = TraceServiceClient::connect(receiver.endpoint()).await.expect("gRPC connection");
        client.export(export()).await.expect("export accepted");
        let spans = receiver.wait_for_spans(|spans| spans.len() >= 2, WAIT).await;
        assert_exported_spans(&spans);

        // Compressed exports are inflated too.
        let mut gzip = client.send_compressed(CompressionEncoding::Gzip);
        gzip.export(export()).await.expect("compressed export accepted");
        assert_exported_spans(&receiver.wait_for_spans(|spans| spans.len() >= 4, WAIT).await[2..]);
        assert_eq!(receiver.last_headers().expect("metadata")["grpc-encoding"], "gzip");

        receiver.set_failing(true);
        let status = gzip.export(export()).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(receiver.spans().len(), 4);
        assert_eq!((receiver.export_requests(), receiver.refused_requests()), (3, 1));
    }
}
