//! The engine's answer on its way to the client, as a stack of body layers,
//! each doing one thing over any `B: Body`:
//!
//! ```text
//! engine body ─▶ Coalesced ─▶ Metered ─▶ RequestEnd ─▶ ErrorShaped ─▶ SseErrorEvent ─▶ Clocked ─▶ client
//!                (SSE bursts   (usage tap,  (access log,   (an engine's   (a break as an   (turn-taking for
//!                 as one write, TPM settle)  metrics, slots) error in the   SSE error event) the write watch)
//!                 read by a pump)
//!                                                           OpenAI shape)
//! ```
//!
//! Frames pass through without buffering or copies, except that an SSE
//! burst is merged into one frame and an error answer (not 2xx, not SSE) is
//! held to its end to be shaped.

mod coalesce;
pub mod error_shape;
mod metered;
mod request_end;
#[cfg(test)]
pub mod scripted;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub use coalesce::Coalesced;
pub use error_shape::ErrorShaped;
pub use metered::{Charge, Metered, UsageSource};
pub use request_end::{EndRecord, Held, RequestEnd};

use super::usage::{self, UsageChunkFilter, UsageTap};
use super::write_watch::BodyClock;

type Polled<E> = Option<Result<Frame<Bytes>, E>>;

/// The whole stack over an engine body `B`.
pub type ResponseBody<B> = Clocked<SseErrorEvent<ErrorShaped<RequestEnd<Metered<Coalesced<B>>>>>>;

/// What the layers need to know about an answer.
#[derive(Default)]
pub struct AnswerShape<'a> {
    /// The engine's error status when its answer is to be shaped
    /// ([`error_shape::shapes`], decided once by the caller, which also
    /// fixes the headers).
    pub shaped_error: Option<http::StatusCode>,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    /// The gateway asked for a usage chunk the client did not: it is
    /// counted, then left out of what the client gets. An encoded answer
    /// (gzip) is passed on as it came, usage chunk included.
    pub hide_usage_chunk: bool,
}

/// Stacks the layers over an engine's answer body.
pub fn response_body<B: Body<Data = Bytes, Error: Unpin + Send> + Send + Unpin + 'static>(
    inner: B,
    shape: &AnswerShape<'_>,
    charge: Option<Box<dyn Charge>>,
    record: EndRecord,
    clock: Option<Arc<BodyClock>>,
) -> ResponseBody<B> {
    let sse = shape.content_type.is_some_and(|ct| ct.starts_with("text/event-stream"));
    let encoded = usage::is_encoded(shape.content_encoding);
    let tap = UsageTap::for_response(shape.content_type, shape.content_encoding);
    let filter = (sse && shape.hide_usage_chunk && !encoded).then(UsageChunkFilter::default);
    let metered = Metered::new(Coalesced::new(inner, sse), tap, filter, charge);
    let ended = RequestEnd::new(metered, record, clock.clone());
    let shaped = ErrorShaped::new(ended, shape.shaped_error);
    Clocked { inner: SseErrorEvent { inner: shaped, sse, ended: false }, clock }
}

/// Waits until the answer's first burst is in, so the answer's head and
/// what the engine has already sent leave in one write (see
/// [`Coalesced::gather`]).
pub async fn gather<B>(body: &mut ResponseBody<B>)
where
    B: Body<Data = Bytes, Error: Unpin + Send> + Send + Unpin + 'static,
{
    body.inner.inner.inner_mut().inner_mut().inner_mut().gather().await;
}

/// The engine body drives its own connection: it is read in the client's
/// task, never moved to a pump (see [`Coalesced::read_inline`]).
pub fn read_inline<B>(body: &mut ResponseBody<B>)
where
    B: Body<Data = Bytes, Error: Unpin + Send> + Send + Unpin + 'static,
{
    body.inner.inner.inner_mut().inner_mut().inner_mut().read_inline();
}

/// Sent to a streaming client when the engine breaks off mid-stream, so the
/// client sees why its stream ended instead of a silent truncation.
pub const SSE_UPSTREAM_ERROR: &[u8] = b"data: {\"error\":{\"message\":\"upstream connection lost mid-stream\",\"type\":\"api_error\",\"code\":\"upstream_error\",\"param\":null}}\n\n";

/// Ends an SSE answer whose engine broke off with an error event, and
/// cleanly; other answers pass the break on (the client sees a reset).
pub struct SseErrorEvent<B> {
    inner: B,
    sse: bool,
    ended: bool,
}

