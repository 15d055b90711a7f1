//! Accepting connections and serving HTTP/1.1 and h2c on them, with limits
//! on what a client may send and a graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::kernel::KernelAssist;
use crate::kernel::tagging::{ClientConn, Side, TaggedStream};

/// What one client connection may send.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// A client must finish sending request headers within this time.
    pub header_read_timeout: Duration,
    /// Most header fields in one request (431 above).
    pub max_headers: usize,
    /// Largest read buffer, which bounds request line plus headers.
    pub max_header_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(10), max_headers: 100, max_header_bytes: 64 * 1024 }
    }
}

/// Serves `handler` on every connection `listener` accepts until `shutdown`
/// fires; then stops accepting and waits up to `grace` for open connections
/// (and the responses streaming on them) to finish.
pub async fn serve<H, F, B>(
    name: &'static str,
    listener: TcpListener,
    limits: HttpLimits,
    handler: H,
    shutdown: CancellationToken,
    grace: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_tracked(name, listener, limits, handler, shutdown, grace, None).await;
}

/// [`serve`] with kernel assist: a penalised client's connection is closed
/// right after accept, and every other one is tracked; its [`ClientConn`]
/// travels in each request's extensions so the proxy can tag the socket with
/// the request's model.
pub async fn serve_tracked<H, F, B>(
    name: &'static str,
    listener: TcpListener,
    limits: HttpLimits,
    handler: H,
    shutdown: CancellationToken,
    grace: Duration,
    kernel: Option<Arc<KernelAssist>>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                // Out of file descriptors and similar: back off instead of
                // spinning, and keep serving the connections already open.
                tracing::warn!(listener = name, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = match &kernel {
            Some(kernel) if !kernel.admit(peer.ip()) => {
                // Penalised: closed before anything is read, with a reset
                // (no TIME_WAIT left behind).
                let _ = stream.set_zero_linger();
                continue;
            }
            Some(kernel) => Some(ClientConn(kernel.track(stream.as_raw_fd(), Side::Client))),
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let stream = TaggedStream::new(stream, conn.as_ref().map(|c| Arc::clone(&c.0)));
        let handler = handler.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            if let Some(conn) = &conn {
                request.extensions_mut().insert(conn.clone());
            }
            let response = handler(request, peer);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(listener = name, client = %peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(
            listener = name,
            connections = open,
            grace_seconds = grace.as_secs(),
            "draining open connections"
        );
    }
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = name, "all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = name, "grace period over; closing remaining connections"),
    }
}
