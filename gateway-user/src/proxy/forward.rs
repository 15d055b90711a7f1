//! Forwarding to an engine pod and streaming its answer back.
//!
//! The response body is passed through frame by frame ([`TrackedBody`]): no
//! buffering, no copies. On the way it releases the pod's in-flight slot,
//! records time to first byte, reads token usage and writes the one log line
//! per request, whether the response completes, the engine breaks off, or the
//! client goes away. When the user has a TPM limit, the answer's tokens are
//! charged before the end of the body reaches the client, so the client's
//! next request already sees them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::upstream_conn::TrackingConnector;
use super::usage::{Usage, UsageChunkFilter, UsageTap};
use crate::discovery::{InFlightGuard, PodInfo};
use crate::errors::GatewayError;
use crate::limits::{Settling, TokenCharge};
use crate::metrics::{InFlightMetric, Metrics};
use crate::routing::{TokenUsage, UsageCallback};

/// Pooled HTTP/1.1 client to engine pods.
#[derive(Clone)]
pub struct Upstream {
    client: Client<TrackingConnector, Full<Bytes>>,
    response_timeout: Duration,
    /// Most connections (requests in flight) to one pod; a request past it
    /// waits for a slot.
    max_connections_per_pod: usize,
}

/// How the gateway pools engine connections.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub max_connections_per_pod: usize,
    /// Idle pooled connections close after this.
    pub idle_timeout: Duration,
}

/// One of a pod's connection slots, held until the answer's body ends.
pub type ConnectionSlot = tokio::sync::OwnedSemaphorePermit;

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1),
/// plus the ones the gateway sets itself.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Engine response headers that describe the engine's software, not the
/// answer: dropped so clients see one gateway, not its backends.
const ENGINE_INTERNAL: [&str; 3] = ["server", "x-powered-by", "via"];

/// Prepares an engine's response headers for the client: hop-by-hop ones
/// and the ones naming the engine's software go; the OpenAI, rate-limit and
/// content headers stay.
pub fn clean_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in ENGINE_INTERNAL {
        headers.remove(name);
    }
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

impl Upstream {
    /// The pooled client, registering each new pod connection with kernel
    /// assist (when given) so the proxy can tag it with its model.
    pub fn with_kernel(settings: UpstreamSettings, kernel: Option<Arc<crate::kernel::KernelAssist>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let max_connections_per_pod = settings.max_connections_per_pod.max(1);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(settings.idle_timeout)
            .pool_max_idle_per_host(max_connections_per_pod)
            .build(TrackingConnector::new(connector, kernel));
        Self { client, response_timeout: settings.response_timeout, max_connections_per_pod }
    }

    /// Waits (within the response timeout) for one of `pod`'s connection
    /// slots.
    pub async fn connection_slot(&self, pod: &PodInfo) -> Result<ConnectionSlot, SendError> {
        let slots = pod.load.connection_slots(self.max_connections_per_pod);
        match tokio::time::timeout(self.response_timeout, slots.acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_closed)) => Err(SendError::Other("connection slots closed".to_owned())),
            Err(_) => Err(SendError::Timeout(self.response_timeout)),
        }
    }

    /// Sends one request to `pod` and waits for its response headers; over a
    /// connection of the pod's pool for model id `pool` when given (see
    /// `upstream_conn`).
    pub async fn send(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        pod: &PodInfo,
        request_id: &HeaderValue,
        pool: Option<u32>,
    ) -> Result<Response<Incoming>, SendError> {
        let request = build_request(parts, body, pod, request_id, pool).map_err(SendError::Other)?;
        match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) if err.is_connect() => Err(SendError::Connect(error_chain(&err))),
            Ok(Err(err)) => Err(SendError::Other(error_chain(&err))),
            Err(_) => Err(SendError::Timeout(self.response_timeout)),
        }
    }
}

/// How sending to a pod failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing reached the pod, another may be tried.
    Connect(String),
    /// The pod did not answer in time.
    Timeout(Duration),
    /// The connection broke after the request may have reached the pod.
    Other(String),
}

