//! One routing brain across the gateway replicas, through Redis.
//!
//! Turnstile runs one replica per node, and a client's requests land on any
//! of them. What a replica routes by is shared so that each decides as if it
//! had seen every replica's requests:
//!
//! - **Decisions that build state** (`prefix-cache` recording which pod was
//!   sent which prompt blocks, `vtc-basic` charging a user's tokens) go on
//!   one Redis stream. Every replica follows the stream and applies the
//!   others' decisions to its own index and counters, timed by when they
//!   were made. A replica that starts reads the stream's recent past first
//!   (within the longest window the state is kept for), so it routes a
//!   conversation that began before it existed to the pod holding it.
//! - **Requests in flight per pod** go on a pub/sub channel every 100 ms,
//!   as AIBrix shares them: least-request, power-of-two and every
//!   tie-break count the fleet's requests, not one replica's
//!   ([`PodLoad::routing_load`](crate::discovery::PodLoad::routing_load)).
//!
//! Redis is never on the request path: a decision is handed to a bounded
//! queue and the request goes on. When Redis is slow or down the queue
//! drops what it cannot hold, the shared counts lapse after 500 ms, and
//! each replica routes from its own view (and the engines' counts, which
//! every replica scrapes alike) until Redis answers again; the stream is
//! then followed from where it was left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamRangeReply, StreamReadReply};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::prefix_index::{MAX_SHARED_BLOCKS, PrefixIndex, pod_id, shared_blocks};
use super::vtc_basic::TokenTracker;
use crate::discovery::PodStore;

/// The stream decisions are shared on.
pub const STREAM: &str = "turnstile:routing";
/// The channel requests in flight are shared on.
pub const LOAD_CHANNEL: &str = "turnstile:routing:load";
/// Entries the stream keeps (approximately, as Redis trims): what a
/// starting replica can read back. An entry holds at most [`BATCH_BYTES`]
/// and one decision more (≤ 2.1 KiB), so Redis keeps at most ~100 MiB for
/// it; a chat turn's decision is about 200 bytes.
const STREAM_MAX_ENTRIES: usize = 16_384;
/// Bytes of decisions past which a stream entry takes no more.
const BATCH_BYTES: usize = 4 * 1024;
/// How long the writer waits for more decisions before adding an entry:
/// short next to the time a client takes to send a conversation's next turn.
const LINGER: Duration = Duration::from_millis(5);
/// Decisions waiting for the writer; beyond this they are dropped (counted).
const OUTBOX: usize = 8192;
/// Entries read per stream call.
const READ_COUNT: usize = 256;
/// How long one blocking stream read waits for news.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// How often a replica says what it has in flight.
const LOAD_EVERY: Duration = Duration::from_millis(100);
/// A replica silent for this long counts no more; so long do counts hold.
const LOAD_VALID: Duration = Duration::from_millis(500);
/// Time a write or publish may take.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause before reconnecting after Redis failed.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// A failing Redis is logged again at most this often.
const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// One routing decision the other replicas apply too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// `pod` (its key) was sent a prompt; `blocks` are some of its chained
    /// block hashes (see [`shared_blocks`]), 16 hex digits each.
    Prefix { pod: String, blocks: String },
    /// `user` was charged `tokens` (an estimate, or its later correction).
    Tokens { user: String, tokens: f64 },
}

impl Event {
    /// `pod` was sent a prompt with these block hashes (the ones
    /// [`shared_blocks`] picks are told).
    pub fn prefix(pod: &str, hashes: &[u64]) -> Self {
        let mut blocks = String::with_capacity((hashes.len() / 8 + 1).min(MAX_SHARED_BLOCKS) * 16);
        for hash in shared_blocks(hashes) {
            use std::fmt::Write as _;
            let _ = write!(blocks, "{hash:016x}");
        }
        Self::Prefix { pod: pod.to_owned(), blocks }
    }
}

/// The block hashes of a [`Event::Prefix`]; `None` when malformed.
fn parse_blocks(blocks: &str) -> Option<Vec<u64>> {
    if !blocks.len().is_multiple_of(16) || blocks.len() / 16 > MAX_SHARED_BLOCKS || !blocks.is_ascii() {
        return None;
    }
    (0..blocks.len()).step_by(16).map(|i| u64::from_str_radix(&blocks[i..i + 16], 16).ok()).collect()
}

