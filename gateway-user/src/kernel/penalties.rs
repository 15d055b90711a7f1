//! Penalising clients that keep sending requests after being told 429.
//!
//! - [`PenaltyPolicy`]: counts gateway-made 429s per client IP in fixed windows;
//!   at the threshold the client is penalised until the end of the current
//!   rate-limit (RPS) window plus the penalty duration, in Redis server time,
//!   so every replica's view of "the current window" agrees with the limiter.
//! - [`PenaltyTable`]: penalised clients and their expiry, in userspace. It
//!   mirrors the kernel map and is the enforcement itself when kernel assist is
//!   not active (the listener closes such connections right after accept).
//! - [`Enforcer`]: applies a penalty to the table and, when loaded, the kernel map.
//! - [`spawn_redis_sync`]: publishes local penalties to Redis (a sorted set for
//!   late joiners plus a pub/sub message) and applies every replica's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::counters::AssistTallies;

/// Sorted set of penalties (member: client IP, score: expiry in Redis ms).
pub const REDIS_KEY: &str = "turnstile:penalties";
/// Pub/sub channel announcing each new penalty as `"<ip> <expiry ms>"`.
pub const REDIS_CHANNEL: &str = "turnstile:penalties";

/// Length of the rate limiter's windows (model RPS), which expiries align to.
const RPS_WINDOW_MS: u64 = 1000;
/// Strike entries kept before stale windows are swept out.
const MAX_STRIKE_ENTRIES: usize = 65536;
/// Penalties kept in userspace (the kernel map is an LRU of the same size).
const MAX_PENALTIES: usize = gateway_common::MAX_PENALTIES as usize;

/// Tunables of the policy (flags `--penalty-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PenaltySettings {
    /// 429s within one window that get a client penalised; 0 disables penalties.
    pub threshold: u32,
    /// Length of the windows 429s are counted in.
    pub window: Duration,
    /// How long a penalty lasts past the end of the current RPS window.
    pub duration: Duration,
}

/// Unix time in milliseconds for penalties: tokio's clock (so paused-time tests
/// are exact) anchored to the wall clock at start, plus the measured offset to
/// the Redis server's clock.
#[derive(Debug)]
pub struct PenaltyClock {
    base: tokio::time::Instant,
    base_unix_ms: u64,
    redis_offset_ms: AtomicI64,
}

impl Default for PenaltyClock {
    fn default() -> Self {
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self::starting_at(unix_ms)
    }
}

impl PenaltyClock {
    /// A clock reading `unix_ms` now.
    pub fn starting_at(unix_ms: u64) -> Self {
        Self { base: tokio::time::Instant::now(), base_unix_ms: unix_ms, redis_offset_ms: AtomicI64::new(0) }
    }

    /// This host's Unix time, ms.
    pub fn local_now_ms(&self) -> u64 {
        self.base_unix_ms + self.base.elapsed().as_millis() as u64
    }

    /// The Redis server's Unix time, ms (this host's without Redis).
    pub fn redis_now_ms(&self) -> u64 {
        self.to_redis(self.local_now_ms())
    }

    /// Records `redis_ms - local_ms`, measured with the Redis TIME command.
    pub fn set_redis_offset(&self, offset_ms: i64) {
        self.redis_offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// A Redis-time instant in this host's time.
    pub fn to_local(&self, redis_ms: u64) -> u64 {
        redis_ms.saturating_add_signed(-self.redis_offset_ms.load(Ordering::Relaxed))
    }

    fn to_redis(&self, local_ms: u64) -> u64 {
        local_ms.saturating_add_signed(self.redis_offset_ms.load(Ordering::Relaxed))
    }
}

/// When a penalty decided at `now_ms` ends: the end of the current RPS window
/// plus `duration`.
pub fn penalty_until(now_ms: u64, duration: Duration) -> u64 {
    (now_ms / RPS_WINDOW_MS + 1) * RPS_WINDOW_MS + duration.as_millis() as u64
}

#[derive(Clone, Copy, Debug)]
struct Strikes {
    window: u64,
    count: u32,
}

/// Decides penalties from 429s.
#[derive(Debug)]
pub struct PenaltyPolicy {
    settings: PenaltySettings,
    strikes: Mutex<HashMap<IpAddr, Strikes>>,
}

impl PenaltyPolicy {
    pub fn new(settings: PenaltySettings) -> Self {
        Self { settings, strikes: Mutex::new(HashMap::new()) }
    }

