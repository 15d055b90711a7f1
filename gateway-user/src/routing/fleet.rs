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
//! - **Requests in flight per pod** go on a pub/sub channel as they change
//!   (every 1 ms at most, less often as the fleet grows, and every 300 ms
//!   regardless), as AIBrix shares them: least-request, power-of-two and
//!   every tie-break count the fleet's requests, not one replica's
//!   ([`PodLoad::routing_load`](crate::discovery::PodLoad::routing_load)).
//!
//! Redis is never on the request path: a decision is handed to a bounded
//! queue and the request goes on. When Redis is slow or down the queue
//! drops what it cannot hold, the shared counts lapse after a second, and
//! each replica routes from its own view (and the engines' counts, which
//! every replica scrapes alike) until Redis answers again; the stream is
//! then followed from where it was left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::prefix_index::{PrefixIndex, SHARED_BLOCKS, pod_id, shared_blocks};
use super::vtc_basic::TokenTracker;
use crate::discovery::PodStore;

/// The stream decisions are shared on.
pub const STREAM: &str = "turnstile:routing";
/// The channel requests in flight are shared on.
pub const LOAD_CHANNEL: &str = "turnstile:routing:load";
/// Entries the stream keeps (approximately, as Redis trims): what a
/// starting replica can read back. An entry holds at most [`BATCH_BYTES`]
/// and one decision more (≤ 1.1 KiB), so Redis keeps at most ~50 MiB for
/// it; a chat turn's decision is about 200 bytes.
const STREAM_MAX_ENTRIES: usize = 16_384;
/// Bytes of decisions past which a stream entry takes no more.
const BATCH_BYTES: usize = 2 * 1024;
/// How long the writer waits for more decisions before adding an entry:
/// short next to the time a client takes to send a conversation's next turn.
const LINGER: Duration = Duration::from_millis(5);
/// Decisions waiting for the writer; beyond this they are dropped (counted).
const OUTBOX: usize = 8192;
/// Entries read per stream call.
const READ_COUNT: usize = 256;
/// How long one blocking stream read waits for news.
const READ_BLOCK: Duration = Duration::from_millis(500);
/// The least time between two reports of a replica's requests in flight,
/// which it sends as they change: requests last tens of milliseconds, and
/// counts older than a few send every replica to the pod that was
/// emptiest, which no longer is.
const LOAD_EVERY: Duration = Duration::from_millis(1);
/// Reports Redis delivers per second at most, all replicas together: each
/// replica's gap between reports widens with the square of the fleet.
const LOAD_DELIVERIES_PER_SECOND: f64 = 20_000.0;
/// Bytes of reports Redis delivers per second at most, all replicas together.
const LOAD_BYTES_PER_SECOND: f64 = 20e6;
/// A replica says what it has in flight at least this often, changed or not.
const LOAD_HEARTBEAT: Duration = Duration::from_millis(300);
/// A replica silent for this long counts no more; so long do shared counts hold.
const LOAD_VALID: Duration = Duration::from_secs(1);
/// A subscription that hears nothing (not even this replica's own
/// heartbeat) for this long is made again.
const SILENT_SUBSCRIPTION: Duration = Duration::from_secs(1);
/// Replicas, and pods per replica, whose loads are kept at most.
const MAX_PEERS: usize = 4096;
const MAX_PODS_PER_REPORT: usize = 20_000;
/// Most requests in flight believed of one replica on one pod.
const MAX_IN_FLIGHT: usize = 100_000;
/// Most tokens believed of one charge (a 1M-token prompt with a 1M-token answer is 3M).
const MAX_CHARGE: f64 = 1e8;
/// Time a write, publish, connect or subscribe may take.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Unacknowledged bytes on a Redis socket for this long break it (a Redis
/// that went away without closing its connections).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(2);
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
        let mut blocks = String::with_capacity((SHARED_BLOCKS + 1) * 16);
        for hash in shared_blocks(hashes) {
            use std::fmt::Write as _;
            let _ = write!(blocks, "{hash:016x}");
        }
        Self::Prefix { pod: pod.to_owned(), blocks }
    }

    fn size(&self) -> usize {
        match self {
            Self::Prefix { pod, blocks } => pod.len() + blocks.len() + 40,
            Self::Tokens { user, .. } => user.len() + 40,
        }
    }
}

