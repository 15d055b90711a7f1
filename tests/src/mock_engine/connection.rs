//! Accepted TCP connections that a request can end with a reset instead of an answer.
//!
//! hyper closes a connection when a service or a body fails; the stream wrapper turns that
//! close into a TCP RST when the request asked for it, which is what a gateway sees when an
//! engine dies mid-request.

use std::error::Error;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Lets a request end its own connection with a reset.
#[derive(Debug, Clone)]
pub struct ResetSwitch(Arc<AtomicBool>);

impl ResetSwitch {
    /// Makes the connection close with a reset; the handler then fails with
    /// [`ConnectionAborted`] so hyper drops it without answering.
    pub fn trigger(&self) -> ConnectionAborted {
        self.0.store(true, Ordering::Release);
        ConnectionAborted
    }
}

/// The error that makes hyper drop a connection without writing anything more.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionAborted;

impl fmt::Display for ConnectionAborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection aborted by the mock engine")
    }
}

impl Error for ConnectionAborted {}

/// A TCP stream that closes with a reset once its [`ResetSwitch`] was triggered.
#[derive(Debug)]
pub struct ResettableStream {
    stream: TcpStream,
    reset: ResetSwitch,
}

impl ResettableStream {
    /// Wraps an accepted stream.
    pub fn new(stream: TcpStream) -> Self {
        Self { stream, reset: ResetSwitch(Arc::new(AtomicBool::new(false))) }
    }

    /// The switch requests on this connection use to reset it.
    pub fn reset_switch(&self) -> ResetSwitch {
        self.reset.clone()
    }
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.0.load(Ordering::Acquire) {
            // Zero linger makes close() send RST; it never blocks. Failing leaves a normal
            // close, which the peer also sees as an aborted response.
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
