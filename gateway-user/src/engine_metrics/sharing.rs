//! One scrape per pod per period for the whole fleet of gateways, through
//! Redis.
//!
//! Every gateway replica (one per node) routes to the same pods, so without
//! sharing each engine is scraped once per period by every replica: 50
//! nodes make 50 times the scrapes, rendered in Python by the engine. With
//! a Redis configured, replicas share:
//!
//! - Before scraping a pod, a replica claims it with one script call. The
//!   claim holds the pod's owner and the time of its last scrape (Redis's
//!   clock). The owner may scrape again once its period has nearly passed;
//!   another replica only once the owner is a tick late (it died, or left),
//!   or sooner when that replica has requests in flight to the pod and so
//!   wants the faster busy pace. A pod is therefore scraped about once per
//!   period, whatever the number of replicas.
//! - The replica that scrapes publishes the parsed signals (a few hundred
//!   bytes, not the page) on one channel; every replica feeds them into its
//!   own window of that pod, as if it had scraped them itself.
//!
//! Redis only ever saves work: when a claim fails (Redis down, slow, or the
//! subscription lost) the replica scrapes the pod itself, as it would
//! without Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::parse::Scraped;

/// The channel scraped signals are published on.
const CHANNEL: &str = "turnstile:engine-metrics";
/// Prefix of each pod's claim key.
const CLAIM_PREFIX: &str = "turnstile:engine-metrics:claim:";
/// Published readings waiting for the scrape loop; beyond this they are dropped.
const QUEUE: usize = 4096;
/// Time a claim call may take before the replica scrapes on its own.
const CALL_TIMEOUT: Duration = Duration::from_millis(200);
/// Pause before subscribing again after the subscription broke.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);
/// A failing Redis is logged again at most this often.
const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// KEYS[1]: the pod's claim. ARGV: this replica, its period (ms), the
/// tolerance (ms), how long an unused claim lives (ms). Returns 1 when this
/// replica should scrape now.
const CLAIM_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local claim = redis.call('HMGET', KEYS[1], 'owner', 'at')
local at = tonumber(claim[2])
local wait = tonumber(ARGV[2]) + tonumber(ARGV[3])
if claim[1] == ARGV[1] then wait = tonumber(ARGV[2]) - tonumber(ARGV[3]) end
if at and now - at < wait then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'at', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// KEYS[1]: the pod's claim; ARGV[1]: this replica. Gives the claim up if
/// this replica holds it, so another replica scrapes at its next turn.
const RELEASE_SCRIPT: &str = r"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
";

/// Failed calls in a row after which the connection is made again.
const RECONNECT_AFTER: u32 = 2;

/// A connection to Redis that calls time out on (and that is not retried).
fn connect(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(CALL_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}

/// After a failed call, how long the replica scrapes on its own without asking Redis.
const PAUSE_AFTER_ERROR: Duration = Duration::from_secs(5);

/// Whether this replica scrapes the pod now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This replica scrapes it (and publishes what it read).
    Mine,
    /// Another replica scraped it within its period; its reading arrives on the channel.
    Theirs,
}

/// A reading another replica published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Remote {
    /// Pod key (`namespace/name`).
    pub pod: String,
    /// The metrics address scraped, so a pod that moved is not confused with its old self.
    pub addr: String,
    /// Which replica scraped it.
    pub from: String,
    /// What it read. Readers time a reading by its arrival (the channel
    /// takes milliseconds, a period is longer), so clocks skewed between
    /// nodes neither stale a reading nor bend a window's rates.
    pub scraped: Scraped,
}

/// This replica's side of the sharing.
pub struct Sharing {
    client: redis::Client,
    /// Made again after [`RECONNECT_AFTER`] failed calls in a row: a Redis
    /// that went silent (moved, or its node died) times calls out without
    /// the connection ever breaking.
    connection: std::sync::Mutex<ConnectionManager>,
    failures: std::sync::atomic::AtomicU32,
    /// Connections made again so far.
    reconnects: std::sync::atomic::AtomicU32,
    claim: Script,
    release: Script,
    replica: String,
    /// Until when Redis is not asked (it failed a call just before).
    /// (tokio's clock, which tests may pause)
    paused_until: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Whether readings of other replicas can reach us; without it, every
    /// pod is scraped here.
    subscribed: Arc<AtomicBool>,
    last_error_log: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Sharing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharing").field("replica", &self.replica).finish_non_exhaustive()
    }
}