/// The block hashes of a [`Event::Prefix`]; `None` when malformed.
fn parse_blocks(blocks: &str) -> Option<Vec<u64>> {
    if !blocks.len().is_multiple_of(16) || blocks.len() / 16 > SHARED_BLOCKS + 1 || !blocks.is_ascii() {
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

/// One replica's requests in flight per pod.
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
    outbox: OnceLock<tokio::sync::mpsc::Sender<Event>>,
    dropped: AtomicU64,
}

impl Link {
    /// Whether decisions are shared at all (a Redis is configured): when
    /// not, callers need not build them.
    pub fn is_sharing(&self) -> bool {
        self.outbox.get().is_some()
    }

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

/// This replica's place among the replicas it hears: `(ordinal, replicas)`
/// packed in one word, `(0, 1)` alone.
static TURN: AtomicU64 = AtomicU64::new(1);

/// This replica's place among the replicas it hears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Turn {
    ordinal: usize,
    replicas: usize,
}

impl Turn {
    /// 0 for the candidates that are this replica's share of `count` on a
    /// tie, 1 for the others. The candidates (in the pod store's order, the
    /// same on every replica) are cut into one contiguous share per replica
    /// (with fewer candidates than replicas, replica `k` takes candidate
    /// `k mod count`). Replicas that see the same pods tied (all idle, or
    /// the same counts) then choose different ones instead of each
    /// choosing at random and colliding. In a random sample of a large
    /// fleet the shares are random too, which does no harm.
    pub fn not_mine(self, candidate: usize, count: usize) -> u8 {
        if self.replicas <= 1 || count == 0 {
            return 0;
        }
        let mine = if count < self.replicas {
            candidate == self.ordinal % count
        } else {
            candidate * self.replicas / count == self.ordinal
        };
        u8::from(!mine)
    }
}

/// This replica's turn (see [`Turn::not_mine`]).
pub fn turn_of() -> Turn {
    let packed = TURN.load(Ordering::Relaxed);
    let replicas = usize::try_from(packed & 0xffff_ffff).unwrap_or(1).max(1);
    let ordinal = usize::try_from(packed >> 32).unwrap_or(0) % replicas;
    Turn { ordinal, replicas }
}

/// This replica's place among `others` (replica ids) and itself, in the
/// order of their ids.
fn turn_among<'a>(me: &str, others: impl Iterator<Item = &'a String>) -> Turn {
    let mut ids: Vec<&str> = others.map(String::as_str).filter(|id| *id != me).collect();
    ids.push(me);
    ids.sort_unstable();
    Turn { ordinal: ids.iter().position(|id| *id == me).unwrap_or(0), replicas: ids.len() }
}

