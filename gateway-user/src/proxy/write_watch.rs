//! `--client-write-timeout-seconds`: releasing what a client that stopped
//! reading holds.
//!
//! A client that stops reading (a full TCP window on HTTP/1, a zero flow-
//! control window on HTTP/2) leaves its answers unsent, and with them the
//! engine requests behind them, for as long as it stays connected. hyper has
//! no write timeout, and while a response cannot be sent hyper does not poll
//! its body, so the body cannot time itself out. Instead each proxied body
//! keeps a [`BodyClock`] that says since when it has been the client's turn
//! (the body handed over a frame, or was never polled, and has not been
//! polled since), and its connection's [`WriteWatch`] checks those clocks
//! while any body is open. A body left waiting for the client longer than
//! the timeout closes the connection: hyper drops its answers, which cancels
//! their engine requests and logs them `client_stalled`.
//!
//! A body waiting on the engine (it returned `Pending`) is never the
//! client's fault: its clock does not run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
// tokio's clock: the same as std's in production, pausable in tests.
use tokio::time::Instant;

/// Milliseconds since the first clock was read (never 0: 0 means "not
/// waiting").
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
}

/// One proxied body's turn-taking with its client.
#[derive(Debug)]
pub struct BodyClock {
    /// Since when (see [`now_ms`]) it is the client's turn; 0 while the body
    /// is being polled or waits on the engine.
    client_turn_since: AtomicU64,
    /// Set when the watch gave up on the client.
    stalled: AtomicBool,
}

impl BodyClock {
    /// hyper polls the body: the client took what it was given.
    pub fn polled(&self) {
        self.client_turn_since.store(0, Ordering::Relaxed);
    }

    /// The body handed hyper a frame: the client's turn until the next poll.
    pub fn handed_over(&self) {
        self.client_turn_since.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the body ended because its client stopped reading.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

/// The clocks of one client connection's open bodies.
#[derive(Debug)]
pub struct WriteWatch {
    timeout: Duration,
    clocks: Mutex<Vec<Weak<BodyClock>>>,
    opened: Notify,
    /// When the connection last wrote bytes to its client (see [`now_ms`]):
    /// a client that reads slowly still reads, and a large answer waiting in
    /// hyper's write buffer is not the client stopping.
    last_write: AtomicU64,
    /// The connection ended: the watch stops.
    closed: AtomicBool,
}

impl WriteWatch {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            clocks: Mutex::new(Vec::new()),
            opened: Notify::new(),
            last_write: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The connection ended: [`Self::stalled`] returns `false` soon.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.opened.notify_one();
    }

    /// The connection wrote bytes to its client.
    pub fn wrote(&self) {
        self.last_write.store(now_ms(), Ordering::Relaxed);
    }

    /// A clock for a new body, running from now: the body has not been
    /// polled yet.
    pub fn register(&self) -> Arc<BodyClock> {
        let clock =
            Arc::new(BodyClock { client_turn_since: AtomicU64::new(now_ms()), stalled: AtomicBool::new(false) });
        let mut clocks = self.clocks.lock().unwrap_or_else(PoisonError::into_inner);
        clocks.retain(|c| c.strong_count() > 0);
        let was_idle = clocks.is_empty();
        clocks.push(Arc::downgrade(&clock));
        drop(clocks);
        // Only an idle watch waits to be told; a busy one looks on its own
        // schedule.
        if was_idle {
            self.opened.notify_one();
        }
        clock
    }

    /// `true` when a body of this connection has waited for the client
    /// longer than the timeout (the body is marked stalled); `false` once the
    /// connection is closed. Idle while no body is open; checks a few times
    /// per timeout while some are.
    pub async fn stalled(&self) -> bool {
        let tick = (self.timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let limit_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return false;
            }
            let open = {
                let mut clocks = self.clocks.lock().unwrap_or_else(PoisonError::into_inner);
                clocks.retain(|c| c.strong_count() > 0);
                let now = now_ms();
                let wrote = self.last_write.load(Ordering::Relaxed);
                let overdue = clocks.iter().filter_map(Weak::upgrade).find(|clock| {
                    let since = clock.client_turn_since.load(Ordering::Relaxed);
                    since != 0 && now.saturating_sub(since.max(wrote)) >= limit_ms
                });
                if let Some(clock) = overdue {
                    clock.stalled.store(true, Ordering::Relaxed);
                    return true;
                }
                !clocks.is_empty()
            };
            if open {
                tokio::time::sleep(tick).await;
            } else {
                self.opened.notified().await;
            }
        }
    }
}

/// A client connection's stream that tells its [`WriteWatch`] each time
/// bytes reach the socket.
#[derive(Debug)]
pub struct WatchedStream<S> {
    inner: S,
    watch: Option<Arc<WriteWatch>>,
}

impl<S> WatchedStream<S> {
    pub fn new(inner: S, watch: Option<Arc<WriteWatch>>) -> Self {
        Self { inner, watch }
    }

    fn wrote(&self, written: &Poll<std::io::Result<usize>>) {
        if let (Some(watch), Poll::Ready(Ok(1..))) = (&self.watch, written) {
            watch.wrote();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt as _;

    #[tokio::test(start_paused = true)]
    async fn only_a_body_left_waiting_on_its_client_trips_the_watch() {
        let watch = WriteWatch::new(Duration::from_secs(2));
        let engine_bound = watch.register();
        engine_bound.polled(); // waiting on the engine from now on
        let client_bound = watch.register();
        client_bound.polled();
        client_bound.handed_over();
        let stalled = watch.stalled();
        tokio::pin!(stalled);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(stalled.as_mut().now_or_never().is_none(), "not yet");
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(stalled.as_mut().now_or_never(), Some(true), "the watch gives up on the client");
        assert!(client_bound.stalled());
        assert!(!engine_bound.stalled(), "a body waiting on the engine is not the client's fault");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_still_reading_a_large_answer_is_not_cut() {
        let watch = WriteWatch::new(Duration::from_secs(2));
        let clock = watch.register();
        clock.polled();
        clock.handed_over(); // a large frame, drained from hyper's buffer bit by bit
        let stalled = watch.stalled();
        tokio::pin!(stalled);
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(1)).await;
            watch.wrote();
            assert!(stalled.as_mut().now_or_never().is_none(), "bytes still reach the client");
        }
        tokio::time::advance(Duration::from_millis(2100)).await;
        assert_eq!(stalled.as_mut().now_or_never(), Some(true), "then the client stops reading");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_never_polled_is_the_clients_turn() {
        let watch = WriteWatch::new(Duration::from_secs(1));
        let never_polled = watch.register();
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert_eq!(watch.stalled().now_or_never(), Some(true));
        assert!(never_polled.stalled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reading_client_and_closed_bodies_never_trip_it() {
        let watch = WriteWatch::new(Duration::from_millis(200));
        let clock = watch.register();
        let stalled = watch.stalled();
        tokio::pin!(stalled);
        for _ in 0..10 {
            clock.polled();
            clock.handed_over();
            tokio::time::advance(Duration::from_millis(60)).await;
            assert!(stalled.as_mut().now_or_never().is_none());
        }
        drop(clock);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(stalled.as_mut().now_or_never().is_none(), "no open body: nothing to wait for");
        watch.close();
        assert_eq!(stalled.as_mut().now_or_never(), Some(false), "the watch ends with its connection");
    }
}