    pub fn settings(&self) -> PenaltySettings {
        self.settings
    }

    /// Counts a 429 sent to `ip` at `now_ms` (Redis time); returns the expiry
    /// (Redis time, ms) when this one crosses the threshold.
    pub fn record_429(&self, ip: IpAddr, now_ms: u64) -> Option<u64> {
        let PenaltySettings { threshold, window, duration } = self.settings;
        if threshold == 0 {
            return None;
        }
        let window_ms = (window.as_millis() as u64).max(1);
        let current = now_ms / window_ms;
        let mut strikes = self.strikes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if strikes.len() >= MAX_STRIKE_ENTRIES && !strikes.contains_key(&ip) {
            strikes.retain(|_, s| s.window == current);
            if strikes.len() >= MAX_STRIKE_ENTRIES {
                return None;
            }
        }
        let entry = strikes.entry(ip).or_insert(Strikes { window: current, count: 0 });
        if entry.window != current {
            *entry = Strikes { window: current, count: 0 };
        }
        entry.count += 1;
        if entry.count < threshold {
            return None;
        }
        // Start over: a client still sending after this gets the penalty extended.
        strikes.remove(&ip);
        Some(penalty_until(now_ms, duration))
    }

    /// Drops strike counts of windows before the one at `now_ms`.
    pub fn sweep(&self, now_ms: u64) {
        let window_ms = (self.settings.window.as_millis() as u64).max(1);
        let current = now_ms / window_ms;
        self.strikes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|_, s| s.window == current);
    }
}

/// Penalised clients and their expiry (this host's Unix time, ms).
#[derive(Debug, Default)]
pub struct PenaltyTable {
    entries: RwLock<HashMap<IpAddr, u64>>,
    /// Entries in the table, read without the lock on every accept.
    len: AtomicUsize,
}

impl PenaltyTable {
    /// Records a penalty; true when it is new or extends the one in place.
    pub fn insert(&self, ip: IpAddr, until_ms: u64) -> bool {
        let mut entries = self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= MAX_PENALTIES && !entries.contains_key(&ip) {
            return false;
        }
        let slot = entries.entry(ip).or_insert(0);
        let extended = until_ms > *slot;
        *slot = (*slot).max(until_ms);
        self.len.store(entries.len(), Ordering::Relaxed);
        extended
    }

    /// Whether `ip` is penalised at `now_ms`.
    pub fn is_penalised(&self, ip: IpAddr, now_ms: u64) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let entries = self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.get(&normalize(ip)).is_some_and(|until| now_ms < *until)
    }

    /// The expiry of `ip`'s penalty, if any (expired or not).
    pub fn until(&self, ip: IpAddr) -> Option<u64> {
        self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&normalize(ip)).copied()
    }

    /// Removes and returns penalties expired at `now_ms`.
    pub fn sweep(&self, now_ms: u64) -> Vec<IpAddr> {
        let mut entries = self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let expired: Vec<IpAddr> = entries.iter().filter(|(_, until)| **until <= now_ms).map(|(ip, _)| *ip).collect();
        for ip in &expired {
            entries.remove(ip);
        }
        self.len.store(entries.len(), Ordering::Relaxed);
        expired
    }

    /// Penalties in the table (some may have expired since the last sweep).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 clients)
/// are the IPv4 client, as the kernel key treats them.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The kernel's penalty map, as the enforcer uses it.
pub trait KernelPenalties: Send + Sync + std::fmt::Debug {
    /// Refuses `ip` for `remaining` from now; `until_unix_ms` is for display.
    fn insert(&self, ip: IpAddr, remaining: Duration, until_unix_ms: u64);
    /// Forgets `ip` (its penalty expired).
    fn remove(&self, ip: IpAddr);
}