/// Takes this replica's place among `others` and itself.
fn set_turn<'a>(me: &str, others: impl Iterator<Item = &'a String>) {
    let turn = turn_among(me, others);
    let replicas = turn.replicas.min(u32::MAX as usize) as u64;
    TURN.store(((turn.ordinal as u64) << 32) | replicas, Ordering::Relaxed);
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

/// How the sharing goes, for `/readyz`.
#[derive(Debug)]
pub struct Status {
    /// Following the stream (caught up with its past).
    following: AtomicBool,
    /// Hearing the other replicas' loads.
    hearing_loads: AtomicBool,
    /// Other replicas heard from within [`LOAD_VALID`].
    peers: AtomicUsize,
    link: Arc<Link>,
}

impl Status {
    /// The `routing_state` detail of `/readyz`.
    pub fn readiness(&self) -> serde_json::Value {
        serde_json::json!({
            "following_decisions": self.following.load(Ordering::Relaxed),
            "hearing_loads": self.hearing_loads.load(Ordering::Relaxed),
            "peers": self.peers.load(Ordering::Relaxed),
            "decisions_dropped": self.link.dropped(),
        })
    }
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
    let info = crate::redis_link::connection_info(url)?
        .set_tcp_settings(TcpSettings::default().set_user_timeout(TCP_USER_TIMEOUT));
    let client = crate::redis_link::client(info)?;
    let (outbox, inbox) = tokio::sync::mpsc::channel(OUTBOX);
    if state.link.outbox.set(outbox).is_err() {
        return Err("routing state is already shared".into());
    }
    let replica = format!("{:016x}", rand::random::<u64>());
    let status = Arc::new(Status {
        following: AtomicBool::new(false),
        hearing_loads: AtomicBool::new(false),
        peers: AtomicUsize::new(0),
        link: Arc::clone(&state.link),
    });
    let (caught_up, caught_up_rx) = watch::channel(false);
    let log = Arc::new(ErrorLog::default());
    let writer = Caller::new(client.clone(), Arc::clone(&log))?;
    tokio::spawn(write(writer, replica.clone(), inbox, shutdown.clone()));
    tokio::spawn(follow(
        client.clone(),
        replica.clone(),
        Arc::clone(state),
        Arc::clone(&status),
        caught_up,
        Arc::clone(&log),
        shutdown.clone(),
    ));
    let publisher = Caller::new(client.clone(), Arc::clone(&log))?;
    let others: Others = Arc::default();
    let hearing = (Arc::clone(&others), Arc::clone(&pods), Arc::clone(&status));
    tokio::spawn(hear_loads(client, replica.clone(), hearing, log, shutdown.clone()));
    tokio::spawn(share_load(publisher, replica, others, pods, Arc::clone(&status), shutdown));
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

/// Sends commands on a connection made again after two failures in a row:
/// a Redis that went silent (moved, or its node died) times calls out
/// without the connection ever breaking.
struct Caller {
    client: redis::Client,
    connection: ConnectionManager,
    failures: u32,
    log: Arc<ErrorLog>,
}

impl Caller {
    fn new(client: redis::Client, log: Arc<ErrorLog>) -> Result<Self, String> {
        let connection = Self::connect(&client).map_err(|e| e.to_string())?;
        Ok(Self { client, connection, failures: 0, log })
    }

    fn connect(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(0);
        ConnectionManager::new_lazy_with_config(client.clone(), config)
    }

    /// Runs `command`; `None` when it failed (logged).
    async fn call<T: redis::FromRedisValue>(&mut self, command: &redis::Cmd, doing: &str) -> Option<T> {
        let outcome = tokio::time::timeout(CALL_TIMEOUT, command.query_async::<T>(&mut self.connection)).await;
        let error = match outcome {
            Ok(Ok(value)) => {
                self.failures = 0;
                return Some(value);
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        self.log.warn(doing, &error);
        self.failures += 1;
        if self.failures >= 2
            && let Ok(connection) = Self::connect(&self.client)
        {
            self.connection = connection;
            self.failures = 0;
        }
        None
    }
}

/// Adds the queued decisions to the stream, in batches, until `shutdown`.
async fn write(
    mut caller: Caller,
    replica: String,
    mut inbox: tokio::sync::mpsc::Receiver<Event>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            event = inbox.recv() => match event { Some(event) => event, None => return },
        };
        let mut bytes = first.size();
        let mut batch = Batch { from: replica.clone(), events: vec![first] };
        let linger = tokio::time::sleep(LINGER);
        tokio::pin!(linger);
        while bytes < BATCH_BYTES {
            tokio::select! {
                () = &mut linger => break,
                event = inbox.recv() => match event {
                    Some(event) => {
                        bytes += event.size();
                        batch.events.push(event);
                    }
                    None => break,
                },
            }
        }
        let Ok(payload) = serde_json::to_string(&batch) else { continue };
        let mut command = redis::cmd("XADD");
        command.arg(STREAM).arg("MAXLEN").arg("~").arg(STREAM_MAX_ENTRIES).arg("*").arg("b").arg(payload);
        let _: Option<redis::Value> = caller.call(&command, "adding routing decisions").await;
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

/// One stream entry as read: its id and its batch, if it has one.
struct Entry {
    id: String,
    payload: Option<Vec<u8>>,
}

/// The entries of an `XRANGE` reply, or of one stream of an `XREAD` reply,
/// read leniently: whatever another writer put in the stream, the entry
/// ids come through and what is not a batch is skipped.
fn entries(value: redis::Value) -> Vec<Entry> {
    let redis::Value::Array(items) = value else { return Vec::new() };
    items
        .into_iter()
        .filter_map(|item| {
            let redis::Value::Array(mut parts) = item else { return None };
            if parts.len() != 2 {
                return None;
            }
            let fields = parts.pop()?;
            let redis::Value::BulkString(id) = parts.pop()? else { return None };
            let id = String::from_utf8(id).ok()?;
            let payload = match fields {
                redis::Value::Array(fields) => fields
                    .chunks_exact(2)
                    .find(|pair| matches!(&pair[0], redis::Value::BulkString(name) if name == b"b"))
                    .and_then(|pair| match &pair[1] {
                        redis::Value::BulkString(bytes) => Some(bytes.clone()),
                        _ => None,
                    }),
                _ => None,
            };
            Some(Entry { id, payload })
        })
        .collect()
}

/// The entries of an `XREAD` reply for [`STREAM`] (none on a timeout).
fn read_entries(value: redis::Value) -> Vec<Entry> {
    let streams = match value {
        redis::Value::Array(streams) => streams,
        redis::Value::Map(pairs) => pairs.into_iter().map(|(k, v)| redis::Value::Array(vec![k, v])).collect(),
        _ => return Vec::new(),
    };
    streams
        .into_iter()
        .filter_map(|stream| match stream {
            redis::Value::Array(mut parts) if parts.len() == 2 => parts.pop(),
            _ => None,
        })
        .flat_map(entries)
        .collect()
}

/// Reads the stream's recent past (the first time), then its news.
async fn read_stream(
    client: &redis::Client,
    replica: &str,
    state: &Arc<FleetState>,
    status: &Status,
    caught_up: &watch::Sender<bool>,
    last: &mut Option<String>,
) -> redis::RedisResult<()> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CALL_TIMEOUT))
        .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(1)));
    let mut connection = client.get_multiplexed_async_connection_with_config(&config).await?;
    let (seconds, micros): (i128, i128) = redis::cmd("TIME").query_async(&mut connection).await?;
    // Redis's clock less ours: entry ids are Redis's milliseconds.
    let skew = seconds * 1000 + micros / 1000 - wall_ms();
    if last.is_none() {
        let history = i128::try_from(state.history.as_millis()).unwrap_or(i128::MAX);
        let start = (wall_ms() + skew - history).max(0);
        let mut from = format!("{start}");
        let mut read = 0usize;
        loop {
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(STREAM)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(READ_COUNT)
                .query_async(&mut connection)
                .await?;
            let page = entries(reply);
            let full = page.len() == READ_COUNT;
            if let Some(entry) = page.last() {
                *last = Some(entry.id.clone());
                from = format!("({})", entry.id);
            }
            read += apply_page(state, replica, page, skew).await;
            if !full {
                break;
            }
        }
        // Entries added from here on follow the start of the window read.
        last.get_or_insert_with(|| format!("{start}-0"));
        tracing::info!(decisions = read, "routing state: read the other replicas' recent decisions");
    }
    caught_up.send_replace(true);
    status.following.store(true, Ordering::Relaxed);
    loop {
        let from = last.clone().unwrap_or_else(|| "$".into());
        let reply: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(u64::try_from(READ_BLOCK.as_millis()).unwrap_or(500))
            .arg("STREAMS")
            .arg(STREAM)
            .arg(&from)
            .query_async(&mut connection)
            .await?;
        let page = read_entries(reply);
        if let Some(entry) = page.last() {
            *last = Some(entry.id.clone());
        }
        apply_page(state, replica, page, skew).await;
    }
}