impl<B: Body<Data = Bytes> + Unpin> Body for SseErrorEvent<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(_))) if self.sse => {
                self.ended = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(SSE_UPSTREAM_ERROR)))))
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reports turn-taking with the client to its connection's write watch:
/// polled (the client took what it was given), handed over (the client's
/// turn).
pub struct Clocked<B> {
    inner: B,
    clock: Option<Arc<BodyClock>>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Clocked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Polled<B::Error>> {
        let this = &mut *self;
        let Some(clock) = &this.clock else { return Pin::new(&mut this.inner).poll_frame(cx) };
        clock.polled();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(_)) = polled {
            clock.handed_over();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::oneshot;

    use super::scripted::{CapturedLog, Scripted, Step, drain};
    use super::*;
    use crate::discovery::PodInfo;
    use crate::kernel::penalties::ClientAddr;
    use crate::limits::Settling;
    use crate::metrics::Metrics;
    use crate::proxy::access_log::AccessRecord;
    use crate::routing::{TokenUsage, UsageCallback};

    const CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";
    const SSE: AnswerShape<'static> = AnswerShape {
        shaped_error: None,
        content_type: Some("text/event-stream"),
        content_encoding: None,
        hide_usage_chunk: true,
    };

    /// A TPM charge that records what it bills, and lands when `gate` opens.
    struct TestCharge {
        billed: Arc<Mutex<Vec<u64>>>,
        gate: Option<oneshot::Receiver<()>>,
    }

    impl Charge for TestCharge {
        fn settle(self: Box<Self>, tokens: u64) -> Settling {
            Box::pin(async move {
                if let Some(gate) = self.gate {
                    let _ = gate.await;
                }
                self.billed.lock().map(|mut b| b.push(tokens)).unwrap_or(());
            })
        }
    }

    /// One request through the stack: its pod, what it billed, and what
    /// routing was told.
    struct Fixture {
        pod: Arc<PodInfo>,
        billed: Arc<Mutex<Vec<u64>>>,
        told: Arc<Mutex<Vec<Option<TokenUsage>>>>,
    }

    impl Fixture {
        fn new() -> Self {
            Self { pod: crate::routing::test_support::pod(0, 0).0, billed: Arc::default(), told: Arc::default() }
        }

        fn body(
            &self,
            steps: Scripted,
            shape: &AnswerShape<'_>,
            gate: Option<oneshot::Receiver<()>>,
        ) -> ResponseBody<Scripted> {
            self.clocked_body(steps, shape, gate, None)
        }

        fn clocked_body(
            &self,
            steps: Scripted,
            shape: &AnswerShape<'_>,
            gate: Option<oneshot::Receiver<()>>,
            clock: Option<Arc<BodyClock>>,
        ) -> ResponseBody<Scripted> {
            let mut access = AccessRecord::new(
                http::HeaderValue::from_static("rid-1"),
                "/v1/chat/completions",
                ClientAddr { ip: [127, 0, 0, 1].into(), behind_proxy: false },
                ([127, 0, 0, 1], 5000).into(),
            );
            access.model = Some(Arc::from("m"));
            access.pod = Some(Arc::clone(&self.pod));
            let told = Arc::clone(&self.told);
            let record = EndRecord {
                metrics: Arc::new(Metrics::new()),
                access,
                status: 200,
                held: Held { pod: Some(self.pod.load.start()), ..Held::default() },
                on_usage: Some(UsageCallback::new(move |usage| told.lock().map(|mut t| t.push(usage)).unwrap_or(()))),
                trace: None,
            };
            let charge = TestCharge { billed: Arc::clone(&self.billed), gate };
            response_body(steps, shape, Some(Box::new(charge)), record, clock)
        }

        fn billed(&self) -> Vec<u64> {
            self.billed.lock().map(|b| b.clone()).unwrap_or_default()
        }

        fn told(&self) -> Vec<Option<TokenUsage>> {
            self.told.lock().map(|t| t.clone()).unwrap_or_default()
        }
    }