/// One stream entry: a batch of one replica's decisions.
#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    from: String,
    events: Vec<Event>,
}

/// One replica's requests in flight per pod, as published every [`LOAD_EVERY`].
#[derive(Debug, Serialize, Deserialize)]
struct LoadReport {
    from: String,
    /// Pod key → requests in flight, for the pods with any.
    pods: HashMap<String, usize>,
}

/// Where strategies hand the decisions the other replicas should know.
/// Until the sharing starts (or without Redis) decisions go nowhere.
#[derive(Debug, Default)]
pub struct Link {
    outbox: OnceLock<mpsc::Sender<Event>>,
    dropped: AtomicU64,
}

impl Link {
    /// Queues `event` for the other replicas, never waiting: a full queue
    /// (Redis slow or down) drops it.
    pub fn send(&self, event: Event) {
        if let Some(outbox) = self.outbox.get()
            && outbox.try_send(event).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Decisions dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The routing state replicas share, and the link decisions leave by.
#[derive(Debug)]
pub struct FleetState {
    pub link: Arc<Link>,
    /// `prefix-cache`'s index.
    pub prefix: Arc<PrefixIndex>,
    /// `vtc-basic`'s token counts.
    pub tokens: Arc<TokenTracker>,
    /// How far back a starting replica reads: the longest the state keeps.
    pub history: Duration,
}

/// This replica's view of the sharing, for `/readyz` and tests.
#[derive(Debug, Default)]
pub struct Status {
    /// Following the stream (caught up with its past).
    pub following: AtomicBool,
    /// Hearing the other replicas' loads.
    pub hearing_loads: AtomicBool,
    /// Other replicas heard from within the last 500 ms.
    pub peers: std::sync::atomic::AtomicUsize,
}

/// Starts sharing through the Redis at `url` until `shutdown`. Returns the
/// status and a receiver that turns true once the stream's past has been
/// read (or reading it failed: the replica starts from its own view).
pub fn spawn(
    url: &str,
    state: &Arc<FleetState>,
    pods: Arc<PodStore>,
    shutdown: CancellationToken,
) -> Result<(Arc<Status>, watch::Receiver<bool>), String> {
    let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(CALL_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(0);
    let connection = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(|e| e.to_string())?;
    let (outbox, inbox) = mpsc::channel(OUTBOX);
    if state.link.outbox.set(outbox).is_err() {
        return Err("routing state is already shared".into());
    }
    let replica = format!("{:016x}", rand::random::<u64>());
    let status = Arc::new(Status::default());
    let (caught_up, caught_up_rx) = watch::channel(false);
    let log = Arc::new(ErrorLog::default());
    tokio::spawn(write(connection.clone(), replica.clone(), inbox, Arc::clone(&log), shutdown.clone()));
    tokio::spawn(follow(
        client.clone(),
        replica.clone(),
        Arc::clone(state),
        Arc::clone(&status),
        caught_up,
        Arc::clone(&log),
        shutdown.clone(),
    ));
    tokio::spawn(share_load(client, connection, replica, pods, Arc::clone(&status), log, shutdown));
    Ok((status, caught_up_rx))
}

/// Logs Redis trouble at most every [`LOG_INTERVAL`].
#[derive(Debug, Default)]
struct ErrorLog(Mutex<Option<Instant>>);

impl ErrorLog {
    fn warn(&self, doing: &str, error: &dyn std::fmt::Display) {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(doing, error = %error, "Redis unavailable for sharing routing state; routing from this replica's own view");
        }
    }
}

/// Adds the queued decisions to the stream, in batches, until `shutdown`.
async fn write(
    mut connection: ConnectionManager,
    replica: String,
    mut inbox: mpsc::Receiver<Event>,
    log: Arc<ErrorLog>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            event = inbox.recv() => match event { Some(event) => event, None => return },
        };
        let mut batch = Batch { from: replica.clone(), events: vec![first] };
        let mut bytes = 0;
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while bytes < BATCH_BYTES {
            tokio::select! {
                () = &mut linger => break,
                event = inbox.recv() => match event {
                    Some(event) => {
                        bytes += match &event {
                            Event::Prefix { pod, blocks } => pod.len() + blocks.len() + 40,
                            Event::Tokens { user, .. } => user.len() + 40,
                        };
                        batch.events.push(event);
                    }
                    None => break,
                },
            }
        }
        let Ok(payload) = serde_json::to_string(&batch) else { continue };
        let mut command = redis::cmd("XADD");
        command.arg(STREAM).arg("MAXLEN").arg("~").arg(STREAM_MAX_ENTRIES).arg("*").arg("b").arg(payload);
        match tokio::time::timeout(CALL_TIMEOUT, command.query_async::<String>(&mut connection)).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => log.warn("adding routing decisions", &err),
            Err(_) => log.warn("adding routing decisions", &"timed out"),
        }
    }
}

