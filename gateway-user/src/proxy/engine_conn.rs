//! The engine connections: HTTP/1.1 connections pooled per pod (and, with
//! kernel assist, per model, see `upstream_conn`), each driven by the
//! request that holds it.
//!
//! A pooled client that runs every connection in a task of its own hands
//! each request to that task, and each answer frame back: a round trip
//! between two tasks per frame, and for a stream a task to gather the
//! frames into one write. Here the request's own task polls the connection
//! while it waits for the answer's head and while it reads the body
//! ([`EngineBody`]): what the engine has sent is decoded and passed on in
//! the same poll, and a body that returns `Pending` means the engine has
//! sent nothing more, so an SSE burst is gathered without a task of its own.
//!
//! Between requests a connection waits in the pool, unpolled. Before it is
//! used again it is polled once, so one the engine has closed (or ended
//! with `Connection: close`) is dropped then. A request the engine closed a
//! reused connection on before it could be written is sent again on another
//! (the race of a keep-alive timeout), as hyper's pooled client does. At
//! most `max_idle_per_pod` connections wait per pool; one that waited the
//! idle timeout, or that the engine closed, goes at the next sweep
//! ([`SWEEP_EVERY`]).

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::upstream::{SendError, UpstreamBody};
use super::upstream_conn::TrackingConnector;
use crate::kernel::tagging::{ConnTag, TaggedStream, UpstreamConn};

/// How often idle connections are checked for the idle timeout and for an
/// engine that closed them.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

type Io = TokioIo<TaggedStream<TcpStream>>;
type Conn = Connection<Io, UpstreamBody>;

/// One engine connection: its sender and the connection itself, to drive.
struct Leased {
    sender: SendRequest<UpstreamBody>,
    /// `None` once the connection has ended (closed or broken). Boxed: a
    /// connection is moved in and out of its pool with each request, and
    /// hyper's is most of a kilobyte.
    conn: Option<Box<Conn>>,
    tag: Option<Arc<ConnTag>>,
    key: Arc<str>,
    /// Taken from the pool (an engine may have closed it meanwhile).
    reused: bool,
}

impl Leased {
    /// Polls the connection: `Ready` once it has ended, and it is then
    /// dropped (which answers any request still waiting on it).
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(conn) = &mut self.conn else { return Poll::Ready(()) };
        match Pin::new(&mut **conn).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(ended) => {
                if let Err(err) = ended {
                    tracing::debug!(pool = %self.key, error = %crate::logfmt::chain(&err), "engine connection ended");
                }
                self.conn = None;
                Poll::Ready(())
            }
        }
    }

    /// Polls the connection once without a task to wake: whether it can
    /// take a request now.
    fn ready_for_more(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx).is_pending() && self.sender.is_ready()
    }
}

/// A connection waiting in the pool.
struct Idle {
    leased: Leased,
    since: Instant,
}

struct PoolInner {
    connector: TrackingConnector,
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
    max_idle_per_pod: usize,
    idle_timeout: Duration,
}

impl PoolInner {
    fn idle(&self) -> MutexGuard<'_, HashMap<Arc<str>, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection of pool `key` that can take a
    /// request; the ones that cannot are closed.
    fn checkout(&self, key: &str) -> Option<Leased> {
        loop {
            // An emptied pool stays (the sweep drops it) for its connection to
            // come back to: no allocation per request, and no removal.
            let idle = self.idle().get_mut(key)?.pop()?;
            let Idle { mut leased, since } = idle;
            if since.elapsed() < self.idle_timeout && leased.ready_for_more() {
                leased.reused = true;
                return Some(leased);
            }
        }
    }

    /// Puts a connection whose exchange has ended back, when it can take
    /// another request and its pool has room; otherwise it is closed.
    fn checkin(&self, mut leased: Leased) {
        if !leased.ready_for_more() {
            return;
        }
        let mut pools = self.idle();
        let pool = pools.entry(Arc::clone(&leased.key)).or_default();
        if pool.len() < self.max_idle_per_pod {
            pool.push(Idle { leased, since: Instant::now() });
        } else {
            drop(pools);
            drop(leased);
        }
    }

    /// Closes the connections that waited the idle timeout or that their
    /// engine closed.
    /// The connections are looked at (and the closed ones closed) outside
    /// the lock that checkouts take.
    fn sweep(&self) {
        let mut swept = std::mem::take(&mut *self.idle());
        for pool in swept.values_mut() {
            pool.retain_mut(|idle| idle.since.elapsed() < self.idle_timeout && idle.leased.ready_for_more());
        }
        let mut pools = self.idle();
        for (key, kept) in swept {
            // Connections checked in meanwhile are the more recent: on top.
            let pool = pools.entry(Arc::clone(&key)).or_default();
            let room = self.max_idle_per_pod.saturating_sub(pool.len());
            let newer = std::mem::replace(pool, kept);
            let over = pool.len().saturating_sub(room);
            pool.drain(..over);
            pool.extend(newer);
            if pool.is_empty() {
                pools.remove(&key);
            }
        }
    }