impl SendError {
    pub fn into_gateway_error(self, pod: &PodInfo) -> GatewayError {
        match self {
            Self::Connect(reason) | Self::Other(reason) => {
                GatewayError::UpstreamFailed { pod: pod.name.clone(), reason }
            }
            Self::Timeout(limit) => {
                GatewayError::UpstreamTimeout { pod: pod.name.clone(), timeout_seconds: limit.as_secs() }
            }
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn build_request(
    parts: &http::request::Parts,
    body: Bytes,
    pod: &PodInfo,
    request_id: &HeaderValue,
    pool: Option<u32>,
) -> Result<Request<Full<Bytes>>, String> {
    let authority = Authority::try_from(super::upstream_conn::pool_authority(&pod.addr_text, pool))
        .map_err(|e| format!("pod address {}: {e}", pod.addr_text))?;
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| e.to_string())?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(HeaderName::from_static("x-request-id"), request_id.clone());
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(request)
}

/// Everything needed to account for a request once its response ends.
pub struct RequestRecord {
    pub metrics: Arc<Metrics>,
    pub request_id: HeaderValue,
    pub model: Arc<str>,
    pub profile: String,
    pub strategy: &'static str,
    pub pod: Arc<PodInfo>,
    pub status: u16,
    pub started: Instant,
    pub routing_time: Duration,
    /// Held until the response ends: the pod's in-flight slot and gauge.
    pub guards: (InFlightGuard, InFlightMetric),
    /// Held until the response ends: the pod connection slot and the
    /// gateway-wide in-flight slot.
    pub slots: (Option<ConnectionSlot>, Option<super::InFlightSlot>),
    /// Bills `usage.total_tokens` to the user's TPM when the response ends.
    pub token_charge: Option<TokenCharge>,
    /// Tells the routing strategy the answer's usage (`vtc-basic` counts user tokens).
    pub on_usage: Option<UsageCallback>,
}

/// How a proxied response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Completed,
    UpstreamBroken,
    ClientGone,
    /// The client stopped reading for `--client-write-timeout-seconds`.
    ClientStalled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::UpstreamBroken => "upstream_broken",
            Self::ClientGone => "client_gone",
            Self::ClientStalled => "client_stalled",
        }
    }
}

/// The engine's response body on its way to the client.
pub struct TrackedBody {
    inner: Incoming,
    tap: UsageTap,
    /// Removes the usage chunk the gateway asked for on the client's behalf.
    usage_filter: Option<UsageChunkFilter>,
    sse: bool,
    first_byte: Option<Duration>,
    record: Option<RequestRecord>,
    /// The TPM charge in progress; the end of the body waits for it.
    settling: Option<Settling>,
    /// Usage read once the body ended (the tap is spent by then).
    final_usage: Option<Usage>,
    /// Usage the engine sent in trailer fields.
    trailer_usage: Option<Usage>,
    /// The engine's last frame, held until the TPM charge lands.
    held_frame: Option<Frame<Bytes>>,
    /// SSE data read from the engine and not yet passed on (see `poll_frame`).
    coalesced: Vec<Bytes>,
    coalesced_len: usize,
    /// Scheduler rounds the body stepped aside since its last engine frame,
    /// so the engine connection could deliver what it has read.
    stepped_aside: u8,
    /// A non-data frame that arrived behind coalesced data, passed on next.
    next_frame: Option<Frame<Bytes>>,
    /// Whose turn it is, for `--client-write-timeout-seconds`.
    clock: Option<Arc<super::write_watch::BodyClock>>,
    done: bool,
}

/// Most SSE bytes merged into one frame: a burst of events the engine has
/// already sent becomes one write to the client, not one write per event.
const COALESCE_MAX_BYTES: usize = 16 * 1024;
/// Most engine frames merged into one.
const COALESCE_MAX_FRAMES: usize = 64;
/// Scheduler rounds a body waits for the engine connection's next event
/// before passing on what it keeps. Measured: after one round the engine
/// connection has not yet passed on the event it already read (so nothing
/// merged: one client write per event); after two it has (a 16-token stream
/// sent at once becomes one write, and proxy CPU per streamed request fell by
/// more than half).
const STEP_ASIDE_ROUNDS: u8 = 2;

/// Sent to a streaming client when the engine breaks off mid-stream, so the
/// client sees why its stream ended instead of a silent truncation.
const SSE_UPSTREAM_ERROR: &[u8] = b"data: {\"error\":{\"message\":\"upstream connection lost mid-stream\",\"type\":\"api_error\",\"code\":\"upstream_error\",\"param\":null}}\n\n";

