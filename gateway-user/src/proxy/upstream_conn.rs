//! The connector of the upstream client: hyper-util's `HttpConnector`, with
//! each new connection to a pod registered with kernel assist. The
//! connection's [`UpstreamConn`] then rides in the extensions of every
//! response read from it, so the proxy can tag the socket with the model of
//! the request it carries.

use std::future::Future;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::kernel::KernelAssist;
use crate::kernel::tagging::{Side, TaggedStream, UpstreamConn};

/// `HttpConnector` plus kernel-assist tracking.
#[derive(Clone)]
pub struct TrackingConnector {
    http: HttpConnector,
    kernel: Option<Arc<KernelAssist>>,
}

impl TrackingConnector {
    pub fn new(http: HttpConnector, kernel: Option<Arc<KernelAssist>>) -> Self {
        Self { http, kernel }
    }
}

type Connecting = Pin<
    Box<dyn Future<Output = Result<TokioIo<TaggedStream<TcpStream>>, Box<dyn std::error::Error + Send + Sync>>> + Send>,
>;

impl tower::Service<Uri> for TrackingConnector {
    type Response = TokioIo<TaggedStream<TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = tower::Service::<Uri>::call(&mut self.http, uri);
        let kernel = self.kernel.clone();
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            let tag = kernel.map(|kernel| kernel.track(stream.as_raw_fd(), Side::Upstream));
            Ok(TokioIo::new(TaggedStream::new(stream, tag)))
        })
    }
}

impl Connection for TaggedStream<TcpStream> {
    fn connected(&self) -> Connected {
        let connected = self.get_ref().connected();
        match self.tag() {
            Some(tag) => connected.extra(UpstreamConn(Arc::clone(tag))),
            None => connected,
        }
    }
}
