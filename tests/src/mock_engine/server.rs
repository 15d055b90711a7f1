//! Accepting connections and sending each request to its handler.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::body::MockBody;
use super::connection::{ConnectionAborted, ResetSwitch, ResettableStream};
use super::request::Endpoint;
use super::state::EngineState;
use super::{control, inference, upload};

/// Serves HTTP/1.1 with keep-alive on `listener` until the process ends.
pub async fn serve(listener: TcpListener, state: Arc<EngineState>) {
    let http = http1::Builder::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("mock-engine: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Stream events are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        let stream = ResettableStream::new(stream);
        let reset = stream.reset_switch();
        let state = Arc::clone(&state);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| route(Arc::clone(&state), reset.clone(), request)),
        );
        tokio::spawn(async move {
            // Errors are clients going away or resets the engine made on purpose.
            let _ = connection.await;
        });
    }
}

async fn route(
    state: Arc<EngineState>,
    reset: ResetSwitch,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, ConnectionAborted> {
    match Endpoint::from_path(request.uri().path()) {
        Some(endpoint) if request.method() == Method::POST && endpoint.is_upload() => {
            upload::handle(state, endpoint, request).await
        }
        Some(endpoint) if request.method() == Method::POST => inference::handle(state, endpoint, request, reset).await,
        Some(_) => Ok(control::method_not_allowed(&state)),
        None => Ok(control::handle(&state, request).await),
    }
}