/// Applies a page of entries off the async workers (parsing and indexing
/// a backlog takes a while); returns the decisions applied.
async fn apply_page(state: &Arc<FleetState>, replica: &str, page: Vec<Entry>, skew: i128) -> usize {
    if page.is_empty() {
        return 0;
    }
    let (state, replica) = (Arc::clone(state), replica.to_owned());
    let work = move || {
        let now_ms = wall_ms() + skew;
        page.iter()
            .map(|entry| {
                let made = id_ms(&entry.id).unwrap_or(now_ms);
                let age = Duration::from_millis(u64::try_from(now_ms - made).unwrap_or(0));
                apply(&state, &replica, entry.payload.as_deref(), age)
            })
            .sum()
    };
    tokio::task::spawn_blocking(work).await.unwrap_or(0)
}

/// Applies another replica's batch, made `age` ago; returns the decisions
/// applied. Decisions older than the state they feed keeps are skipped.
fn apply(state: &FleetState, replica: &str, payload: Option<&[u8]>, age: Duration) -> usize {
    let Some(batch) = payload.and_then(|bytes| serde_json::from_slice::<Batch>(bytes).ok()) else { return 0 };
    if batch.from == replica {
        return 0;
    }
    let now = Instant::now();
    let Some(at) = now.checked_sub(age) else { return 0 };
    let mut applied = 0;
    for event in batch.events {
        match event {
            Event::Prefix { pod, blocks } if age < state.prefix.idle_limit() => {
                if let Some(hashes) = parse_blocks(&blocks) {
                    state.prefix.record_at(&hashes, pod_id(&pod), at);
                    applied += 1;
                }
            }
            Event::Tokens { user, tokens } if age < state.tokens.window() && tokens.is_finite() && !user.is_empty() => {
                state.tokens.add(&user, tokens.clamp(-MAX_CHARGE, MAX_CHARGE), at);
                applied += 1;
            }
            Event::Prefix { .. } | Event::Tokens { .. } => {}
        }
    }
    applied
}

