//! Accepting connections and serving HTTP/1.1 and h2c on them, with limits
//! on what a client may send and a graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::defaults;
use crate::errors::{self, GatewayError};
use crate::kernel::KernelAssist;
use crate::kernel::tagging::{ClientConn, TaggedStream};

/// HTTP/2 flow-control window of one request stream (hyper's default).
const H2_STREAM_WINDOW_BYTES: u32 = 1 << 20;
/// HTTP/2 flow-control window of a whole connection: four stalled streams'
/// worth. It bounds what one connection can have the gateway hold unread.
const H2_CONNECTION_WINDOW_BYTES: u32 = 4 << 20;
use crate::proxy::write_watch::{WatchedStream, WriteWatch};

/// What one client connection may send.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// A client must finish sending request headers within this time.
    pub header_read_timeout: Duration,
    /// Most header fields in one request (431 above).
    pub max_headers: usize,
    /// Largest read buffer, which bounds request line plus headers (431 above).
    pub max_header_bytes: usize,
    /// Longest request target (path and query) in bytes (414 above).
    pub max_uri_bytes: usize,
    /// Most concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
    /// A connection whose client leaves an answer unread this long is
    /// closed (see `write_watch`); `None`: never.
    pub client_write_timeout: Option<Duration>,
}

/// The flags' defaults, without the write watch (the admin listener's).
impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(defaults::HEADER_READ_TIMEOUT_SECONDS),
            max_headers: defaults::MAX_HEADERS,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            max_uri_bytes: defaults::MAX_URI_BYTES,
            max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            client_write_timeout: None,
        }
    }
}

/// Closes a connection's write watch when the connection's task ends.
struct CloseOnDrop(Arc<WriteWatch>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Length of a request target as the client sent it (origin or absolute form).
fn target_len(uri: &Uri) -> usize {
    let scheme = uri.scheme_str().map_or(0, |s| s.len() + 3);
    let authority = uri.authority().map_or(0, |a| a.as_str().len());
    scheme + authority + uri.path_and_query().map_or(0, |pq| pq.as_str().len())
}

/// The 414 answer for a request target over the limit.
fn uri_too_long<B>(limit_bytes: usize) -> Response<Either<Full<Bytes>, B>> {
    errors::respond(&GatewayError::UriTooLong { limit_bytes }).map(Either::Left)
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
        .max_concurrent_streams(limits.max_streams_per_connection.max(1))
        // An upload waiting for a pod holds up to a stream window unread;
        // the connection's window is larger so a few such streams do not
        // stop every other stream's body on the connection.
        .initial_stream_window_size(H2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(H2_CONNECTION_WINDOW_BYTES)
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
            Some(kernel) => Some(ClientConn(kernel.track_client(stream.as_raw_fd()))),
            None => None,
        };
        let _ = stream.set_nodelay(true);

        let handler = handler.clone();
        let first_request = CancellationToken::new();
        let request_seen = first_request.clone();
        let max_uri_bytes = limits.max_uri_bytes;
        let write_watch = limits.client_write_timeout.map(|timeout| Arc::new(WriteWatch::new(timeout)));
        let stream = TaggedStream::new(stream, conn.as_ref().map(|c| Arc::clone(&c.0)));
        let stream = WatchedStream::new(stream, write_watch.clone());
        let watch_for_requests = write_watch.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            request_seen.cancel();
            // hyper answers 431 for oversized heads itself, but only says 414
            // for targets past 64 KiB, which the head limit stops first.
            let response = if target_len(request.uri()) > max_uri_bytes {
                None
            } else {
                if let Some(conn) = &conn {
                    request.extensions_mut().insert(conn.clone());
                }
                if let Some(watch) = &watch_for_requests {
                    request.extensions_mut().insert(Arc::clone(watch));
                }
                // Boxed once here: the request's future is large (every phase's
                // state), and hyper moves the one it is given into place.
                Some(Box::pin(handler(request, peer)))
            };
            async move {
                Ok::<_, Infallible>(match response {
                    Some(response) => response.await.map(Either::Right),
                    None => uri_too_long(max_uri_bytes),
                })
            }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
        let first_request_deadline = limits.header_read_timeout;
        let watch_for_task = write_watch.clone();
        let connection_task = tokio::spawn(async move {
            let _close_watch = write_watch.map(CloseOnDrop);
            let mut connection = std::pin::pin!(connection);
            // hyper's header timeout starts once it reads a head, after the
            // HTTP/1-or-2 sniff, which waits for bytes without a limit: a
            // client that connects and sends nothing (or one byte of the h2
            // preface) would hold its socket forever. The first request's
            // head must therefore arrive within the header timeout of accept.
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = first_request.cancelled() => connection.await,
                () = tokio::time::sleep(first_request_deadline) => {
                    tracing::debug!(listener = name, client = %peer, "no request head within the header timeout; closing");
                    return;
                }
            };
            if let Err(err) = result {
                tracing::debug!(listener = name, client = %peer, error = %err, "connection ended with an error");
            }
        });
        // The write watch runs as a task of its own, so waking it as bodies
        // come and go never re-polls the connection. When a client stops
        // reading, it aborts the connection's task: dropping the connection
        // drops its unsent answers, which cancels their engine requests.
        if let Some(watch) = watch_for_task {
            let connection = connection_task.abort_handle();
            tokio::spawn(async move {
                if watch.stalled().await {
                    tracing::warn!(listener = name, client = %peer, "client stopped reading its answers; closing the connection");
                    connection.abort();
                }
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_length_counts_what_the_client_sent() {
        assert_eq!(target_len(&Uri::from_static("/v1/completions?x=1")), "/v1/completions?x=1".len());
        assert_eq!(target_len(&Uri::from_static("http://gw:8888/v1/models")), "http://gw:8888/v1/models".len());
        assert_eq!(target_len(&Uri::from_static("*")), 1);
    }
}
