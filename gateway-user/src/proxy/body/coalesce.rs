//! SSE coalescing: a burst of events the engine has already sent becomes one
//! write to the client, not one write per event.
//!
//! hyper's client hands the engine's events over one per poll (each wakes
//! the body's task once), and passing each on alone costs the client
//! connection one write per event. So data frames are kept while more follow
//! at once: when the engine body has nothing ready, this body steps aside
//! (wakes itself and returns `Pending`, [`STEP_ASIDE_ROUNDS`] times) so the
//! engine connection can decode what it has already read, and passes the
//! kept data on as one frame when there is still nothing new, or at
//! [`MAX_BYTES`] / [`MAX_FRAMES`]. A token that arrives alone waits two
//! scheduler rounds, never for the next token.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// Most bytes merged into one frame.
const MAX_BYTES: usize = 16 * 1024;
/// Most engine frames merged into one.
const MAX_FRAMES: usize = 64;
/// Scheduler rounds the body waits for the engine connection's next event
/// before passing on what it keeps. Measured: after one round the engine
/// connection has not yet passed on the event it already read (so nothing
/// merged: one client write per event); after two it has (a 16-token stream
/// sent at once becomes one write, and proxy CPU per streamed request fell by
/// more than half).
const STEP_ASIDE_ROUNDS: u8 = 2;

type Polled<E> = Option<Result<Frame<Bytes>, E>>;

/// A body whose data frames are merged while more follow at once (when
/// `on`; otherwise frames pass as they come).
pub struct Coalesced<B: Body> {
    inner: B,
    on: bool,
    kept: Vec<Bytes>,
    kept_len: usize,
    /// Scheduler rounds stepped aside since the last engine frame.
    stepped_aside: u8,
    /// Trailers or an error that arrived behind kept data, passed on next.
    stashed: Option<Result<Frame<Bytes>, B::Error>>,
    /// The engine body has ended; only kept data is left.
    inner_done: bool,
}

impl<B: Body<Data = Bytes>> Coalesced<B> {
    pub fn new(inner: B, on: bool) -> Self {
        Self { inner, on, kept: Vec::new(), kept_len: 0, stepped_aside: 0, stashed: None, inner_done: false }
    }

    fn keep(&mut self, data: Bytes) {
        self.stepped_aside = 0;
        if !data.is_empty() {
            self.kept_len += data.len();
            self.kept.push(data);
        }
    }

    fn is_full(&self) -> bool {
        self.kept_len >= MAX_BYTES || self.kept.len() >= MAX_FRAMES
    }

    /// The kept data as one frame (copied only when there are several
    /// pieces: a few kilobytes, against a write and a wake-up per piece).
    fn take_kept(&mut self) -> Option<Frame<Bytes>> {
        self.kept_len = 0;
        let data = match self.kept.len() {
            0 => return None,
            1 => self.kept.pop().unwrap_or_default(),
            _ => {
                let mut merged = BytesMut::with_capacity(self.kept.iter().map(Bytes::len).sum());
                for piece in self.kept.drain(..) {
                    merged.extend_from_slice(&piece);
                }
                merged.freeze()
            }
        };
        Some(Frame::data(data))
    }

    /// The engine has nothing ready: step aside, or pass on what is kept.
    fn nothing_ready(&mut self, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        if self.kept.is_empty() {
            return Poll::Pending;
        }
        if self.stepped_aside < STEP_ASIDE_ROUNDS {
            self.stepped_aside += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.take_kept().map(Ok))
    }

    /// Kept data goes before `next` (trailers or an error).
    fn kept_then(&mut self, next: Result<Frame<Bytes>, B::Error>) -> Poll<Polled<B::Error>> {
        match self.take_kept() {
            Some(kept) => {
                self.stashed = Some(next);
                Poll::Ready(Some(Ok(kept)))
            }
            None => Poll::Ready(Some(next)),
        }
    }
}

impl<B: Body<Data = Bytes, Error: Unpin> + Unpin> Body for Coalesced<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        let this = self.get_mut();
        if let Some(next) = this.stashed.take() {
            return Poll::Ready(Some(next));
        }
        if !this.on {
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        loop {
            if this.inner_done {
                return Poll::Ready(this.take_kept().map(Ok));
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return this.nothing_ready(cx),
                Poll::Ready(None) => {
                    this.inner_done = true;
                    continue;
                }
                Poll::Ready(Some(Err(err))) => return this.kept_then(Err(err)),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => this.keep(data),
                Err(frame) => return this.kept_then(Ok(frame)),
            }
            if this.inner.is_end_stream() || this.is_full() {
                return Poll::Ready(this.take_kept().map(Ok));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stashed.is_none() && self.kept.is_empty() && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

    #[tokio::test]
    async fn a_long_burst_is_cut_at_the_frame_cap() {
        let events: Vec<Step> = (0..MAX_FRAMES + 3).map(|_| Step::data("x")).collect();
        let (frames, _) = drain(Coalesced::new(Scripted::new(events), true)).await;
        assert_eq!(frames.iter().map(String::len).collect::<Vec<_>>(), [MAX_FRAMES, 3]);
    }
}