/// What the other replicas said they have in flight, and what of it each pod was given.
#[derive(Debug, Default)]
struct LoadView {
    /// Replica → (when heard, pod → count).
    reports: HashMap<String, (Instant, HashMap<String, usize>)>,
    /// Pod → the others' sum last given to it (pods with none left out).
    applied: HashMap<String, usize>,
    /// The pods by key, for the snapshot they were taken from.
    index: Option<(Arc<crate::discovery::Snapshot>, PodsByKey)>,
    /// The replicas whose counts the pods were last given (none while not hearing).
    members: Vec<String>,
}

type PodsByKey = HashMap<String, Arc<crate::discovery::PodInfo>>;

type Others = Arc<Mutex<LoadView>>;

/// The least time between two reports of one replica when `replicas`
/// replicas report, each `bytes` long: [`LOAD_EVERY`], or longer so that
/// every replica's reports, each delivered to every replica, stay within
/// [`LOAD_DELIVERIES_PER_SECOND`] and [`LOAD_BYTES_PER_SECOND`].
fn report_gap(replicas: usize, bytes: usize) -> Duration {
    let n = replicas.max(1) as f64;
    let by_count = n * n / LOAD_DELIVERIES_PER_SECOND;
    let by_bytes = n * n * bytes as f64 / LOAD_BYTES_PER_SECOND;
    Duration::from_secs_f64(by_count.max(by_bytes)).max(LOAD_EVERY).min(LOAD_HEARTBEAT)
}

