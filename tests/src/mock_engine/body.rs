//! Response bodies: a whole buffer, or a token stream that produces each server-sent event
//! when its token is due and hands it to hyper as its own frame.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::connection::{ConnectionAborted, ResetSwitch};
use super::generation::Generation;
use super::lora::AdapterRequest;
use super::openai::{Completion, SSE_DONE, Usage};
use super::stats::InFlight;

/// The body of every response the engine sends.
pub enum MockBody {
    /// A complete body; `None` once sent.
    Full(Option<Bytes>),
    /// Server-sent events of a streaming completion.
    Stream(Box<TokenStream>),
}

impl MockBody {
    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// No body.
    pub fn empty() -> Self {
        Self::Full(None)
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = ConnectionAborted;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ConnectionAborted>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            MockBody::Stream(stream) => stream.poll_event(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(bytes) => bytes.is_none(),
            MockBody::Stream(stream) => matches!(stream.next, Next::Finished),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64)),
            MockBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// What a stream sends next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Token,
    Usage,
    Done,
    Finished,
}

/// A streaming completion: one event per token, an optional usage event, then `[DONE]`.
pub struct TokenStream {
    generation: Generation,
    completion: Completion,
    include_usage: bool,
    reset: Option<StreamReset>,
    events_sent: u32,
    next: Next,
    /// The request's counts, ended with the stream.
    _in_flight: (InFlight, Option<AdapterRequest>),
}

/// The `reset_after_chunks` fault, armed on one stream.
struct StreamReset {
    after_events: u32,
    switch: ResetSwitch,
    flushed: bool,
}

impl TokenStream {
    /// A stream of `generation`'s tokens shaped as `completion`; with `reset`, the
    /// connection is reset after that many events. The request stays in flight (on its
    /// LoRA adapter, if any) until the stream is dropped.
    pub fn new(
        generation: Generation,
        completion: Completion,
        include_usage: bool,
        reset: Option<(u32, ResetSwitch)>,
        in_flight: (InFlight, Option<AdapterRequest>),
    ) -> Self {
        Self {
            generation,
            completion,
            include_usage,
            reset: reset.map(|(after_events, switch)| StreamReset { after_events, switch, flushed: false }),
            events_sent: 0,
            next: Next::Token,
            _in_flight: in_flight,
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ConnectionAborted>>> {
        if let Some(reset) = &mut self.reset
            && self.events_sent >= reset.after_events
            && self.next != Next::Finished
        {
            if !reset.flushed {
                // hyper discards what it has buffered when a body fails; returning Pending
                // once lets it flush the events already sent, and the wake brings it back
                // at once.
                reset.flushed = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return Poll::Ready(Some(Err(reset.switch.trigger())));
        }
        let event = loop {
            match self.next {
                Next::Token => match ready!(self.generation.poll_next_token(cx)) {
                    Some(index) => break self.completion.token_event(index),
                    None => {
                        self.next = if self.include_usage { Next::Usage } else { Next::Done };
                    }
                },
                Next::Usage => {
                    self.next = Next::Done;
                    let usage =
                        Usage::new(self.generation.prompt_tokens(), u64::from(self.generation.completion_tokens()));
                    break self.completion.usage_event(usage);
                }
                Next::Done => {
                    self.next = Next::Finished;
                    break Bytes::from_static(SSE_DONE);
                }
                Next::Finished => return Poll::Ready(None),
            }
        };
        self.events_sent += 1;
        Poll::Ready(Some(Ok(Frame::data(event))))
    }
}