/// Milliseconds of the Unix epoch on this host's clock.
fn wall_ms() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i128)
}

/// The millisecond part of a stream entry id (`<ms>-<seq>`).
fn id_ms(id: &str) -> Option<i128> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

/// Follows the stream until `shutdown`, reconnecting after failures and
/// going on from the last entry read.
async fn follow(
    client: redis::Client,
    replica: String,
    state: Arc<FleetState>,
    status: Arc<Status>,
    caught_up: watch::Sender<bool>,
    log: Arc<ErrorLog>,
    shutdown: CancellationToken,
) {
    let mut last: Option<String> = None;
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = read_stream(&client, &replica, &state, &status, &caught_up, &mut last) => outcome,
        };
        status.following.store(false, Ordering::Relaxed);
        // A replica that cannot read the past starts from its own view.
        caught_up.send_replace(true);
        if let Err(err) = outcome {
            log.warn("following routing decisions", &err);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
}

/// Reads the stream's recent past (the first time), then its news.
async fn read_stream(
    client: &redis::Client,
    replica: &str,
    state: &FleetState,
    status: &Status,
    caught_up: &watch::Sender<bool>,
    last: &mut Option<String>,
) -> redis::RedisResult<()> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(2)));
    let mut connection = client.get_multiplexed_async_connection_with_config(&config).await?;
    let (seconds, micros): (i128, i128) = redis::cmd("TIME").query_async(&mut connection).await?;
    // Redis's clock less ours: entry ids are Redis's milliseconds.
    let skew = seconds * 1000 + micros / 1000 - wall_ms();
    let age = |id: &str| {
        let ms = id_ms(id).unwrap_or(i128::MAX);
        Duration::from_millis(u64::try_from(wall_ms() + skew - ms).unwrap_or(0))
    };
    if last.is_none() {
        let history = i128::try_from(state.history.as_millis()).unwrap_or(i128::MAX);
        let mut start = format!("{}", (wall_ms() + skew - history).max(0));
        let mut read = 0usize;
        loop {
            let reply: StreamRangeReply = redis::cmd("XRANGE")
                .arg(STREAM)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(READ_COUNT)
                .query_async(&mut connection)
                .await?;
            let count = reply.ids.len();
            for entry in &reply.ids {
                read += apply(state, replica, entry.map.get("b"), age(&entry.id));
                *last = Some(entry.id.clone());
            }
            match last {
                Some(id) if count == READ_COUNT => start = format!("({id}"),
                _ => break,
            }
        }
        if last.is_none() {
            *last = Some(format!("{}-0", (wall_ms() + skew - 1).max(0)));
        }
        tracing::info!(decisions = read, "routing state: read the other replicas' recent decisions");
    }
    caught_up.send_replace(true);
    status.following.store(true, Ordering::Relaxed);
    loop {
        let from = last.clone().unwrap_or_else(|| "$".into());
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(u64::try_from(READ_BLOCK.as_millis()).unwrap_or(1000))
            .arg("STREAMS")
            .arg(STREAM)
            .arg(&from)
            .query_async(&mut connection)
            .await?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                apply(state, replica, entry.map.get("b"), age(&entry.id));
                *last = Some(entry.id);
            }
        }
    }
}

