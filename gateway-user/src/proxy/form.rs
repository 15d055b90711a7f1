//! Uploads (`/v1/audio/transcriptions`, `/v1/audio/translations`): a
//! `multipart/form-data` body whose `model` is a form field and whose file may
//! be hundreds of megabytes.
//!
//! The gateway reads the upload only until it has the form's small fields
//! (`model`, `stream`) — at most `--max-body-bytes` of it — routes on them,
//! and then streams what it read and the rest to the pod as the client sends
//! it. An upload of any size so costs the gateway a few chunks of memory. A
//! pod that refuses the connection got nothing, so the next pod gets the same
//! bytes; once the rest has started to flow it cannot be sent again.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use tokio::time::Sleep;

use super::upstream::BoxError;
use crate::errors::GatewayError;

/// A client's request body, boxed so an upload can outlive the handler's
/// generic body type.
pub type ClientBody = UnsyncBoxBody<Bytes, BoxError>;

/// What the start of an upload said, and the upload to stream on.
#[derive(Debug)]
pub struct FormHead {
    pub model: String,
    /// The form's `stream` field is `true` or `1`.
    pub stream: bool,
    pub upload: Upload,
}

/// The `multipart/form-data` boundary of an upload, or AIBrix's refusal.
pub fn boundary(headers: &HeaderMap) -> Result<String, GatewayError> {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let multipart = content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().get(..10).is_some_and(|kind| kind.eq_ignore_ascii_case("multipart/")));
    if !multipart {
        return Err(GatewayError::NotMultipart);
    }
    let refused = |message| GatewayError::Multipart { message, param: None };
    multer::parse_boundary(content_type).map_err(|err| match err {
        multer::Error::NoBoundary => refused("missing boundary in content-type"),
        multer::Error::NoMultipart => refused("expected multipart/form-data content-type"),
        _ => refused("invalid content-type header"),
    })
}

/// Reads the start of an upload until its `model` field (and any small
/// fields right after it) is known: at most `limit` bytes, within `timeout`.
/// On failure the rest of the body is drained in the background.
pub async fn read_head(
    headers: &HeaderMap,
    mut body: ClientBody,
    limit: usize,
    timeout: Duration,
) -> Result<FormHead, GatewayError> {
    // The body's own length (hyper's reading of the framing), not the header's.
    let length = body.size_hint().exact();
    let boundary = match boundary(headers) {
        Ok(boundary) => boundary,
        Err(err) => {
            refuse_unread(headers, body, timeout);
            return Err(err);
        }
    };
    let mut seen = Vec::new();
    let mut fields = Fields::default();
    let scanned = {
        let recorder = Recorder { body: &mut body, seen: &mut seen, total: 0, limit, handed: false };
        tokio::time::timeout(timeout, scan(recorder, boundary, &mut fields)).await
    };
    let read: usize = seen.iter().map(Bytes::len).sum();
    match scanned {
        Ok(Ok(())) => {}
        // The client's body broke: nothing to send on.
        Ok(Err(Scan::Form(multer::Error::StreamReadFailed(err)))) if read <= limit => {
            return Err(GatewayError::BodyRead { reason: crate::logfmt::chain(err.as_ref()) });
        }
        // Once the model is known, what follows is the engine's to read.
        Ok(Err(_)) if fields.model.is_some() => {}
        Ok(Err(err)) => {
            let err = match err {
                Scan::Form(multer::Error::StreamReadFailed(_)) if read > limit => {
                    GatewayError::FormModelTooLate { limit_bytes: limit }
                }
                Scan::Form(multer::Error::StreamReadFailed(err)) => {
                    GatewayError::BodyRead { reason: crate::logfmt::chain(err.as_ref()) }
                }
                Scan::Form(_) => GatewayError::Multipart { message: "failed to parse multipart form", param: None },
                Scan::ModelUnreadable => {
                    GatewayError::Multipart { message: "failed to read model field", param: Some("model") }
                }
            };
            super::discard_rest(body, timeout);
            return Err(err);
        }
        Err(_) => {
            super::discard_rest(body, timeout);
            return Err(GatewayError::BodyTimeout { timeout_seconds: timeout.as_secs() });
        }
    }
    let Some(model) = fields.model.filter(|model| !model.is_empty()) else {
        super::discard_rest(body, timeout);
        return Err(GatewayError::Multipart { message: "'model' is a required property", param: Some("model") });
    };
    let upload = Upload {
        head: seen,
        rest: Arc::new(Mutex::new(Rest::Waiting(body))),
        state: Arc::default(),
        length,
        read_timeout: timeout,
    };
    Ok(FormHead { model, stream: fields.stream, upload })
}

