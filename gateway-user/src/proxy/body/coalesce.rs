//! SSE coalescing: a burst of events the engine has already sent becomes one
//! write to the client, not one write per event.
//!
//! hyper's client hands the engine's events over one per poll: each event is
//! a round trip between the engine connection's task and the task that reads
//! the body. When that reader is the client connection's task, every event
//! polls the whole client connection (its read side, the layers, its write
//! side), and passing each event on alone costs a write per event. So the
//! engine body is read here while it has data ready; once it makes the reader
//! wait, it moves to a small task of its own, the pump, which takes the
//! events as the engine connection decodes them, steps aside
//! [`STEP_ASIDE_ROUNDS`] scheduler rounds when nothing is ready (so the
//! engine connection can decode what it has already read), and only then
//! wakes the client's task, once per burst, with everything it holds. A
//! token that arrives alone waits two rounds of the pump, never for the next
//! token. The pump holds at most [`MAX_BYTES`] / [`MAX_FRAMES`] before the
//! client takes them (then it stops reading the engine until it does), and
//! stops (dropping the engine body, which ends the engine exchange) when the
//! client's body is dropped.
//!
//! The production engine body drives its own connection while it is read
//! (`proxy::engine_conn`): there no task stands between the engine's bytes
//! and the reader, a `Pending` means the engine has sent nothing more, and
//! the body is always read here ([`Coalesced::read_inline`]), what it had
//! ready passed on as one frame. The pump serves bodies fed by another task.
//!
//! [`Coalesced::gather`] waits for the first burst before the answer's head
//! goes out, so that a stream the engine has already sent leaves in one
//! write, head and body together, instead of the head alone first.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// Most bytes merged into one frame.
const MAX_BYTES: usize = 16 * 1024;
/// Most engine frames merged into one.
const MAX_FRAMES: usize = 64;
/// Scheduler rounds the pump waits for the engine connection's next event
/// before passing on what it holds. Measured: after one round the engine
/// connection has not always passed on the event it already read; after two
/// it has (a 16-token stream sent at once becomes one write).
const STEP_ASIDE_ROUNDS: u8 = 2;

type Polled<E> = Option<Result<Frame<Bytes>, E>>;

/// Data frames kept to be passed on as one.
#[derive(Default)]
struct Kept {
    pieces: Vec<Bytes>,
    len: usize,
}

impl Kept {
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.pieces.push(data);
        }
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    fn is_full(&self) -> bool {
        self.len >= MAX_BYTES || self.pieces.len() >= MAX_FRAMES
    }

    /// The kept data as one frame (copied only when there are several
    /// pieces: a few kilobytes, against a write and a wake-up per piece).
    fn take(&mut self) -> Option<Frame<Bytes>> {
        self.len = 0;
        let data = match self.pieces.len() {
            0 => return None,
            1 => self.pieces.pop().unwrap_or_default(),
            _ => {
                let mut merged = BytesMut::with_capacity(self.pieces.iter().map(Bytes::len).sum());
                for piece in self.pieces.drain(..) {
                    merged.extend_from_slice(&piece);
                }
                merged.freeze()
            }
        };
        Some(Frame::data(data))
    }
}

/// What the pump and the client's body share.
struct Shared<E> {
    /// The burst the pump is reading.
    kept: Kept,
    /// Bursts the pump has ended, each one frame, for the reader to take
    /// one at a time.
    sealed: VecDeque<Bytes>,
    /// Bytes in `sealed`.
    sealed_len: usize,
    /// How the engine body ended, once it has: `Ok(None)` its end,
    /// `Ok(Some(_))` trailers, or its error; passed on after the data.
    end: Option<Result<Option<Frame<Bytes>>, E>>,
    /// The pump waits on the engine: what it holds is all there is for now.
    parked: bool,
    /// The client's task, waiting for a burst.
    reader: Option<Waker>,
    /// The reader waits for the first burst or for the engine to make it wait.
    gathering: bool,
    /// The pump's waker, to stop it when the reader goes (and to go on
    /// once the reader takes what it holds).
    pump: Option<Waker>,
    /// The pump holds all it may and waits for the reader to take some.
    pump_waits_for_room: bool,
    /// The client's body is gone: the pump stops.
    reader_gone: bool,
    /// The pump task ended without an end to pass on (its runtime shut
    /// down): the reader ends the body rather than wait forever.
    pump_gone: bool,
}