/// Where a penalty came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Decided by this replica.
    Local,
    /// Received from another replica through Redis.
    Redis,
}

/// Applies penalties to the userspace table and, when loaded, the kernel map.
#[derive(Debug)]
pub struct Enforcer {
    pub table: Arc<PenaltyTable>,
    pub clock: Arc<PenaltyClock>,
    pub kernel: Option<Arc<dyn KernelPenalties>>,
    pub tallies: Arc<AssistTallies>,
}

impl Enforcer {
    /// Penalises `ip` until `until_redis_ms` (Redis time). Returns whether it
    /// changed anything (a penalty already known is not applied twice).
    pub fn apply(&self, ip: IpAddr, until_redis_ms: u64, origin: Origin) -> bool {
        let ip = normalize(ip);
        let until = self.clock.to_local(until_redis_ms);
        let now = self.clock.local_now_ms();
        if until <= now || !self.table.insert(ip, until) {
            return false;
        }
        if let Some(kernel) = &self.kernel {
            kernel.insert(ip, Duration::from_millis(until - now), until);
        }
        let tally = match origin {
            Origin::Local => &self.tallies.penalties_local,
            Origin::Redis => &self.tallies.penalties_redis,
        };
        tally.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %ip, until_unix_ms = until, in_ms = until - now, origin = ?origin, "client penalised");
        true
    }

    /// Drops expired penalties from the table and the kernel map.
    pub fn sweep(&self) {
        for ip in self.table.sweep(self.clock.local_now_ms()) {
            if let Some(kernel) = &self.kernel {
                kernel.remove(ip);
            }
        }
    }
}

/// Publishes local penalties to Redis and applies every replica's to
/// `enforcer`. Returns the sender the façade queues local penalties on.
pub fn spawn_redis_sync(
    url: &str,
    enforcer: Arc<Enforcer>,
    shutdown: CancellationToken,
) -> anyhow::Result<mpsc::Sender<(IpAddr, u64)>> {
    let client = redis::Client::open(url)?;
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(publish_loop(client.clone(), Arc::clone(&enforcer), rx, shutdown.clone()));
    tokio::spawn(subscribe_loop(client, enforcer, shutdown));
    Ok(tx)
}

/// Bound on one Redis connect or command, so a stuck Redis delays only the sync.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait between reconnects of the subscriber.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

async fn with_timeout<T>(work: impl Future<Output = redis::RedisResult<T>>) -> anyhow::Result<T> {
    Ok(tokio::time::timeout(REDIS_TIMEOUT, work).await.map_err(|_| anyhow::anyhow!("timed out"))??)
}

/// Measures the Redis clock against ours (TIME) and records the offset.
async fn measure_offset(con: &mut redis::aio::MultiplexedConnection, clock: &PenaltyClock) -> anyhow::Result<()> {
    let before = clock.local_now_ms();
    let (seconds, micros): (u64, u64) = with_timeout(redis::cmd("TIME").query_async(con)).await?;
    let after = clock.local_now_ms();
    let redis_ms = seconds * 1000 + micros / 1000;
    let local_ms = before + (after - before) / 2;
    clock.set_redis_offset(redis_ms as i64 - local_ms as i64);
    Ok(())
}

