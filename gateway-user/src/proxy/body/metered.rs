//! Token usage on the way through: every frame is shown to the usage tap,
//! the usage chunk the gateway asked for on the client's behalf is taken
//! out, and when the user has a TPM limit the answer's tokens are charged
//! before the end of the body reaches the client, so the client's next
//! request already sees them. An answer that breaks off, or whose client
//! goes away, is charged in the background for the tokens it reported.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::limits::{Settling, TokenCharge};
use crate::proxy::usage::{self, Usage, UsageChunkFilter, UsageTap};

type Polled<E> = Option<Result<Frame<Bytes>, E>>;

/// Bills an answer's tokens (the user's TPM) once its usage is known.
pub trait Charge: Send + 'static {
    /// Charges `tokens`; the body's last frame waits for it.
    fn settle(self: Box<Self>, tokens: u64) -> Settling;
}

impl Charge for TokenCharge {
    fn settle(self: Box<Self>, tokens: u64) -> Settling {
        TokenCharge::settle(*self, tokens)
    }
}

/// Charges in the background: the answer has ended without waiting for it.
fn settle_in_background(charge: Box<dyn Charge>, tokens: u64) {
    if tokens > 0
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        runtime.spawn(charge.settle(tokens));
    }
}

/// What the usage layer knows of an answer, for the layer that ends it.
pub trait UsageSource {
    /// The answer's usage as far as it was read; the tap is spent by it.
    fn usage(&mut self) -> Option<Usage>;

    /// When the engine's first data arrived (before any TPM charge held it).
    fn first_data(&self) -> Option<Instant>;
}

enum State {
    Streaming,
    /// The engine's body ended; its last frame waits for the TPM charge.
    Ending(Option<Settling>),
    Done,
}

/// The usage layer over an engine body.
pub struct Metered<B> {
    inner: B,
    tap: UsageTap,
    /// Takes out the usage chunk the gateway asked for.
    filter: Option<UsageChunkFilter>,
    trailer_usage: Option<Usage>,
    /// The usage once read at the end (`Some(None)`: read, none found).
    read: Option<Option<Usage>>,
    charge: Option<Box<dyn Charge>>,
    state: State,
    /// The body's last frame, held while the charge lands.
    last: Option<Frame<Bytes>>,
    /// Trailers that arrived while the filter held a line, passed on next.
    stashed: Option<Frame<Bytes>>,
    first_data: Option<Instant>,
}

impl<B: Body<Data = Bytes>> Metered<B> {
    pub fn new(inner: B, tap: UsageTap, filter: Option<UsageChunkFilter>, charge: Option<Box<dyn Charge>>) -> Self {
        Self {
            inner,
            tap,
            filter,
            trailer_usage: None,
            read: None,
            charge,
            state: State::Streaming,
            last: None,
            stashed: None,
            first_data: None,
        }
    }

    /// What of the engine's `data` the client receives; at the `end` of the
    /// body, with whatever the filter still held.
    fn for_client(&mut self, data: Bytes, end: bool) -> Bytes {
        let Some(filter) = &mut self.filter else { return data };
        let kept = filter.filter(&data);
        if !end {
            return kept;
        }
        match filter.finish() {
            rest if rest.is_empty() => kept,
            rest => [kept, rest].concat().into(),
        }
    }

    /// The body ends with `last`: starts the TPM charge, if any.
    fn end_with(&mut self, last: Option<Frame<Bytes>>) {
        let tokens = self.usage().map(|u| u.total_tokens);
        let settling = match (self.charge.take(), tokens) {
            (Some(charge), Some(tokens)) => Some(charge.settle(tokens)),
            _ => None,
        };
        self.last = last;
        self.state = State::Ending(settling);
    }

    /// One frame from the engine.
    fn on_frame(&mut self, frame: Frame<Bytes>) -> Option<Poll<Polled<B::Error>>> {
        let trailers = match frame.into_data() {
            Ok(data) => {
                self.first_data.get_or_insert_with(Instant::now);
                self.tap.observe(&data);
                let end = self.inner.is_end_stream();
                let data = self.for_client(data, end);
                if end {
                    self.end_with(Some(Frame::data(data)));
                    return None;
                }
                return (!data.is_empty()).then_some(Poll::Ready(Some(Ok(Frame::data(data)))));
            }
            Err(trailers) => trailers,
        };
        // Trailers end the body; a line the filter held goes first.
        if let Some(map) = trailers.trailers_ref() {
            self.trailer_usage = usage::usage_from_trailers(map);
        }
        let held = self.for_client(Bytes::new(), true);
        if held.is_empty() {
            self.end_with(Some(trailers));
            return None;
        }
        self.stashed = Some(trailers);
        Some(Poll::Ready(Some(Ok(Frame::data(held)))))
    }
}

impl<B> UsageSource for Metered<B> {
    fn usage(&mut self) -> Option<Usage> {
        *self.read.get_or_insert_with(|| self.tap.finish().or(self.trailer_usage))
    }

    fn first_data(&self) -> Option<Instant> {
        self.first_data
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Metered<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Ending(settling) => {
                    if let Some(settling) = settling {
                        ready!(settling.as_mut().poll(cx));
                    }
                    this.state = State::Done;
                    return Poll::Ready(this.last.take().map(Ok));
                }
                State::Streaming => {}
            }
            if let Some(trailers) = this.stashed.take() {
                this.end_with(Some(trailers));
                continue;
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    let held = this.for_client(Bytes::new(), true);
                    this.end_with((!held.is_empty()).then(|| Frame::data(held)));
                }
                Some(Err(err)) => {
                    this.abandon();
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(err)));
                }
                Some(Ok(frame)) => {
                    if let Some(ready) = this.on_frame(frame) {
                        return ready;
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() { SizeHint::with_exact(0) } else { self.inner.size_hint() }
    }
}

impl<B> Metered<B> {
    /// The layer below.
    pub(super) fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// The answer broke off or its client left: bill what it reported.
    fn abandon(&mut self) {
        if let Some(charge) = self.charge.take()
            && let Some(usage) = self.usage()
        {
            settle_in_background(charge, usage.total_tokens);
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        // The client left while the charge was in flight: let it land.
        if let State::Ending(Some(settling)) = std::mem::replace(&mut self.state, State::Done)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(settling);
        }
        self.abandon();
    }
}
