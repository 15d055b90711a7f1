//! The connector of the engine pool (`engine_conn`): hyper-util's
//! `HttpConnector`, with each new connection to a pod registered with kernel
//! assist and tagged with the model of its pool. With kernel assist the proxy
//! keeps one pool per pod and model (the model id rides in the pool's
//! authority as user info, `m7@10.0.3.17:8000`, which the pool leaves out of
//! `Host`), so an upstream socket carries one model all its life and its
//! bytes are that model's, to the packet: a pooled connection is chosen
//! before anyone could know which socket to tag. The pool puts the
//! connection's [`UpstreamConn`](crate::kernel::tagging::UpstreamConn) in the
//! extensions of every response read from it.

use std::future::Future;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::kernel::KernelAssist;
use crate::kernel::tagging::TaggedStream;

/// `HttpConnector` plus kernel-assist tracking.
#[derive(Clone)]
pub struct TrackingConnector {
    http: HttpConnector,
    kernel: Arc<KernelAssist>,
}

impl TrackingConnector {
    pub fn new(http: HttpConnector, kernel: Arc<KernelAssist>) -> Self {
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
        let model = pool_model(&uri);
        let connecting = tower::Service::<Uri>::call(&mut self.http, uri);
        let kernel = self.kernel.clone();
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            let tag = Some(kernel.track_upstream(stream.as_raw_fd(), model));
            Ok(TokioIo::new(TaggedStream::new(stream, tag)))
        })
    }
}

/// The authority of the pool of model id `model` at pod address `addr`.
pub fn pool_authority(addr: &str, model: Option<u32>) -> String {
    match model {
        Some(model) => format!("m{model}@{addr}"),
        None => addr.to_owned(),
    }
}

/// The model id of a pool's authority (0 when it names none).
fn pool_model(uri: &Uri) -> u32 {
    uri.authority()
        .and_then(|authority| authority.as_str().split_once('@'))
        .and_then(|(user, _)| user.strip_prefix('m'))
        .and_then(|id| id.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_name_their_model_in_the_authority() {
        let uri: Uri = format!("http://{}/", pool_authority("127.0.0.1:9000", Some(7))).parse().unwrap();
        assert_eq!(uri.host(), Some("127.0.0.1"), "the connector dials the pod");
        assert_eq!(uri.port_u16(), Some(9000));
        assert_eq!(pool_model(&uri), 7);
        let plain: Uri = format!("http://{}/", pool_authority("127.0.0.1:9000", None)).parse().unwrap();
        assert_eq!(pool_model(&plain), 0);
    }
}
