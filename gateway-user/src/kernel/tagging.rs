//! Tagging the proxy's sockets with the model they carry.
//!
//! Every client connection the proxy accepts and every upstream connection it
//! opens gets a [`ConnTag`]: a small handle holding the socket's fd (while the
//! socket is open), its side, and the model last tagged. With kernel assist the
//! tag is written into the socket's `SOCK_TAGS` storage, where the
//! `cgroup_skb` programs read it; userspace-only, [`TaggedStream`] counts the
//! bytes it moves under the same rules.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use gateway_common::{MAX_MODELS, SIDE_CLIENT, SIDE_UPSTREAM};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::counters::UserCounters;

/// Which side of the proxy a connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Accepted from a client.
    Client,
    /// Opened to an engine pod.
    Upstream,
}

impl Side {
    /// The value stored in the kernel tag.
    pub fn as_u32(self) -> u32 {
        match self {
            Self::Client => SIDE_CLIENT,
            Self::Upstream => SIDE_UPSTREAM,
        }
    }

    /// The `side` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
        }
    }
}

/// Per-connection handle the proxy uses to tag a socket with a model.
#[derive(Debug)]
pub struct ConnTag {
    /// The socket's fd while it is open. Cleared (under the write lock) before
    /// the socket closes, so a late tag can never reach a reused fd number.
    fd: RwLock<Option<RawFd>>,
    side: Side,
    /// Model id last tagged; 0 before the first.
    model: AtomicU32,
    /// Userspace-only mode: where this connection's bytes are counted.
    user: Option<Arc<UserCounters>>,
    /// Userspace-only mode: traffic before the first tag (in packets, in
    /// bytes, out packets, out bytes), charged to the first model tagged.
    pending: [AtomicU64; 4],
    /// When the connection was made: a request's trace tells a connection
    /// made for it from a pooled one.
    opened: std::time::Instant,
}

impl ConnTag {
    pub(crate) fn new(fd: RawFd, side: Side, user: Option<Arc<UserCounters>>) -> Self {
        let opened = std::time::Instant::now();
        Self { fd: RwLock::new(Some(fd)), side, model: AtomicU32::new(0), user, pending: Default::default(), opened }
    }

