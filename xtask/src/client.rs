//! A small HTTP client for the demo and readiness checks: every call has a timeout and
//! collects the whole answer, except [`Client::send_streaming`], which hands back the body.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A whole HTTP answer.
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The full body.
    pub body: Bytes,
    /// From sending the request to the last body byte.
    pub elapsed: Duration,
}

impl Reply {
    /// A response header as text, `-` when absent.
    pub fn header(&self, name: &str) -> String {
        header_text(&self.headers, name)
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A header as text, `-` when absent.
pub fn header_text(headers: &HeaderMap, name: &str) -> String {
    headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or("-").to_owned()
}

/// A pooled keep-alive HTTP/1.1 client.
#[derive(Clone)]
pub struct Client {
    inner: LegacyClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// A new client with connection pooling.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self { inner: LegacyClient::builder(TokioExecutor::new()).build(connector) }
    }

    /// GET `http://addr/path`, whole answer within `timeout`.
    pub async fn get(&self, addr: SocketAddr, path: &str, timeout: Duration) -> Result<Reply> {
        let request =
            Request::builder().method(Method::GET).uri(format!("http://{addr}{path}")).body(Full::new(Bytes::new()))?;
        self.send(request, timeout).await
    }

    /// POST a JSON body to `http://addr/path` with extra headers, whole answer within `timeout`.
    pub async fn post_json(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Reply> {
        let request = json_request(addr, path, headers, body)?;
        self.send(request, timeout).await
    }

    /// Sends `request` (see [`json_request`]) and returns as soon as the response head arrives
    /// (within `timeout`), leaving the body to be read as it streams.
    pub async fn send_streaming(&self, request: Request<Full<Bytes>>, timeout: Duration) -> Result<Response<Incoming>> {
        let uri = request.uri().clone();
        tokio::time::timeout(timeout, self.inner.request(request))
            .await
            .map_err(|_| anyhow!("no response head from {uri} within {timeout:?}"))?
            .with_context(|| format!("POST {uri}"))
    }

    async fn send(&self, request: Request<Full<Bytes>>, timeout: Duration) -> Result<Reply> {
        let started = Instant::now();
        let description = format!("{} {}", request.method(), request.uri());
        let exchange = async {
            let response = self.inner.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok((parts, body))
        };
        let (parts, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| anyhow!("{description}: no full answer within {timeout:?}"))?
            .with_context(|| description.clone())?;
        Ok(Reply { status: parts.status, headers: parts.headers, body, elapsed: started.elapsed() })
    }
}

/// A POST of a JSON body to `http://addr/path` with extra headers.
pub fn json_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Result<Request<Full<Bytes>>> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header(CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok(builder.body(Full::new(Bytes::from(body.to_string())))?)
}
