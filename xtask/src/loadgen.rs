//! A closed-loop HTTP load generator: a fixed number of keep-alive HTTP/1.1 connections, each
//! sending `POST /v1/chat/completions` back to back with small distinct prompts.
//!
//! Bounded everywhere: connections stop issuing at the end of the measured period, each request
//! has a timeout, and each connection has a request cap. Latencies are kept whole (a sorted
//! vector of microseconds) so percentiles are exact, not histogram-bucketed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Distinct prompts cycled through (as in the peer benchmark: 256 prompts of 48 characters).
const PROMPTS: usize = 256;
/// Upper bound on requests per connection, whatever the duration.
const MAX_REQUESTS_PER_CONNECTION: u64 = 10_000_000;
/// A request that takes longer counts as an error, and its connection is replaced.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting (or reconnecting) a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What load to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Servers to connect to; connection `i` goes to `targets[i % len]` (client-side round
    /// robin when there are several).
    pub targets: Vec<SocketAddr>,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Model named in the requests.
    pub model: String,
    /// `stream: true` requests (latency is then the whole stream).
    pub stream: bool,
    /// `max_tokens` in the requests.
    pub max_tokens: u32,
    /// Further request headers (e.g. `routing-strategy`), sent on every request.
    pub headers: Vec<(String, String)>,
}

/// When a run warms up and when it measures.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Measuring starts here; requests completing earlier are warm-up.
    pub measure_start: Instant,
    /// No request is issued after this; requests completing later are not counted.
    pub measure_end: Instant,
}

impl Schedule {
    /// A schedule starting now: `warmup`, then `measure`.
    pub fn starting_now(warmup: Duration, measure: Duration) -> Self {
        let measure_start = Instant::now() + warmup;
        Self { measure_start, measure_end: measure_start + measure }
    }

    /// Length of the measured period.
    pub fn measured(&self) -> Duration {
        self.measure_end - self.measure_start
    }
}

/// Results of one run, over the measured period only.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Successful (200) requests completed in the period.
    pub completed: u64,
    /// Failed requests (non-200, IO error, timeout, connect failure) in the period.
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// Latency of each successful request, microseconds, sorted ascending.
    pub latencies_us: Vec<u32>,
    /// Length of the measured period.
    pub measured: Duration,
}

impl LoadReport {
    /// Successful requests per second.
    pub fn requests_per_second(&self) -> f64 {
        self.completed as f64 / self.measured.as_secs_f64().max(f64::EPSILON)
    }