    fn sse(steps: Vec<Step>) -> Scripted {
        Scripted::new(steps)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_completed_stream_is_billed_logged_and_released_once() {
        let (log, _guard) = CapturedLog::start();
        let fx = Fixture::new();
        let steps = sse(vec![Step::data(CHUNK), Step::Wait, Step::data(USAGE), Step::data(DONE)]);
        let (frames, end) = drain(fx.body(steps, &SSE, None)).await;
        assert!(end.is_ok());
        assert_eq!(frames.concat(), format!("{CHUNK}{DONE}"), "the usage chunk the client did not ask for is gone");
        assert_eq!(fx.billed(), [5]);
        assert_eq!(fx.told(), [Some(TokenUsage { prompt_tokens: 3, completion_tokens: 2 })]);
        assert_eq!(fx.pod.load.in_flight(), 0, "the pod's slot is free once the answer ended");
        let lines = log.request_ends();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["outcome"], "completed");
        assert_eq!(lines[0]["total_tokens"], 5);
        assert_eq!((lines[0]["pod"].as_str(), lines[0]["status"].as_u64()), (Some("p0"), Some(200)));
        assert!(lines[0]["ttft_ms"].is_number());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_last_frame_waits_for_the_tpm_charge() {
        let (log, _guard) = CapturedLog::start();
        let fx = Fixture::new();
        let (open, gate) = oneshot::channel();
        let body = fx.body(
            Scripted::sized(vec![Step::data("{\"usage\":{\"total_tokens\":7}}")]),
            &AnswerShape { content_type: Some("application/json"), ..AnswerShape::default() },
            Some(gate),
        );
        let reader = tokio::spawn(drain(body));
        tokio::task::yield_now().await;
        assert!(!reader.is_finished(), "the answer's end is held while its tokens are charged");
        assert!(fx.billed().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let _ = open.send(());
        let (frames, end) = reader.await.expect("reader");
        let line = &log.request_ends()[0];
        let (ttft, total) = (line["ttft_ms"].as_f64().unwrap_or(-1.0), line["total_ms"].as_f64().unwrap_or(0.0));
        assert!((0.0..150.0).contains(&ttft) && total >= 200.0, "the charge is not time to first byte: {line}");
        assert_eq!((frames.concat().as_str(), end), ("{\"usage\":{\"total_tokens\":7}}", Ok(())));
        assert_eq!(fx.billed(), [7]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_upstream_break_ends_a_stream_with_an_error_event_and_bills_what_was_reported() {
        let (log, _guard) = CapturedLog::start();
        let fx = Fixture::new();
        let steps = sse(vec![Step::data(CHUNK), Step::data(USAGE), Step::Fail]);
        let (frames, end) = drain(fx.body(steps, &SSE, None)).await;
        assert!(end.is_ok(), "the client's stream ends cleanly");
        let text = frames.concat();
        assert!(text.starts_with(CHUNK) && text.ends_with(std::str::from_utf8(SSE_UPSTREAM_ERROR).unwrap_or("")));
        tokio::task::yield_now().await;
        assert_eq!(fx.billed(), [5], "billed in the background");
        let lines = log.request_ends();
        assert_eq!(lines.len(), 1);
        assert_eq!(
            (lines[0]["outcome"].as_str(), lines[0]["total_tokens"].as_u64()),
            (Some("upstream_broken"), Some(0))
        );

        // Not a stream: the break reaches the client as one.
        let json = AnswerShape { content_type: Some("application/json"), ..AnswerShape::default() };
        let (_, end) = drain(fx.body(sse(vec![Step::data("{"), Step::Fail]), &json, None)).await;
        assert!(end.is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_goes_away_is_logged_billed_and_frees_the_pod() {
        let (log, _guard) = CapturedLog::start();
        let fx = Fixture::new();
        let mut body = fx.body(sse(vec![Step::data(USAGE), Step::data(CHUNK), Step::Hang]), &SSE, None);
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(matches!(first, Some(Ok(_))));
        assert_eq!(fx.pod.load.in_flight(), 1);
        drop(body);
        assert_eq!(fx.pod.load.in_flight(), 0);
        tokio::task::yield_now().await;
        assert_eq!(fx.billed(), [5]);
        assert_eq!(fx.told().len(), 1, "routing hears of it once");
        let lines = log.request_ends();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["outcome"], "client_gone");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_gone_during_the_tpm_charge_still_has_it_land() {
        let (log, _guard) = CapturedLog::start();
        let fx = Fixture::new();
        let (open, gate) = oneshot::channel();
        let mut body = fx.body(sse(vec![Step::data(CHUNK), Step::data(USAGE), Step::data(DONE)]), &SSE, Some(gate));
        let poll = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        assert!(poll.is_pending(), "the whole answer is read; its end waits on the charge");
        drop(body);
        assert!(fx.billed().is_empty());
        let _ = open.send(());
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(fx.billed(), [5], "the charge in flight was not lost");
        assert_eq!(log.request_ends()[0]["outcome"], "client_gone");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_stops_reading_is_told_apart_from_one_that_left() {
        let (log, _guard) = CapturedLog::start();
        let fx = Fixture::new();
        let watch = crate::proxy::write_watch::WriteWatch::new(std::time::Duration::from_millis(20));
        let steps = sse(vec![Step::data(CHUNK), Step::Hang]);
        let mut body = fx.clocked_body(steps, &SSE, None, Some(watch.register()));
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(matches!(first, Some(Ok(_))), "handed over: the client's turn from now");
        let tripped = tokio::time::timeout(std::time::Duration::from_secs(5), watch.stalled()).await;
        assert_eq!(tripped, Ok(true), "the client never came back for more");
        drop(body);
        assert_eq!(log.request_ends()[0]["outcome"], "client_stalled");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn trailers_end_the_answer_and_may_carry_its_usage() {
        let (log, _guard) = CapturedLog::start();
        let fx = Fixture::new();
        let json = AnswerShape { content_type: Some("application/json"), ..AnswerShape::default() };
        let steps = sse(vec![
            Step::data("{\"id\":1}"),
            Step::trailers("x-usage", "{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}"),
        ]);
        let (frames, end) = drain(fx.body(steps, &json, None)).await;
        assert_eq!((frames, end), (vec!["{\"id\":1}".to_owned(), "<trailers>".to_owned()], Ok(())));
        assert_eq!(fx.billed(), [2]);
        assert_eq!(log.request_ends()[0]["outcome"], "completed");
    }
}
