//! The soak's hostile mix (issue 22): what a careless or hostile client
//! sends, alongside the well-behaved load.
//!
//! - **Large `auto` prompts**: 1 MB prompts without spaces with
//!   `config-profile: auto`, one at a time (each must be answered 200 and
//!   routed by the long-prompt profile).
//! - **HTTP/2 bursts**: every few seconds, several h2c connections open a
//!   hundred streams each at once (each stream must be answered, 200 or a
//!   503 from the in-flight limit).
//! - **Many users**: a stream of requests each from a user never seen
//!   before, against the default per-user RPM limit, so the per-user
//!   counters keep growing (each must be answered 200).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::net::TcpStream;

use crate::client::Client;

/// Length of a large prompt.
const LARGE_PROMPT_BYTES: usize = 1 << 20;
/// h2c connections per burst, and streams per connection.
const BURST_CONNECTIONS: usize = 4;
const BURST_STREAMS: usize = 100;
/// Time between two bursts.
const BURST_EVERY: Duration = Duration::from_secs(10);
/// Concurrent new-user requests.
const USER_WORKERS: usize = 2;

/// What the hostile mix saw.
#[derive(Debug, Default)]
pub struct HostileReport {
    large_ok: AtomicU64,
    large_failed: AtomicU64,
    burst_ok: AtomicU64,
    burst_refused: AtomicU64,
    burst_failed: AtomicU64,
    users_ok: AtomicU64,
    users_failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl HostileReport {
    fn failed(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.first_failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(what);
    }

    /// Requests answered as expected, and the others.
    pub fn totals(&self) -> (u64, u64) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (
            get(&self.large_ok) + get(&self.burst_ok) + get(&self.burst_refused) + get(&self.users_ok),
            get(&self.large_failed) + get(&self.burst_failed) + get(&self.users_failed),
        )
    }

    /// Whether each kind of hostile traffic was sent and answered at all.
    pub fn each_kind_answered(&self) -> bool {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        get(&self.large_ok) > 0 && get(&self.burst_ok) > 0 && get(&self.users_ok) > 0
    }

    /// One line per kind of hostile traffic.
    pub fn lines(&self) -> Vec<String> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut lines = vec![
            format!("large auto prompts: {} ok, {} failed", get(&self.large_ok), get(&self.large_failed)),
            format!(
                "h2 bursts: {} ok, {} refused by the in-flight limit, {} failed",
                get(&self.burst_ok),
                get(&self.burst_refused),
                get(&self.burst_failed)
            ),
            format!("new users: {} ok, {} failed", get(&self.users_ok), get(&self.users_failed)),
        ];
        if let Some(first) = self.first_failure.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            lines.push(format!("first hostile failure: {first}"));
        }
        lines
    }
}

/// Runs the three hostile loads against `listen` until `until`.
pub async fn run(listen: SocketAddr, model: &'static str, until: Instant, report: Arc<HostileReport>) {
    let mut tasks = vec![
        tokio::spawn(large_prompts(listen, model, until, Arc::clone(&report))),
        tokio::spawn(bursts(listen, model, until, Arc::clone(&report))),
    ];
    let next_user = Arc::new(AtomicU64::new(0));
    for _ in 0..USER_WORKERS {
        tasks.push(tokio::spawn(new_users(listen, model, until, Arc::clone(&next_user), Arc::clone(&report))));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn large_prompts(listen: SocketAddr, model: &str, until: Instant, report: Arc<HostileReport>) {
    let client = Client::new();
    let body = serde_json::json!({"model": model, "prompt": "x".repeat(LARGE_PROMPT_BYTES), "max_tokens": 1});
    while Instant::now() < until {
        let headers = [("config-profile", "auto")];
        match client.post_json(listen, "/v1/completions", &headers, &body, Duration::from_secs(30)).await {
            Ok(reply) if reply.status == 200 && reply.header("x-aibrix-config-profile") == "long" => {
                report.large_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) => {
                let profile = reply.header("x-aibrix-config-profile");
                report.failed(
                    &report.large_failed,
                    format!("large prompt: {} ({profile}) {}", reply.status, reply.text()),
                );
            }
            Err(err) => report.failed(&report.large_failed, format!("large prompt: {err:#}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn bursts(listen: SocketAddr, model: &str, until: Instant, report: Arc<HostileReport>) {
    let body = Bytes::from(
        serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            .to_string(),
    );
    while Instant::now() + BURST_EVERY < until {
        tokio::time::sleep(BURST_EVERY).await;
        let mut streams = Vec::new();
        for _ in 0..BURST_CONNECTIONS {
            let sender = match h2_connect(listen).await {
                Ok(sender) => sender,
                Err(err) => {
                    report.failed(&report.burst_failed, format!("h2 connect: {err}"));
                    continue;
                }
            };
            for _ in 0..BURST_STREAMS {
                let mut sender = sender.clone();
                let request = Request::post(format!("http://{listen}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()));
                streams.push(tokio::spawn(async move {
                    let request = request.map_err(|e| e.to_string())?;
                    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
                    let status = response.status().as_u16();
                    response.into_body().collect().await.map_err(|e| e.to_string())?;
                    Ok::<u16, String>(status)
                }));
            }
        }
        for stream in streams {
            match stream.await {
                Ok(Ok(200)) => {
                    report.burst_ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(503)) => {
                    report.burst_refused.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(status)) => report.failed(&report.burst_failed, format!("h2 burst stream: status {status}")),
                Ok(Err(err)) => report.failed(&report.burst_failed, format!("h2 burst stream: {err}")),
                Err(err) => report.failed(&report.burst_failed, format!("h2 burst task: {err}")),
            }
        }
    }
}

async fn h2_connect(listen: SocketAddr) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(listen).await.map_err(|e| e.to_string())?;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn new_users(
    listen: SocketAddr,
    model: &str,
    until: Instant,
    next_user: Arc<AtomicU64>,
    report: Arc<HostileReport>,
) {
    let client = Client::new();
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    while Instant::now() < until {
        let user = format!("soak-user-{}", next_user.fetch_add(1, Ordering::Relaxed));
        match client.post_json(listen, "/v1/chat/completions", &[("user", &user)], &body, Duration::from_secs(10)).await
        {
            Ok(reply) if reply.status == 200 => {
                report.users_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) => report.failed(&report.users_failed, format!("user {user}: {} {}", reply.status, reply.text())),
            Err(err) => report.failed(&report.users_failed, format!("user {user}: {err:#}")),
        }
    }
}