/// Says what this replica has in flight per pod whenever it changes (at
/// most every [`report_gap`]) and at least every [`LOAD_HEARTBEAT`]; every
/// heartbeat it also asks Redis how many replicas listen (the gap's N) and
/// renews the sums of the others' (dropping replicas gone silent), until
/// `shutdown`.
async fn share_load(
    mut caller: Caller,
    replica: String,
    others: Others,
    pods: Arc<PodStore>,
    status: Arc<Status>,
    shutdown: CancellationToken,
) {
    // Until Redis says how many replicas listen, report only at heartbeats:
    // a fleet starting together must not flood it.
    let mut listeners: Option<usize> = None;
    let mut said: Option<(Instant, HashMap<String, usize>, usize)> = None;
    let mut heartbeat = tokio::time::interval(LOAD_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let beat = tokio::select! {
            () = shutdown.cancelled() => return,
            () = crate::discovery::load_changed() => false,
            _ = heartbeat.tick() => true,
        };
        if beat {
            let mut command = redis::cmd("PUBSUB");
            command.arg("NUMSUB").arg(LOAD_CHANNEL);
            if let Some((_, count)) = caller.call::<(String, usize)>(&command, "counting replicas").await {
                listeners = Some(count);
            }
            apply_others(&replica, &others, &pods, &status, true);
        } else {
            // Changes close together go in one report.
            let Some(listeners) = listeners else { continue };
            if let Some((at, _, bytes)) = &said {
                let gap = report_gap(listeners.max(status.peers.load(Ordering::Relaxed) + 1), *bytes);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep_until((*at + gap).into()) => {}
                }
            }
        }
        let mine: HashMap<String, usize> = pods
            .snapshot()
            .base_models()
            .flat_map(|model| model.pods.iter())
            .filter(|pod| pod.load.in_flight() > 0)
            .map(|pod| (pod.key.clone(), pod.load.in_flight()))
            .collect();
        if !beat && said.as_ref().is_some_and(|(_, pods, _)| *pods == mine) {
            continue;
        }
        let report = LoadReport { from: replica.clone(), pods: mine };
        let Ok(payload) = serde_json::to_string(&report) else { continue };
        let bytes = payload.len();
        let mut command = redis::cmd("PUBLISH");
        command.arg(LOAD_CHANNEL).arg(payload);
        let _: Option<i64> = caller.call(&command, "publishing requests in flight").await;
        // Said, or failed to (and tried again at the next change or heartbeat).
        said = Some((Instant::now(), report.pods, bytes));
    }
}

/// Gives each pod the sum of the other replicas' requests in flight on it,
/// forgetting replicas silent for [`LOAD_VALID`]: every pod when `all`
/// (renewing how long the counts hold), else the pods whose sum changed.
/// Not hearing the others, it leaves the counts to lapse: routing uses this
/// replica's own view.
fn apply_others(me: &str, others: &Others, pods: &PodStore, status: &Status, all: bool) {
    let now = Instant::now();
    // Held while the pods are written, so an older sum never overwrites a newer one.
    let mut view = others.lock().unwrap_or_else(PoisonError::into_inner);
    let LoadView { reports, applied, index, members } = &mut *view;
    reports.retain(|_, (at, _)| now.saturating_duration_since(*at) < LOAD_VALID);
    status.peers.store(reports.len(), Ordering::Relaxed);
    let hearing = status.hearing_loads.load(Ordering::Relaxed);
    set_turn(me, if hearing { Some(reports.keys()) } else { None }.into_iter().flatten());
    if !hearing {
        applied.clear();
        members.clear();
        return;
    }
    let snapshot = pods.snapshot();
    if members.len() != reports.len() || members.iter().any(|member| !reports.contains_key(member)) {
        // The sums now move by whole replicas, not by requests.
        for pod in snapshot.base_models().flat_map(|model| model.pods.iter()) {
            pod.load.others_changed();
        }
        *members = reports.keys().cloned().collect();
    }
    let mut sums: HashMap<String, usize> = HashMap::new();
    for (_, counts) in reports.values() {
        for (pod, count) in counts {
            let sum = sums.entry(pod.clone()).or_default();
            *sum = sum.saturating_add((*count).min(MAX_IN_FLIGHT));
        }
    }
    if all {
        for pod in snapshot.base_models().flat_map(|model| model.pods.iter()) {
            pod.load.others_in_flight(sums.get(&pod.key).copied().unwrap_or(0), LOAD_VALID);
        }
    } else {
        if index.as_ref().is_none_or(|(seen, _)| !Arc::ptr_eq(seen, &snapshot)) {
            let by_key = snapshot
                .base_models()
                .flat_map(|model| model.pods.iter())
                .map(|pod| (pod.key.clone(), Arc::clone(pod)))
                .collect();
            *index = Some((Arc::clone(&snapshot), by_key));
        }
        let by_key = index.as_ref().map(|(_, by_key)| by_key);
        let changed = sums.iter().filter(|(pod, sum)| applied.get(*pod) != Some(sum)).map(|(pod, _)| pod);
        let gone = applied.keys().filter(|pod| !sums.contains_key(*pod));
        for key in changed.chain(gone) {
            if let Some(pod) = by_key.and_then(|by_key| by_key.get(key)) {
                pod.load.others_in_flight(sums.get(key).copied().unwrap_or(0), LOAD_VALID);
            }
        }
    }
    *applied = sums;
}