/// Refuses an upload before reading any of it. A client that asked to
/// continue (`Expect: 100-continue`) is not invited to send the file just to
/// have it dropped; any other is read to its end in the background, so it
/// sees the answer rather than a reset.
fn refuse_unread(headers: &HeaderMap, body: ClientBody, within: Duration) {
    let expects_continue = headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    if !expects_continue {
        super::discard_rest(body, within);
    }
}

/// The small fields of a form.
#[derive(Debug, Default)]
struct Fields {
    model: Option<String>,
    stream: bool,
}

/// Why the start of a form could not be read.
enum Scan {
    Form(multer::Error),
    ModelUnreadable,
}

/// Walks the form's fields until the model is known and a file (or the end)
/// follows; a file before the model is read past (and so held, within the
/// recorder's limit).
async fn scan(recorder: Recorder<'_>, boundary: String, fields: &mut Fields) -> Result<(), Scan> {
    let mut form = multer::Multipart::new(recorder, boundary);
    while let Some(field) = form.next_field().await.map_err(Scan::Form)? {
        if fields.model.is_some() && field.file_name().is_some() {
            break;
        }
        match field.name() {
            Some("model") => {
                let text = field.text().await.map_err(|_| Scan::ModelUnreadable)?;
                fields.model = Some(text.trim().to_owned());
            }
            Some("stream") => {
                let text = field.text().await.map_err(Scan::Form)?;
                let text = text.trim();
                fields.stream = text.eq_ignore_ascii_case("true") || text == "1";
            }
            // Read past by the next call.
            _ => {}
        }
    }
    Ok(())
}

/// The client's body as a stream of chunks, each also kept (a reference
/// count, not a copy) to be sent on; an error past `limit` bytes.
struct Recorder<'a> {
    body: &'a mut ClientBody,
    seen: &'a mut Vec<Bytes>,
    total: usize,
    limit: usize,
    /// A chunk was just handed out.
    handed: bool,
}

