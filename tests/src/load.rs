//! Client loads for the penalty tests: a steady sender and a flood, each from
//! a chosen loopback source address, recording how every request ended and
//! when. Every load is bounded in time and in requests.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

/// A connection from source address `from` to `to`.
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = if from.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer: its status, whether it asked to close the connection, and
    /// its body.
    Answer { status: u16, close: bool, body: String },
    /// No connection: refused or reset at connect.
    Refused(String),
    /// The connection broke before the answer (reset, closed).
    Broken(String),
}

/// One request's end.
#[derive(Clone, Debug)]
pub struct Event {
    pub at: SystemTime,
    pub outcome: Outcome,
}

impl Event {
    pub fn status(&self) -> Option<u16> {
        match &self.outcome {
            Outcome::Answer { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> u64 {
        self.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// What the load sends, from where, to where.
#[derive(Clone, Debug)]
pub struct Target {
    pub from: IpAddr,
    pub to: SocketAddr,
    pub path: String,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

/// A keep-alive HTTP/1.1 client on one connection, reconnecting when the
/// server closes it.
struct Client {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// How long one request may take before it counts as broken.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    fn new(target: Arc<Target>) -> Self {
        Self { target, sender: None }
    }

    async fn send(&mut self) -> Outcome {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.try_send()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.sender = None;
                Outcome::Broken("timed out".into())
            }
        }
    }

    async fn try_send(&mut self) -> Outcome {
        let target = Arc::clone(&self.target);
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            let stream = match connect_from(target.from, target.to).await {
                Ok(stream) => stream,
                Err(err) => return Outcome::Refused(err.to_string()),
            };
            let (sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(pair) => pair,
                Err(err) => return Outcome::Refused(err.to_string()),
            };
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        let Some(sender) = self.sender.as_mut() else { return Outcome::Refused("no connection".into()) };
        if sender.ready().await.is_err() {
            self.sender = None;
            return Outcome::Broken("connection closed before the request".into());
        }
        let mut request = Request::post(&target.path)
            .header("host", target.to.to_string())
            .header("content-type", "application/json");
        for (name, value) in &target.headers {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(Bytes::from(target.body.clone()))).expect("request");
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(err) => {
                self.sender = None;
                return Outcome::Broken(err.to_string());
            }
        };
        let status = response.status().as_u16();
        let close = response.headers().get("connection").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        match response.into_body().collect().await {
            Ok(body) => {
                if close {
                    self.sender = None;
                }
                Outcome::Answer { status, close, body: String::from_utf8_lossy(&body.to_bytes()).into_owned() }
            }
            Err(err) => {
                self.sender = None;
                Outcome::Broken(err.to_string())
            }
        }
    }
}

/// Sends `per_second` requests a second, one after another on one
/// keep-alive connection, for `duration`.
pub async fn steady(target: Target, per_second: u32, duration: Duration) -> Vec<Event> {
    let mut client = Client::new(Arc::new(target));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = Instant::now() + duration;
    let mut events = Vec::new();
    while Instant::now() < deadline {
        tick.tick().await;
        let outcome = client.send().await;
        events.push(Event { at: SystemTime::now(), outcome });
    }
    events
}

/// Sends as fast as `workers` keep-alive connections allow, reconnecting
/// whenever a connection ends, for `duration` or `max_requests`.
pub async fn flood(target: Target, workers: usize, duration: Duration, max_requests: usize) -> Vec<Event> {
    let target = Arc::new(target);
    let deadline = Instant::now() + duration;
    let per_worker = max_requests.div_ceil(workers.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let mut client = Client::new(Arc::clone(&target));
        tasks.spawn(async move {
            let mut events = Vec::with_capacity(per_worker);
            // An attempt still waiting at the deadline (a SYN the server's
            // full backlog dropped, say) ends the flood: it decides nothing.
            let cut_off = tokio::time::Instant::from_std(deadline + Duration::from_millis(500));
            while Instant::now() < deadline && events.len() < per_worker {
                let Ok(outcome) = tokio::time::timeout_at(cut_off, client.send()).await else { break };
                let refused = matches!(outcome, Outcome::Refused(_));
                events.push(Event { at: SystemTime::now(), outcome });
                if refused {
                    // A refused flood client retries at once, like a flood would,
                    // but yields so the others keep going.
                    tokio::task::yield_now().await;
                }
            }
            events
        });
    }
    let mut events = Vec::new();
    while let Some(worker) = tasks.join_next().await {
        events.extend(worker.expect("load worker"));
    }
    events.sort_by_key(|e| e.at);
    events
}

/// How far a client's view of "429s within one second" may lag the
/// gateway's: the gateway counts when it sends, the client when a response
/// arrives, over many connections at once.
pub const CLIENT_VIEW_SLACK: Duration = Duration::from_millis(100);

/// The first moment `threshold` 429s had come back within one second (plus
/// [`CLIENT_VIEW_SLACK`]), sliding: never later than the client could see a
/// rule counting 429s per one-second window cross the threshold.
pub fn threshold_crossed(events: &[Event], threshold: usize) -> Option<SystemTime> {
    let times: Vec<SystemTime> = events.iter().filter(|e| e.status() == Some(429)).map(|e| e.at).collect();
    let window = Duration::from_secs(1) + CLIENT_VIEW_SLACK;
    (threshold.max(1) - 1..times.len())
        .find(|&i| times[i].duration_since(times[i + 1 - threshold.max(1)]).unwrap_or_default() <= window)
        .map(|i| times[i])
}

/// 429s that came back within the second (plus [`CLIENT_VIEW_SLACK`])
/// before `until`.
pub fn rate_limited_before(events: &[Event], until: SystemTime) -> usize {
    let window = Duration::from_secs(1) + CLIENT_VIEW_SLACK;
    events
        .iter()
        .filter(|e| e.status() == Some(429) && e.at <= until)
        .filter(|e| until.duration_since(e.at).unwrap_or_default() <= window)
        .count()
}

/// The first request that got no answer at all.
pub fn first_failure(events: &[Event]) -> Option<&Event> {
    events.iter().find(|e| !matches!(e.outcome, Outcome::Answer { .. }))
}

/// A sample's value from Prometheus text: `name{...}` with all `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().ok())?
    })
}