/// Applies another replica's batch, made `age` ago; returns the decisions applied.
fn apply(state: &FleetState, replica: &str, payload: Option<&redis::Value>, age: Duration) -> usize {
    let Some(redis::Value::BulkString(bytes)) = payload else { return 0 };
    let Ok(batch) = serde_json::from_slice::<Batch>(bytes) else { return 0 };
    if batch.from == replica {
        return 0;
    }
    let now = Instant::now();
    let at = now.checked_sub(age).unwrap_or(now);
    let mut applied = 0;
    for event in batch.events {
        match event {
            Event::Prefix { pod, blocks } => {
                if let Some(hashes) = parse_blocks(&blocks) {
                    state.prefix.record_at(&hashes, pod_id(&pod), at);
                    applied += 1;
                }
            }
            Event::Tokens { user, tokens } if tokens.is_finite() && !user.is_empty() => {
                state.tokens.add(&user, tokens, at);
                applied += 1;
            }
            Event::Tokens { .. } => {}
        }
    }
    applied
}

/// Every [`LOAD_EVERY`], says what this replica has in flight per pod and
/// gives each pod the sum the other replicas said, until `shutdown`.
async fn share_load(
    client: redis::Client,
    mut connection: ConnectionManager,
    replica: String,
    pods: Arc<PodStore>,
    status: Arc<Status>,
    log: Arc<ErrorLog>,
    shutdown: CancellationToken,
) {
    let (reports, mut heard) = mpsc::channel::<LoadReport>(1024);
    tokio::spawn(hear_loads(client, replica.clone(), reports, Arc::clone(&status), Arc::clone(&log), shutdown.clone()));
    let mut others: HashMap<String, (Instant, HashMap<String, usize>)> = HashMap::new();
    let mut tick = tokio::time::interval(LOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = pods.snapshot();
        let mine: HashMap<String, usize> = snapshot
            .models
            .values()
            .flat_map(|model| model.pods.iter())
            .filter(|pod| pod.load.in_flight() > 0)
            .map(|pod| (pod.key.clone(), pod.load.in_flight()))
            .collect();
        if let Ok(payload) = serde_json::to_string(&LoadReport { from: replica.clone(), pods: mine }) {
            let mut command = redis::cmd("PUBLISH");
            command.arg(LOAD_CHANNEL).arg(payload);
            match tokio::time::timeout(CALL_TIMEOUT, command.query_async::<i64>(&mut connection)).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => log.warn("publishing requests in flight", &err),
                Err(_) => log.warn("publishing requests in flight", &"timed out"),
            }
        }
        let now = Instant::now();
        while let Ok(report) = heard.try_recv() {
            others.insert(report.from, (now, report.pods));
        }
        others.retain(|_, (at, _)| now.saturating_duration_since(*at) < LOAD_VALID);
        status.peers.store(others.len(), Ordering::Relaxed);
        if !status.hearing_loads.load(Ordering::Relaxed) {
            // Not hearing: the counts lapse and routing uses its own view.
            continue;
        }
        let mut sums: HashMap<&str, usize> = HashMap::new();
        for (_, counts) in others.values() {
            for (pod, count) in counts {
                let sum = sums.entry(pod.as_str()).or_default();
                *sum = sum.saturating_add(*count);
            }
        }
        for pod in snapshot.models.values().flat_map(|model| model.pods.iter()) {
            pod.load.others_in_flight(sums.get(pod.key.as_str()).copied().unwrap_or(0), LOAD_VALID);
        }
    }
}