/// Takes the other replicas' load reports into `others` until `shutdown`,
/// subscribing again whenever the subscription breaks or falls silent.
async fn hear_loads(
    client: redis::Client,
    replica: String,
    (others, pods, status): (Others, Arc<PodStore>, Arc<Status>),
    log: Arc<ErrorLog>,
    shutdown: CancellationToken,
) {
    loop {
        let subscribing = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(LOAD_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let connected = tokio::select! {
            () = shutdown.cancelled() => return,
            result = tokio::time::timeout(CALL_TIMEOUT, subscribing) => result,
        };
        match connected {
            Ok(Ok(mut pubsub)) => {
                status.hearing_loads.store(true, Ordering::Relaxed);
                let mut messages = pubsub.on_message();
                loop {
                    let message = tokio::select! {
                        () = shutdown.cancelled() => return,
                        message = tokio::time::timeout(SILENT_SUBSCRIPTION, messages.next()) => message,
                    };
                    // Silent (this replica's own heartbeat did not come back) or closed.
                    let Ok(Some(message)) = message else { break };
                    let Ok(report) = serde_json::from_slice::<LoadReport>(message.get_payload_bytes()) else {
                        continue;
                    };
                    if report.from == replica || report.pods.len() > MAX_PODS_PER_REPORT {
                        continue;
                    }
                    {
                        let mut view = others.lock().unwrap_or_else(PoisonError::into_inner);
                        if view.reports.len() >= MAX_PEERS && !view.reports.contains_key(&report.from) {
                            continue;
                        }
                        view.reports.insert(report.from, (Instant::now(), report.pods));
                    }
                    // At once: counts a few milliseconds old already mislead.
                    apply_others(&replica, &others, &pods, &status, false);
                }
                status.hearing_loads.store(false, Ordering::Relaxed);
                log.warn("hearing the other replicas' requests in flight", &"subscription lost or silent");
            }
            Ok(Err(err)) => log.warn("hearing the other replicas' requests in flight", &err),
            Err(_) => log.warn("hearing the other replicas' requests in flight", &"subscribing timed out"),
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
        assert_eq!(parse_blocks(&"0".repeat(16 * (SHARED_BLOCKS + 2))), None, "too many");
    }

    fn state() -> FleetState {
        FleetState {
            link: Arc::default(),
            prefix: Arc::new(PrefixIndex::new(1000, Duration::from_secs(60))),
            tokens: Arc::new(TokenTracker::new(Duration::from_secs(60))),
            history: Duration::from_secs(60),
        }
    }

    fn payload(batch: &Batch) -> Vec<u8> {
        serde_json::to_vec(batch).expect("serialises")
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
        assert_eq!(apply(&state, "me", Some(b"{"), Duration::ZERO), 0);
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
        let (outbox, _inbox) = tokio::sync::mpsc::channel(1);
        link.outbox.set(outbox).expect("first");
        link.send(Event::Tokens { user: "u".into(), tokens: 1.0 });
        link.send(Event::Tokens { user: "u".into(), tokens: 2.0 });
        assert_eq!(link.dropped(), 1);
    }

    #[test]
    fn charges_older_than_the_token_window_are_not_counted() {
        let state = state();
        let batch = Batch {
            from: "them".into(),
            events: vec![
                Event::Tokens { user: "old".into(), tokens: 100.0 },
                Event::Tokens { user: "huge".into(), tokens: 1e300 },
            ],
        };
        apply(&state, "me", Some(&payload(&batch)), Duration::from_secs(90));
        assert_eq!(state.tokens.tokens("old", Instant::now()), 0.0, "90 s old, kept for 60");
        apply(&state, "me", Some(&payload(&batch)), Duration::from_secs(1));
        assert_eq!(state.tokens.tokens("old", Instant::now()), 100.0);
        assert_eq!(state.tokens.tokens("huge", Instant::now()), MAX_CHARGE, "an absurd charge is clamped");
    }

    #[test]
    fn stream_replies_are_read_leniently() {
        use redis::Value::{Array, BulkString, Int, Nil};
        let entry = |id: &str, fields: Vec<redis::Value>| Array(vec![BulkString(id.into()), Array(fields)]);
        let range = Array(vec![
            entry("1-0", vec![BulkString(b"b".to_vec()), BulkString(b"{batch}".to_vec())]),
            entry("2-0", vec![BulkString(vec![0xff, 0xfe]), BulkString(b"x".to_vec())]),
            entry("3-0", vec![BulkString(b"b".to_vec())]),
            Int(7),
            entry(
                "4-0",
                vec![BulkString(b"other".to_vec()), Int(1), BulkString(b"b".to_vec()), BulkString(b"y".to_vec())],
            ),
        ]);
        let read: Vec<(String, Option<Vec<u8>>)> =
            entries(range.clone()).into_iter().map(|e| (e.id, e.payload)).collect();
        assert_eq!(
            read,
            [
                ("1-0".into(), Some(b"{batch}".to_vec())),
                ("2-0".into(), None),
                ("3-0".into(), None),
                ("4-0".into(), Some(b"y".to_vec())),
            ],
            "every entry's id comes through, whatever its fields"
        );
        let xread = Array(vec![Array(vec![BulkString(STREAM.into()), range])]);
        assert_eq!(read_entries(xread).len(), 4);
        assert!(read_entries(Nil).is_empty(), "a read that timed out");
    }

    #[test]
    fn reports_slow_down_as_the_fleet_and_the_reports_grow() {
        assert_eq!(report_gap(1, 100), LOAD_EVERY);
        assert_eq!(report_gap(4, 100), LOAD_EVERY);
        assert_eq!(report_gap(10, 100), Duration::from_millis(5));
        assert_eq!(report_gap(20, 100), Duration::from_millis(20));
        assert_eq!(report_gap(4, 30_000), Duration::from_millis(24), "1,000 busy pods: 30 KB a report");
        assert_eq!(report_gap(100, 100), LOAD_HEARTBEAT, "never rarer than the heartbeat");
    }

    #[test]
    fn replicas_that_hear_each_other_take_different_shares_on_ties() {
        // The process-wide turn is left alone: other tests route in parallel.
        let ids: Vec<String> = vec!["b".into(), "c".into(), "a".into()];
        let turn = turn_among("b", ids.iter());
        assert_eq!(turn, Turn { ordinal: 1, replicas: 3 });
        assert_eq!((0..6).map(|i| turn.not_mine(i, 6)).collect::<Vec<_>>(), [1, 1, 0, 0, 1, 1]);
        assert_eq!((0..4).map(|i| turn.not_mine(i, 4)).collect::<Vec<_>>(), [1, 1, 0, 1], "shares of 1 or 2");
        assert_eq!((0..2).map(|i| turn.not_mine(i, 2)).collect::<Vec<_>>(), [1, 0], "fewer pods than replicas");
        let alone = turn_among("b", std::iter::empty());
        assert_eq!(alone, Turn { ordinal: 0, replicas: 1 });
        assert_eq!(alone.not_mine(5, 6), 0, "alone, every candidate is its share");
    }

    #[test]
    fn stream_ids_give_their_milliseconds() {
        assert_eq!(id_ms("1700000000123-4"), Some(1_700_000_000_123));
        assert_eq!(id_ms("nope"), None);
    }
}
