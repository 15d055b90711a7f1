//! The end of a proxied request, however it comes: the answer completes, the
//! engine breaks off, or the client goes away (or stops reading). Exactly
//! once it writes the access-log line, counts the request finished, tells
//! the routing strategy the answer's usage and releases what the request
//! held (the pod's in-flight slot, its connection slot, the gateway's slot).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::metered::UsageSource;
use crate::discovery::InFlightGuard;
use crate::metrics::{AibrixStatus, InFlightMetric, Metrics};
use crate::proxy::access_log::{AccessRecord, Ending, Outcome};
use crate::proxy::write_watch::BodyClock;
use crate::proxy::{ConnectionSlot, InFlightSlot};
use crate::routing::{TokenUsage, UsageCallback};
use crate::traces::{AnswerEnd, AnswerTrace};

type Polled<E> = Option<Result<Frame<Bytes>, E>>;

/// What a proxied request holds until its answer ends.
#[derive(Default)]
pub struct Held {
    /// The pod's in-flight count, which strategies read.
    pub pod: Option<InFlightGuard>,
    /// The model's in-flight gauge.
    pub gauge: Option<InFlightMetric>,
    /// One of the pod's `--max-connections-per-pod` slots.
    pub connection: Option<ConnectionSlot>,
    /// One of the gateway's `--max-in-flight` slots.
    pub gateway: Option<InFlightSlot>,
}

/// Everything needed to account for a request once its answer ends.
pub struct EndRecord {
    pub metrics: Arc<Metrics>,
    pub access: AccessRecord,
    pub status: u16,
    pub held: Held,
    /// Tells the routing strategy the answer's usage (`vtc-basic`).
    pub on_usage: Option<UsageCallback>,
    /// The request's spans (tracing on), ended with the answer.
    pub trace: Option<Box<AnswerTrace>>,
}

/// The request-end layer.
pub struct RequestEnd<B: UsageSource> {
    inner: B,
    /// Taken when the request is accounted.
    record: Option<EndRecord>,
    first_byte: Option<Duration>,
    /// Says whether a client that went away had stopped reading.
    clock: Option<Arc<BodyClock>>,
}

impl<B: UsageSource> RequestEnd<B> {
    /// The layer below.
    pub(super) fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    pub fn new(inner: B, record: EndRecord, clock: Option<Arc<BodyClock>>) -> Self {
        Self { inner, record: Some(record), first_byte: None, clock }
    }

    fn mark_first_byte(&mut self) {
        if self.first_byte.is_some() {
            return;
        }
        if let Some(record) = &mut self.record {
            // Timed when the engine sent it, not when a TPM charge let it go.
            let at = self.inner.first_data().unwrap_or_else(Instant::now);
            if let Some(trace) = &mut record.trace {
                trace.first_byte(at);
            }
            let elapsed = at.saturating_duration_since(record.access.started);
            record.metrics.upstream_first_byte(&record.access.model_label(), elapsed.as_secs_f64());
            self.first_byte = Some(elapsed);
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        let Some(record) = self.record.take() else { return };
        let usage = self.inner.usage();
        if let Some(on_usage) = record.on_usage {
            on_usage.call(
                usage.map(|u| TokenUsage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens }),
            );
        }
        let usage = if outcome == Outcome::Completed { usage } else { None };
        if let Some(trace) = record.trace {
            trace.finish(&AnswerEnd {
                status: record.status,
                outcome: outcome.as_str(),
                upstream_broken: outcome == Outcome::UpstreamBroken,
                usage: usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            });
        }
        let ending =
            Ending { status: record.status, outcome: Some(outcome), usage, first_byte: self.first_byte, error: None };
        record.access.write(&ending);
        let model = record.access.model_label();
        record.metrics.request_finished(&model, record.access.started.elapsed().as_secs_f64());
        if let Some(aibrix) = record.metrics.aibrix() {
            let pod = record.access.pod.as_ref();
            aibrix.outcome(&model, pod, aibrix_status(outcome, record.status), record.status);
            if let (Some(pod), Some(usage)) = (pod, usage) {
                aibrix.tokens(pod, usage.prompt_tokens, usage.completion_tokens);
            }
        }
        // `record.held` is dropped here: the slots are free from now.
    }
}

/// AIBrix's `status` for a proxied answer that ended as `outcome`.
fn aibrix_status(outcome: Outcome, status: u16) -> AibrixStatus {
    match outcome {
        Outcome::Completed if (200..300).contains(&status) => AibrixStatus::Success,
        Outcome::Completed | Outcome::Error => AibrixStatus::ResponseHeadersFail,
        Outcome::UpstreamBroken => AibrixStatus::ResponseBodyFail,
        Outcome::ClientGone => AibrixStatus::ClientCancelled,
        Outcome::ClientStalled => AibrixStatus::ContextCancelled,
    }
}

impl<B: Body<Data = Bytes> + UsageSource + Unpin> Body for RequestEnd<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        let this = self.get_mut();
        let Poll::Ready(polled) = Pin::new(&mut this.inner).poll_frame(cx) else { return Poll::Pending };
        match &polled {
            Some(Ok(frame)) => {
                if frame.is_data() {
                    this.mark_first_byte();
                }
                if this.inner.is_end_stream() || frame.is_trailers() {
                    this.finish(Outcome::Completed);
                }
            }
            Some(Err(_)) => this.finish(Outcome::UpstreamBroken),
            None => this.finish(Outcome::Completed),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        // Only once accounted: reporting the engine's end early would let
        // hyper drop the body before its last frame and its accounting.
        self.record.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.record.is_none() { SizeHint::with_exact(0) } else { self.inner.size_hint() }
    }
}

impl<B: UsageSource> Drop for RequestEnd<B> {
    fn drop(&mut self) {
        if self.record.is_some() {
            let stalled = self.clock.as_ref().is_some_and(|clock| clock.stalled());
            self.finish(if stalled { Outcome::ClientStalled } else { Outcome::ClientGone });
        }
    }
}