/// Receives the other replicas' load reports until `shutdown`, subscribing
/// again whenever the subscription breaks.
async fn hear_loads(
    client: redis::Client,
    replica: String,
    reports: mpsc::Sender<LoadReport>,
    status: Arc<Status>,
    log: Arc<ErrorLog>,
    shutdown: CancellationToken,
) {
    loop {
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            result = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(LOAD_CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            } => result,
        };
        match connected {
            Ok(mut pubsub) => {
                status.hearing_loads.store(true, Ordering::Relaxed);
                let mut messages = pubsub.on_message();
                loop {
                    let message = tokio::select! {
                        () = shutdown.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    let Ok(report) = serde_json::from_slice::<LoadReport>(message.get_payload_bytes()) else {
                        continue;
                    };
                    if report.from != replica {
                        let _ = reports.try_send(report);
                    }
                }
                status.hearing_loads.store(false, Ordering::Relaxed);
                log.warn("hearing the other replicas' requests in flight", &"subscription lost");
            }
            Err(err) => log.warn("hearing the other replicas' requests in flight", &err),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_decision_names_its_leading_blocks() {
        let hashes: Vec<u64> = (0..20u64).map(|i| i.wrapping_mul(0x0123_4567_89ab_cdef).wrapping_add(i)).collect();
        let Event::Prefix { pod, blocks } = Event::prefix("ns/a", &hashes) else { panic!("a prefix event") };
        assert_eq!(pod, "ns/a");
        assert_eq!(parse_blocks(&blocks), Some(vec![hashes[7], hashes[15], hashes[19]]));
        assert_eq!(parse_blocks("0123"), None, "not whole hashes");
        assert_eq!(parse_blocks("zzzzzzzzzzzzzzzz"), None, "not hex");
        assert_eq!(parse_blocks(&"0".repeat(16 * (MAX_SHARED_BLOCKS + 1))), None, "too many");
    }

    fn state() -> FleetState {
        FleetState {
            link: Arc::default(),
            prefix: Arc::new(PrefixIndex::new(1000, Duration::from_secs(60))),
            tokens: Arc::new(TokenTracker::new(Duration::from_secs(60))),
            history: Duration::from_secs(60),
        }
    }

    fn payload(batch: &Batch) -> redis::Value {
        redis::Value::BulkString(serde_json::to_vec(batch).expect("serialises"))
    }

    #[test]
    fn another_replicas_decisions_are_applied_and_our_own_skipped() {
        let state = state();
        let hashes = [11u64, 22, 33, 44, 55, 66, 77, 88, 99];
        let theirs = Batch {
            from: "them".into(),
            events: vec![
                Event::prefix("ns/a", &hashes),
                Event::Tokens { user: "alice".into(), tokens: 500.0 },
                Event::Tokens { user: String::new(), tokens: 3.0 },
                Event::Prefix { pod: "ns/b".into(), blocks: "junk".into() },
            ],
        };
        assert_eq!(apply(&state, "me", Some(&payload(&theirs)), Duration::from_secs(1)), 2);
        let mut depths = Vec::new();
        state.prefix.match_depths(&hashes, &[pod_id("ns/a"), pod_id("ns/b")], &mut depths);
        assert_eq!(depths, [9, 0], "told of blocks 8 and 9, `ns/a` holds all nine");
        assert_eq!(state.tokens.tokens("alice", Instant::now()), 500.0);
        let ours = Batch { from: "me".into(), events: vec![Event::Tokens { user: "alice".into(), tokens: 1.0 }] };
        assert_eq!(apply(&state, "me", Some(&payload(&ours)), Duration::ZERO), 0);
        assert_eq!(apply(&state, "me", Some(&redis::Value::BulkString(b"{".to_vec())), Duration::ZERO), 0);
        assert_eq!(apply(&state, "me", None, Duration::ZERO), 0);
    }

    #[test]
    fn decisions_older_than_the_index_keeps_are_not_held() {
        let state = state();
        let batch = Batch { from: "them".into(), events: vec![Event::prefix("ns/a", &[7, 8])] };
        apply(&state, "me", Some(&payload(&batch)), Duration::from_secs(120));
        let mut depths = Vec::new();
        state.prefix.match_depths(&[7, 8], &[pod_id("ns/a")], &mut depths);
        assert_eq!(depths, [0], "made two minutes ago, held for one");
    }

    #[test]
    fn without_sharing_decisions_go_nowhere_and_a_full_queue_drops() {
        let link = Link::default();
        link.send(Event::Tokens { user: "u".into(), tokens: 1.0 });
        assert_eq!(link.dropped(), 0, "not connected: nothing to drop");
        let (outbox, _inbox) = mpsc::channel(1);
        link.outbox.set(outbox).expect("first");
        link.send(Event::Tokens { user: "u".into(), tokens: 1.0 });
        link.send(Event::Tokens { user: "u".into(), tokens: 2.0 });
        assert_eq!(link.dropped(), 1);
    }

    #[test]
    fn stream_ids_give_their_milliseconds() {
        assert_eq!(id_ms("1700000000123-4"), Some(1_700_000_000_123));
        assert_eq!(id_ms("nope"), None);
    }
}