impl Sharing {
    /// Connects lazily to `url` and subscribes (retrying until `shutdown`);
    /// returns the sharing and the readings other replicas publish.
    pub fn start(url: &str, shutdown: CancellationToken) -> Result<(Self, mpsc::Receiver<Remote>), String> {
        let client = crate::redis_link::open(url)?;
        let connection = connect(&client).map_err(|e| e.to_string())?;
        let replica = format!("{:016x}", rand::random::<u64>());
        let subscribed = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(subscribe(client.clone(), replica.clone(), sender, Arc::clone(&subscribed), shutdown));
        let sharing = Self {
            client,
            connection: std::sync::Mutex::new(connection),
            failures: std::sync::atomic::AtomicU32::new(0),
            reconnects: std::sync::atomic::AtomicU32::new(0),
            claim: Script::new(CLAIM_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            replica,
            paused_until: std::sync::Mutex::new(None),
            subscribed,
            last_error_log: std::sync::Mutex::new(None),
        };
        Ok((sharing, receiver))
    }

    /// Asks whether this replica scrapes `pod` (at `addr`) now, wanting it
    /// every `period`; `tolerance` absorbs the tick and the clocks. `None`
    /// when Redis cannot say: scrape it here.
    pub async fn claim(&self, pod: &str, addr: &str, period: Duration, tolerance: Duration) -> Option<Claim> {
        if !self.subscribed.load(Ordering::Relaxed) || self.paused() {
            return None;
        }
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let hold = period.saturating_mul(4) + Duration::from_secs(1);
        let mut connection = self.connection();
        let mut invocation = self.claim.key(format!("{CLAIM_PREFIX}{pod}@{addr}"));
        invocation.arg(&self.replica).arg(millis(period)).arg(millis(tolerance)).arg(millis(hold));
        match tokio::time::timeout(CALL_TIMEOUT, invocation.invoke_async::<i64>(&mut connection)).await {
            Ok(Ok(claimed)) => {
                self.succeeded();
                Some(if claimed == 1 { Claim::Mine } else { Claim::Theirs })
            }
            Ok(Err(err)) => {
                self.log_error("claiming a pod's scrape", &err.to_string());
                None
            }
            Err(_) => {
                self.log_error("claiming a pod's scrape", "timed out");
                None
            }
        }
    }

    /// Gives up the claim on `pod` after a failed scrape: another replica,
    /// which may reach the pod, scrapes it at its next turn.
    pub async fn release(&self, pod: &str, addr: &str) {
        if self.paused() {
            return;
        }
        let mut connection = self.connection();
        let mut invocation = self.release.key(format!("{CLAIM_PREFIX}{pod}@{addr}"));
        invocation.arg(&self.replica);
        match tokio::time::timeout(CALL_TIMEOUT, invocation.invoke_async::<i64>(&mut connection)).await {
            Ok(Ok(_)) => self.succeeded(),
            Ok(Err(err)) => self.log_error("releasing a pod's scrape", &err.to_string()),
            Err(_) => self.log_error("releasing a pod's scrape", "timed out"),
        }
    }

    fn connection(&self) -> ConnectionManager {
        self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A call went through: the connection is sound.
    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    fn paused(&self) -> bool {
        let paused_until = self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        paused_until.is_some_and(|until| tokio::time::Instant::now() < until)
    }

    /// Publishes what this replica just read from `pod`.
    pub async fn publish(&self, pod: &str, addr: &str, scraped: Scraped) {
        if self.paused() {
            return;
        }
        let remote = Remote { pod: pod.to_owned(), addr: addr.to_owned(), from: self.replica.clone(), scraped };
        let Ok(payload) = serde_json::to_string(&remote) else { return };
        let mut connection = self.connection();
        let mut command = redis::cmd("PUBLISH");
        command.arg(CHANNEL).arg(payload);
        match tokio::time::timeout(CALL_TIMEOUT, command.query_async::<i64>(&mut connection)).await {
            Ok(Ok(_)) => self.succeeded(),
            Ok(Err(err)) => self.log_error("publishing a pod's metrics", &err.to_string()),
            Err(_) => self.log_error("publishing a pod's metrics", "timed out"),
        }
    }

    /// Logs a failed call (rate-limited) and stops asking Redis for a while:
    /// a slow Redis must not hold every scrape up by its timeout.
    fn log_error(&self, doing: &str, error: &str) {
        *self.paused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(tokio::time::Instant::now() + PAUSE_AFTER_ERROR);
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= RECONNECT_AFTER
            && let Ok(fresh) = connect(&self.client)
        {
            *self.connection.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            self.succeeded();
        }
        let mut last = self.last_error_log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(doing, error, "Redis unavailable for sharing engine scrapes; scraping from this replica");
        }
    }
}

/// Receives other replicas' readings until `shutdown`, subscribing again
/// whenever the subscription breaks.
async fn subscribe(
    client: redis::Client,
    me: String,
    sender: mpsc::Sender<Remote>,
    subscribed: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut logged_down = false;
    loop {
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            result = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            } => result,
        };
        match connected {
            Ok(mut pubsub) => {
                tracing::info!("sharing engine scrapes with the other replicas through Redis");
                logged_down = false;
                subscribed.store(true, Ordering::Relaxed);
                let mut messages = pubsub.on_message();
                loop {
                    let message = tokio::select! {
                        () = shutdown.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    let Ok(remote) = serde_json::from_slice::<Remote>(message.get_payload_bytes()) else { continue };
                    if remote.from != me {
                        // A full queue drops the reading: the scrape loop is behind, and
                        // the next one supersedes it.
                        let _ = sender.try_send(remote);
                    }
                }
                subscribed.store(false, Ordering::Relaxed);
                tracing::warn!("subscription for shared engine scrapes lost; scraping every pod from this replica");
            }
            Err(err) => {
                if !logged_down {
                    tracing::warn!(error = %err, "cannot subscribe to shared engine scrapes; scraping every pod from this replica");
                    logged_down = true;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Redis that accepts connections and never answers (gone silent:
    /// moved, or its node died): after two calls time out, the connection
    /// is made again instead of waiting on the dead one.
    #[tokio::test(start_paused = true)]
    async fn a_silent_redis_gets_a_new_connection_after_two_failed_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("redis://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let shutdown = CancellationToken::new();
        let (sharing, _readings) = Sharing::start(&url, shutdown.clone()).expect("starts");
        let scraped = Scraped::default();
        sharing.publish("ns/a", "10.0.0.1:8000", scraped).await;
        assert_eq!(sharing.reconnects.load(Ordering::Relaxed), 0, "one failure is not enough");
        sharing.publish("ns/a", "10.0.0.1:8000", scraped).await;
        assert_eq!(sharing.reconnects.load(Ordering::Relaxed), 0, "paused after a failure: Redis is not asked");
        tokio::time::sleep(PAUSE_AFTER_ERROR + Duration::from_secs(1)).await;
        sharing.publish("ns/a", "10.0.0.1:8000", scraped).await;
        assert_eq!(sharing.reconnects.load(Ordering::Relaxed), 1, "two timed-out calls in a row");
        shutdown.cancel();
    }

    #[test]
    fn a_reading_travels_as_json() {
        let remote = Remote {
            pod: "ns/a".into(),
            addr: "10.0.0.1:8000".into(),
            from: "x".into(),
            scraped: Scraped { running: Some(3.0), ..Scraped::default() },
        };
        let text = serde_json::to_string(&remote).expect("serialises");
        assert_eq!(serde_json::from_str::<Remote>(&text).expect("parses"), remote);
    }
}