impl TrackedBody {
    /// `hide_usage_chunk`: the gateway asked for usage the client did not
    /// ask for; its chunk is counted, then left out of what the client gets.
    /// An encoded answer (gzip) is passed on as it came, usage chunk included.
    pub fn new(
        inner: Incoming,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        record: RequestRecord,
        hide_usage_chunk: bool,
    ) -> Self {
        let sse = content_type.is_some_and(|ct| ct.starts_with("text/event-stream"));
        let encoded = super::usage::is_encoded(content_encoding);
        Self {
            inner,
            tap: UsageTap::for_response(content_type, content_encoding),
            usage_filter: (sse && hide_usage_chunk && !encoded).then(UsageChunkFilter::default),
            sse,
            first_byte: None,
            record: Some(record),
            settling: None,
            final_usage: None,
            trailer_usage: None,
            held_frame: None,
            coalesced: Vec::new(),
            coalesced_len: 0,
            stepped_aside: 0,
            next_frame: None,
            clock: None,
            done: false,
        }
    }

    /// Reports turn-taking with the client to its connection's write watch.
    pub fn with_clock(mut self, clock: Option<Arc<super::write_watch::BodyClock>>) -> Self {
        self.clock = clock;
        self
    }

    /// What of the engine's `data` the client receives; at the `end` of the
    /// body, with whatever the usage filter still held.
    fn for_client(&mut self, data: Bytes, end: bool) -> Bytes {
        let Some(filter) = &mut self.usage_filter else { return data };
        let kept = filter.filter(&data);
        if !end {
            return kept;
        }
        match filter.finish() {
            rest if rest.is_empty() => kept,
            rest => [kept, rest].concat().into(),
        }
    }

    /// Whether the usage filter holds the start of a line.
    fn filter_holds(&self) -> bool {
        self.usage_filter.as_ref().is_some_and(UsageChunkFilter::holds)
    }

    /// Keeps `data` to be passed on with the data that follows it; the wait
    /// for more starts over.
    fn coalesce(&mut self, data: Bytes) {
        self.stepped_aside = 0;
        self.coalesced_len += data.len();
        self.coalesced.push(data);
    }

    /// The coalesced data as one buffer (copied only when there are several
    /// pieces: a few kilobytes, against a write and a wake-up per piece).
    fn take_coalesced(&mut self) -> Bytes {
        self.coalesced_len = 0;
        match self.coalesced.len() {
            0 => Bytes::new(),
            1 => self.coalesced.pop().unwrap_or_default(),
            _ => {
                let mut merged = bytes::BytesMut::with_capacity(self.coalesced.iter().map(Bytes::len).sum());
                for piece in self.coalesced.drain(..) {
                    merged.extend_from_slice(&piece);
                }
                merged.freeze()
            }
        }
    }

    /// At the end of the body: starts charging the answer's tokens, if the
    /// user has a TPM limit and the answer reported usage.
    fn start_settling(&mut self) -> Option<Settling> {
        let charge = self.record.as_mut()?.token_charge.take()?;
        self.final_usage = self.tap.finish().or(self.trailer_usage);
        Some(charge.settle(self.final_usage?.total_tokens))
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        let Some(mut record) = self.record.take() else { return };
        let usage = self.final_usage.take().or_else(|| self.tap.finish()).or(self.trailer_usage);
        // Broken off or abandoned: still bill the tokens the stream reported.
        if let (Some(charge), Some(usage)) = (record.token_charge.take(), usage) {
            charge.settle_in_background(usage.total_tokens);
        }
        if let Some(on_usage) = record.on_usage.take() {
            on_usage.call(
                usage.map(|u| TokenUsage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens }),
            );
        }
        let usage = if outcome == Outcome::Completed { usage } else { None };
        log_request_end(&record, self.first_byte, usage, outcome);
        record.metrics.request_finished(&record.model, record.started.elapsed().as_secs_f64());
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    /// SSE answers are coalesced: hyper's client hands the engine's events
    /// over one per poll (each wakes this task once), and passing each on
    /// alone costs the client connection one write per event. So data frames
    /// are kept while more follow at once: when the engine body has nothing
    /// ready, this body steps aside (wakes itself and returns Pending,
    /// `STEP_ASIDE_ROUNDS` times) so the engine connection can decode what it
    /// has already read, and passes the kept data on as one frame when there
    /// is still nothing new, or at `COALESCE_MAX_BYTES` / `COALESCE_MAX_FRAMES`.
    /// A token that arrives alone waits two scheduler rounds, never for the
    /// next token.
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(clock) = this.clock.clone() else { return this.poll_tracked(cx) };
        clock.polled();
        let polled = this.poll_tracked(cx);
        if let Poll::Ready(Some(_)) = polled {
            clock.handed_over();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // Only once accounting is done: reporting the engine's end-of-stream
        // early would let hyper drop the body before the last frame (held
        // for a TPM charge) is sent and before the request is accounted.
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.done { SizeHint::with_exact(0) } else { self.inner.size_hint() }
    }
}