    /// A new connection to the pod `target` names.
    async fn connect(&self, key: Arc<str>, target: Uri) -> Result<Leased, SendError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| tower::Service::<Uri>::poll_ready(&mut connector, cx))
            .await
            .map_err(|err| SendError::Connect(crate::logfmt::chain(&*err)))?;
        let io = tower::Service::call(&mut connector, target)
            .await
            .map_err(|err| SendError::Connect(crate::logfmt::chain(&*err)))?;
        let tag = io.inner().tag().cloned();
        let (sender, conn) =
            http1::handshake(io).await.map_err(|err| SendError::Connect(crate::logfmt::chain(&err)))?;
        Ok(Leased { sender, conn: Some(Box::new(conn)), tag, key, reused: false })
    }
}

/// The pool of engine connections.
#[derive(Clone)]
pub struct EnginePool {
    inner: Arc<PoolInner>,
}

impl EnginePool {
    /// A pool dialing through `connector`; within a runtime, its sweep runs
    /// until the pool is dropped.
    pub fn new(connector: TrackingConnector, max_idle_per_pod: usize, idle_timeout: Duration) -> Self {
        let inner = Arc::new(PoolInner {
            connector,
            idle: Mutex::default(),
            max_idle_per_pod: max_idle_per_pod.max(1),
            idle_timeout,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&inner);
            runtime.spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(pool) = weak.upgrade() else { return };
                    pool.sweep();
                }
            });
        }
        Self { inner }
    }

    /// Sends `request` (its URI names the pool: the pod's address, with the
    /// model id as user info) and drives the connection until the answer's
    /// head is in.
    pub async fn request(&self, mut request: Request<UpstreamBody>) -> Result<Response<EngineBody>, SendError> {
        let target = std::mem::take(request.uri_mut());
        let key: Arc<str> = Arc::from(target.authority().map_or("", |authority| authority.as_str()));
        to_origin_form(&mut request, &target);
        loop {
            let mut leased = match self.inner.checkout(&key) {
                Some(leased) => leased,
                None => self.inner.connect(Arc::clone(&key), target.clone()).await?,
            };
            let mut sending = pin!(leased.sender.try_send_request(request));
            let answered = poll_fn(|cx| {
                if let Poll::Ready(answered) = sending.as_mut().poll(cx) {
                    return Poll::Ready(answered);
                }
                // The connection writes the request and reads what came
                // back; if it ended, the request has been answered with why.
                let _ = leased.drive(cx);
                sending.as_mut().poll(cx)
            })
            .await;
            match answered {
                Ok(mut response) => {
                    if let Some(tag) = &leased.tag {
                        response.extensions_mut().insert(UpstreamConn(Arc::clone(tag)));
                    }
                    let pool = Arc::downgrade(&self.inner);
                    return Ok(response.map(|body| EngineBody { body, leased: Some(leased), pool }));
                }
                Err(mut failed) => match failed.take_message() {
                    // Not written: the engine had closed this pooled
                    // connection. Sent again on another.
                    Some(unsent) if leased.reused => request = unsent,
                    _ => return Err(SendError::Other(crate::logfmt::chain(failed.error()))),
                },
            }
        }
    }
}

/// The request as a client sends it on its own connection: the path alone,
/// and `Host` naming the pod (without the pool's user info).
fn to_origin_form(request: &mut Request<UpstreamBody>, target: &Uri) {
    let path = target.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    if request.headers().contains_key(header::HOST) {
        return;
    }
    let host = target.authority().map_or("", |authority| authority.as_str());
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    let host = host.strip_suffix(":80").unwrap_or(host);
    if let Ok(host) = HeaderValue::from_str(host) {
        request.headers_mut().insert(header::HOST, host);
    }
}

/// An engine answer's body, driving its connection while it is read. Once
/// the body has ended the connection goes back to the pool; a body dropped
/// before its end closes it.
pub struct EngineBody {
    body: Incoming,
    /// The connection, until the body has ended.
    leased: Option<Leased>,
    pool: Weak<PoolInner>,
}