impl Stream for Recorder<'_> {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // One chunk per turn: the parser reads whatever is ready, and
        // without this it would read (and so hold) far past the fields.
        if std::mem::take(&mut this.handed) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        loop {
            if this.total > this.limit {
                return Poll::Ready(Some(Err("the form's fields are not within the body limit".into())));
            }
            match ready!(Pin::new(&mut *this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of an upload are not passed on.
                    let Ok(data) = frame.into_data() else { continue };
                    this.total += data.len();
                    this.seen.push(data.clone());
                    this.handed = true;
                    return Poll::Ready(Some(Ok(data)));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// An upload whose start has been read: sent to a pod (or, if a pod refuses
/// the connection, to the next) by [`Upload::body`].
pub struct Upload {
    /// What was read to find the fields, sent first.
    head: Vec<Bytes>,
    rest: Arc<Mutex<Rest>>,
    /// Whether the client has sent it all, or failed to.
    state: Arc<UploadState>,
    /// The client's `Content-Length`, kept for the pod.
    length: Option<u64>,
    /// `--body-read-timeout-seconds`: the longest wait for the client's next
    /// bytes once the rest streams, and for draining an upload no pod took.
    read_timeout: Duration,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head: usize = self.head.iter().map(Bytes::len).sum();
        f.debug_struct("Upload").field("head_bytes", &head).field("length", &self.length).finish_non_exhaustive()
    }
}

/// The part of an upload not read yet.
enum Rest {
    /// Not sent anywhere yet.
    Waiting(ClientBody),
    /// Taken by the body sent to a pod.
    Taken,
}

impl Upload {
    /// The body for one attempt: the head, then the rest, taken from the
    /// upload when first read (so a pod that never reads it leaves it for
    /// the next).
    pub fn body(&self) -> UploadBody {
        UploadBody {
            head: self.head.iter().cloned().collect(),
            rest: None,
            shared: Arc::clone(&self.rest),
            state: Arc::clone(&self.state),
            length: self.length,
            idle: self.read_timeout,
            timer: None,
        }
    }

    /// Why the client's side of the upload failed, if it did: what the
    /// client gets instead of a failure blamed on the pod.
    pub fn client_failure(&self) -> Option<GatewayError> {
        match self.state.failure.get()? {
            ClientFailure::Idle(idle) => Some(GatewayError::BodyTimeout { timeout_seconds: idle.as_secs() }),
            ClientFailure::Broken(reason) => Some(GatewayError::BodyRead { reason: reason.clone() }),
        }
    }
}

/// How far the client's side of an upload got.
#[derive(Debug, Default)]
pub struct UploadState {
    sent: std::sync::atomic::AtomicBool,
    failure: std::sync::OnceLock<ClientFailure>,
    changed: tokio::sync::Notify,
}

/// How the client failed to send its upload.
#[derive(Debug)]
enum ClientFailure {
    /// Nothing for this long.
    Idle(Duration),
    /// The client's body broke (reset, bad framing).
    Broken(String),
}

impl UploadState {
    /// Resolves once the client has sent the whole upload, or failed to:
    /// from then on the pod's answer is what is waited for.
    pub async fn sent(&self) {
        loop {
            let changed = self.changed.notified();
            if self.sent.load(std::sync::atomic::Ordering::Acquire) || self.failure.get().is_some() {
                return;
            }
            changed.await;
        }
    }

    fn finish(&self) {
        self.sent.store(true, std::sync::atomic::Ordering::Release);
        self.changed.notify_waiters();
    }

    fn fail(&self, failure: ClientFailure) {
        let _ = self.failure.set(failure);
        self.changed.notify_waiters();
    }
}

impl Drop for Upload {
    /// An upload no pod took (the request failed before it was sent) is read
    /// to its end in the background, so the client sees the answer rather
    /// than a reset.
    fn drop(&mut self) {
        let rest = std::mem::replace(&mut *self.rest.lock().unwrap_or_else(PoisonError::into_inner), Rest::Taken);
        if let Rest::Waiting(body) = rest
            && tokio::runtime::Handle::try_current().is_ok()
        {
            super::discard_rest(body, self.read_timeout);
        }
    }
}

/// An upload on its way to a pod.
pub struct UploadBody {
    head: VecDeque<Bytes>,
    rest: Option<ClientBody>,
    shared: Arc<Mutex<Rest>>,
    state: Arc<UploadState>,
    length: Option<u64>,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if this.rest.is_none() {
            let mut shared = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
            match std::mem::replace(&mut *shared, Rest::Taken) {
                Rest::Waiting(body) => this.rest = Some(body),
                Rest::Taken => return Poll::Ready(Some(Err("the upload was already sent to another pod".into()))),
            }
        }
        let Some(rest) = this.rest.as_mut() else { return Poll::Ready(None) };
        loop {
            match Pin::new(&mut *rest).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.timer = None;
                    match frame.into_data() {
                        Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        // Trailers are not passed on.
                        Err(_) => continue,
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    this.state.fail(ClientFailure::Broken(crate::logfmt::chain(err.as_ref())));
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(None) => {
                    this.state.finish();
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let idle = this.idle;
                    let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    ready!(timer.as_mut().poll(cx));
                    this.state.fail(ClientFailure::Idle(idle));
                    let message = format!("the client sent no upload bytes for {} s", idle.as_secs());
                    return Poll::Ready(Some(Err(message.into())));
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.length.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl UploadBody {
    /// How far the client's side of this upload got.
    pub fn state(&self) -> &Arc<UploadState> {
        &self.state
    }
}
