//! Scripted bodies for the body layers' tests: an engine answer written as a
//! list of steps (data, trailers, a pause, a break), and a client that reads
//! a body to its end.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};

/// The error a scripted engine body breaks off with.
#[derive(Debug, thiserror::Error)]
#[error("scripted upstream break")]
pub struct ScriptError;

/// One step of a scripted engine body.
#[derive(Debug)]
pub enum Step {
    Data(Bytes),
    Trailers(http::HeaderMap),
    /// Nothing ready for a few polls (longer than any layer steps aside).
    Wait,
    /// Nothing ready, ever.
    Hang,
    /// The connection breaks.
    Fail,
}

impl Step {
    pub fn data(text: impl Into<String>) -> Self {
        Self::Data(Bytes::from(text.into()))
    }

    pub fn trailers(name: &'static str, value: &'static str) -> Self {
        let mut map = http::HeaderMap::new();
        map.insert(name, http::HeaderValue::from_static(value));
        Self::Trailers(map)
    }
}

/// Polls a [`Step::Wait`] stays pending for.
const WAIT_POLLS: u8 = 5;

/// An engine body that plays its steps.
#[derive(Debug)]
pub struct Scripted {
    steps: VecDeque<Step>,
    waited: u8,
    /// Reports its end with its last frame, as a body with a known length does.
    sized: bool,
}

impl Scripted {
    /// A chunked body: its end is known only when polled once more.
    pub fn new(steps: Vec<Step>) -> Self {
        Self { steps: steps.into(), waited: 0, sized: false }
    }

    /// A body with a known length.
    pub fn sized(steps: Vec<Step>) -> Self {
        Self { sized: true, ..Self::new(steps) }
    }
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = ScriptError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ScriptError>>> {
        loop {
            let Some(step) = self.steps.pop_front() else { return Poll::Ready(None) };
            return match step {
                Step::Data(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Step::Trailers(map) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
                Step::Fail => Poll::Ready(Some(Err(ScriptError))),
                Step::Hang => {
                    self.steps.push_front(Step::Hang);
                    Poll::Pending
                }
                Step::Wait if self.waited >= WAIT_POLLS => {
                    self.waited = 0;
                    continue;
                }
                Step::Wait => {
                    self.waited += 1;
                    self.steps.push_front(Step::Wait);
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.sized && self.steps.is_empty()
    }

    /// A sized body's length is known: what its data steps hold.
    fn size_hint(&self) -> http_body::SizeHint {
        if !self.sized {
            return http_body::SizeHint::default();
        }
        let length =
            self.steps.iter().map(|step| if let Step::Data(data) = step { data.len() as u64 } else { 0 }).sum();
        http_body::SizeHint::with_exact(length)
    }
}

/// Reads `body` the way hyper does (stopping once it reports its end), as
/// text frames (`<trailers>` for trailers), and how it ended.
pub async fn drain<B>(body: B) -> (Vec<String>, Result<(), String>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut body = body;
    let mut frames = Vec::new();
    loop {
        if body.is_end_stream() {
            return (frames, Ok(()));
        }
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => return (frames, Ok(())),
            Some(Err(err)) => return (frames, Err(err.to_string())),
            Some(Ok(frame)) => frames.push(match frame.into_data() {
                Ok(data) => String::from_utf8_lossy(&data).into_owned(),
                Err(_) => "<trailers>".to_owned(),
            }),
        }
    }
}

/// The JSON log lines written on this thread while the guard lives.
#[derive(Clone, Default)]
pub struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Starts capturing this thread's log (a current-thread runtime's tasks
    /// included) until the guard is dropped.
    pub fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        let log = Self::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }

    /// Every "request end" line so far.
    pub fn request_ends(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["message"] == "request end")
            .collect()
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut bytes) = self.0.lock() {
            bytes.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