impl TrackedBody {
    /// [`Body::poll_frame`] without the write watch's bookkeeping.
    fn poll_tracked(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(settling) = &mut this.settling {
                ready!(settling.as_mut().poll(cx));
                this.settling = None;
                this.finish(Outcome::Completed);
                // The engine's last frame was held back until the charge landed.
                return Poll::Ready(this.held_frame.take().map(Ok));
            }
            let polled = match this.next_frame.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => Pin::new(&mut this.inner).poll_frame(cx),
            };
            let polled = match polled {
                Poll::Pending if this.coalesced.is_empty() => return Poll::Pending,
                Poll::Pending if this.stepped_aside < STEP_ASIDE_ROUNDS => {
                    this.stepped_aside += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                // Still nothing after stepping aside: pass on what is kept.
                Poll::Pending => return Poll::Ready(Some(Ok(Frame::data(this.take_coalesced())))),
                Poll::Ready(polled) => polled,
            };
            match polled {
                Some(Ok(frame)) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            if this.first_byte.is_none()
                                && let Some(record) = &this.record
                            {
                                let elapsed = record.started.elapsed();
                                record.metrics.upstream_first_byte(&record.model, elapsed.as_secs_f64());
                                this.first_byte = Some(elapsed);
                            }
                            this.tap.observe(&data);
                            let end = this.inner.is_end_stream();
                            let data = this.for_client(data, end);
                            if this.sse && !end {
                                if data.is_empty() {
                                    continue;
                                }
                                this.coalesce(data);
                                if this.coalesced_len >= COALESCE_MAX_BYTES
                                    || this.coalesced.len() >= COALESCE_MAX_FRAMES
                                {
                                    return Poll::Ready(Some(Ok(Frame::data(this.take_coalesced()))));
                                }
                                continue;
                            }
                            if this.coalesced.is_empty() {
                                Frame::data(data)
                            } else {
                                this.coalesce(data);
                                Frame::data(this.take_coalesced())
                            }
                        }
                        // Trailers end the body: the usage filter's held
                        // line is passed on, and the kept data goes first.
                        Err(frame) if !this.coalesced.is_empty() || this.filter_holds() => {
                            let held = this.for_client(Bytes::new(), true);
                            if !held.is_empty() {
                                this.coalesce(held);
                            }
                            this.next_frame = Some(frame);
                            return Poll::Ready(Some(Ok(Frame::data(this.take_coalesced()))));
                        }
                        Err(frame) => {
                            if let Some(trailers) = frame.trailers_ref() {
                                this.trailer_usage = super::usage::usage_from_trailers(trailers);
                            }
                            frame
                        }
                    };
                    // A body with a known length ends with its last frame,
                    // and trailers always end a body: hyper will not poll
                    // again, so the response ends here.
                    if this.inner.is_end_stream() || frame.is_trailers() {
                        if let Some(settling) = this.start_settling() {
                            this.held_frame = Some(frame);
                            this.settling = Some(settling);
                            continue;
                        }
                        this.finish(Outcome::Completed);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Err(err)) => {
                    this.finish(Outcome::UpstreamBroken);
                    return if this.sse {
                        // The kept events, then the error event, in one frame.
                        this.coalesce(Bytes::from_static(SSE_UPSTREAM_ERROR));
                        Poll::Ready(Some(Ok(Frame::data(this.take_coalesced()))))
                    } else {
                        Poll::Ready(Some(Err(err)))
                    };
                }
                None => {
                    let held = this.for_client(Bytes::new(), true);
                    if !held.is_empty() {
                        this.coalesce(held);
                    }
                    // The kept data is the last frame (finish marks the body
                    // done, so hyper ends the response after it).
                    let last = (!this.coalesced.is_empty()).then(|| Frame::data(this.take_coalesced()));
                    if let Some(settling) = this.start_settling() {
                        this.settling = Some(settling);
                        this.held_frame = last;
                        continue;
                    }
                    this.finish(Outcome::Completed);
                    return Poll::Ready(last.map(Ok));
                }
            }
        }
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // The client left while the TPM charge was in flight: let it finish.
        if let Some(settling) = self.settling.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(settling);
        }
        if !self.done {
            let stalled = self.clock.as_ref().is_some_and(|clock| clock.stalled());
            self.finish(if stalled { Outcome::ClientStalled } else { Outcome::ClientGone });
        }
    }
}