    /// Latency at percentile `p` (0–100), milliseconds; `None` without samples.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        percentile(&self.latencies_us, p).map(|us| f64::from(us) / 1000.0)
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p`% of the
/// samples at or below it.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The request bodies, built once so the generator spends its time on the wire.
fn request_bodies(spec: &LoadSpec) -> Vec<Bytes> {
    (0..PROMPTS)
        .map(|i| {
            let body = serde_json::json!({
                "model": spec.model,
                "messages": [{"role": "user", "content": prompt(i)}],
                "max_tokens": spec.max_tokens,
                "stream": spec.stream,
            });
            Bytes::from(body.to_string())
        })
        .collect()
}

/// A distinct 48-character prompt.
fn prompt(i: usize) -> String {
    format!("{:<48.48}", format!("Prompt {i:03}: summarise the gateway design"))
}

/// What one connection measured.
#[derive(Default)]
pub struct ConnectionTally {
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub latencies_us: Vec<u32>,
}

impl ConnectionTally {
    /// Records one exchange with `target` that started at `started` and ends now (see
    /// [`send_chat`]); whether its connection can carry the next request.
    pub fn record(
        &mut self,
        schedule: &Schedule,
        target: SocketAddr,
        outcome: Result<Result<StatusCode>, tokio::time::error::Elapsed>,
        started: Instant,
    ) -> bool {
        let finished = Instant::now();
        match outcome {
            Ok(Ok(StatusCode::OK)) => {
                if finished >= schedule.measure_start && finished < schedule.measure_end {
                    self.completed += 1;
                    let micros = (finished - started).as_micros();
                    self.latencies_us.push(u32::try_from(micros).unwrap_or(u32::MAX));
                }
                true
            }
            Ok(Ok(status)) => {
                self.error(schedule, format!("{target} answered {status}"));
                true
            }
            Ok(Err(err)) => {
                self.error(schedule, format!("{target}: {err:#}"));
                false
            }
            Err(_) => {
                self.error(schedule, format!("{target}: no full answer within {REQUEST_TIMEOUT:?}"));
                false
            }
        }
    }

    /// Counts an error if it happened in the measured period; the first one is kept either way.
    pub fn error(&mut self, schedule: &Schedule, message: String) {
        let now = Instant::now();
        if now >= schedule.measure_start && now < schedule.measure_end {
            self.errors += 1;
        }
        // Warm-up errors are not counted but still explain a failed run.
        self.first_error.get_or_insert(message);
    }
}

/// Runs the load until `schedule.measure_end` and reports the measured period.
pub async fn run(spec: &LoadSpec, schedule: Schedule) -> Result<LoadReport> {
    if spec.targets.is_empty() || spec.connections == 0 {
        bail!("load needs at least one target and one connection");
    }
    let bodies = Arc::new(request_bodies(spec));
    let headers = Arc::new(spec.headers.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..spec.connections {
        let target = spec.targets[id % spec.targets.len()];
        let bodies = Arc::clone(&bodies);
        tasks.spawn(drive_connection(id, target, bodies, Arc::clone(&headers), schedule));
    }
    gather(tasks, &schedule).await
}

/// Waits for every connection of a run and sums what they measured.
pub async fn gather(mut tasks: tokio::task::JoinSet<ConnectionTally>, schedule: &Schedule) -> Result<LoadReport> {
    let mut report = LoadReport {
        completed: 0,
        errors: 0,
        first_error: None,
        latencies_us: Vec::new(),
        measured: schedule.measured(),
    };
    // Every task ends on its own by measure_end plus one request timeout; the outer bound
    // only guards against a bug here.
    let limit = schedule.measure_end + REQUEST_TIMEOUT + CONNECT_TIMEOUT + Duration::from_secs(5);
    while let Some(joined) = tokio::time::timeout_at(limit.into(), tasks.join_next())
        .await
        .map_err(|_| anyhow!("load connections did not finish in time"))?
    {
        let tally = joined.context("a load connection panicked")?;
        report.completed += tally.completed;
        report.errors += tally.errors;
        if report.first_error.is_none() {
            report.first_error = tally.first_error;
        }
        report.latencies_us.extend(tally.latencies_us);
    }
    report.latencies_us.sort_unstable();
    Ok(report)
}

/// One connection's loop: (re)connect, send, read the whole answer, record, repeat.
async fn drive_connection(
    id: usize,
    target: SocketAddr,
    bodies: Arc<Vec<Bytes>>,
    headers: Arc<Vec<(String, String)>>,
    schedule: Schedule,
) -> ConnectionTally {
    let mut tally = ConnectionTally::default();
    let host = target.to_string();
    let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    // Spread the connections over the prompts so concurrent requests differ.
    let mut next_prompt = id.wrapping_mul(31);
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        if Instant::now() >= schedule.measure_end {
            break;
        }
        let mut conn = match sender.take() {
            Some(conn) if !conn.is_closed() => conn,
            _ => match connect(target).await {
                Ok(conn) => conn,
                Err(err) => {
                    tally.error(&schedule, format!("connect {target}: {err:#}"));
                    // Back off a little so a dead target does not spin the CPU we measure.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let body = bodies[next_prompt % bodies.len()].clone();
        next_prompt = next_prompt.wrapping_add(1);
        let started = Instant::now();
        let outcome = send_chat(&mut conn, &host, body, &headers).await;
        if tally.record(&schedule, target, outcome, started) {
            sender = Some(conn);
        }
    }
    tally
}

/// Posts one chat completion with `body` and extra `headers` on `conn` and reads the whole
/// answer (streamed or not: latency is the complete answer): its status, why it failed, or
/// `Err(Elapsed)` past [`REQUEST_TIMEOUT`].
pub async fn send_chat(
    conn: &mut SendRequest<Full<Bytes>>,
    host: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Result<Result<StatusCode>, tokio::time::error::Elapsed> {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header(HOST, host)
        .header(CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let request = request.body(Full::new(body)).context("building request")?;
        conn.ready().await?;
        let response = conn.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        anyhow::Ok(status)
    })
    .await
}

/// Opens one keep-alive HTTP/1.1 connection; its driver runs as a task until it closes.
pub async fn connect(target: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // The connection ends when the sender is dropped or the server closes it.
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50));
        assert_eq!(percentile(&samples, 99.0), Some(99));
        assert_eq!(percentile(&samples, 99.9), Some(100));
        assert_eq!(percentile(&samples, 100.0), Some(100));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 51.0), Some(3));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn report_rates_and_milliseconds() {
        let report = LoadReport {
            completed: 500,
            errors: 0,
            first_error: None,
            latencies_us: vec![800, 900, 1000, 2500],
            measured: Duration::from_secs(2),
        };
        assert_eq!(report.requests_per_second(), 250.0);
        assert_eq!(report.percentile_ms(50.0), Some(0.9));
        assert_eq!(report.percentile_ms(99.0), Some(2.5));
    }

    #[test]
    fn prompts_are_distinct_and_sized() {
        let prompts: std::collections::HashSet<String> = (0..PROMPTS).map(prompt).collect();
        assert_eq!(prompts.len(), PROMPTS);
        assert!(prompts.iter().all(|p| p.len() == 48));
    }

    #[tokio::test]
    async fn counts_answers_of_a_tiny_server() {
        // A real socket: a minimal HTTP/1.1 server answering 200 to everything.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"{}"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let spec = LoadSpec {
            targets: vec![addr],
            connections: 2,
            model: "m".into(),
            stream: false,
            max_tokens: 4,
            headers: Vec::new(),
        };
        let schedule = Schedule::starting_now(Duration::from_millis(50), Duration::from_millis(200));
        let report = run(&spec, schedule).await.unwrap();
        server.abort();
        assert!(report.completed > 10, "{report:?}");
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.latencies_us.len() as u64, report.completed);
        assert!(report.latencies_us.is_sorted());
    }
}