impl<E> Shared<E> {
    /// Ends the burst being read: the reader may take it.
    fn seal(&mut self) {
        if let Some(Ok(burst)) = self.kept.take().map(Frame::into_data) {
            self.sealed_len += burst.len();
            self.sealed.push_back(burst);
        }
    }

    /// The pump holds as much as it may.
    fn is_full(&self) -> bool {
        self.sealed_len >= MAX_BYTES || self.sealed.len() >= MAX_FRAMES
    }

    fn wake_reader(&mut self) {
        if let Some(waker) = self.reader.take() {
            waker.wake();
        }
    }

    /// Keeps the pump's current waker.
    fn pump_waker(&mut self, cx: &Context<'_>) {
        if !self.pump.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            self.pump = Some(cx.waker().clone());
        }
    }
}

type SharedRef<E> = Arc<Mutex<Shared<E>>>;

fn lock<E>(shared: &SharedRef<E>) -> MutexGuard<'_, Shared<E>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the engine body is read.
enum Source<B: Body> {
    /// In the client's task (while the engine has data ready, and always
    /// when coalescing is off or there is no runtime to run a pump).
    Here(B),
    /// In the pump.
    Pumped(SharedRef<B::Error>),
}

/// A body whose data frames are merged while more follow at once (when
/// `on`; otherwise frames pass as they come).
pub struct Coalesced<B: Body> {
    source: Source<B>,
    on: bool,
    /// A body that makes the reader wait moves to a pump (see
    /// [`Coalesced::read_inline`]).
    pump: bool,
    /// Data read here, not yet passed on.
    kept: Kept,
    /// What [`Coalesced::gather`] read here, passed on first.
    gathered: Option<Polled<B::Error>>,
    /// Trailers or an error that arrived behind kept data, passed on next.
    stashed: Option<Result<Frame<Bytes>, B::Error>>,
    /// Data was read ahead of the reader: the engine body's size hint no
    /// longer says what is left.
    read_ahead: bool,
    /// The engine body has ended (read here); only kept data is left.
    inner_done: bool,
}

impl<B> Coalesced<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Send + Unpin + 'static,
{
    pub fn new(inner: B, on: bool) -> Self {
        Self {
            source: Source::Here(inner),
            on,
            pump: true,
            kept: Kept::default(),
            gathered: None,
            stashed: None,
            read_ahead: false,
            inner_done: false,
        }
    }

    /// The engine body drives its connection when it is read (so `Pending`
    /// means the engine has sent nothing more): it is always read here, and
    /// what it had ready is passed on when it makes the reader wait.
    pub fn read_inline(&mut self) {
        self.pump = false;
    }

    /// Kept data goes before `next` (trailers or an error).
    fn kept_then(&mut self, next: Result<Frame<Bytes>, B::Error>) -> Poll<Polled<B::Error>> {
        match self.kept.take() {
            Some(kept) => {
                self.stashed = Some(next);
                Poll::Ready(Some(Ok(kept)))
            }
            None => Poll::Ready(Some(next)),
        }
    }