impl EngineBody {
    /// The exchange is over: the connection goes back to the pool.
    fn release(&mut self) {
        if let (Some(leased), Some(pool)) = (self.leased.take(), self.pool.upgrade()) {
            pool.checkin(leased);
        }
    }
}

impl Body for EngineBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut drove = false;
        loop {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if this.body.is_end_stream() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(err))) => {
                    this.leased = None;
                    return Poll::Ready(Some(Err(err)));
                }
                // Nothing decoded: the connection reads what the engine has
                // sent, once. When that gives the body nothing, the engine
                // has sent nothing more (the connection wakes this task
                // when it does).
                Poll::Pending => match &mut this.leased {
                    Some(leased) if !drove => {
                        let _ = leased.drive(cx);
                        drove = true;
                    }
                    _ => return Poll::Pending,
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;
    use hyper_util::client::legacy::connect::HttpConnector;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::kernel::KernelAssist;
    use crate::kernel::penalties::PenaltySettings;

    /// A raw engine: for each request read on a connection it writes the
    /// next of `answers` (in one write), then, when the answer says so,
    /// closes it 20 ms later. Counts the connections it accepted and sends each request
    /// head it read.
    struct RawEngine {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        heads: mpsc::UnboundedReceiver<String>,
    }

    /// An answer, and whether the engine closes the connection after it.
    type Answer = (&'static str, bool);

    impl RawEngine {
        async fn start(answers: Vec<Answer>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let accepted = Arc::new(AtomicUsize::new(0));
            let (heads_tx, heads) = mpsc::unbounded_channel();
            let answers = Arc::new(Mutex::new(answers.into_iter()));
            let counted = Arc::clone(&accepted);
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let answers = Arc::clone(&answers);
                    let heads_tx = heads_tx.clone();
                    tokio::spawn(async move {
                        let mut read = Vec::new();
                        let mut buf = [0u8; 4096];
                        loop {
                            let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
                                match socket.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => read.extend_from_slice(&buf[..n]),
                                }
                                continue;
                            };
                            let head: Vec<u8> = read.drain(..end + 4).collect();
                            let _ = heads_tx.send(String::from_utf8_lossy(&head).into_owned());
                            let next = answers.lock().expect("answers").next();
                            let Some((answer, close)) = next else { return };
                            if socket.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            if close {
                                // Later, as a keep-alive timeout would: the
                                // connection is in the pool by then.
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                return;
                            }
                        }
                    });
                }
            });
            Self { addr, accepted, heads }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    /// Three SSE events in one write, chunked.
    const BURST: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
        6\r\ndata:1\r\n6\r\ndata:2\r\n6\r\ndata:3\r\n0\r\n\r\n";

    fn pool(max_idle: usize, idle_timeout: Duration) -> EnginePool {
        let kernel = KernelAssist::userspace_only(PenaltySettings::default(), Vec::new());
        EnginePool::new(TrackingConnector::new(HttpConnector::new(), kernel), max_idle, idle_timeout)
    }

    fn get(engine: &RawEngine, model: Option<u32>) -> Request<UpstreamBody> {
        let authority = super::super::upstream_conn::pool_authority(&engine.addr.to_string(), model);
        let mut request = Request::new(UpstreamBody::from(Bytes::new()));
        *request.uri_mut() = format!("http://{authority}/v1/models?x=1").parse().expect("uri");
        request
    }

    async fn body_text(response: Response<EngineBody>) -> String {
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Sends a request to `engine` and reads its whole answer, `ok`.
    async fn answered_ok(pool: &EnginePool, engine: &RawEngine, model: Option<u32>) {
        let response = pool.request(get(engine, model)).await.expect("answered");
        assert_eq!(body_text(response).await, "ok");
    }

    #[tokio::test]
    async fn a_connection_is_used_again_once_its_answer_is_read() {
        let mut engine = RawEngine::start(vec![(OK, false), (OK, false), (OK, false)]).await;
        let pool = pool(4, Duration::from_secs(30));
        for _ in 0..3 {
            let response = pool.request(get(&engine, Some(7))).await.expect("answered");
            assert!(response.extensions().get::<UpstreamConn>().is_some(), "the connection's tag rides along");
            assert_eq!(body_text(response).await, "ok");
        }
        assert_eq!(engine.accepted(), 1, "one connection for three requests in turn");
        // The pod gets the path alone, and its own address as Host (not the pool's model id).
        let head = engine.heads.recv().await.expect("head");
        assert!(head.starts_with("GET /v1/models?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains(&format!("host: {}\r\n", engine.addr)), "{head}");
    }

    #[tokio::test]
    async fn pools_are_kept_apart_by_model() {
        let engine = RawEngine::start(vec![(OK, false); 4]).await;
        let pool = pool(4, Duration::from_secs(30));
        for model in [Some(1), Some(2), Some(1), Some(2)] {
            answered_ok(&pool, &engine, model).await;
        }
        assert_eq!(engine.accepted(), 2, "a connection per model");
    }

    #[tokio::test]
    async fn an_answer_dropped_before_its_end_closes_its_connection() {
        const OPEN_ENDED: &str = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata:1\r\n";
        let engine = RawEngine::start(vec![(OPEN_ENDED, false), (OK, false)]).await;
        let pool = pool(4, Duration::from_secs(30));
        let mut response = pool.request(get(&engine, None)).await.expect("answered");
        let first = response.body_mut().frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "data:1");
        drop(response);
        answered_ok(&pool, &engine, None).await;
        assert_eq!(engine.accepted(), 2, "the half-read connection was not used again");
    }

    #[tokio::test]
    async fn a_connection_the_engine_closed_while_idle_is_not_used() {
        let engine = RawEngine::start(vec![(OK, true), (OK, false)]).await;
        let pool = pool(4, Duration::from_secs(30));
        answered_ok(&pool, &engine, None).await;
        // The engine closes the connection after its answer (without saying so).
        tokio::time::sleep(Duration::from_millis(50)).await;
        answered_ok(&pool, &engine, None).await;
        assert_eq!(engine.accepted(), 2);
    }

    #[tokio::test]
    async fn the_sweep_closes_idle_connections_the_engine_closed_and_keeps_the_others() {
        let closing = RawEngine::start(vec![(OK, true)]).await;
        let staying = RawEngine::start(vec![(OK, false)]).await;
        let pool = pool(4, Duration::from_secs(30));
        for engine in [&closing, &staying] {
            answered_ok(&pool, engine, None).await;
        }
        let idle = |pool: &EnginePool| pool.inner.idle().values().map(Vec::len).sum::<usize>();
        assert_eq!(idle(&pool), 2);
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.inner.sweep();
        let pools = pool.inner.idle();
        assert_eq!(pools.keys().map(|key| key.to_string()).collect::<Vec<_>>(), [staying.addr.to_string()]);
        assert_eq!(pools.values().map(Vec::len).sum::<usize>(), 1);
    }

    #[tokio::test]
    async fn an_emptied_pool_waits_for_its_connection_until_the_sweep() {
        let engine = RawEngine::start(vec![(OK, false)]).await;
        let pool = pool(4, Duration::from_secs(30));
        answered_ok(&pool, &engine, None).await;
        let key = engine.addr.to_string();
        let leased = pool.inner.checkout(&key).expect("the idle connection");
        assert_eq!(pool.inner.idle().get(key.as_str()).map(Vec::len), Some(0), "kept, empty, for the checkin");
        pool.inner.checkin(leased);
        assert_eq!(pool.inner.idle().get(key.as_str()).map(Vec::len), Some(1));
        drop(pool.inner.checkout(&key));
        pool.inner.sweep();
        assert!(pool.inner.idle().is_empty(), "the sweep drops empty pools");
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let engine = RawEngine::start(vec![(OK, false), (OK, false)]).await;
        let pool = pool(4, Duration::from_millis(100));
        answered_ok(&pool, &engine, None).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        answered_ok(&pool, &engine, None).await;
        assert_eq!(engine.accepted(), 2, "the idle connection had timed out");
    }

    #[tokio::test]
    async fn what_the_engine_sent_at_once_is_read_without_waiting() {
        let engine = RawEngine::start(vec![(BURST, false)]).await;
        let pool = pool(4, Duration::from_secs(30));
        let mut response = pool.request(get(&engine, None)).await.expect("answered");
        // Give the burst time to arrive whole, then read with a context
        // nobody wakes: every event and the end are there on the first try.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut cx = Context::from_waker(Waker::noop());
        let body = response.body_mut();
        let mut events = Vec::new();
        loop {
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => events.push(frame.into_data().expect("data")),
                Poll::Ready(None) => break,
                Poll::Ready(Some(Err(err))) => panic!("{err}"),
                Poll::Pending => panic!("waited with {events:?} read"),
            }
        }
        assert_eq!(events, ["data:1", "data:2", "data:3"]);
    }

    #[tokio::test]
    async fn a_pod_that_refuses_connections_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = pool(4, Duration::from_secs(30));
        let mut request = Request::new(UpstreamBody::from(Bytes::new()));
        *request.uri_mut() = format!("http://{addr}/").parse().expect("uri");
        assert!(matches!(pool.request(request).await, Err(SendError::Connect(_))));
    }
}