/// What was decided about a request before it ended in an answer the
/// gateway made itself (an error, or `GET /v1/models`), for its request-end
/// line. Filled in phase by phase; what a request never reached stays empty.
#[derive(Debug, Default)]
pub struct RequestFacts {
    pub model: Option<Arc<str>>,
    pub profile: Option<String>,
    /// The strategy resolved (or asked for, when it is unknown).
    pub strategy: Option<String>,
    /// The pod chosen, or last tried.
    pub pod: Option<Arc<PodInfo>>,
    pub routing_time: Option<Duration>,
    /// The client the request is accounted to, and the connection's peer.
    pub client: Option<(crate::kernel::penalties::ClientAddr, std::net::SocketAddr)>,
}

/// The one "request end" line of a request the gateway answered itself,
/// with the same fields as a proxied request's (tokens are zero: no engine
/// answered) plus the error, where it came from, the path and the client
/// (behind a trusted proxy, the forwarded client and the proxy as `via`).
pub fn log_gateway_answer(
    request_id: &HeaderValue,
    facts: &RequestFacts,
    status: u16,
    error: Option<&GatewayError>,
    path: &str,
    started: Instant,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (client, via) = match facts.client {
        Some((client, peer)) if client.behind_proxy => (Some(client.ip.to_string()), Some(peer)),
        Some((_, peer)) => (Some(peer.to_string()), None),
        None => (None, None),
    };
    tracing::info!(
        target: "turnstile::access",
        request_id = request_id.to_str().unwrap_or(""),
        model = facts.model.as_deref().unwrap_or(crate::metrics::UNKNOWN_MODEL),
        profile = facts.profile.as_deref(),
        strategy = facts.strategy.as_deref(),
        pod = facts.pod.as_ref().map(|p| p.name.as_str()),
        pod_ip = facts.pod.as_ref().map(|p| p.addr_text.as_str()),
        status,
        outcome = if error.is_some() { "error" } else { "completed" },
        prompt_tokens = 0u64,
        completion_tokens = 0u64,
        total_tokens = 0u64,
        routing_ms = facts.routing_time.map(ms),
        total_ms = ms(started.elapsed()),
        path = %crate::errors::echo(path),
        client,
        via = via.map(tracing::field::display),
        origin = error.map(|e| tracing::field::debug(e.origin())),
        error = error.map(tracing::field::display),
        "request end"
    );
}

fn log_request_end(record: &RequestRecord, first_byte: Option<Duration>, usage: Option<Usage>, outcome: Outcome) {
    let usage = usage.unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::info!(
        target: "turnstile::access",
        request_id = record.request_id.to_str().unwrap_or(""),
        model = &*record.model,
        profile = %record.profile,
        strategy = record.strategy,
        pod = %record.pod.name,
        pod_ip = %record.pod.addr_text,
        status = record.status,
        outcome = outcome.as_str(),
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        total_tokens = usage.total_tokens,
        routing_ms = ms(record.routing_time),
        ttft_ms = first_byte.map(ms),
        total_ms = ms(record.started.elapsed()),
        "request end"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("authorization", HeaderValue::from_static("Bearer k"));
        headers.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-keep"]);
    }

    #[test]
    fn upstream_request_targets_pod_with_request_id() {
        let (parts, ()) = Request::builder()
            .method("POST")
            .uri("http://gateway:8888/v1/completions?x=1")
            .header(header::HOST, "gateway:8888")
            .header(header::CONTENT_LENGTH, "999")
            .header("user", "alice")
            .body(())
            .expect("request")
            .into_parts();
        let (pod, _) = crate::routing::test_support::pod(1, 0);
        let request = build_request(&parts, Bytes::from_static(b"{}"), &pod, &HeaderValue::from_static("rid-1"), None)
            .expect("built");
        assert_eq!(request.uri().to_string(), "http://127.0.0.1:9001/v1/completions?x=1");
        let pooled = build_request(&parts, Bytes::new(), &pod, &HeaderValue::from_static("rid-1"), Some(3)).unwrap();
        assert_eq!(pooled.uri().to_string(), "http://m3@127.0.0.1:9001/v1/completions?x=1");
        assert_eq!(request.headers()["content-length"], "2");
        assert_eq!(request.headers()["x-request-id"], "rid-1");
        assert_eq!(request.headers()["user"], "alice");
        assert!(request.headers().get(header::HOST).is_none());
        assert_eq!(request.version(), Version::HTTP_11);
    }
}