    /// Reads the engine body here while it has data ready. `Ready` with a
    /// frame to pass on (or the end); `Pending` once the engine made it wait
    /// (the body is then in the pump, or waits here without a runtime).
    fn poll_here(&mut self, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        loop {
            if self.inner_done {
                return Poll::Ready(self.kept.take().map(Ok));
            }
            let Source::Here(inner) = &mut self.source else { return Poll::Pending };
            let frame = match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Pending => return self.hand_over(cx),
                Poll::Ready(None) => {
                    self.inner_done = true;
                    continue;
                }
                Poll::Ready(Some(Err(err))) => return self.kept_then(Err(err)),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => self.kept.push(data),
                Err(frame) => return self.kept_then(Ok(frame)),
            }
            if inner.is_end_stream() || self.kept.is_full() {
                if inner.is_end_stream() {
                    self.inner_done = true;
                }
                return Poll::Ready(self.kept.take().map(Ok));
            }
        }
    }

    /// The engine made the body wait: it moves to a pump, with what was kept.
    fn hand_over(&mut self, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        let runtime = tokio::runtime::Handle::try_current().ok().filter(|_| self.pump);
        let Some(runtime) = runtime else {
            // Read inline, or no runtime to pump in: pass on what is kept,
            // then wait here.
            return match self.kept.take() {
                Some(kept) => Poll::Ready(Some(Ok(kept))),
                None => Poll::Pending,
            };
        };
        let shared = Arc::new(Mutex::new(Shared {
            kept: std::mem::take(&mut self.kept),
            sealed: VecDeque::new(),
            sealed_len: 0,
            end: None,
            parked: false,
            reader: Some(cx.waker().clone()),
            gathering: false,
            pump: None,
            pump_waits_for_room: false,
            reader_gone: false,
            pump_gone: false,
        }));
        let Source::Here(inner) = std::mem::replace(&mut self.source, Source::Pumped(Arc::clone(&shared))) else {
            return Poll::Pending;
        };
        runtime.spawn(pump(inner, shared));
        Poll::Pending
    }

    /// Takes what the pump holds, once it is ready to be passed on.
    fn poll_pumped(shared: &SharedRef<B::Error>, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        let mut state = lock(shared);
        if let Some(burst) = state.sealed.pop_front() {
            state.sealed_len -= burst.len();
            if std::mem::take(&mut state.pump_waits_for_room)
                && let Some(pump) = &state.pump
            {
                pump.wake_by_ref();
            }
            return Poll::Ready(Some(Ok(Frame::data(burst))));
        }
        if state.end.is_none() && state.pump_gone {
            return Poll::Ready(None);
        }
        if state.end.is_none() {
            state.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        match state.end.take() {
            Some(Ok(Some(trailers))) => {
                // What follows the trailers: the end.
                state.end = Some(Ok(None));
                Poll::Ready(Some(Ok(trailers)))
            }
            Some(Err(err)) => {
                state.end = Some(Ok(None));
                Poll::Ready(Some(Err(err)))
            }
            Some(Ok(None)) | None => {
                state.end = Some(Ok(None));
                Poll::Ready(None)
            }
        }
    }

    /// Waits until the answer's first burst is in (or the engine makes the
    /// body wait with nothing sent yet), so the head and the first burst
    /// leave together. A body read whole here, or not coalesced, is ready at once.
    pub fn gather(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if !self.on || self.gathered.is_some() || self.stashed.is_some() || self.inner_done {
                return Poll::Ready(());
            }
            if let Source::Here(_) = self.source {
                self.read_ahead = true;
                if let Poll::Ready(polled) = self.poll_here(cx) {
                    // Read here: passed on first.
                    self.gathered = Some(polled);
                    return Poll::Ready(());
                }
            }
            let Source::Pumped(shared) = &self.source else { return Poll::Ready(()) };
            let mut state = lock(shared);
            if !state.sealed.is_empty() || state.end.is_some() || state.parked {
                state.gathering = false;
                return Poll::Ready(());
            }
            state.gathering = true;
            state.reader = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

/// The pump: reads `inner` into `shared` until it ends or the reader goes.
async fn pump<B>(mut inner: B, shared: SharedRef<B::Error>)
where
    B: Body<Data = Bytes> + Unpin,
{
    /// Ends the reader's wait if the pump is dropped before it ends.
    struct Gone<E>(SharedRef<E>);
    impl<E> Drop for Gone<E> {
        fn drop(&mut self) {
            let mut state = lock(&self.0);
            if state.end.is_none() {
                state.pump_gone = true;
                state.wake_reader();
            }
        }
    }
    let _gone = Gone(Arc::clone(&shared));
    let mut stepped_aside = 0u8;
    std::future::poll_fn(|cx| {
        loop {
            {
                let mut state = lock(&shared);
                if state.reader_gone {
                    return Poll::Ready(());
                }
                if state.kept.is_full() {
                    state.seal();
                }
                if state.is_full() {
                    // The reader has not taken what is held: wait for it.
                    state.pump_waker(cx);
                    state.pump_waits_for_room = true;
                    state.wake_reader();
                    return Poll::Pending;
                }
            }
            let polled = Pin::new(&mut inner).poll_frame(cx);
            let mut state = lock(&shared);
            match polled {
                Poll::Pending => {
                    if !state.kept.is_empty() && stepped_aside < STEP_ASIDE_ROUNDS {
                        stepped_aside += 1;
                        state.pump_waker(cx);
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    // Waiting on the engine: a reader that goes must be able to stop it.
                    state.pump_waker(cx);
                    state.parked = true;
                    state.seal();
                    if !state.sealed.is_empty() || state.gathering {
                        state.wake_reader();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    stepped_aside = 0;
                    state.parked = false;
                    match frame.into_data() {
                        Ok(data) => state.kept.push(data),
                        Err(trailers) => state.end = Some(Ok(Some(trailers))),
                    }
                    if state.end.is_none() && inner.is_end_stream() {
                        state.end = Some(Ok(None));
                    }
                }
                Poll::Ready(Some(Err(err))) => state.end = Some(Err(err)),
                Poll::Ready(None) => state.end = Some(Ok(None)),
            }
            if state.end.is_some() {
                state.seal();
                state.wake_reader();
                return Poll::Ready(());
            }
        }
    })
    .await;
}

impl<B> Body for Coalesced<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Send + Unpin + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        let this = self.get_mut();
        if let Some(gathered) = this.gathered.take() {
            return Poll::Ready(gathered);
        }
        if let Some(next) = this.stashed.take() {
            return Poll::Ready(Some(next));
        }
        if !this.on {
            return match &mut this.source {
                Source::Here(inner) => Pin::new(inner).poll_frame(cx),
                Source::Pumped(_) => Poll::Ready(None),
            };
        }
        match &this.source {
            Source::Here(_) => this.poll_here(cx),
            Source::Pumped(shared) => Self::poll_pumped(shared, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.gathered {
            Some(None) => return true,
            Some(Some(_)) => return false,
            None => {}
        }
        if self.stashed.is_some() || !self.kept.is_empty() {
            return false;
        }
        match &self.source {
            Source::Here(inner) => self.inner_done || inner.is_end_stream(),
            Source::Pumped(shared) => {
                let state = lock(shared);
                state.sealed.is_empty() && matches!(state.end, Some(Ok(None)))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        // Once data was read ahead (gathered, or moved to the pump), the
        // engine body's hint no longer counts it: an exact hint would then
        // contradict the answer's content-length, which stands instead.
        match &self.source {
            Source::Here(inner) if !self.read_ahead => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl<B: Body> Drop for Coalesced<B> {
    fn drop(&mut self) {
        if let Source::Pumped(shared) = &self.source {
            let mut state = shared.lock().unwrap_or_else(PoisonError::into_inner);
            state.reader_gone = true;
            // The pump may wait on the engine: wake it to stop and drop the engine body.
            if let Some(pump) = state.pump.take() {
                pump.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::body::scripted::{Scripted, Step, drain};

    #[tokio::test]
    async fn a_burst_sent_at_once_becomes_one_frame() {
        let events: Vec<Step> = (0..5).map(|i| Step::data(format!("data: {i}\n\n"))).collect();
        let body = Coalesced::new(Scripted::new(events), true);
        let (frames, end) = drain(body).await;
        assert_eq!(frames, ["data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"]);
        assert!(end.is_ok());
    }

    #[tokio::test]
    async fn events_that_arrive_apart_stay_apart_and_off_passes_frames_through() {
        let script = || vec![Step::data("a"), Step::Wait, Step::data("b"), Step::data("c")];
        let (frames, _) = drain(Coalesced::new(Scripted::new(script()), true)).await;
        assert_eq!(frames, ["a", "bc"], "a token that arrives alone is not held for the next");
        let (frames, _) = drain(Coalesced::new(Scripted::new(script()), false)).await;
        assert_eq!(frames, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn kept_data_goes_before_trailers_and_errors() {
        let body = Scripted::new(vec![Step::data("a"), Step::data("b"), Step::trailers("usage", "{}")]);
        let (frames, end) = drain(Coalesced::new(body, true)).await;
        assert_eq!(frames, ["ab", "<trailers>"]);
        assert!(end.is_ok());
        let body = Scripted::new(vec![Step::data("a"), Step::data("b"), Step::Fail]);
        let (frames, end) = drain(Coalesced::new(body, true)).await;
        assert_eq!(frames, ["ab"]);
        assert!(end.is_err(), "the break still reaches the layer above");
    }

    /// A body that says when it is dropped.
    struct Watched(Scripted, Arc<std::sync::atomic::AtomicBool>);

    impl Body for Watched {
        type Data = Bytes;
        type Error = <Scripted as Body>::Error;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<Self::Error>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
    }

    impl Drop for Watched {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_client_that_goes_while_the_engine_is_quiet_ends_the_engine_body() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = Watched(Scripted::new(vec![Step::data("a"), Step::Hang]), Arc::clone(&dropped));
        let mut body = Coalesced::new(engine, true);
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert_eq!(first.and_then(|f| f.ok()).and_then(|f| f.into_data().ok()), Some(Bytes::from("a")));
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst), "the pump waits on the engine");
        drop(body);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "the engine body went with the client");
    }

    #[tokio::test]
    async fn what_gather_read_keeps_its_order_and_the_length_the_head_says() {
        let script = vec![Step::data("a"), Step::data("b"), Step::Fail];
        let mut body = Coalesced::new(Scripted::sized(script), true);
        let exact = body.size_hint().exact();
        assert_eq!(exact, Some(2));
        body.gather().await;
        assert_eq!(body.size_hint().exact(), None, "read ahead: the content-length header stands");
        let (frames, end) = drain(body).await;
        assert_eq!(frames, ["ab"], "the data before the break");
        assert!(end.is_err());

        // A stream the engine already sent whole is read by gather, head and body together.
        let events: Vec<Step> = (0..3).map(|i| Step::data(format!("data: {i}\n\n"))).collect();
        let mut body = Coalesced::new(Scripted::new(events), true);
        body.gather().await;
        let (frames, end) = drain(body).await;
        assert_eq!(frames, ["data: 0\n\ndata: 1\n\ndata: 2\n\n"]);
        assert!(end.is_ok());
    }

    #[tokio::test]
    async fn gather_returns_when_the_engine_has_sent_nothing_yet() {
        let mut body = Coalesced::new(Scripted::new(vec![Step::Hang]), true);
        tokio::time::timeout(std::time::Duration::from_secs(5), body.gather()).await.expect("the head is not held");
        let mut body = Coalesced::new(Scripted::new(vec![Step::Wait, Step::data("late")]), true);
        body.gather().await;
        let (frames, _) = drain(body).await;
        assert_eq!(frames, ["late"]);
    }

    #[tokio::test]
    async fn a_long_burst_is_cut_at_the_frame_cap() {
        let events: Vec<Step> = (0..MAX_FRAMES + 3).map(|_| Step::data("x")).collect();
        let (frames, _) = drain(Coalesced::new(Scripted::new(events), true)).await;
        assert_eq!(frames.iter().map(String::len).collect::<Vec<_>>(), [MAX_FRAMES, 3]);
    }
}