async fn publish_loop(
    client: redis::Client,
    enforcer: Arc<Enforcer>,
    mut rx: mpsc::Receiver<(IpAddr, u64)>,
    shutdown: CancellationToken,
) {
    let mut con: Option<redis::aio::MultiplexedConnection> = None;
    loop {
        let (ip, until) = tokio::select! {
            next = rx.recv() => match next {
                Some(next) => next,
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
        if con.is_none() {
            match with_timeout(client.get_multiplexed_async_connection()).await {
                Ok(c) => con = Some(c),
                Err(err) => {
                    tracing::warn!(error = %err, client = %ip, "penalty not published: Redis unreachable");
                    continue;
                }
            }
        }
        let Some(c) = con.as_mut() else { continue };
        let now = enforcer.clock.redis_now_ms();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(REDIS_KEY)
            .arg("GT")
            .arg(until)
            .arg(ip.to_string())
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(REDIS_KEY)
            .arg("-inf")
            .arg(now)
            .ignore()
            .cmd("PUBLISH")
            .arg(REDIS_CHANNEL)
            .arg(format!("{ip} {until}"))
            .ignore();
        if let Err(err) = with_timeout(pipe.query_async::<()>(c)).await {
            tracing::warn!(error = %err, client = %ip, "penalty not published to Redis");
            con = None;
        }
    }
}

/// Parses a `"<ip> <expiry ms>"` message.
pub fn parse_message(text: &str) -> Option<(IpAddr, u64)> {
    let (ip, until) = text.trim().split_once(' ')?;
    Some((ip.parse().ok()?, until.trim().parse().ok()?))
}

async fn subscribe_loop(client: redis::Client, enforcer: Arc<Enforcer>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            result = subscribe_once(&client, &enforcer) => {
                if let Err(err) = result {
                    tracing::warn!(error = %format!("{err:#}"), "penalty subscription to Redis lost; retrying");
                }
            }
            () = shutdown.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn subscribe_once(client: &redis::Client, enforcer: &Enforcer) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let mut con = with_timeout(client.get_multiplexed_async_connection()).await?;
    measure_offset(&mut con, &enforcer.clock).await?;
    let mut pubsub = with_timeout(client.get_async_pubsub()).await?;
    with_timeout(pubsub.subscribe(REDIS_CHANNEL)).await?;
    // Subscribed first, then the snapshot: nothing published in between is missed.
    let now = enforcer.clock.redis_now_ms();
    let current: Vec<(String, f64)> = with_timeout(
        redis::cmd("ZRANGEBYSCORE").arg(REDIS_KEY).arg(now).arg("+inf").arg("WITHSCORES").query_async(&mut con),
    )
    .await?;
    for (member, score) in current {
        if let Ok(ip) = member.parse::<IpAddr>() {
            enforcer.apply(ip, score as u64, Origin::Redis);
        }
    }
    tracing::info!("penalty sync with Redis established");
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let payload: String = message.get_payload().unwrap_or_default();
        match parse_message(&payload) {
            Some((ip, until)) => {
                enforcer.apply(ip, until, Origin::Redis);
            }
            None => tracing::debug!(payload, "ignoring malformed penalty message"),
        }
    }
    anyhow::bail!("the subscription ended")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));

    fn settings(threshold: u32) -> PenaltySettings {
        PenaltySettings { threshold, window: Duration::from_secs(10), duration: Duration::from_secs(5) }
    }

    #[test]
    fn expiry_is_the_end_of_the_current_rps_window_plus_duration() {
        assert_eq!(penalty_until(1_000_000_000, Duration::from_secs(5)), 1_000_006_000);
        assert_eq!(penalty_until(1_000_000_999, Duration::from_secs(5)), 1_000_006_000);
        assert_eq!(penalty_until(1_000_001_000, Duration::from_secs(5)), 1_000_007_000);
    }

    #[test]
    fn threshold_counts_429s_within_one_window() {
        let policy = PenaltyPolicy::new(settings(3));
        let t = 1_000_000_250;
        assert_eq!(policy.record_429(CLIENT, t), None);
        assert_eq!(policy.record_429(CLIENT, t + 10), None);
        assert_eq!(policy.record_429(CLIENT, t + 20), Some(1_000_006_000));
        // Counting starts over after a penalty.
        assert_eq!(policy.record_429(CLIENT, t + 30), None);
    }

    #[test]
    fn strikes_of_an_older_window_do_not_count() {
        let policy = PenaltyPolicy::new(settings(2));
        assert_eq!(policy.record_429(CLIENT, 1_000_009_999), None);
        assert_eq!(policy.record_429(CLIENT, 1_000_010_000), None, "a new 10 s window starts");
        assert!(policy.record_429(CLIENT, 1_000_010_001).is_some());
    }

    #[test]
    fn zero_threshold_disables_penalties() {
        let policy = PenaltyPolicy::new(settings(0));
        for i in 0..100 {
            assert_eq!(policy.record_429(CLIENT, 1_000_000_000 + i), None);
        }
    }

    #[test]
    fn clients_are_counted_separately_and_mapped_addresses_are_ipv4() {
        let policy = PenaltyPolicy::new(settings(2));
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        assert_eq!(policy.record_429(CLIENT, 1_000_000_000), None);
        assert_eq!(policy.record_429(other, 1_000_000_000), None);
        assert!(policy.record_429(CLIENT, 1_000_000_001).is_some());
        assert_eq!(normalize("::ffff:10.0.0.7".parse().unwrap()), CLIENT);
    }

    #[test]
    fn messages_round_trip() {
        assert_eq!(parse_message("10.0.0.7 1700000000123"), Some((CLIENT, 1_700_000_000_123)));
        assert_eq!(parse_message("::1 5"), Some(("::1".parse().unwrap(), 5)));
        assert_eq!(parse_message("garbage"), None);
    }

    fn enforcer(clock: PenaltyClock) -> Enforcer {
        Enforcer {
            table: Arc::new(PenaltyTable::default()),
            clock: Arc::new(clock),
            kernel: None,
            tallies: Arc::new(AssistTallies::default()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn penalty_expires_at_the_aligned_time() {
        let enforcer = enforcer(PenaltyClock::starting_at(1_000_000_400));
        let policy = PenaltyPolicy::new(settings(2));
        let now = enforcer.clock.redis_now_ms();
        assert_eq!(policy.record_429(CLIENT, now), None);
        let until = policy.record_429(CLIENT, now).unwrap();
        assert!(enforcer.apply(CLIENT, until, Origin::Local));
        assert!(!enforcer.apply(CLIENT, until, Origin::Redis), "the same penalty from Redis changes nothing");
        assert_eq!(enforcer.tallies.penalties_local.load(Ordering::Relaxed), 1);
        assert_eq!(enforcer.tallies.penalties_redis.load(Ordering::Relaxed), 0);

        // 0.6 s to the end of the RPS window, then 5 s.
        tokio::time::advance(Duration::from_millis(5_599)).await;
        assert!(enforcer.table.is_penalised(CLIENT, enforcer.clock.local_now_ms()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!enforcer.table.is_penalised(CLIENT, enforcer.clock.local_now_ms()));
        enforcer.sweep();
        assert!(enforcer.table.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn redis_time_converts_to_local_time() {
        let enforcer = enforcer(PenaltyClock::starting_at(1_000_000_000));
        // Redis runs 2 s ahead of this host.
        enforcer.clock.set_redis_offset(2_000);
        assert_eq!(enforcer.clock.redis_now_ms(), 1_000_002_000);
        assert!(enforcer.apply(CLIENT, 1_000_003_000, Origin::Redis));
        assert_eq!(enforcer.table.until(CLIENT), Some(1_000_001_000));
        assert_eq!(enforcer.tallies.penalties_redis.load(Ordering::Relaxed), 1);
        // Already expired in Redis time: ignored.
        assert!(!enforcer.apply("10.0.0.9".parse().unwrap(), 1_000_001_500, Origin::Redis));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_penalty_extends_an_earlier_one() {
        let enforcer = enforcer(PenaltyClock::starting_at(1_000_000_000));
        assert!(enforcer.apply(CLIENT, 1_000_005_000, Origin::Local));
        assert!(!enforcer.apply(CLIENT, 1_000_004_000, Origin::Redis));
        assert!(enforcer.apply(CLIENT, 1_000_009_000, Origin::Redis));
        assert_eq!(enforcer.table.until(CLIENT), Some(1_000_009_000));
    }
}
