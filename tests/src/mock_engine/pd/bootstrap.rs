//! SGLang's bootstrap server, as far as a PD gateway can tell: the prefill registers each
//! room it accepted, and a decode polls `GET /room/<room>` on the prefill's bootstrap port
//! until the room is there, which is how the mock checks that the gateway gave both halves
//! the same room and pointed the decode at the right prefill.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep_until, timeout_at};

/// Rooms kept; the oldest go first.
const MAX_ROOMS: usize = 4096;
/// Time between two polls of a decode waiting for its room.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Largest room answer a decode reads.
const MAX_ROOM_ANSWER_BYTES: usize = 4096;

/// The rooms a prefill accepted, with the digest of each one's prompt.
#[derive(Debug, Default)]
pub struct BootstrapRooms {
    table: Mutex<RoomTable>,
}

#[derive(Debug, Default)]
struct RoomTable {
    digests: HashMap<u64, u64>,
    /// Rooms in registration order, for dropping the oldest.
    order: VecDeque<u64>,
}

impl BootstrapRooms {
    /// Registers `room` for a prompt with `digest`, dropping the oldest room beyond
    /// [`MAX_ROOMS`].
    pub fn register(&self, room: u64, digest: u64) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if table.digests.insert(room, digest).is_some() {
            return;
        }
        table.order.push_back(room);
        while table.order.len() > MAX_ROOMS {
            if let Some(oldest) = table.order.pop_front() {
                table.digests.remove(&oldest);
            }
        }
    }

    /// The prompt digest `room` was registered with.
    pub fn get(&self, room: u64) -> Option<u64> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).digests.get(&room).copied()
    }

    /// Rooms kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).digests.len()
    }
}

/// Serves `GET /room/<room>` from `rooms` on `listener` until the process ends: 200
/// `{"room":N,"digest":"<hex>"}` for a registered room, 404 otherwise.
pub async fn serve_bootstrap(listener: TcpListener, rooms: Arc<BootstrapRooms>) {
    let http = http1::Builder::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("mock-engine: bootstrap accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let rooms = Arc::clone(&rooms);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| {
                let answer = answer(&rooms, &request);
                async move { Ok::<_, Infallible>(answer) }
            }),
        );
        tokio::spawn(async move {
            // Errors are decodes going away.
            let _ = connection.await;
        });
    }
}

fn answer(rooms: &BootstrapRooms, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(room) = request.uri().path().strip_prefix("/room/") else {
        return json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"}));
    };
    if request.method() != Method::GET {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({"error": "method not allowed"}));
    }
    match room.parse::<u64>().ok().and_then(|room| Some((room, rooms.get(room)?))) {
        Some((room, digest)) => {
            json_response(StatusCode::OK, &json!({"room": room, "digest": format!("{digest:016x}")}))
        }
        None => json_response(StatusCode::NOT_FOUND, &json!({"error": format!("room {room} not found")})),
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// Why a decode's room never came.
#[derive(Debug, PartialEq, Eq)]
pub enum RoomError {
    /// Not registered (or the bootstrap server not answering) within the timeout.
    NeverPrefilled,
    /// Registered for a prompt with another digest.
    OtherPrompt,
}

/// Polls the bootstrap server at `host:port` every [`POLL_INTERVAL`] for `room`, for at
/// most `timeout`, and checks it was prefilled for the prompt with `digest`.
pub async fn wait_for_room(host: &str, port: u16, room: u64, digest: u64, timeout: Duration) -> Result<(), RoomError> {
    let deadline = Instant::now() + timeout;
    loop {
        match timeout_at(deadline, lookup(host, port, room)).await {
            Ok(Some(found)) if found == digest => return Ok(()),
            Ok(Some(_)) => return Err(RoomError::OtherPrompt),
            Ok(None) => {}
            Err(_elapsed) => return Err(RoomError::NeverPrefilled),
        }
        if Instant::now() >= deadline {
            return Err(RoomError::NeverPrefilled);
        }
        sleep_until((Instant::now() + POLL_INTERVAL).min(deadline)).await;
    }
}

/// The digest `room` is registered with at `host:port`; `None` when it is not, or the
/// server cannot be reached or answers nonsense.
async fn lookup(host: &str, port: u16, room: u64) -> Option<u64> {
    let stream = TcpStream::connect((host, port)).await.ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    // Ends once the sender is dropped and the exchange is over.
    tokio::spawn(connection);
    let request = Request::get(format!("/room/{room}"))
        .header(header::HOST, format!("{host}:{port}"))
        .body(Empty::<Bytes>::new())
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    let body = Limited::new(response.into_body(), MAX_ROOM_ANSWER_BYTES).collect().await.ok()?.to_bytes();
    let answer: Value = serde_json::from_slice(&body).ok()?;
    if answer.get("room").and_then(Value::as_u64) != Some(room) {
        return None;
    }
    u64::from_str_radix(answer.get("digest")?.as_str()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_are_bounded_oldest_first() {
        let rooms = BootstrapRooms::default();
        for room in 0..(MAX_ROOMS as u64 + 10) {
            rooms.register(room, room * 2);
        }
        assert_eq!(rooms.len(), MAX_ROOMS);
        assert_eq!(rooms.get(9), None);
        assert_eq!(rooms.get(10), Some(20));
        rooms.register(10, 7);
        assert_eq!(rooms.get(10), Some(7), "a room registered again takes the new prompt");
        assert_eq!(rooms.len(), MAX_ROOMS);
    }

    #[tokio::test]
    async fn the_server_reports_registered_rooms_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let rooms = Arc::new(BootstrapRooms::default());
        rooms.register(5, 0xabc);
        let server = tokio::spawn(serve_bootstrap(listener, Arc::clone(&rooms)));
        assert_eq!(lookup("127.0.0.1", port, 5).await, Some(0xabc));
        assert_eq!(lookup("127.0.0.1", port, 6).await, None);
        let short = Duration::from_millis(30);
        assert_eq!(wait_for_room("127.0.0.1", port, 5, 0xabc, short).await, Ok(()));
        assert_eq!(wait_for_room("127.0.0.1", port, 5, 0xabd, short).await, Err(RoomError::OtherPrompt));
        assert_eq!(wait_for_room("127.0.0.1", port, 6, 0xabc, short).await, Err(RoomError::NeverPrefilled));
        server.abort();
    }
}