    /// When the connection was made.
    pub fn opened(&self) -> std::time::Instant {
        self.opened
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// The model id last tagged (0: none yet).
    pub fn model(&self) -> u32 {
        self.model.load(Ordering::Relaxed)
    }

    /// Records `model` as this connection's model; returns the previous one.
    pub(crate) fn swap_model(&self, model: u32) -> u32 {
        self.model.swap(model, Ordering::Relaxed)
    }

    /// Runs `f` with the socket's fd if it is still open; the fd cannot be
    /// closed while `f` runs.
    pub(crate) fn with_fd<T>(&self, f: impl FnOnce(RawFd) -> T) -> Option<T> {
        let guard = self.fd.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.map(f)
    }

    fn closing(&self) {
        *self.fd.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Userspace-only counting of `bytes` moved in one read or write, by
    /// the kernel programs' rule: on a client connection what is read is a
    /// request, held until the gateway writes its answer (by then the
    /// request's model is tagged); upstream connections carry one model.
    fn count(&self, inbound: bool, bytes: usize) {
        let Some(user) = &self.user else {
            return;
        };
        let bytes = bytes as u64;
        let model = self.model.load(Ordering::Relaxed);
        if self.side == Side::Client && inbound {
            self.hold(true, bytes);
            return;
        }
        if model == 0 {
            self.hold(inbound, bytes);
            return;
        }
        if self.side == Side::Client {
            self.charge_held(user, model, true);
        }
        user.add(model, self.side, inbound, 1, bytes);
    }

    fn hold(&self, inbound: bool, bytes: u64) {
        let (packets, octets) = if inbound { (0, 1) } else { (2, 3) };
        self.pending[packets].fetch_add(1, Ordering::Relaxed);
        self.pending[octets].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Charges what is held in one direction to `model`.
    fn charge_held(&self, user: &UserCounters, model: u32, inbound: bool) {
        let (packets, octets) = if inbound { (0, 1) } else { (2, 3) };
        let packets = self.pending[packets].swap(0, Ordering::Relaxed);
        let octets = self.pending[octets].swap(0, Ordering::Relaxed);
        if packets > 0 {
            user.add(model, self.side, inbound, packets, octets);
        }
    }

    /// Userspace-only mode, when the model changes: counts the connection for
    /// the new model and charges it the traffic seen before the first tag.
    pub(crate) fn user_tagged(&self, model: u32) {
        let Some(user) = &self.user else {
            return;
        };
        user.connection(model, self.side);
        self.charge_held(user, model, true);
        self.charge_held(user, model, false);
    }
}

/// A client connection's tag, carried in the extensions of each request read
/// from it (the listener puts it there).
#[derive(Clone, Debug)]
pub struct ClientConn(pub Arc<ConnTag>);

/// An upstream connection's tag, carried in the extensions of each response
/// read from it (the engine pool, `proxy::engine_conn`, puts it there).
#[derive(Clone, Debug)]
pub struct UpstreamConn(pub Arc<ConnTag>);

/// A socket with its [`ConnTag`]: forwards all IO, counts bytes in
/// userspace-only mode, and invalidates the tag's fd before closing.
#[derive(Debug)]
pub struct TaggedStream<S> {
    inner: S,
    tag: Option<Arc<ConnTag>>,
}

impl<S> TaggedStream<S> {
    pub fn new(inner: S, tag: Option<Arc<ConnTag>>) -> Self {
        Self { inner, tag }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn tag(&self) -> Option<&Arc<ConnTag>> {
        self.tag.as_ref()
    }
}

impl<S> Drop for TaggedStream<S> {
    fn drop(&mut self) {
        // Runs before `inner` (and so the socket) is dropped.
        if let Some(tag) = &self.tag {
            tag.closing();
        }
    }
}

impl<S: AsRawFd> AsRawFd for TaggedStream<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TaggedStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(tag)) = (&poll, &self.tag) {
            let read = buf.filled().len() - before;
            if read > 0 {
                tag.count(true, read);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TaggedStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(written)), Some(tag)) = (&poll, &self.tag)
            && *written > 0
        {
            tag.count(false, *written);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let (Poll::Ready(Ok(written)), Some(tag)) = (&poll, &self.tag)
            && *written > 0
        {
            tag.count(false, *written);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Model names ↔ the small ids the kernel counts under. Ids are handed out on
/// first use and never reused; the set of names is bounded by the models
/// discovery has seen, and past [`MAX_MODELS`] - 1 names everything shares
/// the last id, reported as [`ModelIds::OVERFLOW`].
#[derive(Debug, Default)]
pub struct ModelIds {
    inner: RwLock<IdTable>,
}

#[derive(Debug, Default)]
struct IdTable {
    by_name: HashMap<Arc<str>, u32>,
    /// Index = id - 1.
    names: Vec<Arc<str>>,
}

impl ModelIds {
    /// Label of the shared id once [`MAX_MODELS`] is reached.
    pub const OVERFLOW: &'static str = "other";

    /// The id of `model`, and whether it was just assigned.
    pub fn id(&self, model: &str) -> (u32, bool) {
        if let Some(id) = self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner).by_name.get(model) {
            return (*id, false);
        }
        let mut table = self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(id) = table.by_name.get(model) {
            return (*id, false);
        }
        let next = u32::try_from(table.names.len() + 1).unwrap_or(MAX_MODELS);
        let overflow = MAX_MODELS - 1;
        if next >= overflow {
            // The shared id is listed once, as the last name.
            let first = next == overflow;
            if first {
                table.names.push(Arc::from(Self::OVERFLOW));
            }
            return (overflow, first);
        }
        let name: Arc<str> = Arc::from(model);
        table.names.push(Arc::clone(&name));
        table.by_name.insert(name, next);
        (next, true)
    }

    /// Every assigned `(id, name)`.
    pub fn all(&self) -> Vec<(u32, Arc<str>)> {
        let table = self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        table.names.iter().enumerate().map(|(i, name)| (i as u32 + 1, Arc::clone(name))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_start_at_one() {
        let ids = ModelIds::default();
        assert_eq!(ids.id("a"), (1, true));
        assert_eq!(ids.id("b"), (2, true));
        assert_eq!(ids.id("a"), (1, false));
        let all: Vec<(u32, String)> = ids.all().into_iter().map(|(id, n)| (id, n.to_string())).collect();
        assert_eq!(all, vec![(1, "a".to_owned()), (2, "b".to_owned())]);
    }

    #[test]
    fn ids_overflow_into_one_shared_id() {
        let ids = ModelIds::default();
        for i in 0..MAX_MODELS + 5 {
            let (id, _) = ids.id(&format!("m{i}"));
            assert!(id < MAX_MODELS);
        }
        assert_eq!(ids.id("late").0, MAX_MODELS - 1);
        let all = ids.all();
        assert_eq!(all.len(), (MAX_MODELS - 1) as usize);
        assert_eq!(&*all[all.len() - 1].1, ModelIds::OVERFLOW);
    }

    #[tokio::test]
    async fn userspace_counting_charges_pending_traffic_to_the_first_model() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let user = Arc::new(UserCounters::default());
        let tag = Arc::new(ConnTag::new(-1, Side::Client, Some(Arc::clone(&user))));
        let (a, mut b) = tokio::io::duplex(1024);
        let mut stream = TaggedStream::new(a, Some(Arc::clone(&tag)));
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.unwrap();
        tag.swap_model(3);
        tag.user_tagged(3);
        stream.write_all(b"world!").await.unwrap();
        let stats = user.snapshot(3);
        assert_eq!((stats.client_in_bytes, stats.client_out_bytes, stats.client_connections), (5, 6, 1));
        drop(stream);
        assert_eq!(tag.with_fd(|fd| fd), None, "fd cleared on close");
    }

    /// One keep-alive connection, requests for two models in turn, tagged
    /// the way the proxy does (only when the model changes, after reading).
    #[tokio::test]
    async fn keep_alive_requests_are_charged_to_their_own_models() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let user = Arc::new(UserCounters::default());
        let tag = Arc::new(ConnTag::new(-1, Side::Client, Some(Arc::clone(&user))));
        let (a, mut client) = tokio::io::duplex(1 << 16);
        let mut stream = TaggedStream::new(a, Some(Arc::clone(&tag)));
        let tag_model = |model: u32| {
            if tag.swap_model(model) != model {
                tag.user_tagged(model);
            }
        };
        let mut expected = [[0u64; 2]; 3];
        for (i, model) in [1u32, 2, 2, 1, 2, 1, 1].into_iter().enumerate() {
            let request = vec![b'q'; 10 + 100 * model as usize + i];
            client.write_all(&request).await.unwrap();
            let mut buf = vec![0u8; request.len()];
            stream.read_exact(&mut buf).await.unwrap();
            tag_model(model);
            let answer = vec![b'a'; 1000 * model as usize + i];
            stream.write_all(&answer).await.unwrap();
            let mut sink = vec![0u8; answer.len()];
            client.read_exact(&mut sink).await.unwrap();
            expected[model as usize][0] += request.len() as u64;
            expected[model as usize][1] += answer.len() as u64;
        }
        for model in [1, 2] {
            let stats = user.snapshot(model);
            assert_eq!([stats.client_in_bytes, stats.client_out_bytes], expected[model as usize], "model {model}");
        }
    }
}
