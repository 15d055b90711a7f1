//! The engines behind the gateway, as one trait: send a request to a pod
//! and get its answer's head, or why not. [`HttpUpstream`] is the pooled
//! HTTP/1.1 client production uses; tests put a fake in its place.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;

use super::engine_conn::{EngineBody, EnginePool};
use super::form::UploadBody;
use super::upstream_conn::TrackingConnector;
use crate::discovery::PodInfo;
use crate::errors::GatewayError;
use crate::kernel::KernelAssist;
use crate::traces::TraceHeaders;

/// Where requests are sent: one engine request in, its answer's head out.
pub trait Upstream: Send + Sync + 'static {
    /// The answer's body.
    type Body: Body<Data = Bytes, Error: Into<BoxError> + std::fmt::Display + Send + Sync + Unpin>
        + Send
        + Unpin
        + 'static;

    /// Whether reading [`Self::Body`] drives the engine connection itself
    /// (so a body that returns `Pending` has nothing more buffered anywhere,
    /// and SSE bursts are gathered in the reader's task, without a pump).
    const BODY_DRIVES_CONNECTION: bool = false;

    /// Sends `request` (its URI names the pod) and waits for the answer's
    /// head, within the response timeout.
    fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<Response<Self::Body>, SendError>> + Send;
}

/// An error of any body or transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request to a pod: one the gateway holds whole, or an upload
/// streaming from the client.
pub enum UpstreamBody {
    Whole(Full<Bytes>),
    Upload(UploadBody),
}

impl From<Bytes> for UpstreamBody {
    fn from(bytes: Bytes) -> Self {
        Self::Whole(Full::new(bytes))
    }
}

impl From<UploadBody> for UpstreamBody {
    fn from(upload: UploadBody) -> Self {
        Self::Upload(upload)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Whole(full) => std::pin::Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
            Self::Upload(upload) => std::pin::Pin::new(upload).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Whole(full) => full.is_end_stream(),
            Self::Upload(upload) => upload.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Whole(full) => full.size_hint(),
            Self::Upload(upload) => upload.size_hint(),
        }
    }
}

/// Pooled HTTP/1.1 client to engine pods ([`super::engine_conn`]).
#[derive(Clone)]
pub struct HttpUpstream {
    pool: EnginePool,
    response_timeout: Duration,
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

/// Headers that describe one hop and must not be forwarded (RFC 9110 7.6.1),
/// plus the ones the gateway sets itself.
/// (Names, not strings: a lookup by string parses and classifies the name
/// each time, twelve times per request.)
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Engine response headers that describe the engine's software, not the
/// answer: dropped so clients see one gateway, not its backends.
const ENGINE_INTERNAL: [HeaderName; 3] = [header::SERVER, HeaderName::from_static("x-powered-by"), header::VIA];

/// Prepares an engine's response headers for the client: hop-by-hop ones
/// and the ones naming the engine's software go; the OpenAI, rate-limit and
/// content headers stay.
pub fn clean_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in &ENGINE_INTERNAL {
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
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

impl HttpUpstream {
    /// The pooled client, registering each new pod connection with kernel
    /// assist (when given) so the proxy can tag it with its model.
    pub fn new(settings: &UpstreamSettings, kernel: Arc<KernelAssist>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let pool = EnginePool::new(
            TrackingConnector::new(connector, kernel),
            settings.max_connections_per_pod,
            settings.idle_timeout,
        );
        Self { pool, response_timeout: settings.response_timeout }
    }
}

impl Upstream for HttpUpstream {
    type Body = EngineBody;

    const BODY_DRIVES_CONNECTION: bool = true;

    async fn send(&self, request: Request<UpstreamBody>) -> Result<Response<EngineBody>, SendError> {
        let upload = match request.body() {
            UpstreamBody::Upload(upload) => Some(Arc::clone(upload.state())),
            UpstreamBody::Whole(_) => None,
        };
        let answer = self.pool.request(request);
        tokio::pin!(answer);
        if let Some(upload) = upload {
            // An upload streams while the client sends it (bounded by the
            // idle timeout between its chunks); the wait for the answer
            // starts once it is all sent.
            tokio::select! {
                answered = &mut answer => return answered,
                () = upload.sent() => {}
            }
        }
        match tokio::time::timeout(self.response_timeout, answer).await {
            Ok(answered) => answered,
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

/// The request for `pod`: the client's method, path and headers (less the
/// hop-by-hop ones), `body`, and the request id; over the pod's connection
/// pool for model id `pool` when given (see `upstream_conn`). The length is
/// the body's (an upload of unknown length goes chunked).
pub fn build_request(
    parts: &http::request::Parts,
    body: impl Into<UpstreamBody>,
    pod: &PodInfo,
    request_id: &HeaderValue,
    pool: Option<u32>,
    trace: Option<TraceHeaders>,
) -> Result<Request<UpstreamBody>, String> {
    let body = body.into();
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
    // The client's `Expect: 100-continue` was answered when its body was
    // first read; the pod gets the body at once.
    headers.remove(header::EXPECT);
    match body.size_hint().exact() {
        Some(length) => headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length)),
        None => headers.remove(header::CONTENT_LENGTH),
    };
    headers.insert(HeaderName::from_static("x-request-id"), request_id.clone());
    if let Some(TraceHeaders { traceparent, tracestate }) = trace {
        // The gateway's span is the engine's parent; a client's own
        // `tracestate` goes on with it (the propagator kept it).
        headers.insert(HeaderName::from_static("traceparent"), traceparent);
        match tracestate {
            Some(state) => headers.insert(HeaderName::from_static("tracestate"), state),
            None => headers.remove("tracestate"),
        };
    }
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(request)
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
            .header(header::EXPECT, "100-continue")
            .body(())
            .expect("request")
            .into_parts();
        let (pod, _) = crate::routing::test_support::pod(1, 0);
        let request =
            build_request(&parts, Bytes::from_static(b"{}"), &pod, &HeaderValue::from_static("rid-1"), None, None)
                .expect("built");
        assert_eq!(request.uri().to_string(), "http://127.0.0.1:9001/v1/completions?x=1");
        let pooled =
            build_request(&parts, Bytes::new(), &pod, &HeaderValue::from_static("rid-1"), Some(3), None).unwrap();
        assert_eq!(pooled.uri().to_string(), "http://m3@127.0.0.1:9001/v1/completions?x=1");
        assert_eq!(request.headers()["content-length"], "2");
        assert_eq!(request.headers()["x-request-id"], "rid-1");
        assert_eq!(request.headers()["user"], "alice");
        assert!(request.headers().get(header::HOST).is_none());
        assert!(request.headers().get(header::EXPECT).is_none(), "answered by the gateway");
        assert_eq!(request.version(), Version::HTTP_11);
    }
}
